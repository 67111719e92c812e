"""Dataset loaders: read a source dataset into Arrow tables for the bronze layer (pure Python + pyarrow).

    from jobs.sources import load_source
    batch = load_source("amazon-json", "/data/amazon18_scientific", until=date(2018, 3, 1))
    batch.items, batch.interactions      # pa.Table, ITEM_SCHEMA / INTERACTION_SCHEMA
    batch.quarantine                     # list[QuarantineRecord] for silver.quarantine
    batch.rows_read                      # {"items", "interactions", "interactions_after_until"}

Datasets: "synthetic" (default; generated, path ignored), "amazon-json" (LC-Rec style <Name>.item.json +
<Name>.inter.json), "movielens" (a GroupLens release folder: ml-100k, ml-1m/10m, ml-20m/25m/32m/latest). The shared cleaning and quarantine rules are in
`jobs.sources.base`; each loader's module docstring describes its format.

Anything that makes a whole dataset unreadable (missing path, wrong layout, a file that is not JSON, an
unknown dataset or option) raises `SourceError` with a one-line message; bad single rows are quarantined
instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from jobs.sources import amazon_json, movielens, synthetic
from jobs.sources.base import (
    INTERACTION_SCHEMA,
    ITEM_SCHEMA,
    REASONS,
    QuarantineRecord,
    SourceBatch,
    SourceError,
)

__all__ = [
    "DATASETS",
    "INTERACTION_SCHEMA",
    "ITEM_SCHEMA",
    "REASONS",
    "QuarantineRecord",
    "SourceBatch",
    "SourceError",
    "load_source",
]

DATASETS = ("synthetic", "amazon-json", "movielens")
_LOADERS = {"synthetic": synthetic.load, "amazon-json": amazon_json.load, "movielens": movielens.load}


def _coerce_until(until: Any) -> date | None:
    if until is None:
        return None
    if isinstance(until, datetime):
        return (until.astimezone(UTC) if until.tzinfo else until).date()
    if isinstance(until, date):
        return until
    if isinstance(until, str):
        try:
            return date.fromisoformat(until.strip())
        except ValueError:
            pass
    raise SourceError(f"until={until!r} is not a date: give a datetime.date or 'YYYY-MM-DD'")


def _loader_bug(name: str, path: Any, e: Exception) -> SourceError:
    """A loader bug: still give the operator one line that says where it happened."""
    where = f"{path}: " if path is not None and name != "synthetic" else ""
    return SourceError(f"{name}: {where}unexpected {type(e).__name__} while loading ({str(e)[:300]}): "
                       "report it as a loader bug with this dataset")


def load_source(
    dataset: str,
    path: str | Path | None = None,
    *,
    until: date | None = None,
    options: dict | None = None,
) -> SourceBatch:
    """Load one dataset. `until`: keep only interactions whose UTC event date is <= until (later ones are
    counted in rows_read["interactions_after_until"], not quarantined). `options`: loader options (all:
    max_description_tokens, max_description_chars; synthetic: n_items, n_users, seed, end_date, days)."""
    name = dataset.strip().lower().replace("_", "-") if isinstance(dataset, str) else dataset
    if name not in _LOADERS:
        raise SourceError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if options is not None and not isinstance(options, dict):
        raise SourceError(f"{name}: options must be a dict, got {type(options).__name__}")
    until_date = _coerce_until(until)
    try:
        return _LOADERS[name](path, until=until_date, options=options)
    except SourceError:
        raise
    except Exception as e:
        raise _loader_bug(name, path, e) from e


# Every loader hands its source over in chunks (iter_catalog / iter_interactions), so no dataset is ever
# held whole by the ingest stages.
_STREAMED = {"amazon-json": amazon_json, "movielens": movielens, "synthetic": synthetic}


def _loader_options(ctx) -> dict:
    options = dict(ctx.config["source"])
    options.pop("chunk_rows", None)  # the ingest's, not a loader option
    if ctx.dataset == "synthetic":
        options.update(ctx.config["synthetic"])
    return options


def _streamed(ctx, stream) -> Iterator[SourceBatch]:
    try:
        yield from stream
    except SourceError:
        raise
    except Exception as e:
        raise _loader_bug(ctx.dataset, ctx.config["data"], e) from e


def catalog_chunks_for_run(ctx) -> Iterator[SourceBatch]:
    """The configured dataset's catalog in chunks of at most `source.chunk_rows` kept items (what
    ingest_catalog reads): amazon-json and MovieLens streamed from their files, synthetic generated chunk
    by chunk. Every loader takes the `source` settings, the synthetic generator also `synthetic`."""
    yield from _streamed(ctx, _STREAMED[ctx.dataset].iter_catalog(
        ctx.config["data"], options=_loader_options(ctx), chunk_rows=ctx.config["source"]["chunk_rows"]))


def interaction_chunks_for_run(ctx) -> Iterator[SourceBatch]:
    """The configured dataset's events as of the run's day in chunks of about `source.chunk_rows` (what
    ingest_interactions reads): amazon-json and MovieLens streamed from their files (the catalog first,
    for each item's fate), synthetic generated."""
    yield from _streamed(ctx, _STREAMED[ctx.dataset].iter_interactions(
        ctx.config["data"], until=ctx.ds, options=_loader_options(ctx),
        chunk_rows=ctx.config["source"]["chunk_rows"]))
