"""The settings of every model, light to import (no torch): the pipeline's settings model
(jobs/config.py) holds them as its sections, so each default lives here once, beside the model's name.

Each model module re-exports its class (`from models.ranker import RankerConfig` keeps working).
Dataclasses refuse unknown keys when pydantic validates them (`__pydantic_config__`), so a misspelt
setting stops a run instead of being dropped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, with_config

from models.variants import VARIANTS

# Added after checkpoints existed: absent from an old checkpoint's config means "off" (the old behaviour).
_MPQ_DEDUP_FIELDS = ("mpq_dedup", "mpq_dedup_top_k")
FORBID = ConfigDict(extra="forbid")


@with_config(FORBID)
@dataclass(frozen=True)
class EmbedderConfig:
    """Text embeddings of items and interests (embed_items, the ranker's summary vectors)."""

    # local | openai | hashing (a deterministic stand-in for scale benchmarks, never the default: no
    # meaning beyond shared words; its rows say feature-hashing-384@hashing)
    backend: str = "local"
    model: str = "all-MiniLM-L6-v2"
    batch_size: int = 128
    base_url: str = "http://127.0.0.1:8001/v1"
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0

    @classmethod
    def from_dict(cls, d: dict | None) -> EmbedderConfig:
        allowed = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (d or {}).items() if k in allowed and v is not None})

    @property
    def name(self) -> str:
        """The value of the `embedder` column: which model, served how."""
        return f"{self.model}@{self.backend}"


