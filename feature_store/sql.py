"""SQL for analysts: query the lakehouse's Delta tables by their `layer.table` names.

The default engine is DuckDB in this process (no JVM): every catalog table that has been written is
a view `layer.table` over the Arrow dataset of its Delta snapshot (`deltalake`), so queries stream
and only read the columns and files they need. `--version layer.table=N` pins a table to a Delta
version (time travel). Bare table names work too (`FROM catalog_items`): table names are unique
across layers. `--engine spark` runs the same SQL on a local Spark session instead (needs the setup
`make setup` does: a JDK 17 and Delta's jars).

Examples:

  python -m feature_store.sql --list
  python -m feature_store.sql "SELECT status, count(*) FROM ops.pipeline_runs GROUP BY ALL"
  python -m feature_store.sql --version bronze.catalog_items=0 "SELECT count(*) FROM bronze.catalog_items"
  python -m feature_store.sql --format csv --limit 0 "SELECT * FROM gold.user_features" > users.csv
  echo "SELECT 1" | python -m feature_store.sql -

Python:

  from feature_store.sql import query
  t = query("SELECT * FROM gold.user_sequences LIMIT 10", versions={"gold.user_sequences": 3})
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import decimal
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from feature_store import delta
from feature_store.catalog import TABLES

LAYERS = ("bronze", "silver", "gold", "ops")
ENGINES = ("duckdb", "spark")
FORMATS = ("table", "csv", "json")
MAX_CELL = 60  # characters of one cell in the text table; longer values end in "…"


class SqlError(Exception):
    """A user-facing failure: bad SQL, an unknown or unwritten table, a missing version. One line."""


# ---------------------------------------------------------------- tables and versions


def _root(root: str | None) -> str:
    return root or delta.default_root()


def _check_versions(versions: Mapping[str, int] | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, v in (versions or {}).items():
        if name not in TABLES:
            raise ValueError(f"cannot pin {name!r}: not a catalog table; known tables: {', '.join(sorted(TABLES))}")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"version of {name} must be an integer >= 0, not {v!r}")
        out[name] = v
    return out


def parse_version(text: str) -> tuple[str, int]:
    """`layer.table=N` -> (name, N); raises ValueError with a readable message."""
    name, sep, num = text.partition("=")
    name, num = name.strip(), num.strip()
    if not sep or not name or not num:
        raise ValueError(f"expected layer.table=N, got {text!r}")
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r} in {text!r}; known tables: {', '.join(sorted(TABLES))}")
    if not num.isdigit():
        raise ValueError(f"version must be an integer >= 0, got {num!r} in {text!r}")
    return name, int(num)


def _open(name: str, root: str | None, version: int | None):
    """The table's DeltaTable at `version` (latest when None), or SqlError saying what is wrong."""
    from deltalake import DeltaTable

    path = delta.table_path(name, root)
    if not delta.exists(name, root):
        raise SqlError(f"{name} has not been written yet (no Delta table at {path}): run `make run` first")
    try:
        return DeltaTable(path, version=version)
    except Exception as e:  # deltalake raises DeltaError subclasses with multi-line messages
        if version is not None:
            try:
                latest = DeltaTable(path).version()
            except Exception:  # pragma: no cover - the table vanished between the two reads
                latest = None
            hint = f" (latest is {latest})" if latest is not None else ""
            raise SqlError(f"{name} has no readable version {version}{hint}") from e
        raise SqlError(f"cannot read {name} at {path}: {_first_line(str(e))}") from e


def written_tables(root: str | None = None) -> list[str]:
    """Catalog tables that exist under the lakehouse root, in catalog order."""
    return [name for name in TABLES if delta.exists(name, _root(root))]


def list_tables(root: str | None = None, versions: Mapping[str, int] | None = None) -> list[dict]:
    """One dict per catalog table: name, rows, version (latest or pinned), versions (commits), description."""
    root = _root(root)
    versions = _check_versions(versions)
    out = []
    for name, spec in TABLES.items():
        row = {"table": name, "rows": None, "version": None, "versions": None, "description": spec.description}
        if delta.exists(name, root):
            latest = _open(name, root, None)
            t = latest if name not in versions else _open(name, root, versions[name])
            row["rows"] = t.to_pyarrow_dataset().count_rows()
            row["version"] = t.version()
            row["versions"] = len(latest.history())
        out.append(row)
    return out


