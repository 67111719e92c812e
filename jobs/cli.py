"""Command line for people: run the nightly refresh through Airflow, print the run summary.

    python -m jobs.cli run [--dataset synthetic|amazon-json|movielens] [--data PATH] [--ds YYYY-MM-DD]
    python -m jobs.cli summary [--run-id ID]

`run` drives real Airflow (`airflow dags test`, SQLite metadata in a private AIRFLOW_HOME) over the
DAGs in dags/, streams the stages' progress lines, then prints each task's state and time, rows per
table and where the tables are. It exits non-zero unless every task succeeded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from jobs.config import PROJECT_ROOT, load_config, resolve_path
from jobs.sources import DATASETS

DAG_ID = "reaseq_nightly"


def airflow_env(home: Path | None = None) -> dict[str, str]:
    home = home or Path(os.environ.get("AIRFLOW_HOME", PROJECT_ROOT / ".airflow"))
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
        "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        "GX_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "NO_PROXY": "*",
        # A person at the terminal wants a failure now, not after Airflow's retry delays.
        "REASEQ_TASK_RETRIES": os.environ.get("REASEQ_TASK_RETRIES", "0"),
    })
    home.mkdir(parents=True, exist_ok=True)
    return env


def airflow_bin() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def ensure_airflow_db(env: dict[str, str]) -> None:
    home = Path(env["AIRFLOW_HOME"])
    stamp = home / ".migrated"
    if not stamp.exists():
        _check([airflow_bin(), "db", "migrate"], env, "airflow db migrate")
        stamp.write_text(dt.datetime.now(dt.UTC).isoformat())
    _check([airflow_bin(), "pools", "set", "llm", "4", "bounds concurrent LLM fan-out tasks"], env, "pool llm")


def _check(cmd: list[str], env: dict[str, str], what: str) -> None:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"{what} failed (exit {p.returncode}):\n{tail}")


# Airflow's structured log lines: "<ts> [level] message [logger] loc=…". Show our stages' lines, the
# workers' progress lines and errors; everything else stays in the log file.
LOG_LINE = re.compile(r"^(?P<ts>\S+)\s+\[(?P<level>\w+)\s*\]\s+(?P<msg>.*?)\s+\[(?P<logger>[\w.]+)\]")
PROGRESS_LINE = re.compile(r"(reason_items partition|embed_items partition|train_quantizer \w+):")


def _console_line(line: str) -> str | None:
    m = LOG_LINE.match(line.strip())
    if m:
        if m["logger"] == "reaseq" or m["level"] in ("error", "critical"):
            ts = m["ts"][11:19]
            return f"{ts} {m['msg']}"
        return None
    if PROGRESS_LINE.search(line):
        return line.strip()
    return None


def run_pipeline(dataset: str, data: str | None, ds: str, quiet: bool = False) -> int:
    if dataset not in DATASETS:
        print(f"unknown DATASET={dataset!r}: choose one of {', '.join(DATASETS)}", file=sys.stderr)
        return 2
    if dataset != "synthetic":
        if not data:
            print(f"DATASET={dataset} needs DATA=<folder with the files>", file=sys.stderr)
            return 2
        if not Path(data).exists():
            print(f"DATA={data}: no such file or folder", file=sys.stderr)
            return 2
        data = str(Path(data).resolve())
    env = airflow_env()
    ensure_airflow_db(env)
    cfg = load_config()
    log_dir = Path(resolve_path(cfg["reports"])) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{DAG_ID}_{ds}_{dataset}.log"
    conf = json.dumps({"dataset": dataset, "data": data or ""})
    cmd = [airflow_bin(), "dags", "test", DAG_ID, ds, "-c", conf]
    print(f"running {DAG_ID} for ds={ds} on dataset={dataset} through Airflow (log: {log_path})", flush=True)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=PROJECT_ROOT)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            shown = None if quiet else _console_line(line)
            if shown:
                print("  " + shown[:300], flush=True)
        rc = proc.wait()
    print(f"airflow dags test exited {rc} after {time.monotonic() - t0:.0f}s", flush=True)
    states = task_states(env, ds)
    run_id = states.get("__run_id__")
    print_summary(run_id, states)
    failed = [t for t, s in states.items() if not t.startswith("__") and s != "success"]
    if rc != 0 or failed or not states:
        print(f"run FAILED: tasks not successful: {', '.join(failed) or '(none recorded)'}; see {log_path}",
              file=sys.stderr)
        return 1
    return 0


def task_states(env: dict[str, str], ds: str) -> dict[str, str]:
    """Ask Airflow's metadata DB for the states of the run just made."""
    code = (
        "import json,sys\n"
        "from airflow.models import DagRun\n"
        "from airflow.utils.session import create_session\n"
        f"runs = DagRun.find(dag_id={DAG_ID!r})\n"
        f"runs = [r for r in runs if r.logical_date and r.logical_date.date().isoformat() == {ds!r}]\n"
        "if not runs: print('{}'); sys.exit(0)\n"
        "r = max(runs, key=lambda r: r.start_date or r.logical_date)\n"
        "with create_session() as s:\n"
        "    tis = {ti.task_id: str(ti.state) for ti in r.get_task_instances(session=s)}\n"
        "tis['__run_id__'] = r.dag_id + '__' + r.logical_date.date().isoformat()\n"
        "tis['__state__'] = str(r.state)\n"
        "print(json.dumps(tis))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        print(f"could not read task states from Airflow: {p.stderr.strip()[-500:]}", file=sys.stderr)
        return {}


def print_summary(run_id: str | None, states: dict[str, str] | None = None) -> None:
    from feature_store import delta
    from jobs.publish import table_counts

    cfg = load_config()
    root = resolve_path(cfg["lakehouse"])
    rows = []
    if run_id and delta.exists("ops.pipeline_runs", root):
        import pyarrow.compute as pc

        rows = delta.read_arrow("ops.pipeline_runs", root, filter=pc.field("run_id") == run_id).to_pylist()
    by_task = {r["task"]: r for r in rows}
    print(f"\nRun {run_id}")
    print(f"{'task':24} {'state':10} {'seconds':>8} {'rows in':>9} {'rows out':>9} {'quarant.':>8}")
    order = [t for t in (states or {}) if not t.startswith("__")] or list(by_task)
    from jobs.runtime import PIPELINE

    order = sorted(order, key=lambda t: PIPELINE.index(t) if t in PIPELINE else 99)
    for t in order:
        r = by_task.get(t, {})
        state = (states or {}).get(t) or r.get("status", "?")
        if states and state not in ("success", "failed"):
            r = {}  # never ran in this run: an older run's record would mislead
        print(f"{t:24} {state:10} {r.get('seconds') or 0:8.1f} {r.get('rows_in') or 0:9d} "
              f"{r.get('rows_out') or 0:9d} {r.get('rows_quarantined') or 0:8d}")
    for t in order:
        if states and states.get(t) != "failed":
            continue
        err = json.loads(by_task.get(t, {}).get("metrics") or "{}").get("error")
        if err:
            print(f"\n{t} failed: {err}")
    print(f"\nTables under {root}")
    for name, info in table_counts(root).items():
        rows_s = "-" if info["rows"] is None else f"{info['rows']:,}"
        ver = "" if info["version"] is None else f"v{info['version']}"
        print(f"  {name:34} {rows_s:>10} {ver:>5}  {info['path']}")
    if run_id:
        report = Path(resolve_path(cfg["reports"])) / run_id
        index = report / "report" / "index.html"
        if index.exists():
            # Rebuilt now so the report also shows publish's own record.
            from jobs.report import build_report

            try:
                build_report(root, run_id, index.parent, reports_dir=Path(resolve_path(cfg["reports"])))
            except Exception as exc:  # the report is a view; a failure here must not fail the run
                print(f"(could not refresh the report: {exc})", file=sys.stderr)
        print(f"\nRun summary: {report / 'summary.json'}")
        print(f"Feature report: {index if index.exists() else '(not written: publish did not run)'}")
        print(f"Validation results: {report / 'validation'}/")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the nightly refresh through Airflow and print the summary")
    r.add_argument("--dataset", default=os.environ.get("DATASET", "synthetic"), help=f"one of {', '.join(DATASETS)}")
    r.add_argument("--data", default=os.environ.get("DATA") or None, help="dataset folder (amazon-json, movielens)")
    r.add_argument("--ds", default=dt.datetime.now(dt.UTC).date().isoformat(), help="logical date YYYY-MM-DD")
    r.add_argument("--quiet", action="store_true", help="print only the summary")
    s = sub.add_parser("summary", help="print the summary of a run already made")
    s.add_argument("--run-id", required=True)
    args = p.parse_args(argv)
    if args.cmd == "run":
        try:
            dt.date.fromisoformat(args.ds)
        except ValueError:
            print(f"--ds {args.ds!r} is not a date: use YYYY-MM-DD", file=sys.stderr)
            return 2
        return run_pipeline(args.dataset, args.data, args.ds, args.quiet)
    print_summary(args.run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
