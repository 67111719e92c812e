"""Command line for people: run the nightly refresh through Airflow, print the run summary.

    python -m jobs.cli run [--dataset synthetic|amazon-json|movielens] [--data PATH] [--ds YYYY-MM-DD]
    python -m jobs.cli backfill --start YYYY-MM-DD --end YYYY-MM-DD [--dataset ...] [--data PATH]
    python -m jobs.cli airflow [--host 127.0.0.1] [--port 8080]
    python -m jobs.cli summary [--run-id ID]
    python -m jobs.cli requeue-llm (--item ID [ID ...] | --all | --list) [--lakehouse PATH]

`run` drives real Airflow (`airflow dags test`, SQLite metadata in a private AIRFLOW_HOME) over the
DAGs in dags/, streams the stages' progress lines, then prints each task's state and time, rows per
table and where the tables are. It exits non-zero unless every task succeeded.

`backfill` replays the days START..END (inclusive, oldest first) through the same `airflow dags test`
path, one day after the other, and stops at the first failed day. Every write is a MERGE on the key and
a day's interactions replace exactly that day, so replaying a range twice leaves the same tables.
Airflow 3's own `airflow backfill create` only records a backfill: a running scheduler (and the API
server its task runners report to) executes it, which `airflow` (make airflow) starts.

`requeue-llm` resets the failure counters of dead-lettered items (ops.llm_attempts), so the next
reason_items run sends them to the LLM again; see jobs/dead_letter.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import difflib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from jobs.airflow_server import airflow_bin, airflow_env, ensure_airflow_db, serve
from jobs.config import PROJECT_ROOT, ConfigError, load_config, load_settings, resolve_path
from jobs.sources import DATASETS
from jobs.stages import PIPELINE

DAG_ID = "reaseq_nightly"


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


def _check_dataset(dataset: str, data: str | None) -> tuple[str | None, str | None]:
    """(error message, resolved data path)."""
    if dataset not in DATASETS:
        return f"unknown DATASET={dataset!r}: choose one of {', '.join(DATASETS)}", None
    if dataset != "synthetic":
        if not data:
            return f"DATASET={dataset} needs DATA=<folder with the files>", None
        if not Path(data).exists():
            return f"DATA={data}: no such file or folder", None
        data = str(Path(data).resolve())
    return None, data


def _check_master(master: str | None) -> str | None:
    """An error message when a --spark-master is given but is no standalone master that answers."""
    if not master:
        return None
    from urllib.parse import urlsplit

    u = urlsplit(master)
    if u.scheme != "spark" or not u.hostname or not u.port:
        return f"SPARK_MASTER={master!r}: give a standalone master URL, spark://HOST:PORT"
    import socket

    with socket.socket() as s:
        s.settimeout(3)
        if s.connect_ex((u.hostname, u.port)) != 0:
            return f"no Spark master answers at {master}: start one with `make cluster-up`, or drop SPARK_MASTER"
    return None


def submit_env(env: dict[str, str], master: str | None) -> dict[str, str]:
    """With a master, every task spark-submits its stage there through the SparkSubmitOperator."""
    if not master:
        return env
    from urllib.parse import urlsplit

    from jobs.submit import CONN_ENV, connection_uri

    venv_bin = str(Path(sys.executable).parent)  # the provider's hook runs `spark-submit` from PATH
    env = {**env, "REASEQ__AIRFLOW__SUBMIT": "spark-submit", CONN_ENV: connection_uri(master),
           "PATH": os.pathsep.join([venv_bin, env.get("PATH", "")])}
    if urlsplit(master).hostname in ("127.0.0.1", "localhost"):
        env["SPARK_LOCAL_IP"] = "127.0.0.1"  # the driver must listen where a loopback cluster can reach it
    return env


def _prepare(dataset: str, data: str | None, master: str | None,
             err: str | None = None) -> tuple[dict[str, str] | None, str | None]:
    """Check every argument before anything is written (no Airflow DB, no log folder, no table); then
    the Airflow environment with its DB migrated. (None, _) after printing the one-line error."""
    if not err:
        err, data = _check_dataset(dataset, data)
    err = err or _check_master(master)
    if err:
        print(err, file=sys.stderr)
        return None, data
    env = submit_env(airflow_env(), master)
    ensure_airflow_db(env, pools=False)  # `airflow dags test` runs every task itself, pools unused
    return env, data


ENGINE_TASKS = ("llm_engine_up", "llm_engine_down")  # the DAG's setup/teardown around the LLM stages
LLM_STAGES = ("reason_items", "infer_beyond_log")


def check_tasks(tasks: list[str] | None) -> tuple[list[str] | None, str | None]:
    """The stages named by --tasks in pipeline order, or one line saying which name is not a stage."""
    if not tasks:
        return None, None
    names = [t.strip() for item in tasks for t in item.split(",") if t.strip()]
    for name in names:
        if name not in PIPELINE:
            near = difflib.get_close_matches(name, PIPELINE, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            return None, f"--tasks: {name!r} is not a stage of {DAG_ID}{hint}; stages: {', '.join(PIPELINE)}"
    return sorted(set(names), key=PIPELINE.index), None


def skip_pattern(only: list[str] | None) -> str | None:
    """Airflow's --mark-success-pattern for a run of some stages only: every other task id (the LLM
    engine's setup and teardown too, unless an LLM stage runs) is marked successful without running."""
    if not only:
        return None
    keep = list(only) + (list(ENGINE_TASKS) if set(only) & set(LLM_STAGES) else [])
    return "(?!(?:" + "|".join(re.escape(t) for t in keep) + ")$).*"


