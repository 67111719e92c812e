"""Semantic-ID quantizers for gold.item_semantic_ids: training, batch assignment, checkpoints.

Two families are trained on the item embeddings (silver.item_embeddings):

* hierarchical codes (`rq_codes`): `config.rq_method` picks residual k-means ("rq_kmeans", no network) or
  TIGER's RQ-VAE ("rq_vae"). Each item gets L codes in [0, K), then `add_collision_digit` appends one
  digit that makes the full ID unique. RQ-KMeans is the default: on MiniLM embeddings it reconstructs
  better (MSE 0.0008 vs 0.0015), trains in seconds rather than tens of seconds, and with the last-level
  de-duplication below both reach zero collisions; RQ-VAE's raw nearest-code collisions are lower (11% vs
  26% on 4,344 Amazon "Scientific" items, a catalogue where 7.5% of items have a near-twin at cosine >= 0.99);
* MPQ tokens (`mpq_tokens`, REG4Rec): M unordered tokens in [0, D), one per expert codebook, with no
  extra digit. Near-duplicate items share tuples (89-91% unique on "Scientific" with nearest codes,
  depending on the text embedded), so with `mpq_dedup` (default) the shared ones are made unique by
  changing one token (below; 100% unique there, 307 of 4,344 items moved, in a fraction of a second).

Collisions: with `rq_dedup_last_level` (default) items that share all L codes are moved to the nearest
free last-level code under their (L-1)-prefix, LC-Rec style (models.rq.dedup_last_level); the metrics keep
the plain nearest-code figure as `rq_collision_rate_nearest`. With `mpq_dedup` (default) items sharing
an MPQ tuple, in item-id order after the first, move to the nearest tuple nobody holds that differs in
one expert's token, trying each expert's `mpq_dedup_top_k` nearest other codes in order of distance
margin (models.mpq.dedup_tuples); the metrics keep `mpq_tuple_unique_rate_nearest` (before),
`mpq_dedup_moved_items` and `mpq_dedup_unresolved_items` (items whose candidates were all held; they keep
colliding, and a warning names a few). Like the collision digit, both fixes make an item's codes depend on
the other items assigned with it: assign a codebook version's whole catalogue in one `assign` call, not
partition by partition.

Versions: `config_hash()` leaves the MPQ de-dup settings out while `mpq_dedup` is off, and checkpoints
saved before the setting existed load with it off, so their hashes and their tokens stay what they were.

Small catalogues: a codebook larger than the data cannot be fitted. When n_items < K (or < D), that size
is reduced to the largest power of two <= n_items / 2 (at least 2); the reduction is warned about and
recorded under metrics["reductions"] and metrics["warnings"], and the trained modules carry the sizes
actually used (`tq.rq.codebook_size`, `tq.mpq.codebook_size`). Fewer than 4 items raise ValueError.

Determinism: every random draw comes from a generator seeded with `config.seed` and modules are
initialised under a forked, seeded global RNG (the caller's RNG state is left untouched), so the same data,
config, device and thread count give identical codes. The CPU kernels used are deterministic; on CUDA the
floating-point sums may differ between runs, so pin device="cpu" where bit-identical reruns matter.

Threads: nothing here calls torch.set_num_threads; that is the caller's choice. On a CPU shared with
Spark, one thread ran these loops several times faster than two (OpenMP threads spinning on busy cores).

Inputs are guarded, not cleaned: rows with NaN/inf or of the wrong dimension raise ValueError saying how
many; the caller quarantines such rows first.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from models.configs import _MPQ_DEDUP_FIELDS, QuantizerConfig  # noqa: F401  (defined there; re-exported)
from models.device import resolve_device
from models.mpq import MPQ, dedup_tuples
from models.rq import RQVAE, RQKMeans, dedup_last_level, train_loop
from models.sid_metrics import add_collision_digit, codebook_metrics, mean_squared, squared_sum

__all__ = [
    "QuantizerConfig",
    "TrainedQuantizers",
    "add_collision_digit",
    "assign",
    "assign_one",
    "codebook_metrics",
    "load_checkpoint",
    "save_checkpoint",
    "train_one",
    "train_quantizers",
]

CHECKPOINT_FORMAT = "semantic-id-quantizers/1"
MIN_ITEMS = 4
# Rows per inference block: keeps the n x K distance matrices small on large catalogues.
_INFER_CHUNK = 16384

Method = Literal["rq_vae", "rq_kmeans", "mpq"]
# Item ids named in the warning about MPQ tuples the de-duplication could not separate.
_UNRESOLVED_SHOWN = 5


@dataclass
class TrainedQuantizers:
    config: QuantizerConfig
    rq: RQKMeans | RQVAE
    mpq: MPQ
    metrics: dict = field(default_factory=dict)
    train_seconds: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- helpers


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[torch.Generator]:
    """Seeded global RNG (for module init) restored on exit, plus a CPU generator for every other draw."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def validate_embeddings(embeddings, expected_dim: int | None = None, copy: bool = True) -> np.ndarray:
    """float32 n x d copy of `embeddings` (a 2-D array or a sequence of vectors), or ValueError.

    `copy=False` returns a float32 C-contiguous array itself (assignment only reads it: at a million
    384-d items a copy is 1.5 GB)."""
    if isinstance(embeddings, np.ndarray) and embeddings.dtype != object:
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be 2-D (n x d), got shape {embeddings.shape}")
        arr = embeddings
        dim = expected_dim if expected_dim is not None else arr.shape[1]
        if arr.shape[1] != dim:
            raise ValueError(
                f"{arr.shape[0]} of {arr.shape[0]} embedding rows have dimension {arr.shape[1]}, expected {dim}"
            )
    else:
        rows = [np.asarray(r if r is not None else [], dtype=np.float64).ravel() for r in embeddings]
        if not rows:
            arr = np.zeros((0, expected_dim or 0), dtype=np.float32)
        else:
            lengths = [r.shape[0] for r in rows]
            dim = expected_dim if expected_dim is not None else Counter(lengths).most_common(1)[0][0]
            bad = sum(length != dim for length in lengths)
            if bad:
                raise ValueError(f"{bad} of {len(rows)} embedding rows do not have dimension {dim}")
            arr = np.stack(rows)
    with np.errstate(over="ignore"):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    # In blocks of rows: a whole n x d mask is a quarter of the matrix again.
    nonfinite = sum(int((~np.isfinite(arr[s : s + _INFER_CHUNK]).all(axis=1)).sum())
                    for s in range(0, arr.shape[0], _INFER_CHUNK))
    if nonfinite:
        raise ValueError(
            f"{nonfinite} of {arr.shape[0]} embedding rows contain NaN or inf; quarantine them before quantizing"
        )
    return arr.copy() if copy and arr is embeddings else arr


