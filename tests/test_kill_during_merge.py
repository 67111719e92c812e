"""A writer killed with SIGKILL in the middle of a MERGE leaves the table readable at its previous
version (Delta commits atomically through its log), and rerunning the write ends exactly-once.

"In the middle" is made certain rather than timed: the source's `source` column comes from a Python UDF
that, once it runs inside a job of Delta's MERGE (the job description Delta sets says so; seen: "MERGE
operation - materialize source", the MERGE's first job), writes a marker and holds that task until the
process is killed. Until 2026-12 the test waited a fixed 3 s after the writer said "merging", over
400,000 rows: two minutes of the suite, and on a slow day the kill could still land before the MERGE's
own jobs (in the duplicate-key check)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from feature_store import delta

pytestmark = pytest.mark.spark

# The writer's rows, shared by the test (exec'd) and the writer script: user, item, timestamp keys 0..n-1.
ROWS = textwrap.dedent(
    """
    def rows(spark, n, run):
        return spark.range(n).selectExpr(
            "concat('u', cast(id % 997 as string)) as user_id", "concat('i', cast(id as string)) as item_id",
            "timestamp_seconds(1700000000 + id) as event_ts", "'click' as event_type",
            "cast(null as double) as rating", "'test' as source",
            "to_date(timestamp_seconds(1700000000 + id)) as ds", f"'{run}' as run_id")
    """
)

WRITER = ROWS + textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pyspark import TaskContext
    from pyspark.sql import functions as F
    from jobs.spark import get_spark
    from feature_store import delta
    root, n, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    spark = get_spark("local[2]", app_name="kill-test", extra={"spark.sql.shuffle.partitions": "2"})

    @F.udf("string")
    def held_inside_merge(source):
        # On an executor's Python worker. Delta names its MERGE jobs in the job description; only
        # there is the task held (the duplicate-key check before it reads the keys alone).
        job = TaskContext.get().getLocalProperty("spark.job.description") or ""
        if "MERGE" in job.upper():
            marker.write_text("inside MERGE: " + job)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # killed long before; bounded so nothing outlives the test
                time.sleep(0.1)
        return source

    df = rows(spark, n, "run-2").withColumn("source", held_inside_merge("source"))
    delta.merge(spark, df, "bronze.interactions", root)
    marker.write_text("done")
    """
)


def _rows(spark, n: int, run: str):
    namespace: dict = {}
    exec(ROWS, namespace)
    return namespace["rows"](spark, n, run)


def test_sigkill_mid_merge_keeps_previous_version_and_rerun_is_exactly_once(tmp_path, spark):
    root = str(tmp_path / "lakehouse")
    delta.merge(spark, _rows(spark, 1000, "run-1"), "bronze.interactions", root)
    v_before = delta.table_version("bronze.interactions", root)
    n = 3000  # the first 1000 keys are in the table: the MERGE updates those and inserts the rest
    marker = tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, root, str(n), str(marker)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (marker.exists() and marker.read_text().startswith("inside MERGE")):
        if proc.poll() is not None:
            pytest.fail(f"the writer ended before its MERGE was held: {proc.stderr.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, "the writer never reached its MERGE's jobs"
        time.sleep(0.2)
    assert delta.table_version("bronze.interactions", root) == v_before  # held: nothing committed yet
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its JVM, as a lost node would
    proc.wait(timeout=30)
    proc.stderr.close()

    # Readable, and exactly at the version before the killed write.
    assert delta.table_version("bronze.interactions", root) == v_before
    t = delta.read_arrow("bronze.interactions", root)
    assert t.num_rows == 1000 and set(t["run_id"].to_pylist()) == {"run-1"}
    assert delta.read_spark(spark, "bronze.interactions", root).count() == 1000

    # The rerun completes the write exactly once: every key once, the first 1000 updated in place.
    delta.merge(spark, _rows(spark, n, "run-2"), "bronze.interactions", root)
    t = delta.read_arrow("bronze.interactions", root)
    assert t.num_rows == n
    assert t.group_by(["user_id", "item_id", "event_ts"]).aggregate([]).num_rows == n
    assert set(t["run_id"].to_pylist()) == {"run-2"}