def run_pipeline(dataset: str, data: str | None, ds: str, quiet: bool = False, master: str | None = None,
                 only: list[str] | None = None) -> int:
    env, data = _prepare(dataset, data, master)
    if env is None:
        return 2
    rc, states, log_path, _ = _dags_test(env, dataset, data, ds, quiet, skip=skip_pattern(only))
    run_id = states.get("__run_id__")
    if only:
        # Marked successful by Airflow without running: say so rather than "success".
        states = {t: ("not run" if t in PIPELINE and t not in only else s) for t, s in states.items()}
    print_summary(run_id, states)
    failed = [t for t, s in states.items() if not t.startswith("__") and s not in ("success", "not run")]
    if rc != 0 or failed or not states:
        print(f"run FAILED: tasks not successful: {', '.join(failed) or '(none recorded)'}; see {log_path}",
              file=sys.stderr)
        return 1
    return 0


def _dags_test(env: dict[str, str], dataset: str, data: str | None, ds: str,
               quiet: bool, skip: str | None = None) -> tuple[int, dict[str, str], Path, float]:
    """One `airflow dags test` of the nightly DAG for one day: (exit code, task states, log, seconds)."""
    cfg = load_config()
    log_dir = Path(resolve_path(cfg["reports"])) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{DAG_ID}_{ds}_{dataset}.log"
    conf = json.dumps({"dataset": dataset, "data": data or ""})
    cmd = [airflow_bin(), "dags", "test", DAG_ID, ds, "-c", conf] + (["--mark-success-pattern", skip] if skip else [])
    # The failure callback (jobs.callbacks) names this file and `make run DS=…` as the next step.
    env = {**env, "REASEQ_RUN_LOG": str(log_path)}
    print(f"running {DAG_ID} for ds={ds} on dataset={dataset} through Airflow (log: {log_path})", flush=True)
    t0 = time.monotonic()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    cwd=PROJECT_ROOT)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                shown = None if quiet else _console_line(line)
                if shown:
                    # The failure callback's line is the one to read in full; other lines are capped.
                    print("  " + (shown if " FAILED " in f" {shown} " else shown[:300]), flush=True)
            rc = proc.wait()
    finally:
        # The DAG's teardown task stops the engine it started; when `airflow dags test` itself dies
        # (Ctrl-C, a kill) the teardown never runs, so the launcher stops that run's engine too.
        _stop_run_engine(f"{DAG_ID}__{ds}")
    seconds = time.monotonic() - t0
    print(f"airflow dags test exited {rc} after {seconds:.0f}s", flush=True)
    return rc, task_states(env, ds), log_path, seconds


