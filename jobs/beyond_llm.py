"""LLM alternative for beyond-log inference: interests from the user's history, mapped to items.

`infer(ctx, seqs, top_n)` is called by `infer_beyond_log` when `beyond_log.method` is `llm`; it
returns one row per user of `seqs` (gold.user_sequences) with the columns user_id, item_ids, scores,
status (ok | history_too_short | no_candidates | llm_failed), n_history and model_version, plus
semantic_ids (each item's rq_codes of the current codebook version, null where an item has none or no
quantizer is trained yet), i.e. every column of gold.user_augmented_behaviors but the lineage ones,
which the caller adds before writing the table.

Steps, all in Spark:

1. History. A user's input is every event but the test target (item_ids without its last element);
   users with fewer than max(1, min_history - 1) events get `history_too_short` and no call.
2. Interests. Each remaining user's last 10 history items (title, category path and the item
   knowledge of the current prompt version and model: summary, product type, complements,
   substitutes) go to `llm_agents.infer_interests` with the same fan-out as `reason_items`: the users
   are repartitioned into `partitions` and each partition runs the async client with
   llm.max_concurrency // partitions requests in flight, so the whole stage keeps the server exactly
   as busy as configured. The answers are checkpointed (computed once). A user whose call fails after
   retries gets `llm_failed` and a quarantine row with the reason and the raw answer; a server that is
   down stops the stage with the circuit breaker's one error (StageFailed), as in reason_items.
3. Phrases. The distinct interest phrases (normalised; many users share them) are embedded once each,
   in mapInPandas, by the configured embedder (`embedding` section: the model is loaded once per
   Python worker); the item side is silver.item_embeddings rows of that same embedder, restricted to
   the items of bronze.catalog_items (the current catalog).
4. Similarity. Exact top-K cosine neighbours per phrase as a blocked cross product: phrases and items
   are hashed into blocks of at most `llm_block_rows` rows, every (phrase block, item block) pair is
   one cogroup task that multiplies the two normalised matrices in chunks and keeps each phrase's K
   best items, and a window keeps the K best across item blocks. K = top_n + the longest history.
5. Users. An item's score for a user is the max over the user's interests of weight x cosine (the
   weight comes from the agent: agreement across sampled paths and place in the answer); similarities
   below `llm_min_similarity` do not count; history items are anti-joined out; the top_n stay. Users
   whose interests match no item get `no_candidates`.

Why K = top_n + longest history is exact: if an item is not among an interest's K nearest, that
interest has at least top_n non-history items at least as similar, each scoring at least as high for
the user through the same interest, so the item cannot be in the user's top_n.

Why this shape and not the driver: embedding and similarity cost grows with distinct phrases P and
items N (P x N x dim multiply-adds). On the driver one process would hold both matrices and do all of
it; here no task holds more than one block of each side, the P x N work spreads over the executors,
and only P x K candidate rows are shuffled to the per-user join, which is itself a plain distributed
join of (user, phrase) pairs (at most 8 per user) with those candidates. A small catalog is one block
pair, one task. Past ~10^6 x 10^6 an approximate index per item block would replace the exact product;
the interface would not change.

Options: the `beyond_log` section of the settings (jobs/config.py, docs/configuration.md): min_history
(shared with the diffusion method), llm_partitions, llm_min_similarity, llm_block_rows. The LLM and
embedder settings are the pipeline's own `llm` and `embedding` sections.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jobs.config import BeyondLogSettings
from jobs.context import RunContext
from jobs.progress import Progress
from jobs.runtime import StageFailed, write_quarantine

log = logging.getLogger("reaseq")

MODEL_VERSION_PREFIX = "llm-interests"
STATUSES = ("ok", "history_too_short", "no_candidates", "llm_failed")
DEFAULT_MIN_SIMILARITY = BeyondLogSettings.model_fields["llm_min_similarity"].default
DEFAULT_BLOCK_ROWS = BeyondLogSettings.model_fields["llm_block_rows"].default
CHUNK_ROWS = 1024  # phrases multiplied at once inside a task: CHUNK_ROWS x block floats of scratch

OUTPUT_DDL = (
    "user_id string, item_ids array<string>, scores array<double>, status string, n_history int, "
    "model_version string, semantic_ids array<array<int>>"
)
INTERESTS_DDL = (
    "user_id string, status string, interests array<string>, weights array<double>, error string, raw string, "
    "tokens_in long, tokens_out long, llm_calls int"
)


@dataclass
class Options:
    min_history: int = 2
    partitions: int = 4
    min_similarity: float = DEFAULT_MIN_SIMILARITY
    block_rows: int = DEFAULT_BLOCK_ROWS

    @classmethod
    def from_ctx(cls, ctx: RunContext) -> Options:
        cfg = ctx.config["beyond_log"]
        return cls(min_history=cfg["min_history"], partitions=cfg["llm_partitions"] or ctx.config["llm"]["partitions"],
                   min_similarity=cfg["llm_min_similarity"], block_rows=cfg["llm_block_rows"])


@dataclass
class InferOutput:
    frame: Any  # the result DataFrame (OUTPUT_DDL), checkpointed
    interests: Any  # user_id, status, interests, weights, ... (INTERESTS_DDL), checkpointed
    metrics: dict[str, Any] = field(default_factory=dict)


def model_version(prompt_version: str, model: str, embedder: str) -> str:
    """`llm-interests:<prompt version>:<LLM model>:<embedder>`: everything that changes the rows."""
    return f"{MODEL_VERSION_PREFIX}:{prompt_version}:{model}:{embedder}"


# -- the similarity math (numpy; shared by the Spark tasks and the reference below) --------------


def _normalised(mat: np.ndarray) -> np.ndarray:
    mat = np.asarray(mat, dtype=np.float32)
    norms = np.linalg.norm(mat, axis=1, keepdims=True)
    return mat / np.where(norms == 0, 1, norms)


def top_k_similar(
    queries: np.ndarray, items: np.ndarray, k: int, min_similarity: float = -1.0, chunk: int = CHUNK_ROWS,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each query row, its (at most) k most cosine-similar item rows with similarity >= min_similarity.

    Yields (query_index, item_index, similarity) arrays chunk by chunk, best first within a query.
    """
    n_q, n_i = len(queries), len(items)
    if n_q == 0 or n_i == 0 or k <= 0:
        return
    q, it = _normalised(queries), _normalised(items)
    if q.shape[1] != it.shape[1]:
        raise ValueError(
            f"phrase vectors have {q.shape[1]} dimensions and item vectors {it.shape[1]}: the item embeddings "
            "were made by another embedder; rerun embed_items"
        )
    kk = min(k, n_i)
    for lo in range(0, n_q, chunk):
        sims = q[lo : lo + chunk] @ it.T
        idx = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        top = np.take_along_axis(sims, idx, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        idx, top = np.take_along_axis(idx, order, axis=1), np.take_along_axis(top, order, axis=1)
        keep = top >= min_similarity
        rows = np.broadcast_to(np.arange(lo, lo + len(sims))[:, None], idx.shape)
        yield rows[keep], idx[keep], top[keep].astype(np.float64)
        if progress is not None:
            progress(min(lo + chunk, n_q), n_q)


def rank_items(
    interests: Iterable[tuple[str, float]],
    phrase_vectors: dict[str, np.ndarray],
    item_ids: list[str],
    item_matrix: np.ndarray,
    exclude: Iterable[str],
    top_n: int,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
) -> list[tuple[str, float]]:
    """One user's items the direct way (all items, no blocks): the reference the Spark path must equal.

    score(item) = max over interests of weight x cosine(phrase, item), counting similarities >=
    min_similarity only; excluded items dropped; best first, item id breaking ties.
    """
    if not item_ids:
        return []
    mat = _normalised(item_matrix)
    scores = np.full(len(item_ids), -np.inf)
    for phrase, weight in interests:
        sims = (mat @ _normalised(phrase_vectors[phrase][None, :])[0]).astype(np.float64)
        scores = np.maximum(scores, np.where(sims >= min_similarity, weight * sims, -np.inf))
    skip = set(exclude)
    ranked = sorted(
        ((item_ids[i], float(scores[i])) for i in range(len(item_ids))
         if np.isfinite(scores[i]) and item_ids[i] not in skip),
        key=lambda t: (-t[1], t[0]),
    )
    return ranked[:top_n]


# -- Spark tasks ---------------------------------------------------------------------------------


def _worker_log() -> logging.Logger:
    """Progress lines from inside Python workers go to the task's stderr (the executor log)."""
    lg = logging.getLogger("reaseq.beyond_llm.worker")
    if not lg.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    return lg


def _interests_fn(config_json: str):
    def fn(frames):
        import pandas as pd

        from llm_agents import HistoryItem, LLMConfig, UserHistory, infer_interests

        config = LLMConfig.model_validate_json(config_json)
        frames = [f for f in frames if not f.empty]
        if not frames:
            return
        rows = pd.concat(frames, ignore_index=True)
        users = [
            UserHistory(str(uid), [HistoryItem.from_record(x) for x in json.loads(payload)])
            for uid, payload in zip(rows["user_id"], rows["history_json"], strict=True)
        ]
        progress = Progress("beyond_llm interests (one partition)", len(users), logger=_worker_log())
        results = infer_interests(users, config, progress=progress)
        yield pd.DataFrame([
            {"user_id": r.user_id, "status": r.status, "interests": r.interests, "weights": r.weights,
             "error": r.error, "raw": r.raw, "tokens_in": r.tokens_in, "tokens_out": r.tokens_out,
             "llm_calls": r.llm_calls}
            for r in results
        ])

    return fn


def _embed_fn(config_dict: dict, threads: int):
    def fn(frames):
        import pandas as pd

        from models.embedder import EmbedderConfig, embed_texts

        config = EmbedderConfig.from_dict(config_dict)
        if config.backend == "local":
            import torch

            torch.set_num_threads(threads)  # one worker per core: more threads oversubscribe
        frames = [f for f in frames if not f.empty]
        if not frames:
            return
        phrases = pd.concat(frames, ignore_index=True)["phrase"].tolist()
        progress = Progress("beyond_llm phrase embedding (one partition)", len(phrases), logger=_worker_log())
        step = max(config.batch_size * 4, 256)
        for lo in range(0, len(phrases), step):
            part = phrases[lo : lo + step]
            vecs = embed_texts(part, config)
            progress(lo + len(part), len(phrases))
            yield pd.DataFrame({"phrase": part, "embedding": list(vecs.astype(np.float32))})

    return fn


def _topk_fn(k: int, min_similarity: float):
    def fn(phrases, items):
        import pandas as pd

        if phrases.empty or items.empty:
            return pd.DataFrame({"phrase": [], "item_id": [], "sim": []})
        q = np.stack([np.asarray(v, dtype=np.float32) for v in phrases["embedding"]])
        it = np.stack([np.asarray(v, dtype=np.float32) for v in items["embedding"]])
        finite = np.isfinite(it).all(axis=1)  # a broken vector must not poison a whole block
        it, ids = it[finite], items["item_id"].to_numpy()[finite]
        names = phrases["phrase"].to_numpy()
        progress = Progress(f"beyond_llm similarity ({len(q)} phrases x {len(it)} items)", len(q),
                            logger=_worker_log())
        parts = list(top_k_similar(q, it, k, min_similarity, progress=progress))
        if not parts:
            return pd.DataFrame({"phrase": [], "item_id": [], "sim": []})
        # One frame from whole arrays: pd.concat of frames would leave pandas 3's Arrow-backed strings in
        # chunks, which pyspark's serializer rejects ("Expected Array, got ChunkedArray").
        return pd.DataFrame({"phrase": np.concatenate([names[r] for r, _, _ in parts]),
                             "item_id": np.concatenate([ids[c] for _, c, _ in parts]),
                             "sim": np.concatenate([s for _, _, s in parts])})

    return fn


# -- the stage -----------------------------------------------------------------------------------


def _history_items(ctx: RunContext, llm_model: str):
    """Per current catalog item: what the interests prompt shows and the offline heuristic reads."""
    from pyspark.sql import functions as F

    from feature_store import delta
    from llm_agents import PROMPT_VERSION

    items = delta.read_spark(ctx.spark, "bronze.catalog_items", ctx.root).select(
        "item_id", "content_hash", "title", "categories")
    if delta.exists("silver.item_knowledge", ctx.root):
        know = (
            delta.read_spark(ctx.spark, "silver.item_knowledge", ctx.root)
            .filter((F.col("prompt_version") == PROMPT_VERSION) & (F.col("model") == llm_model))
            .select("item_id", "content_hash", F.col("category_path").alias("k_path"), "summary",
                    "product_type", "complements", "substitutes")
        )
        items = items.join(know, ["item_id", "content_hash"], "left")
    else:
        items = (items.withColumn("k_path", F.lit(None).cast("array<string>"))
                 .withColumn("summary", F.lit(None).cast("string"))
                 .withColumn("product_type", F.lit(None).cast("string"))
                 .withColumn("complements", F.lit(None).cast("array<string>"))
                 .withColumn("substitutes", F.lit(None).cast("array<string>")))
    return items.select(
        "item_id", "title",
        F.when(F.size("k_path") > 0, F.col("k_path")).otherwise(F.col("categories")).alias("category_path"),
        "summary", "product_type", "complements", "substitutes",
    )


def _semantic_ids(ctx: RunContext):
    """item_id, rq_codes of the current codebook version; None before any quantizer is trained."""
    from pyspark.sql import functions as F

    from feature_store import delta
    from jobs.codebooks import current_version

    if not delta.exists("gold.item_semantic_ids", ctx.root):
        return None
    try:
        version = current_version(ctx)
    except RuntimeError:
        return None
    return (delta.read_spark(ctx.spark, "gold.item_semantic_ids", ctx.root)
            .filter(F.col("codebook_version") == version).select("item_id", "rq_codes"))


def infer(ctx: RunContext, seqs, top_n: int):
    """One row per user of `seqs` (gold.user_sequences), OUTPUT_DDL columns; see the module docstring."""
    return infer_detailed(ctx, seqs, top_n).frame


def infer_detailed(ctx: RunContext, seqs, top_n: int) -> InferOutput:
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from feature_store import delta
    from jobs.llm import llm_config
    from llm_agents import INTERESTS_PROMPT_VERSION, interests_model_name, model_name
    from llm_agents.config import unavailable_message
    from llm_agents.interests import HISTORY_ITEMS
    from models.embedder import EmbedderConfig

    if top_n < 1:
        raise ValueError(f"top_n must be at least 1, got {top_n}")
    spark = ctx.spark
    opts = Options.from_ctx(ctx)
    config = llm_config(ctx, opts.partitions, need_server=True)
    embedder = EmbedderConfig.from_dict(ctx.config.get("embedding"))
    version = model_version(INTERESTS_PROMPT_VERSION, interests_model_name(config), embedder.name)
    phases = Progress("beyond_llm phases", 3, every_s=0.0)
    t0 = time.monotonic()
    timings: dict[str, float] = {}

    # 1. histories: every event but the test target
    ids = F.coalesce(F.col("item_ids"), F.array().cast("array<string>"))
    need = max(1, opts.min_history - 1)
    users = (
        seqs.select(
            F.col("user_id").cast("string").alias("user_id"),
            F.when(F.size(ids) >= 2, F.slice(ids, F.lit(1), F.size(ids) - 1))
            .otherwise(F.array().cast("array<string>")).alias("history"),
        )
        .withColumn("n_history", F.size("history").cast("int"))
        .withColumn("eligible", F.col("n_history") >= need)
        .localCheckpoint(eager=True)
    )
    agg = users.agg(F.count(F.lit(1)), F.sum(F.col("eligible").cast("int")), F.max("n_history")).collect()[0]
    n_users, n_eligible, longest = int(agg[0]), int(agg[1] or 0), int(agg[2] or 0)
    phases(1)

    # 2. interests, fanned out like reason_items
    recent = users.filter("eligible").select(
        "user_id", F.posexplode(F.reverse(F.slice(F.reverse("history"), 1, HISTORY_ITEMS))).alias("pos", "item_id"))
    payload = (
        recent.join(_history_items(ctx, model_name(config)), "item_id", "left")
        .groupBy("user_id")
        .agg(F.to_json(F.sort_array(F.collect_list(F.struct(
            "pos", "item_id", "title", "category_path", "summary", "product_type", "complements", "substitutes",
        )))).alias("history_json"))
    )
    log.info("beyond_llm: %d users, %d with enough history; interests with %s (%d partitions x %d in flight)",
             n_users, n_eligible, interests_model_name(config), opts.partitions, config.max_concurrency)
    try:
        interests = (
            payload.repartition(opts.partitions, "user_id")
            .mapInPandas(_interests_fn(config.model_dump_json()), INTERESTS_DDL)
            .localCheckpoint(eager=True)  # the LLM answers are computed exactly once
        )
    except Exception as exc:  # a circuit opened inside a worker arrives wrapped by Spark
        message = unavailable_message(exc)
        if message:
            raise StageFailed(message) from None
        raise
    llm_stats = interests.groupBy("status").agg(
        F.count(F.lit(1)).alias("n"), F.sum("tokens_in").alias("tin"), F.sum("tokens_out").alias("tout"),
        F.sum("llm_calls").alias("calls"),
    ).collect()
    llm_counts = {r["status"]: int(r["n"]) for r in llm_stats}
    if sum(llm_counts.values()) != n_eligible:  # a bug, never a data issue
        raise RuntimeError(f"{sum(llm_counts.values())} interest rows for {n_eligible} users")
    timings["interests_s"] = time.monotonic() - t0
    phases(2)

    # 3. distinct phrases embedded once each; exact top-K per phrase over the current items as a
    # blocked cross product; per user, max over interests of weight x cosine, history out, top_n.
    t1 = time.monotonic()
    pairs = interests.filter(F.col("status") == "ok").select(
        "user_id", F.explode(F.arrays_zip("interests", "weights")).alias("z")
    ).select("user_id", F.col("z.interests").alias("phrase"), F.col("z.weights").alias("weight"))
    phrases = pairs.select("phrase").distinct()
    n_phrases = phrases.count()
    item_vecs = (
        delta.read_spark(spark, "silver.item_embeddings", ctx.root)
        .filter(F.col("embedder") == embedder.name)
        .join(delta.read_spark(spark, "bronze.catalog_items", ctx.root).select("item_id"), "item_id", "left_semi")
        .filter(F.size("embedding") == F.col("dim"))
        .select("item_id", "embedding")
    ) if delta.exists("silver.item_embeddings", ctx.root) else None
    n_items = item_vecs.count() if item_vecs is not None and n_phrases else 0
    k = top_n + longest
    pb = math.ceil(n_phrases / opts.block_rows)
    ib = math.ceil(n_items / opts.block_rows)
    if n_phrases and n_items:
        sc = spark.sparkContext
        parts = max(1, min(sc.defaultParallelism, n_phrases // 256 + 1))
        threads = max(1, (os.cpu_count() or 1) // parts) if sc.master.startswith("local") else 1
        phrase_vecs = (
            phrases.repartition(parts, "phrase")
            .mapInPandas(_embed_fn(embedder.__dict__, threads), "phrase string, embedding array<float>")
        )
        left = (phrase_vecs.withColumn("pb", F.pmod(F.xxhash64("phrase"), F.lit(pb)).cast("int"))
                .withColumn("ib", F.explode(F.sequence(F.lit(0), F.lit(ib - 1)))))
        right = (item_vecs.withColumn("ib", F.pmod(F.xxhash64("item_id"), F.lit(ib)).cast("int"))
                 .withColumn("pb", F.explode(F.sequence(F.lit(0), F.lit(pb - 1)))))
        cand = (
            left.groupBy("pb", "ib").cogroup(right.groupBy("pb", "ib"))
            .applyInPandas(_topk_fn(k, opts.min_similarity), "phrase string, item_id string, sim double")
        )
        if ib > 1:
            by_phrase = Window.partitionBy("phrase").orderBy(F.col("sim").desc(), "item_id")
            cand = cand.withColumn("r", F.row_number().over(by_phrase)).filter(F.col("r") <= k).drop("r")
        history = users.select("user_id", F.explode("history").alias("item_id"))
        by_user = Window.partitionBy("user_id").orderBy(F.col("score").desc(), "item_id")
        top = (
            pairs.join(cand, "phrase")
            .groupBy("user_id", "item_id").agg(F.max(F.col("weight") * F.col("sim")).alias("score"))
            .join(history, ["user_id", "item_id"], "left_anti")
            .withColumn("r", F.row_number().over(by_user))
            .filter(F.col("r") <= top_n)
        )
        sids = _semantic_ids(ctx)
        top = (top.join(sids, "item_id", "left") if sids is not None
               else top.withColumn("rq_codes", F.lit(None).cast("array<int>")))
        per_user = top.groupBy("user_id").agg(
            F.sort_array(F.collect_list(F.struct("r", "item_id", "score", "rq_codes"))).alias("c"))
    else:
        per_user = spark.createDataFrame(
            [], "user_id string, c array<struct<r:int,item_id:string,score:double,rq_codes:array<int>>>")

    out = (
        users.join(interests.select("user_id", F.col("status").alias("llm_status")), "user_id", "left")
        .join(per_user, "user_id", "left")
        .select(
            "user_id",
            F.coalesce(F.col("c.item_id"), F.array().cast("array<string>")).alias("item_ids"),
            F.coalesce(F.col("c.score"), F.array().cast("array<double>")).alias("scores"),
            F.when(~F.col("eligible") | (F.col("llm_status") == "skipped"), "history_too_short")
            .when(F.col("llm_status") != "ok", "llm_failed")
            .when(F.col("c").isNull(), "no_candidates")
            .otherwise("ok").alias("status"),
            F.col("n_history").cast("int").alias("n_history"),
            F.lit(version).alias("model_version"),
            F.coalesce(F.col("c.rq_codes"), F.array().cast("array<array<int>>")).alias("semantic_ids"),
        )
        .localCheckpoint(eager=True)  # embedding, similarity and ranking run here, once
    )
    timings["items_s"] = time.monotonic() - t1
    phases(3)
    if llm_counts.get("failed"):
        failed = interests.filter(F.col("status") == "failed").select("user_id", "error", "raw").collect()
        write_quarantine(ctx, [
            {"source_table": "gold.user_augmented_behaviors", "key": r["user_id"], "stage": "infer_beyond_log",
             "reason": (r["error"] or "failed")[:500],
             "payload": json.dumps({"model_version": version, "raw": (r["raw"] or "")[:4000]})}
            for r in failed
        ])
    counts = {r["status"]: int(r["count"]) for r in out.groupBy("status").count().collect()}
    seconds = time.monotonic() - t0
    metrics = {
        "model_version": version, "users": n_users, "status_counts": counts, "llm_status_counts": llm_counts,
        "distinct_phrases": n_phrases, "items_with_vectors": n_items, "k_per_phrase": k,
        "block_pairs": pb * ib, "top_n": top_n, "min_similarity": opts.min_similarity,
        "partitions": opts.partitions, "per_partition_concurrency": config.max_concurrency,
        "llm_calls": sum(int(r["calls"] or 0) for r in llm_stats),
        "tokens_in": sum(int(r["tin"] or 0) for r in llm_stats),
        "tokens_out": sum(int(r["tout"] or 0) for r in llm_stats),
        "seconds": round(seconds, 2), **{name: round(v, 2) for name, v in timings.items()},
        "users_per_second": round(n_users / seconds, 1) if seconds else None,
    }
    log.info("beyond_llm: %s", json.dumps(metrics, sort_keys=True))
    return InferOutput(frame=out, interests=interests, metrics=metrics)