def effective_codebook_size(requested: int, n_items: int) -> int:
    """The requested size, or the largest power of two <= n_items / 2 (min 2) when n_items < requested."""
    if n_items < MIN_ITEMS:
        raise ValueError(f"at least {MIN_ITEMS} items are needed to train quantizers, got {n_items}")
    if n_items >= requested:
        return requested
    return max(2, 1 << int(np.floor(np.log2(n_items / 2))))


def _sizes(config: QuantizerConfig, n: int, methods: Sequence[str]) -> tuple[dict, list[dict]]:
    sizes, reductions = {}, []
    for name, requested in (
        ("codebook_size", config.codebook_size),
        ("mpq_codebook_size", config.mpq_codebook_size),
    ):
        if name == "codebook_size" and not any(m in ("rq_vae", "rq_kmeans") for m in methods):
            continue
        if name == "mpq_codebook_size" and "mpq" not in methods:
            continue
        used = effective_codebook_size(requested, n)
        sizes[name] = used
        if used != requested:
            reductions.append({"parameter": name, "requested": requested, "used": used, "n_items": n})
            warnings.warn(
                f"only {n} items: {name} reduced from {requested} to {used} (largest power of two <= n/2)",
                UserWarning,
                stacklevel=3,
            )
    return sizes, reductions


def _build(method: str, meta: dict) -> nn.Module:
    if method == "rq_kmeans":
        return RQKMeans(**meta)
    if method == "rq_vae":
        return RQVAE(**meta)
    if method == "mpq":
        return MPQ(**meta)
    raise ValueError(f"unknown quantizer method {method!r}")


