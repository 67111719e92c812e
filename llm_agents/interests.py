"""The interests agent: a user's recent history in, plausible interests beyond it out.

This is the LLM side of beyond-log inference (ReaSeq's implicit path, LLM variant): the job
(`jobs/beyond_llm.py`) maps the phrases back to catalog items by embedding similarity. Here there is
no Spark and no embedding, only the agent:

- Prompt: the same system message as the item agents (identical bytes, so vLLM's prefix cache
  shares it), then the interests task text, then the user's last `HISTORY_ITEMS` items (title,
  category path and the item-knowledge summary when there is one, each field truncated). The
  history is untrusted catalog text, so it travels exactly like an item: escaped JSON inside the
  `<item>` block, which the system prompt declares to be data, never instructions; and the answer is
  validated against the schema on receipt, so an obeyed injection cannot put a foreign shape in a row.
- Answer (`schemas.InterestsAnswer`): reasoning first, then `covered` (the product types the history
  already has), then `interests` (3-8 product types or needs beyond it, most likely first).
- On receipt interests are normalised (lowercase, squashed), capped at `MAX_INTERESTS`, and any that
  name something the history covers (the answer's own `covered`, or a history item's product type,
  compared word by word in singular) are dropped. With k sampled paths each phrase is weighted by
  the share of paths naming it times `RANK_DECAY` ** its mean rank; there is no majority cut, since
  different plausible interests are the point, but agreement still ranks first.
- Backends: `openai` through the same retry, repair, circuit-breaker and token accounting as the
  item agents (runner.FanOut), and `offline`, a deterministic heuristic (`offline_interests`): the
  complements (weight 1) and substitutes (weight 0.5) of the recent items' knowledge, decayed by
  `RECENCY_DECAY` per step back in time, minus what the history covers. Offline rows say
  model = `offline-interests-v1`.

`infer_interests(histories, config)` returns one `InterestsResult` per user, in input order: status
ok, failed (after retries; with the reason and the raw answer) or skipped (no usable history item,
no call made). A server that is gone raises `BackendUnavailable`, as `reason_items` does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .backend import Backend
from .config import LLMConfig
from .offline import product_type, relations, singular
from .prompts import _REPAIR_TEMPLATE, _USER_TEMPLATE, SYSTEM_PROMPT, Agent, _safe_json, build_messages
from .runner import FanOut, ItemFailed, Tally, make_backend, new_loop
from .schemas import MAX_PHRASE, InterestsAnswer, voted_fields, wire_schema
from .types import HistoryItem, InterestsResult, ItemInput, UserHistory

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

INTERESTS_SERIES = "interests-v1"
OFFLINE_INTERESTS_MODEL = "offline-interests-v1"
HISTORY_ITEMS = 10  # most recent items shown to the model
MAX_INTERESTS = 8
MAX_HISTORY_TITLE = 200
MAX_HISTORY_CATEGORY = 60
MAX_HISTORY_LEVELS = 6
MAX_HISTORY_SUMMARY = 400
RANK_DECAY = 0.95  # weight of an interest per place down the answer's list
RECENCY_DECAY = 0.8  # offline: weight of an item per step back in the history
SUBSTITUTE_WEIGHT = 0.5  # offline: a substitute counts half a complement
MAX_RAW = 8192

TASK = """\
Task (interests): infer what this shopper plausibly wants next beyond what they already have. Here \
the item block holds, instead of one catalog item, the shopper's recent history as "recent_items", \
oldest first and most recent last; each has a title, its categories and, when known, a summary.
- covered: the product types the history already covers, one per distinct kind of item in it.
- interests: 3 to 8 product types or needs the shopper plausibly wants next that are NOT already in \
the history: products that complement recent items, replace or upgrade them, or serve the same \
activities and people. Weigh recent items more than older ones; most likely first. Name product \
types, not brands or specific listings."""

_RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "reaseq_interests", "schema": wire_schema(InterestsAnswer), "strict": True},
}
_LIMITS = [
    HISTORY_ITEMS,
    MAX_INTERESTS,
    MAX_HISTORY_TITLE,
    MAX_HISTORY_CATEGORY,
    MAX_HISTORY_LEVELS,
    MAX_HISTORY_SUMMARY,
    MAX_PHRASE,
    RANK_DECAY,
]


def _fingerprint() -> str:
    payload = {
        "system": SYSTEM_PROMPT,
        "task": TASK,
        "user": [_USER_TEMPLATE, _REPAIR_TEMPLATE],
        "format": _RESPONSE_FORMAT,
        "limits": _LIMITS,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


# Bump the series by hand for a change of meaning; the hash suffix follows any template, schema or limit.
INTERESTS_PROMPT_VERSION = f"{INTERESTS_SERIES}-{_fingerprint()[:8]}"
INTERESTS = Agent(
    name="interests",
    task=TASK,
    answer_model=InterestsAnswer,
    fields=tuple(voted_fields(InterestsAnswer)),
    response_format=_RESPONSE_FORMAT,
    version=f"interests-{_fingerprint()[:8]}",
)


def interests_model_name(config: LLMConfig) -> str:
    """The `model` lineage value of interests this config produces."""
    if config.backend == "offline":
        return OFFLINE_INTERESTS_MODEL
    assert config.model  # guaranteed by the config's validator
    return config.model


# -- input ---------------------------------------------------------------------------------------


def _usable(item: HistoryItem) -> bool:
    return bool(item.title.strip() or item.category_path)


def recent_items(items: list[HistoryItem]) -> list[HistoryItem]:
    """The window both backends see: the last HISTORY_ITEMS items that have a title or a category."""
    return [it for it in items if _usable(it)][-HISTORY_ITEMS:]


def render_history(items: list[HistoryItem]) -> str:
    """The history as the data block, oldest first; ids are left out since they carry no knowledge."""
    rows = []
    for it in recent_items(items):
        row: dict[str, Any] = {
            "title": " ".join(it.title.split())[:MAX_HISTORY_TITLE],
            "categories": [c[:MAX_HISTORY_CATEGORY] for c in it.category_path[:MAX_HISTORY_LEVELS]],
        }
        if it.summary:
            row["summary"] = " ".join(it.summary.split())[:MAX_HISTORY_SUMMARY]
        rows.append(row)
    return _safe_json({"recent_items": rows})


def build_interest_messages(items: list[HistoryItem]) -> list[dict[str, str]]:
    return build_messages(INTERESTS, render_history(items))


# -- phrases -------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def normalise(phrase: str) -> str:
    """The surface form kept: lowercase, whitespace squashed, at most MAX_PHRASE characters."""
    return " ".join(phrase.lower().split())[:MAX_PHRASE]


def phrase_key(phrase: str) -> str:
    """What two phrases must share to be the same interest: their words, each in singular."""
    return " ".join(singular(w) for w in _WORD.findall(phrase.lower()))


def _as_item(it: HistoryItem) -> ItemInput:
    return ItemInput(
        item_id=it.item_id,
        title=it.title,
        description=it.summary,
        categories=list(it.category_path),
        brand=None,
        price=None,
        attributes={},
        content_hash="",
    )


def _product_type(it: HistoryItem) -> str:
    return it.product_type or product_type(_as_item(it))


def covered_keys(items: list[HistoryItem]) -> dict[str, str]:
    """Keys (and surface forms) of the product types the history covers: each item's knowledge
    product type, or the offline heuristic's reading of its category and title when it has none."""
    out: dict[str, str] = {}
    for it in items:
        ptype = normalise(_product_type(it))
        key = phrase_key(ptype)
        if key:
            out.setdefault(key, ptype)
    return out