@with_config(FORBID)
@dataclass
class DiffusionConfig:
    """The masked diffusion model of the implicit path (infer_beyond_log, method diffusion)."""

    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.1
    max_len: int = 50          # history items the model sees (the most recent; at most sequences.max_len)
    slots: int = 3             # masked items appended at inference
    tokens_per_step: int = 1   # tokens committed per reverse step
    fill: str = "next_slot"    # rank the rest by: next_slot (first slot's likelihood) | any_slot (any slot's)
    decoded_first: bool = True  # decoded items lead the list (else everything ranks by the fill score)
    epochs: int = 30
    # Fewer whole epochs when `epochs` would take more optimizer steps than this (null: no cap): the
    # steps, not the users, bound the training time, so 100,000 users train 7 epochs, not 30
    # (Scientific's 8,317 users still train all 30: 1,950 steps).
    max_steps: int | None = 5_000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    suffix_prob: float = 0.5   # share of sequences noised on a suffix only
    crop_prob: float = 0.0     # share of sequences cut at a random end first (measured lower: off)
    min_mask_t: float = 0.05
    seed: int = 0
    device: str = "auto"       # auto | cpu | cuda
    threads: int = 0           # torch threads on CPU; 0 leaves torch's default

    @classmethod
    def from_dict(cls, values: dict | None) -> DiffusionConfig:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (values or {}).items() if k in known})

    def config_hash(self) -> str:
        # device and threads change where it runs, not what it learns
        keep = {k: v for k, v in asdict(self).items() if k not in ("device", "threads")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


class QuantizerConfig(BaseModel):
    """Everything that determines the trained codebooks; `config_hash()` names a codebook version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    levels: int = Field(3, ge=1, description="L: residual levels of the hierarchical code")
    codebook_size: int = Field(256, ge=2, description="K: codes per residual level")
    rq_method: Literal["rq_kmeans", "rq_vae"] = "rq_kmeans"
    mpq_experts: int = Field(4, ge=1, description="M: MPQ experts, one token each")
    mpq_codebook_size: int = Field(256, ge=2, description="D: codes per MPQ expert")
    latent_dim: int = Field(32, ge=1, description="latent size of RQ-VAE and of each MPQ expert")
    hidden_dims: tuple[int, ...] = Field((512, 256, 128), description="RQ-VAE encoder; decoders mirror it")
    mpq_hidden_dims: tuple[int, ...] = Field((256,), description="each MPQ expert's hidden layers")
    epochs: int = Field(40, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(256, ge=1)
    commitment_beta: float = Field(0.25, ge=0)
    # The penalty sits near its floor (about 1 / batch) once experts are decorrelated; 300 was where
    # tuple uniqueness stopped improving on MiniLM embeddings without hurting reconstruction much.
    mpq_ortho_weight: float = Field(
        300.0, ge=0, description="weight of the MPQ experts' cross-correlation penalty"
    )
    seed: int = 0
    kmeans_iters: int = Field(50, ge=1, description="Lloyd iterations per k-means (RQ-KMeans, codebook init)")
    rq_dedup_last_level: bool = Field(
        True,
        description="items sharing all L codes move to the nearest free last-level code of their prefix (LC-Rec)",
    )
    kmeans_balanced: bool = Field(
        True,
        description="capacity-constrained Lloyd steps (ceil(n/K) per code) for RQ-KMeans and codebook init",
    )
    mpq_dedup: bool = Field(
        True,
        description="items sharing an MPQ tuple (after the first by item id) move to the nearest free "
        "tuple that differs in one expert's token",
    )
    mpq_dedup_top_k: int = Field(
        16, ge=1, description="nearest other codes per expert tried by the MPQ de-duplication"
    )
    max_train_items: int | None = Field(
        200_000, ge=1000,
        description="train on a seeded uniform sample of this many items when the catalog is larger (every "
        "item is still assigned); null: train on all",
    )

    def config_hash(self) -> str:
        """12 hex digits of sha256 over the canonical JSON: stable across processes and machines.

        Settings that change nothing are left out, so configurations from before they existed keep their
        hash: the MPQ de-dup fields while `mpq_dedup` is off, and `max_train_items`, which decides which
        rows are trained on: the codebook version fingerprints those rows themselves
        (jobs.train_quantizer.codebook_version), so a catalog under the cap keeps its version.
        """
        fields = self.model_dump(mode="json")
        fields.pop("max_train_items")
        if not self.mpq_dedup:
            for name in _MPQ_DEDUP_FIELDS:
                fields.pop(name)
        canon = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:12]


@with_config(FORBID)
@dataclass
class RankerConfig:
    """The SASRec-style ranker (jobs.train_ranker, dags/train_ranker.py); variants in models/variants.py."""

    variant: str = "all"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 50
    dropout: float = 0.3
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    max_epochs: int = 60
    patience: int = 5
    select_metric: str = "recall@10"
    knowledge_mlp: bool = False  # project the summary vector through a hidden layer, not one linear map
    # RQ tokens as prefixes (c1), (c1,c2), ... instead of one code per level. On: on Scientific (seed 0)
    # it raised validation Recall@10 of all 0.1502 -> 0.1531 and of +semantic_ids 0.1461 -> 0.1476.
    sid_prefix: bool = True
    beyond_log_k: int = 10
    beyond_log_pool: bool = False  # one mean-pooled context token instead of one token per inferred item
    beyond_log_copy: bool = True  # a learned score bonus per context rank for the context's own items
    # The context items as extra tokens the last position attends to. Off: on Scientific (seed 0) it
    # lowered validation Recall@10 (+beyond_log 0.1268 with it, 0.1302 without; id_only 0.1300).
    beyond_log_attend: bool = False
    # Point in time: each split's context is an inference made before its target (see the module text),
    # visible to the last position only. Off: the published inference for every position and split.
    beyond_log_point_in_time: bool = True
    # Only without point in time: the published inference was made from every event but the test target,
    # so it carries information from after each training position and from the validation target itself.
    # Training drops a user's whole context with this probability (default 0.5 then, 0 in point-in-time
    # mode), and the validation target is scored without context unless valid_context is set.
    context_dropout: float | None = None
    valid_context: bool = False
    beyond_log_model: str | None = None
    embedder: str | None = None
    exclude_history: bool = True
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # mixed precision on CUDA
    eval_batch_size: int = 512
    shuffle_buffer: int = 20000
    read_batch_rows: int = 2048

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose from {', '.join(VARIANTS)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")

    @property
    def use_semantic_ids(self) -> bool:
        return "semantic_ids" in VARIANTS[self.variant]

    @property
    def use_catalog(self) -> bool:
        return "catalog" in VARIANTS[self.variant]

    @property
    def use_llm_knowledge(self) -> bool:
        return "llm_knowledge" in VARIANTS[self.variant]

    @property
    def use_beyond_log(self) -> bool:
        return "beyond_log" in VARIANTS[self.variant]

    @property
    def effective_context_dropout(self) -> float:
        if self.context_dropout is not None:
            return self.context_dropout
        return 0.0 if self.beyond_log_point_in_time else 0.5

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> RankerConfig:
        d = dict(d or {})
        known = {f for f in cls.__dataclass_fields__}
        extra = {k: v for k, v in d.items() if k not in known}
        if extra:
            raise ValueError(f"unknown ranker settings {sorted(extra)}; known: {sorted(known)}")
        return cls(**d)


@with_config(FORBID)
@dataclass
class GenerativeConfig:
    """The REG4Rec-style generative recommender (jobs.train_generative, dags/train_generative.py)."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 50
    dropout: float = 0.2
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.05
    max_epochs: int = 20
    patience: int = 3
    select_metric: str = "recall@10"
    select_users: int = 2000  # validation users decoded (fixed order) for model selection; 0 = all
    subsets_per_position: int = 1  # random non-empty commit subsets per position, besides the empty one
    # Inference
    beam: int = 50
    corp_top_k: int = 10
    corp_min_agreement: float = 0.7
    beam_rows: int = 12800  # users x paths x beams decoded at once (memory bound)
    # PARS: DPO-style pairwise preference optimisation against a frozen reference copy
    pars_epochs: int = 2
    pars_lr: float = 1e-4
    pars_beta: float = 0.1
    pars_negatives: int = 8  # rejected items per example, from the current model's decode
    # Catalog credit: the reward of a wrong item sharing the target's whole catalog category path (a
    # catalog fact from bronze.catalog_items, not the agents' knowledge).
    pars_catalog_credit: float = 0.5
    # Knowledge credit (+pars_knowledge only): the reward of a wrong item the knowledge calls the target's
    # product type (half that for a type the target's complements name), from silver.item_knowledge rows
    # whose product type is not a catalog fact (a model's, or the offline heuristic's); the larger counts.
    pars_knowledge_credit: float = 0.5
    pars_min_margin: float = 0.05  # pairs need a reward gap at least this large
    pars_sft_weight: float = 1.0  # + the training cross-entropy on the example's target
    pars_examples_per_user: int = 2  # training positions per user drawn for alignment
    # MSRA: the user's next few *training* interactions after the target also earn reward
    msra_horizon: int = 3
    msra_weight: float = 0.7
    msra_discount: float = 0.7
    embedder: str | None = None
    exclude_history: bool = True
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    eval_batch_size: int = 256
    shuffle_buffer: int = 20000
    read_batch_rows: int = 2048

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        for name in ("pars_catalog_credit", "pars_knowledge_credit", "msra_weight"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1): the target's reward is 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> GenerativeConfig:
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        extra = sorted(k for k in d if k not in known)
        if extra:
            raise ValueError(f"unknown generative settings {extra}; known: {sorted(known)}")
        return cls(**d)

    def model_dict(self) -> dict:
        """The settings that shape the base model's weights (a checkpoint's identity)."""
        skip = {"beam", "corp_top_k", "corp_min_agreement", "beam_rows", "eval_batch_size", "device", "amp"}
        return {k: v for k, v in self.to_dict().items() if k not in skip}
