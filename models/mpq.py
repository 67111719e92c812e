"""REG4Rec's MoE parallel quantization (MPQ) codebook.

M small expert encoders each map an item embedding to a latent quantized by the expert's own codebook of
D codes, so an item gets M tokens with no order of importance among them (unlike residual codes). A
softmax gate computed from the input mixes the experts' quantized vectors for the decoder's
reconstruction; an orthogonality penalty between the experts' standardised outputs (their cross-correlation
over the batch) keeps them from learning the same partition, which is what makes the M-tuples
discriminative.

Near-duplicate items still get the same M tokens; `dedup_tuples` separates them after assignment by
changing one token of each item but the first of every group (see models.quantizers, `mpq_dedup`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.rq import _random_rows, _reset_adam_rows, _sq, kmeans, mlp
from models.sid_metrics import shared_row_mask

# Colliding rows whose n x M x D distances are held at once by dedup_tuples.
_DEDUP_BLOCK = 4096


class MPQ(nn.Module):
    method = "mpq"

    def __init__(
        self,
        in_dim: int,
        experts: int,
        codebook_size: int,
        expert_hidden_dims: Sequence[int],
        latent_dim: int,
        decoder_hidden_dims: Sequence[int],
    ):
        super().__init__()
        self.in_dim, self.experts, self.codebook_size, self.latent_dim = (
            in_dim,
            experts,
            codebook_size,
            latent_dim,
        )
        self.expert_hidden_dims, self.decoder_hidden_dims = (
            list(expert_hidden_dims),
            list(decoder_hidden_dims),
        )
        self.expert_nets = nn.ModuleList(
            mlp([in_dim, *expert_hidden_dims, latent_dim]) for _ in range(experts)
        )
        self.gate = nn.Linear(in_dim, experts)
        self.codebooks = nn.Parameter(torch.zeros(experts, codebook_size, latent_dim))
        self.decoder = mlp([latent_dim, *decoder_hidden_dims, in_dim])

    def meta(self) -> dict:
        return {
            "in_dim": self.in_dim,
            "experts": self.experts,
            "codebook_size": self.codebook_size,
            "expert_hidden_dims": self.expert_hidden_dims,
            "latent_dim": self.latent_dim,
            "decoder_hidden_dims": self.decoder_hidden_dims,
        }

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """M x n x latent."""
        return torch.stack([net(x) for net in self.expert_nets])

    def expert_cross_correlation(self, z: torch.Tensor) -> torch.Tensor:
        """Mean squared correlation between different experts' output features over the batch.

        Each expert's outputs are standardised per feature over the batch, and the penalty pushes the
        experts' feature matrices towards mutual orthogonality, i.e. no expert can linearly predict another.
        Orthogonality of each item's M output vectors is not enough: one expert can be a rotation of
        another, pass that test, and still induce the same partition (synthetic data: 26-36% unique
        tuples that way, 99.6% with this penalty). The floor for independent features is about 1 / batch.
        """
        zs = (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-5)  # M x n x h
        corr = torch.einsum("mbh,nbk->mnhk", zs, zs) / z.shape[1]
        off = ~torch.eye(self.experts, dtype=torch.bool, device=z.device)
        return (corr[off] ** 2).mean()

    def _distances(self, z: torch.Tensor) -> torch.Tensor:
        """z: M x n x h -> squared distances M x n x D from each expert output to its expert's codes."""
        books = self.codebooks.detach()
        d = (z.detach() ** 2).sum(-1, keepdim=True) - 2.0 * torch.bmm(z.detach(), books.transpose(1, 2))
        return d + (books**2).sum(-1)[:, None, :]

    def _pick(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens M x n -> codewords M x n x h."""
        return torch.gather(self.codebooks, 1, tokens[..., None].expand(-1, -1, self.latent_dim))

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z: M x n x h -> (tokens M x n, chosen codewords M x n x h)."""
        tokens = self._distances(z).argmin(-1)
        return tokens, self._pick(tokens)

    def _mix(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        gate = F.softmax(self.gate(x), dim=-1)  # n x M
        return torch.einsum("nm,mnh->nh", gate, q)

    def training_loss(self, x: torch.Tensor, cfg) -> tuple[torch.Tensor, dict, torch.Tensor]:
        z = self.expert_outputs(x)
        tokens, q = self._quantize(z)
        q_loss = _sq(q - z.detach()) + cfg.commitment_beta * _sq(z - q.detach())
        recon = self.decoder(self._mix(x, z + (q - z).detach()))
        rec_loss = _sq(recon - x)
        loss = rec_loss + q_loss
        parts = {"recon": rec_loss.detach(), "quant": q_loss.detach()}
        if self.experts > 1 and z.shape[1] > 1:
            ortho = self.expert_cross_correlation(z)
            loss = loss + cfg.mpq_ortho_weight * ortho
            parts["ortho"] = ortho.detach()
        return loss, parts, tokens.T

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, cfg, generator: torch.Generator) -> None:
        z = self.expert_outputs(x)
        for m in range(self.experts):
            self.codebooks[m] = kmeans(
                z[m], self.codebook_size, cfg.kmeans_iters, generator, cfg.kmeans_balanced
            )[0]

    @torch.no_grad()
    def restart_dead_codes(
        self, x: torch.Tensor, usage: torch.Tensor, generator: torch.Generator, opt: torch.optim.Optimizer
    ) -> int:
        """Move codes unused during the last epoch onto the expert's outputs for random items."""
        dead = usage == 0
        z = self.expert_outputs(x)
        for m in range(self.experts):
            idx = torch.nonzero(dead[m]).squeeze(1)
            if idx.numel():
                picks = _random_rows(z.shape[1], idx.numel(), generator).to(x.device)
                self.codebooks[m, idx] = z[m, picks]
                _reset_adam_rows(opt, self.codebooks, (m, idx))
        return int(dead.sum())

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """n x M tokens, each in [0, D)."""
        return self._quantize(self.expert_outputs(x))[0].T

    @torch.no_grad()
    def token_distances(self, x: torch.Tensor) -> torch.Tensor:
        """n x M x D squared distances from each expert's output to every code of its codebook."""
        return self._distances(self.expert_outputs(x)).transpose(0, 1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder output for x quantized to `tokens` (n x M; default: the nearest codes)."""
        if tokens is None:
            return self.decoder(self._mix(x, self._quantize(self.expert_outputs(x))[1]))
        return self.decoder(self._mix(x, self._pick(tokens.long().T)))


def dedup_tuples(
    tokens: np.ndarray,
    item_ids: Sequence[str],
    token_distances: Callable[[np.ndarray], np.ndarray],
    top_k: int,
) -> tuple[np.ndarray, int, list[int]]:
    """Make MPQ token tuples unique by changing one token of each colliding item but the first.

    Within each group of items sharing all M tokens the item with the smallest item_id (string order)
    keeps the tuple. The others, taken in item_id order over the whole catalogue, each move to the
    nearest tuple no item holds yet among those that differ from theirs in one expert's token: candidates
    are every expert's `top_k` nearest other codes, ranked by margin, the extra squared distance of the
    candidate code over the item's own code in that expert (ties: lower expert, then lower code). So the
    first try changes the expert whose second-best code is closest. Tuples taken by earlier moves count
    as held. An item whose M x top_k candidates are all held keeps its tuple and is reported.

    Everything depends on the tokens, the ids and the distances only, not on row order, so the same
    checkpoint and the same items give the same tuples. Like the collision digit, an item's tuple depends
    on the other items assigned with it.

    `token_distances(rows)` returns the rows' squared distances, len(rows) x M x D, to every code of
    every expert; it is called on the colliding rows only, in blocks, in item_id order.
    Returns (new tokens, number of items moved, rows of the items that could not move, in item_id order).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be a 2-D array (n x M), got shape {tokens.shape}")
    n, m = tokens.shape
    ids = [str(i) for i in item_ids]
    if len(ids) != n:
        raise ValueError(f"{len(ids)} item ids for {n} rows of tokens")
    new = tokens.copy()
    shared = np.flatnonzero(shared_row_mask(tokens))
    if shared.size == 0:
        return new, 0, []
    rank = np.empty(n, dtype=np.int64)
    rank[sorted(range(n), key=ids.__getitem__)] = np.arange(n)
    shared = shared[np.argsort(rank[shared], kind="stable")]  # item_id order
    _, group = np.unique(tokens[shared], axis=0, return_inverse=True)
    first = np.zeros(shared.size, dtype=bool)
    first[np.unique(group.ravel(), return_index=True)[1]] = True  # each group's smallest item_id
    movers = shared[~first]

    held = {row.tobytes() for row in np.unique(tokens, axis=0)}
    moved, unresolved = 0, []
    for start in range(0, movers.size, _DEDUP_BLOCK):
        rows = movers[start : start + _DEDUP_BLOCK]
        dist = np.asarray(token_distances(rows), dtype=np.float64)  # b x M x D
        d = dist.shape[2]
        k = max(1, min(top_k, d - 1))
        own = np.take_along_axis(dist, tokens[rows][:, :, None].astype(np.int64), axis=2)
        margin = dist - own
        np.put_along_axis(margin, tokens[rows][:, :, None].astype(np.int64), np.inf, axis=2)
        # Nearest other codes per expert: stable sort, so equal margins keep code order.
        codes = np.argsort(margin, axis=2, kind="stable")[:, :, :k]  # b x M x k
        cand = np.take_along_axis(margin, codes, axis=2)
        # Flatten expert-major; a stable sort on margin keeps (expert, nearness) order among ties.
        flat_margin = cand.reshape(rows.size, m * k)
        order = np.argsort(flat_margin, axis=1, kind="stable")
        for i, row in enumerate(rows):
            placed = False
            for j in order[i]:
                if not np.isfinite(flat_margin[i, j]):
                    break
                expert, pos = divmod(int(j), k)
                trial = tokens[row].copy()
                trial[expert] = codes[i, expert, pos]
                key = trial.tobytes()
                if key not in held:
                    held.add(key)
                    new[row] = trial
                    moved, placed = moved + 1, True
                    break
            if not placed:
                unresolved.append(int(row))
    return new, moved, unresolved
