"""Typed settings of the LLM stage, and the one error that stops a run.

The API key is deliberately not a field: the config travels into Spark closures, logs, traces and
`repr`s, so it only names the environment variable that holds the key, and the HTTP backend reads
the variable at the moment it builds its client.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

OFFLINE_MODEL = "offline-heuristic-v1"


class BackendUnavailable(RuntimeError):
    """Raised instead of marking a whole catalog failed when the server is down or misconfigured.

    `completed` holds the results finished before the run stopped, so a caller may keep them.
    """

    def __init__(self, message: str, completed: list | None = None):
        super().__init__(message)
        self.completed = completed or []


def unavailable_message(exc: BaseException) -> str | None:
    """The message of a BackendUnavailable raised inside a Spark worker, which reaches the driver only as
    text inside Spark's own exception; None when `exc` is something else."""
    lines = [x for x in str(exc).splitlines() if f"{BackendUnavailable.__name__}: " in x]
    return lines[-1].split(f"{BackendUnavailable.__name__}: ", 1)[-1].strip() if lines else None


class LLMConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["offline", "openai"] = "offline"
    base_url: str = "http://localhost:8000/v1"
    # The served model name (vLLM: the `--served-model-name`, else the HF id). Required for openai.
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    # How prompts are sent: "chat" (system + user messages to /chat/completions, for instruct models
    # such as those vLLM serves) or "completion" (a few-shot text prompt to /completions, for base
    # models such as the local engine's Gemma 3 270M, which has no chat template).
    prompt_profile: Literal["chat", "completion"] = "chat"
    # How k self-consistency paths are sampled: "n" (one request with n=k choices, as vLLM bills
    # them) or "requests" (k one-choice requests; llama-server's OpenAI answer counts only the first
    # of n choices in usage.completion_tokens, so token accounting needs one request per path).
    samples_via: Literal["n", "requests"] = "n"
    max_concurrency: int = Field(64, ge=1, le=4096)
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(4, ge=0, le=20)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(20.0, ge=0)
    samples_k: int = Field(1, ge=1, le=16)
    # None resolves to 0.3 when samples_k > 1 (paths must differ to vote) and 0 otherwise. 0.3, not
    # the usual 0.7: at 0.7 the local 270M model's paths rarely agreed and the vote emptied most
    # list fields (measured, see the llm.temperature setting in jobs/config.py).
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int = Field(1024, ge=16)
    circuit_failures: int = Field(20, ge=1)
    # Dead-letter policy of the reason_items job (the client itself never reads it): an item whose
    # (content_hash, prompt_version, model) failed this many attempts is skipped until its content,
    # the prompt or the model changes or an operator requeues it. 0 = never dead-letter.
    dead_letter_after: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _resolve(self) -> LLMConfig:
        if self.temperature is None:
            object.__setattr__(self, "temperature", 0.3 if self.samples_k > 1 else 0.0)
        if self.backend == "openai":
            if not self.model:
                raise ValueError(
                    "backend 'openai' needs the served model name: set REASEQ__LLM__MODEL (or LLMConfig.model)"
                )
            if not self.base_url.startswith(("http://", "https://")):
                raise ValueError(f"base_url must be an http(s) URL, got {self.base_url!r}")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        return self

    def api_key(self) -> str | None:
        """The key, read now from the named variable; never cached on the config."""
        value = os.environ.get(self.api_key_env)
        return value or None


def model_name(config: LLMConfig) -> str:
    """The `model` lineage value of rows this config produces."""
    if config.backend == "offline":
        return OFFLINE_MODEL
    assert config.model  # guaranteed by the validator
    return config.model
