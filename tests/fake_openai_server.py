"""A fake OpenAI-compatible server (chat and text completions) for tests and client benchmarks.

Real HTTP on 127.0.0.1: a Starlette app served by uvicorn (what vLLM's API server runs), on httptools
and uvloop when installed, access log off, in its own thread and event loop, so hundreds of
concurrent keep-alive connections cost little and the client under test, not the server, is what a
benchmark measures. For benchmarks that need the client's process to themselves, run it as a
separate process:

    python tests/fake_openai_server.py --port 8011 --capacity 64 --latency 0.05

Endpoints: `POST .../chat/completions` (messages, `response_format` json_schema: the vLLM profile),
`POST .../completions` (a text `prompt` with the schema as a top-level `json_schema`: llama.cpp's
llama-server profile; answers are `choices[i].text`), and, not part of the OpenAI API, `GET /stats`
(counters and the service window) and `DELETE /stats` (reset them). Anything else is a 404. With
`api_key` set, a request without `Authorization: Bearer <api_key>` gets a 401; a `model` other than
the served one a 404, as vLLM answers. `stats` counts requests, connections accepted, keep-alive
connections closed for idleness (`idle_timeout_s`, uvicorn's `timeout_keep_alive`: never by
default), answers, faults and tokens; `record=True` keeps every request body in `requests`.

Capacity model (both completion endpoints): at most `capacity` requests are in service at once,
each taking `latency_s`; the rest wait in a queue of up to `queue_limit`, beyond which the server
answers 429 at once (as vLLM front-ends behind a gateway do). Service is scheduled on `capacity`
slots in the loop's clock: a request starts when it arrives or when the earliest slot frees,
whichever is later, and ends exactly `latency_s` after it starts, so the slots are the GPU and the
event loop the API front-end: a loop slowed by the machine's load delays answers but does not
stretch the GPU's service time (with an asyncio.Semaphore, a slot would stay held until the loop
got round to releasing it, and a benchmark would bill the client for the fake server's own lag).
`GET /stats` returns the counters and the service window, first slot taken to last one freed, from
which a benchmark reads how busy its client kept the slots.

Faults are injected per request by rate (`faults`) or in arrival order (`script`), on both
completion endpoints: "429", "500", "stall" (hold the request past any sane client timeout, then
drop the connection), "disconnect" (drop the connection without answering), "truncated" (JSON cut
in half, finish_reason "length"), "schema" (valid JSON that violates the requested schema).
`stop()` drops every connection at once, as a crashed server would.

Answers are schema-valid JSON built from the request: the item JSON is read back from between
<item> and </item> (chat: the first user message's block; completions: the prompt's last block,
after the few-shot example's), and each property of the requested json_schema is filled plausibly
from it (category_path from the categories, and so on; for the interests agent, whose block holds a
user's "recent_items", `covered` lists their category leaves and `interests` "<leaf> accessories",
most recent first). The agent is the schema's name on chat requests and its property names on
completions (whose top-level schema carries no name). `disagreement` makes sampled choices differ,
so self-consistency voting has something to prune. An item whose text carries a prompt injection
("ignore previous instructions", ...) makes this fake model "obey" it, per `injection`: "schema"
answers with an extra key (a schema violation), "fields" stuffs the injected text into every string
field while keeping the schema.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import random
import re
import socket
import threading
import time
import zlib
from collections import Counter, deque
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

try:  # uvicorn's fastest HTTP/1.1 parser, else its pure-Python h11 one
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _HttpProtocol
except ImportError:
    from uvicorn.protocols.http.h11_impl import H11Protocol as _HttpProtocol
try:
    import uvloop  # noqa: F401

    LOOP = "uvloop"
except ImportError:
    LOOP = "asyncio"

FAULT_KINDS = ("429", "500", "stall", "disconnect", "truncated", "schema")
INJECTION = re.compile(r"ignore (all )?(previous|prior|above) instructions", re.IGNORECASE)
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
NEVER_S = 7 * 24 * 3600.0  # uvicorn's keep-alive timer when idle connections are never closed


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": {"message": message}}, status_code=status, headers=headers)


class FakeOpenAIServer:
    def __init__(
        self,
        capacity: int = 64,
        latency_s: float = 0.05,
        queue_limit: int = 100_000,
        faults: dict[str, float] | None = None,
        script: list[str | None] | None = None,
        stall_s: float = 30.0,
        max_n: int | None = None,
        disagreement: float = 0.0,
        injection: str = "schema",
        api_key: str | None = None,
        model: str = "fake-model",
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        record: bool = False,
        idle_timeout_s: float | None = None,
    ):
        unknown = set(faults or {}) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        if sum((faults or {}).values()) > 1:
            raise ValueError("fault rates add up to more than 1")
        self.capacity = capacity
        self.latency_s = latency_s
        self.queue_limit = queue_limit
        self.faults = dict(faults or {})
        self.script: deque[str | None] = deque(script or [])
        self.stall_s = stall_s
        self.max_n = max_n
        self.disagreement = disagreement
        self.injection = injection
        self.api_key = api_key
        self.model = model
        self.host = host
        self.port = port
        self.record = record
        self.idle_timeout_s = idle_timeout_s  # close keep-alive connections idle this long (uvicorn: 5 s)
        self._rng = random.Random(seed)
        self._seed = seed
        self.stats: Counter[str] = Counter()
        self.requests: list[dict[str, Any]] = []  # request bodies, when record=True
        self.max_in_service = 0
        self.max_queued = 0
        # Service accounting for benchmarks (GET /stats): slot-seconds scheduled, and the window from
        # the first service start to the last service end.
        self.busy_s = 0.0
        self.first_service: float | None = None
        self.last_service: float | None = None
        self._queued = 0
        self._slots: list[float] = []  # heap: when each service slot is next free (loop clock)
        # Open connections by the client address uvicorn puts in each request's scope, so a fault
        # can drop the connection a request came on.
        self._transports: dict[Any, asyncio.Transport] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> FakeOpenAIServer:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._slots = [0.0] * self.capacity
        config = uvicorn.Config(
            self._app(),
            loop=LOOP,
            http=self._protocol(),
            interface="asgi3",
            lifespan="off",
            log_config=None,  # leave the host process's logging alone (uvicorn's own loggers: warnings only)
            log_level="warning",
            access_log=False,
            proxy_headers=False,
            server_header=False,
            date_header=False,
            backlog=4096,
            timeout_keep_alive=self.idle_timeout_s if self.idle_timeout_s is not None else NEVER_S,  # type: ignore[arg-type]
        )
        self._uvicorn = uvicorn.Server(config)
        loop_factory = config.get_loop_factory()
        self._loop = loop_factory() if loop_factory is not None else asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, args=(sock,), name="fake-openai", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._uvicorn.started:
            if self._error is not None or not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"fake server did not start: {self._error!r}")
            time.sleep(0.002)
        return self

    def _serve(self, sock: socket.socket) -> None:
        loop = self._loop
        assert loop is not None and self._uvicorn is not None
        asyncio.set_event_loop(loop)
        try:
            self._serve_task = loop.create_task(self._uvicorn.serve(sockets=[sock]))
            loop.run_until_complete(self._serve_task)
        except asyncio.CancelledError:  # stop()
            pass
        except BaseException as e:  # uvicorn exits on a failed start-up; reported to start()
            self._error = e
        finally:
            loop.close()
            sock.close()

    async def _shutdown(self) -> None:
        assert self._uvicorn is not None
        for server in getattr(self._uvicorn, "servers", []):
            server.close()  # stop listening
        for transport in list(self._transports.values()):
            transport.abort()  # no goodbye: what a client sees of a crashed server
        await asyncio.sleep(0)  # uvicorn sees them go (connection_lost), so it answers nothing
        tasks = list(self._uvicorn.server_state.tasks)
        for task in tasks:  # requests still queued or stalled
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._serve_task is not None:
            self._serve_task.cancel()

    def stop(self) -> None:
        """Stop listening and drop every open connection, as a crashed server would."""
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            return
        if self._uvicorn is not None and self._uvicorn.started:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        else:  # failed start-up: end the serve task wherever it is
            self._loop.call_soon_threadsafe(lambda: self._serve_task and self._serve_task.cancel())
        self._thread.join(10)

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_faults(
        self, faults: dict[str, float] | None = None, script: list[str | None] | None = None
    ) -> None:
        """Change fault injection between runs (a rerun "with faults off" is set_faults())."""
        self.faults = dict(faults or {})
        self.script = deque(script or [])

    # -- HTTP ------------------------------------------------------------------------------------
    def _protocol(self) -> type[asyncio.Protocol]:
        """uvicorn's HTTP protocol, counting connections and idle closes, and knowing each transport."""
        fake = self

        class Protocol(_HttpProtocol):  # type: ignore[misc, valid-type]
            def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
                super().connection_made(transport)
                fake.stats["connections"] += 1
                fake._transports[self.client] = transport

            def connection_lost(self, exc: Exception | None) -> None:
                if fake._transports.get(self.client) is self.transport:
                    del fake._transports[self.client]
                super().connection_lost(exc)

            def timeout_keep_alive_handler(self) -> None:
                if not self.transport.is_closing():
                    fake.stats["idle_closed"] += 1
                super().timeout_keep_alive_handler()

        return Protocol

    def _app(self) -> Any:
        completions = self._endpoint(chat=False)
        chat = self._endpoint(chat=True)
        router = Starlette(
            routes=[
                Route("/stats", self._stats, methods=["GET", "DELETE"]),
                Route("/chat/completions", chat, methods=["POST"]),
                Route("/{prefix:path}/chat/completions", chat, methods=["POST"]),
                Route("/completions", completions, methods=["POST"]),
                Route("/{prefix:path}/completions", completions, methods=["POST"]),
                Route("/{path:path}", self._not_found, methods=ALL_METHODS),
            ]
        )

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            path = scope.get("path", "")
            if len(path) > 1 and path.endswith("/"):  # "/v1/completions/" is "/v1/completions"
                scope = {**scope, "path": path.rstrip("/") or "/"}
            await router(scope, receive, send)

        return app

    async def _stats(self, request: Request) -> Response:  # not OpenAI: for benchmarks
        if request.method == "DELETE":
            self.reset_service_stats()
        return JSONResponse(self.service_stats())

    async def _not_found(self, request: Request) -> Response:
        self.stats["requests"] += 1
        self.stats["status_404"] += 1
        return _error(404, f"no route {request.method} {request.url.path}")

    async def _drop(self, request: Request) -> Response:
        """Close the request's connection without answering; the returned response is never sent."""
        transport = self._transports.get(request.scope.get("client"))
        if transport is not None:  # None: the client has gone already
            transport.close()
            # The body is read, so the next ASGI message is the disconnect: once uvicorn has seen it,
            # it sends nothing for this request (instead of a 500 for an app that answered nothing).
            while (await request.receive())["type"] != "http.disconnect":
                pass
        return Response(status_code=499)

    def _endpoint(self, chat: bool) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                return await self._complete(request, chat)
            except asyncio.CancelledError:  # stop() while queued or stalled: the connection is gone
                return Response(status_code=499)

        return endpoint

    def _fault(self) -> str | None:
        if self.script:
            return self.script.popleft()
        u = self._rng.random()
        for kind, rate in self.faults.items():
            if u < rate:
                return kind
            u -= rate
        return None

    async def _complete(self, request: Request, chat: bool) -> Response:
        self.stats["requests"] += 1
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            self.stats["status_401"] += 1
            return _error(401, "invalid API key")
        body = await request.body()
        try:
            payload = json.loads(body)
            if chat:
                messages = payload["messages"]
                prompt = None
            else:
                prompt = payload["prompt"]
                if not isinstance(prompt, str):
                    raise TypeError("prompt must be a string")
            n = int(payload.get("n") or 1)
        except (ValueError, KeyError, TypeError) as e:
            self.stats["status_400"] += 1
            return _error(400, f"bad request: {e}")
        if payload.get("model") != self.model:
            self.stats["status_404"] += 1
            return _error(404, f"The model `{payload.get('model')}` does not exist.")
        self.stats["chat_requests" if chat else "completion_requests"] += 1
        if self.record:
            self.requests.append(payload)
        fault = self._fault()
        if fault is not None:
            self.stats[f"fault_{fault}"] += 1
        if fault == "429":
            return _error(429, "rate limited", {"retry-after": "0"})
        if fault == "500":
            return _error(500, "internal error")
        if fault == "disconnect":
            return await self._drop(request)
        if fault == "stall":  # a hung connection, not a busy GPU: it holds no service slot
            await asyncio.sleep(self.stall_s)
            return await self._drop(request)
        if self._queued >= self.queue_limit:
            self.stats["status_429_queue_full"] += 1
            return _error(429, "queue full")
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        start = max(arrived, heapq.heappop(self._slots))
        finish = start + self.latency_s
        heapq.heappush(self._slots, finish)
        # In service at `start` on the model's clock (the loop may wake coroutines a little out of order).
        self.max_in_service = max(self.max_in_service, sum(1 for f in self._slots if f > start))
        if self.first_service is None or start < self.first_service:
            self.first_service = start
        self.last_service = finish if self.last_service is None else max(self.last_service, finish)
        self.busy_s += self.latency_s
        if start > arrived:
            self._queued += 1
            self.max_queued = max(self.max_queued, self._queued)
            try:
                await asyncio.sleep(start - arrived)
            finally:
                self._queued -= 1
        if finish > loop.time():
            await asyncio.sleep(finish - loop.time())
        if chat:
            answer = self._chat_completion(payload, messages, n, fault)
        else:
            assert prompt is not None
            answer = self._text_completion(payload, prompt, n, fault)
        return Response(answer, media_type="application/json")

    def service_stats(self) -> dict[str, Any]:
        """Counters plus the service window: served requests over (last release - first slot taken)."""
        window = 0.0 if self.first_service is None else self.last_service - self.first_service
        return {
            **self.stats,
            "capacity": self.capacity,
            "latency_s": self.latency_s,
            "max_in_service": self.max_in_service,
            "max_queued": self.max_queued,
            "busy_slot_s": round(self.busy_s, 4),
            "service_window_s": round(window, 4),
            # slot-seconds served / slot-seconds available in the window: 1.0 = every slot always busy
            "slot_utilisation": round(self.busy_s / (self.capacity * window), 4) if window else None,
        }

    def reset_service_stats(self) -> None:
        self.stats.clear()
        self.busy_s, self.first_service, self.last_service = 0.0, None, None
        self.max_in_service = self.max_queued = 0

    # -- answers ---------------------------------------------------------------------------------
    def _answers(
        self, schema: dict[str, Any], agent: str, item: dict[str, Any], n: int, fault: str | None
    ) -> tuple[list[tuple[str, str]], int]:
        """`n` (at most max_n) answers as (text, finish_reason), and their completion tokens."""
        injected = bool(INJECTION.search(json.dumps(item)))
        n_out = min(n, self.max_n) if self.max_n else n
        answers = []
        completion_tokens = 0
        for i in range(n_out):
            rng = random.Random(zlib.crc32(f"{self._seed}|{agent}|{item.get('title')}|{i}".encode()))
            answer = _fill(schema, item, agent, rng, self.disagreement)
            if injected:
                answer = self._obey(answer, item, schema)
            content = json.dumps(answer)
            finish = "stop"
            if fault == "truncated":
                content, finish = content[: max(1, len(content) // 2)], "length"
            elif fault == "schema":
                content = json.dumps(_violate(answer))
            completion_tokens += max(1, len(content) // 4)
            answers.append((content, finish))
        return answers, completion_tokens

    def _account(self, choices: int, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        self.stats["ok"] += 1
        self.stats["choices"] += choices
        self.stats["prompt_tokens"] += prompt_tokens
        self.stats["completion_tokens"] += completion_tokens
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def _chat_completion(
        self, request: dict[str, Any], messages: list[dict[str, Any]], n: int, fault: str | None
    ) -> bytes:
        fmt = (request.get("response_format") or {}).get("json_schema") or {}
        schema = fmt.get("schema") or {"type": "object", "properties": {}}
        agent = str(fmt.get("name") or "answer")
        user = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
        first_user = next((m.get("content") or "" for m in messages if m.get("role") == "user"), user)
        answers, completion_tokens = self._answers(schema, agent, _item_from(first_user), n, fault)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            for i, (text, finish) in enumerate(answers)
        ]
        prompt_tokens = max(1, sum(len(m.get("content") or "") for m in messages) // 4)
        usage = self._account(len(choices), prompt_tokens, completion_tokens)
        return json.dumps(
            {
                "id": f"chatcmpl-{self.stats['ok']}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": choices,
                "usage": usage,
            }
        ).encode()

    def _text_completion(self, request: dict[str, Any], prompt: str, n: int, fault: str | None) -> bytes:
        """llama-server's /v1/completions: the schema is the top-level `json_schema`, answers are `text`."""
        schema = request.get("json_schema")
        if not isinstance(schema, dict):
            schema = {"type": "object", "properties": {}}
        # The schema carries no name here: the agent is what it asks for.
        agent = "fields:" + ",".join(sorted(schema.get("properties") or {}))
        answers, completion_tokens = self._answers(schema, agent, _item_from(prompt, last=True), n, fault)
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            for i, (text, finish) in enumerate(answers)
        ]
        usage = self._account(len(choices), max(1, len(prompt) // 4), completion_tokens)
        return json.dumps(
            {
                "id": f"cmpl-{self.stats['ok']}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": choices,
                "usage": usage,
            }
        ).encode()

    def _obey(self, answer: dict[str, Any], item: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
        text = str(item.get("description") or "")[:200]
        if self.injection == "schema":
            return {**answer, "injected": text, "item_id": "somebody-else"}
        out: dict[str, Any] = {}
        props = schema.get("properties") or {}
        for key, value in answer.items():
            prop = props.get(key) or {}
            if prop.get("type") == "string" and "enum" not in prop:
                out[key] = text
            elif prop.get("type") == "array" and (prop.get("items") or {}).get("type") == "string":
                out[key] = [text]
            else:
                out[key] = value
        return out


def _item_from(text: str, last: bool = False) -> dict[str, Any]:
    """The JSON between <item> and </item>: the first such block, or the last with `last`."""
    start = text.rfind("<item>") if last else text.find("<item>")
    end = text.find("</item>", max(start, 0))
    if start < 0 or end < start:
        return {}
    try:
        item = json.loads(text[start + len("<item>") : end])
    except ValueError:
        return {}
    return item if isinstance(item, dict) else {}


def _tier(price: Any) -> str:
    if not isinstance(price, int | float) or price <= 0:
        return "unknown"
    return "budget" if price < 20 else "mid" if price < 100 else "premium"


def _fill(
    schema: dict[str, Any], item: dict[str, Any], agent: str, rng: random.Random, noise: float
) -> dict[str, Any]:
    cats = [str(c) for c in item.get("categories") or []] or ["General"]
    title = str(item.get("title") or "item")
    ptype = cats[-1].lower().rstrip("s") if item.get("categories") else title.split()[-1].lower()
    root = cats[0].lower()
    plausible: dict[str, Any] = {
        "reasoning": f"1. The item is a {ptype} listed under {' > '.join(cats)}. 2. Fields follow from that.",
        "category_path": cats,
        "product_type": ptype,
        "attributes": [
            {"name": str(k).lower(), "value": str(v)} for k, v in (item.get("attributes") or {}).items()
        ],
        "price_tier": _tier(item.get("price")),
        "audiences": [f"{root} shoppers"],
        "scenarios": [f"everyday {ptype} use"],
        "occasions": [],
        "complements": [f"{ptype} accessories"],
        "substitutes": [f"another {ptype}"],
        "summary": f"{title} is a {ptype} in {' > '.join(cats)}.",
    }
    history = [h for h in item.get("recent_items") or [] if isinstance(h, dict)]
    if history:  # the interests agent: a user's recent items instead of one item
        leaves: list[str] = []
        for h in history:
            hc = [str(c) for c in h.get("categories") or []]
            leaf = (hc[-1] if hc else (str(h.get("title") or "item").split() or ["item"])[-1]).lower()
            if leaf not in leaves:
                leaves.append(leaf)
        plausible["covered"] = leaves
        plausible["interests"] = [f"{leaf} accessories" for leaf in reversed(leaves)][:8]
    out: dict[str, Any] = {}
    for name, prop in (schema.get("properties") or {}).items():
        value = plausible.get(name, _default(prop))
        if (
            isinstance(value, list)
            and value
            and all(isinstance(v, str) for v in value)
            and name != "category_path"
        ):
            if rng.random() < noise:  # a path-specific extra the vote should prune
                value = [*value, f"{name} idea {rng.randrange(10**6)}"]
        if name == "product_type" and rng.random() < noise / 2:
            value = f"{ptype} variant {rng.randrange(10**6)}"
        enum = prop.get("enum")
        if enum and value not in enum:
            value = enum[0]
        out[name] = value
    return out


def _default(prop: dict[str, Any]) -> Any:
    if "enum" in prop:
        return prop["enum"][0]
    return {"string": "", "array": [], "object": {}, "number": 0, "integer": 0, "boolean": False}.get(
        prop.get("type"), None
    )


def _violate(answer: dict[str, Any]) -> dict[str, Any]:
    bad = dict(answer)
    key = next((k for k, v in bad.items() if isinstance(v, list)), None)
    if key is not None:
        bad[key] = "not a list"
    else:
        bad["unexpected"] = 1
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--capacity", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--queue-limit", type=int, default=100_000)
    ap.add_argument("--model", default="fake-model")
    ap.add_argument("--disagreement", type=float, default=0.0)
    ap.add_argument(
        "--injection",
        default="schema",
        choices=["schema", "fields"],
        help="how the fake model 'obeys' injected item text: break the schema or echo values",
    )
    ap.add_argument("--faults", default="", help="e.g. 429=0.02,500=0.02,stall=0.01")
    args = ap.parse_args()
    faults = {k: float(v) for k, v in (kv.split("=") for kv in args.faults.split(",") if kv)}
    srv = FakeOpenAIServer(
        capacity=args.capacity,
        latency_s=args.latency,
        queue_limit=args.queue_limit,
        faults=faults,
        model=args.model,
        disagreement=args.disagreement,
        injection=args.injection,
        host=args.host,
        port=args.port,
    ).start()
    print(
        f"fake OpenAI server on {srv.base_url} (capacity {args.capacity}, latency {args.latency}s)",
        flush=True,
    )
    try:
        while True:
            time.sleep(10)
            print(dict(srv.stats), flush=True)
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    main()
