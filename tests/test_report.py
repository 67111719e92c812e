"""The run report (jobs/report.py): built from small Delta tables written with deltalake, no Spark.

Checks that the page references only PNGs that exist and decode, that missing or unreadable tables
leave a note instead of an error, and (when Chromium is installed) that a headless browser loads the
page and every image over HTTP.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import shutil
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pytest

from feature_store import delta
from feature_store.catalog import get
from jobs import report

RUN = "reaseq_nightly__2026-11-22"
PREV = "reaseq_nightly__2026-11-21"
DS = dt.date(2026, 11, 22)
T0 = dt.datetime(2026, 11, 22, 2, 0, tzinfo=dt.UTC)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or "")
                 if p and Path(p).exists()), None)

QUALITY = {
    "rq_method": "rq_kmeans", "rq_levels": 3, "rq_codebook_size": 4, "n_items": 4,
    "rq_utilization": [0.5, 0.5, 0.75], "rq_perplexity": [2.0, 2.0, 2.8],
    "rq_collision_rate_nearest": 0.5, "rq_collision_rate": 0.5,
    "mpq_experts": 2, "mpq_codebook_size": 4, "mpq_utilization": [1.0, 0.75], "mpq_perplexity": [3.9, 2.9],
    "mpq_tuple_unique_rate_nearest": 0.75, "mpq_tuple_unique_share": 1.0,
}


def write(root: Path, name: str, rows: list[dict]) -> None:
    spec = get(name)
    table = pa.Table.from_pylist(rows, schema=spec.schema)
    from deltalake import write_deltalake

    write_deltalake(delta.table_path(name, str(root)), table, partition_by=list(spec.partition_by) or None)


def task(run_id: str, name: str, minute: int, seconds: float, status: str = "success", metrics: dict | None = None,
         rows: tuple[int, int, int] = (4, 4, 0)) -> dict:
    start = T0 + dt.timedelta(days=-1 if run_id == PREV else 0, minutes=minute)
    return {
        "run_id": run_id, "task": name, "dag_id": "reaseq_nightly", "dataset": "synthetic", "status": status,
        "started_at": start, "ended_at": start + dt.timedelta(seconds=seconds), "seconds": seconds,
        "rows_in": rows[0], "rows_out": rows[1], "rows_quarantined": rows[2],
        "metrics": json.dumps(metrics or {}), "ds": DS - dt.timedelta(days=1 if run_id == PREV else 0),
    }


def pipeline_runs(validation: Path) -> list[dict]:
    return [
        task(PREV, "ingest_catalog", 0, 30.0),
        task(PREV, "reason_items", 1, 90.0, metrics={"llm_calls": 40, "work_set": 10}),
        # Deliberately out of start order: the report orders by started_at.
        task(RUN, "reason_items", 2, 12.5, metrics={
            "llm_calls": 16, "tokens_in": 8000, "tokens_out": 1500, "work_set": 4, "catalog": 4,
            "model": "m1", "prompt_version": "pv2"}),
        task(RUN, "ingest_catalog", 0, 3.0, rows=(5, 4, 1)),
        task(RUN, "validate_bronze", 1, 2.0, metrics={"report": str(validation)}),
        task(RUN, "train_quantizer", 3, 4.0, metrics={"codebook_version": "cb-1", "quality": QUALITY}),
        task(RUN, "assign_semantic_ids", 4, 1.0, metrics={"codebook_version": "cb-1", "quality": QUALITY}),
        task(RUN, "build_user_features", 5, 0.5, status="failed",
             metrics={"error": "StageFailed: boom <b>not bold</b>"}, rows=(0, 0, 0)),
    ]


def item(i: int, h: str) -> dict:
    return {"item_id": f"i{i}", "title": f"item {i}", "description": None, "categories": ["a", "b"],
            "brand": None, "price": 1.0, "attributes": [], "content_hash": h, "source": "synthetic",
            "first_seen_ds": DS, "last_seen_ds": DS, "ds": DS, "run_id": RUN}


def knowledge(i: int, h: str, pv: str, confidence: dict[str, float]) -> dict:
    return {"item_id": f"i{i}", "content_hash": h, "prompt_version": pv, "model": "m1",
            "field_confidence": list(confidence.items()), "status": "ok", "ds": DS, "run_id": RUN,
            "tokens_in": 2000, "tokens_out": 400, "llm_calls": 4}


def quarantine(key: str, reason: str, run_id: str) -> dict:
    return {"source_table": "bronze.catalog_items", "key": key, "stage": "ingest", "reason": reason,
            "payload": "{}", "ds": DS, "run_id": run_id}


def sids(i: int, version: str, rq: list[int], mpq: list[int]) -> dict:
    return {"item_id": f"i{i}", "codebook_version": version, "rq_codes": rq, "mpq_tokens": mpq,
            "embedder": "e", "ds": DS, "run_id": RUN}


def make_lakehouse(base: Path) -> tuple[str, Path]:
    root = base / "lakehouse"
    validation = base / "reports" / RUN / "validation"
    validation.mkdir(parents=True)
    (validation / "bronze.catalog_items.json").write_text(
        json.dumps({"table": "bronze.catalog_items", "success": True, "evaluated": 9, "failed": []}))
    (validation / "bronze.catalog_items.gx.json").write_text(json.dumps({"success": True}))
    write(root, "ops.pipeline_runs", pipeline_runs(validation))
    write(root, "silver.quarantine", [quarantine("x1", "missing_title", RUN),
                                      quarantine("x2", "duplicate_item_id: x2 seen before", RUN),
                                      quarantine("x3", "missing_title", PREV)])
    write(root, "bronze.catalog_items", [item(1, "h1"), item(2, "h2"), item(3, "h3"), item(4, "h4")])
    write(root, "silver.item_knowledge", [
        knowledge(1, "h1", "pv2", {"category_path": 1.0, "audiences": 0.67}),
        knowledge(2, "h2", "pv2", {"category_path": 1.0, "audiences": 1.0, "attributes.brand": 0.67}),
        knowledge(3, "h3-old", "pv2", {"category_path": 0.67}),  # knowledge for older content only
        knowledge(4, "h4", "pv1", {"category_path": 1.0}),  # an older prompt version: not counted
    ])
    write(root, "gold.item_semantic_ids", [
        sids(1, "cb-1", [0, 1, 2, 0], [0, 1]), sids(2, "cb-1", [0, 1, 3, 0], [1, 0]),
        sids(3, "cb-1", [1, 0, 0, 0], [2, 2]), sids(4, "cb-1", [1, 0, 0, 1], [3, 1]),
        sids(1, "cb-0", [3, 3, 3, 0], [0, 0]),  # an older codebook: ignored
    ])
    return str(root), base / "reports"


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        elif tag == "a" and not a.get("href", "#").startswith("#"):
            self.links.append(a["href"])


def parse(index: Path) -> Page:
    p = Page()
    p.feed(index.read_text(encoding="utf-8"))
    return p


def assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 50, (path, im.size)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    root, reports = make_lakehouse(base)
    out = reports / RUN / "report"
    index = report.build_report(root, RUN, out, reports_dir=reports)
    return base, out, index


def test_report_references_only_valid_pngs(built):
    _, out, index = built
    assert index == out / "index.html" and index.exists()
    page = parse(index)
    assert sorted(page.images) == sorted(report.PLOTS)  # every plot has its data here, history included
    for src in page.images:
        assert "/" not in src and "://" not in src, src  # next to index.html, relative
        assert_png(out / src)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(page.images)


def test_report_content(built):
    _, out, index = built
    text = index.read_text(encoding="utf-8")
    for name in ("ingest_catalog", "validate_bronze", "reason_items", "train_quantizer", "assign_semantic_ids",
                 "build_user_features"):
        assert f"<td>{name}" in text
    assert "ingest_interactions" not in text  # not part of this run
    assert text.index("<td>ingest_catalog") < text.index("<td>validate_bronze") < text.index("<td>reason_items")
    assert "StageFailed: boom &lt;b&gt;not bold&lt;/b&gt;" in text  # escaped
    assert "2 rows quarantined in this run" in text
    assert "16 LLM calls" in text and "8,000 tokens in, 1,500 out" in text
    assert "2 of 4 current items (50.0%)" in text and "1 only for older content, 1 none" in text
    assert "Codebook cb-1 (rq_kmeans, 3×4, MPQ 2×4), 4 items" in text
    assert "2 runs in ops.pipeline_runs" in text
    assert "<script" not in text and "http://" not in text and "https://" not in text
    links = parse(index).links
    assert links == ["../validation/bronze.catalog_items.json", "../validation/bronze.catalog_items.gx.json"]
    assert all((out / link).resolve().is_file() for link in links)
    assert "9 of 9 expectations passed" in text


def test_semantic_table_counts_current_codebook(built):
    base, _, _ = built
    data = report.RunData(str(base / "lakehouse"), RUN)
    version, tab = report._semantic_table(data, "cb-1")
    assert version == "cb-1" and tab["n"] == 4
    assert tab["rq_distinct"] == [2, 2, 3, 2] and tab["mpq_distinct"] == [4, 3]


def test_missing_lakehouse_renders_notes(tmp_path):
    index = report.build_report(str(tmp_path / "nothing"), RUN, tmp_path / "out", reports_dir=tmp_path)
    text = index.read_text(encoding="utf-8")
    assert parse(index).images == []
    assert text.count("Not available") >= 6
    assert "ops.pipeline_runs has not been written yet" in text
    assert "Quarantine by reason" in text and "nothing was ever quarantined" in text


def test_partial_and_unreadable_tables(tmp_path):
    root = tmp_path / "lakehouse"
    write(root, "ops.pipeline_runs", [
        task(RUN, "reason_items", 0, 5.0, metrics={"llm_calls": 3, "work_set": 1}),  # no token counts
        task(RUN, "train_quantizer", 1, 2.0, metrics={}),  # no quality metrics
    ])
    broken = Path(delta.table_path("silver.item_knowledge", str(root)), "_delta_log")
    broken.mkdir(parents=True)  # looks like a table, is not one
    (broken / "00000000000000000000.json").write_text("not json\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "history.png").write_bytes(b"stale")  # from an earlier build: removed
    index = report.build_report(str(root), RUN, out, reports_dir=tmp_path)
    page = parse(index)
    assert sorted(page.images) == ["llm.png", "rows_per_table.png", "stage_timings.png"]
    for src in page.images:
        assert_png(out / src)
    assert not (out / "history.png").exists()
    text = index.read_text(encoding="utf-8")
    assert "bronze.catalog_items has not been written yet" in text
    assert "silver.item_knowledge (unreadable)" in text
    assert "Skipped: ops.pipeline_runs holds a single run" in text
    assert "No validation results" in text


def test_a_second_attempt_of_the_day_is_reported_alone(tmp_path):
    """A good run, then a failed `make run` of another dataset the same day: one run id, two attempts. The
    report is the failed attempt's (its state, its timings); the earlier attempt's records are named, not mixed."""
    root = tmp_path / "lakehouse"
    good = [task(RUN, name, minute, 60.0, metrics={"airflow_run_id": "manual__good"})
            for minute, name in enumerate(("ingest_catalog", "ingest_interactions", "validate_bronze", "publish"))]
    failed = task(RUN, "ingest_catalog", 57, 3.0, status="failed",
                  metrics={"airflow_run_id": "manual__broken", "error": "SourceError: amazon-json: not JSON"})
    write(root, "ops.pipeline_runs", [failed] + good[1:])  # the MERGE on (run_id, task) replaced ingest_catalog's row
    data = report.RunData(str(root), RUN)
    assert data.attempt == "manual__broken" and [r["task"] for r in data.tasks] == ["ingest_catalog"]
    assert sorted(r["task"] for r in data.earlier) == ["ingest_interactions", "publish", "validate_bronze"]
    text = report.build_report(str(root), RUN, tmp_path / "out", reports_dir=tmp_path).read_text()
    assert "attempt <b>manual__broken</b>" in text and "failed</span> ingest_catalog" in text
    assert "earlier attempt: its records of 3 task(s) (ingest_interactions, publish, validate_bronze)" in text
    assert "3.0 s of stage time, wall time 3.0 s" in text  # not 57 minutes across both attempts
    assert "<td>publish" not in text


def test_coverage_is_for_the_runs_prompt_version(tmp_path):
    root = tmp_path / "lakehouse"
    write(root, "ops.pipeline_runs", [task(RUN, "reason_items", 0, 5.0, metrics={
        "llm_calls": 8, "work_set": 2, "model": "m1", "prompt_version": "pv9"})])  # every item failed
    write(root, "bronze.catalog_items", [item(1, "h1"), item(2, "h2")])
    write(root, "silver.item_knowledge", [knowledge(1, "h1", "pv2", {"summary": 1.0})])
    text = report.build_report(str(root), RUN, tmp_path / "out", reports_dir=tmp_path).read_text()
    assert "0 of 2 current items (0.0%) have knowledge for their current content from m1 with prompt pv9" in text
    assert "no field_confidence values for m1 / pv9" in text


def test_cli(tmp_path, capsys):
    help_ = subprocess.run([sys.executable, "-m", "jobs.report", "--help"], capture_output=True, text=True,
                           timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert help_.returncode == 0 and "--run-id" in help_.stdout and "--lakehouse" in help_.stdout
    assert report.main(["--lakehouse", str(tmp_path / "none"), "--run-id", RUN]) == 2
    assert "no ops.pipeline_runs" in capsys.readouterr().err
    write(tmp_path / "lh", "ops.pipeline_runs", [task(RUN, "ingest_catalog", 0, 1.0)])
    assert report.main(["--lakehouse", str(tmp_path / "lh"), "--run-id", "nope"]) == 2
    assert f"known runs: {RUN}" in capsys.readouterr().err


class _Handler(http.server.SimpleHTTPRequestHandler):
    requested: list[tuple[str, int]] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def send_response(self, code, message=None):
        type(self).requested.append((urllib.parse.unquote(urllib.parse.urlsplit(self.path).path), code))
        super().send_response(code, message)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium): "
                                             "the headless browser check needs /usr/bin/chromium")
def test_browser_loads_page_and_every_image(built, tmp_path):
    base, out, index = built
    handler = type("Handler", (_Handler,), {"requested": []})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(base)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        rel = out.relative_to(base).as_posix()
        url = f"http://127.0.0.1:{server.server_address[1]}/{rel}/index.html"
        page = parse(index)
        # Every image and link answers 200 over HTTP, images as PNG.
        for src in page.images + page.links:
            with urllib.request.urlopen(urllib.parse.urljoin(url, src), timeout=10) as r:
                body = r.read()
                assert r.status == 200
                if src in page.images:
                    assert r.headers["Content-Type"] == "image/png" and body[:8] == PNG_MAGIC
        handler.requested.clear()
        shot = tmp_path / "shot.png"
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
             "--window-size=1200,2400", url],
            capture_output=True, text=True, timeout=90,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        server.shutdown()
        server.server_close()
    # The browser itself fetched the page and every image, each answered 200.
    got = {path: code for path, code in handler.requested}
    assert got.get(f"/{rel}/index.html") == 200
    for src in page.images:
        assert got.get(f"/{rel}/{src}") == 200, (src, handler.requested)
    assert_png(shot)
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1200, 2400)
        colours = im.convert("L").resize((60, 120)).getcolors(maxcolors=10_000)
        assert colours is not None and len(colours) > 20  # not a blank page
