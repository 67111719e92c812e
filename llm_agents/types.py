"""The records that cross the package boundary: one item in, one knowledge row out."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

# Columns of silver.item_knowledge this package fills (ds and run_id belong to the job).
KNOWLEDGE_COLUMNS = (
    "item_id",
    "content_hash",
    "prompt_version",
    "model",
    "category_path",
    "product_type",
    "attributes",
    "price_tier",
    "audiences",
    "scenarios",
    "occasions",
    "complements",
    "substitutes",
    "summary",
    "field_confidence",
    "field_source",
    "traces",
    "tokens_in",
    "tokens_out",
    "llm_calls",
    "latency_ms",
    "status",
)


@dataclass
class ItemInput:
    item_id: str
    title: str
    description: str | None
    categories: list[str]
    brand: str | None
    price: float | None
    attributes: dict[str, str]
    content_hash: str

    @classmethod
    def from_record(cls, row: Mapping[str, Any]) -> ItemInput:
        """Build from a bronze.catalog_items row as pandas/Arrow hand it over.

        An Arrow map arrives as a list of (key, value) tuples (`mapInArrow`, `to_pylist`), and under
        pandas a list as a numpy array and a null price as NaN; this normalises all of them so callers
        do not have to.
        """
        return cls(
            item_id=str(row["item_id"]),
            title=_text(row.get("title")) or "",
            description=_text(row.get("description")),
            categories=[str(c) for c in _seq(row.get("categories")) if _text(c)],
            brand=_text(row.get("brand")),
            price=_price(row.get("price")),
            attributes=_map(row.get("attributes")),
            content_hash=str(row["content_hash"]),
        )


@dataclass
class KnowledgeResult:
    item_id: str
    content_hash: str
    prompt_version: str
    model: str
    status: str  # "ok" | "failed"
    category_path: list[str] = field(default_factory=list)
    product_type: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    price_tier: str | None = None
    audiences: list[str] = field(default_factory=list)
    scenarios: list[str] = field(default_factory=list)
    occasions: list[str] = field(default_factory=list)
    complements: list[str] = field(default_factory=list)
    substitutes: list[str] = field(default_factory=list)
    summary: str | None = None
    field_confidence: dict[str, float] = field(default_factory=dict)
    # Per field, where its value came from: "catalog" (a catalog fact) or the model's name.
    field_source: dict[str, str] = field(default_factory=dict)
    traces: str = "{}"
    tokens_in: int = 0
    tokens_out: int = 0
    llm_calls: int = 0
    latency_ms: float = 0.0
    # Answers accepted on receipt, and those refused by reason (truncated, schema_violation, ...):
    # the schema-valid rate of the model, which the job reports (not columns of the table).
    answers_valid: int = 0
    answers_rejected: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    raw: str | None = None

    def to_record(self) -> dict[str, Any]:
        """The silver.item_knowledge columns (without ds/run_id); maps stay Python dicts."""
        d = asdict(self)
        return {k: d[k] for k in KNOWLEDGE_COLUMNS}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _missing(v: Any) -> bool:
    # None, NaN (numpy or float) and pandas.NA, without importing pandas here
    return v is None or (isinstance(v, float) and math.isnan(v)) or type(v).__name__ == "NAType"


def _text(v: Any) -> str | None:
    if _missing(v):
        return None
    s = str(v).strip()
    return s or None


def _seq(v: Any) -> Iterable[Any]:
    if _missing(v) or isinstance(v, float | str):
        return [v] if isinstance(v, str) else []
    return list(v)


def _price(v: Any) -> float | None:
    if _missing(v):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) or math.isinf(f) else f


def _map(v: Any) -> dict[str, str]:
    if _missing(v) or isinstance(v, float):
        return {}
    pairs = v.items() if isinstance(v, Mapping) else v
    out: dict[str, str] = {}
    for kv in pairs:
        k, val = kv[0], kv[1]
        if _text(k) is not None and _text(val) is not None:
            out[str(k)] = str(val)
    return out


# -- the interests agent (beyond-log inference): one user's recent history in, interests out -------


@dataclass
class HistoryItem:
    """One item of a user's history, with its knowledge when the explicit path has produced it."""

    item_id: str
    title: str
    category_path: list[str] = field(default_factory=list)
    summary: str | None = None
    product_type: str | None = None
    complements: list[str] = field(default_factory=list)
    substitutes: list[str] = field(default_factory=list)

    @classmethod
    def from_record(cls, row: Mapping[str, Any]) -> HistoryItem:
        """From a dict as JSON, pandas or Arrow hand it over (NaN, None and numpy arrays normalised)."""
        return cls(
            item_id=str(row["item_id"]),
            title=_text(row.get("title")) or "",
            category_path=[str(c) for c in _seq(row.get("category_path")) if _text(c)],
            summary=_text(row.get("summary")),
            product_type=_text(row.get("product_type")),
            complements=[str(c) for c in _seq(row.get("complements")) if _text(c)],
            substitutes=[str(c) for c in _seq(row.get("substitutes")) if _text(c)],
        )


@dataclass
class UserHistory:
    user_id: str
    items: list[HistoryItem]  # oldest first, most recent last


@dataclass
class InterestsResult:
    user_id: str
    prompt_version: str
    model: str
    # "ok" | "failed" (the LLM call failed after retries) | "skipped" (no usable history item: no call)
    status: str
    interests: list[str] = field(default_factory=list)  # normalised phrases (lowercase), best first
    weights: list[float] = field(default_factory=list)  # one per interest, in (0, 1]
    covered: list[str] = field(default_factory=list)  # what the answer says the history already covers
    traces: str = "{}"
    tokens_in: int = 0
    tokens_out: int = 0
    llm_calls: int = 0
    latency_ms: float = 0.0
    error: str | None = None
    raw: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
