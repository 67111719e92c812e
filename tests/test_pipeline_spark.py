"""Integration tests on real Spark + Delta: ingest idempotency, accounting, the full chain of stages."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from feature_store import delta
from feature_store.catalog import TABLES
from jobs.runtime import PIPELINE, execute

pytestmark = pytest.mark.spark


def _keys_unique(name: str, root: str) -> bool:
    t = delta.read_arrow(name, root)
    keys = TABLES[name].key
    return t.group_by(list(keys)).aggregate([]).num_rows == t.num_rows


def test_ingest_twice_leaves_same_rows_and_accounts_for_every_row(ctx_factory):
    ctx = ctx_factory()
    r1 = execute("ingest_catalog", ctx)
    i1 = execute("ingest_interactions", ctx)
    assert r1.rows_in == r1.rows_out + r1.rows_quarantined
    assert r1.rows_quarantined >= 5  # the generator's deliberate dirty rows
    assert i1.rows_in == i1.rows_out + i1.rows_quarantined + i1.metrics["not_yet_due"]
    items1 = delta.read_arrow("bronze.catalog_items", ctx.root).sort_by("item_id")
    inter1 = delta.read_arrow("bronze.interactions", ctx.root).num_rows
    q1 = delta.read_arrow("silver.quarantine", ctx.root).num_rows

    execute("ingest_catalog", ctx)
    execute("ingest_interactions", ctx)
    items2 = delta.read_arrow("bronze.catalog_items", ctx.root).sort_by("item_id")
    assert items2.num_rows == items1.num_rows == r1.rows_out
    assert items2.column("content_hash").equals(items1.column("content_hash"))
    assert delta.read_arrow("bronze.interactions", ctx.root).num_rows == inter1 == i1.rows_out
    assert delta.read_arrow("silver.quarantine", ctx.root).num_rows == q1
    for name in ("bronze.catalog_items", "bronze.interactions", "silver.quarantine"):
        assert _keys_unique(name, ctx.root), name
    reasons = delta.read_arrow("silver.quarantine", ctx.root)["reason"].to_pylist()
    assert any(r.startswith("missing_title") for r in reasons)
    assert any(r.startswith("duplicate_item_id") for r in reasons)


def test_an_unchanged_catalog_a_day_later_writes_nothing(ctx_factory, tmp_path):
    first = ctx_factory(ds="2026-11-20")
    execute("ingest_catalog", first)
    version = delta.table_version("bronze.catalog_items", first.root)
    later = ctx_factory(ds="2026-11-22", root=tmp_path)
    res = execute("ingest_catalog", later)
    assert res.metrics["merge"]["rows_changed"] == res.metrics["merge"]["rows_vanished"] == 0
    assert delta.table_version("bronze.catalog_items", later.root) == version
    t = delta.read_arrow("bronze.catalog_items", later.root)
    assert set(t["first_seen_ds"].to_pylist()) == set(t["ds"].to_pylist()) == {dt.date(2026, 11, 20)}


def test_the_catalog_sync_writes_only_new_changed_and_vanished_items(ctx_factory, spark):
    """The nightly catalog MERGE follows the changes: the snapshot's difference from the table (new and
    changed items upserted, vanished ones deleted) in one commit; unchanged rows keep the run that wrote
    them."""
    ctx = ctx_factory()
    d1, d2 = dt.date(2026, 11, 21), dt.date(2026, 11, 22)
    spec = TABLES["bronze.catalog_items"]

    def snapshot(rows):
        return spark.createDataFrame(pa.Table.from_pylist(rows, schema=spec.schema))

    first = [_catalog_row(i, f"{i} v1", d1) for i in ("a", "b", "c")]
    delta.sync_snapshot(spark, snapshot(first), spec.name, ctx.root, unchanged_when=("content_hash",))
    second = [_catalog_row("a", "a v1", d2), _catalog_row("b", "b v2", d2), _catalog_row("d", "d v1", d2)]
    m = delta.sync_snapshot(spark, snapshot(second), spec.name, ctx.root, unchanged_when=("content_hash",))
    assert (m["rows_changed"], m["rows_vanished"]) == (2, 1), m
    assert (m["numTargetRowsUpdated"], m["numTargetRowsInserted"], m["numTargetRowsDeleted"]) == (1, 1, 1), m
    rows = {r["item_id"]: r for r in delta.read_arrow(spec.name, ctx.root).to_pylist()}
    assert sorted(rows) == ["a", "b", "d"]
    assert (rows["a"]["title"], rows["a"]["ds"], rows["a"]["run_id"]) == ("a v1", d1, f"r-{d1}")  # not rewritten
    assert (rows["b"]["title"], rows["b"]["ds"], rows["b"]["first_seen_ds"]) == ("b v2", d2, d1)
    assert (rows["d"]["first_seen_ds"], rows["d"]["ds"]) == (d2, d2)
    version = delta.table_version(spec.name, ctx.root)
    again = delta.sync_snapshot(spark, snapshot(second), spec.name, ctx.root, unchanged_when=("content_hash",))
    assert again == {"version": version, "rows_changed": 0, "rows_vanished": 0}
    assert delta.table_version(spec.name, ctx.root) == version  # the rerun commits nothing
    with pytest.raises(ValueError, match="duplicate keys"):
        delta.sync_snapshot(spark, snapshot(second + second[:1]), spec.name, ctx.root, unchanged_when=("content_hash",))


def test_a_days_rerun_replaces_exactly_that_day(ctx_factory, spark):
    ctx = ctx_factory()
    execute("ingest_interactions", ctx)
    before = delta.read_arrow("bronze.interactions", ctx.root)
    day = sorted(set(before["ds"].to_pylist()))[-3]
    day_rows = before.filter(pc.equal(before["ds"], day))
    # The source now has one event fewer on that day: the rerun of the day must drop it, and only it.
    keep = day_rows.slice(1)
    df = spark.createDataFrame(keep.to_pandas(), delta.spark_schema(TABLES["bronze.interactions"]))
    delta.merge(spark, df, "bronze.interactions", ctx.root, partition_values=[day.isoformat()],
                delete_unmatched=f"t.ds = DATE'{day.isoformat()}'")
    after = delta.read_arrow("bronze.interactions", ctx.root)
    assert after.num_rows == before.num_rows - 1
    other = pc.not_equal(before["ds"], day)
    assert before.filter(other).num_rows == after.filter(pc.not_equal(after["ds"], day)).num_rows


def test_merge_refuses_duplicate_source_keys(ctx_factory, spark):
    ctx = ctx_factory()
    execute("ingest_catalog", ctx)
    items = delta.read_spark(spark, "bronze.catalog_items", ctx.root).limit(3)
    with pytest.raises(ValueError, match="duplicate keys"):
        delta.merge(spark, items.unionByName(items), "bronze.catalog_items", ctx.root)


@pytest.fixture(scope="module")
def nightly(tmp_path_factory, spark):
    """Every stage once, in order, on the small synthetic catalog (240 items, 160 users): the tables the
    end-to-end checks and the models' learning checks read."""
    from tests.conftest import make_ctx

    ctx = make_ctx(tmp_path_factory.mktemp("nightly"), spark=spark)
    return ctx, {name: execute(name, ctx) for name in PIPELINE}


