"""Output schemas of the agents: what the server is constrained to, and what we accept on receipt.

Every answer starts with `reasoning` so the model thinks before it commits to fields (the JSON
grammar makes the key order binding). The wire schemas follow OpenAI's strict subset (every object
closed, every property required, no free-form maps), which vLLM's grammar backends also accept;
that is why `attributes` travels as a list of {name, value} pairs and becomes a dict on receipt.
Validation on receipt is the second line of defence: a server that ignores `response_format`, or
a prompt injection that talks the model out of it, still cannot put an unexpected shape in a row.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

MAX_LIST = 16  # elements kept per list field
MAX_PHRASE = 120  # characters per list element / attribute value
MAX_REASONING = 4000
MAX_SUMMARY = 2000
PRICE_TIERS = ("budget", "mid", "premium", "unknown")


def _squash(s: str, limit: int) -> str:
    return " ".join(s.split())[:limit]


def _clean_list(values: list[str]) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for v in values:
        s = " ".join(v.split())  # inlined _squash: this runs for every list element received
        if len(s) > MAX_PHRASE:
            s = s[:MAX_PHRASE]
        key = s.lower()
        if s and key not in seen:
            seen.add(key)
            out.append(s)
            if len(out) == MAX_LIST:
                break
    return out


def _pairs_to_dict(value: Any) -> Any:
    if not isinstance(value, list):
        raise ValueError("attributes must be a JSON array of {name, value} objects")
    out: dict[str, Any] = {}
    for pair in value:
        if not isinstance(pair, dict) or set(pair) != {"name", "value"}:
            raise ValueError("each attribute must be an object with exactly the keys name and value")
        out[pair["name"]] = pair["value"]
    return out


def _clean_attrs(d: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key, val = _squash(k, 60).lower(), _squash(v, MAX_PHRASE)
        if key and val and len(out) < 2 * MAX_LIST:
            out[key] = val
    return out


_ATTR_WIRE = {
    "type": "array",
    "description": "product attributes stated or clearly implied by the item, as name/value pairs",
    "items": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "value": {"type": "string"}},
        "required": ["name", "value"],
        "additionalProperties": False,
    },
}

# Bounds sent in the wire schema, so a constrained sampler ends every answer well before
# max_tokens (the reconciler's worst case is about 400 tokens). On receipt the lists and strings are
# truncated, not rejected: a server that ignores the schema's bounds costs a little text, not a retry.
WIRE_LIST = 4  # elements per list field
WIRE_PHRASE = 40  # characters per phrase
WIRE_REASONING = 160  # a small model loops in free text; a short bound ends the loop early
WIRE_SUMMARY = 300
WIRE_ATTRS = 5
_PHRASE_WIRE = {"type": "string", "maxLength": WIRE_PHRASE}
_PHRASES_WIRE = {"type": "array", "items": _PHRASE_WIRE, "maxItems": WIRE_LIST}
_ATTR_WIRE["maxItems"] = WIRE_ATTRS
_ATTR_WIRE["items"]["properties"] = {
    "name": {"type": "string", "maxLength": 30},
    "value": {"type": "string", "maxLength": WIRE_PHRASE},
}

Phrases = Annotated[list[str], AfterValidator(_clean_list), WithJsonSchema(_PHRASES_WIRE)]
Attributes = Annotated[
    dict[str, str], BeforeValidator(_pairs_to_dict), AfterValidator(_clean_attrs), WithJsonSchema(_ATTR_WIRE)
]
Reasoning = Annotated[
    str,
    AfterValidator(lambda s: s.strip()[:MAX_REASONING]),
    WithJsonSchema({"type": "string", "maxLength": WIRE_REASONING}),
]
Phrase = Annotated[str, AfterValidator(lambda s: _squash(s, MAX_PHRASE)), WithJsonSchema(_PHRASE_WIRE)]
Summary = Annotated[
    str,
    AfterValidator(lambda s: _squash(s, MAX_SUMMARY)),
    WithJsonSchema({"type": "string", "maxLength": WIRE_SUMMARY}),
]
PriceTier = Literal["budget", "mid", "premium", "unknown"]

_REASONING = Field(description="brief step-by-step reasoning, written before the fields")


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    reasoning: Reasoning = _REASONING


# Catalog facts are not asked for: the item's categories, brand, price and listed attributes are
# given to the agents as facts, and the agents answer what the catalog does not say. The category
# path is asked only of items whose catalog lists no categories (ProfilerPathAnswer).
class ProfilerAnswer(_Answer):
    product_type: Phrase = Field(description="what the product is, a short noun phrase")
    attributes: Attributes
    price_tier: PriceTier = Field(description="price tier within its category; unknown without a price")


class ProfilerPathAnswer(_Answer):
    category_path: Phrases = Field(description="category path, root first")
    product_type: Phrase = Field(description="what the product is, a short noun phrase")
    attributes: Attributes
    price_tier: PriceTier = Field(description="price tier within its category; unknown without a price")


class AudienceAnswer(_Answer):
    audiences: Phrases = Field(description="who buys or uses it")
    scenarios: Phrases = Field(description="situations or tasks it is used for")
    occasions: Phrases = Field(description="occasions, seasons or events it suits; empty if none")


class RelationsAnswer(_Answer):
    complements: Phrases = Field(description="product types bought together with it")
    substitutes: Phrases = Field(description="product types that could replace it")


class ReconcilerAnswer(_Answer):
    product_type: Phrase = Field(description="what the product is, a short noun phrase")
    attributes: Attributes
    price_tier: PriceTier = Field(description="price tier within its category; unknown without a price")
    audiences: Phrases = Field(description="who buys or uses it")
    scenarios: Phrases = Field(description="situations or tasks it is used for")
    occasions: Phrases = Field(description="occasions, seasons or events it suits; empty if none")
    complements: Phrases = Field(description="product types bought together with it")
    substitutes: Phrases = Field(description="product types that could replace it")
    summary: Summary = Field(description="one factual paragraph describing the item, for search embeddings")


# How self-consistency votes on each field (see consensus.py).
FIELD_KINDS: dict[str, str] = {
    "category_path": "path",
    "product_type": "scalar",
    "attributes": "dict",
    "price_tier": "scalar",
    "audiences": "set",
    "scenarios": "set",
    "occasions": "set",
    "complements": "set",
    "substitutes": "set",
    "summary": "text",
}


def voted_fields(model: type[_Answer]) -> list[str]:
    return [f for f in model.model_fields if f != "reasoning"]


def _strip_titles(node: Any, in_properties: bool = False) -> Any:
    if isinstance(node, dict):
        return {
            k: _strip_titles(v, in_properties=(k == "properties" and not in_properties))
            for k, v in node.items()
            if in_properties or not (k == "title" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [_strip_titles(v) for v in node]
    return node


def wire_schema(model: type[_Answer]) -> dict[str, Any]:
    """The JSON schema sent as response_format; titles dropped since they only cost grammar states."""
    schema = _strip_titles(model.model_json_schema())
    assert "$defs" not in schema, "keep agent schemas flat: not every server resolves $ref"
    return copy.deepcopy(schema)


class InterestsAnswer(_Answer):
    """The interests agent (beyond-log inference): what the user's history covers, then what lies beyond it."""

    covered: Phrases = Field(description="product types the history already covers")
    interests: Phrases = Field(
        description="3 to 8 product types or needs the user plausibly wants next, not already in the history, "
        "most likely first"
    )