# ---------------------------------------------------------------- DuckDB engine (default)


def connect(root: str | None = None, versions: Mapping[str, int] | None = None):
    """A DuckDB connection where every written catalog table is the view `layer.table`.

    Pinned `versions` ({"bronze.catalog_items": 3}) read that Delta version; a pin on a table that
    has not been written raises SqlError. Close the connection when done.
    """
    import duckdb

    root = _root(root)
    versions = _check_versions(versions)
    for name in versions:
        if not delta.exists(name, root):
            raise SqlError(f"cannot pin {name}: it has not been written yet under {root}: run `make run` first")
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")  # the pipeline's timestamps are UTC; show them so
        for layer in LAYERS:
            con.execute(f'CREATE SCHEMA IF NOT EXISTS "{layer}"')
        for name, spec in TABLES.items():
            if not delta.exists(name, root):
                continue
            dataset = _open(name, root, versions.get(name)).to_pyarrow_dataset()
            hidden = f"_delta_{spec.layer}_{spec.table}"
            con.register(hidden, dataset)
            con.execute(f'CREATE VIEW "{spec.layer}"."{spec.table}" AS SELECT * FROM "{hidden}"')
        # Bare table names resolve too: the catalog's table names are unique across layers.
        con.execute(f"SET search_path = '{','.join(('main', *LAYERS))}'")
    except BaseException:
        con.close()
        raise
    return con


def _duckdb_relation(con, sql: str, root: str):
    import duckdb

    try:
        return con.sql(sql)
    except duckdb.Error as e:
        raise _duckdb_error(e, con, sql, root) from None


def _duckdb_error(e: Exception, con, sql: str, root: str) -> SqlError:
    import duckdb

    msg = str(e)
    if isinstance(e, duckdb.CatalogException):
        m = re.search(r'Table with name "?(.+?)"? does not exist', msg)
        if m:
            ref = m.group(1)
            if "." not in ref:  # DuckDB drops the schema when the schema exists: find it in the SQL
                try:
                    refs = [r.split(" AS ")[0] for r in con.get_table_names(sql, qualified=True)]
                except duckdb.Error:
                    refs = []
                ref = next((r for r in refs if r.lower().split(".")[-1] == ref.lower()), ref)
            return SqlError(unknown_table_message(ref, root))
    return SqlError(_one_line(msg))


def unknown_table_message(ref: str, root: str | None = None) -> str:
    """Say why `ref` is not queryable: a catalog table not written yet, or not a table at all."""
    root = _root(root)
    ref = ref.replace("`", "").replace('"', "").strip()
    parts = ref.lower().split(".")
    candidates = [n for n in TABLES if n == ".".join(parts[-2:]) or (len(parts) == 1 and n.split(".")[1] == parts[0])]
    if len(candidates) == 1:
        name = candidates[0]
        return f"{name} has not been written yet (no Delta table at {delta.table_path(name, root)}): run `make run` first"
    written = written_tables(root)
    if not written:
        return f"unknown table {ref}; no table has been written under {root} yet: run `make run` first"
    return f"unknown table {ref}; known tables: {', '.join(written)}"


def _duckdb_head(sql: str, root: str, versions: Mapping[str, int] | None, limit: int) -> tuple[pa.Table, int]:
    """The first `limit` rows (all when 0) and the total row count, streaming the rest without keeping it."""
    import duckdb

    con = connect(root, versions)
    try:
        rel = _duckdb_relation(con, sql, root)
        if rel is None:  # a statement with no result (SET, CREATE ...)
            return pa.table({}), 0
        try:
            reader = rel.to_arrow_reader()
            kept, n = [], 0
            for batch in reader:
                if not limit or n < limit:
                    kept.append(batch if not limit else batch.slice(0, limit - n))
                n += batch.num_rows
            head = pa.Table.from_batches(kept, schema=reader.schema)
        except duckdb.Error as e:
            raise _duckdb_error(e, con, sql, root) from None
        return head, n
    finally:
        con.close()


