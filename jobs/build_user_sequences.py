"""Per-user ordered histories with semantic IDs into gold.user_sequences (Spark window functions).

Histories are ordered by event time (item id breaks ties), truncated to the last `max_len` events,
and carry explicit leave-one-out targets: the last item is the test target and the second-to-last
the validation target, so no later stage trains on what evaluation will ask.
"""

from __future__ import annotations

from jobs.context import JobResult, RunContext
from jobs.runtime import cli_main


def run(ctx: RunContext) -> JobResult:
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from feature_store import delta
    from jobs.codebooks import current_version

    spark = ctx.spark
    max_len = ctx.config["sequences"]["max_len"]
    version = current_version(ctx)
    events = (
        delta.read_spark(spark, "bronze.interactions", ctx.root)
        .filter(F.col("ds") <= F.lit(ctx.ds))
        .select("user_id", "item_id", "event_ts")
    )
    sids = (
        delta.read_spark(spark, "gold.item_semantic_ids", ctx.root)
        .filter(F.col("codebook_version") == version)
        .select("item_id", F.col("rq_codes").alias("sid"))
    )
    w_desc = Window.partitionBy("user_id").orderBy(F.col("event_ts").desc(), F.col("item_id").desc())
    ranked = (
        events.withColumn("rank_from_end", F.row_number().over(w_desc))
        .withColumn("n_events_total", F.count(F.lit(1)).over(Window.partitionBy("user_id")))
        .filter(F.col("rank_from_end") <= max_len)
        .join(sids, "item_id", "left")
    )
    seqs = ranked.groupBy("user_id").agg(
        F.sort_array(
            F.collect_list(F.struct(F.col("event_ts"), F.col("item_id"), F.col("sid"))), asc=True
        ).alias("ev"),
        F.first("n_events_total").alias("n_events_total"),
    )
    out = (
        seqs.select(
            "user_id",
            F.col("ev.item_id").alias("item_ids"),
            F.col("ev.event_ts").alias("event_ts"),
            F.col("ev.sid").alias("semantic_ids"),
            F.size("ev").alias("seq_len"),
            F.col("n_events_total").cast("int").alias("n_events_total"),
        )
        .withColumn("test_item_id", F.when(F.col("seq_len") >= 2, F.element_at("item_ids", -1)))
        .withColumn("valid_item_id", F.when(F.col("seq_len") >= 3, F.element_at("item_ids", -2)))
        .withColumn("codebook_version", F.lit(version))
        .withColumn("ds", F.lit(ctx.ds))
        .withColumn("run_id", F.lit(ctx.run_id))
    ).localCheckpoint(eager=True)
    n_users = out.count()
    stats = out.agg(
        F.sum("n_events_total").alias("events"),
        F.avg("seq_len").alias("mean_len"),
        F.sum(F.when(F.col("seq_len") < 3, 1).otherwise(0)).alias("short"),
        F.sum(F.size(F.filter("semantic_ids", lambda s: s.isNull()))).alias("missing_sid"),
    ).collect()[0]
    delta.merge(spark, out, "gold.user_sequences", ctx.root, delete_unmatched=True)
    return JobResult(rows_in=int(stats["events"] or 0), rows_out=n_users, metrics={
        "users": n_users, "mean_seq_len": round(float(stats["mean_len"] or 0), 2), "max_len": max_len,
        "users_without_validation_target": int(stats["short"] or 0),
        "events_without_semantic_id": int(stats["missing_sid"] or 0), "codebook_version": version,
    })


if __name__ == "__main__":
    raise SystemExit(cli_main("build_user_sequences"))
