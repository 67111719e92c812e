"""The HTTP backend's wire formats and transport, against tests/fake_openai_server.py and raw sockets.

The completion profile (llama-server's /v1/completions: a text prompt, the schema as a top-level
`json_schema`, answers in `choices[i].text`) and the chat profile are checked on the wire as the fake
server receives them; failures of the connection itself (refused, timed out, closed under a reused
keep-alive connection) are checked against the BackendError codes the runner's retries read.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from llm_agents import LLMConfig, http_backend
from llm_agents.backend import BackendError, CompletionRequest
from llm_agents.http_backend import OpenAIBackend, _Transport

try:
    from fake_openai_server import FakeOpenAIServer
except ImportError:  # tests/ made a package
    from tests.fake_openai_server import FakeOpenAIServer

SCHEMA = {
    "type": "object",
    "properties": {
        "reasoning": {"type": "string"},
        "product_type": {"type": "string"},
        "complements": {"type": "array", "items": {"type": "string"}},
        "price_tier": {"type": "string", "enum": ["budget", "mid", "premium", "unknown"]},
    },
    "required": ["reasoning", "product_type", "complements", "price_tier"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "reaseq_profiler", "strict": True, "schema": SCHEMA},
}
EXAMPLE = {"title": "Stainless Steel Chef Knife", "categories": ["Home", "Kitchen", "Knives"], "price": 89.5}
ITEM = {"title": "Cordless Drill Kit", "categories": ["Tools", "Power Tools", "Drills"], "price": 129.0}
# A few-shot prompt as the completion profile sends it: the worked example's item block first, the
# item to answer last.
PROMPT = (
    "Task (profiler): profile the item.\n\n"
    f'<item>{json.dumps(EXAMPLE)}</item>\nAnswer: {{"product_type": "chef knife"}}\n\n'
    f"<item>{json.dumps(ITEM)}</item>\nAnswer:"
)


def config(srv_or_url, **kw) -> LLMConfig:
    base_url = srv_or_url if isinstance(srv_or_url, str) else srv_or_url.base_url
    return LLMConfig(
        **{"backend": "openai", "base_url": base_url, "model": "fake-model", "timeout_s": 5.0, **kw}
    )


def completion_request(n: int = 1, **kw) -> CompletionRequest:
    return CompletionRequest(
        **{
            "agent": "profiler",
            "messages": [],
            "response_format": RESPONSE_FORMAT,
            "n": n,
            "temperature": 0.7,
            "max_tokens": 256,
            "prompt": PROMPT,
            "stop": ["\n\n"],
            **kw,
        }
    )


def chat_request(n: int = 1) -> CompletionRequest:
    user = f"Task (profiler): profile the item.\n<item>{json.dumps(ITEM)}</item>"
    return CompletionRequest(
        agent="profiler",
        messages=[
            {"role": "system", "content": "You are a product-knowledge agent."},
            {"role": "user", "content": user},
        ],
        response_format=RESPONSE_FORMAT,
        n=n,
        temperature=0.0,
        max_tokens=256,
    )


async def _complete(cfg: LLMConfig, *requests: CompletionRequest):
    backend = OpenAIBackend(cfg)
    try:
        out = []
        for request in requests:
            try:
                out.append(await backend.complete(request))
            except BackendError as e:
                out.append(e)
        return out
    finally:
        await backend.aclose()


def complete(cfg: LLMConfig, *requests: CompletionRequest):
    return asyncio.run(_complete(cfg, *requests))


# -- the two profiles on the wire -------------------------------------------------------------------


def test_completion_profile_posts_the_prompt_with_a_top_level_json_schema_and_reads_text_choices():
    with FakeOpenAIServer(latency_s=0.0, record=True) as srv:
        [completion] = complete(config(srv), completion_request(n=3))
        [sent] = srv.requests
        stats = dict(srv.stats)
    assert stats["completion_requests"] == 1 and "chat_requests" not in stats
    assert sent == {
        "model": "fake-model",
        "prompt": PROMPT,
        "n": 3,
        "temperature": 0.7,
        "max_tokens": 256,
        "json_schema": SCHEMA,  # the schema itself, top level: what llama-server honours on /completions
        "stop": ["\n\n"],
        "cache_prompt": True,
    }
    assert len(completion.choices) == 3 and completion.finish_reasons == ["stop"] * 3
    for text in completion.choices:
        answer = json.loads(text)
        assert set(answer) == set(SCHEMA["properties"])
        # Answered for the prompt's last item block (the drill), not the few-shot example's (the knife).
        assert answer["product_type"] == "drill" and answer["price_tier"] == "premium"
    assert completion.prompt_tokens == stats["prompt_tokens"] > 0
    assert completion.completion_tokens == stats["completion_tokens"] > 0


def test_completion_profile_leaves_out_what_was_not_asked():
    with FakeOpenAIServer(latency_s=0.0, record=True) as srv:
        [completion] = complete(config(srv), completion_request(stop=None, response_format={}))
        [sent] = srv.requests
    assert "stop" not in sent and "json_schema" not in sent and "messages" not in sent
    assert completion.choices == ["{}"]  # no schema asked, no field filled


def test_chat_profile_is_unchanged_and_never_sends_completion_fields():
    with FakeOpenAIServer(latency_s=0.0, record=True) as srv:
        [completion] = complete(config(srv), chat_request(n=2))
        [sent] = srv.requests
        stats = dict(srv.stats)
    assert stats["chat_requests"] == 1 and "completion_requests" not in stats
    assert set(sent) == {"model", "messages", "n", "temperature", "max_tokens", "response_format"}
    assert sent["response_format"] == RESPONSE_FORMAT
    assert [json.loads(c)["product_type"] for c in completion.choices] == ["drill", "drill"]


def test_backend_url_follows_the_prompt_profile():
    cfg = config("http://127.0.0.1:9/v1")
    assert OpenAIBackend(cfg).url == "http://127.0.0.1:9/v1/chat/completions"
    if "prompt_profile" in LLMConfig.model_fields:
        completion_cfg = config("http://127.0.0.1:9/v1", prompt_profile="completion")
        assert OpenAIBackend(completion_cfg).url == "http://127.0.0.1:9/v1/completions"


@pytest.mark.parametrize(
    ("fault", "code"),
    [("429", "http_429"), ("500", "http_500"), ("disconnect", "connect_error"), ("stall", "timeout")],
)
def test_completion_endpoint_injects_faults_like_the_chat_one(fault, code):
    with FakeOpenAIServer(latency_s=0.0, script=[fault], stall_s=3) as srv:
        failed, ok = complete(config(srv, timeout_s=0.5), completion_request(), completion_request())
        assert srv.stats[f"fault_{fault}"] == 1
    assert isinstance(failed, BackendError) and failed.code == code and failed.retryable
    assert failed.connection == (code != "http_429")
    assert not isinstance(ok, BackendError) and json.loads(ok.choices[0])["product_type"] == "drill"


def test_completion_endpoint_truncates_and_breaks_the_schema_on_request():
    with FakeOpenAIServer(latency_s=0.0, script=["truncated", "schema"]) as srv:
        truncated, broken = complete(config(srv), completion_request(), completion_request())
    assert truncated.finish_reasons == ["length"]
    with pytest.raises(ValueError):
        json.loads(truncated.choices[0])
    assert broken.finish_reasons == ["stop"] and json.loads(broken.choices[0])["complements"] == "not a list"


def test_completion_endpoint_shares_the_capacity_model():
    with FakeOpenAIServer(capacity=1, latency_s=0.3, queue_limit=1) as srv:

        async def run():
            backend = OpenAIBackend(config(srv))
            try:
                return await asyncio.gather(
                    *(backend.complete(completion_request()) for _ in range(4)), return_exceptions=True
                )
            finally:
                await backend.aclose()

        results = asyncio.run(run())
        stats = srv.service_stats()
    codes = sorted(r.code if isinstance(r, BackendError) else "ok" for r in results)
    assert codes.count("ok") >= 2 and "http_429" in codes  # one in service, one queued, the rest refused
    assert stats["status_429_queue_full"] >= 1 and stats["max_in_service"] == 1


# -- parsing ----------------------------------------------------------------------------------------


async def _serve_once(body: bytes, headers: bytes = b"content-type: application/json\r\n"):
    """A raw HTTP/1.1 server answering every request with `body`; returns (server, url, connections)."""
    connections: list[int] = []

    async def handler(reader, writer):
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 200 OK\r\n" + headers + b"content-length: %d\r\n\r\n" % len(body) + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", connections


@pytest.mark.parametrize("profile", ["completion", "chat"])
def test_choices_are_read_in_index_order_with_usage(profile):
    if profile == "completion":
        choices = [
            {"index": 1, "text": "second", "finish_reason": "length"},
            {"index": 0, "text": "first", "finish_reason": "stop"},
            {"index": 2, "text": None, "finish_reason": None},
        ]
        request = completion_request(n=3)
    else:
        choices = [
            {"index": 1, "message": {"role": "assistant", "content": "second"}, "finish_reason": "length"},
            {"index": 0, "message": {"role": "assistant", "content": "first"}, "finish_reason": "stop"},
            {"index": 2, "message": {"role": "assistant", "content": None}, "finish_reason": None},
        ]
        request = chat_request(n=3)
    body = json.dumps({"choices": choices, "usage": {"prompt_tokens": 11, "completion_tokens": 7}}).encode()

    async def run():
        server, url, _ = await _serve_once(body)
        try:
            return await _complete(config(url), request)
        finally:
            server.close()

    [completion] = asyncio.run(run())
    assert completion.choices == ["first", "second", None]
    assert completion.finish_reasons == ["stop", "length", None]
    assert (completion.prompt_tokens, completion.completion_tokens) == (11, 7)


def test_an_unreadable_body_is_kept_raw_for_the_quarantine():
    async def run():
        server, url, _ = await _serve_once(b'{"choices": "nope"}')
        try:
            return await _complete(config(url), completion_request())
        finally:
            server.close()

    [error] = asyncio.run(run())
    assert error.code == "invalid_response" and error.retryable and error.raw == '{"choices": "nope"}'


def test_a_body_over_the_limit_is_a_connection_error(monkeypatch):
    monkeypatch.setattr(http_backend, "MAX_BODY", 16)

    async def run():
        server, url, _ = await _serve_once(json.dumps({"choices": [{"index": 0, "text": "x" * 64}]}).encode())
        try:
            return await _complete(config(url), completion_request())
        finally:
            server.close()

    [error] = asyncio.run(run())
    assert error.code == "connect_error" and error.connection and "_BodyTooLarge" in error.detail


# -- the connection ---------------------------------------------------------------------------------


def test_a_refused_connection_is_a_connect_error():
    srv = FakeOpenAIServer().start()
    srv.stop()  # nothing listens on its port any more
    [error] = complete(config(srv), completion_request())
    assert isinstance(error, BackendError)
    assert error.code == "connect_error" and error.retryable and error.connection and not error.fatal


def test_a_timeout_is_a_timeout_and_the_backend_still_serves_afterwards():
    with FakeOpenAIServer(latency_s=0.0, script=["stall"], stall_s=5) as srv:
        stalled, ok = complete(config(srv, timeout_s=0.3), chat_request(), chat_request())
    assert isinstance(stalled, BackendError)
    assert stalled.code == "timeout" and stalled.retryable and stalled.connection
    assert json.loads(ok.choices[0])["product_type"] == "drill"


def test_a_slow_answer_times_out():
    with FakeOpenAIServer(latency_s=2.0) as srv:
        [error] = complete(config(srv, timeout_s=0.2), completion_request())
    assert error.code == "timeout" and error.connection


def test_keep_alive_reuses_connections_up_to_the_concurrency():
    with FakeOpenAIServer(latency_s=0.005) as srv:

        async def run():
            backend = OpenAIBackend(config(srv))
            sem = asyncio.Semaphore(4)  # what the runner's max_concurrency semaphore does

            async def one(i):
                async with sem:
                    return await backend.complete(completion_request() if i % 2 else chat_request())

            try:
                results = await asyncio.gather(*(one(i) for i in range(60)))
                return results, backend._transport.clients
            finally:
                await backend.aclose()

        results, clients = asyncio.run(run())
        stats = dict(srv.stats)
    assert all(json.loads(r.choices[0])["product_type"] == "drill" for r in results)
    assert stats["ok"] == 60 and stats["completion_requests"] == stats["chat_requests"] == 30
    assert clients <= 4 and stats["connections"] <= 4  # 60 requests, both endpoints, on at most 4 connections


def test_a_reused_connection_closed_under_a_request_is_resent_once_on_a_fresh_one():
    seen: list[int] = []

    async def handler(reader, writer):  # answers the first request of a connection, drops the second
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                seen.append(answered)
                if answered:
                    return  # closed without a word, as a server timing out an idle connection would
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                await writer.drain()
                answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def run():
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        url = httpx.URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions")
        transport = _Transport({}, 5.0, verify_tls=False)
        try:
            return [(await transport.post(url, b"{}"))[2] for _ in range(5)]
        finally:
            await transport.aclose()
            server.close()

    assert asyncio.run(run()) == [b"{}"] * 5
    assert seen == [0, 1, 0, 1, 0, 1, 0, 1, 0]  # 4 requests met a dropped connection and went again


def test_a_fresh_connection_dropped_is_not_resent():
    with FakeOpenAIServer(latency_s=0.0, script=["disconnect"]) as srv:
        [error] = complete(config(srv), chat_request())
        assert srv.stats["requests"] == 1  # the runner's retry decides, not the transport
    assert error.code == "connect_error" and error.connection


def test_chunked_bodies_are_read_on_one_kept_alive_connection():
    chunked = b'3;x=1\r\n{"a\r\n4\r\n": 1\r\n1\r\n}\r\n0\r\n\r\n'
    connections: list[int] = []

    async def handler(reader, writer):
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def run():
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        url = httpx.URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions")
        transport = _Transport({}, 5.0, verify_tls=False)
        try:
            return [(await transport.post(url, b"{}"))[2] for _ in range(3)]
        finally:
            await transport.aclose()
            server.close()

    assert asyncio.run(run()) == [b'{"a": 1}'] * 3 and len(connections) == 1


def test_an_http_proxy_from_the_environment_is_used(monkeypatch):
    # The fake server stands in for the proxy: it serves the absolute-form request line a client
    # sends to an HTTP proxy, so the answer can only come through it (llm.invalid never resolves).
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    with FakeOpenAIServer(latency_s=0.0) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        [completion] = complete(config("http://llm.invalid:8000/v1"), completion_request())
        assert proxy.stats["completion_requests"] == 1
    assert json.loads(completion.choices[0])["product_type"] == "drill"