@pytest.mark.slow
def test_every_stage_end_to_end_then_an_unchanged_rerun_is_a_no_op(nightly):
    ctx, results = nightly
    root = ctx.root
    for name in TABLES:
        if name == "ops.training_runs":
            continue  # written by the training jobs, not the nightly refresh
        assert delta.exists(name, root), f"{name} not written"
        assert _keys_unique(name, root), f"{name} has duplicate keys"

    items = delta.read_arrow("bronze.catalog_items", root)
    know = delta.read_arrow("silver.item_knowledge", root)
    assert set(know["model"].to_pylist()) == {"offline-heuristic-v1"}
    assert results["reason_items"].rows_out == items.num_rows
    sids = delta.read_arrow("gold.item_semantic_ids", root)
    assert sids.num_rows == items.num_rows
    full = [tuple(c) for c in sids["rq_codes"].to_pylist()]
    assert len(set(full)) == len(full), "hierarchical IDs must be unique after the collision digit"
    assert all(len(t) == 3 for t in sids["mpq_tokens"].to_pylist())
    seqs = delta.read_arrow("gold.user_sequences", root).to_pylist()
    for s in seqs:
        assert s["seq_len"] == len(s["item_ids"]) == len(s["semantic_ids"])
        assert s["event_ts"] == sorted(s["event_ts"])
        if s["seq_len"] >= 2:
            assert s["test_item_id"] == s["item_ids"][-1]
    aug = delta.read_arrow("gold.user_augmented_behaviors", root).to_pylist()
    by_user = {s["user_id"]: s for s in seqs}
    assert sum(a["status"] == "ok" for a in aug) > 0.5 * len(aug)
    assert {a["user_id"] for a in aug} == set(by_user), "every user gets a row, inferred or with a reason"
    assert all(a["model_version"].startswith("masked-diffusion-v2-") for a in aug)
    for a in aug:
        history = set(by_user[a["user_id"]]["item_ids"][:-1])
        assert not history & set(a["item_ids"]), "inferred items must be beyond the user's log"
        assert (a["status"] == "ok") == bool(a["item_ids"])
        assert len(a["item_ids"]) == len(a["scores"]) == len(a["semantic_ids"])
    feats = delta.read_arrow("gold.user_features", root)
    assert feats.num_rows == len(seqs)
    assert results["validate_gold"].metrics["suites"]["gold.user_features"]["success"]

    # Every table was created with retention.days (30 by default) of history, so publish had no property
    # to set (a commit would move the versions the codebooks pin); VACUUM is off by default.
    kept = results["publish"].metrics["retention"]
    assert kept == {"days": 30, "vacuum": False, "properties_set": [], "files_deleted": 0}, kept
    conf = delta.delta_table("gold.user_features", root).metadata().configuration
    assert conf["delta.deletedFileRetentionDuration"] == conf["delta.logRetentionDuration"] == "interval 30 days"

    counts = {n: delta.read_arrow(n, root).num_rows for n in TABLES if delta.exists(n, root)}
    rerun = {name: execute(name, ctx) for name in PIPELINE}
    assert rerun["reason_items"].metrics["work_set"] == 0
    assert rerun["reason_items"].metrics["llm_calls"] == 0
    assert rerun["embed_items"].rows_out == 0
    assert rerun["train_quantizer"].metrics["reused_checkpoint"] is True
    assert rerun["infer_beyond_log"].metrics["reused_checkpoint"] is True
    assert {n: delta.read_arrow(n, root).num_rows for n in counts} == counts