# ---------------------------------------------------------------- Spark engine (optional)


def _spark_session():
    """The process's Spark session (Delta configured), or SqlError saying the setup is missing."""
    setup = "the spark engine needs the setup `make setup` does (pyspark, a JDK 17, Delta's jars cached)"
    try:
        from pyspark.sql import SparkSession

        from feature_store.spark import delta_conf, delta_session
    except ImportError as e:
        raise SqlError(f"{setup}: {e}; or use --engine duckdb") from None
    try:
        conf = delta_conf(app_name="reaseq-sql")
        if SparkSession.getActiveSession() is None:
            # A private warehouse folder, so CREATE DATABASE leaves no spark-warehouse/ in the cwd.
            conf["spark.sql.warehouse.dir"] = tempfile.mkdtemp(prefix="reaseq-sql-warehouse-")
        return delta_session(conf)
    except Exception as e:  # jars not cached (RuntimeError), no Java (PySparkRuntimeError), ...
        raise SqlError(f"{setup}: {_first_line(str(e))}; or use --engine duckdb") from None


def _spark_register(spark, root: str, versions: Mapping[str, int]) -> None:
    """Databases bronze/silver/gold/ops with one view per written table over its Delta path.

    Views (CREATE OR REPLACE) rather than CREATE TABLE ... LOCATION: they carry a pinned version
    (`VERSION AS OF`) and are replaced when the same session queries another lakehouse root.
    """
    from pyspark.errors import PySparkException

    for name in versions:
        if not delta.exists(name, root):
            raise SqlError(f"cannot pin {name}: it has not been written yet under {root}: run `make run` first")
    for layer in LAYERS:
        spark.sql(f"CREATE DATABASE IF NOT EXISTS `{layer}`")
    for name, spec in TABLES.items():
        ident = f"`{spec.layer}`.`{spec.table}`"
        if not delta.exists(name, root):
            try:
                spark.sql(f"DROP VIEW IF EXISTS {ident}")  # left by an earlier root in this session
            except PySparkException:
                pass
            continue
        path = delta.table_path(name, root)
        if "://" not in path:
            path = os.path.abspath(path)  # Spark would resolve a relative path against its own cwd
        path = path.replace("`", "``")
        source = f"delta.`{path}`"
        if name in versions:
            _open(name, root, versions[name])  # a clear error for a version that does not exist
            source += f" VERSION AS OF {int(versions[name])}"
        spark.sql(f"CREATE OR REPLACE VIEW {ident} AS SELECT * FROM {source}")


def _spark_error(e: Exception, root: str) -> SqlError:
    cond = ""
    for getter in ("getCondition", "getErrorClass"):
        if hasattr(e, getter):
            try:
                cond = getattr(e, getter)() or ""
            except Exception:  # pragma: no cover - older/newer pyspark without the method
                cond = ""
            if cond:
                break
    if cond.startswith("TABLE_OR_VIEW_NOT_FOUND"):
        ref = None
        try:
            ref = (e.getMessageParameters() or {}).get("relationName")
        except Exception:  # pragma: no cover
            ref = None
        if not ref:
            m = re.search(r"table or view (\S+) cannot be found", str(e))
            ref = m.group(1) if m else "?"
        return SqlError(unknown_table_message(ref, root))
    return SqlError(_one_line(str(e)))


def _spark_dataframe(sql: str, root: str, versions: Mapping[str, int]):
    spark = _spark_session()  # first: a clear message when pyspark or the setup is missing
    from pyspark.errors import PySparkException

    try:
        _spark_register(spark, root, versions)
        return spark.sql(sql)
    except PySparkException as e:
        raise _spark_error(e, root) from None


def _spark_collect(df, root: str) -> pa.Table:
    from pyspark.errors import PySparkException

    try:
        return df.toArrow()
    except PySparkException as e:
        raise _spark_error(e, root) from None


# ---------------------------------------------------------------- Python API


