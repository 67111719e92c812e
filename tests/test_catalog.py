"""The table catalog: every DESIGN.md table is there, keys are in the schemas, Spark accepts them,
and the generated docs/tables.md is in sync; a MERGE that loses a commit race is merged again."""

from __future__ import annotations

import pyarrow as pa
import pytest

from feature_store import catalog, docs

DESIGN_TABLES = {
    "bronze.catalog_items",
    "bronze.interactions",
    "silver.item_knowledge",
    "silver.item_embeddings",
    "silver.quarantine",
    "gold.item_semantic_ids",
    "gold.user_sequences",
    "gold.user_augmented_behaviors",
    "gold.user_features",
    "ops.pipeline_runs",
    "ops.training_runs",
    "ops.llm_attempts",  # not in DESIGN.md: the dead-letter counters of reason_items (docs/agents.md)
}


def test_every_design_table_is_in_the_catalog():
    assert set(catalog.TABLES) == DESIGN_TABLES


def test_keys_and_lineage_columns():
    for spec in catalog.TABLES.values():
        names = spec.schema.names
        assert all(k in names for k in spec.key), spec.name
        assert "ds" in names, spec.name
        for k in spec.key:
            assert not spec.schema.field(k).nullable, f"{spec.name}.{k} is a key and must be non-null"
    assert catalog.INTERACTIONS.partition_by == ("ds",)
    for name in ("silver.item_knowledge",):
        spec = catalog.get(name)
        assert {"prompt_version", "model"} <= set(spec.key)


def test_spark_schema_conversion_keeps_types():
    from feature_store.delta import spark_schema

    s = spark_schema(catalog.ITEM_KNOWLEDGE)
    assert s["attributes"].dataType.simpleString() == "map<string,string>"
    assert s["category_path"].dataType.simpleString() == "array<string>"
    s = spark_schema(catalog.USER_SEQUENCES)
    assert s["semantic_ids"].dataType.simpleString() == "array<array<int>>"


def test_unknown_table_error_lists_known_tables():
    try:
        catalog.get("gold.nope")
    except KeyError as e:
        assert "gold.user_features" in str(e)
    else:
        raise AssertionError("expected KeyError")


def test_docs_are_in_sync_with_the_catalog():
    assert docs.DOC.read_text() == docs.render(), "run `python -m feature_store.docs`"
    assert isinstance(catalog.CATALOG_ITEMS.schema, pa.Schema)


def test_a_commit_that_loses_a_race_is_merged_again_and_a_lasting_conflict_is_raised(monkeypatch):
    from feature_store import delta

    calls = []

    def flaky(*args):
        calls.append(args[2])
        if len(calls) < 3:
            raise RuntimeError("[DELTA_CONCURRENT_APPEND] io.delta.exceptions.ConcurrentAppendException: files "
                               "were added to the root of the table by a concurrent update")
        return {"version": 7}

    monkeypatch.setattr(delta, "_merge_once", flaky)
    monkeypatch.setattr("time.sleep", lambda s: None)
    assert delta.merge(None, None, "silver.quarantine") == {"version": 7} and len(calls) == 3

    def always(*args):
        raise RuntimeError("io.delta.exceptions.ConcurrentAppendException: again")

    monkeypatch.setattr(delta, "_merge_once", always)
    with pytest.raises(RuntimeError, match="ConcurrentAppendException"):
        delta.merge(None, None, "silver.quarantine")

    def other(*args):
        raise ValueError("silver.quarantine: source has duplicate keys")

    monkeypatch.setattr(delta, "_merge_once", other)
    with pytest.raises(ValueError, match="duplicate keys"):  # not a conflict: raised at once
        delta.merge(None, None, "silver.quarantine")