def _train(
    method: str,
    x: torch.Tensor,
    config: QuantizerConfig,
    size: int,
    device: torch.device,
    progress: Callable[[str, int, int], None] | None,
) -> tuple[nn.Module, float, dict]:
    d = x.shape[1]
    # Each method gets its own seeded stream, so training MPQ does not depend on which RQ method ran first.
    with _seeded(config.seed, device) as gen:
        start = time.perf_counter()
        if method == "rq_kmeans":
            model = RQKMeans(d, config.levels, size).to(device)
            model.fit(
                x,
                config.kmeans_iters,
                gen,
                on_level=lambda lv: progress and progress(method, lv, config.levels),
                balanced=config.kmeans_balanced,
            )
            stats: dict = {"kmeans_iters": config.kmeans_iters}
        elif method == "rq_vae":
            model = RQVAE(d, config.hidden_dims, config.latent_dim, config.levels, size).to(device)
            stats = train_loop(model, x, config, gen, method, progress)
        elif method == "mpq":
            model = MPQ(
                d,
                config.mpq_experts,
                size,
                config.mpq_hidden_dims,
                config.latent_dim,
                list(reversed(config.hidden_dims)),
            ).to(device)
            stats = train_loop(model, x, config, gen, method, progress)
        else:
            raise ValueError(f"unknown quantizer method {method!r}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    model.eval()
    return model, seconds, stats


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def _blocks(
    model: nn.Module, x: np.ndarray, fn: Callable[..., torch.Tensor], *more: np.ndarray
) -> np.ndarray:
    """fn applied to x (and the same rows of each array in `more`) in blocks of rows on the model's
    device, concatenated as numpy."""
    dev = _model_device(model)
    out = [
        fn(*(torch.from_numpy(a[s : s + _INFER_CHUNK]).to(dev) for a in (x, *more))).cpu().numpy()
        for s in range(0, len(x), _INFER_CHUNK)
    ]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


@torch.no_grad()
def _recon_mse(model: nn.Module, x: np.ndarray, fn: Callable[..., torch.Tensor], *inputs: np.ndarray) -> float:
    """mean((x - fn(inputs))^2) block by block, as `_blocks` would feed fn: no n x d reconstruction is
    ever held (at a million 384-d items each one was 1.5 GB, and its float64 copies 3 GB more)."""
    dev = _model_device(model)
    total = 0.0
    for s in range(0, len(x), _INFER_CHUNK):
        recon = fn(*(torch.from_numpy(a[s : s + _INFER_CHUNK]).to(dev) for a in inputs)).cpu().numpy()
        total += squared_sum(x[s : s + _INFER_CHUNK], recon)
    return total / x.size if x.size else float("nan")


@torch.no_grad()
def _encode_rq(
    rq: nn.Module, x: np.ndarray, item_ids: Sequence[str], dedup: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """(published L codes, nearest-code L codes, items moved by the last-level de-duplication)."""
    nearest_codes = _blocks(rq, x, rq.encode).astype(np.int64)
    if not dedup:
        return nearest_codes, nearest_codes, 0
    codes, moved = dedup_last_level(
        nearest_codes, item_ids, lambda rows: _blocks(rq, x[rows], rq.last_level_distances)
    )  # dedup_last_level asks for rows a block at a time
    return codes, nearest_codes, moved


@torch.no_grad()
def _encode_mpq(
    mpq: MPQ, x: np.ndarray, item_ids: Sequence[str], config: QuantizerConfig
) -> tuple[np.ndarray, np.ndarray, int, list[int]]:
    """(published tokens, nearest-code tokens, items moved, rows still colliding) for n x M MPQ tokens."""
    nearest_tokens = _blocks(mpq, x, mpq.encode).astype(np.int32)
    if not config.mpq_dedup:
        return nearest_tokens, nearest_tokens, 0, []
    tokens, moved, unresolved = dedup_tuples(
        nearest_tokens,
        item_ids,
        lambda rows: _blocks(mpq, x[rows], mpq.token_distances),
        config.mpq_dedup_top_k,
    )
    if unresolved:
        shown = ", ".join(str(item_ids[r]) for r in unresolved[:_UNRESOLVED_SHOWN])
        warnings.warn(
            f"MPQ de-duplication left {len(unresolved)} items sharing a tuple (every one of their "
            f"{config.mpq_dedup_top_k} nearest other codes per expert was taken), e.g. {shown}",
            UserWarning,
            stacklevel=2,
        )
    return tokens, nearest_tokens, moved, unresolved


def _assign_rq(
    rq: nn.Module, x: np.ndarray, item_ids: Sequence[str], config: QuantizerConfig
) -> tuple[np.ndarray, dict]:
    """(n x (L+1) codes with the collision digit, rq_* metrics)."""
    rq_codes, nearest_codes, moved = _encode_rq(rq, x, item_ids, config.rq_dedup_last_level)
    full = add_collision_digit(rq_codes, item_ids)
    metrics = codebook_metrics(rq_codes, rq.codebook_size, full_ids=full)
    metrics["rq_recon_mse"] = _recon_mse(rq, x, lambda c: rq.decode(c.long()), rq_codes)
    metrics["embedding_mean_sq"] = mean_squared(x)
    metrics["rq_collision_rate_nearest"] = codebook_metrics(nearest_codes, rq.codebook_size)[
        "rq_collision_rate"
    ]
    metrics["rq_dedup_moved_items"] = moved
    return full, metrics


def _assign_mpq(
    mpq: MPQ, x: np.ndarray, item_ids: Sequence[str], config: QuantizerConfig
) -> tuple[np.ndarray, dict]:
    """(n x M tokens, mpq_* metrics)."""
    tokens, nearest_tokens, moved, unresolved = _encode_mpq(mpq, x, item_ids, config)
    metrics = codebook_metrics(mpq_tokens=tokens, mpq_codebook_size=mpq.codebook_size)
    # Reconstruction of the published tokens, the moved items' included (as for RQ's published codes).
    metrics["mpq_recon_mse"] = _recon_mse(mpq, x, mpq.reconstruct, x, tokens)
    metrics["embedding_mean_sq"] = mean_squared(x)
    metrics["mpq_tuple_unique_rate_nearest"] = codebook_metrics(
        mpq_tokens=nearest_tokens, mpq_codebook_size=mpq.codebook_size
    )["mpq_tuple_unique_share"]
    metrics["mpq_dedup_moved_items"] = moved
    metrics["mpq_dedup_unresolved_items"] = len(unresolved)
    return tokens, metrics


def _evaluate(
    rq: nn.Module, mpq: MPQ, x: np.ndarray, item_ids: Sequence[str], config: QuantizerConfig
) -> tuple[np.ndarray, np.ndarray, dict]:
    full, rq_metrics = _assign_rq(rq, x, item_ids, config)
    tokens, mpq_metrics = _assign_mpq(mpq, x, item_ids, config)
    return full, tokens, {**rq_metrics, **mpq_metrics}


# --------------------------------------------------------------------------------------------- public API


def train_one(
    method: Method,
    embeddings: np.ndarray,
    config: QuantizerConfig,
    device: str | torch.device = "auto",
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[nn.Module, float]:
    """Train a single quantizer ("rq_vae", "rq_kmeans" or "mpq"); returns (module in eval mode, seconds).

    `config.rq_method` is ignored (`method` says what to train); `progress` as in train_quantizers.
    The module's training statistics are in `model.train_stats`; `assign_one` assigns with it.
    """
    if method not in ("rq_vae", "rq_kmeans", "mpq"):
        raise ValueError(f"unknown quantizer method {method!r}; expected rq_vae, rq_kmeans or mpq")
    x = validate_embeddings(embeddings)
    sizes, _ = _sizes(config, x.shape[0], [method])
    dev = resolve_device(device)
    size = sizes["mpq_codebook_size" if method == "mpq" else "codebook_size"]
    model, seconds, stats = _train(method, torch.from_numpy(x).to(dev), config, size, dev, progress)
    model.train_stats = stats
    return model, seconds


def assign_one(
    model: nn.Module, embeddings: np.ndarray, item_ids: list[str], config: QuantizerConfig
) -> tuple[np.ndarray, dict]:
    """Batch inference with one quantizer from `train_one`: (codes int32, metrics of that quantizer).

    RQ-KMeans / RQ-VAE: n x (L+1) codes with the collision digit, after the last-level de-dup if
    `config.rq_dedup_last_level`; MPQ: n x M tokens, after the tuple de-dup if `config.mpq_dedup`. The
    codes and metrics are those `assign` gives for the same module and config.
    """
    x = validate_embeddings(embeddings, expected_dim=model.in_dim, copy=False)
    ids = [str(i) for i in item_ids]
    if len(ids) != x.shape[0]:
        raise ValueError(f"{len(ids)} item ids for {x.shape[0]} embedding rows")
    width = model.experts if model.method == "mpq" else model.levels + 1
    if x.shape[0] == 0:
        return np.zeros((0, width), np.int32), {"config_hash": config.config_hash(), "n_items": 0}
    model.eval()
    step = _assign_mpq if model.method == "mpq" else _assign_rq
    codes, quality = step(model, x, ids, config)
    metrics = {"config_hash": config.config_hash(), "n_items": int(x.shape[0]), **quality}
    return codes.astype(np.int32), metrics


def train_quantizers(
    embeddings: np.ndarray,
    config: QuantizerConfig,
    device: str | torch.device = "auto",
    progress: Callable[[str, int, int], None] | None = None,
) -> TrainedQuantizers:
    """Train `config.rq_method` and MPQ on n x d embeddings; metrics are measured on the same items.

    `progress(stage, step, total)` is called per k-means level (rq_kmeans) or per epoch (rq_vae, mpq).
    """
    x = validate_embeddings(embeddings)
    n = x.shape[0]
    sizes, reductions = _sizes(config, n, [config.rq_method, "mpq"])
    dev = resolve_device(device)
    xt = torch.from_numpy(x).to(dev)
    rq, rq_s, rq_stats = _train(config.rq_method, xt, config, sizes["codebook_size"], dev, progress)
    mpq, mpq_s, mpq_stats = _train("mpq", xt, config, sizes["mpq_codebook_size"], dev, progress)
    # Row numbers stand in for item ids: training metrics only need the digit's uniqueness, not its order.
    _, _, quality = _evaluate(rq, mpq, x, [str(i) for i in range(n)], config)
    metrics = {
        "config_hash": config.config_hash(),
        "rq_method": config.rq_method,
        "n_items": n,
        "dim": int(x.shape[1]),
        "device": str(dev),
        "codebook_size_used": sizes["codebook_size"],
        "mpq_codebook_size_used": sizes["mpq_codebook_size"],
        "reductions": reductions,
        "warnings": [
            f"{r['parameter']} reduced from {r['requested']} to {r['used']} for {n} items" for r in reductions
        ],
        "rq_train": rq_stats,
        "mpq_train": mpq_stats,
        **quality,
    }
    return TrainedQuantizers(
        config=config, rq=rq, mpq=mpq, metrics=metrics, train_seconds={config.rq_method: rq_s, "mpq": mpq_s}
    )


def assign(
    tq: TrainedQuantizers, embeddings: np.ndarray, item_ids: list[str]
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Batch inference: (rq_codes n x (L+1) int32 with the collision digit, mpq_tokens n x M int32, metrics).

    Deterministic for a given checkpoint and device; runs on the device the modules are on.
    """
    x = validate_embeddings(embeddings, expected_dim=tq.rq.in_dim, copy=False)
    ids = [str(i) for i in item_ids]
    if len(ids) != x.shape[0]:
        raise ValueError(f"{len(ids)} item ids for {x.shape[0]} embedding rows")
    if x.shape[0] == 0:
        empty = codebook_metrics(np.zeros((0, tq.rq.levels), np.int32), tq.rq.codebook_size)
        return (
            np.zeros((0, tq.rq.levels + 1), np.int32),
            np.zeros((0, tq.mpq.experts), np.int32),
            {"n_items": 0, **empty},
        )
    tq.rq.eval()
    tq.mpq.eval()
    full, tokens, quality = _evaluate(tq.rq, tq.mpq, x, ids, tq.config)
    metrics = {"config_hash": tq.config.config_hash(), "n_items": int(x.shape[0]), **quality}
    return full.astype(np.int32), tokens.astype(np.int32), metrics


def save_checkpoint(tq: TrainedQuantizers, path: str | Path) -> None:
    """One torch file: module state dicts and shapes, the config, metrics as JSON. Written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def part(model: nn.Module) -> dict:
        return {
            "method": model.method,
            "meta": model.meta(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        }

    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": tq.config.model_dump(mode="json"),
        "config_hash": tq.config.config_hash(),
        "rq": part(tq.rq),
        "mpq": part(tq.mpq),
        "metrics_json": json.dumps(tq.metrics, sort_keys=True),
        "train_seconds": {k: float(v) for k, v in tq.train_seconds.items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> TrainedQuantizers:
    """Rebuild the quantizers on the CPU (move `tq.rq` / `tq.mpq` with `.to()` for GPU inference)."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint (format={payload.get('format')!r})")
    modules = []
    for key in ("rq", "mpq"):
        model = _build(payload[key]["method"], payload[key]["meta"])
        model.load_state_dict(payload[key]["state_dict"])
        modules.append(model.eval())
    # A checkpoint from before the MPQ de-dup existed published nearest-code tokens: keep doing that.
    legacy = {"mpq_dedup": False} if "mpq_dedup" not in payload["config"] else {}
    return TrainedQuantizers(
        config=QuantizerConfig(**{**payload["config"], **legacy}),
        rq=modules[0],
        mpq=modules[1],
        metrics=json.loads(payload["metrics_json"]),
        train_seconds=dict(payload["train_seconds"]),
    )