def query(
    sql: str,
    root: str | None = None,
    versions: Mapping[str, int] | None = None,
    engine: str = "duckdb",
) -> pa.Table:
    """Run `sql` over the lakehouse's tables (named `layer.table`) and return the result as Arrow.

    `versions` pins tables to Delta versions: {"bronze.catalog_items": 0}. Raises SqlError with a
    one-line message on bad SQL, an unknown or unwritten table, or a version that does not exist.
    """
    root = _root(root)
    versions = _check_versions(versions)
    if engine == "duckdb":
        import duckdb

        con = connect(root, versions)
        try:
            rel = _duckdb_relation(con, sql, root)
            if rel is None:
                return pa.table({})
            try:
                return rel.to_arrow_table()
            except duckdb.Error as e:
                raise _duckdb_error(e, con, sql, root) from None
        finally:
            con.close()
    if engine == "spark":
        return _spark_collect(_spark_dataframe(sql, root, versions), root)
    raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


def query_head(
    sql: str,
    root: str | None = None,
    versions: Mapping[str, int] | None = None,
    engine: str = "duckdb",
    limit: int = 50,
) -> tuple[pa.Table, int | None]:
    """The first `limit` rows (0: all) and the total number of rows (None when the engine cannot tell cheaply)."""
    root = _root(root)
    versions = _check_versions(versions)
    if engine == "duckdb":
        return _duckdb_head(sql, root, versions, limit)
    if engine == "spark":
        df = _spark_dataframe(sql, root, versions)
        if not limit:
            t = _spark_collect(df, root)
            return t, t.num_rows
        t = _spark_collect(df.limit(limit + 1), root)
        if t.num_rows <= limit:
            return t, t.num_rows
        return t.slice(0, limit), None
    raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


# ---------------------------------------------------------------- output


def _first_line(msg: str) -> str:
    return next((ln.strip() for ln in msg.splitlines() if ln.strip()), msg.strip())


def _one_line(msg: str) -> str:
    """An engine's message on one line: its first line, plus DuckDB's 'Did you mean' / candidates hint."""
    first = _first_line(msg)
    hint = re.search(r"((?:Did you mean|Candidate bindings:) [^\n]*)", msg)
    if hint and hint.group(1) not in first:
        first = f"{first} {hint.group(1)}"
    return first


def _pyvalues(column: pa.ChunkedArray) -> list:
    return column.to_pylist(maps_as_pydicts="lossy")


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return str(v)
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, bytes):
        return v.hex()
    return v


def _text(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, str):
        return v
    if isinstance(v, dict | list | tuple):
        return json.dumps(_jsonable(v), ensure_ascii=False, default=str)
    if isinstance(v, dt.datetime):
        return v.isoformat(sep=" ")
    if isinstance(v, bytes):
        return "\\x" + v.hex()
    return str(v)


def _cell(v: Any, width: int = MAX_CELL) -> str:
    s = _text(v).replace("\r\n", "⏎").replace("\n", "⏎").replace("\t", " ")
    return s if len(s) <= width else s[: width - 1] + "…"


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def align(names: list[str], cols: list[list[str]], right: list[bool]) -> str:
    """Text cells as an aligned table: header, dashes, one line per row; `right` columns right-aligned."""
    widths = [max([len(n), *(len(c) for c in col)]) for n, col in zip(names, cols, strict=True)]

    def line(cells: Iterable[str]) -> str:
        return "  ".join(
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        ).rstrip()

    out = [line(names), line("-" * w for w in widths)]
    out += [line(row) for row in zip(*cols, strict=True)]
    return "\n".join(out)


def format_table(table: pa.Table) -> str:
    """An Arrow table as aligned text; NULL for nulls, nested values as JSON, long cells cut with "…"."""
    if not table.column_names:
        return ""
    cols = [[_cell(v) for v in _pyvalues(table.column(i))] for i in range(table.num_columns)]
    return align(table.column_names, cols, [_numeric(f.type) for f in table.schema])


def write_csv(table: pa.Table, out) -> None:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(table.column_names)
    cols = [_pyvalues(table.column(i)) for i in range(table.num_columns)]
    for row in zip(*cols, strict=True):
        w.writerow("" if v is None else _text(v) for v in row)


def write_json(table: pa.Table, out) -> None:
    """A JSON array with one object per row, one row per line."""
    names = table.column_names
    cols = [_pyvalues(table.column(i)) for i in range(table.num_columns)]
    rows = [json.dumps(dict(zip(names, map(_jsonable, r), strict=True)), ensure_ascii=False) for r in zip(*cols, strict=True)]
    out.write("[\n" + ",\n".join(rows) + "\n]\n" if rows else "[]\n")


