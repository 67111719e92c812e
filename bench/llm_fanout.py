"""LLM fan-out benchmark: the reason_items Spark job against an OpenAI-compatible server of known capacity.

    python -m bench.llm_fanout [--items 2000] [--capacity 64] [--latency 0.05] [--out bench/results]

The server (tests/fake_openai_server.py, in its own process on 127.0.0.1) serves at most C requests at
once, each taking `latency` seconds, so its capacity is C / latency requests per second. The job runs
the multi-agent chain of thought for every item (4 requests per item: 3 agents + reconciler) through
`mapInPandas`; efficiency = achieved requests per second / capacity. The same run measures a naive
client (one request in flight at a time) for contrast, and an unchanged rerun, which must make no call.
Writes bench/results/llm_fanout.json (flat) and llm_fanout.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(capacity: int, latency: float) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fake_openai_server.py"), "--port", str(port),
         "--capacity", str(capacity), "--latency", str(latency),
         # The catalog's planted injection item: a model that keeps the schema (robustness against a
         # schema-breaking one is tested in tests/test_reason_items_spark.py), so every item completes
         # and the unchanged rerun measures incrementality alone.
         "--injection", "fields"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("fake OpenAI server did not start")


def _ctx(root: Path, n_items: int, base_url: str, concurrency: int, partitions: int, ds: str):
    from jobs.context import RunContext

    return RunContext.create(ds=ds, run_id=f"bench__{ds}", overrides={
        "lakehouse": str(root / "lakehouse"), "artifacts": str(root / "artifacts"), "reports": str(root / "reports"),
        "synthetic": {"n_items": n_items, "n_users": 50, "seed": 3},
        "llm": {"backend": "openai", "base_url": base_url, "model": "fake-model", "max_concurrency": concurrency,
                "partitions": partitions, "timeout_s": 30},
    })


def _failure_reasons(ctx) -> dict[str, int]:
    import pyarrow.compute as pc

    from feature_store import delta

    if not delta.exists("silver.quarantine", ctx.root):
        return {}
    q = delta.read_arrow("silver.quarantine", ctx.root, columns=["stage", "reason"],
                         filter=pc.field("stage") == "reason_items")
    out: dict[str, int] = {}
    for r in q["reason"].to_pylist():
        code = r.split(":")[0]
        out[code] = out.get(code, 0) + 1
    return out


def run(items: int, capacity: int, latency: float, out: Path, naive_items: int) -> dict:
    from jobs.runtime import execute

    os.environ.setdefault("OPENAI_API_KEY", "bench-key")
    server, base_url = _start_server(capacity, latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            # Oversubscribe the server a little: requests queue there instead of waiting on the client,
            # which hides the client's own turnaround (what vLLM's scheduler queue does too).
            partitions = max(2, os.cpu_count() or 2)
            inflight = int(capacity * 1.5)
            ctx = _ctx(tmp / "fast", items, base_url, inflight, partitions, "2026-11-22")
            execute("ingest_catalog", ctx)
            print(f"bench-llm: reasoning {items} items, {partitions} partitions x {inflight // partitions} in flight",
                  flush=True)
            res = execute("reason_items", ctx).metrics
            failures = _failure_reasons(ctx)
            retry = execute("reason_items", ctx).metrics if res["failed"] else {"work_set": 0, "llm_calls": 0}
            rerun = execute("reason_items", ctx).metrics

            naive_ctx = _ctx(tmp / "naive", naive_items, base_url, 1, 1, "2026-11-22")
            execute("ingest_catalog", naive_ctx)
            print(f"bench-llm: naive client, {naive_items} items, one request at a time", flush=True)
            naive = execute("reason_items", naive_ctx).metrics
    finally:
        server.terminate()
        server.wait(timeout=10)

    capacity_rps = capacity / latency
    achieved = res["llm_calls"] / res["seconds"]
    naive_rps = naive["llm_calls"] / naive["seconds"]
    ok = res["ok"]
    result = {
        "items": items,
        "server_capacity": capacity,
        "server_latency_s": latency,
        "server_capacity_rps": capacity_rps,
        "achieved_rps": round(achieved, 1),
        "efficiency": round(achieved / capacity_rps, 4),
        "items_per_second": round(items / res["seconds"], 1),
        "llm_calls": res["llm_calls"],
        "calls_per_item": round(res["llm_calls"] / max(ok, 1), 2),
        "prompt_tokens_per_item": round(res["tokens_in"] / max(ok, 1), 1),
        "completion_tokens_per_item": round(res["tokens_out"] / max(ok, 1), 1),
        "ok_items": ok,
        "failed_items": res["failed"],
        "failure_reasons": failures,
        "retry_run_items": retry["work_set"],
        "llm_calls_unchanged_rerun": rerun["llm_calls"],
        "work_set_unchanged_rerun": rerun["work_set"],
        "naive_items": naive_items,
        "naive_achieved_rps": round(naive_rps, 1),
        "naive_efficiency": round(naive_rps / capacity_rps, 4),
        "speedup_over_naive": round(achieved / naive_rps, 1),
        "partitions": res["partitions"],
        "per_partition_concurrency": res["per_partition_concurrency"],
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "llm_fanout.json").write_text(json.dumps(result, indent=2))
    table = [
        "| metric | value |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in result.items()),
    ]
    (out / "llm_fanout.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.llm_fanout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--naive-items", type=int, default=40)
    p.add_argument("--capacity", type=int, default=64, help="requests the server serves at once (C)")
    p.add_argument("--latency", type=float, default=0.05, help="seconds per request")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = p.parse_args(argv)
    run(a.items, a.capacity, a.latency, a.out, a.naive_items)
    return 0


if __name__ == "__main__":
    sys.exit(main())
