"""Spark session factory with delta-spark configured from a local jar cache.

Delta's jars are resolved once from Maven Central at setup (`python -m jobs.spark --resolve`, run by
`make setup`) into a cache folder; every later session points `spark.jars` at the cached files, so no
test or run ever resolves dependencies again (and a machine without Maven Central still works).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

DELTA_VERSION = version("delta-spark")
SCALA = "2.13"
SPARK_COMPAT = ".".join(version("pyspark").split(".")[:2])
DELTA_PACKAGE = f"io.delta:delta-spark_{SPARK_COMPAT}_{SCALA}:{DELTA_VERSION}"


def cache_dir() -> Path:
    return Path(os.environ.get("REASEQ_CACHE", Path.home() / ".cache" / "reaseq"))


def jar_manifest() -> Path:
    return cache_dir() / f"delta-{DELTA_VERSION}-jars.json"


def resolve_delta_jars() -> list[str]:
    """Resolve Delta's jars through Spark's Ivy into the cache and record them in a manifest."""
    from pyspark.sql import SparkSession

    ivy = cache_dir() / "ivy"
    ivy.mkdir(parents=True, exist_ok=True)
    spark = (
        SparkSession.builder.master("local[1]")
        .appName("reaseq-resolve-jars")
        .config("spark.jars.packages", DELTA_PACKAGE)
        .config("spark.jars.ivy", str(ivy))
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    spark.stop()
    jars = sorted(str(p) for p in (ivy / "jars").glob("*.jar"))
    if not any("delta-spark" in j for j in jars):
        raise RuntimeError(f"Delta jars not found under {ivy / 'jars'} after resolution")
    jar_manifest().write_text(json.dumps({"package": DELTA_PACKAGE, "jars": jars}, indent=2))
    return jars


def resolve_s3a_jars() -> None:
    """Fetch hadoop-aws (matching pyspark's Hadoop) and its AWS SDK into the Ivy cache, so a cluster image
    starts s3a:// sessions without reaching Maven Central."""
    from pyspark.sql import SparkSession

    package = f"org.apache.hadoop:hadoop-aws:{hadoop_version()}"
    spark = (
        SparkSession.builder.master("local[1]")
        .appName("reaseq-resolve-s3a")
        .config("spark.jars.packages", package)
        .config("spark.jars.ivy", str(cache_dir() / "ivy"))
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    spark.stop()
    print(f"resolved {package} into {cache_dir() / 'ivy'}")


def cached_jars() -> list[str]:
    manifest = jar_manifest()
    if not manifest.exists():
        raise RuntimeError(
            f"Delta jars are not cached ({manifest} missing): run `make setup` "
            "(it resolves them once from Maven Central)"
        )
    jars = json.loads(manifest.read_text())["jars"]
    missing = [j for j in jars if not Path(j).exists()]
    if missing:
        raise RuntimeError(f"cached Delta jars missing ({missing[0]}…): run `make setup` again")
    return jars


def hadoop_version() -> str:
    """The Hadoop client pyspark bundles (hadoop-aws must match it exactly)."""
    from importlib.util import find_spec

    spec = find_spec("pyspark")
    jars = Path(spec.origin).parent / "jars" if spec and spec.origin else None
    found = sorted(jars.glob("hadoop-client-api-*.jar")) if jars and jars.exists() else []
    if not found:
        raise RuntimeError("pyspark's hadoop-client-api jar not found: is pyspark installed?")
    return found[-1].name.removeprefix("hadoop-client-api-").removesuffix(".jar")


def lakehouse_is_s3a() -> bool:
    from jobs.config import load_config

    return str(load_config().get("lakehouse", "")).startswith("s3a://")


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


def under_spark_submit() -> bool:
    """True in a driver that spark-submit launched: it hands the Python process its JVM's gateway."""
    return bool(os.environ.get("PYSPARK_GATEWAY_PORT"))


def spark_conf(master: str | None = None, app_name: str = "reaseq", extra: dict | None = None,
               with_jars: bool = True) -> dict[str, str]:
    """The settings every session gets; also what spark-submit receives as --conf in a cluster."""
    from jobs.config import load_config

    spark = load_config()["spark"]
    master = master or spark["master"]
    conf = {
        "spark.master": master,
        "spark.app.name": app_name,
        "spark.jars": ",".join(cached_jars()) if with_jars else "",
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.shuffle.partitions": str(spark["shuffle_partitions"]),
        "spark.default.parallelism": str(spark["shuffle_partitions"]),
        "spark.driver.memory": spark["driver_memory"],
        "spark.ui.enabled": str(spark["ui"]).lower(),
        "spark.ui.showConsoleProgress": "false",
        # Delta rebuilds table state with 50 tasks by default: pure overhead on a laptop-sized table.
        "spark.databricks.delta.snapshotPartitions": str(spark["delta_snapshot_partitions"]),
        # Auto-compaction would add an OPTIMIZE job after every small MERGE; publish compacts instead.
        "spark.databricks.delta.autoCompact.enabled": "false",
        "spark.databricks.delta.stalenessLimit": "0",
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
        "spark.python.worker.reuse": "true",
        # Python workers must run the pipeline's virtualenv, not whatever python3 is on PATH.
        "spark.pyspark.python": os.environ.get("PYSPARK_PYTHON", sys.executable),
        "spark.pyspark.driver.python": os.environ.get("PYSPARK_DRIVER_PYTHON", sys.executable),
        "spark.executorEnv.PYTHONPATH": os.environ.get("PYTHONPATH", str(Path(__file__).resolve().parent.parent)),
    }
    if spark["executor_memory"]:
        conf["spark.executor.memory"] = spark["executor_memory"]
    if lakehouse_is_s3a():
        conf["spark.jars.packages"] = ",".join(s3a_packages())
        conf["spark.jars.ivy"] = str(cache_dir() / "ivy")
        conf.update(s3a_conf())
    conf.update(extra or {})
    return conf


def get_spark(master: str | None = None, app_name: str = "reaseq", extra: dict | None = None):
    """Return the process's Spark session, creating it with Delta configured on first use."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # PySpark reads the worker interpreter from the environment only (not from spark.pyspark.python).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    conf = spark_conf(master, app_name, extra)
    if under_spark_submit():
        # spark-submit already chose the master, the name and the jars; a builder setting would win over
        # them and pull a submitted job back into local mode.
        for key in ("spark.master", "spark.app.name", "spark.jars", "spark.jars.packages", "spark.driver.memory"):
            conf.pop(key, None)
    builder = SparkSession.builder
    for k, v in conf.items():
        builder = builder.config(k, v)
    # py4j logs every connection close at INFO, also during interpreter shutdown when streams are gone.
    import logging

    logging.getLogger("py4j").setLevel(logging.WARNING)
    spark = builder.getOrCreate()
    from jobs.config import load_config

    spark.sparkContext.setLogLevel(load_config()["spark"]["log_level"])
    return spark


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