def popularity_recall_at_10(root: str) -> tuple[float, int]:
    """Recall@10 of the most frequent training items, the user's own history left out (as the models'
    evaluation does): the bar a sequence model must clear. Splits as the trainers': the last event is the
    test target, the one before it validation, the rest training."""
    from collections import Counter

    seqs = [s["item_ids"] for s in delta.read_arrow("gold.user_sequences", root, columns=["item_ids"]).to_pylist()
            if len(s["item_ids"]) >= 3]
    counts = Counter(i for s in seqs for i in s[:-2])
    ranked = [i for i, _ in counts.most_common()]
    hits = 0
    for s in seqs:
        seen = set(s[:-1])
        top = [i for i in ranked if i not in seen][:10]
        hits += s[-1] in top
    return hits / len(seqs), len(seqs)


@pytest.mark.slow
def test_models_trained_on_the_nightly_tables_beat_popularity(nightly):
    """The synthetic users' next item follows their last item's complements (45%) and their preferred
    subcategories: a sequence model that learns anything beats the most popular items clearly. Short
    training runs (CPU, seconds), fixed seeds."""
    import torch

    from jobs.train_generative import train as train_generative
    from jobs.train_ranker import train as train_ranker
    from models.generative import GenerativeConfig
    from models.ranker import RankerConfig

    ctx, _ = nightly
    torch.set_num_threads(2)
    popular, users = popularity_recall_at_10(ctx.root)
    assert users >= 100 and 0 < popular < 0.3, popular
    ranker = train_ranker(ctx.root, RankerConfig(variant="id_only", d_model=32, n_layers=1, n_heads=2, max_epochs=20,
                                                 patience=4, batch_size=32, lr=3e-3, dropout=0.1, seed=0),
                          ds=ctx.ds, progress=False, record=False, artifacts=ctx.artifacts)
    ranker_recall = ranker["metrics"]["test"]["recall@10"]
    generative = train_generative(ctx.root, GenerativeConfig(d_model=32, n_layers=1, n_heads=2, max_epochs=15,
                                                             patience=4, batch_size=32, lr=3e-3, seed=0),
                                  ds=ctx.ds, artifacts=ctx.artifacts, progress=False, record=False,
                                  variants=["fixed_order"])
    generative_recall = generative["metrics"]["variants"]["fixed_order"]["test"]["recall@10"]
    assert ranker_recall > 1.5 * popular, (ranker_recall, popular)
    assert generative_recall > 1.5 * popular, (generative_recall, popular)


