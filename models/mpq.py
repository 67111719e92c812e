"""REG4Rec's MoE parallel quantization (MPQ) codebook.

M small expert encoders each map an item embedding to a latent quantized by the expert's own codebook of
D codes, so an item gets M tokens with no order of importance among them (unlike residual codes). A
softmax gate computed from the input mixes the experts' quantized vectors for the decoder's
reconstruction; an orthogonality penalty between the experts' standardised outputs (their cross-correlation
over the batch) keeps them from learning the same partition, which is what makes the M-tuples
discriminative.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.rq import _random_rows, _reset_adam_rows, _sq, kmeans, mlp


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

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z: M x n x h -> (tokens M x n, chosen codewords M x n x h)."""
        books = self.codebooks.detach()
        d = (z.detach() ** 2).sum(-1, keepdim=True) - 2.0 * torch.bmm(z.detach(), books.transpose(1, 2))
        d = d + (books**2).sum(-1)[:, None, :]
        tokens = d.argmin(-1)
        picked = torch.gather(self.codebooks, 1, tokens[..., None].expand(-1, -1, self.latent_dim))
        return tokens, picked

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
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self._mix(x, self._quantize(self.expert_outputs(x))[1]))
