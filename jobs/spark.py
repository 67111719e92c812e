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


def spark_conf(master: str | None = None, app_name: str = "reaseq", extra: dict | None = None) -> dict[str, str]:
    """The settings every session gets; also what spark-submit receives as --conf in a cluster."""
    master = master or os.environ.get("REASEQ_SPARK_MASTER", "local[*]")
    conf = {
        "spark.master": master,
        "spark.app.name": app_name,
        "spark.jars": ",".join(cached_jars()),
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.shuffle.partitions": os.environ.get("REASEQ_SHUFFLE_PARTITIONS", "4"),
        "spark.default.parallelism": os.environ.get("REASEQ_SHUFFLE_PARTITIONS", "4"),
        "spark.driver.memory": os.environ.get("REASEQ_DRIVER_MEMORY", "4g"),
        "spark.ui.enabled": os.environ.get("REASEQ_SPARK_UI", "false"),
        "spark.ui.showConsoleProgress": "false",
        # Delta rebuilds table state with 50 tasks by default: pure overhead on a laptop-sized table.
        "spark.databricks.delta.snapshotPartitions": os.environ.get("REASEQ_DELTA_SNAPSHOT_PARTITIONS", "2"),
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
    builder = SparkSession.builder
    for k, v in spark_conf(master, app_name, extra).items():
        builder = builder.config(k, v)
    # py4j logs every connection close at INFO, also during interpreter shutdown when streams are gone.
    import logging

    logging.getLogger("py4j").setLevel(logging.WARNING)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("REASEQ_SPARK_LOG_LEVEL", "ERROR"))
    return spark


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.spark", description=__doc__)
    p.add_argument("--resolve", action="store_true", help="resolve Delta's jars into the cache (setup step)")
    p.add_argument("--print-jars", action="store_true", help="print the cached jar paths, comma-separated")
    args = p.parse_args(argv)
    if args.resolve:
        if jar_manifest().exists():
            try:
                cached_jars()
                print(f"Delta jars already cached ({jar_manifest()})")
                return 0
            except RuntimeError:
                pass
        jars = resolve_delta_jars()
        print(f"resolved {len(jars)} jars for {DELTA_PACKAGE} into {cache_dir() / 'ivy'}")
        return 0
    if args.print_jars:
        print(",".join(cached_jars()))
        return 0
    p.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
