"""The run report's plots: one function per section, each writing a PNG (matplotlib, Agg) or raising
NotAvailable with the reason its inputs are missing."""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from feature_store import delta
from jobs.progress import duration
from jobs.report_data import NotAvailable, RunData, first_line

log = logging.getLogger("reaseq.report")

DPI = 100
WIDTH = 9.0  # inches: 900 px at DPI
STATUS_COLOURS = {"success": "#2e7d32", "failed": "#c62828"}
OTHER_COLOUR = "#f9a825"
BAR = "#1565c0"
BAR2 = "#90caf9"
# Every image the report can write; stale ones from an earlier build are removed.
PLOTS = ("rows_per_table.png", "quarantine.png", "stage_timings.png", "llm.png", "knowledge_coverage.png",
         "field_confidence.png", "semantic_ids.png", "history.png")




@dataclass
class Section:
    title: str
    caption: str = ""
    image: str | None = None
    note: str | None = None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _fmt_int(v: Any) -> str:
    return "–" if v is None else f"{int(v):,}"


def _fmt_s(seconds: float | None) -> str:
    return "–" if seconds is None else duration(seconds, tenths=True)


def _short(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


# ---------------------------------------------------------------- plotting helpers


def _figure(height: float, width: float = WIDTH, layout: str | None = "constrained", **subplots):
    """A figure on the Agg canvas (no pyplot, no global backend switch) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(**subplots)


def _save(fig, out_dir: Path, name: str) -> str:
    fig.savefig(out_dir / name, format="png")
    return name


def _barh(ax, labels: list[str], values: list[float], colours=None, fmt=_fmt_int) -> None:
    from matplotlib.ticker import MaxNLocator

    ys = range(len(labels))
    ax.barh(ys, values, color=colours or BAR)
    ax.set_yticks(list(ys), labels)
    ax.invert_yaxis()  # first item on top
    top = max(values, default=0) or 1
    for y, v in zip(ys, values, strict=True):
        ax.text(v + top * 0.01, y, fmt(v), va="center", fontsize=8)
    ax.set_xlim(0, top * 1.15)
    if fmt is _fmt_int:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.xaxis.set_major_formatter(lambda v, _: f"{v:,.0f}")
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(axis="y", labelsize=9)


# ---------------------------------------------------------------- sections


def plot_rows_per_table(data: RunData, out_dir: Path) -> Section:
    from feature_store.catalog import TABLES

    names, rows, missing = [], [], []
    for name in TABLES:
        try:
            if not delta.exists(name, data.root):
                missing.append(name)
                continue
            t = delta.delta_table(name, data.root)
            rows.append(t.to_pyarrow_dataset().count_rows())
            names.append(f"{name} (v{t.version()})")
        except Exception as exc:
            log.warning("report: %s unreadable: %s", name, exc)
            missing.append(f"{name} (unreadable)")
    if not rows:
        raise NotAvailable(f"no Delta table under {data.root}")
    fig, ax = _figure(0.32 * len(rows) + 0.9)
    _barh(ax, names, rows)
    ax.set_xlabel("rows (newest version)")
    tail = f"; not written: {', '.join(missing)}" if missing else ""
    return Section("Rows per table", f"Rows in each table's newest Delta version (version in brackets), "
                   f"{sum(rows):,} in all{tail}.", _save(fig, out_dir, "rows_per_table.png"))


def plot_quarantine(data: RunData, out_dir: Path) -> Section:
    import pyarrow.compute as pc

    title = "Quarantine by reason"
    try:
        q = data.read("silver.quarantine", columns=["source_table", "reason", "run_id"])
    except NotAvailable as exc:
        return Section(title, note=f"None: {exc}, so nothing was ever quarantined.")
    mine = q.filter(pc.field("run_id") == data.run_id)
    if mine.num_rows == 0:
        return Section(title, note=f"None: no row was quarantined in this run "
                                   f"({q.num_rows:,} rows from other runs are in silver.quarantine).")
    counts = Counter(f"{t}: {(r or '').split(':', 1)[0]}" for t, r in
                     zip(mine["source_table"].to_pylist(), mine["reason"].to_pylist(), strict=True))
    top = counts.most_common(25)
    fig, ax = _figure(0.32 * len(top) + 0.9)
    _barh(ax, [_short(k, 70) for k, _ in top], [v for _, v in top], colours="#ef6c00")
    ax.set_xlabel("rows quarantined in this run")
    more = f"; {len(counts) - len(top)} smaller reasons not shown" if len(counts) > len(top) else ""
    return Section(title, f"{mine.num_rows:,} rows quarantined in this run by table and reason code "
                   f"(text before the first ':'){more}.", _save(fig, out_dir, "quarantine.png"))


def plot_stage_timings(data: RunData, out_dir: Path) -> Section:
    if not data.tasks:
        raise NotAvailable(data.runs_error or f"no task of run {data.run_id} in ops.pipeline_runs")
    labels = [r["task"] for r in data.tasks]
    secs = [r["seconds"] or 0.0 for r in data.tasks]
    colours = [STATUS_COLOURS.get(r["status"], OTHER_COLOUR) for r in data.tasks]
    fig, ax = _figure(0.32 * len(labels) + 1.0)
    _barh(ax, labels, secs, colours, fmt=lambda v: f"{v:.1f} s")
    ax.set_xlabel("seconds")
    statuses = sorted({r["status"] for r in data.tasks})
    if statuses != ["success"]:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=STATUS_COLOURS.get(s, OTHER_COLOUR), label=s) for s in statuses],
                  loc="lower right", fontsize=8)
    starts = [r["started_at"] for r in data.tasks if r["started_at"]]
    ends = [r["ended_at"] for r in data.tasks if r["ended_at"]]
    wall = f", wall time {_fmt_s((max(ends) - min(starts)).total_seconds())} from first start to last end" \
        if starts and ends else ""
    return Section("Stage timings", f"Seconds per stage in start order (green: success, red: failed); "
                   f"{_fmt_s(sum(secs))} of stage time{wall}.", _save(fig, out_dir, "stage_timings.png"))


def _budget_text(m: dict) -> str:
    """"24 answered, 2,976 wait in the backlog (budget 24 items)", or "" for a record without the counts."""
    if "backlog" not in m:
        return ""
    caps = [c for c in (_num(m.get("budget_items")) and f"{int(m['budget_items']):,} items",
                        _num(m.get("budget_minutes")) and f"{float(m['budget_minutes']):g} minutes") if c]
    budget = f" (budget {' and '.join(caps)}" + ("; time ran out" if m.get("budget_stop") == "minutes" else "") + ")" \
        if caps else ""
    backlog = int(m.get("backlog") or 0)
    wait = f"{backlog:,} wait in the backlog for the next run" if backlog else "the backlog is empty"
    return f"{_fmt_int(m.get('answered'))} answered, {wait}{budget}"


LLM_COLOURS = {"work_set": BAR, "answered": STATUS_COLOURS["success"], "backlog": OTHER_COLOUR, "llm_calls": BAR2,
               "tokens_in": BAR, "tokens_out": BAR2}


def plot_llm(data: RunData, out_dir: Path) -> Section:
    if data.task("reason_items") is None:
        raise NotAvailable("reason_items has no row for this run in ops.pipeline_runs")
    m = data.metrics("reason_items")
    # The offline heuristic answers through the same orchestration but is no LLM: its answers are not
    # "LLM calls", and the budget does not apply to it.
    heuristic = str(m.get("model", "")).startswith("offline-")
    calls = "heuristic answers" if heuristic else "LLM calls"
    title = "Heuristic answers and tokens" if heuristic else "LLM calls and tokens"
    keys = {"work_set": "items in work set", "answered": "items answered", "backlog": "items in the backlog",
            "llm_calls": calls, "tokens_in": "tokens in (prompt)", "tokens_out": "tokens out (completion)"}
    have = {k: _num(m.get(k)) for k in keys if _num(m.get(k)) is not None}
    if not have:
        raise NotAvailable("reason_items recorded no llm_calls, tokens or work_set in its metrics")
    who = f"{m.get('model', '?')} (prompt {m.get('prompt_version', '?')})"
    if not any(have.values()):
        return Section(title, note=f"No {'heuristic' if heuristic else 'LLM'} work in this run: 0 of "
                       f"{_fmt_int(m.get('catalog'))} catalog items needed knowledge from {who}, 0 {calls} "
                       f"(an unchanged rerun with an empty backlog makes none).")
    fig, axes = _figure(2.2, ncols=2)
    groups = (("work_set", "answered", "backlog", "llm_calls"), ("tokens_in", "tokens_out"))
    for ax, group in zip(axes, groups, strict=True):
        present = [k for k in group if k in have]
        if present:
            _barh(ax, [keys[k] for k in present], [have[k] for k in present],
                  colours=[LLM_COLOURS[k] for k in present])
        else:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", color="#666")
    work, calls_n = have.get("work_set"), have.get("llm_calls")
    # Tokens per item over the items that were sent (the backlog cost nothing); older records lack it.
    sent = _num(m.get("attempted"))
    sent = work if sent is None else sent
    parts = [f"reason_items with {who}"]
    if work is not None:
        parts.append(f"{int(work):,} of {_fmt_int(m.get('catalog'))} catalog items needed knowledge")
    budget = _budget_text(m)
    if budget:
        parts.append(budget)
    if calls_n is not None:
        parts.append(f"{int(calls_n):,} {calls}")
    if "tokens_in" in have or "tokens_out" in have:
        per = f" ({have.get('tokens_in', 0) / sent:,.0f} in / {have.get('tokens_out', 0) / sent:,.0f} out per item)" \
            if sent else ""
        parts.append(f"{_fmt_int(have.get('tokens_in'))} tokens in, {_fmt_int(have.get('tokens_out'))} out{per}")
    elif work == 0:
        parts.append("no tokens (nothing to do)")
    return Section(title, "; ".join(parts) + ".", _save(fig, out_dir, "llm.png"))


def _knowledge_version(data: RunData, k: pa.Table) -> tuple[str, str]:
    """The (prompt_version, model) that reason_items used in this run, else the newest in the table.

    The run's own pair wins even when the table has no row for it (every item failed): coverage is then 0,
    which is the truth, rather than the coverage of an older prompt.
    """
    m = data.metrics("reason_items")
    if isinstance(m.get("prompt_version"), str) and isinstance(m.get("model"), str):
        return m["prompt_version"], m["model"]
    if k.num_rows == 0:
        raise NotAvailable("silver.item_knowledge is empty")
    g = k.group_by(["prompt_version", "model"]).aggregate([("ds", "max"), ("item_id", "count")]).to_pylist()
    best = max(g, key=lambda r: (r["ds_max"] or dt.date.min, r["item_id_count"]))
    return best["prompt_version"], best["model"]


def _knowledge(data: RunData) -> tuple[pa.Table, str, str]:
    import pyarrow.compute as pc

    k = data.read("silver.item_knowledge",
                  columns=["item_id", "content_hash", "prompt_version", "model", "ds", "field_confidence"])
    pv, model = _knowledge_version(data, k)
    return k.filter((pc.field("prompt_version") == pv) & (pc.field("model") == model)), pv, model


def plot_knowledge_coverage(data: RunData, out_dir: Path) -> Section:
    items = data.read("bronze.catalog_items", columns=["item_id", "content_hash"])
    if items.num_rows == 0:
        raise NotAvailable("bronze.catalog_items is empty")
    k, pv, model = _knowledge(data)
    keys = k.select(["item_id", "content_hash"]).group_by(["item_id", "content_hash"]).aggregate([])
    covered = items.join(keys, ["item_id", "content_hash"], join_type="left semi").num_rows
    any_content = items.join(keys.select(["item_id"]).group_by("item_id").aggregate([]), "item_id",
                             join_type="left semi").num_rows
    stale, n = any_content - covered, items.num_rows
    missing = n - covered - stale
    fig, ax = _figure(1.6)
    left = 0
    for v, colour, label in ((covered, "#2e7d32", "current content"), (stale, OTHER_COLOUR, "older content only"),
                             (missing, "#c62828", "none")):
        ax.barh([0], [v / n], left=left, color=colour, label=f"{label}: {v:,}")
        if v / n > 0.06:
            ax.text(left + v / n / 2, 0, f"{v / n:.1%}", ha="center", va="center", color="white", fontsize=9)
        left += v / n
    ax.set_xlim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("share of current bronze items with a knowledge row")
    fig.legend(loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    ax.spines[["top", "right", "left"]].set_visible(False)
    return Section("Knowledge coverage", f"{covered:,} of {n:,} current items ({covered / n:.1%}) have knowledge "
                   f"for their current content from {model} with prompt {pv}; {stale:,} only for older content, "
                   f"{missing:,} none.", _save(fig, out_dir, "knowledge_coverage.png"))


def _map_entries(col: pa.ChunkedArray) -> tuple[list[str], Any]:
    """Flatten a map<string, double> column into parallel keys and values (slice-safe)."""
    import numpy as np
    import pyarrow.compute as pc

    keys, values = [], []
    for chunk in col.chunks:
        t = chunk.type
        flat = pc.list_flatten(chunk.cast(pa.list_(pa.struct([t.key_field, t.item_field]))))
        keys.extend(flat.field(0).to_pylist())
        values.append(flat.field(1).to_numpy(zero_copy_only=False))
    vals = np.concatenate(values) if values else np.empty(0)
    return keys, vals.astype(float)


def plot_field_confidence(data: RunData, out_dir: Path) -> Section:
    import numpy as np

    k, pv, model = _knowledge(data)
    keys, values = _map_entries(k["field_confidence"])
    ok = ~np.isnan(values)
    if not ok.any():
        raise NotAvailable(f"no field_confidence values for {model} / {pv}")
    keys_arr = np.array(keys, dtype=object)[ok]
    values = values[ok]
    counts = Counter(keys_arr.tolist())
    fields = [f for f, _ in counts.most_common(16)]
    ncols = 4
    nrows = -(-len(fields) // ncols)
    # A fixed grid instead of constrained layout: with 16 small axes the layout solver costs seconds.
    fig, axes = _figure(1.55 * nrows + 0.35, nrows=nrows, ncols=ncols, squeeze=False, sharex=True, sharey=True,
                        layout=None)
    fig.subplots_adjust(left=0.07, right=0.99, top=1 - 0.45 / (1.55 * nrows + 0.35),
                        bottom=0.3 / (1.55 * nrows + 0.35), hspace=0.75, wspace=0.12)
    bins = np.linspace(0, 1, 11)
    for ax, f in zip(axes.flat, fields, strict=False):
        v = np.clip(values[keys_arr == f], 0, 1)
        ax.hist(v, bins=bins, weights=np.full(len(v), 100.0 / len(v)), color=BAR)
        ax.set_title(f"{_short(f, 30)}\nn={len(v):,}, mean {v.mean():.2f}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.spines[["top", "right"]].set_visible(False)
    ax.set_ylim(0, 105)
    for row in axes:
        row[0].set_ylabel("% of values", fontsize=7)
    for ax in list(axes.flat)[len(fields):]:
        ax.set_axis_off()
    more = f"; the {len(fields)} most frequent of {len(counts)} fields" if len(counts) > len(fields) else ""
    return Section("Per-field confidence", f"Distribution of field_confidence (share of sampled reasoning paths "
                   f"that agreed, 0.1 bins) per field, as % of the field's values; {k.num_rows:,} knowledge rows "
                   f"of {model} / {pv}{more}.", _save(fig, out_dir, "field_confidence.png"))


def _semantic_table(data: RunData, version: str | None) -> tuple[str, dict]:
    """Distinct codes per RQ level / MPQ expert and the residual collision rate in gold.item_semantic_ids."""
    import numpy as np
    import pyarrow.compute as pc

    t = data.read("gold.item_semantic_ids", columns=["codebook_version", "rq_codes", "mpq_tokens", "ds"])
    if t.num_rows == 0:
        raise NotAvailable("gold.item_semantic_ids is empty")
    versions = set(t["codebook_version"].to_pylist())
    if version not in versions:
        g = t.group_by("codebook_version").aggregate([("ds", "max"), ("rq_codes", "count")]).to_pylist()
        version = max(g, key=lambda r: (r["ds_max"] or dt.date.min, r["rq_codes_count"]))["codebook_version"]
    t = t.filter(pc.field("codebook_version") == version)
    out: dict[str, Any] = {"n": t.num_rows}
    for col, key in (("rq_codes", "rq_distinct"), ("mpq_tokens", "mpq_distinct")):
        arr = t[col]
        lengths = pc.list_value_length(arr).drop_null()
        width = pc.min(lengths).as_py() if len(lengths) else 0
        out[key] = [pc.count_distinct(pc.list_element(arr, i)).as_py() for i in range(width or 0)]
        if col == "rq_codes" and width and len(lengths) == t.num_rows:
            if pc.max(lengths).as_py() == width:  # the usual case: every item has L + 1 codes
                codes = pc.list_flatten(arr).to_numpy().astype(np.int64).reshape(-1, width)
            else:
                codes = np.array([row[:width] for row in arr.to_pylist()], dtype=np.int64)
            out["rq_width"] = width
            out["rq_codes_matrix"] = codes
    return version, out


def plot_semantic_ids(data: RunData, out_dir: Path) -> Section:
    import numpy as np

    train, assign = data.metrics("train_quantizer"), data.metrics("assign_semantic_ids")
    q = {**(train.get("quality") or {}), **(assign.get("quality") or {})}
    version = assign.get("codebook_version") or train.get("codebook_version")
    try:
        version, tab = _semantic_table(data, version)
    except NotAvailable as exc:
        if not q:
            raise NotAvailable(f"train_quantizer / assign_semantic_ids recorded no quality metrics and {exc}") from None
        tab, table_note = {}, f" ({exc})"
    else:
        table_note = ""
    levels = int(q.get("rq_levels") or max(tab.get("rq_width", 1) - 1, 0))
    k_rq, k_mpq = q.get("rq_codebook_size"), q.get("mpq_codebook_size")
    labels = [f"RQ L{i + 1}" for i in range(levels)]
    experts = len(q.get("mpq_utilization") or tab.get("mpq_distinct") or [])
    labels += [f"MPQ E{i + 1}" for i in range(experts)]
    if not labels:
        raise NotAvailable("no codebook levels in the metrics or the table")

    def per_label(rq: list | None, mpq: list | None) -> list[float]:
        rq, mpq = list(rq or []), list(mpq or [])
        return [(_num(rq[i]) if i < len(rq) else None) or np.nan for i in range(levels)] + \
               [(_num(mpq[i]) if i < len(mpq) else None) or np.nan for i in range(experts)]

    util_metrics = per_label(q.get("rq_utilization"), q.get("mpq_utilization"))
    distinct = per_label(tab.get("rq_distinct", [])[:levels], tab.get("mpq_distinct"))
    sizes = [k_rq] * levels + [k_mpq] * experts
    util_table = [d / k if k and not np.isnan(d) else np.nan for d, k in zip(distinct, sizes, strict=True)]
    perplexity = per_label(q.get("rq_perplexity"), q.get("mpq_perplexity"))

    # Collision rates (% of items): nearest codes, after the de-dup step, and in the gold table.
    coll: list[tuple[str, float]] = []
    for label, key, invert in (("RQ nearest", "rq_collision_rate_nearest", False),
                               ("RQ after fix", "rq_collision_rate", False),
                               ("MPQ nearest", "mpq_tuple_unique_rate_nearest", True),
                               ("MPQ after fix", "mpq_tuple_unique_share", True)):
        v = _num(q.get(key))
        if v is not None:
            coll.append((label, 100 * ((1 - v) if invert else v)))
    mat = tab.get("rq_codes_matrix")
    if mat is not None and levels and mat.shape[1] >= levels:
        _, inverse, counts = np.unique(mat[:, :levels], axis=0, return_inverse=True, return_counts=True)
        coll.append(("RQ gold table", 100 * float((counts[inverse.ravel()] > 1).mean())))

    fig, axes = _figure(3.2, ncols=3, width_ratios=[1.3, 1.3, 1])
    x = np.arange(len(labels))
    ax = axes[0]
    ax.bar(x - 0.2, util_metrics, 0.4, color=BAR, label="metrics")
    ax.bar(x + 0.2, util_table, 0.4, color=BAR2, label="gold table")
    for xi, d, u in zip(x, distinct, util_table, strict=True):
        if not np.isnan(d):
            ax.text(xi + 0.2, (0 if np.isnan(u) else u) + 0.02, f"{int(d)}", rotation=90, ha="center",
                    va="bottom", fontsize=7)
    ax.set_ylim(0, 1.45)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_title("codebook utilization (share of codes used)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", ncol=2, frameon=False)
    ax2 = axes[1]
    ax2.bar(x, perplexity, 0.6, color=BAR)
    for k in {s for s in sizes if s}:
        ax2.axhline(k, color="#888", linestyle="--", linewidth=0.8)
    ax2.set_title("perplexity (dashed: codebook size)", fontsize=9)
    for a in (ax, ax2):
        a.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        a.spines[["top", "right"]].set_visible(False)
    ax3 = axes[2]
    if coll:
        ax3.bar(range(len(coll)), [v for _, v in coll], color=["#ef6c00" if "nearest" in n else BAR for n, _ in coll])
        ax3.set_xticks(range(len(coll)), [n for n, _ in coll], rotation=45, ha="right", fontsize=8)
        for i, (_, v) in enumerate(coll):
            ax3.text(i, v, f"{v:.1f}%", ha="center", va="bottom", fontsize=7)
        ax3.set_ylim(0, max(max(v for _, v in coll) * 1.2, 1))
        ax3.spines[["top", "right"]].set_visible(False)
    else:
        ax3.set_axis_off()
        ax3.text(0.5, 0.5, "no collision figures", ha="center", va="center", color="#666")
    ax3.set_title("collision rate (% of items)", fontsize=9)
    method = q.get("rq_method") or (train.get("config") or {}).get("rq_method") or "RQ"
    shape = f"{levels}×{k_rq or '?'}" + (f", MPQ {experts}×{k_mpq or '?'}" if experts else "")
    n = tab.get("n") or q.get("n_items")
    return Section("Semantic IDs: codebooks and collisions",
                   f"Codebook {version or '?'} ({method}, {shape}), {_fmt_int(n)} items: share of codes used per "
                   f"level/expert (metrics and distinct codes in gold.item_semantic_ids, counts on the bars), "
                   f"perplexity, and items sharing all L codes (RQ) or their MPQ tuple{table_note}.",
                   _save(fig, out_dir, "semantic_ids.png"))


def plot_history(data: RunData, out_dir: Path) -> Section:
    if not data.all_runs:
        raise NotAvailable(data.runs_error or "ops.pipeline_runs is empty")
    runs: dict[str, dict] = {}
    for r in data.all_runs:
        e = runs.setdefault(r["run_id"], {"start": None, "seconds": 0.0, "failed": False})
        if r["started_at"] and (e["start"] is None or r["started_at"] < e["start"]):
            e["start"] = r["started_at"]
        e["seconds"] += r["seconds"] or 0.0
        e["failed"] |= r["status"] != "success"
    if len(runs) < 2:
        return Section("History", note="Skipped: ops.pipeline_runs holds a single run; the history appears "
                                       "from the second run on.")
    pts = sorted(((e["start"], rid, e) for rid, e in runs.items() if e["start"]), key=lambda p: p[0])
    if len(pts) < 2:
        raise NotAvailable("runs have no start times")
    minutes = max(e["seconds"] for _, _, e in pts) > 300
    scale, unit = (60.0, "minutes") if minutes else (1.0, "seconds")
    xs = [p[0] for p in pts]
    ys = [p[2]["seconds"] / scale for p in pts]
    fig, ax = _figure(2.8)
    ax.plot(xs, ys, marker="o", color=BAR, linewidth=1.2)
    bad = [(x, y) for x, y, p in zip(xs, ys, pts, strict=True) if p[2]["failed"]]
    if bad:
        ax.scatter(*zip(*bad, strict=True), color=STATUS_COLOURS["failed"], zorder=3, label="had a failed task")
    cur = [(x, y) for x, y, p in zip(xs, ys, pts, strict=True) if p[1] == data.run_id]
    if cur:
        ax.scatter(*zip(*cur, strict=True), s=120, facecolors="none", edgecolors="black", zorder=4,
                   label="this run")
    ax.set_ylabel(f"stage time ({unit})")
    ax.set_ylim(0, max(ys) * 1.15 or 1)
    ax.legend(fontsize=8, loc="best")
    ax.spines[["top", "right"]].set_visible(False)
    fig.autofmt_xdate()
    return Section("History", f"Total stage time per run over time (run start, UTC), {len(pts)} runs in "
                   f"ops.pipeline_runs; red: a task failed, circled: this run.", _save(fig, out_dir, "history.png"))


SECTIONS: list[tuple[str, Callable[[RunData, Path], Section]]] = [
    ("Rows per table", plot_rows_per_table),
    ("Quarantine by reason", plot_quarantine),
    ("Stage timings", plot_stage_timings),
    ("LLM calls and tokens", plot_llm),
    ("Knowledge coverage", plot_knowledge_coverage),
    ("Per-field confidence", plot_field_confidence),
    ("Semantic IDs: codebooks and collisions", plot_semantic_ids),
    ("History", plot_history),
]


def _render(title: str, fn: Callable[[RunData, Path], Section], data: RunData, out_dir: Path) -> Section:
    try:
        return fn(data, out_dir)
    except NotAvailable as exc:
        return Section(title, note=f"Not available: {exc}.")
    except Exception as exc:  # a plot must never take the report down
        log.warning("report: %s failed", title, exc_info=True)
        return Section(title, note=f"Not available: {type(exc).__name__}: {first_line(exc)}.")
