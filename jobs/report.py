"""Run report: one static HTML page with plots of a pipeline run, read from the Delta tables.

    python -m jobs.report --run-id reaseq_nightly__2026-11-22 [--lakehouse PATH] [--out DIR]

Everything comes from the tables through Arrow (`feature_store.delta.read_arrow`), never Spark: rows
per table, the run's quarantine by reason, stage timings, LLM calls and tokens, knowledge coverage and
per-field confidence, codebook utilization and collisions, the history of runs, a table of tasks and
links to the quality gates' JSON results. The page is plain HTML with inline CSS and PNG plots next to
it (relative links, no JS, no external assets), so the folder can be copied, zipped or served as is.
A plot whose inputs are missing says so in one line instead of failing the report.

Reading is jobs/report_data.py, the plots jobs/report_plots.py, the page the Jinja2 template
jobs/templates/report.html.j2 (autoescaped); this module puts them together and is the command line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import urllib.parse
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from feature_store import delta
from jobs.report_data import NotAvailable, RunData  # noqa: F401  (re-exported for callers and tests)
from jobs.report_plots import PLOTS, SECTIONS, _fmt_int, _fmt_s, _render, _semantic_table, _short  # noqa: F401

TEMPLATES = Path(__file__).resolve().parent / "templates"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#222;margin:0;background:#fafafa}
main{max-width:960px;margin:0 auto;padding:16px 24px 40px;background:#fff}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:17px;margin:28px 0 6px;border-bottom:1px solid #ddd;padding-bottom:3px}
.meta{color:#555;margin:0 0 8px}.meta b{color:#222}
figure{margin:6px 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#444;font-size:13px;margin-top:2px}
.na{color:#666;font-style:italic;background:#f5f5f5;padding:6px 10px;border-left:3px solid #bbb}
table{border-collapse:collapse;font-size:13px;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid #e5e5e5;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.st{padding:1px 6px;border-radius:3px;color:#fff;font-size:12px}
.success{background:#2e7d32}.failed{background:#c62828}.other{background:#f9a825;color:#222}
.err{color:#c62828;font-size:12px}
nav a{margin-right:10px}footer{color:#888;font-size:12px;margin-top:30px}
"""


def _href(target: Path, out_dir: Path) -> str:
    rel = os.path.relpath(target.resolve(), out_dir.resolve())
    return urllib.parse.quote(Path(rel).as_posix())


def validation_dir(data: RunData, reports_dir: Path | None) -> Path | None:
    """Where the quality gates wrote their JSON: the path they recorded, else <reports>/<run_id>/validation."""
    candidates = [Path(p) for t in ("validate_bronze", "validate_gold")
                  if isinstance(p := data.metrics(t).get("report"), str) and "://" not in p]
    if reports_dir is not None:
        candidates.append(Path(reports_dir) / data.run_id / "validation")
    return next((c for c in candidates if c.is_dir()), None)


def _validation(data: RunData, reports_dir: Path | None, out_dir: Path) -> dict:
    """The quality gates' results: per table its verdict and links to the summary and GX JSON."""
    vdir = validation_dir(data, reports_dir)
    tables: dict[str, dict[str, Path]] = {}
    for f in sorted(vdir.glob("*.json")) if vdir else []:
        name, kind = (f.name[: -len(".gx.json")], "gx") if f.name.endswith(".gx.json") else (f.stem, "summary")
        tables.setdefault(name, {})[kind] = f
    rows = []
    for name, kinds in sorted(tables.items()):
        success, verdict = None, "–"
        if "summary" in kinds:
            try:
                s = json.loads(kinds["summary"].read_text())
                failed, evaluated = len(s.get("failed") or []), s.get("evaluated")
                success, verdict = bool(s.get("success")), f"{(evaluated or 0) - failed} of {evaluated} expectations passed"
            except (OSError, ValueError, TypeError, AttributeError):
                verdict = "unreadable"
        links = [(label, _href(kinds[k], out_dir)) for k, label in (("summary", "summary JSON"), ("gx", "GX result JSON"))
                 if k in kinds]
        rows.append({"table": name, "success": success, "verdict": verdict, "links": links})
    return {"dir": str(vdir) if vdir else None, "rows": rows}


