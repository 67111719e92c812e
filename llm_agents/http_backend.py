"""OpenAI-compatible chat-completions backend (vLLM first).

The request is the documented wire format: POST {base_url}/chat/completions with `messages`,
`response_format` = {"type": "json_schema", ...} (vLLM removed `guided_json` in 0.12), `n`
sampled choices, `temperature`, `max_tokens`; `usage` in the answer feeds token accounting.
No SDK: the openai SDK retries on its own (hiding faults from our retry and circuit accounting)
and raises on bodies we want to keep raw for the quarantine.

Two transports, same behaviour:
- "lean" (default): a minimal HTTP/1.1 keep-alive client on asyncio streams. httpx measured
  ~1.1-1.4 ms of CPU per request here against ~0.1 ms for plain streams, and the pipeline's
  target (one process keeping a 64-slot vLLM busy, >1,000 requests/s) is CPU-bound on the client.
  It speaks exactly what an OpenAI-compatible server needs: TLS, content-length and chunked
  bodies, keep-alive with a transparent resend when a reused idle connection turns out stale.
- "httpx": httpx.AsyncClient, chosen automatically when an HTTP(S)_PROXY applies to the server
  (httpx honours proxy settings; the lean client does not). It uses one single-connection client
  per concurrent slot, because httpcore 1.0's pool scans every connection with a poll() per idle
  socket on each request event, quadratic at 64+ connections (encode/httpcore#1035).
Either way concurrency is bounded by the runner's semaphore, so neither pool grows past
max_concurrency connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.request
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from .backend import BackendError, Completion, CompletionRequest
from .config import LLMConfig

log = logging.getLogger(__name__)

MAX_RAW = 8192  # bytes of an unusable answer kept for the quarantine payload
MAX_BODY = 64 * 1024 * 1024
IDLE_EXPIRY_S = 4.0  # below uvicorn's (and so vLLM's) default 5 s keep-alive timeout
USER_AGENT = "reaseq-llm-agents/1"


@dataclass
class _Response:
    status_code: int
    headers: dict[str, str]  # lower-case names
    content: bytes


class _ProtocolError(Exception):
    pass


class _StaleConnection(Exception):
    """A reused keep-alive connection closed before answering; safe to resend on a fresh one."""


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


def _proxied(url: str) -> bool:
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(parts.hostname or "")


class _Conn:
    __slots__ = ("reader", "writer", "idle_since", "reused")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        self.reused = False

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # closing a broken transport must never mask the real error
            pass


class _LeanTransport:
    def __init__(self, url: str, headers: dict[str, str]):
        parts = urlsplit(url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if self._tls else 80)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        host_header = parts.netloc.rsplit("@", 1)[-1]
        lines = [f"POST {path} HTTP/1.1", f"host: {host_header}", f"user-agent: {USER_AGENT}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self._head = ("\r\n".join(lines) + "\r\ncontent-length: ").encode("latin-1")
        self._ssl = ssl.create_default_context() if self._tls else None
        self._idle: list[_Conn] = []

    async def _connect(self) -> _Conn:
        reader, writer = await asyncio.open_connection(
            self._host,
            self._port,
            ssl=self._ssl,
            server_hostname=self._host if self._tls else None,
            limit=1 << 20,
        )
        return _Conn(reader, writer)

    def _take_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # LIFO: the most recently used connection is the least likely stale
            if (
                now - conn.idle_since < IDLE_EXPIRY_S
                and not conn.writer.is_closing()
                and not conn.reader.at_eof()
            ):
                return conn
            conn.close()
        return None

    async def post(self, body: bytes) -> _Response:
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, body)
            except _StaleConnection:
                pass  # the server had closed it while idle: resend once on a new connection
        return await self._exchange(await self._connect(), body)

    async def _exchange(self, conn: _Conn, body: bytes) -> _Response:
        ok = False
        try:
            conn.writer.write(self._head + str(len(body)).encode() + b"\r\n\r\n" + body)
            await conn.writer.drain()
            try:
                head = await conn.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as e:
                if conn.reused and not e.partial:
                    raise _StaleConnection from e
                raise
            try:
                response, keep = await self._read_response(conn.reader, head)
            except ValueError as e:  # unparsable sizes
                raise _ProtocolError(str(e)[:200]) from e
            ok = keep
            return response
        except (ConnectionResetError, BrokenPipeError) as e:
            if conn.reused:
                raise _StaleConnection from e
            raise
        finally:
            if ok:
                conn.reused = True
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            else:
                conn.close()

    @staticmethod
    async def _read_response(reader: asyncio.StreamReader, head: bytes) -> tuple[_Response, bool]:
        lines = head.decode("latin-1").split("\r\n")
        try:
            version, code = lines[0].split(" ", 2)[:2]
            status = int(code)
        except ValueError as e:
            raise _ProtocolError(f"bad status line {lines[0][:80]!r}") from e
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks = []
            size_total = 0
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                        pass
                    break
                size_total += size
                if size_total > MAX_BODY:
                    raise _ProtocolError("response body too large")
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
            content = b"".join(chunks)
        elif "content-length" in headers:
            length = int(headers["content-length"])
            if length > MAX_BODY:
                raise _ProtocolError("response body too large")
            content = await reader.readexactly(length)
        else:
            content = await reader.read(MAX_BODY)  # delimited by the server closing the connection
            keep = False
        return _Response(status, headers, content), keep

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _HttpxTransport:
    def __init__(self, url: str, headers: dict[str, str], timeout_s: float):
        import httpx  # only behind a proxy: importing it costs ~0.25 s in every fresh Spark Python worker

        self._httpx = httpx
        self._url = url
        self._headers = headers
        self._timeout = timeout_s
        # One TLS context shared by all clients: building one loads the CA bundle (~60 ms).
        self._ssl = httpx.create_ssl_context(verify=url.startswith("https://"))
        self._idle: list = []  # httpx.AsyncClient
        self._all: list = []

    def _client(self):
        httpx = self._httpx
        if self._idle:
            return self._idle.pop()
        client = httpx.AsyncClient(
            headers=self._headers,
            timeout=httpx.Timeout(self._timeout),
            limits=httpx.Limits(
                max_connections=1, max_keepalive_connections=1, keepalive_expiry=IDLE_EXPIRY_S
            ),
            verify=self._ssl,
        )
        self._all.append(client)
        return client

    async def post(self, body: bytes) -> _Response:
        client = self._client()
        try:
            resp = await client.post(self._url, content=body)
            return _Response(resp.status_code, {k.lower(): v for k, v in resp.headers.items()}, resp.content)
        # The same failures the lean transport raises, so the backend classifies both alike.
        except self._httpx.TimeoutException as e:
            raise TimeoutError(str(e)) from e
        except self._httpx.TransportError as e:
            raise _ProtocolError(f"{type(e).__name__}: {e}") from e
        finally:
            self._idle.append(client)

    async def aclose(self) -> None:
        clients, self._all, self._idle = self._all, [], []
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)


class OpenAIBackend:
    def __init__(self, config: LLMConfig, transport: Literal["auto", "lean", "httpx"] = "auto"):
        self._config = config
        self._url = f"{config.base_url}/chat/completions"
        headers = {"content-type": "application/json", "accept": "application/json"}
        key = config.api_key()
        if key:
            headers["authorization"] = f"Bearer {key}"
        else:
            log.info("no API key in $%s; sending requests without Authorization", config.api_key_env)
        if transport == "auto":
            transport = "httpx" if _proxied(self._url) else "lean"
        self.transport_name = transport
        self._transport: _LeanTransport | _HttpxTransport = (
            _HttpxTransport(self._url, headers, config.timeout_s)
            if transport == "httpx"
            else _LeanTransport(self._url, headers)
        )

    @property
    def url(self) -> str:
        return self._url

    def __repr__(self) -> str:  # never the headers: they hold the key
        return f"OpenAIBackend(url={self._url!r}, model={self._config.model!r}, transport={self.transport_name!r})"

    def _body(self, request: CompletionRequest) -> bytes:
        body: dict[str, Any] = {
            "model": self._config.model,
            "messages": request.messages,
            "n": request.n,
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "response_format": request.response_format,
        }
        return json.dumps(body, ensure_ascii=False).encode()

    async def complete(self, request: CompletionRequest) -> Completion:
        try:
            async with asyncio.timeout(self._config.timeout_s):  # bounds the whole exchange
                resp = await self._transport.post(self._body(request))
        except TimeoutError as e:
            raise BackendError(
                "timeout", f"no answer within {self._config.timeout_s}s", retryable=True, connection=True
            ) from e
        except (
            OSError,
            EOFError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            _ProtocolError,
            _StaleConnection,
        ) as e:
            raise BackendError(
                "connect_error", f"{type(e).__name__}: {str(e)[:200]}", retryable=True, connection=True
            ) from e
        return self._parse(resp)

    def _parse(self, resp: _Response) -> Completion:
        status = resp.status_code
        if status != 200:
            raw = _clip(resp.content)
            detail = f"HTTP {status}: {(raw or '')[:300]}"
            if status in (408, 409, 425, 429):
                raise BackendError(
                    f"http_{status}", detail, retryable=True, raw=raw, retry_after=_retry_after(resp.headers)
                )
            if status >= 500:
                raise BackendError(
                    f"http_{status}",
                    detail,
                    retryable=True,
                    connection=True,
                    raw=raw,
                    retry_after=_retry_after(resp.headers),
                )
            if status in (401, 403, 404, 405):
                raise BackendError(f"http_{status}", detail, retryable=False, fatal=True, raw=raw)
            raise BackendError(f"http_{status}", detail, retryable=False, raw=raw)
        try:
            data = json.loads(resp.content)
            choices = data["choices"]
            if not isinstance(choices, list):
                raise TypeError("choices is not a list")
        except (ValueError, KeyError, TypeError) as e:
            raise BackendError(
                "invalid_response",
                f"unreadable chat completion body: {e}",
                retryable=True,
                raw=_clip(resp.content),
            ) from e
        contents: list[str | None] = []
        finish: list[str | None] = []

        def index(c: Any) -> int:
            i = c.get("index") if isinstance(c, dict) else None
            return i if isinstance(i, int) else 0

        for c in sorted(choices, key=index):
            message = c.get("message") if isinstance(c, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            contents.append(content if isinstance(content, str) else None)
            finish.append(c.get("finish_reason") if isinstance(c, dict) else None)
        usage = data.get("usage") or {}
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
