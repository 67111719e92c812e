"""feature_store.sql: DuckDB over small Delta tables written with deltalake (no Spark, no JVM)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from feature_store import catalog, delta
from feature_store import sql as fsql

ROOT = Path(__file__).resolve().parent.parent
DAY = dt.date(2026, 11, 22)


def _items(ids: list[str], price: float = 10.0) -> pa.Table:
    n = len(ids)
    cols = {
        "item_id": ids,
        "title": [f"title {i}" for i in ids],
        "categories": [["outdoor", "tents"]] * n,
        "price": [price] * n,
        "attributes": [[("color", "red")]] * n,
        "content_hash": [f"h-{i}" for i in ids],
        "source": ["synthetic"] * n,
        "first_seen_ds": [DAY] * n,
        "last_seen_ds": [DAY] * n,
        "ds": [DAY] * n,
        "run_id": ["test__2026-11-22"] * n,
    }
    schema = catalog.CATALOG_ITEMS.schema
    return pa.Table.from_pydict({f.name: cols.get(f.name, [None] * n) for f in schema}, schema=schema)


def _events(rows: list[tuple[str, str, int]]) -> pa.Table:
    ts = [dt.datetime(2026, 11, 20 + d, 12, tzinfo=dt.UTC) for _, _, d in rows]
    cols = {
        "user_id": [u for u, _, _ in rows],
        "item_id": [i for _, i, _ in rows],
        "event_ts": ts,
        "event_type": ["view"] * len(rows),
        "rating": [None] * len(rows),
        "source": ["synthetic"] * len(rows),
        "ds": [t.date() for t in ts],
        "run_id": ["test__2026-11-22"] * len(rows),
    }
    return pa.Table.from_pydict(cols, schema=catalog.INTERACTIONS.schema)


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("lakehouse"))
    items = delta.table_path("bronze.catalog_items", root)
    write_deltalake(items, _items(["a", "b", "c"]))  # version 0: 3 rows
    write_deltalake(items, _items(["d"], price=99.0), mode="append")  # version 1: 4 rows
    write_deltalake(
        delta.table_path("bronze.interactions", root),
        _events([("u1", "a", 0), ("u1", "b", 1), ("u2", "a", 1), ("u2", "d", 2)]),
        partition_by=["ds"],
    )
    return root


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "feature_store.sql", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, input=stdin, timeout=60,
    )


# ---------------------------------------------------------------- Python API


def test_query_by_layer_table_name(lake):
    t = fsql.query("SELECT item_id FROM bronze.catalog_items ORDER BY item_id", root=lake)
    assert isinstance(t, pa.Table)
    assert t.column("item_id").to_pylist() == ["a", "b", "c", "d"]
    # bare names resolve through the search path (table names are unique across layers)
    n = fsql.query("SELECT count(*) AS n FROM catalog_items", root=lake)
    assert n.column("n").to_pylist() == [4]


def test_join_across_tables_and_partitioned_table(lake):
    t = fsql.query(
        """
        SELECT e.user_id, count(*) AS n, sum(c.price) AS spend
        FROM bronze.interactions e JOIN bronze.catalog_items c USING (item_id)
        GROUP BY e.user_id ORDER BY e.user_id
        """,
        root=lake,
    )
    assert t.to_pylist() == [{"user_id": "u1", "n": 2, "spend": 20.0}, {"user_id": "u2", "n": 2, "spend": 109.0}]
    days = fsql.query("SELECT DISTINCT ds FROM bronze.interactions ORDER BY ds", root=lake)
    assert days.column("ds").to_pylist() == [dt.date(2026, 11, 20), dt.date(2026, 11, 21), dt.date(2026, 11, 22)]


def test_time_travel(lake):
    sql = "SELECT count(*) AS n, max(price) AS top FROM bronze.catalog_items"
    assert fsql.query(sql, root=lake, versions={"bronze.catalog_items": 0}).to_pylist() == [{"n": 3, "top": 10.0}]
    assert fsql.query(sql, root=lake, versions={"bronze.catalog_items": 1}).to_pylist() == [{"n": 4, "top": 99.0}]
    with pytest.raises(fsql.SqlError, match=r"no readable version 7 \(latest is 1\)"):
        fsql.query(sql, root=lake, versions={"bronze.catalog_items": 7})
    with pytest.raises(ValueError, match="not a catalog table"):
        fsql.query(sql, root=lake, versions={"bronze.nope": 0})


def test_errors_are_one_line(lake):
    with pytest.raises(fsql.SqlError) as e:
        fsql.query("SELECT * FROM silver.nope", root=lake)
    assert str(e.value) == "unknown table silver.nope; known tables: bronze.catalog_items, bronze.interactions"
    with pytest.raises(fsql.SqlError, match=r"unknown table bronze\.catalog_item;"):
        fsql.query("SELECT * FROM bronze.catalog_item", root=lake)
    with pytest.raises(fsql.SqlError, match=r"gold\.user_features has not been written yet.*run `make run` first"):
        fsql.query("SELECT * FROM gold.user_features", root=lake)
    with pytest.raises(fsql.SqlError, match="syntax error") as e:
        fsql.query("SELEC 1", root=lake)
    assert "\n" not in str(e.value)


def test_empty_lakehouse_says_make_run(tmp_path):
    with pytest.raises(fsql.SqlError, match="run `make run` first"):
        fsql.query("SELECT * FROM some_table", root=str(tmp_path))
    rows = fsql.list_tables(str(tmp_path))
    assert [r["table"] for r in rows] == list(catalog.TABLES)
    assert all(r["rows"] is None for r in rows)


def test_list_tables(lake):
    rows = {r["table"]: r for r in fsql.list_tables(lake)}
    assert rows["bronze.catalog_items"] | {"description": None} == {
        "table": "bronze.catalog_items", "rows": 4, "version": 1, "versions": 2, "description": None,
    }
    assert rows["bronze.interactions"]["rows"] == 4
    assert rows["silver.item_knowledge"]["rows"] is None
    assert rows["bronze.catalog_items"]["description"] == catalog.CATALOG_ITEMS.description
    pinned = {r["table"]: r for r in fsql.list_tables(lake, {"bronze.catalog_items": 0})}
    assert (pinned["bronze.catalog_items"]["rows"], pinned["bronze.catalog_items"]["version"]) == (3, 0)


def test_main_in_process_formats_and_limit(lake, capsys):
    assert fsql.main(["--lakehouse", lake, "--limit", "2", "SELECT item_id, price FROM catalog_items ORDER BY 1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["item_id", "price"]
    assert out[2].split() == ["a", "10.0"] and out[3].split() == ["b", "10.0"]
    assert out[-1] == "(2 of 4 rows; --limit N shows more, --limit 0 all)"

    assert fsql.main(["--lakehouse", lake, "--format", "csv", "--limit", "0",
                      "SELECT item_id, categories, attributes FROM catalog_items ORDER BY 1"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["item_id"] for r in rows] == ["a", "b", "c", "d"]
    assert json.loads(rows[0]["categories"]) == ["outdoor", "tents"]
    assert json.loads(rows[0]["attributes"]) == {"color": "red"}

    assert fsql.main(["--lakehouse", lake, "--format", "json", "--limit", "3",
                      "SELECT item_id, ds, attributes FROM catalog_items ORDER BY 1"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out) == [{"item_id": i, "ds": "2026-11-22", "attributes": {"color": "red"}} for i in "abc"]
    assert "printed 3 of 4 rows" in cap.err


def test_cell_formatting():
    t = pa.table({"s": ["x" * 100, None, "two\nlines"], "n": [1, 22, None]})
    lines = fsql.format_table(t).splitlines()
    assert lines[2].startswith("x" * 59 + "…")
    assert lines[3].split() == ["NULL", "22"]
    assert lines[4].split() == ["two⏎lines", "NULL"]
    assert lines[2].endswith(" 1")  # numbers right-aligned


# ---------------------------------------------------------------- CLI in a subprocess


def test_cli_query_with_time_travel(lake):
    r = _cli("--lakehouse", lake, "--version", "bronze.catalog_items=0",
             "SELECT item_id, title FROM bronze.catalog_items ORDER BY item_id")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["item_id", "title"]
    assert [ln.split()[0] for ln in lines[2:-1]] == ["a", "b", "c"]  # version 0: before "d" was appended
    assert lines[2].split() == ["a", "title", "a"]
    assert lines[-1] == "(3 rows)"


def test_cli_unknown_table_exit_1(lake):
    r = _cli("--lakehouse", lake, "SELECT * FROM gold.nope")
    assert r.returncode == 1
    assert r.stderr.strip() == "error: unknown table gold.nope; known tables: bronze.catalog_items, bronze.interactions"
    assert r.stdout == "" and "Traceback" not in r.stderr


def test_cli_list(lake):
    r = _cli("--lakehouse", lake, "--list")
    assert r.returncode == 0, r.stderr
    lines = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines()[2:-1]}
    assert lines["bronze.catalog_items"][1:4] == ["4", "1", "2"]
    assert lines["bronze.interactions"][1:4] == ["4", "0", "1"]
    assert lines["gold.user_features"][1:5] == ["-", "-", "-", "(not"]
    assert r.stdout.splitlines()[-1] == f"(2 of {len(catalog.TABLES)} tables written under {lake})"


def test_cli_usage_errors_exit_2(lake):
    r = _cli("--lakehouse", lake, "--version", "bronze.catalog_items=x", "SELECT 1")
    assert r.returncode == 2 and "version must be an integer" in r.stderr
    r = _cli("--help")
    assert r.returncode == 0 and "--version LAYER.TABLE=N" in r.stdout and "--engine" in r.stdout


# ---------------------------------------------------------------- CLI in process (same main(), faster)


def test_main_bad_input_exit_codes(lake, capsys):
    assert fsql.main(["--lakehouse", lake, "SELECT FROM WHERE"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Parser Error: syntax error") and len(err.strip().splitlines()) == 1
    assert fsql.main(["--lakehouse", lake, "SELECT * FROM silver.quarantine"]) == 1
    assert "silver.quarantine has not been written yet" in capsys.readouterr().err
    assert fsql.main(["--lakehouse", lake, "--version", "bronze.catalog_items=5", "SELECT 1"]) == 1
    assert capsys.readouterr().err.strip() == "error: bronze.catalog_items has no readable version 5 (latest is 1)"
    for argv in ([], ["--version", "bronze.nope=1", "SELECT 1"], ["--limit", "-1", "SELECT 1"], ["--list", "SELECT 1"]):
        with pytest.raises(SystemExit) as e:
            fsql.main(["--lakehouse", lake, *argv])
        assert e.value.code == 2, argv
    assert "give a SQL query" in capsys.readouterr().err


def test_main_reads_sql_from_stdin(lake, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("SELECT count(*) AS n FROM bronze.interactions"))
    assert fsql.main(["--lakehouse", lake, "--format", "csv", "-"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "4"]


def test_the_spark_engine_answers_like_duckdb(lake, spark):
    # `--engine spark`: the same names (views over the Delta paths), the same time travel, the same
    # one-line errors; the session is the test session's (get_spark reuses the active one).
    queries = [
        "SELECT item_id FROM bronze.catalog_items ORDER BY item_id",
        """SELECT e.user_id, count(*) AS n, sum(c.price) AS spend
           FROM bronze.interactions e JOIN bronze.catalog_items c USING (item_id)
           GROUP BY e.user_id ORDER BY e.user_id""",
    ]
    for sql in queries:
        assert fsql.query(sql, root=lake, engine="spark").to_pylist() == fsql.query(sql, root=lake).to_pylist()
    sql = "SELECT count(*) AS n, max(price) AS top FROM bronze.catalog_items"
    pinned = fsql.query(sql, root=lake, versions={"bronze.catalog_items": 0}, engine="spark").to_pylist()
    assert pinned == [{"n": 3, "top": 10.0}]
    head, total = fsql.query_head("SELECT * FROM bronze.interactions", root=lake, engine="spark", limit=2)
    assert head.num_rows == 2 and total is None
    with pytest.raises(fsql.SqlError) as e:
        fsql.query("SELECT * FROM silver.nope", root=lake, engine="spark")
    assert "silver.nope" in str(e.value) and "\n" not in str(e.value)

