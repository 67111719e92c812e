"""A source read in chunks, made one Spark DataFrame for the ingest's MERGE without holding it in the driver.

One chunk (every source but a streamed amazon-json file larger than `source.chunk_rows`) becomes a
DataFrame directly. Longer sources are appended chunk by chunk to a Parquet folder under the lakehouse
(`_staging/<table>`, which a cluster's executors reach, on S3 too) and read back from there; the folder is
deleted once the MERGE has committed, and the first chunk overwrites whatever a killed run left in it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from jobs.progress import progress_line
from jobs.runtime import log
from jobs.sources import SourceBatch


@dataclass
class Staged:
    df: Any  # pyspark DataFrame: the whole source, kept rows only
    rows_read: Counter = field(default_factory=Counter)  # summed over chunks
    kept: int = 0
    quarantine: list[dict] = field(default_factory=list)  # the chunks' quarantine records for this table
    chunks_staged: int = 0
    folder: str | None = None

    def clean_up(self, spark) -> None:
        """Delete the staging folder (after the MERGE committed)."""
        from feature_store.spark import delete_path

        if self.folder is not None:
            delete_path(spark, self.folder)


def stage(ctx, chunks: Iterator[SourceBatch], table_name: str,
          rows: Callable[[SourceBatch], pa.Table]) -> Staged:
    """Account every chunk (rows read, kept, quarantined for `table_name`) and make the kept rows, as
    `rows(chunk)` gives them (stamped with the run's columns), one DataFrame."""
    spark = ctx.spark
    first = next(chunks)
    second = next(chunks, None)
    # Held in a list and popped, so that no name keeps a staged chunk alive: the driver holds one chunk
    # (two at the start, read ahead to know whether the source is one chunk).
    pending = [first] if second is None else [first, second]
    first = second = None
    one_chunk = len(pending) == 1
    folder = f"{ctx.root.rstrip('/')}/_staging/{table_name.split('.')[-1]}"
    out = Staged(df=None)
    t0 = time.monotonic()
    while pending or not one_chunk:
        chunk = pending.pop(0) if pending else next(chunks, None)
        if chunk is None:
            break
        out.rows_read.update(chunk.rows_read)
        arrow = rows(chunk)
        out.kept += arrow.num_rows
        out.quarantine += [q.__dict__ for q in chunk.quarantine if q.source_table == table_name]
        if one_chunk:
            out.df = spark.createDataFrame(arrow)
        elif arrow.num_rows:
            spark.createDataFrame(arrow).write.mode("append" if out.chunks_staged else "overwrite").parquet(folder)
            out.chunks_staged += 1
            done, total = chunk.progress or (1, 1)
            log.info(progress_line(f"{table_name}: {out.kept:,} rows staged, source read", done, total,
                                   time.monotonic() - t0, "bytes"))
        chunk = arrow = None
    if out.chunks_staged:
        out.df, out.folder = spark.read.parquet(folder), folder
    return out
