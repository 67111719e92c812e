"""A run's LLM settings: the client's LLMConfig from the `llm` section (the local engine's model name and
URL filled in), and the nightly budget. Every stage that asks a model (reason_items, infer_beyond_log's
LLM method) or names the model its rows depend on (embed_items, build_user_features) reads them here.
"""

from __future__ import annotations

from jobs.context import RunContext
from jobs.runtime import StageFailed

# What the local engine needs from the client: Gemma 3 270M is a base model (few-shot completion
# prompts), and llama-server bills only the first of n choices (one request per sampled path).
LOCAL_ENGINE_SETTINGS = {"backend": "openai", "prompt_profile": "completion", "samples_via": "requests"}


def llm_config(ctx: RunContext, partitions: int, *, need_server: bool = False):
    """The LLMConfig of this run, with `max_concurrency` split over the partitions.

    `backend: local` is the embedded llama.cpp engine: the model name (the GGUF's file name and hash,
    the lineage every row carries) comes from the model file, so stages after the engine has stopped
    still know it; the URL comes from the running engine's state file, needed only by the stages
    that send requests (`need_server`).
    """
    from llm_agents import LLMConfig

    cfg = dict(ctx.config["llm"])  # validated by the settings model (jobs/config.py)
    total = int(cfg.pop("max_concurrency"))
    allowed = set(LLMConfig.model_fields)
    local = cfg["local"]
    # Client settings left null keep LLMConfig's defaults; the stage's own keys (budgets, partitions) stay here.
    cfg = {k: v for k, v in cfg.items() if k in allowed and v is not None}
    if cfg["backend"] == "local":
        cfg.update(local_engine_settings(need_server))
        # Twice the engine's slots in flight keeps every slot busy while answers travel back; more
        # would only queue inside llama-server, where a request's timeout keeps running.
        total = min(total, 2 * local["slots"])
        cfg["timeout_s"] = max(float(cfg.get("timeout_s") or 0), 180.0)
    if cfg["backend"] == "offline":
        cfg.pop("model", None)
    return LLMConfig(**cfg, max_concurrency=max(1, total // max(1, partitions)))


def local_engine_settings(need_server: bool) -> dict:
    from llm_agents import local_engine

    path = local_engine.model_path()
    if not path.exists():
        raise StageFailed(f"the local LLM engine's model is not installed ({path}): run `make llm-engine` "
                          "(or `make run`, which sets it up), or choose another backend: REASEQ__LLM__BACKEND=offline")
    settings = {**LOCAL_ENGINE_SETTINGS, "model": local_engine.served_model_name(path)}
    state = local_engine.running()
    if state is not None:
        if state.model != settings["model"]:  # rows must name the model that answered them
            raise StageFailed(f"the running local engine serves {state.model}, not the installed "
                              f"{settings['model']}: stop it (make llm-down) and rerun")
        settings["base_url"] = state.base_url
    elif need_server:
        raise StageFailed("the local LLM engine is not running: the DAG's llm_engine_up task starts it (or run "
                          "`make llm-up`), or choose another backend: REASEQ__LLM__BACKEND=offline")
    return settings


def llm_budget(ctx: RunContext) -> tuple[int | None, float | None]:
    """`llm.budget_items` and `llm.budget_minutes` (validated by the settings model); None = no cap.

    Read here, not through `llm_config()`: LLMConfig is the client's settings and does not know them.
    """
    cfg = ctx.config["llm"]
    items, minutes = cfg["budget_items"], cfg["budget_minutes"]
    if cfg["backend"] == "local":
        # The local engine's own defaults (llm.local.budget_*), sized for a 2-core machine; the
        # llm.budget_* keys, when set, override them. A GPU server given by URL gets no default cap.
        items = cfg["local"]["budget_items"] if items is None else items
        minutes = cfg["local"]["budget_minutes"] if minutes is None else minutes
    return items, None if minutes is None else float(minutes)


# The first chunk for a server given by URL (its rate is not known yet); later chunks are sized by time.
COMMIT_EVERY_ITEMS = 1000
# A chunk's items sit in the Python workers and its answers in one checkpoint: this bounds both however
# fast the server is.
CHUNK_MAX_ITEMS = 20_000


def llm_commit_every(ctx: RunContext) -> tuple[int, float | None]:
    """(the first chunk's items, the seconds later chunks are sized to last, or None for fixed chunks).

    `llm.commit_every_items` set: every chunk that many items. Null: the local engine's
    `llm.local.commit_every_items`, fixed (a few minutes of its work already); a server given by URL
    starts with COMMIT_EVERY_ITEMS and sizes the next chunks to `llm.commit_every_minutes` at its
    measured rate (null minutes: fixed chunks)."""
    cfg = ctx.config["llm"]
    if cfg["commit_every_items"] is not None:
        return int(cfg["commit_every_items"]), None
    if cfg["backend"] == "local":
        return int(cfg["local"]["commit_every_items"]), None
    minutes = cfg["commit_every_minutes"]
    return COMMIT_EVERY_ITEMS, None if minutes is None else 60.0 * float(minutes)
