"""A fake OpenAI-compatible chat-completions server for tests and client benchmarks.

Real HTTP on 127.0.0.1 (HTTP/1.1, keep-alive), driven by a minimal asyncio parser in its own
thread and event loop (uvloop when installed), so hundreds of concurrent connections cost little
and the client under test, not the server, is what a benchmark measures. For benchmarks that need
the client's process to themselves, run it as a separate process:

    python tests/fake_openai_server.py --port 8011 --capacity 64 --latency 0.05

Capacity model: at most `capacity` requests are in service at once, each taking `latency_s`; the
rest wait in a queue of up to `queue_limit`, beyond which the server answers 429 at once (as vLLM
front-ends behind a gateway do). Service is scheduled on `capacity` slots in the loop's clock: a
request starts when it arrives or when the earliest slot frees, whichever is later, and ends exactly
`latency_s` after it starts, so the slots are the GPU and the event loop the API front-end: a loop
slowed by the machine's load delays answers but does not stretch the GPU's service time (with an
asyncio.Semaphore, a slot would stay held until the loop got round to releasing it, and a
benchmark would bill the client for the fake server's own lag). `GET /stats` (not part of the
OpenAI API) returns the counters and the service window, first slot taken to last one freed, from
which a benchmark reads how busy its client kept the slots; `DELETE /stats` resets them.

Faults are injected per request by rate (`faults`) or in arrival order (`script`): "429", "500",
"stall" (hold the request past any sane client timeout, then drop the connection), "disconnect"
(drop the connection without answering), "truncated" (JSON cut in half, finish_reason "length"),
"schema" (valid JSON that violates the requested schema).

Answers are schema-valid JSON built from the request: the item JSON is read back from between
<item> and </item>, and each property of the requested json_schema is filled plausibly from it
(category_path from the categories, and so on; for the interests agent, whose block holds a user's
"recent_items", `covered` lists their category leaves and `interests` "<leaf> accessories", most
recent first). `disagreement` makes sampled choices differ, so
self-consistency voting has something to prune. An item whose text carries a prompt injection
("ignore previous instructions", ...) makes this fake model "obey" it, per `injection`:
"schema" answers with an extra key (a schema violation), "fields" stuffs the injected text into
every string field while keeping the schema.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import random
import re
import threading
import time
import zlib
from collections import Counter, deque
from typing import Any

FAULT_KINDS = ("429", "500", "stall", "disconnect", "truncated", "schema")
INJECTION = re.compile(r"ignore (all )?(previous|prior|above) instructions", re.IGNORECASE)
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests"}


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._slots: list[float] = []  # heap: when each service slot is next free (loop clock)
        self._conns: set[asyncio.Task[Any]] = set()
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> FakeOpenAIServer:
        try:
            import uvloop

            self._loop = uvloop.new_event_loop()
        except ImportError:
            self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="fake-openai", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"fake server did not start: {self._error!r}")
        return self

    def _serve(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            self._slots = [0.0] * self.capacity
            self._server = loop.run_until_complete(
                asyncio.start_server(self._connection, self.host, self.port, backlog=4096, reuse_address=True)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as e:  # reported to start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    def stop(self) -> None:
        """Stop listening and drop every open connection, as a crashed server would."""
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
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
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self.stats["connections"] += 1
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout_s):
                        head = await reader.readuntil(b"\r\n\r\n")
                except TimeoutError:
                    self.stats["idle_closed"] += 1
                    return
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                try:
                    method, path, _ = lines[0].split(" ", 2)
                except ValueError:
                    return
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                status, payload, extra = await self._dispatch(method, path, headers, body)
                if status == 0:  # dropped on purpose
                    return
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                head_out = (
                    f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                    f"content-type: application/json\r\ncontent-length: {len(data)}\r\n"
                    + "".join(f"{k}: {v}\r\n" for k, v in extra.items())
                    + "\r\n"
                )
                writer.write(head_out.encode("latin-1") + data)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:  # stop(): end quietly, asyncio would log a cancelled handler
            return
        finally:
            self._conns.discard(task)
            writer.close()

    def _fault(self) -> str | None:
        if self.script:
            return self.script.popleft()
        u = self._rng.random()
        for kind, rate in self.faults.items():
            if u < rate:
                return kind
            u -= rate
        return None

    async def _dispatch(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        if path.rstrip("/") == "/stats" and method in ("GET", "DELETE"):  # not OpenAI: for benchmarks
            if method == "DELETE":
                self.reset_service_stats()
            return 200, self.service_stats(), {}
        self.stats["requests"] += 1
        if method != "POST" or not path.rstrip("/").endswith("/chat/completions"):
            self.stats["status_404"] += 1
            return 404, {"error": {"message": f"no route {method} {path}"}}, {}
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            self.stats["status_401"] += 1
            return 401, {"error": {"message": "invalid API key"}}, {}
        try:
            request = json.loads(body)
            messages = request["messages"]
            n = int(request.get("n") or 1)
        except (ValueError, KeyError, TypeError) as e:
            self.stats["status_400"] += 1
            return 400, {"error": {"message": f"bad request: {e}"}}, {}
        if request.get("model") != self.model:
            self.stats["status_404"] += 1
            return 404, {"error": {"message": f"The model `{request.get('model')}` does not exist."}}, {}
        if self.record:
            self.requests.append(request)
        fault = self._fault()
        if fault is not None:
            self.stats[f"fault_{fault}"] += 1
        if fault == "429":
            return 429, {"error": {"message": "rate limited"}}, {"retry-after": "0"}
        if fault == "500":
            return 500, {"error": {"message": "internal error"}}, {}
        if fault == "disconnect":
            return 0, b"", {}
        if fault == "stall":  # a hung connection, not a busy GPU: it holds no service slot
            await asyncio.sleep(self.stall_s)
            return 0, b"", {}
        if self._queued >= self.queue_limit:
            self.stats["status_429_queue_full"] += 1
            return 429, {"error": {"message": "queue full"}}, {}
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
        return 200, self._completion(request, messages, n, fault), {}

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
    def _completion(
        self, request: dict[str, Any], messages: list[dict[str, Any]], n: int, fault: str | None
    ) -> bytes:
        fmt = (request.get("response_format") or {}).get("json_schema") or {}
        schema = fmt.get("schema") or {"type": "object", "properties": {}}
        agent = str(fmt.get("name") or "answer")
        user = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
        first_user = next((m.get("content") or "" for m in messages if m.get("role") == "user"), user)
        item = _item_from(first_user)
        injected = bool(INJECTION.search(json.dumps(item)))
        n_out = min(n, self.max_n) if self.max_n else n
        choices = []
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
            choices.append(
                {"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
            )
        prompt_tokens = max(1, sum(len(m.get("content") or "") for m in messages) // 4)
        self.stats["ok"] += 1
        self.stats["choices"] += len(choices)
        self.stats["prompt_tokens"] += prompt_tokens
        self.stats["completion_tokens"] += completion_tokens
        return json.dumps(
            {
                "id": f"chatcmpl-{self.stats['ok']}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
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


def _item_from(user: str) -> dict[str, Any]:
    start, end = user.find("<item>"), user.find("</item>")
    if start < 0 or end < start:
        return {}
    try:
        item = json.loads(user[start + len("<item>") : end])
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
    ap.add_argument("--injection", default="schema", choices=["schema", "fields"],
                    help="how the fake model 'obeys' injected item text: break the schema or echo values")
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
