"""The interface both backends implement, so the offline heuristic runs the real orchestration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from .types import HistoryItem, ItemInput


@dataclass
class CompletionRequest:
    agent: str
    messages: list[dict[str, str]]
    response_format: dict[str, Any]
    n: int
    temperature: float
    max_tokens: int
    # Structured copies of what the messages carry; the offline backend reads these instead of
    # parsing its own prompt back, the HTTP backend ignores them.
    item: ItemInput | None = None
    context: dict[str, dict[str, Any]] | None = None
    # The interests agent's structured input (a user's recent items), for the same reason.
    history: list[HistoryItem] | None = None
    # Completion profile (base models): the whole few-shot prompt as one text. When set, the HTTP
    # backend posts it to /completions with the schema of `response_format` as a top-level
    # `json_schema` field (what llama-server honours there) and reads `choices[i].text`.
    prompt: str | None = None
    stop: list[str] | None = None


@dataclass
class Completion:
    choices: list[str | None]  # message.content of each choice, unparsed
    finish_reasons: list[str | None] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class BackendError(Exception):
    """One failed request, classified so the retry loop knows what to do next.

    code: a short reason code (http_429, http_500, timeout, connect_error, ...).
    retryable: worth another attempt after backoff.
    connection: a sign the server itself is down or broken (feeds the circuit breaker).
    fatal: no request can succeed with this configuration (bad key, unknown model, wrong URL).
    """

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        retryable: bool,
        connection: bool = False,
        fatal: bool = False,
        raw: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.retryable = retryable
        self.connection = connection
        self.fatal = fatal
        self.raw = raw
        self.retry_after = retry_after


class Backend(Protocol):
    async def complete(self, request: CompletionRequest) -> Completion: ...

    async def aclose(self) -> None: ...
