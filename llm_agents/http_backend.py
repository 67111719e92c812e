"""OpenAI-compatible backend (vLLM, llama.cpp's llama-server) over httpx.

Two request profiles, chosen per request by whether `CompletionRequest.prompt` is set:
- chat (`prompt` is None; instruct models, e.g. on vLLM): POST {base_url}/chat/completions with
  `messages`, `response_format` = {"type": "json_schema", ...} (vLLM removed `guided_json` in 0.12),
  `n` sampled choices, `temperature`, `max_tokens`; each choice's `message.content` is the answer.
- completion (`prompt` set; base models, e.g. the local engine's llama-server): POST
  {base_url}/completions with `prompt`, `n`, `temperature`, `max_tokens`, `stop` when given, the
  schema of `response_format` as a top-level `json_schema` (llama-server honours it there and ignores
  `response_format` on /completions) and `cache_prompt: true` (llama-server's prompt cache; sent only
  on this profile, since some vLLM versions reject fields they do not know); each choice's `text` is
  the answer.
Either way choices are ordered by their `index`, and `usage` feeds token accounting.
No SDK: the openai SDK retries on its own unless told not to (hiding faults from our retry and
circuit accounting), raises typed errors where the quarantine keeps the raw body, and adds its own
request layers over an httpx-style stack; the wire format is small enough to speak directly.

Transport: httpx, with one single-connection `httpx.AsyncClient` per concurrent request rather than
one client whose pool holds max_concurrency connections, because httpcore 1.0's pool rescans every
connection on each request event (a poll() per idle socket, and a count of all connections for each
idle one), quadratic at 64+ connections (encode/httpcore#1035): with 64 requests in flight a shared
pool cost about 2.4 ms of client CPU per request here, 64 single-connection clients about 0.85 ms.
The runner's semaphore bounds concurrency at `max_concurrency`, so at most that many clients, and so
connections, ever exist. Each keeps its connection alive between requests and lets it go after
IDLE_EXPIRY_S idle; httpcore drops an idle connection the server has closed before reusing it, and
a request that still meets a reused connection closing under it is resent once, on a fresh one.
Timeouts (httpx's per operation, and `timeout_s` over the whole exchange) are BackendError
"timeout", any other failure to get an answer "connect_error", both marked as connection faults for
the circuit breaker. Proxies are honoured as httpx does it (`trust_env`: HTTP_PROXY, HTTPS_PROXY,
ALL_PROXY, NO_PROXY), except for a server on loopback, which is always reached directly.

What it costs: this replaced a hand-written HTTP/1.1 client on asyncio streams. Against
tests/fake_openai_server.py in another process, 64 requests in flight on uvloop, on a shared 2-core
machine, httpx takes 0.83-0.91 ms of client CPU per request (five runs) where the hand-written
client took 0.12-0.13 ms, and `import httpx` adds 0.35-0.5 s to every fresh Python worker. A client
process therefore saturates a core at roughly 1,100-1,200 requests/s: two processes with 48 requests
in flight each kept a 64-slot x 50 ms fake server (1,280 requests/s) 0.67 busy on that machine,
where the hand-written client (and the fake server's former hand-written HTTP) kept it 0.99 busy.
A maintained HTTP stack (TLS, proxies, chunked
bodies, protocol edge cases) is what that buys; a real server's seconds-long latency needs far fewer
requests per second per slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx

from .backend import BackendError, Completion, CompletionRequest
from .config import LLMConfig

log = logging.getLogger(__name__)

MAX_RAW = 8192  # bytes of an unusable answer kept for the quarantine payload
MAX_BODY = 64 * 1024 * 1024
IDLE_EXPIRY_S = 4.0  # below uvicorn's (and so vLLM's) and llama-server's default 5 s keep-alive timeout
USER_AGENT = "reaseq-llm-agents/1"


class _BodyTooLarge(Exception):
    pass


def _clip(text: str | bytes | None) -> str | None:
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text[:MAX_RAW].decode("utf-8", "replace")
    return text[:MAX_RAW]


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class _Slot:
    """One concurrent request's client: a single keep-alive connection to the server."""

    __slots__ = ("client", "idle_since")

    def __init__(self, client: httpx.AsyncClient):
        self.client = client
        self.idle_since: float | None = None  # when its connection last went idle, kept alive


