"""The offline backend: deterministic heuristics behind the same `complete()` as the HTTP backend.

It answers every agent with schema-shaped JSON derived from the catalog fields, so the agents,
validation, self-consistency voting and reconciliation all run for real without a server. Being
deterministic, its k sampled paths always agree (confidence 1.0).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from .backend import Completion, CompletionRequest
from .types import ItemInput
from .vocab import (
    AUDIENCE_CUES,
    COLORS,
    MATERIALS,
    NOT_NOUNS,
    OCCASION_CUES,
    PRICE_BANDS,
    UNITS,
    VOCAB,
)

MAX_RULE_VALUES = 6
_ENCODE = json.JSONEncoder(ensure_ascii=False).encode  # one encoder, not one per dumps() call

_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")  # "women's" -> women, s
_UNIT_ALT = "|".join(sorted((re.escape(u) for u in UNITS), key=len, reverse=True))
_MEASURE = re.compile(rf"(?<![\w.])(\d+(?:[.,]\d+)?)\s?-?\s?({_UNIT_ALT})\b", re.IGNORECASE)
_N_IN_1 = re.compile(r"\s*\d")  # "2 in 1" is a product style, not a 2-inch size
_COUNT = re.compile(
    r"\b(?:pack|set|box|case|bundle) of (\d+)\b|\b(\d+)\s?-?\s?(?:pack|pk|pcs|pieces|piece|count|ct)\b",
    re.IGNORECASE,
)
_MATERIALS = frozenset(MATERIALS)
_COLORS = frozenset(COLORS)
_TITLE_HEAD = re.compile(r"\s(?:-|–|\||with|for)\s|[,(\[:]")


@lru_cache(maxsize=65536)
def singular(word: str) -> str:
    if len(word) <= 3 or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def _words(text: str) -> list[str]:
    return [singular(w) for w in _WORD.findall(text.lower())]


def _vocab_hits(item: ItemInput) -> list[tuple[str, Any]]:
    return _hits(item.title, tuple(item.categories))


@lru_cache(maxsize=4096)  # three agents ask for the same item in a row
def _hits(title: str, categories: tuple[str, ...]) -> list[tuple[str, Any]]:
    """Vocabulary entries matched, most specific evidence first: last category, title head, the rest."""
    sources = []
    if categories:
        sources.append(categories[-1])
    sources.append(_TITLE_HEAD.split(title, maxsplit=1)[0])  # "Drill Kit, 2 Batteries": the drill
    sources.extend(reversed(categories[:-1]))
    hits: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for text in sources:
        words = _words(text)
        for i, w in enumerate(words):
            for key in ((w + " " + words[i + 1]) if i + 1 < len(words) else None, w):
                if key and key in VOCAB and key not in seen:
                    seen.add(key)
                    hits.append((key, VOCAB[key]))
    return hits


def _merge(hits: list[tuple[str, Any]], slot: int, exclude: set[str] = frozenset()) -> list[str]:
    out: list[str] = []
    for _, entry in hits:
        for v in entry[slot]:
            if v not in out and v not in exclude:
                out.append(v)
    return out[:MAX_RULE_VALUES]


def product_type(item: ItemInput) -> str:
    if item.categories:
        last = re.split(r"\s(?:&|and)\s|,|/", item.categories[-1].lower())[0].split()
        if last:
            return " ".join([*last[:-1], singular(last[-1])])
    head = _TITLE_HEAD.split(item.title.lower(), maxsplit=1)[0]
    for w in reversed(_WORD.findall(head)):
        if w.isalpha() and w not in NOT_NOUNS and w not in _COLORS and w not in _MATERIALS and w not in UNITS:
            return singular(w)
    return "product"


def attributes(item: ItemInput) -> dict[str, str]:
    out = {k.strip().lower(): v.strip() for k, v in item.attributes.items() if k.strip() and v.strip()}
    if item.brand:
        out.setdefault("brand", item.brand)
    title = item.title
    for m in _MEASURE.finditer(title):
        number, unit = m.group(1), m.group(2)
        if unit.lower() == "in" and _N_IN_1.match(title, m.end()):
            continue
        name, canon = UNITS[unit.lower()]
        out.setdefault(name, f"{number.replace(',', '.')} {canon}")
    m = _COUNT.search(title)
    if m:
        out.setdefault("count", m.group(1) or m.group(2))
    words = _WORD.findall(title.lower())
    material = color = None
    for i, w in enumerate(words):
        if material is None:
            pair = f"{w} {words[i + 1]}" if i + 1 < len(words) else ""
            material = pair if pair in _MATERIALS else w if w in _MATERIALS else None
        if color is None and w in _COLORS:
            color = w
    if material:
        out.setdefault("material", "wood" if material == "wooden" else material)
    if color:
        out.setdefault("color", color)
    return out


def price_tier(item: ItemInput, hits: list[tuple[str, Any]]) -> tuple[str, str]:
    family = hits[0][1][0] if hits else "general"
    if item.price is None or item.price <= 0:
        return "unknown", family
    low, high = PRICE_BANDS[family]
    return ("budget" if item.price < low else "mid" if item.price < high else "premium"), family


def _cues(item: ItemInput) -> tuple[list[str], list[str]]:
    """Audience and occasion cue words anywhere in the item text, in order of appearance."""
    text = f"{item.title} {' '.join(item.categories)} {item.description or ''}".lower()
    audiences: list[str] = []
    occasions: list[str] = []
    for w in _WORD.findall(text):
        a = AUDIENCE_CUES.get(w)
        if a is not None and a not in audiences:
            audiences.append(a)
        o = OCCASION_CUES.get(w)
        if o is not None and o not in occasions:
            occasions.append(o)
    return audiences, occasions


def profile(item: ItemInput) -> dict[str, Any]:
    hits = _vocab_hits(item)
    tier, family = price_tier(item, hits)
    ptype = product_type(item)
    attrs = attributes(item)
    path = [c.strip() for c in item.categories if c.strip()]
    return {
        "reasoning": (
            f"Offline heuristic. 1. Category path taken from the {len(path)} listed categories. "
            f"2. Product type '{ptype}' from the most specific category or the title noun. "
            f"3. {len(attrs)} attributes from the attribute map, brand and title patterns. "
            f"4. Price {item.price} against the {family} reference bands {PRICE_BANDS[family]} gives {tier}."
        ),
        "category_path": path,
        "product_type": ptype,
        "attributes": [{"name": k, "value": v} for k, v in attrs.items()],
        "price_tier": tier,
    }


def audience(item: ItemInput) -> dict[str, Any]:
    hits = _vocab_hits(item)
    cues, occasion_cues = _cues(item)
    audiences = (cues + [a for a in _merge(hits, 1) if a not in cues])[:MAX_RULE_VALUES]
    occasions = (occasion_cues + [o for o in _merge(hits, 5) if o not in occasion_cues])[:MAX_RULE_VALUES]
    keys = ", ".join(k for k, _ in hits) or "none"
    return {
        "reasoning": (
            f"Offline heuristic. 1. Vocabulary words matched: {keys}. "
            f"2. Audience cues in the text: {', '.join(cues) or 'none'}. "
            "3. Scenarios and occasions from the matched words and occasion cues."
        ),
        "audiences": audiences,
        "scenarios": _merge(hits, 2),
        "occasions": occasions,
    }


def relations(item: ItemInput) -> dict[str, Any]:
    hits = _vocab_hits(item)
    own = {product_type(item)} | {k for k, _ in hits}
    keys = ", ".join(k for k, _ in hits) or "none"
    return {
        "reasoning": f"Offline heuristic. 1. Vocabulary words matched: {keys}. 2. Their related product types.",
        "complements": _merge(hits, 3, own),
        "substitutes": _merge(hits, 4, own),
    }


def _plain(v: str) -> str:
    return " ".join(v.lower().split())


def reconcile(item: ItemInput, answers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    prof, aud, rel = answers.get("profiler", {}), answers.get("audience", {}), answers.get("relations", {})
    ptype = prof.get("product_type") or product_type(item)
    own = _plain(ptype)
    substitutes = [s for s in rel.get("substitutes", []) if _plain(s) != own]
    subs = {_plain(s) for s in substitutes}
    complements = [c for c in rel.get("complements", []) if _plain(c) != own and _plain(c) not in subs]
    words = set(_WORD.findall(item.title.lower()))
    audiences = list(aud.get("audiences", []))
    dropped = []
    if words & {"women", "womens", "woman", "ladies"} and not words & {"men", "mens", "unisex"}:
        dropped.append("men")
    if words & {"men", "mens"} and not words & {"women", "womens", "unisex"}:
        dropped.append("women")
    audiences = [a for a in audiences if _plain(a) not in dropped]
    attrs = prof.get("attributes", {})
    path = prof.get("category_path") or [c.strip() for c in item.categories if c.strip()]
    tier = prof.get("price_tier") or "unknown"
    summary = f"{item.title} is a {ptype}"
    if item.brand:
        summary += f" by {item.brand}"
    if path:
        summary += f" in {' > '.join(path)}"
    summary += "."
    shown = [f"{k} {v}" for k, v in attrs.items() if k != "brand"][:4]
    if shown:
        summary += f" Key attributes: {', '.join(shown)}."
    if tier != "unknown":
        summary += f" It is priced in the {tier} tier."
    if audiences or aud.get("scenarios"):
        summary += f" Suited to {', '.join(audiences[:3]) or 'general shoppers'}"
        summary += f" for {', '.join(aud.get('scenarios', [])[:3])}." if aud.get("scenarios") else "."
    if complements:
        summary += f" Often paired with {', '.join(complements[:3])}."
    return {
        "reasoning": (
            "Offline heuristic. 1. Took the profile as given. 2. Dropped relations naming the item's own "
            f"product type and complements that are also substitutes. 3. Audiences dropped as contradicted "
            f"by the title: {', '.join(dropped) or 'none'}. 4. Summary assembled from the kept fields."
        ),
        "category_path": path,
        "product_type": ptype,
        "attributes": [{"name": k, "value": v} for k, v in attrs.items()],
        "price_tier": tier,
        "audiences": audiences,
        "scenarios": list(aud.get("scenarios", [])),
        "occasions": list(aud.get("occasions", [])),
        "complements": complements,
        "substitutes": substitutes,
        "summary": summary,
    }


_HANDLERS = {"profiler": profile, "audience": audience, "relations": relations}


class OfflineBackend:
    """The catalog heuristic behind the Backend interface. Agents whose requests are not about one item
    (a user's interests) bring their own heuristic as `answerers` (agent name -> answer of a request),
    so this module needs none of theirs."""

    def __init__(self, answerers: dict[str, Callable[[CompletionRequest], dict[str, Any]]] | None = None):
        self.answerers = dict(answerers or {})

    async def complete(self, request: CompletionRequest) -> Completion:
        if request.agent in self.answerers:
            content = _ENCODE(self.answerers[request.agent](request))
            return Completion(choices=[content] * request.n, finish_reasons=["stop"] * request.n)
        item = request.item
        if item is None:
            raise ValueError("the offline backend needs request.item")
        if request.agent == "reconciler":
            answer = reconcile(item, request.context or {})
        else:
            answer = _HANDLERS[request.agent](item)
        # Answer exactly the fields the agent's schema asks for: the profiler's category path only
        # when the catalog lists none (then the heuristic, blind like any model, has none to give).
        asked = request.response_format["json_schema"]["schema"]["properties"]
        content = _ENCODE({k: v for k, v in answer.items() if k in asked})
        return Completion(choices=[content] * request.n, finish_reasons=["stop"] * request.n)

    async def aclose(self) -> None:
        return None