def _parse_day(value: str | None, flag: str) -> tuple[dt.date | None, str | None]:
    if not value:
        return None, f"backfill needs START=YYYY-MM-DD and END=YYYY-MM-DD ({flag} missing)"
    try:
        return dt.date.fromisoformat(value), None
    except ValueError:
        return None, f"{flag} {value!r} is not a date: use YYYY-MM-DD"


def backfill_days(start: str | None, end: str | None,
                  today: dt.date | None = None) -> tuple[list[str], str | None]:
    """The days START..END inclusive, or one message saying why the range is refused."""
    first, err = _parse_day(start, "START")
    if err:
        return [], err
    last, err = _parse_day(end, "END")
    if err:
        return [], err
    assert first is not None and last is not None
    if last < first:
        return [], f"END {last} is before START {first}"
    today = today or dt.datetime.now(dt.UTC).date()
    if last > today:
        return [], f"END {last} is in the future (today is {today} UTC): a day can be replayed once it has begun"
    return [(first + dt.timedelta(days=i)).isoformat() for i in range((last - first).days + 1)], None


def run_backfill(start: str | None, end: str | None, dataset: str, data: str | None, quiet: bool = False,
                 master: str | None = None) -> int:
    days, err = backfill_days(start, end)
    env, data = _prepare(dataset, data, master, err)
    if env is None:
        return 2
    n = len(days)
    print(f"backfill of {DAG_ID} on dataset={dataset}: {n} day{'s' * (n != 1)}, {days[0]} .. {days[-1]}", flush=True)
    results: list[dict] = []
    t_all = time.monotonic()
    for k, ds in enumerate(days, 1):
        print(f"\n=== day {k} of {n}: ds={ds}", flush=True)
        rc, states, log_path, seconds = _dags_test(env, dataset, data, ds, quiet)
        tasks = {t: s for t, s in states.items() if not t.startswith("__")}
        failed = [t for t, s in tasks.items() if s == "failed"] or [t for t, s in tasks.items() if s != "success"]
        ok = rc == 0 and bool(tasks) and not failed
        results.append({"ds": ds, "ok": ok, "seconds": seconds, "tasks": tasks, "failed": failed,
                        "log": log_path, "run_id": states.get("__run_id__")})
        if not ok:
            break
    _print_backfill(results, days, time.monotonic() - t_all)
    bad = next((r for r in results if not r["ok"]), None)
    if bad:
        k = days.index(bad["ds"]) + 1
        first_failed = next((t for t in _ordered(bad["tasks"]) if t in bad["failed"]), None)
        task = first_failed or "(no task state recorded)"
        rest = days[k:]
        print(f"backfill FAILED on day {bad['ds']} (day {k} of {n}) at task {task}; see {bad['log']}"
              + (f"; not run: {rest[0]}{f' .. {rest[-1]}' if len(rest) > 1 else ''} (resume with START={bad['ds']})"
               if rest else ""),
              file=sys.stderr)
        return 1
    return 0


def _stop_run_engine(run_id: str) -> None:
    from jobs.llm_engine_tasks import owner_of
    from llm_agents import local_engine

    if local_engine.down(owner=owner_of(run_id)):
        print("stopped the local LLM engine the interrupted run had started", file=sys.stderr, flush=True)


def _task_order(task: str) -> float:
    """Pipeline order, the LLM engine's setup just before the stages that use it and its teardown after."""
    if task in PIPELINE:
        return PIPELINE.index(task)
    return {"llm_engine_up": PIPELINE.index(LLM_STAGES[0]) - 0.5,
            "llm_engine_down": PIPELINE.index(LLM_STAGES[-1]) + 0.5}.get(task, 99)


def _ordered(tasks) -> list[str]:
    return sorted(tasks, key=_task_order)