def _emit(table: pa.Table, total: int | None, fmt: str) -> None:
    shown = table.num_rows
    more = total is None or total > shown
    if fmt == "csv":
        write_csv(table, sys.stdout)
    elif fmt == "json":
        write_json(table, sys.stdout)
    else:
        text = format_table(table)
        if text:
            print(text)
        if not table.column_names:
            print("OK")
        elif more:
            of = f"{total:,}" if total is not None else "more"
            print(f"({shown:,} of {of} rows; --limit N shows more, --limit 0 all)")
        else:
            print(f"({shown:,} row{'' if shown == 1 else 's'})")
        return
    if more:
        of = f"{total:,}" if total is not None else "more"
        print(f"note: printed {shown:,} of {of} rows (--limit 0 prints all)", file=sys.stderr)


def _emit_list(rows: list[dict], fmt: str, root: str) -> None:
    if fmt == "json":
        json.dump(rows, sys.stdout, indent=1)
        print()
        return
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [("table", pa.string()), ("rows", pa.int64()), ("version", pa.int64()),
             ("versions", pa.int64()), ("description", pa.string())]
        ),
    )
    if fmt == "csv":
        write_csv(table, sys.stdout)
        return

    def dash(v) -> str:
        return "-" if v is None else f"{v:,}"

    cols = [
        [r["table"] for r in rows],
        [dash(r["rows"]) for r in rows],
        [dash(r["version"]) for r in rows],
        [dash(r["versions"]) for r in rows],
        [r["description"] if r["rows"] is not None else f"(not written yet) {r['description']}" for r in rows],
    ]
    print(align(table.column_names, cols, [False, True, True, True, False]))
    written = sum(r["rows"] is not None for r in rows)
    print(f"({written} of {len(rows)} tables written under {root})")
    if not written:
        print(f"note: no table has been written under {root}: run `make run` first", file=sys.stderr)


# ---------------------------------------------------------------- CLI


def _version_arg(text: str) -> tuple[str, int]:
    try:
        return parse_version(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _limit_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m feature_store.sql",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1].split("\nPython:")[0].rstrip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sql", nargs="?", help="the query; tables are named layer.table (`-` reads it from stdin)")
    p.add_argument("--list", action="store_true", help="list the tables with rows, Delta version, versions and description")
    p.add_argument("--engine", choices=ENGINES, default="duckdb",
                   help="duckdb (default, in-process, no JVM) or spark (a local Spark session; needs `make setup`)")
    p.add_argument("--lakehouse", metavar="PATH", default=None,
                   help=f"lakehouse root (default: $REASEQ_LAKEHOUSE or {delta.default_root()})")
    p.add_argument("--version", dest="versions", metavar="LAYER.TABLE=N", type=_version_arg, action="append",
                   default=[], help="read that table at Delta version N (time travel); repeatable")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    p.add_argument("--limit", type=_limit_arg, default=50, metavar="N",
                   help="print at most N rows (default 50; 0 prints all)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.list and args.sql:
        p.error("give either a query or --list, not both")
    if not args.list and not args.sql:
        p.error("give a SQL query (or --list to see the tables)")
    versions: dict[str, int] = {}
    for name, v in args.versions:
        if name in versions and versions[name] != v:
            p.error(f"--version {name} given twice ({versions[name]} and {v})")
        versions[name] = v
    root = _root(args.lakehouse)
    try:
        if args.list:
            _emit_list(list_tables(root, versions), args.format, root)
            return 0
        sql = sys.stdin.read() if args.sql == "-" else args.sql
        if not sql.strip():
            p.error("the query is empty")
        if args.engine == "spark":
            print("engine spark: starting a local Spark session (needs `make setup`: a JDK 17 and Delta's jars)…",
                  file=sys.stderr)
        table, total = query_head(sql, root, versions, args.engine, args.limit)
        _emit(table, total, args.format)
        sys.stdout.flush()
        return 0
    except SqlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... | head`: the reader left; keep the interpreter's final flush quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
