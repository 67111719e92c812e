"""Delta I/O: Spark MERGE on each table's key, small driver-built upserts, and Arrow reads through delta-rs.

Spark is imported lazily so that Arrow-only consumers (training jobs, analysts) never start a JVM.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from feature_store.catalog import TableSpec, get

log = logging.getLogger("reaseq")

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession


class TableMissing(RuntimeError):
    """A table a stage needs has not been written yet."""


def default_root() -> str:
    return os.environ.get("REASEQ_LAKEHOUSE", str(Path(__file__).resolve().parent.parent / "lakehouse"))


def table_path(name: str, root: str | None = None) -> str:
    spec = get(name)
    return f"{(root or default_root()).rstrip('/')}/{spec.layer}/{spec.table}"


def exists(name: str, root: str | None = None) -> bool:
    path = table_path(name, root)
    if "://" in path and not path.startswith("file://"):
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(path)
    return Path(path, "_delta_log").is_dir()


# ---------------------------------------------------------------- Spark side


def spark_schema(spec: TableSpec):
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(spec.schema)


def ensure_table(spark: SparkSession, spec: TableSpec, root: str | None = None) -> str:
    from delta.tables import DeltaTable

    path = table_path(spec.name, root)
    builder = DeltaTable.createIfNotExists(spark).location(path).addColumns(spark_schema(spec))
    if spec.partition_by:
        builder = builder.partitionedBy(*spec.partition_by)
    builder = builder.comment(spec.description)
    builder.execute()
    _add_new_columns(spark, spec, path)
    return path


def _add_new_columns(spark: SparkSession, spec: TableSpec, path: str) -> None:
    """Additive schema evolution: a nullable column the catalog gained is added to an existing table
    (older rows read null), so a lakehouse written by an earlier release keeps working. Renames and
    type changes are not done here: they need a migration someone decides on."""
    existing = {f.name for f in spark.read.format("delta").load(path).schema.fields}
    new = [f for f in spark_schema(spec).fields if f.name not in existing]
    if new:
        cols = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in new)
        spark.sql(f"ALTER TABLE delta.`{path}` ADD COLUMNS ({cols})")


def conform(df: DataFrame, spec: TableSpec) -> DataFrame:
    """Select the table's columns in order and cast them, failing loudly on a missing column."""
    from pyspark.sql import functions as F

    missing = [c for c in spec.columns if c not in df.columns]
    if missing:
        raise ValueError(f"{spec.name}: dataframe lacks columns {missing}")
    target = spark_schema(spec)
    return df.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in target.fields])


# Delta's optimistic concurrency: a commit that lost a race to another writer of the same files fails with
# one of these (io.delta.exceptions.*); the MERGE is an upsert on the key, so running it again is safe.
# delta-rs raises CommitFailedError for the same races (upsert_rows).
CONFLICTS = ("ConcurrentAppendException", "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException",
             "ConcurrentTransactionException", "MetadataChangedException", "ProtocolChangedException",
             "CommitFailedError")
CONFLICT_RETRIES = 5


def merge(
    spark: SparkSession,
    df: DataFrame,
    name: str,
    root: str | None = None,
    *,
    partition_values: list | None = None,
    delete_unmatched: bool | str = False,
    keys_unique: bool = False,
) -> dict:
    """Upsert `df` into the table on its key; a rerun with the same rows leaves the same table.

    `partition_values` puts the partition predicate into the MERGE condition, which keeps concurrent
    merges into disjoint partitions from conflicting and lets a day's rerun touch only that day.
    `delete_unmatched` makes the MERGE a sync: target rows the source does not have are deleted,
    all of them (True) or those matching a SQL condition on the target `t` (e.g. "t.ds <= '2026-11-22'"),
    so the covered part of the table ends up exactly equal to the source.
    `keys_unique`: the caller built the rows itself with unique keys (a run record, quarantine rows), so
    the duplicate-key check, a Spark job of its own, is skipped.

    Stages that run side by side (the two ingests) write the same tables (silver.quarantine,
    ops.pipeline_runs): a commit that loses the race is retried, up to CONFLICT_RETRIES times with a
    short jittered wait, and the conflict is raised only if it persists.
    """
    return _retrying_conflicts(
        name, lambda: _merge_once(spark, df, name, root, partition_values, delete_unmatched, keys_unique))


