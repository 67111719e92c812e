"""User aggregates into gold.user_features: knowledge affinities weighted by recency, counts, recency.

Affinities come from silver.item_knowledge (category path, audiences, scenarios) of the items a user
touched, each event weighted by exp(-age / half_life) relative to the run's logical date, normalised
to sum to one per user. Inferred beyond-log behaviours are summarised (count, dominant category).
"""

from __future__ import annotations

import math

from jobs.context import JobResult, RunContext
from jobs.runtime import cli_main

HALF_LIFE_DAYS = 30.0
TOP_K = 10  # entries kept per affinity map


def run(ctx: RunContext) -> JobResult:
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from feature_store import delta
    from jobs.llm import llm_config
    from llm_agents import PROMPT_VERSION, model_name

    spark = ctx.spark
    asof = F.to_timestamp(F.lit(f"{ctx.ds.isoformat()} 23:59:59"))
    events = (
        delta.read_spark(spark, "bronze.interactions", ctx.root)
        .filter(F.col("ds") <= F.lit(ctx.ds))
        .select("user_id", "item_id", "event_ts")
        .withColumn("age_days", (F.unix_timestamp(asof) - F.unix_timestamp("event_ts")) / 86400.0)
        .withColumn("w", F.exp(-F.greatest(F.col("age_days"), F.lit(0.0)) * math.log(2) / HALF_LIFE_DAYS))
    )
    # The category is a catalog fact (the listed categories' last level), so every item has one; the
    # model's inferred path stands in only for items the catalog lists without categories. Audiences
    # and scenarios are the model's knowledge, present for the items it has answered so far (the rest
    # wait in its backlog).
    items = delta.read_spark(spark, "bronze.catalog_items", ctx.root).select("item_id", "content_hash", "categories")
    know = (
        delta.read_spark(spark, "silver.item_knowledge", ctx.root)
        .filter((F.col("prompt_version") == PROMPT_VERSION) & (F.col("model") == model_name(llm_config(ctx, 1))))
        .select("item_id", "content_hash", "category_path", "audiences", "scenarios")
    )
    leaf = lambda c: F.when(F.size(c) > 0, F.element_at(c, -1))  # noqa: E731
    per_item = (
        items.join(know, ["item_id", "content_hash"], "left")
        .select("item_id", F.coalesce(leaf("categories"), leaf("category_path")).alias("category"),
                "audiences", "scenarios", F.col("category_path").isNotNull().alias("has_knowledge"))
        .localCheckpoint(eager=True)
    )
    n_items, items_with_knowledge = per_item.agg(F.count("*"), F.sum(F.col("has_knowledge").cast("int"))).first()
    ev = events.join(per_item.drop("has_knowledge"), "item_id", "left")

    def affinity(col_expr, name: str):
        exploded = ev.select("user_id", "w", col_expr.alias("v")).filter(F.col("v").isNotNull() & (F.col("v") != ""))
        per = exploded.groupBy("user_id", "v").agg(F.sum("w").alias("s"))
        w = Window.partitionBy("user_id")
        ranked = (per.withColumn("s", F.col("s") / F.sum("s").over(w))
                  .withColumn("r", F.row_number().over(w.orderBy(F.col("s").desc(), "v")))
                  .filter(F.col("r") <= TOP_K))
        return ranked.groupBy("user_id").agg(
            F.map_from_entries(F.collect_list(F.struct("v", F.round("s", 6)))).alias(name),
            F.min_by("v", "r").alias(f"top_{name}"),
        )

    cat = affinity(F.col("category"), "category_affinity")
    aud = affinity(F.explode_outer("audiences"), "audience_affinity").drop("top_audience_affinity")
    scen = affinity(F.explode_outer("scenarios"), "scenario_affinity").drop("top_scenario_affinity")

    gaps = Window.partitionBy("user_id").orderBy("event_ts")
    stats = (
        events.withColumn("gap", (F.unix_timestamp("event_ts") - F.unix_timestamp(F.lag("event_ts").over(gaps))) / 86400.0)
        .groupBy("user_id")
        .agg(
            F.count(F.lit(1)).cast("int").alias("n_events"),
            F.countDistinct("item_id").cast("int").alias("n_items"),
            F.min("event_ts").alias("first_event_ts"),
            F.max("event_ts").alias("last_event_ts"),
            F.avg("gap").alias("mean_gap_days"),
        )
        .withColumn("days_since_last",
                    F.greatest(F.lit(0.0), (F.unix_timestamp(asof) - F.unix_timestamp("last_event_ts")) / 86400.0))
    )
    aug = delta.read_spark(spark, "gold.user_augmented_behaviors", ctx.root)
    aug_ex = (
        aug.select("user_id", F.explode("item_ids").alias("item_id"))
        .join(per_item.select("item_id", "category"), "item_id", "left")
        .groupBy("user_id", "category").count()
        .withColumn("r", F.row_number().over(Window.partitionBy("user_id").orderBy(F.col("count").desc(), "category")))
        .filter(F.col("r") == 1)
        .select("user_id", F.col("category").alias("augmented_top_category"))
    )
    aug_n = aug.groupBy("user_id").agg(F.max(F.size("item_ids")).cast("int").alias("n_augmented"))
    out = (
        stats.join(cat, "user_id", "left").join(aud, "user_id", "left").join(scen, "user_id", "left")
        .join(aug_n, "user_id", "left").join(aug_ex, "user_id", "left")
        .withColumnRenamed("top_category_affinity", "top_category")
        .withColumn("n_augmented", F.coalesce("n_augmented", F.lit(0)))
        .withColumn("ds", F.lit(ctx.ds))
        .withColumn("run_id", F.lit(ctx.run_id))
        .localCheckpoint(eager=True)
    )
    n = out.count()
    coverage = out.filter(F.col("category_affinity").isNotNull()).count()
    knowledge_coverage = out.filter(F.col("audience_affinity").isNotNull()).count()
    delta.merge(spark, out, "gold.user_features", ctx.root, delete_unmatched=True)
    return JobResult(rows_in=n, rows_out=n, metrics={
        "users": n, "users_with_category_affinity": coverage,
        "users_with_knowledge_affinity": knowledge_coverage, "half_life_days": HALF_LIFE_DAYS,
        "items": int(n_items or 0), "items_with_knowledge": int(items_with_knowledge or 0),
    })


if __name__ == "__main__":
    raise SystemExit(cli_main("build_user_features"))
