"""Infer beyond-log behaviours per user into gold.user_augmented_behaviors.

Model `transition-cooc-v1`: a sequential co-occurrence model learnt in Spark from the training
prefixes only (validation and test targets never enter it): item b after item a within three steps,
weighted by 1/gap and normalised per a. A user's input is every event but the test target; the
last five items vote for their successors with recency decay, and the top-N items the user has not
touched are written with their scores. Users without a usable history get a row that says why.
"""

from __future__ import annotations

from jobs.context import JobResult, RunContext
from jobs.runtime import cli_main

MODEL_VERSION = "transition-cooc-v1"
WINDOW = 3
LAST_K = 5
DECAY = 0.7
FANOUT = 50


def run(ctx: RunContext) -> JobResult:
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from feature_store import delta
    from jobs.assign_semantic_ids import current_version

    spark = ctx.spark
    cfg = ctx.config.get("beyond_log") or {}
    top_n = int(cfg.get("top_n", 10))
    min_history = int(cfg.get("min_history", 2))
    seqs = delta.read_spark(spark, "gold.user_sequences", ctx.root).select("user_id", "item_ids", "seq_len")

    # Training prefixes: drop the validation and test targets (the last two events).
    train = seqs.filter(F.col("seq_len") >= 4).select(
        "user_id", F.posexplode(F.slice("item_ids", 1, F.col("seq_len") - 2)).alias("pos", "item_id")
    )
    a, b = train.alias("a"), train.alias("b")
    pairs = (
        a.join(b, (F.col("a.user_id") == F.col("b.user_id")) & (F.col("b.pos") > F.col("a.pos"))
               & (F.col("b.pos") <= F.col("a.pos") + WINDOW))
        .filter(F.col("a.item_id") != F.col("b.item_id"))
        .select(F.col("a.item_id").alias("src"), F.col("b.item_id").alias("dst"),
                (1.0 / (F.col("b.pos") - F.col("a.pos"))).alias("w"))
        .groupBy("src", "dst").agg(F.sum("w").alias("w"))
    )
    norm = Window.partitionBy("src")
    trans = (
        pairs.withColumn("w", F.col("w") / F.sum("w").over(norm))
        .withColumn("r", F.row_number().over(norm.orderBy(F.col("w").desc(), "dst")))
        .filter(F.col("r") <= FANOUT).drop("r")
    )

    # Inference input: every event but the test target.
    inp = seqs.withColumn(
        "inp", F.when(F.col("seq_len") >= 2, F.slice("item_ids", 1, F.col("seq_len") - 1)).otherwise(F.array())
    )
    recent = inp.select(
        "user_id", F.posexplode(F.reverse(F.slice(F.reverse("inp"), 1, LAST_K))).alias("p", "src"),
        F.size(F.slice(F.reverse("inp"), 1, LAST_K)).alias("k"),
    ).withColumn("recency", F.pow(F.lit(DECAY), F.col("k") - 1 - F.col("p")))
    seen = inp.select("user_id", F.explode("inp").alias("dst"))
    scored = (
        recent.join(trans, "src")
        .groupBy("user_id", "dst").agg(F.sum(F.col("recency") * F.col("w")).alias("score"))
        .join(seen, ["user_id", "dst"], "left_anti")
        .withColumn("r", F.row_number().over(Window.partitionBy("user_id").orderBy(F.col("score").desc(), "dst")))
        .filter(F.col("r") <= top_n)
    )
    version = current_version(ctx)
    sids = (delta.read_spark(spark, "gold.item_semantic_ids", ctx.root)
            .filter(F.col("codebook_version") == version).select(F.col("item_id").alias("dst"), "rq_codes"))
    per_user = (
        scored.join(sids, "dst", "left")
        .groupBy("user_id")
        .agg(F.sort_array(F.collect_list(F.struct("r", "dst", "score", "rq_codes"))).alias("c"))
    )
    out = (
        inp.select("user_id", F.size("inp").alias("n_history"))
        .join(per_user, "user_id", "left")
        .select(
            "user_id",
            F.lit(MODEL_VERSION).alias("model_version"),
            F.coalesce(F.col("c.dst"), F.array().cast("array<string>")).alias("item_ids"),
            F.coalesce(F.col("c.score"), F.array().cast("array<double>")).alias("scores"),
            F.coalesce(F.col("c.rq_codes"), F.array().cast("array<array<int>>")).alias("semantic_ids"),
            F.when(F.col("n_history") < min_history - 1, "history_too_short")
            .when(F.col("c").isNull(), "no_candidates").otherwise("ok").alias("status"),
            F.col("n_history").cast("int").alias("n_history"),
        )
        .withColumn("ds", F.lit(ctx.ds))
        .withColumn("run_id", F.lit(ctx.run_id))
        .localCheckpoint(eager=True)
    )
    counts = {r["status"]: r["count"] for r in out.groupBy("status").count().collect()}
    delta.merge(spark, out, "gold.user_augmented_behaviors", ctx.root,
                delete_unmatched=f"t.model_version = '{MODEL_VERSION}'")
    users = sum(counts.values())
    return JobResult(rows_in=users, rows_out=users, metrics={
        "model_version": MODEL_VERSION, "status_counts": counts, "top_n": top_n,
        "transitions": trans.count(),
    })


if __name__ == "__main__":
    raise SystemExit(cli_main("infer_beyond_log"))