def _retrying_conflicts(name: str, commit):
    """`commit()`, run again while it loses optimistic-concurrency races (safe: every write here is an
    upsert on the key), up to CONFLICT_RETRIES times with a short jittered wait."""
    import random
    import time

    for attempt in range(CONFLICT_RETRIES + 1):
        try:
            return commit()
        except Exception as exc:
            conflict = next((c for c in CONFLICTS if c in f"{type(exc).__name__}: {exc}"), None)
            if conflict is None or attempt == CONFLICT_RETRIES:
                raise
            wait = min(5.0, 0.2 * 2**attempt) * (0.5 + random.random())
            log.info("%s: the commit lost a race to another writer (%s); merging again in %.1f s", name, conflict, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def sync_snapshot(spark: SparkSession, df: DataFrame, name: str, root: str | None = None, *,
                  unchanged_when: tuple[str, ...]) -> dict:
    """Make the table equal, key for key, to `df`, a full snapshot of its source, writing only the
    difference: rows whose key is new or whose `unchanged_when` columns differ are upserted, keys the
    snapshot no longer lists are deleted, in one MERGE; rows that did not change are not written, so their
    stamps (ds, run_id) stay those of the run that last wrote them. A snapshot equal to the table commits
    nothing.

    Why not `merge(..., delete_unmatched=True)` with the whole snapshot: that MERGE updates every matched
    row, so each night rewrote every file of the table (bench-scale, 1% of 100,000 items changed: every
    row updated, 40.3 s against 47.4 s for the first load). The difference is computed first by two
    anti-joins over the key and the compared columns, and only it reaches the MERGE."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    spec = get(name)
    path = ensure_table(spark, spec, root)
    src = conform(df, spec)
    if _last_commit(spark, DeltaTable.forPath(spark, path), path)["version"] == 0:
        return merge(spark, src, name, root)  # the first load: the append fast path
    _refuse_duplicate_keys(src, spec)
    key, compared = list(spec.key), list(spec.key) + list(unchanged_when)
    current = spark.read.format("delta").load(path).select(*compared)
    changed = src.join(current, compared, "left_anti").withColumn("_vanished", F.lit(False))
    vanished = (current.select(*key).join(src.select(*key), key, "left_anti")
                .withColumn("_vanished", F.lit(True)))
    diff = changed.unionByName(vanished, allowMissingColumns=True).cache()
    try:
        counts = {bool(r["_vanished"]): int(r["n"]) for r in diff.groupBy("_vanished").agg(F.count("*").alias("n")).collect()}
        n_changed, n_vanished = counts.get(False, 0), counts.get(True, 0)
        if not n_changed and not n_vanished:
            return {"version": _last_commit(spark, DeltaTable.forPath(spark, path), path)["version"],
                    "rows_changed": 0, "rows_vanished": 0}
        cond = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in key)
        updates = {f"`{c}`": f"s.`{c}`" for c in spec.columns if c not in spec.preserve_on_update}

        def commit() -> dict:
            target = DeltaTable.forPath(spark, path)
            (target.alias("t").merge(diff.alias("s"), cond)
             .whenMatchedDelete(condition="s._vanished")
             .whenMatchedUpdate(set=updates)
             .whenNotMatchedInsert(condition="NOT s._vanished", values={f"`{c}`": f"s.`{c}`" for c in spec.columns})
             .execute())
            last = _last_commit(spark, target, path)
            metrics = {k: int(v) for k, v in (last["operationMetrics"] or {}).items() if str(v).isdigit()}
            return {"version": int(last["version"]), "rows_changed": n_changed, "rows_vanished": n_vanished, **metrics}

        return _retrying_conflicts(name, commit)
    finally:
        diff.unpersist()


def upsert_rows(spark: SparkSession, rows: list[dict], name: str, root: str | None = None) -> dict:
    """Upsert rows the driver built itself (a task's run record, quarantine rows, LLM attempt rows) on the
    table's key, with `merge`'s semantics (`preserve_on_update` kept, a rerun leaves the same table).

    On a local lakehouse they are committed by delta-rs: a MERGE of one row through Spark is three or four
    Spark jobs, 3-4 s warm on 2 cores, and every task paid it for its run record (about 45 s of a
    100-item nightly run); delta-rs commits the same row in ~50 ms. Spark and delta-rs may commit to one
    table side by side (the two ingests write both tables): each publishes a version with an atomic
    put-if-absent in `_delta_log`, so a race is lost, not corrupted, and the loser merges again. Elsewhere
    (s3a://) Spark commits them: delta-rs would need the store's credentials and a locking provider of
    its own for safe concurrent commits, which Spark's S3 LogStore does not share. A missing table, or
    one lacking a column the catalog added, is created or evolved through Spark first (once)."""
    spec = get(name)
    table = pa.Table.from_pylist(rows, schema=spec.schema)
    keys = list(zip(*(table.column(k).to_pylist() for k in spec.key), strict=True))
    if len(set(keys)) != len(keys):
        raise _duplicate_keys_error(spec, sorted({k for k in keys if keys.count(k) > 1})[:5])
    nulls = [f.name for f in spec.schema if (not f.nullable or f.name in spec.key) and table.column(f.name).null_count]
    if nulls:
        raise ValueError(f"{name}: null in the key or non-nullable column(s) {nulls}: the caller built a bad row")
    path = table_path(name, root)
    if not is_local(path):
        return merge(spark, spark.createDataFrame(table), name, root, keys_unique=True)
    from deltalake import DeltaTable as ArrowTable

    if not exists(name, root) or not set(spec.columns) <= set(ArrowTable(path).schema().to_arrow().names):
        ensure_table(spark, spec, root)
    on = " AND ".join(f"t.{k} = s.{k}" for k in spec.key)  # key columns are never null (checked above)
    updates = {c: f"s.{c}" for c in spec.columns if c not in spec.preserve_on_update}

    def commit() -> dict:
        target = ArrowTable(path)
        metrics = (target.merge(table, on, source_alias="s", target_alias="t")
                   .when_matched_update(updates).when_not_matched_insert_all().execute())
        return {"version": target.version(), "engine": "delta-rs",
                **{k: v for k, v in metrics.items() if isinstance(v, int)}}

    return _retrying_conflicts(name, commit)


RETENTION_PROPERTIES = ("delta.logRetentionDuration", "delta.deletedFileRetentionDuration")


def apply_retention(spark: SparkSession | None, name: str, root: str | None = None, *, days: int,
                    vacuum: bool = True) -> dict:
    """Keep `days` of the table's history and no more: its log and the data files older versions need
    (`delta.logRetentionDuration` and `delta.deletedFileRetentionDuration`, set only when they differ),
    then VACUUM the files no version within `days` needs.

    Why both properties: Delta's defaults differ (30 days of log, 7 days of files), so a version 8 days
    old is listed by `DESCRIBE HISTORY` but cannot be read; training runs pin table versions and
    backfills look back, so the two must be one number that covers the furthest either reaches. On a
    local lakehouse delta-rs does both (milliseconds when nothing is due; Spark's VACUUM lists the table
    in a few jobs per table, every night); elsewhere Spark (`spark` is needed only there).
    Returns {"properties_set": bool, "files_deleted": n, or None where Spark does not count them}."""
    if days < 0:
        raise ValueError(f"retention of {days} days: give 0 or more")
    path = table_path(name, root)
    wanted = {p: f"interval {days} days" for p in RETENTION_PROPERTIES}
    if is_local(path):
        from deltalake import DeltaTable as ArrowTable

        table = ArrowTable(path)
        current = table.metadata().configuration
        changed = any(current.get(k) != v for k, v in wanted.items())
        if changed:
            table.alter.set_table_properties(wanted)
            table = ArrowTable(path)
        deleted = table.vacuum(retention_hours=days * 24, dry_run=False) if vacuum else []
        return {"properties_set": changed, "files_deleted": len(deleted)}
    if spark is None:
        raise ValueError(f"{name}: {path} is not on a local disk: apply_retention needs a Spark session there")
    from delta.tables import DeltaTable

    props = {r["key"]: r["value"] for r in spark.sql(f"SHOW TBLPROPERTIES delta.`{path}`").collect()}
    changed = any(props.get(k) != v for k, v in wanted.items())
    if changed:
        values = ", ".join(f"'{k}' = '{v}'" for k, v in wanted.items())
        spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ({values})")
    if vacuum:
        DeltaTable.forPath(spark, path).vacuum(days * 24)
    return {"properties_set": changed, "files_deleted": None}


# Z-order rewrites every file of the table, not only the small ones: it is paid for only once the small
# files hold this share of the table's bytes (the table grew by about a tenth since it was last sorted), so
# rewrites add up to about ten times the data written instead of growing with the table at every pass;
# otherwise the small files alone are compacted, as for any table.
ZORDER_MIN_SMALL_SHARE = 0.1
# delta-rs sorts in memory up to this, then spills to disk (its default is unbounded: ~1.1 MB of memory
# per MB of table was measured; 40-120 MB failed "not enough memory to continue external sort").
ZORDER_SPILL_BYTES = 1 << 30


def compact(spark: SparkSession | None, name: str, root: str | None = None, *, min_files: int,
            target_mb: int) -> dict:
    """Rewrite the table's small files (under half of `target_mb`) into files of about `target_mb`, once it
    has `min_files` of them; a table with fewer is left alone (and nothing is committed).

    Why: every chunk of reason_items' answers, every task's run record and every quarantine write adds
    a file or two, so the tables written a little at a time every night gather thousands of files of a
    few KB over a year, and every reader lists and opens each one. Compaction commits an OPTIMIZE
    version whose rows are those of the version before (`dataChange` false), and older versions stay
    readable for the retention window. On a local lakehouse delta-rs compacts; elsewhere Spark's
    OPTIMIZE, with only files under `target_mb` as candidates.
    A table with `cluster_by` in the catalog is Z-ordered by it instead once its small files hold
    ZORDER_MIN_SMALL_SHARE of its bytes (every file rewritten, sorted): a point lookup then opens one file
    until MERGEs rewrite files again. Measured in bench/scale.py --compaction.
    Returns {"small_files": n, "compacted": bool, "files_removed": n, "files_added": n, "sorted_by": [...]}."""
    path = table_path(name, root)
    target = target_mb * 1024 * 1024
    # Small: under half the target. The files compaction writes come out a little under the target (Spark
    # bins up to it), and must not count as small the next night.
    small_below = target // 2
    cluster = get(name).cluster_by
    nothing = {"files_removed": 0, "files_added": 0, "sorted_by": []}
    if is_local(path):
        from deltalake import DeltaTable as ArrowTable

        table = ArrowTable(path)
        actions = pa.table(table.get_add_actions(flatten=True))  # an arro3 table: to pyarrow, no copy
        parts = [c for c in actions.column_names if c.startswith("partition.")]
        per_partition: dict[tuple, list[int]] = {}
        total = 0
        for row in actions.select(["size_bytes", *parts]).to_pylist():
            total += row["size_bytes"]
            if row["size_bytes"] < small_below:
                per_partition.setdefault(tuple(row[c] for c in parts), []).append(row["size_bytes"])
        # Compaction bins files within a partition: a lone small file per partition (a day of
        # bronze.interactions) has nothing to merge with, so it does not count.
        bins = [sizes for sizes in per_partition.values() if len(sizes) > 1]
        small, small_bytes = sum(map(len, bins)), sum(map(sum, bins))
        if small < min_files:
            return {"small_files": small, "compacted": False, **nothing}
        zorder = bool(cluster) and small_bytes >= ZORDER_MIN_SMALL_SHARE * total
        m = (table.optimize.z_order(list(cluster), target_size=target, max_spill_size=ZORDER_SPILL_BYTES) if zorder
             else table.optimize.compact(target_size=target))
        removed, added = int(m.get("numFilesRemoved", 0)), int(m.get("numFilesAdded", 0))
        return {"small_files": small, "compacted": removed > 0, "files_removed": removed, "files_added": added,
                "sorted_by": list(cluster) if zorder else []}
    if spark is None:
        raise ValueError(f"{name}: {path} is not on a local disk: compact needs a Spark session there")
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    target_table = DeltaTable.forPath(spark, path)
    parts = list(get(name).partition_by)
    # Each file's size from the scan's file metadata (no data column read), small files counted per
    # partition as above: a partition's lone small file has nothing to merge with.
    files = target_table.toDF().select(*parts, F.col("_metadata.file_path").alias("path"),
                                       F.col("_metadata.file_size").alias("size")).distinct()
    bins = (files.filter(F.col("size") < small_below).groupBy(*parts)
            .agg(F.count("*").alias("n"), F.sum("size").alias("bytes")).filter(F.col("n") > 1)
            .agg(F.sum("n").alias("small"), F.sum("bytes").alias("small_bytes")).first())
    small, small_bytes = int(bins["small"] or 0), int(bins["small_bytes"] or 0)
    total = int(files.agg(F.sum("size")).first()[0] or 0)
    if small < min_files:
        return {"small_files": small, "compacted": False, **nothing}
    zorder = bool(cluster) and small_bytes >= ZORDER_MIN_SMALL_SHARE * total
    settings = {"spark.databricks.delta.optimize.minFileSize": str(target),
                "spark.databricks.delta.optimize.maxFileSize": str(target)}
    if zorder:
        # Without noise and with rows sorted in each file, one key's rows never straddle two files and a
        # file's min/max bound its keys (Delta's defaults add noise to balance skewed ranges).
        settings |= {"spark.databricks.io.skipping.mdc.addNoise": "false",
                     "spark.databricks.io.skipping.mdc.sortWithinFiles": "true"}
    saved = {k: spark.conf.get(k, None) for k in settings}
    try:
        for k, v in settings.items():
            spark.conf.set(k, v)
        optimize = target_table.optimize()
        done = optimize.executeZOrderBy(*cluster) if zorder else optimize.executeCompaction()
        m = done.select("metrics.numFilesRemoved", "metrics.numFilesAdded").first()
    finally:  # the session is shared by the stages after
        for k, v in saved.items():
            spark.conf.unset(k) if v is None else spark.conf.set(k, v)
    removed, added = int(m[0] or 0), int(m[1] or 0)
    return {"small_files": small, "compacted": removed > 0, "files_removed": removed, "files_added": added,
            "sorted_by": list(cluster) if zorder else []}


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _merge_once(spark: SparkSession, df: DataFrame, name: str, root: str | None, partition_values: list | None,
                delete_unmatched: bool | str, keys_unique: bool) -> dict:
    from delta.tables import DeltaTable

    spec = get(name)
    path = ensure_table(spark, spec, root)
    src = conform(df, spec)
    if not keys_unique:
        _refuse_duplicate_keys(src, spec)
    cond = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in spec.key)
    if partition_values is not None and spec.partition_by:
        col = spec.partition_by[0]
        values = ", ".join(f"'{v}'" for v in partition_values) or "NULL"
        cond += f" AND t.`{col}` IN ({values})"
    target = DeltaTable.forPath(spark, path)
    if _last_commit(spark, target, path)["version"] == 0:
        # Freshly created and empty: an append writes the same rows without MERGE's join. A partitioned
        # table's rows are first shuffled by its partition columns, as Delta's MERGE does before it writes:
        # otherwise each input slice writes a file into every partition it holds (bench-scale: 8,040
        # files of 6 KB for 100,000 users' events over 60 days, where this writes 60).
        out = src.repartition(*spec.partition_by) if spec.partition_by else src
        out.write.format("delta").mode("append").save(path)
        return {"version": 1, "numTargetRowsInserted": src.count(), "fast_path": "append"}
    updates = {f"`{c}`": f"s.`{c}`" for c in spec.columns if c not in spec.preserve_on_update}
    m = (
        target.alias("t")
        .merge(src.alias("s"), cond)
        .whenMatchedUpdate(set=updates)
        .whenNotMatchedInsertAll()
    )
    if delete_unmatched is True:
        m = m.whenNotMatchedBySourceDelete()
    elif delete_unmatched:
        m = m.whenNotMatchedBySourceDelete(condition=delete_unmatched)
    m.execute()
    last = _last_commit(spark, target, path)
    metrics = {k: int(v) for k, v in (last["operationMetrics"] or {}).items() if str(v).isdigit()}
    return {"version": int(last["version"]), **metrics}


def _refuse_duplicate_keys(src: DataFrame, spec: TableSpec) -> None:
    """A source with a key twice would make MERGE fail half-way (or pick a row at random): refuse it first,
    naming a few of the keys (one Spark job)."""
    from pyspark.sql import functions as F

    dupes = src.groupBy(*spec.key).count().filter(F.col("count") > 1).limit(5).collect()
    if dupes:
        raise _duplicate_keys_error(spec, [tuple(r[k] for k in spec.key) for r in dupes])


def _duplicate_keys_error(spec: TableSpec, sample: list) -> ValueError:
    return ValueError(f"{spec.name}: source has duplicate keys {spec.key}, e.g. {sample}; deduplicate before merging")


def _last_commit(spark: SparkSession, target, path: str) -> dict:
    """The table's latest commit: its version and operation metrics. On a local path it is read from the
    log by delta-rs (milliseconds; through Spark, a job of a fraction of a second, twice per MERGE);
    elsewhere (s3a://, where delta-rs would need the cluster's credentials) through Spark."""
    if is_local(path):
        from deltalake import DeltaTable as ArrowTable

        commit = ArrowTable(path).history(1)[0]
        return {"version": int(commit["version"]), "operationMetrics": commit.get("operationMetrics")}
    row = target.history(1).select("operationMetrics", "version").collect()[0]
    return {"version": int(row["version"]), "operationMetrics": row["operationMetrics"]}


def read_spark(spark: SparkSession, name: str, root: str | None = None, version: int | None = None) -> DataFrame:
    if not exists(name, root):
        raise TableMissing(f"{name} has not been written yet at {table_path(name, root)}: run the stage that writes it")
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return reader.load(table_path(name, root))


def empty_spark(spark: SparkSession, name: str) -> DataFrame:
    return spark.createDataFrame([], spark_schema(get(name)))


# ---------------------------------------------------------------- Arrow side (no JVM)


def delta_table(name: str, root: str | None = None, version: int | None = None):
    from deltalake import DeltaTable

    if not exists(name, root):
        raise TableMissing(f"{name} has not been written yet at {table_path(name, root)}: run `make run` first")
    return DeltaTable(table_path(name, root), version=version)


def table_version(name: str, root: str | None = None) -> int:
    return delta_table(name, root).version()


def read_arrow(
    name: str, root: str | None = None, *, version: int | None = None, columns: list[str] | None = None, filter=None
) -> pa.Table:
    return delta_table(name, root, version).to_pyarrow_dataset().to_table(columns=columns, filter=filter)


def arrow_batches(
    name: str, root: str | None = None, *, version: int | None = None, columns: list[str] | None = None,
    batch_size: int = 4096, filter=None, readahead: bool = True,
):
    """Stream a pinned version of a table as Arrow record batches (for training readers).

    `readahead=False` reads one file and one batch at a time: Arrow's defaults decode up to 16 batches
    and 4 files ahead, which for wide rows (a million embeddings) is gigabytes held beside the reader's."""
    ds = delta_table(name, root, version).to_pyarrow_dataset()
    ahead = {} if readahead else {"batch_readahead": 1, "fragment_readahead": 1}
    yield from ds.to_batches(columns=columns, batch_size=batch_size, filter=filter, **ahead)
