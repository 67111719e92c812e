"""The reason_items Spark job against the real local engine (llama-server + Gemma 3 270M), and that
engine's own capacity measured in the same run.

    python -m bench.llm_engine [--items 200] [--out bench/results]   (also part of `make bench-llm`)

Two measurements, one after the other on the same engine, so they can be divided:
1. capacity: a saturating reference client (asyncio + httpx, no Spark, 2x the engine's slots in
   flight) sends the agents' own completion requests for a sample of items, and counts the engine's
   completion tokens per second over its busy window. That is what the engine can give this request
   mix on this machine.
2. the job: `reason_items` over N synthetic items through Spark's `mapInArrow` fan-out, with the same
   prompts, schemas and sampling as `make run`. engine_efficiency = the job's completion tokens per
   second over the fan-out / the reference capacity (target >= 0.95).
Also: items/s, requests/s, prompt and completion tokens/s, schema-valid rate and truncations (every
answer is checked on receipt), and prompt-cache reuse read from the engine's /metrics (prompt tokens
the engine had to evaluate vs. prompt tokens sent).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _metrics(base_url: str) -> dict[str, float]:
    """llama-server's Prometheus counters (`--metrics`), as {name: value}."""
    root = base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^llamacpp:(\w+)\s+([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def _sample_items(n: int, seed: int = 5):
    from jobs.sources.synthetic import load
    from llm_agents import ItemInput

    batch = load(options={"n_items": n, "n_users": 20, "seed": seed})
    return [ItemInput.from_record(r) for r in batch.items.to_pylist()]


async def _reference(base_url: str, model: str, items, concurrency: int, max_tokens: int) -> dict:
    """Saturate the engine with the agents' completion requests; completion tokens/s over the window."""
    import httpx

    from llm_agents.prompts import RECONCILER, build_completion_prompt, render_item, upstream_for

    bodies = []
    for item in items:
        block = render_item(item)
        for agent in (*upstream_for(item), RECONCILER):
            answers = "{}" if agent is RECONCILER else None
            bodies.append({
                "model": model, "prompt": build_completion_prompt(agent, block, answers), "n": 1,
                "temperature": 0.0, "max_tokens": max_tokens, "cache_prompt": True,
                "json_schema": agent.response_format["json_schema"]["schema"],
            })
    queue = iter(bodies)
    tokens = [0, 0]
    first, last = [None], [0.0]

    async def worker(client):
        for body in queue:
            t = time.monotonic()
            first[0] = t if first[0] is None else min(first[0], t)
            r = await client.post(f"{base_url}/completions", json=body)
            r.raise_for_status()
            usage = r.json().get("usage") or {}
            tokens[0] += int(usage.get("completion_tokens") or 0)
            tokens[1] += int(usage.get("prompt_tokens") or 0)
            last[0] = max(last[0], time.monotonic())

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    window = last[0] - (first[0] or last[0])
    return {"requests": len(bodies), "completion_tokens": tokens[0], "prompt_tokens": tokens[1],
            "window_s": round(window, 2),
            "completion_tokens_per_s": round(tokens[0] / window, 2) if window else None}


def measure(items: int = 200, reference_items: int = 24, slots: int = 8) -> dict:
    """Both measurements on one engine this function starts (or reuses) and stops."""
    from jobs.context import RunContext
    from jobs.runtime import execute
    from llm_agents import local_engine

    with local_engine.engine("bench", slots=slots) as state:
        print(f"bench-llm engine: {state.model} at {state.base_url}, {slots} slots", flush=True)
        sample = _sample_items(reference_items)
        print(f"bench-llm engine: reference client, {reference_items} items x 4 agents, "
              f"{2 * slots} in flight", flush=True)
        reference = asyncio.run(_reference(state.base_url, state.model, sample, 2 * slots, 1024))
        print(f"bench-llm engine: capacity {reference['completion_tokens_per_s']} completion tokens/s", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            ctx = RunContext.create(ds="2026-11-22", run_id="bench_engine__2026-11-22", overrides={
                "lakehouse": f"{tmp}/lakehouse", "artifacts": f"{tmp}/artifacts", "reports": f"{tmp}/reports",
                "synthetic": {"n_items": items, "n_users": 50, "seed": 3},
                "llm": {"backend": "local", "partitions": 2, "max_concurrency": 2 * slots, "samples_k": 1,
                        "budget_items": None, "budget_minutes": None, "local": {"budget_minutes": None}},
            })
            execute("ingest_catalog", ctx)
            before = _metrics(state.base_url)
            print(f"bench-llm engine: reason_items over {items} items through Spark", flush=True)
            m = execute("reason_items", ctx).metrics
            after = _metrics(state.base_url)
    seconds = m["seconds"]
    sent = m["tokens_in"]
    evaluated = after.get("prompt_tokens_total", 0) - before.get("prompt_tokens_total", 0)
    job_tps = m["tokens_out"] / seconds if seconds else 0.0
    capacity = reference["completion_tokens_per_s"] or 0.0
    rejected = m.get("answers_rejected") or {}
    return {
        "model": m["model"],
        "prompt_version": m["prompt_version"],
        "items": items,
        "ok_items": m["ok"],
        "failed_items": m["failed"],
        "slots": slots,
        "in_flight": 2 * slots,
        "seconds": seconds,
        "items_per_s": round(m["ok"] / seconds, 3) if seconds else None,
        "requests_per_s": round(m["llm_calls"] / seconds, 3) if seconds else None,
        "prompt_tokens_per_s": round(sent / seconds, 1) if seconds else None,
        "completion_tokens_per_s": round(job_tps, 2),
        "requests_per_item": round(m["llm_calls"] / max(m["ok"] + m["failed"], 1), 2),
        "completion_tokens_per_item": round(m["tokens_out"] / max(m["ok"] + m["failed"], 1), 1),
        "answers": m.get("answers"),
        "schema_valid_rate": m.get("schema_valid_rate"),
        "truncation_rate": round(rejected.get("truncated", 0) / m["answers"], 4) if m.get("answers") else None,
        "answers_rejected": rejected,
        # Prompt tokens the engine evaluated vs. sent: the rest came from its prompt cache (the
        # shared few-shot prefix of each agent, thanks to --swa-full and cache_prompt).
        "prompt_tokens_sent": sent,
        "prompt_tokens_evaluated": int(evaluated),
        "prompt_cache_reuse": round(1 - evaluated / sent, 4) if sent else None,
        "reference": reference,
        "engine_capacity_completion_tokens_per_s": capacity,
        "engine_efficiency": round(job_tps / capacity, 4) if capacity else None,
        "machine": f"{os.cpu_count()} cores, no GPU",
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.llm_engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=200, help="synthetic items through reason_items (>= 200)")
    p.add_argument("--reference-items", type=int, default=24, help="items the reference client sends")
    p.add_argument("--slots", type=int, default=8, help="engine slots (llama-server --parallel)")
    a = p.parse_args(argv)
    print(json.dumps(measure(a.items, a.reference_items, a.slots), indent=2))
    return 0


if __name__ == "__main__":
    from bench.common import exit_on_sigterm

    exit_on_sigterm()
    raise SystemExit(main())