def _print_backfill(results: list[dict], days: list[str], seconds: float) -> None:
    done = {r["ds"]: r for r in results}
    print(f"\nBackfill of {DAG_ID}: {sum(r['ok'] for r in results)} of {len(days)} days succeeded "
          f"in {seconds:.0f}s")
    print(f"{'ds':12} {'result':8} {'seconds':>8} {'tasks ok':>9}  failed task")
    for ds in days:
        r = done.get(ds)
        if r is None:
            print(f"{ds:12} {'not run':8} {'':>8} {'':>9}  -")
            continue
        n_ok = sum(s == "success" for s in r["tasks"].values())
        failed = ", ".join(t for t in _ordered(r["tasks"]) if t in r["failed"]) or "-"
        print(f"{ds:12} {'ok' if r['ok'] else 'FAILED':8} {r['seconds']:8.0f} {n_ok:>4}/{len(r['tasks']):<4}  {failed}")
    print_tables()


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
    order = _ordered(order)
    for t in order:
        r = by_task.get(t, {})
        state = (states or {}).get(t) or r.get("status", "?")
        if states and state not in ("success", "failed"):
            r = {}  # never ran in this run: an older run's record would mislead
        print(f"{t:24} {state:10} {r.get('seconds') or 0:8.1f} {r.get('rows_in') or 0:9d} "
              f"{r.get('rows_out') or 0:9d} {r.get('rows_quarantined') or 0:8d}")
    reasoned = by_task.get("reason_items", {})
    line = reason_items_line(json.loads(reasoned.get("metrics") or "{}")) \
        if reasoned.get("status") == "success" and (not states or states.get("reason_items") == "success") else None
    if line:
        print(f"\n{line}")
    skipped = json.loads(by_task.get("reason_items", {}).get("metrics") or "{}").get("dead_lettered_skipped")
    if skipped:
        print(f"\nreason_items skipped {skipped} dead-lettered item(s) (quarantined as dead_letter): "
              "python -m jobs.cli requeue-llm --list, then --item ID or --all once the cause is fixed")
    for t in order:
        if states and states.get(t) != "failed":
            continue
        err = json.loads(by_task.get(t, {}).get("metrics") or "{}").get("error")
        if err:
            print(f"\n{t} failed: {err}")
    print_tables(root)
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


def _n(count: int, what: str) -> str:
    return f"{count:,} {what}{'' if count == 1 else 's'}"


def reason_items_line(m: dict) -> str | None:
    """One line on what reason_items did with the LLM's time: answered, failed, the backlog and the budget.

    E.g. "reason_items: 24 items answered by Qwen/Qwen3-8B, 2,976 wait in the backlog (budget 24 items)".
    None for a record without the counts (a failed stage, or one written before they existed).
    """
    if "work_set" not in m or "model" not in m:
        return None
    model = str(m["model"])
    heuristic = model.startswith("offline-")
    answered = int(m.get("answered", m.get("ok", 0)) or 0)
    failed = int(m.get("failed") or 0)
    backlog = int(m.get("backlog") or 0)
    who = f"the offline heuristic ({model}, no LLM: the budget does not apply)" if heuristic else model
    parts = [f"reason_items: {_n(answered, 'item')} answered by {who}"]
    if failed:
        parts.append(f"{failed:,} failed (quarantined; the next run retries them)")
    parts.append(f"{backlog:,} wait in the backlog" if backlog else "the backlog is empty")
    caps = [c for c in (m.get("budget_items") and _n(int(m["budget_items"]), "item"),
                        m.get("budget_minutes") and f"{float(m['budget_minutes']):g} minutes") if c]
    tail = ""
    if caps:
        tail = f" (budget {' and '.join(caps)}" + ("; time ran out" if m.get("budget_stop") == "minutes" else "") + ")"
    return ", ".join(parts) + tail


