"""Orchestration: per item, three agents concurrently, then the reconciler; many items at once.

Concurrency is bounded where it costs something, at the server: one semaphore of
`max_concurrency` slots covers every in-flight request of every item, and is held only while a
request is on the wire (not during backoff), so a partition keeps the server exactly as busy as
configured. Items are pulled by a pool of workers, so a million-row partition never materialises
a million coroutines.

Failure policy, from narrow to wide:
- a bad choice (invalid JSON, schema violation, truncation) gets one repair re-ask, then retries;
- 429/5xx/timeouts/connection errors are retried with exponential backoff and full jitter;
- an item whose agent still fails comes back status="failed" with a reason code and the last raw
  answer, and its sibling agent calls are cancelled;
- a server that is gone (N consecutive requests failing at connection level after their retries)
  or refuses the configuration (401/403/404) stops the run with BackendUnavailable, because
  writing the whole catalog as failed would only hide an outage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .backend import Backend, BackendError, Completion, CompletionRequest
from .config import BackendUnavailable, LLMConfig, model_name
from .consensus import Consensus, consolidate
from .prompts import (
    FIELD_OWNER,
    PROMPT_VERSION,
    RECONCILER,
    Agent,
    build_completion_prompt,
    build_messages,
    render_answers,
    render_item,
    repair_messages,
    upstream_for,
)
from .types import HistoryItem, ItemInput, KnowledgeResult

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
_ENCODE = json.JSONEncoder(ensure_ascii=False).encode
MAX_RAW = 8192
# Where each field of a knowledge row comes from when it is not the model: catalog facts.
CATALOG = "catalog"
_REPAIRABLE = frozenset({"invalid_json", "schema_violation", "truncated", "empty_content"})


class ItemFailed(Exception):
    def __init__(self, code: str, agent: str, detail: str, raw: str | None):
        super().__init__(f"{code}: {agent}: {detail}")
        self.reason = f"{code}: {agent}: {detail}"
        self.raw = raw


class _CircuitOpen(Exception):
    pass


class _Fatal(Exception):
    pass


@dataclass
class Tally:
    tokens_in: int = 0
    tokens_out: int = 0
    llm_calls: int = 0
    valid: int = 0  # answers (choices) accepted on receipt
    rejected: Counter[str] = None  # type: ignore[assignment]  # answers refused on receipt, by reason

    def __post_init__(self) -> None:
        self.rejected = Counter()


class _Circuit:
    """Counts consecutive requests that ended in a connection-level failure after their retries."""

    def __init__(self, threshold: int):
        self.threshold = threshold
        self.streak = 0
        self.successes = 0
        self.connection_failures = 0
        self.last_error = ""
        self.opened_after = 0
        self.event = asyncio.Event()

    @property
    def open(self) -> bool:
        return self.event.is_set()

    def answered(self) -> None:
        self.streak = 0
        self.successes += 1

    def failed(self, error: BackendError) -> None:
        self.streak += 1
        self.connection_failures += 1
        self.last_error = str(error)[:300]
        if self.streak >= self.threshold and not self.event.is_set():
            self.opened_after = self.streak
            self.event.set()


def make_backend(config: LLMConfig, offline_answerers: dict | None = None) -> Backend:
    """The backend of `config`; `offline_answerers`: the offline heuristic of agents not about one item."""
    if config.backend == "offline":
        from .offline import OfflineBackend

        return OfflineBackend(offline_answerers)
    from .http_backend import OpenAIBackend

    return OpenAIBackend(config)


def _problem(
    agent: Agent, content: str | None, finish: str | None
) -> tuple[dict[str, Any] | None, BackendError | None]:
    """Validate one choice on receipt; a reject carries the reason code and the raw text."""
    if content is None:
        return None, BackendError("empty_content", "choice has no message content", retryable=True)
    try:
        # The validated model's own field dict: no deep copy, values are fresh from the parser.
        return dict(agent.answer_model.model_validate_json(content).__dict__), None
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        if any(err["type"] == "json_invalid" for err in errors):
            if finish == "length":
                code, detail = "truncated", "the answer was cut off at max_tokens; answer more briefly"
            else:
                code, detail = "invalid_json", f"not valid JSON ({errors[0]['msg']})"
        else:
            code = "schema_violation"
            detail = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in errors
            )
        return None, BackendError(code, detail[:600], retryable=True, raw=content[:MAX_RAW])


class FanOut:
    def __init__(self, config: LLMConfig, backend: Backend, rng: random.Random | None = None):
        self.cfg = config
        self.backend = backend
        self.model = model_name(config)
        self.rng = rng or random.Random()
        self.sem = asyncio.Semaphore(config.max_concurrency)
        self.circuit = _Circuit(config.circuit_failures)
        self.retries: Counter[str] = Counter()

    async def _backoff(self, failures: int, retry_after: float | None) -> None:
        cap = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** (failures - 1))
        delay = self.rng.uniform(0, cap)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.cfg.backoff_max_s))
        if delay > 0:
            await asyncio.sleep(delay)

    async def _send(self, request: CompletionRequest) -> Completion:
        async with self.sem:
            if self.circuit.open:  # checked after the wait for a slot, which can be long
                raise _CircuitOpen
            return await self.backend.complete(request)

    async def _sample(
        self,
        tally: Tally,
        agent: Agent,
        item: ItemInput | None,
        messages: list[dict[str, str]],
        context: Any,
        history: list[HistoryItem] | None = None,
        subject: str | None = None,
        prompt: str | None = None,
    ) -> list[dict[str, Any]]:
        """k validated paths for one agent: n=k in one call, topped up when fewer come back.

        When retries run out, a strict majority of k paths is still enough to vote on (missing
        paths count as dissent, see consensus.py); fewer fails the item so a rerun retries it.
        """
        k = self.cfg.samples_k
        paths: list[dict[str, Any]] = []
        failures = 0
        repaired = False
        outgoing = messages
        while len(paths) < k:
            if self.circuit.open:
                raise _CircuitOpen
            need = k - len(paths)
            request = CompletionRequest(
                agent=agent.name,
                messages=outgoing,
                response_format=agent.response_format,
                n=need,
                temperature=float(self.cfg.temperature or 0.0),
                max_tokens=self.cfg.max_tokens,
                item=item,
                context=context,
                history=history,
                prompt=prompt,
            )
            try:
                if need > 1 and self.cfg.samples_via == "requests":
                    # k one-choice requests at once: each answer's usage is then its own (llama-server
                    # bills only the first of n choices), and the slots' prompt cache shares the prefix.
                    # The answers that arrived are kept (and billed) when a sibling request fails; the
                    # loop asks again for the missing paths only.
                    tally.llm_calls += need
                    outcomes = await asyncio.gather(*(self._send(_one(request)) for _ in range(need)),
                                                    return_exceptions=True)
                    arrived = [o for o in outcomes if isinstance(o, Completion)]
                    errors = [o for o in outcomes if isinstance(o, BaseException)]
                    fatal = [e for e in errors if not isinstance(e, BackendError) or e.fatal]
                    if fatal or not arrived:
                        raise (fatal or errors)[0]
                    for e in errors:
                        self.retries[e.code] += 1
                    completion = _merge(arrived)
                else:
                    tally.llm_calls += 1
                    completion = await self._send(request)
            except BackendError as e:
                if e.fatal:
                    raise _Fatal(e.detail) from e
                if not e.connection:
                    self.circuit.answered()  # it answered, if only to refuse
                failures += 1
                self.retries[e.code] += 1
                if not e.retryable or failures > self.cfg.max_retries:
                    if e.connection:
                        self.circuit.failed(e)
                    if 2 * len(paths) > k:
                        return paths  # a majority of paths arrived; the vote counts the rest as dissent
                    raise ItemFailed(e.code, agent.name, e.detail, e.raw) from None
                log.debug("retrying %s for %s after %s", agent.name, subject or getattr(item, "item_id", None), e.code)
                outgoing = messages
                await self._backoff(failures, e.retry_after)
                continue
            self.circuit.answered()
            tally.tokens_in += completion.prompt_tokens
            tally.tokens_out += completion.completion_tokens
            problem: BackendError | None = None
            finish = completion.finish_reasons
            for i, content in enumerate(completion.choices):
                if len(paths) == k:
                    break
                answer, reject = _problem(agent, content, finish[i] if i < len(finish) else None)
                if answer is not None:
                    paths.append(answer)
                    tally.valid += 1
                else:
                    tally.rejected[reject.code] += 1
                    if problem is None:
                        problem = reject
            if len(paths) == k:
                break
            if problem is None:
                if completion.choices:
                    continue  # the server returned fewer choices than n: ask for the rest
                problem = BackendError("empty_choices", "the response had no choices", retryable=True)
            failures += 1
            self.retries[problem.code] += 1
            if failures > self.cfg.max_retries:
                if 2 * len(paths) > k:
                    return paths
                raise ItemFailed(problem.code, agent.name, problem.detail, problem.raw)
            if not repaired and problem.code in _REPAIRABLE and prompt is None:
                # A chat model is shown its rejected answer once; a base model (completion profile)
                # cannot follow such a note, so it simply samples again.
                repaired = True
                outgoing = repair_messages(messages, problem.raw, problem.detail)
                continue
            outgoing = messages
            await self._backoff(failures, None)
        return paths

    async def _agent(
        self,
        tally: Tally,
        agent: Agent,
        item: ItemInput,
        item_block: str,
        context: dict[str, dict[str, Any]] | None = None,
    ) -> tuple[list[dict[str, Any]], Consensus]:
        answers_block = render_answers(context) if context is not None else None
        messages = build_messages(agent, item_block, answers_block)
        prompt = (
            build_completion_prompt(agent, item_block, answers_block)
            if self.cfg.prompt_profile == "completion"
            else None
        )
        paths = await self._sample(tally, agent, item, messages, context, prompt=prompt)
        return paths, consolidate(paths, agent.fields, self.cfg.samples_k)

    async def item(self, item: ItemInput) -> KnowledgeResult:
        started = time.perf_counter()
        tally = Tally()
        block = render_item(item)
        agents = upstream_for(item)
        try:
            upstream = await _all([self._agent(tally, a, item, block) for a in agents])
            context = {a.name: cons.values for a, (_, cons) in zip(agents, upstream, strict=True)}
            final_paths, final = await self._agent(tally, RECONCILER, item, block, context)
        except ItemFailed as f:
            return KnowledgeResult(
                item_id=item.item_id,
                content_hash=item.content_hash,
                prompt_version=PROMPT_VERSION,
                model=self.model,
                status="failed",
                traces="{}",
                tokens_in=tally.tokens_in,
                tokens_out=tally.tokens_out,
                llm_calls=tally.llm_calls,
                latency_ms=round((time.perf_counter() - started) * 1000, 3),
                answers_valid=tally.valid,
                answers_rejected=dict(tally.rejected),
                error=f.reason,
                raw=f.raw,
            )
        by_agent = {a.name: cons for a, (_, cons) in zip(agents, upstream, strict=True)}
        confidence: dict[str, float] = {}
        for f, share in final.confidence.items():
            owner = FIELD_OWNER.get(f)
            if owner is not None:  # a value is only as agreed as its weaker stage
                share = min(share, by_agent[owner].confidence.get(f, share))
            confidence[f] = share
        traces = {
            "prompt_version": PROMPT_VERSION,
            "model": self.model,
            "agent_versions": [a.version for a in (*agents, RECONCILER)],
            "k": self.cfg.samples_k,
            "temperature": self.cfg.temperature,
            "agents": {
                a.name: _trace(paths, cons)
                for a, (paths, cons) in zip(
                    (*agents, RECONCILER), (*upstream, (final_paths, final)), strict=True
                )
            },
        }
        v = final.values
        # Catalog facts stay catalog facts: the listed categories are the path (the path-inferring
        # profiler runs only without them), and an attribute the catalog lists is never the model's.
        source = {f: self.model for f in final.values}
        if item.categories:
            path, source["category_path"] = list(item.categories), CATALOG
            confidence.pop("category_path", None)
        else:
            path = list(by_agent["profiler"].values.get("category_path") or [])
            if path:
                source["category_path"] = self.model
                confidence["category_path"] = by_agent["profiler"].confidence.get("category_path", 1.0)
        listed = {" ".join(k.lower().split()) for k in item.attributes}
        if item.brand:
            listed |= {"brand", "brand name", "manufacturer", "maker"}
        if item.price is not None:
            listed |= {"price", "cost"}
        if item.categories:
            listed |= {"category", "categories", "category path"}
        attributes = {k: val for k, val in dict(v["attributes"]).items() if " ".join(k.lower().split()) not in listed}
        for k in dict(v["attributes"]).keys() - attributes.keys():
            confidence.pop(f"attributes.{k}", None)
        return KnowledgeResult(
            item_id=item.item_id,
            content_hash=item.content_hash,
            prompt_version=PROMPT_VERSION,
            model=self.model,
            status="ok",
            category_path=path,
            product_type=v["product_type"] or None,
            attributes=attributes,
            price_tier=v["price_tier"],
            audiences=list(v["audiences"]),
            scenarios=list(v["scenarios"]),
            occasions=list(v["occasions"]),
            complements=list(v["complements"]),
            substitutes=list(v["substitutes"]),
            summary=v["summary"] or None,
            field_confidence=confidence,
            field_source=source,
            traces=_ENCODE(traces),
            tokens_in=tally.tokens_in,
            tokens_out=tally.tokens_out,
            llm_calls=tally.llm_calls,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
            answers_valid=tally.valid,
            answers_rejected=dict(tally.rejected),
        )

    async def _pool(
        self,
        inputs: list[Any],
        handle: Callable[[Any], Coroutine[Any, Any, Any]],
        key: str,
        progress: Progress | None,
        deadline: float | None = None,
    ) -> list[Any]:
        """Run `handle` over `inputs` with a pool of workers; results in input order.

        Workers pull from one shared iterator, so a million-row partition never materialises a million
        coroutines; the circuit or a dead worker stops every worker at once. `key` names the attribute
        that must match between each input and its result (a mismatch is a bug, never a data issue).

        `deadline` (epoch seconds, as `time.time()`; it crosses process boundaries, a monotonic clock
        would not): once it has passed, no worker STARTS another input. Inputs in flight finish (nothing
        is cancelled mid-item); inputs never started have no result, so the list returned is then the
        results of the started inputs only, still in input order: they are left for a later run, not
        failures.
        """
        total = len(inputs)
        results: list[Any] = [None] * total
        started = [False] * total
        queue = iter(range(total))
        done = 0

        async def worker() -> None:
            nonlocal done
            # The deadline is checked before an index is taken, so no index is taken and then dropped.
            while deadline is None or time.time() < deadline:
                i = next(queue, None)  # one shared iterator: each index is handed out exactly once
                if i is None:
                    return
                started[i] = True
                results[i] = await handle(inputs[i])
                done += 1
                if progress is not None:
                    progress(done, total)

        # Enough inputs in flight that the request semaphore, not the supply, is the limit.
        # Under a deadline, only as many items as keep the request slots busy (an item sends up to 3k
        # requests at once, then k): every item started may finish after the deadline.
        width = 2 * self.cfg.max_concurrency if deadline is None else -(-self.cfg.max_concurrency // self.cfg.samples_k)
        workers = [asyncio.create_task(worker()) for _ in range(min(total, width))]
        opened = asyncio.create_task(self.circuit.event.wait())
        waiting: set[asyncio.Task[Any]] = {*workers, opened}
        try:
            while waiting != {opened}:
                finished, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if opened in finished or any(t.exception() for t in finished if not t.cancelled()):
                    break  # the circuit opened or a worker died: stop the others now
        finally:
            for task in (*workers, opened):
                task.cancel()
            outcomes = await asyncio.gather(*workers, return_exceptions=True)
            await asyncio.gather(opened, return_exceptions=True)
        completed = [r for r in results if r is not None]
        url = getattr(self.backend, "url", self.cfg.base_url)
        if self.circuit.open or (self.circuit.connection_failures and not self.circuit.successes):
            failures = self.circuit.opened_after or self.circuit.streak
            raise BackendUnavailable(
                f"LLM backend at {url} unreachable after {failures} consecutive failures: "
                "check the server (the local engine: make llm-up; vLLM: make serve-llm) or run without a "
                f"model: REASEQ__LLM__BACKEND=offline (last error: {' '.join(self.circuit.last_error.split())})",
                completed=completed,
            )
        errors = [
            o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, asyncio.CancelledError)
        ]
        for error in errors:
            if isinstance(error, _Fatal):
                raise BackendUnavailable(
                    f"LLM backend at {url} refused the configuration ({' '.join(str(error).split())}): check "
                    f"REASEQ__LLM__MODEL (the served model name), REASEQ__LLM__BASE_URL (usually ends in /v1) "
                    f"and the API key in "
                    f"${self.cfg.api_key_env}",
                    completed=completed,
                )
        if errors:
            raise errors[0]
        # Every started input has its own result; without a deadline every input was started. An input
        # the deadline kept from starting has none (and a result for an input never started is a bug).
        for given, begun, result in zip(inputs, started, results, strict=True):
            if not begun and deadline is not None and result is None:
                continue
            if not begun or result is None or getattr(result, key) != getattr(given, key):
                raise RuntimeError(f"result for {key} {getattr(given, key)!r} missing or misplaced")
        return completed

    async def run(
        self, items: list[ItemInput], progress: Progress | None, deadline: float | None = None
    ) -> list[KnowledgeResult]:
        completed = await self._pool(items, self.item, "item_id", progress, deadline)
        total = len(completed)
        ok = sum(1 for r in completed if r.status == "ok")
        log.info(
            "reasoned %d items with %s (%s): ok=%d failed=%d calls=%d tokens_in=%d tokens_out=%d retries=%s%s",
            total,
            self.model,
            PROMPT_VERSION,
            ok,
            total - ok,
            sum(r.llm_calls for r in completed),
            sum(r.tokens_in for r in completed),
            sum(r.tokens_out for r in completed),
            dict(self.retries),
            f"; deadline passed: {len(items) - total} of {len(items)} items not started (left for the next run)"
            if total < len(items)
            else "",
        )
        return completed


def _trace(paths: list[dict[str, Any]], cons: Consensus) -> dict[str, Any]:
    # A unanimous vote keeps every path's value with share 1.0, so the paths alone say it all.
    if cons.unanimous:
        return {"paths": paths, "unanimous": True}
    return {"paths": paths, "unanimous": False, "kept": cons.values, "confidence": cons.confidence}


def _one(request: CompletionRequest) -> CompletionRequest:
    return CompletionRequest(**{**request.__dict__, "n": 1})


def _merge(completions: list[Completion]) -> Completion:
    """k one-choice completions as one k-choice completion, usage summed."""
    return Completion(
        choices=[c for comp in completions for c in comp.choices],
        finish_reasons=[f for comp in completions for f in comp.finish_reasons],
        prompt_tokens=sum(c.prompt_tokens for c in completions),
        completion_tokens=sum(c.completion_tokens for c in completions),
    )


async def _all(coros: list[Coroutine[Any, Any, Any]]) -> list[Any]:
    """gather() that cancels the siblings when one fails: a failed item should not keep spending."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def reason_items_async(
    items: list[ItemInput],
    config: LLMConfig,
    progress: Progress | None = None,
    *,
    backend: Backend | None = None,
    rng: random.Random | None = None,
    deadline: float | None = None,
) -> list[KnowledgeResult]:
    """Reason over `items`; results come back in input order, one per item started.

    Without a `deadline` every item is started, so there is one result per item. With one (epoch
    seconds, `time.time()`), no item is started once it has passed: items in flight finish, and
    items never started have no result (not failures: the caller leaves them for a later run).
    `backend` and `rng` exist for tests (a scripted backend, seeded jitter); when a backend is
    passed in, the caller owns it and closes it.
    """
    if not items or (deadline is not None and time.time() >= deadline):
        return []
    own = backend is None
    backend = backend or make_backend(config)
    try:
        return await FanOut(config, backend, rng).run(list(items), progress, deadline)
    finally:
        if own:
            await backend.aclose()


def new_loop() -> asyncio.AbstractEventLoop:
    try:  # uvloop roughly halves the per-request client overhead; optional
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def reason_items(
    items: list[ItemInput],
    config: LLMConfig,
    progress: Progress | None = None,
    *,
    deadline: float | None = None,
) -> list[KnowledgeResult]:
    """Synchronous entry for Spark tasks and scripts; same order as the input.

    `deadline`: epoch seconds after which no further item is started (see `reason_items_async`).
    """

    def go() -> list[KnowledgeResult]:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            return runner.run(reason_items_async(items, config, progress, deadline=deadline))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return go()
    # Called from inside a running loop (a notebook, an async DAG task): use a private thread.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm_agents") as pool:
        return pool.submit(go).result()
