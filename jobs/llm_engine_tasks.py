"""The DAG's setup and teardown around the LLM stages: start the local engine, stop it after.

Airflow's setup/teardown pair is the idiomatic way to hold a resource for part of a DAG: the
teardown runs whether the work between them succeeded or failed, and `airflow dags test`, the
scheduler and backfills all behave alike. Only `llm.backend: local` starts anything; an engine
given by URL (vLLM, `backend: openai`) is used as it is, and the offline heuristic needs none.

Ownership: the engine records who started it. The teardown stops it only if this DAG run started it,
so an engine a person started with `make llm-up` keeps running for them.
"""

from __future__ import annotations

import logging
from typing import Any

from jobs.config import load_config

log = logging.getLogger("reaseq")


def owner_of(run_id: str) -> str:
    return f"dag:{run_id}"


def _local_settings(conf: dict[str, Any] | None) -> dict[str, Any] | None:
    overrides = {k: v for k, v in (conf or {}).items() if v not in (None, "")}
    llm = load_config(overrides)["llm"]
    if llm["backend"] != "local":
        return None
    return dict(llm.get("local") or {})


def engine_up(run_id: str, conf: dict[str, Any] | None = None) -> dict[str, Any]:
    """Setup task: start the local engine (or reuse a running one) when the run's backend is local."""
    logging.basicConfig(level=logging.INFO)
    settings = _local_settings(conf)
    if settings is None:
        log.info("llm_engine_up: the LLM backend is not `local`; nothing to start")
        return {"engine": "not needed"}
    from llm_agents import local_engine

    try:
        state, started = local_engine.up(
            owner_of(run_id),
            slots=int(settings.get("slots", 8)),
            context_per_slot=int(settings.get("context_per_slot", 3072)),
        )
    except local_engine.EngineError as e:  # one line for the failure callback: what is wrong, what to do
        raise RuntimeError(f"llm_engine_up: {' '.join(str(e).split())}") from None
    log.info("llm_engine_up: %s llama-server at %s serving %s (pid %d)",
             "started" if started else "reusing the running", state.base_url, state.model, state.pid)
    return {"engine": "started" if started else "reused", "base_url": state.base_url, "model": state.model}


def engine_down(run_id: str) -> dict[str, Any]:
    """Teardown task: stop the engine if this run started it (runs even when the LLM stage failed)."""
    logging.basicConfig(level=logging.INFO)
    from llm_agents import local_engine

    stopped = local_engine.down(owner=owner_of(run_id))
    state = local_engine.read_state()
    if stopped:
        log.info("llm_engine_down: stopped the engine this run started")
    elif state is not None:
        log.info("llm_engine_down: left the engine at %s running (started by %s)", state.base_url, state.owner)
    return {"stopped": stopped}