# -- the offline backend's answer ----------------------------------------------------------------


def offline_interests(history: list[HistoryItem]) -> dict[str, Any]:
    """Deterministic interests from the history's item knowledge, shaped like InterestsAnswer.

    Complements of each recent item score its recency weight (RECENCY_DECAY ** steps back from the
    most recent), substitutes half of it; an item without knowledge relations falls back to the
    offline vocabulary's relations of its title and categories. Phrases the history covers are
    dropped; the rest are ranked by total weight (first seen, most recent first, breaks ties).
    """
    recent = recent_items(history)
    covered = covered_keys(recent)
    scores: dict[str, float] = {}
    surface: dict[str, str] = {}
    from_vocab = 0
    for steps, it in enumerate(reversed(recent)):
        weight = RECENCY_DECAY**steps
        comps, subs = list(it.complements), list(it.substitutes)
        if not comps and not subs:
            rel = relations(_as_item(it))
            comps, subs = rel["complements"], rel["substitutes"]
            from_vocab += 1
        for phrase, w in [(c, weight) for c in comps] + [(s, weight * SUBSTITUTE_WEIGHT) for s in subs]:
            key = phrase_key(phrase)
            if not key:
                continue
            surface.setdefault(key, normalise(phrase))
            scores[key] = scores.get(key, 0.0) + w
    order = {key: i for i, key in enumerate(surface)}
    dropped = [surface[k] for k in surface if k in covered]
    kept = sorted((k for k in surface if k not in covered), key=lambda k: (-round(scores[k], 9), order[k]))
    interests = [surface[k] for k in kept[:MAX_INTERESTS]]
    return {
        "reasoning": (
            f"Offline heuristic. 1. The history's {len(recent)} recent items cover: "
            f"{', '.join(covered.values()) or 'nothing recognisable'}. "
            f"2. Complements (weight 1) and substitutes (weight {SUBSTITUTE_WEIGHT}) of each item, decayed by "
            f"{RECENCY_DECAY} per step back in time; {from_vocab} items without knowledge relations used the "
            f"offline vocabulary. 3. Dropped as already covered: {', '.join(dropped) or 'none'}. "
            f"4. Kept the top {len(interests)} of {len(kept)} by weight."
        ),
        "covered": list(covered.values()),
        "interests": interests,
    }


# -- merging sampled answers ---------------------------------------------------------------------


