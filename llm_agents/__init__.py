"""Multi-agent chain-of-thought item knowledge (the ReaSeq explicit path), free of Spark and torch.

Per catalog item a profiler, an audience reasoner and a relations reasoner answer concurrently,
each with its reasoning first and then schema-constrained fields; a reconciler checks their
answers against the item text and emits the final record. With k sampled paths per agent only
the values a strict majority agrees on survive (self-consistency pruning).
"""

from .config import BackendUnavailable, LLMConfig, model_name
from .prompts import PROMPT_VERSION
from .runner import reason_items, reason_items_async
from .types import ItemInput, KnowledgeResult

__all__ = [
    "PROMPT_VERSION",
    "BackendUnavailable",
    "ItemInput",
    "KnowledgeResult",
    "LLMConfig",
    "model_name",
    "reason_items",
    "reason_items_async",
]