@pytest.mark.slow
def test_a_benchmark_lakehouse_gets_the_llm_methods_beyond_log_on_a_copy(nightly, tmp_path, monkeypatch, spark):
    """bench.lakehouse's BEYOND=llm: a finished build is copied, the copy's beyond-log inferences are the
    LLM method's (here with the offline backend's interests), the original keeps the diffusion model's,
    and a second call with the source unchanged does nothing."""
    import json
    import shutil
    from pathlib import Path

    import bench.lakehouse as bl
    from tests.conftest import make_ctx

    ctx, _ = nightly
    monkeypatch.setattr(bl, "CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "data").mkdir()
    monkeypatch.setitem(bl.DATASETS, "tiny", ("synthetic", tmp_path / "data"))
    # The build's own settings (the small test configuration), as the bench's builds use theirs.
    monkeypatch.setattr(bl, "_context", lambda base, loader, data, _spark, **o: make_ctx(base, spark=spark, **o))
    assert "make bench-lakehouse BEYOND=llm DATASETS=tiny" in bl.unusable("tiny", beyond="llm")
    with pytest.raises(SystemExit, match="no finished build to infer from"):
        bl.ensure("tiny", beyond="llm")
    source = bl.root_for("tiny")
    for part in ("lakehouse", "artifacts"):
        shutil.copytree(Path(ctx.root).parent / part, source / part)
    (source / "BUILT.json").write_text(json.dumps({"fingerprint": "f", "knowledge": "offline", "backlog": 0}))

    base = bl.ensure("tiny", beyond="llm")
    assert base == bl.root_for("tiny", beyond="llm") and base != source
    table = "gold.user_augmented_behaviors"
    copied = delta.read_arrow(table, str(base / "lakehouse")).to_pylist()
    original = delta.read_arrow(table, str(source / "lakehouse")).to_pylist()
    assert copied and {r["model_version"].split(":")[0] for r in copied} == {"llm-interests"}
    assert not any(r["model_version"].startswith("llm-interests") for r in original)
    assert {r["user_id"] for r in copied} == {r["user_id"] for r in original}  # one row per user, every user
    assert any(r["status"] == "ok" and r["item_ids"] for r in copied)
    stamp = json.loads((base / "BUILT.json").read_text())
    assert stamp["beyond_log"] == "llm" and stamp["infer_beyond_log"]["method"] == "llm"
    assert stamp["source_build"]["fingerprint"] == "f" and bl.unusable("tiny", beyond="llm") is None
    assert stamp["validate_gold"] == "passed" and stamp["infer_beyond_log"]["model_version"].startswith("llm-interests")
    version = delta.table_version(table, str(base / "lakehouse"))
    assert bl.ensure("tiny", beyond="llm") == base and delta.table_version(table, str(base / "lakehouse")) == version
    root, build = bl.consumer_lakehouse("tiny", beyond="llm")
    assert root == str(base / "lakehouse") and build["beyond_log"] == "llm" and "source_changed_since" not in build

    # The source refreshed: the copy says so until it is made again. A gate that refuses the inferences
    # (a small model leaves most users without candidates) is recorded, and the copy is still usable.
    (source / "BUILT.json").write_text(json.dumps({"fingerprint": "g", "knowledge": "offline", "backlog": 0}))
    assert bl.consumer_lakehouse("tiny", beyond="llm")[1]["source_changed_since"] is True

    def refuse(_ctx):
        from jobs.runtime import StageFailed

        raise StageFailed("gold checks failed: gold.user_augmented_behaviors status ok 0.1 < 0.5")

    monkeypatch.setattr("jobs.validate_gold.run", refuse)
    assert bl.ensure("tiny", beyond="llm") == base
    stamp = json.loads((base / "BUILT.json").read_text())
    assert stamp["source_build"]["fingerprint"] == "g" and "status ok 0.1 < 0.5" in stamp["validate_gold"]
    assert delta.read_arrow(table, str(base / "lakehouse")).num_rows == len(copied)


def test_merges_racing_into_one_table_all_land(ctx_factory, spark):
    """Stages that run side by side (the two ingests) write the same tables: every racing commit lands,
    the losers of Delta's optimistic concurrency merged again."""
    import threading

    from jobs.runtime import write_quarantine

    ctx = ctx_factory()
    write_quarantine(ctx, [{"source_table": "t", "key": "seed", "stage": "s", "reason": "r", "payload": None}])
    errors = []

    def writer(k: int) -> None:
        try:
            write_quarantine(ctx, [{"source_table": "t", "key": f"w{k}-{i}", "stage": "s", "reason": "r",
                                    "payload": None} for i in range(3)])
        except Exception as exc:  # pragma: no cover - the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    keys = set(delta.read_arrow("silver.quarantine", ctx.root)["key"].to_pylist())
    assert keys == {"seed"} | {f"w{k}-{i}" for k in range(4) for i in range(3)}


def _catalog_row(item_id: str, title: str, day: dt.date) -> dict:
    return {"item_id": item_id, "title": title, "description": None, "categories": ["Lab", "Glass"],
            "brand": "B", "price": 1.5, "attributes": [("size", "2 l")], "content_hash": f"h-{title}",
            "source": "test", "first_seen_ds": day, "last_seen_ds": day, "ds": day, "run_id": f"r-{day}"}


@pytest.mark.parametrize("engine", ["delta-rs", "spark"])
def test_driver_built_rows_upsert_alike_through_delta_rs_and_spark(ctx_factory, spark, monkeypatch, engine):
    """upsert_rows commits through delta-rs on a local lakehouse and through Spark elsewhere (s3a://):
    both give MERGE's table (an update keeps preserve_on_update columns; a rerun changes nothing), and
    both refuse duplicate or null keys before writing."""
    if engine == "spark":
        monkeypatch.setattr(delta, "is_local", lambda path: False)
    ctx = ctx_factory()
    d1, d2 = dt.date(2026, 11, 21), dt.date(2026, 11, 22)
    first = delta.upsert_rows(spark, [_catalog_row("a", "one", d1), _catalog_row("b", "two", d1)],
                              "bronze.catalog_items", ctx.root)
    assert (first.get("engine") == "delta-rs") == (engine == "delta-rs"), first
    again = [_catalog_row("b", "two v2", d2), _catalog_row("c", "three", d2)]
    delta.upsert_rows(spark, again, "bronze.catalog_items", ctx.root)
    version = delta.table_version("bronze.catalog_items", ctx.root)
    delta.upsert_rows(spark, again, "bronze.catalog_items", ctx.root)  # the rerun of a day
    rows = {r["item_id"]: r for r in delta.read_arrow("bronze.catalog_items", ctx.root).to_pylist()}
    assert sorted(rows) == ["a", "b", "c"]
    assert (rows["a"]["title"], rows["b"]["title"], rows["c"]["title"]) == ("one", "two v2", "three")
    assert rows["b"]["first_seen_ds"] == d1 and rows["b"]["last_seen_ds"] == d2  # preserved / updated
    assert dict(rows["b"]["attributes"]) == {"size": "2 l"} and rows["b"]["categories"] == ["Lab", "Glass"]
    # Spark reads what delta-rs committed (and the other way round) at the latest version.
    assert delta.read_spark(spark, "bronze.catalog_items", ctx.root).count() == 3
    assert delta.table_version("bronze.catalog_items", ctx.root) == version + 1

    with pytest.raises(ValueError, match="duplicate keys"):
        delta.upsert_rows(spark, [_catalog_row("d", "x", d2), _catalog_row("d", "y", d2)],
                          "bronze.catalog_items", ctx.root)
    with pytest.raises(ValueError, match=r"non-nullable column\(s\) \['title'\]"):
        delta.upsert_rows(spark, [{**_catalog_row("e", "x", d2), "title": None}], "bronze.catalog_items", ctx.root)
    assert delta.table_version("bronze.catalog_items", ctx.root) == version + 1  # nothing written


def test_spark_merges_and_delta_rs_upserts_racing_into_one_table_all_land(ctx_factory, spark):
    """The two ingests run side by side: one may MERGE through Spark while the other's run record and
    quarantine rows commit through delta-rs, into the same table."""
    import threading

    ctx = ctx_factory()
    day = dt.date(2026, 11, 22)
    delta.upsert_rows(spark, [_catalog_row("seed", "s", day)], "bronze.catalog_items", ctx.root)
    errors = []

    def through_spark() -> None:
        try:
            for k in range(3):
                rows = [_catalog_row(f"spark-{k}-{i}", "t", day) for i in range(5)]
                df = spark.createDataFrame(pa.Table.from_pylist(rows, schema=TABLES["bronze.catalog_items"].schema))
                delta.merge(spark, df, "bronze.catalog_items", ctx.root)
        except Exception as exc:  # pragma: no cover - the assertion below names it
            errors.append(exc)

    def through_delta_rs(w: int) -> None:
        try:
            for k in range(6):
                delta.upsert_rows(spark, [_catalog_row(f"rs-{w}-{k}", "t", day)], "bronze.catalog_items", ctx.root)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=through_spark)] + [
        threading.Thread(target=through_delta_rs, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    keys = set(delta.read_arrow("bronze.catalog_items", ctx.root)["item_id"].to_pylist())
    assert keys == {"seed"} | {f"spark-{k}-{i}" for k in range(3) for i in range(5)} | {
        f"rs-{w}-{k}" for w in range(2) for k in range(6)}
    assert delta.read_spark(spark, "bronze.catalog_items", ctx.root).count() == len(keys)


def test_retention_keeps_time_travel_for_its_days_and_vacuum_removes_only_what_is_older(ctx_factory, spark):
    """delta.apply_retention: the table's log and file retention set to one number of days (idempotent),
    VACUUM deleting only files no version within it needs; at 0 days an older version's files go and the
    current version still reads whole."""
    ctx = ctx_factory()
    name, day = "bronze.catalog_items", dt.date(2026, 11, 22)
    delta.upsert_rows(spark, [_catalog_row("a", "a v1", day), _catalog_row("b", "b v1", day)], name, ctx.root)
    old = delta.table_version(name, ctx.root)
    delta.upsert_rows(spark, [_catalog_row("b", "b v2", day)], name, ctx.root)  # rewrites the file holding b

    def titles(version=None):
        return dict(zip(*delta.read_arrow(name, ctx.root, version=version, columns=["item_id", "title"]).to_pydict()
                        .values(), strict=True))

    # Created with retention.days (30 by default): nothing to set, nothing older than 30 days to delete.
    assert delta.apply_retention(None, name, ctx.root, days=30) == {"properties_set": False, "files_deleted": 0}
    assert titles(old) == {"a": "a v1", "b": "b v1"}  # time travel within the retention still reads
    conf = delta.delta_table(name, ctx.root).metadata().configuration
    assert conf["delta.logRetentionDuration"] == conf["delta.deletedFileRetentionDuration"] == "interval 30 days"

    gone = delta.apply_retention(None, name, ctx.root, days=0)
    assert gone["properties_set"] is True and gone["files_deleted"] >= 1, gone
    assert titles() == {"a": "a v1", "b": "b v2"}
    assert delta.read_spark(spark, name, ctx.root).count() == 2
    with pytest.raises(Exception):  # noqa: B017 - delta-rs or Arrow: the old version's file is gone
        titles(old)
    with pytest.raises(ValueError, match="give 0 or more"):
        delta.apply_retention(None, name, ctx.root, days=-1)


def _small_files(spark, name: str, root: str, rows: list[dict], files: int) -> None:
    """`rows` appended to the table as `files` small files in one commit (what many small commits leave);
    a partitioned table gets one file per partition value."""
    spec = TABLES[name]
    path = delta.ensure_table(spark, spec, root)
    df = spark.createDataFrame(pa.Table.from_pylist(rows, schema=spec.schema))
    df = df.repartition(*spec.partition_by) if spec.partition_by else df.repartition(files)
    df.write.format("delta").mode("append").save(path)


@pytest.mark.parametrize("engine", ["delta-rs", "spark"])
def test_compaction_merges_small_files_keeps_rows_and_history_and_spares_pinned_tables(
    ctx_factory, spark, monkeypatch, engine
):
    """publish's compaction: a table with `min_small_files` small files becomes one file with the same rows,
    the version before it still reads (time travel), a second pass commits nothing; a table with fewer
    small files is left alone, and so are the tables whose versions the codebooks and the diffusion
    checkpoint pin. delta-rs compacts a local lakehouse, Spark's OPTIMIZE any other (s3a://)."""
    from jobs.publish import compact_tables

    if engine == "spark":
        monkeypatch.setattr(delta, "is_local", lambda path: False)
    ctx = ctx_factory(compaction={"min_small_files": 6, "target_mb": 16})
    day = dt.date(2026, 11, 22)
    name = "bronze.catalog_items"
    _small_files(spark, name, ctx.root, [_catalog_row(f"i{k:03d}", f"t{k}", day) for k in range(60)], 8)
    vectors = [{"item_id": f"i{k:03d}", "embedder": "e", "embedding": [0.1 * k, 1.0], "dim": 2, "text_hash": "h",
                "ds": day, "run_id": "r"} for k in range(60)]
    _small_files(spark, "silver.item_embeddings", ctx.root, vectors, 8)
    delta.ensure_table(spark, TABLES["silver.quarantine"], ctx.root)  # no small files: nothing to do
    # Eight days of events, one file per day partition: a lone file per partition has nothing to merge with.
    events = [{"user_id": "u", "item_id": f"i{k:03d}", "event_ts": dt.datetime(2026, 11, 10 + k, 12),
               "event_type": "click", "source": "test", "ds": dt.date(2026, 11, 10 + k), "run_id": "r"}
              for k in range(8)]
    _small_files(spark, "bronze.interactions", ctx.root, events, 8)
    days = delta.table_version("bronze.interactions", ctx.root)
    before = delta.table_version(name, ctx.root)
    pinned = delta.table_version("silver.item_embeddings", ctx.root)
    assert len(delta.delta_table(name, ctx.root).file_uris()) >= 6

    done = compact_tables(ctx)
    assert list(done) == [name] and done[name]["compacted"] and done[name]["files_added"] == 1, done
    assert len(delta.delta_table(name, ctx.root).file_uris()) == 1
    assert delta.table_version(name, ctx.root) == before + 1
    ids = sorted(delta.read_arrow(name, ctx.root, columns=["item_id"])["item_id"].to_pylist())
    assert ids == [f"i{k:03d}" for k in range(60)] == sorted(
        delta.read_arrow(name, ctx.root, version=before, columns=["item_id"])["item_id"].to_pylist())
    assert delta.read_spark(spark, name, ctx.root).count() == 60
    assert delta.table_version("silver.item_embeddings", ctx.root) == pinned  # pinned: left alone
    assert delta.table_version("bronze.interactions", ctx.root) == days
    assert len(delta.delta_table("bronze.interactions", ctx.root).file_uris()) == 8
    assert compact_tables(ctx) == {} and delta.table_version(name, ctx.root) == before + 1  # nothing left to do


def test_a_source_ingested_in_chunks_writes_what_one_chunk_writes(ctx_factory, tmp_path):
    """An amazon-json source streamed in chunks of 4 items (and about 4 events) goes through Parquet
    staging folders under the lakehouse and lands exactly as the same files read as one chunk: the same
    rows, the same quarantine, every row accounted for; the staging folders are gone afterwards and a
    rerun commits nothing."""
    import json
    from pathlib import Path

    folder = tmp_path / "amazon"
    folder.mkdir()
    entries = [(str(i), {"title": f"Item {i}.", "description": "A thing &amp; more.", "brand": "Acme",
                         "categories": "Root,Sub"}) for i in range(21)]
    entries.insert(6, ("2", {"title": "The same id again, two chunks later."}))
    entries.insert(11, ("untitled", {"description": "no title"}))
    (folder / "T.item.json").write_text("{" + ",".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in entries) + "}")
    users = {f"u{k}": [str((k * 7 + j) % 21) for j in range(k % 4 + 1)] for k in range(9)}
    users["u4"].append("untitled")  # an event on a quarantined item
    (folder / "T.inter.json").write_text(json.dumps(users))

    def ingest(root: Path, chunk_rows: int):
        ctx = ctx_factory(ds="2018-03-01", root=root, dataset="amazon-json", data=str(folder),
                          source={"chunk_rows": chunk_rows})
        return ctx, execute("ingest_catalog", ctx), execute("ingest_interactions", ctx)

    def rows(c, name, drop=()):
        t = delta.read_arrow(name, c.root)
        return sorted(({k: v for k, v in r.items() if k not in drop} for r in t.to_pylist()), key=str)

    one_ctx, one, one_events = ingest(tmp_path / "one", 50_000)
    ctx, chunked, events = ingest(tmp_path / "chunked", 4)
    assert one.metrics["chunks_staged"] == 0 and chunked.metrics["chunks_staged"] == 6
    assert (chunked.rows_in, chunked.rows_out, chunked.rows_quarantined) == (one.rows_in, one.rows_out, one.rows_quarantined) == (23, 21, 2)
    assert one_events.metrics["chunks_staged"] == 0 and events.metrics["chunks_staged"] >= 4
    assert (events.rows_in, events.rows_out, events.rows_quarantined) == (one_events.rows_in, one_events.rows_out, one_events.rows_quarantined) == (22, 21, 1)
    assert rows(ctx, "bronze.interactions") == rows(one_ctx, "bronze.interactions")

    assert rows(ctx, "bronze.catalog_items") == rows(one_ctx, "bronze.catalog_items")
    assert rows(ctx, "silver.quarantine") == rows(one_ctx, "silver.quarantine")
    assert not Path(ctx.root, "_staging", "catalog_items").exists()
    assert not Path(ctx.root, "_staging", "interactions").exists()
    version, events_before = delta.table_version("bronze.catalog_items", ctx.root), rows(ctx, "bronze.interactions")
    _, again, again_events = ingest(tmp_path / "chunked", 4)
    assert again.rows_out == 21 and again_events.rows_out == 21
    assert delta.table_version("bronze.catalog_items", ctx.root) == version  # nothing changed: no commit
    assert rows(ctx, "bronze.interactions") == events_before


def test_a_large_format_movielens_release_is_ingested_in_chunks(ctx_factory, tmp_path):
    """An ml-1m-style folder (movies.dat latin-1, ratings.dat, a user coming back after another and
    repeating a rating) streamed in chunks of 2 lands what one chunk lands, every line accounted for."""
    from pathlib import Path

    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "movies.dat").write_bytes("1::Caf\xe9 (1995)::Comedy|Drama\n2::Two (1996)::Action\n3::Broken\n"
                                        "4::Four (1997)::(no genres listed)\n".encode("latin-1"))
    (folder / "ratings.dat").write_text("1::1::5::978300760\n1::2::3::978302109\n2::4::4::978301968\n"
                                        "2::3::4::978301968\n1::4::2::978824291\n1::2::3::978302109\n")

    def ingest(root: Path, chunk_rows: int):
        ctx = ctx_factory(ds="2001-02-01", root=root, dataset="movielens", data=str(folder),
                          source={"chunk_rows": chunk_rows})
        return ctx, execute("ingest_catalog", ctx), execute("ingest_interactions", ctx)

    def rows(c, name, drop=("run_id",)):
        return sorted(({k: v for k, v in r.items() if k not in drop} for r in delta.read_arrow(name, c.root).to_pylist()),
                      key=str)

    one_ctx, one, one_events = ingest(tmp_path / "one", 50_000)
    ctx, chunked, events = ingest(tmp_path / "chunked", 2)
    assert chunked.metrics["chunks_staged"] == 2 and events.metrics["chunks_staged"] >= 2
    assert (chunked.rows_in, chunked.rows_out, chunked.rows_quarantined) == (one.rows_in, one.rows_out, one.rows_quarantined) == (4, 3, 1)
    # 6 ratings: 4 kept, one on the broken movie, one repeated (user 1 came back after user 2)
    assert (events.rows_in, events.rows_out, events.rows_quarantined) == (one_events.rows_in, one_events.rows_out, one_events.rows_quarantined) == (6, 4, 2)
    for name in ("bronze.catalog_items", "bronze.interactions", "silver.quarantine"):
        assert rows(ctx, name) == rows(one_ctx, name), name
    reasons = sorted(r["reason"].split(":")[0] for r in rows(ctx, "silver.quarantine"))
    assert reasons == ["bad_field_type", "duplicate_event", "item_quarantined"]
    titles = {r["item_id"]: r["title"] for r in rows(ctx, "bronze.catalog_items")}
    assert titles == {"1": "Café (1995)", "2": "Two (1996)", "4": "Four (1997)"}


