"""Residual vector quantisation by k-means, in torch (used to fit :mod:`mel_rvq`)."""

from __future__ import annotations

import torch

# Rows per distance block: [rows, codebook_size] float32 is 4 MB at 256 entries, which stays
# in cache between the matmul and the min (measured ~30% faster than 32k-row blocks).
_CHUNK = 4096


def nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index [N] of the nearest entry of ``codebook`` [K, D] for each row of ``x`` [N, D],
    in row blocks so N can be millions."""
    c_sq = (codebook * codebook).sum(1)  # [K]
    idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s in range(0, x.shape[0], _CHUNK):
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 does not change the argmin.
        d = torch.addmm(c_sq, x[s : s + _CHUNK], codebook.T, alpha=-2.0)  # [rows, K]
        idx[s : s + _CHUNK] = d.argmin(1)
    return idx


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Centroids [k, D] of ``x`` [N, D] (N >= k): k-means++ seeding, then Lloyd iterations.

    An emptied cluster is re-seeded at the point farthest from its centroid, so every code
    stays in use. Stops early once no assignment changes.
    """
    centroids = _kmeanspp(x, k, gen)
    prev = None
    for _ in range(iters):
        idx = nearest(x, centroids)
        if prev is not None and torch.equal(idx, prev):
            break
        prev = idx
        counts = torch.bincount(idx, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, idx, x)
        alive = counts > 0
        dead = (~alive).nonzero().squeeze(1)
        if dead.numel():
            dist = ((x - centroids[idx]) ** 2).sum(1)  # [N] to the centroid each point left
        centroids = torch.where(alive[:, None], sums / counts.clamp_min(1)[:, None], centroids)
        if dead.numel():
            centroids[dead] = x[dist.topk(dead.numel()).indices]
    return centroids


def fit_rvq(
    x: torch.Tensor, n_levels: int, k: int, iters: int, gen: torch.Generator
) -> torch.Tensor:
    """Residual codebooks [n_levels, k, D] for frames ``x`` [N, D]: each level is k-means on
    what the levels before it left over."""
    residual = x
    books = []
    for _ in range(n_levels):
        cb = kmeans(residual, k, iters, gen)
        residual = residual - cb[nearest(residual, cb)]
        books.append(cb)
    return torch.stack(books)


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    # Seeding on a subsample: k sequential passes over all N points would cost more than
    # the Lloyd iterations, and 64 points per centroid are plenty to spread the seeds.
    n = x.shape[0]
    if n > 64 * k:
        x = x[torch.randperm(n, generator=gen)[: 64 * k]]
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    x_sq = (x * x).sum(1)  # [n]
    centroids[0] = x[torch.randint(x.shape[0], (1,), generator=gen)]
    d = _sq_dist(x, x_sq, centroids[0])  # [n] squared distance to the nearest seed so far
    for i in range(1, k):
        total = d.sum()
        if total > 0:
            j = torch.multinomial(d / total, 1, generator=gen)
        else:  # fewer distinct frames than k: any point, the re-seeding handles duplicates
            j = torch.randint(x.shape[0], (1,), generator=gen)
        centroids[i] = x[j]
        d = torch.minimum(d, _sq_dist(x, x_sq, centroids[i]))
    return centroids


def _sq_dist(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # As a matrix-vector product: ~5x faster than materialising x - c [n, D] each step.
    return (x_sq - 2 * (x @ c) + (c * c).sum()).clamp_min(0)
