"""The SparseGPT solver for one layer (method.md): pure tensor maths, no hooks, no state."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import StadeError
from .masks import Pattern

MAX_DAMPING_RETRIES = 5


@dataclass
class SolverResult:
    weight: torch.Tensor  # (out, in) float32, pruned and updated
    mask: torch.Tensor  # (out, in) bool, True where pruned
    damping: float  # the lambda finally used (as a fraction of mean(diag H))
    retries: int


def _inverse_cholesky(h: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + lambda I)^-1, raising lambda 10x on failure."""
    diag_mean = torch.mean(torch.diag(h))
    idx = torch.arange(h.shape[0], device=h.device)
    for attempt in range(MAX_DAMPING_RETRIES + 1):
        damp = percdamp * (10**attempt)
        hd = h.clone()
        hd[idx, idx] += damp * diag_mean
        lower, info = torch.linalg.cholesky_ex(hd)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper, damp, attempt
    raise StadeError(
        f"SparseGPT: the Hessian is not positive definite even with damping {damp:g} x mean(diag H).",
        "calibrate on more tokens (--nsamples), or use another method",
    )


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> SolverResult:
    """Prune `weight` (out, in) with the OBS update of the kept weights, columns in blocks of `blocksize`."""
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv, damp, retries = _inverse_cholesky(h, percdamp)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()  # (out, B)
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)  # (B,)
        m1 = torch.zeros_like(w1, dtype=torch.bool)
        if not pattern.structured:
            scores = (w1.square() / d.square()).flatten()
            k = int(scores.numel() * sparsity)
            if k:
                m1.view(-1)[torch.sort(scores, stable=True).indices[:k]] = True
        for i in range(i2 - i1):
            if pattern.structured and i % pattern.m == 0:
                tmp = w1[:, i : i + pattern.m].square() / d[i : i + pattern.m].square()
                idx = torch.sort(tmp, dim=1, stable=True).indices[:, : pattern.n]
                m1[:, i : i + pattern.m].scatter_(1, idx, True)
            col = w1[:, i]
            q = col.masked_fill(m1[:, i], 0.0)
            q1[:, i] = q
            e = (col - q) / hinv1[i, i]
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1.0)  # rank-1 update: w -= e ⊗ Hinv[i, i:]
            err1[:, i] = e
        w[:, i1:i2] = q1
        mask[:, i1:i2] = m1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if not torch.isfinite(w).all():
        raise StadeError("SparseGPT produced non-finite weights.", "calibrate on more tokens or use another method")
    return SolverResult(w, mask, damp, retries)