class _Transport:
    """POSTs JSON bodies to one server over single-connection httpx clients, one per request in flight."""

    def __init__(self, headers: dict[str, str], timeout_s: float, verify_tls: bool, trust_env: bool = True):
        self._headers = httpx.Headers(headers)
        self._trust_env = trust_env
        self._timeout = httpx.Timeout(timeout_s)
        # One TLS context shared by all clients: building one loads the CA bundle (~60 ms); a plain
        # http:// server needs no CA bundle at all.
        self._ssl = httpx.create_ssl_context(verify=verify_tls)
        self._limits = httpx.Limits(
            max_connections=1, max_keepalive_connections=1, keepalive_expiry=IDLE_EXPIRY_S
        )
        self._idle: list[_Slot] = []  # LIFO: the most recently used connection is the least likely stale
        self._all: list[_Slot] = []

    @property
    def clients(self) -> int:
        """Clients (so connections) created so far: at most the peak number of requests in flight."""
        return len(self._all)

    def _slot(self) -> _Slot:
        if self._idle:
            return self._idle.pop()
        slot = _Slot(httpx.AsyncClient(timeout=self._timeout, limits=self._limits, verify=self._ssl,
                                       trust_env=self._trust_env))
        self._all.append(slot)
        return slot

    async def post(self, url: httpx.URL, body: bytes) -> tuple[int, httpx.Headers, bytes]:
        slot = self._slot()
        try:
            idle = slot.idle_since
            reused = idle is not None and time.monotonic() - idle < IDLE_EXPIRY_S
            try:
                return await self._exchange(slot, url, body)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                if not reused:
                    raise
                # The server closed the kept-alive connection as it was reused; httpcore has dropped
                # it, so this goes out on a fresh connection.
                return await self._exchange(slot, url, body)
        finally:
            self._idle.append(slot)

    async def _exchange(self, slot: _Slot, url: httpx.URL, body: bytes) -> tuple[int, httpx.Headers, bytes]:
        slot.idle_since = None
        request = httpx.Request("POST", url, headers=self._headers, content=body)
        response = await slot.client.send(request, stream=True)
        try:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_BODY:
                raise _BodyTooLarge(f"response body of {declared} bytes")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_BODY:
                    raise _BodyTooLarge(f"response body over {MAX_BODY} bytes")
                chunks.append(chunk)
        finally:
            await response.aclose()
        if (
            response.http_version == "HTTP/1.1"
            and "close" not in response.headers.get("connection", "").lower()
        ):
            slot.idle_since = time.monotonic()
        return response.status_code, response.headers, b"".join(chunks)

    async def aclose(self) -> None:
        slots, self._all, self._idle = self._all, [], []
        await asyncio.gather(*(s.client.aclose() for s in slots), return_exceptions=True)


