"""REG4Rec's generative recommender: the model over MPQ tokens, its order-agnostic head, the version of a
model (configuration, pinned tables, codebook), and the token loss of random commit subsets.
"""


from __future__ import annotations

import hashlib
import json

import torch
import torch.nn.functional as F
from torch import nn

from models.configs import GenerativeConfig  # noqa: F401  (defined there; re-exported)
from models.generative.catalog import TokenCatalog
from models.ranker import Block
from models.ranker_data import KNOWLEDGE, Pinned

MODEL_VERSION = "reg4rec-generative-v1"
# +pars_knowledge: PARS whose partial credit also comes from the knowledge (product types), trained on
# request only (not in DEFAULT_VARIANTS): it pays for itself only where the knowledge helps on validation.
VARIANTS = ("fixed_order", "+dynamic_paths", "+corp", "+pars", "+msra", "+pars_knowledge")
DEFAULT_VARIANTS = VARIANTS[:5]
ALIGNED = ("+pars", "+msra", "+pars_knowledge")
INFERENCE_MODES = ("fixed_order", "+dynamic_paths", "+corp")


def version_of(config: GenerativeConfig, pinned: Pinned, codebook_version: str) -> str:
    """12 hex digits over the configuration, the pinned table versions and the codebook version."""
    settings = config.model_dict()
    if KNOWLEDGE not in pinned.versions:  # +pars_knowledge not trained: its credit shapes no checkpoint
        settings.pop("pars_knowledge_credit")
    blob = json.dumps({"model": MODEL_VERSION, "config": settings, "tables": pinned.versions,
                       "codebook_version": codebook_version}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------- model


class GenerativeRecommender(nn.Module):
    def __init__(self, cat: TokenCatalog, config: GenerativeConfig):
        super().__init__()
        d, m, k = config.d_model, cat.n_experts, cat.n_tokens
        self.config, self.m, self.k = config, m, k
        self.register_buffer("codes", cat.codes.clone(), persistent=False)
        ok = torch.zeros(m, k, dtype=torch.bool)
        for e, s in enumerate(cat.sizes):
            ok[e, :s] = True
        self.register_buffer("token_ok", ok, persistent=False)
        self.tok_in = nn.ModuleList(nn.Embedding(k + 1, d) for _ in range(m))  # row k = missing / padding
        self.item_norm = nn.LayerNorm(d)
        self.pos = nn.Embedding(config.max_len, d)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(d, config.n_heads, config.dropout) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(d)
        self.commit = nn.Embedding(m * k, d)  # committed (expert, token) pairs
        self.head_ln = nn.LayerNorm(d)
        self.head_ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.out_ln = nn.LayerNorm(d)
        self.out = nn.Linear(d, m * k)
        for emb in [*self.tok_in, self.pos, self.commit]:
            nn.init.normal_(emb.weight, std=0.02)

    def item_table(self) -> torch.Tensor:
        e = self.tok_in[0](self.codes[:, 0])
        for c in range(1, self.m):
            e = e + self.tok_in[c](self.codes[:, c])
        return self.item_norm(e)

    def encode(self, inp: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, d] of a left-padded history (0 = pad)."""
        b, length = inp.shape
        rev = torch.arange(length - 1, -1, -1, device=inp.device).clamp(max=self.pos.num_embeddings - 1)
        x = self.drop(self.item_table()[inp] + self.pos(rev)[None])
        i = torch.arange(length, device=inp.device)
        allowed = ((i[None, :] <= i[:, None])[None] & (inp != 0)[:, None, :]) | torch.eye(
            length, dtype=torch.bool, device=inp.device)[None]
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(~allowed, float("-inf"))[:, None]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def state(self, inp: torch.Tensor) -> torch.Tensor:
        return self.encode(inp)[:, -1]

    def head(self, h: torch.Tensor, committed: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [..., M, D] of every expert given the state h [..., d] and the committed pairs ([..., M])."""
        idx = torch.arange(self.m, device=h.device) * self.k + tokens.clamp(max=self.k - 1)
        c = (self.commit(idx) * committed.unsqueeze(-1).to(h.dtype)).sum(-2)
        z = h + c
        z = z + self.head_ff(self.head_ln(z))
        logits = self.out(self.out_ln(z)).view(*h.shape[:-1], self.m, self.k).float()
        return logits.masked_fill(~self.token_ok, float("-inf"))


def random_commits(n: int, m: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """[n, M] bool: a uniformly sized (1..M-1) random subset of experts per row."""
    ranks = torch.rand(n, m, device=device, generator=generator).argsort(1).argsort(1)
    size = torch.randint(1, max(m, 2), (n, 1), device=device, generator=generator)
    return ranks < size


def token_loss(model: GenerativeRecommender, h: torch.Tensor, tokens: torch.Tensor, subsets: int) -> torch.Tensor:
    """Mean cross-entropy of the uncommitted experts' tokens over the empty commit set + random subsets."""
    n, m = tokens.shape
    committed = torch.zeros(n, m, dtype=torch.bool, device=h.device)
    if subsets > 0 and m > 1:
        committed = torch.cat([committed, random_commits(n * subsets, m, h.device)])
        h = h.repeat(subsets + 1, 1)
        tokens = tokens.repeat(subsets + 1, 1)
    logits = model.head(h, committed, tokens)
    ce = F.cross_entropy(logits.reshape(-1, model.k), tokens.reshape(-1), reduction="none").view(-1, m)
    free = ~committed
    return (ce * free).sum() / free.sum().clamp(min=1)
