"""The table catalog: every Delta table the pipeline writes, with its schema, key and partitioning.

Schemas are Arrow schemas: the one description serves Spark (converted on use), the `deltalake`
readers of training jobs, DuckDB for analysts and the generated docs/tables.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

# Lineage columns carried by every table (DESIGN.md: ds, run_id and the versions that produced a row).
DS = pa.field("ds", pa.date32(), nullable=False)
RUN_ID = pa.field("run_id", pa.string(), nullable=False)

STR_LIST = pa.list_(pa.string())
STR_MAP = pa.map_(pa.string(), pa.string())
FLOAT_MAP = pa.map_(pa.string(), pa.float64())
TS = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class TableSpec:
    name: str  # "layer.table"
    schema: pa.Schema
    key: tuple[str, ...]
    description: str
    partition_by: tuple[str, ...] = ()
    owner: str = "feature-platform"
    # Columns a MERGE keeps from the existing row when the key matches (e.g. first_seen_ds).
    preserve_on_update: tuple[str, ...] = ()
    column_docs: dict[str, str] = field(default_factory=dict)
    # Who names what it trained on by this table's Delta version (a codebook, a checkpoint): a commit that
    # changes no row (compaction, VACUUM) would still retrain it the next night, so maintenance skips it.
    version_pinned_by: str | None = None
    # The column rows are looked up by (an analyst's WHERE item_id = ...): compaction sorts (Z-orders) the
    # table by it, so each file covers a narrow range of it and a lookup opens one file instead of every
    # one (file statistics skip the rest). Only for tables mostly appended to or changed a little: a MERGE
    # that rewrites a whole table every run (the gold tables) leaves every file spanning every key again.
    # delta-rs tells string keys apart by about their first 14 bytes: ids with a longer shared prefix
    # would not be sorted.
    cluster_by: tuple[str, ...] = ()

    @property
    def layer(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def table(self) -> str:
        return self.name.split(".", 1)[1]

    @property
    def columns(self) -> list[str]:
        return self.schema.names


def _schema(*fields: pa.Field | tuple) -> pa.Schema:
    out = []
    for f in fields:
        if isinstance(f, pa.Field):
            out.append(f)
        else:
            name, typ, *rest = f
            out.append(pa.field(name, typ, nullable=rest[0] if rest else True))
    return pa.schema(out)


TABLES: dict[str, TableSpec] = {}


def _register(spec: TableSpec) -> TableSpec:
    missing = [k for k in spec.key + spec.partition_by if k not in spec.schema.names]
    if missing:
        raise ValueError(f"{spec.name}: key/partition columns {missing} not in schema")
    TABLES[spec.name] = spec
    return spec


CATALOG_ITEMS = _register(
    TableSpec(
        name="bronze.catalog_items",
        key=("item_id",),
        cluster_by=("item_id",),
        description="Catalog items as extracted from the source, one row per item id, text cleaned and hashed.",
        schema=_schema(
            ("item_id", pa.string(), False),
            ("title", pa.string(), False),
            ("description", pa.string()),
            ("categories", STR_LIST),
            ("brand", pa.string()),
            ("price", pa.float64()),
            ("attributes", STR_MAP),
            ("content_hash", pa.string(), False),
            ("source", pa.string(), False),
            ("first_seen_ds", pa.date32(), False),
            ("last_seen_ds", pa.date32(), False),
            DS,
            RUN_ID,
        ),
        preserve_on_update=("first_seen_ds",),
        column_docs={
            "content_hash": "sha256 of the canonical JSON of the text fields (title, description, categories, brand, price, attributes)",
            "categories": "category path, root first",
            "last_seen_ds": "the snapshot day that last wrote the row (first listed, changed, or listed again), as ds: "
            "the nightly sync writes only new, changed and vanished items. Every row is listed by the latest "
            "snapshot (items it drops are deleted), whose day is the last successful ingest_catalog in "
            "ops.pipeline_runs",
        },
    )
)

INTERACTIONS = _register(
    TableSpec(
        name="bronze.interactions",
        key=("user_id", "item_id", "event_ts"),
        partition_by=("ds",),
        description="User-item events; ds is the event's UTC date, so a day's rerun replaces exactly that day.",
        schema=_schema(
            ("user_id", pa.string(), False),
            ("item_id", pa.string(), False),
            ("event_ts", TS, False),
            ("event_type", pa.string(), False),
            ("rating", pa.float64()),
            ("source", pa.string(), False),
            DS,
            RUN_ID,
        ),
    )
)

ITEM_KNOWLEDGE = _register(
    TableSpec(
        name="silver.item_knowledge",
        key=("item_id", "content_hash", "prompt_version", "model"),
        cluster_by=("item_id",),
        description="Knowledge distilled per item by the multi-agent chain of thought (profiler, audience, relations, reconciler).",
        schema=_schema(
            ("item_id", pa.string(), False),
            ("content_hash", pa.string(), False),
            ("prompt_version", pa.string(), False),
            ("model", pa.string(), False),
            ("category_path", STR_LIST),
            ("product_type", pa.string()),
            ("attributes", STR_MAP),
            ("price_tier", pa.string()),
            ("audiences", STR_LIST),
            ("scenarios", STR_LIST),
            ("occasions", STR_LIST),
            ("complements", STR_LIST),
            ("substitutes", STR_LIST),
            ("summary", pa.string()),
            ("field_confidence", FLOAT_MAP),
            ("field_source", STR_MAP),
            ("traces", pa.string()),
            ("tokens_in", pa.int64()),
            ("tokens_out", pa.int64()),
            ("llm_calls", pa.int32()),
            ("latency_ms", pa.float64()),
            ("status", pa.string(), False),
            DS,
            RUN_ID,
        ),
        column_docs={
            "model": "the backend's model name; offline rows say offline-… so nobody mistakes them for LLM output",
            "traces": "JSON: every agent's reasoning and raw fields, per sampled path",
            "field_confidence": "share of sampled reasoning paths that agreed on each kept field",
            "field_source": "per field, where the value came from: 'catalog' (a catalog fact, e.g. the listed "
            "categories) or the model that inferred it; rows written before this column existed have null",
        },
    )
)

ITEM_EMBEDDINGS = _register(
    TableSpec(
        name="silver.item_embeddings",
        key=("item_id", "embedder"),
        version_pinned_by="the quantizers' codebook version (jobs/train_quantizer.py)",
        description="One embedding per item and embedder, of title + knowledge summary + key attributes.",
        schema=_schema(
            ("item_id", pa.string(), False),
            ("embedder", pa.string(), False),
            ("embedding", pa.list_(pa.float32())),
            ("dim", pa.int32(), False),
            ("text_hash", pa.string(), False),
            ("prompt_version", pa.string()),
            ("model", pa.string()),
            DS,
            RUN_ID,
        ),
        column_docs={"text_hash": "sha256 of the embedded text; an item is re-embedded only when it changes"},
    )
)

QUARANTINE = _register(
    TableSpec(
        name="silver.quarantine",
        key=("source_table", "key", "run_id"),
        description="Rows that failed validation or generation, with the reason and the offending payload.",
        schema=_schema(
            ("source_table", pa.string(), False),
            ("key", pa.string(), False),
            ("stage", pa.string(), False),
            ("reason", pa.string(), False),
            ("payload", pa.string()),
            DS,
            RUN_ID,
        ),
        column_docs={
            "source_table": "the table the row was headed for (DESIGN.md calls this column `table`)",
            "key": "the row's key as written in the source, or `<file>:<line>` when the key itself is unreadable",
        },
    )
)

ITEM_SEMANTIC_IDS = _register(
    TableSpec(
        name="gold.item_semantic_ids",
        key=("item_id", "codebook_version"),
        description="Semantic IDs per item: hierarchical residual codes plus a collision digit, and MPQ expert tokens.",
        schema=_schema(
            ("item_id", pa.string(), False),
            ("codebook_version", pa.string(), False),
            ("rq_codes", pa.list_(pa.int32())),
            ("mpq_tokens", pa.list_(pa.int32())),
            ("embedder", pa.string()),
            DS,
            RUN_ID,
        ),
        column_docs={
            "rq_codes": "L hierarchical codes then one collision digit that makes the full ID unique",
            "mpq_tokens": "one unordered token per MPQ expert codebook",
        },
    )
)

USER_SEQUENCES = _register(
    TableSpec(
        name="gold.user_sequences",
        key=("user_id",),
        version_pinned_by="the diffusion checkpoint (jobs/infer_beyond_log.py)",
        description="Each user's ordered history with semantic IDs, truncated to the configured maximum length, with leave-one-out targets.",
        schema=_schema(
            ("user_id", pa.string(), False),
            ("item_ids", STR_LIST),
            ("event_ts", pa.list_(TS)),
            ("semantic_ids", pa.list_(pa.list_(pa.int32()))),
            ("seq_len", pa.int32(), False),
            ("n_events_total", pa.int32(), False),
            ("valid_item_id", pa.string()),
            ("test_item_id", pa.string()),
            ("codebook_version", pa.string()),
            DS,
            RUN_ID,
        ),
        column_docs={
            "valid_item_id": "second-to-last item: the validation target (null when the history is shorter than 3)",
            "test_item_id": "last item: the test target (null when the history is shorter than 2)",
        },
    )
)

USER_AUGMENTED = _register(
    TableSpec(
        name="gold.user_augmented_behaviors",
        key=("user_id", "model_version"),
        description="Beyond-log behaviours inferred per user: items the logs never showed, with scores.",
        schema=_schema(
            ("user_id", pa.string(), False),
            ("model_version", pa.string(), False),
            ("item_ids", STR_LIST),
            ("scores", pa.list_(pa.float64())),
            ("semantic_ids", pa.list_(pa.list_(pa.int32()))),
            ("status", pa.string(), False),
            ("n_history", pa.int32()),
            DS,
            RUN_ID,
        ),
        column_docs={"status": "ok, or why the user has no inference (e.g. history_too_short)"},
    )
)

USER_FEATURES = _register(
    TableSpec(
        name="gold.user_features",
        key=("user_id",),
        description="User aggregates: knowledge-based affinities weighted by recency, counts, recency statistics, inferred-behaviour summaries.",
        schema=_schema(
            ("user_id", pa.string(), False),
            ("n_events", pa.int32(), False),
            ("n_items", pa.int32(), False),
            ("first_event_ts", TS),
            ("last_event_ts", TS),
            ("days_since_last", pa.float64()),
            ("mean_gap_days", pa.float64()),
            ("category_affinity", FLOAT_MAP),
            ("audience_affinity", FLOAT_MAP),
            ("scenario_affinity", FLOAT_MAP),
            ("top_category", pa.string()),
            ("n_augmented", pa.int32()),
            ("augmented_top_category", pa.string()),
            DS,
            RUN_ID,
        ),
    )
)

PIPELINE_RUNS = _register(
    TableSpec(
        name="ops.pipeline_runs",
        key=("run_id", "task"),
        description="One row per task of each pipeline run: status, timings, rows in/out/quarantined, metrics JSON.",
        schema=_schema(
            ("run_id", pa.string(), False),
            ("task", pa.string(), False),
            ("dag_id", pa.string()),
            ("dataset", pa.string()),
            ("status", pa.string(), False),
            ("started_at", TS),
            ("ended_at", TS),
            ("seconds", pa.float64()),
            ("rows_in", pa.int64()),
            ("rows_out", pa.int64()),
            ("rows_quarantined", pa.int64()),
            ("metrics", pa.string()),
            DS,
        ),
        column_docs={"metrics": "JSON object of the task's own measurements (LLM calls, tokens, codebook quality, ...)"},
    )
)

TRAINING_RUNS = _register(
    TableSpec(
        name="ops.training_runs",
        key=("run_id",),
        description="Training runs of consumer models: table versions read, configuration, seed, metrics.",
        schema=_schema(
            ("run_id", pa.string(), False),
            ("model", pa.string(), False),
            ("started_at", TS),
            ("seconds", pa.float64()),
            ("table_versions", pa.string()),
            ("config", pa.string()),
            ("seed", pa.int64()),
            ("metrics", pa.string()),
            ("device", pa.string()),
            DS,
        ),
    )
)

LLM_ATTEMPTS = _register(
    TableSpec(
        name="ops.llm_attempts",
        key=("item_id", "content_hash", "prompt_version", "model"),
        description=(
            "Failed LLM attempts per item content, prompt version and model: reason_items skips (dead-letters) "
            "a key once `failures` reaches llm.dead_letter_after; `python -m jobs.cli requeue-llm` resets it."
        ),
        schema=_schema(
            ("item_id", pa.string(), False),
            ("content_hash", pa.string(), False),
            ("prompt_version", pa.string(), False),
            ("model", pa.string(), False),
            ("failures", pa.int32(), False),
            ("total_failures", pa.int32(), False),
            ("status", pa.string(), False),
            ("last_reason", pa.string()),
            ("first_failed_ds", pa.date32()),
            ("last_failed_ds", pa.date32()),
            ("last_failed_run_id", pa.string()),
            ("requeued_at", TS),
            DS,
            RUN_ID,
        ),
        column_docs={
            "failures": "failed reason_items attempts since the first failure or the last requeue (each execution "
                        "that sent the item and ended with it quarantined counts one)",
            "total_failures": "every failed attempt of this key, requeues included",
            "status": "the last event: failing, requeued (counter reset by an operator) or ok (a later attempt "
                      "succeeded)",
            "last_reason": "the quarantine reason of the last failure (error code: message)",
            "requeued_at": "when an operator last reset the counter",
        },
    )
)


def get(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        known = ", ".join(sorted(TABLES))
        raise KeyError(f"unknown table {name!r}; known tables: {known}") from None
