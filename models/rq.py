"""Hierarchical quantizers: residual k-means (no network) and TIGER's RQ-VAE, plus the shared pieces
(k-means, MLPs, the training loop) that the MPQ quantizer in models/mpq.py reuses.

Everything here takes an explicit `torch.Generator` (on the CPU) for every random draw, so results depend
only on the seed and the data, never on what else used the global RNG before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from models.sid_metrics import shared_row_mask

# Rows per distance block: bounds memory at n x K floats per block when catalogs grow to millions of items.
_CHUNK = 32768
# Items encoded to find replacements for dead codes: plenty of candidates without a full pass on big catalogs.
_RESTART_SAMPLE = 8192
# Rows per call of dedup_last_level's distance function: 16,384 x 256 float64 distances are 32 MB.
_DEDUP_ROWS = 16384


# --------------------------------------------------------------------------------------------- k-means


def sq_distances(x: torch.Tensor, c: torch.Tensor, x_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Squared euclidean distances (n x K), clamped at 0 against float cancellation.

    `x_sq` (row norms squared of x) can be passed in: callers loop over the same points many times.
    """
    if x_sq is None:
        x_sq = (x * x).sum(1)
    return torch.addmm((c * c).sum(1)[None, :] + x_sq[:, None], x, c.T, alpha=-2.0).clamp_min_(0.0)


