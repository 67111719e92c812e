"""How a stage is handed to a Spark cluster with spark-submit: one description, two users.

The nightly DAG's SparkSubmitOperator (REASEQ__AIRFLOW__SUBMIT=spark-submit) and `python -m jobs.spark_cluster
submit` both build the command from `submit_settings`, so what a person runs by hand is what Airflow runs.

Light on purpose: the DAG file imports this at parse time, so nothing here may import pyspark.

The master is not part of the settings: Airflow takes it from the `spark_reaseq` connection
(AIRFLOW_CONN_SPARK_REASEQ=spark://host:7077?deploy-mode=client), the CLI from its --master. Under
spark-submit the stage's session builder leaves spark.master alone (jobs.spark.get_spark), so the job
runs wherever it was submitted, unchanged.
"""

from __future__ import annotations

from feature_store.spark import SUBMIT_OWNS
from jobs.config import PROJECT_ROOT

CONN_ID = "spark_reaseq"
CONN_ENV = "AIRFLOW_CONN_SPARK_REASEQ"
MODES = ("inprocess", "spark-submit")
# spark-submit takes these as its own options, not as --conf.
OWN_OPTIONS = SUBMIT_OWNS


def submit_mode() -> str:
    """`inprocess` (default: each Airflow task runs its stage in the task's process, local Spark) or
    `spark-submit` (each task submits its stage to the cluster of the spark_reaseq connection)."""
    from jobs.config import load_config

    return load_config()["airflow"]["submit"]


def connection_uri(master: str) -> str:
    """The Airflow connection URI for a standalone master URL (spark://host:port), client deploy mode:
    the driver runs beside the Airflow worker, which holds the job's Python environment."""
    if not master.startswith("spark://"):
        raise ValueError(f"{master!r} is not a standalone master URL (spark://host:port)")
    return f"{master}?deploy-mode=client"


def submit_settings(stage: str, executor_memory: str | None = None) -> dict:
    """The parts of one stage's spark-submit: application file, Delta's jars (the local cache when set up,
    else Maven coordinates resolved by spark-submit), --conf settings, driver memory, name. Executor
    memory: the argument, else spark.executor_memory (REASEQ__SPARK__EXECUTOR_MEMORY), else Spark's default (1g)."""
    from jobs.spark import DELTA_PACKAGE, jar_manifest, s3a_packages, spark_conf
    from jobs.stages import PIPELINE

    if stage not in PIPELINE:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(PIPELINE)}")
    cached = jar_manifest().exists()
    extra = {"spark.executor.memory": executor_memory} if executor_memory else {}
    conf = spark_conf(None, app_name=f"reaseq-{stage}", extra=extra, with_jars=cached)
    driver_memory = conf["spark.driver.memory"]
    for key in OWN_OPTIONS:
        conf.pop(key, None)
    packages = [] if cached else [DELTA_PACKAGE]
    packages += s3a_packages()
    return {
        "application": str(PROJECT_ROOT / "jobs" / f"{stage}.py"),
        "name": f"reaseq-{stage}",
        "jars": ",".join(_cached_jars()) if cached else None,
        "packages": ",".join(packages) or None,
        "conf": conf,
        "driver_memory": driver_memory,
    }


def _cached_jars() -> list[str]:
    from jobs.spark import cached_jars

    return cached_jars()


def command(stage: str, args: list[str], master: str, binary: str = "spark-submit",
            executor_memory: str | None = None) -> list[str]:
    """The spark-submit command line of one stage, as the Spark provider's hook builds it."""
    s = submit_settings(stage, executor_memory)
    cmd = [binary, "--master", master, "--deploy-mode", "client", "--name", s["name"],
           "--driver-memory", s["driver_memory"]]
    if s["jars"]:
        cmd += ["--jars", s["jars"]]
    if s["packages"]:
        cmd += ["--packages", s["packages"]]
    for k, v in sorted(s["conf"].items()):
        cmd += ["--conf", f"{k}={v}"]
    return [*cmd, s["application"], *args]