@pytest.mark.parametrize("engine", ["delta-rs", "spark"])
def test_compaction_sorts_a_clustered_table_so_a_lookup_opens_one_file(ctx_factory, spark, monkeypatch, engine):
    """bronze.catalog_items (cluster_by item_id): appends in random id order leave every file spanning the
    whole id range; compaction Z-orders it, after which the files' id ranges do not overlap and a point
    lookup's dataset keeps one file of several (what DuckDB and `make sql` read)."""
    import os
    import random

    from jobs.publish import compact_tables

    if engine == "spark":
        monkeypatch.setattr(delta, "is_local", lambda path: False)
    ctx = ctx_factory(compaction={"min_small_files": 4, "target_mb": 1})
    name = "bronze.catalog_items"
    ids = [f"i{k:05d}" for k in range(20_000)]
    random.Random(3).shuffle(ids)
    day = dt.date(2026, 11, 22)
    rows = [{**_catalog_row(i, "t", day), "description": os.urandom(400).hex()} for i in ids]
    _small_files(spark, name, ctx.root, rows, 40)  # ~16 MB of text in files of a few hundred KB

    def ranges():
        actions = pa.table(delta.delta_table(name, ctx.root).get_add_actions(flatten=True))
        return sorted(zip(actions["min.item_id"].to_pylist(), actions["max.item_id"].to_pylist(), strict=True))

    assert all(lo < "i01000" and hi > "i19000" for lo, hi in ranges())  # every file spans (nearly) everything
    done = compact_tables(ctx)
    assert done[name]["compacted"] and done[name]["sorted_by"] == ["item_id"], done
    after = ranges()
    assert len(after) >= 2 and all(a[1] < b[0] for a, b in zip(after, after[1:], strict=False)), after
    dataset = delta.delta_table(name, ctx.root).to_pyarrow_dataset()
    assert len(list(dataset.get_fragments(filter=pc.field("item_id") == "i01234"))) == 1
    assert dataset.to_table(filter=pc.field("item_id") == "i01234").num_rows == 1
    assert delta.read_spark(spark, name, ctx.root).count() == 20_000
    # A few new rows later (small files holding under a tenth of the bytes): only they are compacted,
    # the sorted files are not rewritten for them.
    _small_files(spark, name, ctx.root, [_catalog_row(f"j{k:02d}", "t", day) for k in range(40)], 4)
    again = compact_tables(ctx)
    assert again[name]["compacted"] and again[name]["sorted_by"] == [] and again[name]["files_removed"] >= 4, again
    now = ranges()
    assert sum(r in now for r in after) >= len(after) - 1  # the sorted files stay (bar a last, small one)
    assert delta.read_spark(spark, name, ctx.root).count() == 20_040
