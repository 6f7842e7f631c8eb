"""The SparseGPT solver for one layer (docs/methods.md#sparsegpt-solver): pure tensor maths, no hooks, no state."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stade_cli.base.errors import StadeError
from stade_cli.base.finite import all_finite
from stade_cli.stages.masks import lowest_k, lowest_n_of_m
from stade_cli.stages.pattern import Pattern

MAX_DAMPING_RETRIES = 5


@dataclass
class HessianFactor:
    """What the solver needs from a Hessian; layers that share an input (q/k/v, gate/up) share one."""

    upper: torch.Tensor  # upper Cholesky factor of (H + lambda I)^-1, float32
    dead: torch.Tensor  # (in,) bool: input channels that never fired (diag H == 0)
    damping: float  # the lambda finally used (as a fraction of mean(diag H))
    retries: int


@dataclass
class SolverResult:
    weight: torch.Tensor  # (out, in) float32, pruned and updated
    mask: torch.Tensor  # (out, in) bool, True where pruned
    damping: float
    retries: int


@torch.no_grad()
def hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01) -> HessianFactor:
    """Damp H, invert it through Cholesky and factor the inverse, raising lambda 10x on failure.

    Two n x n matrices live at once, H and the factor: H is damped on its diagonal for the Cholesky and then
    restored exactly (the caller's H is left as it was), and the inverse and its factor are computed in place
    of the first factor, as the reference rebinds H (a 14336-wide Hessian is 822 MB in float32).
    """
    h = hessian.detach().to(torch.float32)  # not a copy where it is float32 already: its diagonal is restored
    diag = h.diagonal()
    kept = diag.clone()
    dead = kept == 0
    base = kept.masked_fill(dead, 1)
    diag_mean = torch.mean(base)
    try:
        for attempt in range(MAX_DAMPING_RETRIES + 1):
            damp = percdamp * (10**attempt)
            diag.copy_(base + damp * diag_mean)
            factor, info = torch.linalg.cholesky_ex(h)  # lower
            diag.copy_(kept)
            if info.item() != 0:
                continue
            torch.cholesky_inverse(factor, out=factor)  # (H + lambda I)^-1
            torch.linalg.cholesky_ex(factor, upper=True, out=(factor, info))
            if info.item() == 0 and all_finite(factor):
                return HessianFactor(factor, dead, damp, attempt)
            del factor
    finally:
        diag.copy_(kept)
    raise StadeError(
        f"SparseGPT: the Hessian is not positive definite even with damping {damp:g} x mean(diag H).",
        "calibrate on more tokens (--nsamples), or use another method",
    )


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor | HessianFactor,
    sparsity: float,
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
    segments: list[int] | None = None,
    consume: bool = False,
) -> SolverResult:
    """Prune `weight` (out, in) with the OBS update of the kept weights, columns in blocks of `blocksize`
    (for an N:M pattern rounded down to a multiple of M, as docs/methods.md#sparsegpt-solver says).

    `segments`: row counts of layers stacked into `weight` (sharing one Hessian); each layer's
    unstructured mask is chosen within its own rows, so stacking changes nothing but speed.

    Column i is never written after its own step, so the kept values and the errors are read off
    the block once at its end instead of being copied out column by column. `consume`: `weight` (float32) is the
    caller's to give up, and is pruned in place rather than copied (a 4096 x 14336 layer is 235 MB).
    """
    if pattern.structured:  # N:M groups start at absolute columns i % M == 0 and never straddle a block edge
        blocksize = max(blocksize // pattern.m, 1) * pattern.m
    factor = hessian if isinstance(hessian, HessianFactor) else hessian_factor(hessian, percdamp)
    hinv = factor.upper.to(weight.device)
    w = weight.detach().to(torch.float32)  # a copy already where the weight is not float32
    if w.data_ptr() == weight.data_ptr() and not consume:
        w = w.clone()
    w[:, factor.dead.to(w.device)] = 0
    cols = w.shape[1]
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()  # (out, B)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)  # (B,)
        if pattern.structured:
            m1 = torch.zeros_like(w1, dtype=torch.bool)
        else:  # each layer's k lowest w^2 / d^2 in this block, over all its rows and columns at once
            scores = (w1.square() / d.square()).split(segments or [w1.shape[0]])
            m1 = torch.cat([lowest_k(s.reshape(1, -1), int(s.numel() * sparsity)).reshape(s.shape) for s in scores])
        # Per-column views made once: the loop is bound by per-call overhead, not arithmetic.
        w_cols, m_cols, d_vals, h_rows = w1.unbind(1), m1.unbind(1), d.unbind(), hinv1.unbind(0)
        for i in range(i2 - i1):
            if pattern.structured and i % pattern.m == 0:
                tmp = w1[:, i : i + pattern.m].square() / d[i : i + pattern.m].square()
                m1[:, i : i + pattern.m] = lowest_n_of_m(tmp, pattern)
            e = w_cols[i].where(m_cols[i], 0.0) / d_vals[i]
            w1[:, i + 1 :].addr_(e, h_rows[i][i + 1 :], alpha=-1.0)  # w -= e ⊗ Hinv[i, i+1:]
        err1 = w1.where(m1, 0.0) / d
        w[:, i1:i2] = w1.masked_fill(m1, 0.0)
        mask[:, i1:i2] = m1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if not all_finite(w):
        raise StadeError("SparseGPT produced non-finite weights.", "calibrate on more tokens or use another method")
    return SolverResult(w, mask, factor.damping, factor.retries)
