"""A Spark session with delta-spark configured from a local jar cache: the store's own engine.

Delta's jars are resolved once from Maven Central at setup (`python -m jobs.spark --resolve`, run by
`make setup`) into a cache folder; every later session points `spark.jars` at the cached files, so no
test or run ever resolves dependencies again (and a machine without Maven Central still works).

The pipeline's sessions (jobs/spark.py) add its tuning settings to `delta_conf()`; the SQL CLI
(feature_store/sql.py) uses it as it is. This module knows no setting of the pipeline's.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import suppress
from importlib.metadata import version
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
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


def under_spark_submit() -> bool:
    """True in a driver that spark-submit launched: it hands the Python process its JVM's gateway."""
    return bool(os.environ.get("PYSPARK_GATEWAY_PORT"))


# spark-submit chooses these itself; a builder setting would win over them and pull a submitted job back
# into local mode.
SUBMIT_OWNS = ("spark.master", "spark.app.name", "spark.jars", "spark.jars.packages", "spark.driver.memory")


def delta_conf(master: str = "local[*]", app_name: str = "reaseq", with_jars: bool = True) -> dict[str, str]:
    """What every session needs to read and write the Delta tables: the jars, Delta's SQL extension and
    catalog, UTC, Arrow transfers, and the Python workers on this interpreter."""
    return {
        "spark.master": master,
        "spark.app.name": app_name,
        "spark.jars": ",".join(cached_jars()) if with_jars else "",
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # Sized for the tables of one machine (the SQL CLI uses these as they are; the pipeline's sessions
        # replace them with its `spark` settings): no UI port, few shuffle and Delta snapshot partitions.
        "spark.ui.enabled": "false",
        "spark.sql.shuffle.partitions": "4",
        "spark.default.parallelism": "4",
        "spark.databricks.delta.snapshotPartitions": "2",
        "spark.ui.showConsoleProgress": "false",
        "spark.python.worker.reuse": "true",
        # Python workers must run the pipeline's virtualenv, not whatever python3 is on PATH.
        "spark.pyspark.python": os.environ.get("PYSPARK_PYTHON", sys.executable),
        "spark.pyspark.driver.python": os.environ.get("PYSPARK_DRIVER_PYTHON", sys.executable),
        "spark.executorEnv.PYTHONPATH": os.environ.get("PYTHONPATH", str(Path(__file__).resolve().parent.parent)),
    }


def delta_session(conf: dict[str, str], log_level: str = "ERROR"):
    """The process's Spark session, created from `conf` on first use (an active session is returned as is)."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # PySpark reads the worker interpreter from the environment only (not from spark.pyspark.python).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    conf = dict(conf)
    if under_spark_submit():
        for key in SUBMIT_OWNS:
            conf.pop(key, None)
    builder = SparkSession.builder
    for k, v in conf.items():
        builder = builder.config(k, v)
    # py4j logs every connection close at INFO, also during interpreter shutdown when streams are gone.
    logging.getLogger("py4j").setLevel(logging.WARNING)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(log_level)
    return spark


def delete_path(spark, uri: str) -> None:
    """Delete a folder (recursively) through Hadoop's FileSystem: local disk, s3a:// and HDFS alike."""
    path = spark._jvm.org.apache.hadoop.fs.Path(uri)
    path.getFileSystem(spark._jsc.hadoopConfiguration()).delete(path, True)


def interruptibly(spark, action: Callable[[], T]) -> T:
    """`action()` (a blocking Spark action) run on a helper thread, so that Ctrl-C stops it.

    Why: PySpark's SIGINT handler cancels the running jobs through py4j from the main thread. When the
    main thread is itself blocked inside a py4j call (a collect, an eager checkpoint), that call is
    re-entered and fails ("reentrant call inside BufferedReader"): the jobs keep running, the interrupt is
    lost and the process goes on. Waiting on a thread leaves the main thread's py4j connection free (each
    Python thread has its own), so the handler can cancel and KeyboardInterrupt surfaces. The action's
    jobs carry a job group of their own, cancelled until the action ends: an action can be several jobs
    (a shuffle, then the job reading it), and the signal may fall between two of them, when there is
    nothing running to cancel yet. The same holds for SystemExit (a SIGTERM turned into an exit) or any
    other exception raised while waiting."""
    group = f"reaseq-interruptible-{uuid.uuid4().hex[:12]}"

    def in_group() -> T:
        spark.sparkContext.setJobGroup(group, "cancelled together on Ctrl-C", interruptOnCancel=True)
        return action()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spark-action") as pool:
        future = pool.submit(in_group)
        try:
            return future.result()
        except BaseException:
            while not future.done():
                with suppress(Exception):  # a stopped context, a broken gateway: the original error matters
                    spark.sparkContext.cancelJobGroup(group)
                wait([future], timeout=0.5)
            raise
