"""The pipeline's Spark sessions: the store's Delta session (feature_store/spark.py) with the `spark`
settings (jobs/config.py) and, for an s3a:// lakehouse, hadoop-aws and the s3a settings.

    python -m jobs.spark --resolve [--s3a]     resolve Delta's jars (and hadoop-aws) into the cache (setup)
    python -m jobs.spark --print-jars          the cached jar paths, comma-separated
"""

from __future__ import annotations

import argparse
import os
import sys

from feature_store.spark import (
    DELTA_PACKAGE,
    cache_dir,
    cached_jars,
    delta_conf,
    delta_session,
    hadoop_version,
    jar_manifest,
    resolve_delta_jars,
    resolve_s3a_jars,
)
from jobs.config import load_config


def lakehouse_is_s3a() -> bool:
    return str(load_config()["lakehouse"]).startswith("s3a://")


def s3a_packages() -> list[str]:
    """Maven coordinates Spark needs for an s3a:// lakehouse (MinIO, S3); none for a local one."""
    return [f"org.apache.hadoop:hadoop-aws:{hadoop_version()}"] if lakehouse_is_s3a() else []


def s3a_conf() -> dict[str, str]:
    """s3a settings for an S3-compatible store such as MinIO: endpoint from REASEQ_S3_ENDPOINT (or
    AWS_ENDPOINT_URL), path-style addressing, credentials from the standard AWS environment variables."""
    if not lakehouse_is_s3a():
        return {}
    conf = {
        "spark.hadoop.fs.s3a.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        "spark.hadoop.fs.s3a.path.style.access": "true",
        "spark.hadoop.fs.s3a.aws.credentials.provider":
            "software.amazon.awssdk.auth.credentials.EnvironmentVariableCredentialsProvider",
    }
    endpoint = os.environ.get("REASEQ_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        conf["spark.hadoop.fs.s3a.endpoint"] = endpoint
        conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] = str(endpoint.startswith("https")).lower()
    return conf


def spark_conf(master: str | None = None, app_name: str = "reaseq", extra: dict | None = None,
               with_jars: bool = True, settings: dict | None = None) -> dict[str, str]:
    """The settings every session gets; also what spark-submit receives as --conf in a cluster.
    `settings`: the run's `spark` section (a run context's, with its overrides); else this environment's."""
    spark = settings or load_config()["spark"]
    conf = delta_conf(master or spark["master"], app_name, with_jars)
    conf.update({
        "spark.sql.shuffle.partitions": str(spark["shuffle_partitions"]),
        "spark.default.parallelism": str(spark["shuffle_partitions"]),
        "spark.driver.memory": spark["driver_memory"],
        "spark.ui.enabled": str(spark["ui"]).lower(),
        # Delta rebuilds table state with 50 tasks by default: pure overhead on a laptop-sized table.
        "spark.databricks.delta.snapshotPartitions": str(spark["delta_snapshot_partitions"]),
        # Auto-compaction would add an OPTIMIZE job after every small MERGE (nothing compacts the tables
        # yet; the scale benchmark's file counts are in docs/operations.md).
        "spark.databricks.delta.autoCompact.enabled": "false",
        "spark.databricks.delta.stalenessLimit": "0",
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
    })
    # New tables are created with `retention.days` of history (publish's keep_history sets it on older
    # ones): one metadata commit later would change the version that codebooks and checkpoints pin.
    retention = f"interval {load_config()['retention']['days']} days"
    for prop in ("logRetentionDuration", "deletedFileRetentionDuration"):
        conf[f"spark.databricks.delta.properties.defaults.{prop}"] = retention
    if spark["executor_memory"]:
        conf["spark.executor.memory"] = spark["executor_memory"]
    if lakehouse_is_s3a():
        conf["spark.jars.packages"] = ",".join(s3a_packages())
        conf["spark.jars.ivy"] = str(cache_dir() / "ivy")
        conf.update(s3a_conf())
    conf.update(extra or {})
    return conf


def get_spark(master: str | None = None, app_name: str = "reaseq", extra: dict | None = None,
              settings: dict | None = None):
    """Return the process's Spark session, creating it with Delta configured on first use."""
    settings = settings or load_config()["spark"]
    return delta_session(spark_conf(master, app_name, extra, settings=settings), settings["log_level"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.spark", description=__doc__)
    p.add_argument("--resolve", action="store_true", help="resolve Delta's jars into the cache (setup step)")
    p.add_argument("--s3a", action="store_true",
                   help="with --resolve: also resolve hadoop-aws (for an s3a:// lakehouse) into the Ivy cache")
    p.add_argument("--print-jars", action="store_true", help="print the cached jar paths, comma-separated")
    args = p.parse_args(argv)
    if args.resolve:
        try:
            cached_jars()
            print(f"Delta jars already cached ({jar_manifest()})")
        except RuntimeError:
            jars = resolve_delta_jars()
            print(f"resolved {len(jars)} jars for {DELTA_PACKAGE} into {cache_dir() / 'ivy'}")
        if args.s3a:  # after Delta's manifest, so local sessions do not load the AWS SDK
            resolve_s3a_jars()
        return 0
    if args.print_jars:
        print(",".join(cached_jars()))
        return 0
    p.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
