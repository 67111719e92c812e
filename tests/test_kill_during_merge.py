"""A writer killed with SIGKILL in the middle of a MERGE leaves the table readable at its previous
version (Delta commits atomically through its log), and rerunning the write ends exactly-once."""

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

WRITER = textwrap.dedent(
    """
    import sys, datetime as dt
    from pathlib import Path
    from jobs.spark import get_spark
    from feature_store import delta
    from feature_store.catalog import TABLES
    root, n, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    spark = get_spark("local[2]", app_name="kill-test", extra={"spark.sql.shuffle.partitions": "2"})
    df = (spark.range(n)
          .selectExpr("concat('u', cast(id % 997 as string)) as user_id",
                      "concat('i', cast(id as string)) as item_id",
                      "timestamp_seconds(1700000000 + id) as event_ts", "'click' as event_type",
                      "cast(null as double) as rating", "'test' as source",
                      "to_date(timestamp_seconds(1700000000 + id)) as ds", "'run-2' as run_id"))
    marker.write_text("merging")
    delta.merge(spark, df, "bronze.interactions", root)
    marker.write_text("done")
    """
)


def _writer(root: str, n: int, marker: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    return subprocess.Popen([sys.executable, "-c", WRITER, root, str(n), str(marker)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_sigkill_mid_merge_keeps_previous_version_and_rerun_is_exactly_once(tmp_path, spark):
    root = str(tmp_path / "lakehouse")
    base = spark.range(1000).selectExpr(
        "concat('u', cast(id % 997 as string)) as user_id", "concat('i', cast(id as string)) as item_id",
        "timestamp_seconds(1700000000 + id) as event_ts", "'click' as event_type",
        "cast(null as double) as rating", "'test' as source",
        "to_date(timestamp_seconds(1700000000 + id)) as ds", "'run-1' as run_id")
    delta.merge(spark, base, "bronze.interactions", root)
    v_before = delta.table_version("bronze.interactions", root)
    n = 400_000
    marker = tmp_path / "marker"
    proc = _writer(root, n, marker)
    deadline = time.monotonic() + 300
    while (marker.read_text() if marker.exists() else "") != "merging":
        assert proc.poll() is None, "writer died before merging"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(3.0)  # well inside the MERGE: its jobs are running, nothing committed yet
    assert marker.read_text() == "merging", "MERGE finished before the kill; raise n"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    # Readable, and exactly at the version before the killed write.
    assert delta.table_version("bronze.interactions", root) == v_before
    t = delta.read_arrow("bronze.interactions", root)
    assert t.num_rows == 1000
    assert delta.read_spark(spark, "bronze.interactions", root).count() == 1000

    # The rerun completes the write exactly once: no duplicates of the first 1000 keys.
    marker.unlink()
    proc = _writer(root, n, marker)
    assert proc.wait(timeout=600) == 0
    assert marker.read_text() == "done"
    t = delta.read_arrow("bronze.interactions", root)
    assert t.num_rows == n
    assert t.group_by(["user_id", "item_id", "event_ts"]).aggregate([]).num_rows == n
