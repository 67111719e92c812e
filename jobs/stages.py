"""The nightly refresh's stages, what each reads and writes, and the dependencies that follow from it: the
one description the DAG and the runtime share.

Kept free of imports so the DAG file can read it at parse time without loading anything heavy.

A stage depends on the stages that last wrote what it reads (earlier in PIPELINE), and on the quality gate
that checked it: a table checked by validate_bronze or validate_gold is read only after the check.
`artifact:` names files outside the lakehouse (the quantizers' codebooks, the diffusion checkpoint).
`tests/test_layout.py` keeps these lists true to the stage modules (every table a module names is declared).

The graph this gives is a line after the two ingests: every gold table keys items by semantic ID, which
needs the embeddings of the knowledge, so nothing downstream can start before reason_items ends.
"""

CHECKS = "checks"  # a quality gate's reads: it passes them on as checked

# stage: (reads, writes), in the order a serial run takes them
LINEAGE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ingest_catalog": ((), ("bronze.catalog_items",)),
    "ingest_interactions": ((), ("bronze.interactions",)),
    "validate_bronze": (("bronze.catalog_items", "bronze.interactions"), (CHECKS,)),
    "reason_items": (("bronze.catalog_items", "bronze.interactions", "silver.item_knowledge"),
                     ("silver.item_knowledge", "ops.llm_attempts")),
    "embed_items": (("bronze.catalog_items", "silver.item_knowledge", "silver.item_embeddings"),
                    ("silver.item_embeddings",)),
    "train_quantizer": (("bronze.catalog_items", "silver.item_embeddings"), ("artifact:codebooks",)),
    "assign_semantic_ids": (("bronze.catalog_items", "silver.item_embeddings", "artifact:codebooks"),
                            ("gold.item_semantic_ids",)),
    "build_user_sequences": (("bronze.interactions", "gold.item_semantic_ids", "artifact:codebooks"),
                             ("gold.user_sequences",)),
    "infer_beyond_log": (("gold.user_sequences", "gold.item_semantic_ids", "artifact:codebooks", "silver.item_knowledge",
                          "silver.item_embeddings", "bronze.catalog_items"),
                         ("gold.user_augmented_behaviors", "artifact:diffusion")),
    "build_user_features": (("bronze.catalog_items", "bronze.interactions", "silver.item_knowledge",
                             "gold.user_augmented_behaviors"), ("gold.user_features",)),
    "validate_gold": (("gold.item_semantic_ids", "gold.user_sequences", "gold.user_augmented_behaviors",
                       "gold.user_features"), (CHECKS,)),
    "publish": (("ops.pipeline_runs", "silver.quarantine", "gold.item_semantic_ids", "gold.user_sequences",
                 "gold.user_augmented_behaviors", "gold.user_features"), ()),
}
PIPELINE = list(LINEAGE)


def upstream(stage: str) -> set[str]:
    """The stages `stage` waits for: the last earlier writer of each thing it reads, and that thing's gate;
    publish, which reports the whole run, waits for every other stage."""
    earlier = PIPELINE[: PIPELINE.index(stage)]
    if stage == "publish":
        return set(earlier)
    reads, _ = LINEAGE[stage]
    deps = set()
    for thing in reads:
        writers = [s for s in earlier if thing in LINEAGE[s][1]]
        gates = [s for s in earlier if CHECKS in LINEAGE[s][1] and thing in LINEAGE[s][0]]
        deps.update(writers[-1:] + gates[-1:])
    return deps


def edges(concurrent_commits: bool = True) -> list[tuple[str, str]]:
    """(upstream, downstream) pairs with the ones implied by others left out (the transitive reduction),
    so the Airflow graph shows each dependency once.

    `concurrent_commits=False` runs stages that would otherwise run side by side one after the other: on
    an object store without a multi-writer Delta LogStore (s3a:// with the default one), two drivers
    committing to one table at once are not safe, and every stage writes silver.quarantine and
    ops.pipeline_runs."""
    direct = {s: upstream(s) for s in PIPELINE}
    if not concurrent_commits:
        for earlier, later in zip(PIPELINE, PIPELINE[1:], strict=False):
            direct[later] = direct[later] | {earlier}

    def reaches(a: str, b: str, skip: tuple[str, str]) -> bool:
        todo, seen = [b], set()
        while todo:
            node = todo.pop()
            for up in direct[node]:
                if (up, node) == skip or up in seen:
                    continue
                if up == a:
                    return True
                seen.add(up)
                todo.append(up)
        return False

    return [(up, s) for s in PIPELINE for up in sorted(direct[s]) if not reaches(up, s, (up, s))]
