"""Multi-agent chain-of-thought item knowledge (the ReaSeq explicit path), free of Spark and torch.

Per catalog item a profiler, an audience reasoner and a relations reasoner answer concurrently,
each with its reasoning first and then schema-constrained fields; a reconciler checks their
answers against the item text and emits the final record. With k sampled paths per agent only
the values a strict majority agrees on survive (self-consistency pruning).

The interests agent (`interests.py`) serves the implicit path's LLM variant: a user's recent history
in, plausible interests beyond it out, through the same backends and request machinery.
"""

from .config import BackendUnavailable, LLMConfig, model_name
from .interests import INTERESTS_PROMPT_VERSION, infer_interests, infer_interests_async, interests_model_name
from .prompts import PROMPT_VERSION
from .runner import reason_items, reason_items_async
from .types import HistoryItem, InterestsResult, ItemInput, KnowledgeResult, UserHistory

__all__ = [
    "INTERESTS_PROMPT_VERSION",
    "PROMPT_VERSION",
    "BackendUnavailable",
    "HistoryItem",
    "InterestsResult",
    "ItemInput",
    "KnowledgeResult",
    "LLMConfig",
    "UserHistory",
    "infer_interests",
    "infer_interests_async",
    "interests_model_name",
    "model_name",
    "reason_items",
    "reason_items_async",
]
