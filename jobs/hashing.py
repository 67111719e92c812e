"""Content hashes for catalog items and embedded texts.

`content_hash` is the key of the incremental LLM stage: an item is reasoned about again only when this hash
changes. It is the sha256 (hex) of the canonical JSON of the item's text fields:

    {"attributes": {...}, "brand": ..., "categories": [...], "description": ..., "price": ..., "title": ...}

with every string (keys included) NFC-normalised, keys sorted, `ensure_ascii=False` and compact separators,
encoded as UTF-8. Canonicalisation makes the hash independent of how a caller holds the values:

- attributes may be a mapping or an iterable of (key, value) pairs (what Arrow's map type gives back);
  their order never matters;
- empty description, brand, categories and attributes count as missing (None), so a round trip through a
  table that stores empty as null does not change the hash;
- price is hashed as a float (10 and 10.0 hash alike); a non-finite price raises ValueError.

Category order does matter: categories are a path, root first.
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["content_hash", "text_hash", "canonical_item_json"]


def _nfc(value: str) -> str:
    return unicodedata.normalize("NFC", value)


def _canon(value: Any) -> Any:
    if isinstance(value, str):
        return _nfc(value)
    if isinstance(value, Mapping):
        return {_nfc(str(k)): _canon(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canon(v) for v in value]
    return value


def _pairs_to_dict(attributes: Mapping | Iterable | None) -> dict[str, Any] | None:
    if attributes is None:
        return None
    if isinstance(attributes, Mapping):
        items = attributes.items()
    else:
        items = attributes
    out = {_nfc(str(k)): _canon(v) for k, v in items}
    return out or None


def _empty_to_none(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str | list | tuple) and len(value) == 0:
        return None
    return value


def canonical_item_json(
    title: str,
    description: str | None,
    categories: Iterable[str] | None,
    brand: str | None,
    price: float | None,
    attributes: Mapping[str, Any] | Iterable[tuple[str, Any]] | None,
) -> str:
    """The canonical JSON text that `content_hash` hashes (exposed for debugging and tests)."""
    if price is not None:
        price = float(price)
        if not math.isfinite(price):
            raise ValueError(f"price must be finite to be hashed, got {price!r}")
    cats = None if categories is None else [_canon(c) for c in categories]
    doc = {
        "title": _canon(title),
        "description": _empty_to_none(_canon(description)),
        "categories": _empty_to_none(cats),
        "brand": _empty_to_none(_canon(brand)),
        "price": price,
        "attributes": _pairs_to_dict(attributes),
    }
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def content_hash(
    title: str,
    description: str | None,
    categories: Iterable[str] | None,
    brand: str | None,
    price: float | None,
    attributes: Mapping[str, Any] | Iterable[tuple[str, Any]] | None,
) -> str:
    """sha256 hex of the canonical JSON of an item's text fields (see the module docstring)."""
    text = canonical_item_json(title, description, categories, brand, price, attributes)
    # surrogatepass: a lone surrogate (which the loaders never let through) still hashes deterministically.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def text_hash(text: str) -> str:
    """sha256 hex of the NFC-normalised text, UTF-8 encoded."""
    return hashlib.sha256(_nfc(text).encode("utf-8", "surrogatepass")).hexdigest()
