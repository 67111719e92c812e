"""Self-consistency pruning: keep what a strict majority of sampled reasoning paths agrees on.

Sampling k paths and voting per field (REG4Rec's consistency-oriented pruning) trades k times the
decode work for dropping the idiosyncratic values a single path invents. Shares are always taken
over the k paths requested, not the paths that arrived: a path lost to errors counts as a
disagreement, so a value never looks better supported than it was.

Vote by field kind:
- scalar: the most common value, kept when its count is more than k/2;
- set (audiences, complements, ...): each element kept when more than k/2 paths list it;
- path (category_path): the longest prefix more than k/2 paths share, since mixing levels of
  different paths would produce a path nobody proposed;
- dict (attributes): per key, the majority value;
- text (summary): no vote on free text; the path agreeing best with the voted fields supplies it.
Values compare case- and whitespace-insensitively; the first surface form seen is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .schemas import FIELD_KINDS


@dataclass
class Consensus:
    values: dict[str, Any]
    # share of the k paths agreeing on each kept value; for a dropped scalar, the best share seen.
    # Attribute keys appear as "attributes.<key>".
    confidence: dict[str, float] = field(default_factory=dict)
    unanimous: bool = False  # all k paths arrived and were identical


def norm(value: str) -> str:
    return " ".join(value.lower().split())


def _share(count: int, k: int) -> float:
    return round(count / k, 4)


def _majority(count: int, k: int) -> bool:
    return 2 * count > k


def vote_scalar(values: list[Any], k: int) -> tuple[Any, float]:
    counts: dict[Any, int] = {}
    first: dict[Any, Any] = {}
    for v in values:
        if v is None:
            continue
        key = norm(v) if isinstance(v, str) else v
        if isinstance(v, str) and not key:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, v)
    if not counts:
        return None, 0.0
    best = max(counts, key=lambda key: counts[key])  # ties: the first seen wins (dicts keep order)
    c = counts[best]
    return (first[best] if _majority(c, k) else None), _share(c, k)


def vote_set(lists: list[list[str]], k: int) -> tuple[list[str], float]:
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for values in lists:
        seen = set()
        for v in values:
            key = norm(v)
            if key and key not in seen:
                seen.add(key)
                counts[key] = counts.get(key, 0) + 1
                first.setdefault(key, v)
    kept = [key for key in counts if _majority(counts[key], k)]
    if kept:
        return [first[key] for key in kept], _share(sum(counts[key] for key in kept), k * len(kept))
    return [], _share(sum(1 for values in lists if not values), k)


def vote_path(paths: list[list[str]], k: int) -> tuple[list[str], float]:
    normed = [tuple(norm(v) for v in p) for p in paths]
    kept: tuple[str, ...] = ()
    kept_count = sum(1 for p in normed if not p)
    longest = max((len(p) for p in normed), default=0)
    for depth in range(1, longest + 1):
        counts: dict[tuple[str, ...], int] = {}
        for p in normed:
            if len(p) >= depth:
                counts[p[:depth]] = counts.get(p[:depth], 0) + 1
        best = max(counts, key=lambda key: counts[key])
        if not _majority(counts[best], k):
            break
        kept, kept_count = best, counts[best]
    if not kept:
        return [], _share(kept_count, k)
    source = next(paths[i] for i, p in enumerate(normed) if p[: len(kept)] == kept)
    return list(source[: len(kept)]), _share(kept_count, k)


def vote_dict(dicts: list[dict[str, str]], k: int) -> tuple[dict[str, str], float, dict[str, float]]:
    keys: dict[str, None] = {}
    for d in dicts:
        for key in d:
            keys.setdefault(norm(key), None)
    kept: dict[str, str] = {}
    per_key: dict[str, float] = {}
    for key in keys:
        values = [next((v for kk, v in d.items() if norm(kk) == key), None) for d in dicts]
        value, share = vote_scalar(values, k)
        if value is not None:
            kept[key] = value
            per_key[key] = share
    if kept:
        return kept, round(sum(per_key.values()) / len(per_key), 4), per_key
    return {}, _share(sum(1 for d in dicts if not d), k), {}


def _similarity(kind: str, value: Any, kept: Any) -> float:
    if kind == "scalar":  # an empty string and a dropped value are the same absence
        a = (norm(value) or None) if isinstance(value, str) else value
        b = (norm(kept) or None) if isinstance(kept, str) else kept
        return 1.0 if a == b else 0.0
    if kind == "dict":
        a = {(norm(x), norm(y)) for x, y in value.items()}
        b = {(norm(x), norm(y)) for x, y in (kept or {}).items()}
    else:
        a = {norm(x) for x in value}
        b = {norm(x) for x in (kept or [])}
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def consolidate(paths: list[dict[str, Any]], fields: tuple[str, ...] | list[str], k: int) -> Consensus:
    """Vote each field over the sampled paths (dicts of validated answers), k being the number asked."""
    if k < 1:
        raise ValueError("k must be >= 1")
    if len(paths) == k and all(p == paths[0] for p in paths[1:]):
        return _unanimous(paths[0], fields)
    return vote(paths, fields, k)


def vote(paths: list[dict[str, Any]], fields: tuple[str, ...] | list[str], k: int) -> Consensus:
    """The full vote, field by field (consolidate() skips it when every path is the same)."""
    values: dict[str, Any] = {}
    confidence: dict[str, float] = {}
    text_fields = []
    for f in fields:
        kind = FIELD_KINDS[f]
        column = [p.get(f) for p in paths]
        if kind == "scalar":
            values[f], confidence[f] = vote_scalar(column, k)
        elif kind == "set":
            values[f], confidence[f] = vote_set([c or [] for c in column], k)
        elif kind == "path":
            values[f], confidence[f] = vote_path([c or [] for c in column], k)
        elif kind == "dict":
            values[f], confidence[f], per_key = vote_dict([c or {} for c in column], k)
            confidence.update({f"{f}.{key}": share for key, share in per_key.items()})
        else:
            text_fields.append(f)
    voted = [f for f in fields if FIELD_KINDS[f] != "text"]
    for f in text_fields:
        best_score, best_text = -1.0, None
        for p in paths:
            text = p.get(f)
            if not isinstance(text, str) or not text.strip():
                continue
            score = (
                sum(_similarity(FIELD_KINDS[g], p.get(g), values[g]) for g in voted) / len(voted)
                if voted
                else 1.0
            )
            if score > best_score:
                best_score, best_text = score, text
        values[f] = best_text
        confidence[f] = round(max(best_score, 0.0) * len(paths) / k, 4) if best_text is not None else 0.0
    return Consensus(values=values, confidence=confidence)


def _unanimous(path: dict[str, Any], fields: tuple[str, ...] | list[str]) -> Consensus:
    """What the vote yields when all k paths are the same (k=1, greedy or offline): the path itself.

    A shortcut, not a different rule: paths are validated answers (lists already deduplicated and
    whitespace-squashed by the schema), and the tests check this against the full vote.
    """
    values: dict[str, Any] = {}
    confidence: dict[str, float] = {}
    for f in fields:
        v = path.get(f)
        kind = FIELD_KINDS[f]
        if kind == "dict":
            values[f] = dict(v or {})
            confidence[f] = 1.0
            for key in values[f]:
                confidence[f"{f}.{key}"] = 1.0
        elif kind in ("set", "path"):
            values[f], confidence[f] = list(v or []), 1.0
        elif v is None or (isinstance(v, str) and not v.strip()):
            values[f], confidence[f] = None, 0.0
        else:
            values[f], confidence[f] = v, 1.0
    return Consensus(values=values, confidence=confidence, unanimous=True)