def _tasks(data: RunData) -> list[dict]:
    return [{"task": r["task"], "status": r["status"],
             "error": _short(str(err), 300) if (err := data.metrics(r["task"]).get("error")) else None,
             "started": r["started_at"].astimezone(dt.UTC).strftime("%H:%M:%S") if r["started_at"] else "–",
             "time": _fmt_s(r["seconds"]), "rows_in": _fmt_int(r["rows_in"]), "rows_out": _fmt_int(r["rows_out"]),
             "quarantined": _fmt_int(r["rows_quarantined"])} for r in data.tasks]


def build_report(root: str, run_id: str, out_dir: Path, *, reports_dir: Path | str | None = None) -> Path:
    """Write out_dir/index.html and its PNG plots for one run; returns the index path.

    `reports_dir` is where the quality gates' results live (`<reports_dir>/<run_id>/validation/`) when
    the gates' own metrics do not name it; by default the configured `reports` folder.
    """
    t0 = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if reports_dir is None:
        from jobs.config import load_config, resolve_path

        reports_dir = resolve_path(load_config()["reports"])
    for name in PLOTS:
        (out_dir / name).unlink(missing_ok=True)
    data = RunData(root, run_id)
    sections = [_render(title, fn, data, out_dir) for title, fn in SECTIONS]
    t = data.tasks
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=False, lstrip_blocks=False)
    page = env.get_template("report.html.j2").render(
        css=CSS, run_id=run_id, root=root, attempt=data.attempt, runs_error=data.runs_error,
        dataset=next((r["dataset"] for r in t if r.get("dataset")), "?"),
        dag=next((r["dag_id"] for r in t if r.get("dag_id")), "?"),
        ds=next((r["ds"] for r in t if r.get("ds")), None) or "?",
        failed=[r["task"] for r in t if r["status"] != "success"], tasks=_tasks(data),
        stage_time=_fmt_s(sum(r["seconds"] or 0 for r in t)) if t else "–",
        earlier=sorted(r["task"] for r in data.earlier),
        sections=[{"slug": "".join(c if c.isalnum() else "-" for c in s.title.lower()), "title": s.title,
                   "image": s.image, "caption": s.caption, "note": s.note} for s in sections],
        validation=_validation(data, Path(reports_dir), out_dir),
        generated=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), seconds=f"{time.monotonic() - t0:.1f}",
    )
    index = out_dir / "index.html"
    index.write_text(page + "\n", encoding="utf-8")
    return index


# ---------------------------------------------------------------- command line


def latest_run_id(root: str) -> str | None:
    rows = delta.read_arrow("ops.pipeline_runs", root, columns=["run_id", "started_at"]).to_pylist()
    far = dt.datetime.min.replace(tzinfo=dt.UTC)
    return max(rows, key=lambda r: r["started_at"] or far)["run_id"] if rows else None


def main(argv: list[str] | None = None) -> int:
    from jobs.config import load_config, resolve_path

    cfg = load_config()
    p = argparse.ArgumentParser(
        prog="python -m jobs.report",
        description="Build the HTML report of one pipeline run (index.html plus PNG plots) from the Delta "
                    "tables, through Arrow (no Spark).",
    )
    p.add_argument("--run-id", help="lineage run id, e.g. reaseq_nightly__2026-11-22 (default: the run that "
                                     "started last in ops.pipeline_runs)")
    p.add_argument("--lakehouse", default=None,
                   help=f"root of the Delta tables (default: {resolve_path(cfg['lakehouse'])})")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: <reports>/<run_id>/report, next to the run's summary.json)")
    args = p.parse_args(argv)
    root = args.lakehouse or resolve_path(cfg["lakehouse"])
    reports = Path(resolve_path(cfg["reports"]))
    if not delta.exists("ops.pipeline_runs", root):
        print(f"report: no ops.pipeline_runs under {root}: run `make run` first or pass --lakehouse",
              file=sys.stderr)
        return 2
    run_id = args.run_id or latest_run_id(root)
    known = sorted(set(delta.read_arrow("ops.pipeline_runs", root, columns=["run_id"])["run_id"].to_pylist()))
    if run_id not in known:
        print(f"report: run {run_id!r} is not in ops.pipeline_runs under {root}; known runs: "
              f"{', '.join(known[-10:]) or 'none'}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    index = build_report(root, run_id, args.out or reports / run_id / "report", reports_dir=reports)
    print(f"report: {index} ({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