def print_tables(root: str | None = None) -> None:
    from jobs.publish import table_counts

    root = root or resolve_path(load_config()["lakehouse"])
    print(f"\nTables under {root}")
    for name, info in table_counts(root).items():
        rows_s = "-" if info["rows"] is None else f"{info['rows']:,}"
        ver = "" if info["version"] is None else f"v{info['version']}"
        print(f"  {name:34} {rows_s:>10} {ver:>5}  {info['path']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the nightly refresh through Airflow and print the summary")
    r.add_argument("--dataset", default=os.environ.get("DATASET", "synthetic"), help=f"one of {', '.join(DATASETS)}")
    r.add_argument("--data", default=os.environ.get("DATA") or None, help="dataset folder (amazon-json, movielens)")
    r.add_argument("--ds", default=dt.datetime.now(dt.UTC).date().isoformat(), help="logical date YYYY-MM-DD")
    r.add_argument("--quiet", action="store_true", help="print only the summary")
    r.add_argument("--spark-master", default=os.environ.get("SPARK_MASTER") or None,
                   help="spark://HOST:PORT: every task spark-submits its stage to this standalone cluster "
                   "(make cluster-up starts one) instead of running it in-process on local Spark")
    r.add_argument("--tasks", nargs="+", action="extend", metavar="STAGE",
                   help="run only these stages (comma- or space-separated, e.g. reason_items,embed_items) on "
                   "the tables as they are; Airflow marks the other tasks successful without running them "
                   "(its --mark-success-pattern), and the summary lists them as 'not run'")
    b = sub.add_parser("backfill", help="replay a date range through Airflow, day by day (idempotent)",
                       description="Replay the days START..END (inclusive, oldest first) through Airflow, one "
                       "`airflow dags test` per day, and stop at the first failed day. Reruns are idempotent: "
                       "every write is a MERGE on the key and a day's interactions replace exactly that day.")
    b.add_argument("--start", help="first logical date YYYY-MM-DD")
    b.add_argument("--end", help="last logical date YYYY-MM-DD (not after today, UTC)")
    b.add_argument("--dataset", default=os.environ.get("DATASET", "synthetic"), help=f"one of {', '.join(DATASETS)}")
    b.add_argument("--data", default=os.environ.get("DATA") or None, help="dataset folder (amazon-json, movielens)")
    b.add_argument("--quiet", action="store_true", help="print only the progress lines and the summary")
    b.add_argument("--spark-master", default=os.environ.get("SPARK_MASTER") or None,
                   help="spark://HOST:PORT: submit every stage to this standalone cluster (as for run)")
    a = sub.add_parser("airflow", help="start Airflow (API server + UI, scheduler, DAG processor) on SQLite",
                       description="Start real Airflow in the foreground: API server (UI and REST), scheduler and "
                       "DAG processor on SQLite in the private AIRFLOW_HOME, with this project's DAGs; print how "
                       "to log in once healthy. Ctrl-C stops every process started.")
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, default=int(os.environ.get("AIRFLOW_PORT", "8080")))
    s = sub.add_parser("summary", help="print the summary of a run already made")
    s.add_argument("--run-id", required=True)
    q = sub.add_parser("requeue-llm", help="let dead-lettered items reach the LLM again (reset their failure counters)",
                       description="Reset the failed-attempt counters in ops.llm_attempts, so the next reason_items "
                       "run sends the items to the LLM again. An item is dead-lettered (skipped, quarantined as "
                       "dead_letter) once llm.dead_letter_after attempts of its content, prompt version and model "
                       "failed. Exit 0: done or nothing to do; 1: a named item has no failed attempts (nothing "
                       "changed); 2: bad arguments.")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--item", nargs="+", action="extend", metavar="ID", help="the item ids to requeue")
    what.add_argument("--all", action="store_true", help="requeue every item with failed attempts")
    what.add_argument("--list", action="store_true", help="list the items with failed attempts; change nothing")
    q.add_argument("--lakehouse", help="root of the Delta tables (default: the configured lakehouse)")
    args = p.parse_args(argv)
    try:  # a misspelt or mistyped setting stops here, in one line, before Airflow or Spark starts
        load_settings()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "run":
        try:
            dt.date.fromisoformat(args.ds)
        except ValueError:
            print(f"--ds {args.ds!r} is not a date: use YYYY-MM-DD", file=sys.stderr)
            return 2
        only, err = check_tasks(args.tasks or [os.environ.get("TASKS", "")])
        if err:
            print(err, file=sys.stderr)
            return 2
        return run_pipeline(args.dataset, args.data, args.ds, args.quiet, args.spark_master, only)
    if args.cmd == "backfill":
        return run_backfill(args.start, args.end, args.dataset, args.data, args.quiet, args.spark_master)
    if args.cmd == "airflow":
        return serve(args.host, args.port)
    if args.cmd == "requeue-llm":
        from jobs import dead_letter

        settings = load_settings()
        return dead_letter.main(resolve_path(args.lakehouse or settings.lakehouse), args.item, args.all, args.list,
                                settings.llm.dead_letter_after)
    print_summary(args.run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