def nearest(
    x: torch.Tensor, c: torch.Tensor, x_sq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest row of `c` for each row of `x`, and the squared distance to it."""
    idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    if x_sq is None:
        x_sq = (x * x).sum(1)
    for s in range(0, x.shape[0], _CHUNK):
        d = sq_distances(x[s : s + _CHUNK], c, x_sq[s : s + _CHUNK])
        dist[s : s + _CHUNK], idx[s : s + _CHUNK] = d.min(1)
    return idx, dist


def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    w = weights.detach().double().cpu()
    if not torch.isfinite(w).all() or w.sum() <= 0:
        # All points coincide with chosen centres: any point is as good as another.
        return int(torch.randint(w.numel(), (1,), generator=generator))
    return int(torch.multinomial(w, 1, generator=generator))


def kmeans_pp_init(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to squared distance."""
    centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    x_sq = (x * x).sum(1)
    centers[0] = x[int(torch.randint(x.shape[0], (1,), generator=generator))]
    min_d = sq_distances(x, centers[:1], x_sq).squeeze(1)
    for j in range(1, k):
        centers[j] = x[_draw(min_d, generator)]
        torch.minimum(min_d, sq_distances(x, centers[j : j + 1], x_sq).squeeze(1), out=min_d)
    return centers


def balanced_assign(
    x: torch.Tensor, centers: torch.Tensor, x_sq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-centre assignment under a capacity of ceil(n / k) points per centre.

    Rounds of proposals: every unplaced point proposes to its nearest centre that still has room, and each
    centre accepts its closest proposers up to its remaining room. Ties break by index, so it is
    deterministic. Returns (assignment n, squared distance to the assigned centre n).
    """
    n, k = x.shape[0], centers.shape[0]
    room = torch.full((k,), -(-n // k), dtype=torch.long, device=x.device)
    assign = torch.full((n,), -1, dtype=torch.long, device=x.device)
    dist = torch.zeros(n, dtype=x.dtype, device=x.device)
    pending = torch.arange(n, device=x.device)
    if x_sq is None:
        x_sq = (x * x).sum(1)
    while pending.numel():
        d = sq_distances(x[pending], centers, x_sq[pending])
        d[:, room == 0] = float("inf")
        best_d, best = d.min(1)
        # Sort proposals by (centre, distance): a proposal's rank within its centre decides acceptance.
        order = torch.argsort(best_d, stable=True)
        order = order[torch.argsort(best[order], stable=True)]
        centre_sorted = best[order]
        first = torch.searchsorted(centre_sorted, centre_sorted, right=False)
        rank = torch.arange(order.numel(), device=x.device) - first
        accepted = order[rank < room[centre_sorted]]
        assign[pending[accepted]] = best[accepted]
        dist[pending[accepted]] = best_d[accepted]
        room -= torch.bincount(best[accepted], minlength=k)
        keep = torch.ones(pending.numel(), dtype=torch.bool, device=x.device)
        keep[accepted] = False
        pending = pending[keep]
    return assign, dist


def kmeans(
    x: torch.Tensor, k: int, iters: int, generator: torch.Generator, balanced: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding. Returns (centres k x d, nearest-centre assignment n).

    A cluster that empties is re-seeded with the point farthest from its own centre, so all k codes stay in
    use whenever the data has at least k distinct points. With `balanced`, each Lloyd step assigns under a
    capacity of ceil(n / k) (OneRec's balanced k-means): on residuals that look like isotropic noise, plain
    Lloyd converges to one big cluster plus singletons, which turns deep levels into near-constants and
    makes most items collide. Stops early once assignments no longer change.
    """
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} points, got {x.shape[0]}")
    centers = kmeans_pp_init(x, k, generator)
    x_sq = (x * x).sum(1)
    prev = None
    for _ in range(iters):
        assign, dist = balanced_assign(x, centers, x_sq) if balanced else nearest(x, centers, x_sq)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        new = sums / counts.clamp_min(1).to(x.dtype)[:, None]
        empty = torch.nonzero(counts == 0).squeeze(1)
        if empty.numel():
            far = torch.argsort(dist, descending=True, stable=True)[: empty.numel()]
            new[empty] = x[far]
        elif prev is not None and torch.equal(assign, prev):
            break
        centers, prev = new, assign
    assign, dist = nearest(x, centers, x_sq)
    # Balanced centres can still lose every point under plain nearest-code assignment, which is what
    # encoding uses; re-seed those onto the worst-served points so that every code is reachable.
    for _ in range(k):
        empty = torch.nonzero(torch.bincount(assign, minlength=k) == 0).squeeze(1)
        if not empty.numel():
            break
        far = torch.argsort(dist, descending=True, stable=True)[: empty.numel()]
        if not bool((dist[far] > 0).all()):
            break  # fewer distinct points than codes
        centers[empty] = x[far]
        assign, dist = nearest(x, centers, x_sq)
    return centers, assign


def residual_kmeans(
    x: torch.Tensor,
    levels: int,
    k: int,
    iters: int,
    generator: torch.Generator,
    on_level=None,
    balanced: bool = False,
) -> torch.Tensor:
    """Codebooks (levels x k x d) of residual k-means: level l clusters what levels < l left unexplained."""
    books = torch.empty(levels, k, x.shape[1], dtype=x.dtype, device=x.device)
    residual = x.clone()
    for level in range(levels):
        books[level], assign = kmeans(residual, k, iters, generator, balanced)
        residual -= books[level][assign]
        if on_level is not None:
            on_level(level + 1)
    return books


def _last_level_distances(z: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    residual = z.clone()
    for level in range(codebooks.shape[0] - 1):
        idx, _ = nearest(residual, codebooks[level])
        residual -= codebooks[level][idx]
    return sq_distances(residual, codebooks[-1])


def dedup_last_level(
    codes: np.ndarray, item_ids: Sequence[str], last_level_distances: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, int]:
    """LC-Rec-style collision resolution on the last level: items sharing all L codes are spread over
    the free last-level codes of their (L-1)-prefix, nearest free code first.

    Within each group of identical codes the item closest to the shared code keeps it (ties: smaller
    item_id); the others move, in order of distance, to codes no item of the same prefix uses. Only
    colliding items move, and their new codes are still their nearest available ones. When a prefix has
    more than K items some must keep colliding; the collision digit separates those.
    `last_level_distances(rows)` returns the rows' squared distances (len(rows) x K) to every
    last-level code; it is asked for at most `_DEDUP_ROWS` rows at a time (or one prefix's moving rows,
    when more), the colliding rows once and the moving rows once more. Returns (new codes, number of items moved).
    """
    codes = np.asarray(codes)
    n = codes.shape[0]
    if n == 0:
        return codes.copy(), 0
    shared = np.flatnonzero(shared_row_mask(codes))
    if shared.size == 0:
        return codes.copy(), 0
    ids = [str(i) for i in item_ids]
    rank = np.empty(n, dtype=np.int64)
    rank[sorted(range(n), key=ids.__getitem__)] = np.arange(n)
    # Distances a block of rows at a time: all the colliding rows' at once were shared x K float64 (2 GB
    # at a million items, most of which collide before the move). `own` first, for every colliding row;
    # a loser's row again when its prefix's turn comes.
    own = np.empty(shared.size, dtype=np.float64)
    k = 0
    for s in range(0, shared.size, _DEDUP_ROWS):
        rows = shared[s : s + _DEDUP_ROWS]
        dist = np.asarray(last_level_distances(rows), dtype=np.float64)
        k = dist.shape[1]
        own[s : s + rows.size] = dist[np.arange(rows.size), codes[rows, -1]]
    dist = None
    _, same = np.unique(codes[shared], axis=0, return_inverse=True)
    same = same.ravel()
    order = np.lexsort((rank[shared], own, same))
    first = np.ones(order.size, dtype=bool)
    first[1:] = same[order[1:]] != same[order[:-1]]
    loser_pos = np.sort(order[~first])  # positions into `shared`
    if codes.shape[1] > 1:
        _, prefix = np.unique(codes[:, :-1], axis=0, return_inverse=True)
        prefix = prefix.ravel()
    else:
        prefix = np.zeros(n, dtype=np.int64)
    new = codes.copy()
    moved = 0
    losers = shared[loser_pos]
    # Group the losers, and the last codes already taken, by prefix in one sort each (no per-group scans).
    relevant = np.isin(prefix, prefix[losers])
    taken_rows = np.flatnonzero(relevant)
    taken_rows = taken_rows[np.argsort(prefix[taken_rows], kind="stable")]
    cuts = np.flatnonzero(np.diff(prefix[taken_rows])) + 1
    taken = {int(prefix[rows[0]]): codes[rows, -1] for rows in np.split(taken_rows, cuts) if rows.size}
    loser_order = np.lexsort((rank[losers], prefix[losers]))
    cuts = np.flatnonzero(np.diff(prefix[losers[loser_order]])) + 1
    groups = np.split(loser_order, cuts)
    # Prefix groups taken together until a block's worth of rows, their distances asked for at once.
    g = 0
    while g < len(groups):
        end, rows = g, 0
        while end < len(groups) and (rows == 0 or rows + groups[end].size <= _DEDUP_ROWS):
            rows += groups[end].size
            end += 1
        block = groups[g:end]
        dist = np.array(last_level_distances(losers[np.concatenate(block)]), dtype=np.float64)  # ours to edit
        at = 0
        for group in block:
            cost = dist[at : at + group.size]
            at += group.size
            cost[:, taken[int(prefix[losers[group[0]]])]] = np.inf
            for _ in range(group.size):
                row, code = divmod(int(np.argmin(cost)), k)
                if not np.isfinite(cost[row, code]):
                    break  # more items than codes under this prefix: the rest keep colliding
                new[losers[group[row]], -1] = code
                moved += 1
                cost[row, :] = np.inf
                cost[:, code] = np.inf
        g = end
    return new, moved


# --------------------------------------------------------------------------------------------- modules


def mlp(dims: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class RQKMeans(nn.Module):
    """Residual k-means: L codebooks in the embedding space itself, fitted without any network."""

    method = "rq_kmeans"

    def __init__(self, in_dim: int, levels: int, codebook_size: int):
        super().__init__()
        self.in_dim, self.levels, self.codebook_size = in_dim, levels, codebook_size
        self.register_buffer("codebooks", torch.zeros(levels, codebook_size, in_dim))

    def meta(self) -> dict:
        return {"in_dim": self.in_dim, "levels": self.levels, "codebook_size": self.codebook_size}

    @torch.no_grad()
    def fit(
        self, x: torch.Tensor, iters: int, generator: torch.Generator, on_level=None, balanced: bool = True
    ) -> RQKMeans:
        self.codebooks.copy_(
            residual_kmeans(x, self.levels, self.codebook_size, iters, generator, on_level, balanced)
        )
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        codes = torch.empty(x.shape[0], self.levels, dtype=torch.long, device=x.device)
        residual = x.clone()
        for level in range(self.levels):
            codes[:, level], _ = nearest(residual, self.codebooks[level])
            residual -= self.codebooks[level][codes[:, level]]
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return sum(self.codebooks[level][codes[:, level]] for level in range(self.levels))

    @torch.no_grad()
    def last_level_distances(self, x: torch.Tensor) -> torch.Tensor:
        """Squared distances (n x K) from each item's last-level residual to every last-level code."""
        return _last_level_distances(x, self.codebooks)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class RQVAE(nn.Module):
    """TIGER's RQ-VAE: MLP encoder to a small latent, L residual codebooks there, MLP decoder back."""

    method = "rq_vae"

    def __init__(
        self, in_dim: int, hidden_dims: Sequence[int], latent_dim: int, levels: int, codebook_size: int
    ):
        super().__init__()
        self.in_dim, self.hidden_dims, self.latent_dim = in_dim, list(hidden_dims), latent_dim
        self.levels, self.codebook_size = levels, codebook_size
        self.encoder = mlp([in_dim, *hidden_dims, latent_dim])
        self.decoder = mlp([latent_dim, *reversed(hidden_dims), in_dim])
        self.codebooks = nn.Parameter(torch.zeros(levels, codebook_size, latent_dim))

    def meta(self) -> dict:
        return {
            "in_dim": self.in_dim,
            "hidden_dims": self.hidden_dims,
            "latent_dim": self.latent_dim,
            "levels": self.levels,
            "codebook_size": self.codebook_size,
        }

    def _quantize(self, z: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes n x L, sum of chosen codewords, codebook + commitment loss)."""
        codes = []
        residual, z_q = z, torch.zeros_like(z)
        loss = z.new_zeros(())
        for level in range(self.levels):
            book = self.codebooks[level]
            idx, _ = nearest(residual.detach(), book.detach())
            codes.append(idx)
            e = book[idx]
            loss = loss + _sq(e - residual.detach()) + beta * _sq(residual - e.detach())
            z_q = z_q + e
            # The next level sees a residual that still carries the encoder's gradient (for its commitment).
            residual = residual - e.detach()
        return torch.stack(codes, 1), z_q, loss

    def training_loss(self, x: torch.Tensor, cfg) -> tuple[torch.Tensor, dict, torch.Tensor]:
        z = self.encoder(x)
        codes, z_q, q_loss = self._quantize(z, cfg.commitment_beta)
        # Straight-through: the decoder's gradient reaches the encoder as if quantization were identity.
        recon = self.decoder(z + (z_q - z).detach())
        rec_loss = _sq(recon - x)
        return rec_loss + q_loss, {"recon": rec_loss.detach(), "quant": q_loss.detach()}, codes

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, cfg, generator: torch.Generator) -> None:
        z = self.encoder(x)
        self.codebooks.copy_(
            residual_kmeans(
                z, self.levels, self.codebook_size, cfg.kmeans_iters, generator, balanced=cfg.kmeans_balanced
            )
        )

    @torch.no_grad()
    def restart_dead_codes(
        self, x: torch.Tensor, usage: torch.Tensor, generator: torch.Generator, opt: torch.optim.Optimizer
    ) -> int:
        """Move codes unused during the last epoch onto residuals of random items at their level."""
        dead = usage == 0
        if not dead.any():
            return 0
        residual = self.encoder(x)
        for level in range(self.levels):
            idx = torch.nonzero(dead[level]).squeeze(1)
            if idx.numel():
                picks = _random_rows(residual.shape[0], idx.numel(), generator).to(x.device)
                self.codebooks[level, idx] = residual[picks]
                _reset_adam_rows(opt, self.codebooks, (level, idx))
            chosen, _ = nearest(residual, self.codebooks[level])
            residual = residual - self.codebooks[level][chosen]
        return int(dead.sum())

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantize(self.encoder(x), 0.0)[0]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(sum(self.codebooks[level][codes[:, level]] for level in range(self.levels)))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self._quantize(self.encoder(x), 0.0)[1])

    @torch.no_grad()
    def last_level_distances(self, x: torch.Tensor) -> torch.Tensor:
        """Squared distances (n x K) from each item's last-level latent residual to every last-level code."""
        return _last_level_distances(self.encoder(x), self.codebooks)


# --------------------------------------------------------------------------------------------- training


def _sq(diff: torch.Tensor) -> torch.Tensor:
    """Squared error summed over features, averaged over items.

    Averaging over features instead scales the reconstruction term by 1/d: unit-norm 384-d embeddings
    then have a per-feature variance near 1/384, the commitment terms dominate and the encoder collapses
    every item onto one code (observed: one code used per level after 20 epochs).
    """
    return (diff**2).sum(-1).mean()


def _random_rows(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    if k <= n:
        return torch.randperm(n, generator=generator)[:k]
    return torch.randint(n, (k,), generator=generator)


def _reset_adam_rows(opt: torch.optim.Optimizer, param: torch.Tensor, index) -> None:
    # Stale Adam moments would immediately drag a re-seeded code back toward where it died.
    state = opt.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][index] = 0.0


def train_loop(
    model: nn.Module,
    x: torch.Tensor,
    cfg,
    generator: torch.Generator,
    stage: str,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Adam over shuffled mini-batches with k-means codebook init and per-epoch dead-code restarts.

    Shared by RQ-VAE and MPQ: both expose training_loss(x, cfg) -> (loss, parts, codes n x groups),
    init_codebooks(x, cfg, generator), restart_dead_codes(x, usage, generator, opt) -> count, and a
    `codebooks` tensor of shape (groups x K x latent), one group per level or per expert.
    """
    n = x.shape[0]
    groups, k = model.codebooks.shape[0], model.codebooks.shape[1]
    batch = min(cfg.batch_size, n)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    perm = torch.randperm(n, generator=generator).to(x.device)
    # The "first batch" for k-means init is widened to several points per code: k-means on exactly K
    # points would just copy them.
    model.init_codebooks(x[perm[: min(n, max(batch, 8 * k))]], cfg, generator)
    usage = torch.zeros(groups, k, dtype=torch.long, device=x.device)
    ones = torch.ones(1, dtype=torch.long, device=x.device)
    restarts, parts_sum, steps = 0, {}, 0
    for epoch in range(cfg.epochs):
        model.train()
        usage.zero_()
        parts_sum, steps = {}, 0
        perm = torch.randperm(n, generator=generator).to(x.device)
        # Equal-sized batches: a remainder of one or two items would give the batch statistics of the
        # MPQ penalty no meaning and the optimiser a noisy step.
        for idx in torch.tensor_split(perm, -(-n // batch)):
            loss, parts, codes = model.training_loss(x[idx], cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            usage.scatter_add_(1, codes.T.contiguous(), ones.expand(groups, codes.shape[0]))
            for name, v in parts.items():
                parts_sum[name] = parts_sum.get(name, 0.0) + float(v)
            steps += 1
        model.eval()
        if epoch < cfg.epochs - 1 and bool((usage == 0).any()):
            sample = x[_random_rows(n, min(n, _RESTART_SAMPLE), generator).to(x.device)]
            restarts += model.restart_dead_codes(sample, usage, generator, opt)
        if progress is not None:
            progress(stage, epoch + 1, cfg.epochs)
    model.eval()
    out = {f"final_{name}_loss": v / max(steps, 1) for name, v in parts_sum.items()}
    out["dead_code_restarts"] = restarts
    out["epochs"] = cfg.epochs
    return out