def merge_answers(
    paths: list[dict[str, Any]], k: int, history: list[HistoryItem]
) -> tuple[list[str], list[float], list[str]]:
    """Interests, their weights and the covered list from k validated answers (fewer when some were lost).

    weight = (paths naming the phrase / k) * RANK_DECAY ** (its mean place in those lists); phrases
    that the answers or the history's product types say are covered are dropped.
    """
    covered = covered_keys(history)
    for p in paths:
        for c in p.get("covered") or []:
            key = phrase_key(c)
            if key:
                covered.setdefault(key, normalise(c))
    count: dict[str, int] = {}
    rank_sum: dict[str, int] = {}
    surface: dict[str, str] = {}
    for p in paths:
        seen: set[str] = set()
        for rank, phrase in enumerate((p.get("interests") or [])[:MAX_INTERESTS]):
            key = phrase_key(phrase)
            if not key or key in seen:
                continue
            seen.add(key)
            surface.setdefault(key, normalise(phrase))
            count[key] = count.get(key, 0) + 1
            rank_sum[key] = rank_sum.get(key, 0) + rank
    order = {key: i for i, key in enumerate(surface)}
    weights = {
        key: round(count[key] / k * RANK_DECAY ** (rank_sum[key] / count[key]), 6)
        for key in surface
        if key not in covered
    }
    kept = sorted(weights, key=lambda key: (-weights[key], order[key]))[:MAX_INTERESTS]
    return [surface[key] for key in kept], [weights[key] for key in kept], list(covered.values())


# -- orchestration -------------------------------------------------------------------------------


class _InterestsRun(FanOut):
    """The item agents' request machinery (semaphore, retries, repair, circuit) for one agent per user."""

    def __init__(self, config: LLMConfig, backend: Backend, rng: random.Random | None = None):
        super().__init__(config, backend, rng)
        self.model = interests_model_name(config)

    def _result(self, user_id: str, status: str, tally: Tally, started: float, **kw: Any) -> InterestsResult:
        return InterestsResult(
            user_id=user_id,
            prompt_version=INTERESTS_PROMPT_VERSION,
            model=self.model,
            status=status,
            tokens_in=tally.tokens_in,
            tokens_out=tally.tokens_out,
            llm_calls=tally.llm_calls,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
            **kw,
        )

    async def user(self, user: UserHistory) -> InterestsResult:
        started = time.perf_counter()
        tally = Tally()
        items = recent_items(user.items)
        if not items:
            return self._result(user.user_id, "skipped", tally, started, error="no_history: no item with a title")
        messages = build_interest_messages(items)
        try:
            paths = await self._sample(
                tally, INTERESTS, None, messages, None, history=items, subject=f"user {user.user_id}"
            )
        except ItemFailed as f:
            return self._result(user.user_id, "failed", tally, started, error=f.reason, raw=f.raw)
        interests, weights, covered = merge_answers(paths, self.cfg.samples_k, items)
        traces = {
            "prompt_version": INTERESTS_PROMPT_VERSION,
            "model": self.model,
            "agent_version": INTERESTS.version,
            "k": self.cfg.samples_k,
            "temperature": self.cfg.temperature,
            "paths": paths,
        }
        return self._result(
            user.user_id,
            "ok",
            tally,
            started,
            interests=interests,
            weights=weights,
            covered=covered,
            traces=json.dumps(traces, ensure_ascii=False),
        )

    async def run_users(self, users: list[UserHistory], progress: Progress | None) -> list[InterestsResult]:
        """Every user through runner.FanOut._pool: the same workers, circuit and error handling as items."""
        completed = await self._pool(users, self.user, "user_id", progress)
        total = len(users)
        counts: dict[str, int] = {}
        for r in completed:
            counts[r.status] = counts.get(r.status, 0) + 1
        log.info(
            "inferred interests of %d users with %s (%s): %s calls=%d tokens_in=%d tokens_out=%d retries=%s",
            total,
            self.model,
            INTERESTS_PROMPT_VERSION,
            counts,
            sum(r.llm_calls for r in completed),
            sum(r.tokens_in for r in completed),
            sum(r.tokens_out for r in completed),
            dict(self.retries),
        )
        return completed  # type: ignore[return-value]


async def infer_interests_async(
    histories: list[UserHistory],
    config: LLMConfig,
    progress: Progress | None = None,
    *,
    backend: Backend | None = None,
    rng: random.Random | None = None,
) -> list[InterestsResult]:
    """Interests per user, in input order. `backend`/`rng` are for tests; a passed backend stays open."""
    if not histories:
        return []
    own = backend is None
    backend = backend or make_backend(config, {"interests": lambda request: offline_interests(request.history or [])})
    try:
        return await _InterestsRun(config, backend, rng).run_users(list(histories), progress)
    finally:
        if own:
            await backend.aclose()


def infer_interests(
    histories: list[UserHistory], config: LLMConfig, progress: Progress | None = None
) -> list[InterestsResult]:
    """Synchronous entry for Spark tasks and scripts; same order as the input."""

    def go() -> list[InterestsResult]:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            return runner.run(infer_interests_async(histories, config, progress))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return go()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm_agents") as pool:
        return pool.submit(go).result()