class OpenAIBackend:
    def __init__(self, config: LLMConfig):
        self._config = config
        self._chat_url = httpx.URL(f"{config.base_url}/chat/completions")
        self._completions_url = httpx.URL(f"{config.base_url}/completions")
        # The endpoint this configuration's requests go to, for messages (the circuit breaker's).
        profile = getattr(config, "prompt_profile", "chat")
        endpoint = "completions" if profile == "completion" else "chat/completions"
        self._url = f"{config.base_url}/{endpoint}"
        headers = {"content-type": "application/json", "accept": "application/json", "user-agent": USER_AGENT}
        key = config.api_key()
        if key:
            headers["authorization"] = f"Bearer {key}"
        else:
            log.info("no API key in $%s; sending requests without Authorization", config.api_key_env)
        # A server on loopback (the local engine, a test double) is never reached through a proxy,
        # whatever HTTP(S)_PROXY says; NO_PROXY often lacks 127.0.0.1.
        host = httpx.URL(config.base_url).host
        self._transport = _Transport(
            headers, config.timeout_s, verify_tls=config.base_url.startswith("https://"),
            trust_env=host not in ("127.0.0.1", "localhost", "::1"),
        )

    @property
    def url(self) -> str:
        return self._url

    def __repr__(self) -> str:  # never the headers: they hold the key
        return f"OpenAIBackend(url={self._url!r}, model={self._config.model!r})"

    def _request(self, request: CompletionRequest) -> tuple[httpx.URL, bytes]:
        body: dict[str, Any]
        if request.prompt is None:
            body = {
                "model": self._config.model,
                "messages": request.messages,
                "n": request.n,
                "temperature": request.temperature,
                "max_tokens": request.max_tokens,
                "response_format": request.response_format,
            }
            url = self._chat_url
        else:
            body = {
                "model": self._config.model,
                "prompt": request.prompt,
                "n": request.n,
                "temperature": request.temperature,
                "max_tokens": request.max_tokens,
            }
            schema = ((request.response_format or {}).get("json_schema") or {}).get("schema")
            if schema is not None:
                body["json_schema"] = schema
            if request.stop:
                body["stop"] = request.stop
            body["cache_prompt"] = True
            url = self._completions_url
        return url, json.dumps(body, ensure_ascii=False).encode()

    async def complete(self, request: CompletionRequest) -> Completion:
        url, body = self._request(request)
        try:
            async with asyncio.timeout(self._config.timeout_s):  # bounds the whole exchange
                status, headers, content = await self._transport.post(url, body)
        except (TimeoutError, httpx.TimeoutException) as e:
            raise BackendError(
                "timeout", f"no answer within {self._config.timeout_s}s", retryable=True, connection=True
            ) from e
        except (httpx.RequestError, OSError, _BodyTooLarge) as e:
            raise BackendError(
                "connect_error", f"{type(e).__name__}: {str(e)[:200]}", retryable=True, connection=True
            ) from e
        return self._parse(status, headers, content, text=request.prompt is not None)

    def _parse(self, status: int, headers: httpx.Headers, content: bytes, text: bool) -> Completion:
        if status != 200:
            raw = _clip(content)
            detail = f"HTTP {status}: {(raw or '')[:300]}"
            if status in (408, 409, 425, 429):
                raise BackendError(
                    f"http_{status}", detail, retryable=True, raw=raw, retry_after=_retry_after(headers)
                )
            if status >= 500:
                raise BackendError(
                    f"http_{status}",
                    detail,
                    retryable=True,
                    connection=True,
                    raw=raw,
                    retry_after=_retry_after(headers),
                )
            if status in (401, 403, 404, 405):
                raise BackendError(f"http_{status}", detail, retryable=False, fatal=True, raw=raw)
            raise BackendError(f"http_{status}", detail, retryable=False, raw=raw)
        try:
            data = json.loads(content)
            choices = data["choices"]
            if not isinstance(choices, list):
                raise TypeError("choices is not a list")
        except (ValueError, KeyError, TypeError) as e:
            kind = "completion" if text else "chat completion"
            raise BackendError(
                "invalid_response",
                f"unreadable {kind} body: {e}",
                retryable=True,
                raw=_clip(content),
            ) from e
        contents: list[str | None] = []
        finish: list[str | None] = []

        def index(c: Any) -> int:
            i = c.get("index") if isinstance(c, dict) else None
            return i if isinstance(i, int) else 0

        for c in sorted(choices, key=index):
            if not isinstance(c, dict):
                contents.append(None)
                finish.append(None)
                continue
            if text:
                answer = c.get("text")
            else:
                message = c.get("message")
                answer = message.get("content") if isinstance(message, dict) else None
            contents.append(answer if isinstance(answer, str) else None)
            reason = c.get("finish_reason")
            finish.append(reason if isinstance(reason, str) else None)
        usage = data.get("usage") if isinstance(data, dict) else None
        usage = usage if isinstance(usage, dict) else {}
        return Completion(
            choices=contents,
            finish_reasons=finish,
            prompt_tokens=_int(usage.get("prompt_tokens")),
            completion_tokens=_int(usage.get("completion_tokens")),
        )

    async def aclose(self) -> None:
        await self._transport.aclose()


def _int(v: Any) -> int:
    return v if isinstance(v, int) and v >= 0 else 0
