"""The ADMM weight update and gradual mask selection for one layer (pure tensor maths, no hooks, no state).

Boža, "Fast and Effective Weight Update for Pruned Large Language Models" (TMLR 2024). With W0 the dense
weights (out, in) and H = 2/n XᵀX, it minimises ||(W0 - W) X||² = tr((W - W0) H (W - W0)ᵀ) subject to W = 0
on the mask, by ADMM on the split W = Z (Z carries the mask):

    W <- (W0 H + rho (Z - U)) (H + rho I)^-1      the quadratic step: one matmul with a cached inverse
    Z <- (W + U) masked                           projection on the sparsity pattern
    U <- U + W - Z                                scaled dual

Every row is its own least-squares problem, so the rows of layers that share an input (q/k/v, gate/up) are
solved stacked. As in the paper, the problem is first rescaled so that diag H = 1 (W's columns times
sqrt(diag H)): rho then means the same for every layer, and |W + U| in that space is Wanda's score of the
current iterate, which is what gradual selection ranks. With the mask held fixed, ADMM converges to the
exact least-squares optimum of the kept weights (of the damped H: H + damping * mean(diag H) * I, the 1%
SparseGPT uses). Gradual selection (the paper's ADMM-Grad) prunes a growing fraction during the first
`mask_iters` iterations on the cubic schedule s_t = s (1 - (1 - t/T)^3), then keeps the mask fixed.

Every tensor is created on the weights' device in float32: no CPU-only call and no float16 solve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from stade_cli.base.errors import StadeError
from stade_cli.base.finite import all_finite
from stade_cli.stages.masks import lowest_n_of_m
from stade_cli.stages.pattern import Pattern


class AdmmParameters(Protocol):
    """What the solver reads of its settings (updates/admm.py's AdmmSettings, the paper's defaults)."""

    @property
    def iters(self) -> int: ...
    @property
    def rho(self) -> float: ...
    @property
    def rho_growth(self) -> float: ...  # rho is multiplied by this after every iteration once the mask is fixed
    @property
    def mask_iters(self) -> int: ...  # gradual selection only
    @property
    def damping(self) -> float: ...  # of mean(diag H), added before rescaling


@dataclass
class AdmmResult:
    weight: torch.Tensor  # (out, in) float32, zero on the mask
    mask: torch.Tensor  # (out, in) bool, True where pruned


def _inverse(h: torch.Tensor, rho: float) -> torch.Tensor:
    """(h + rho I)^-1 through Cholesky; h is positive semi-definite with unit diagonal, so this is well posed."""
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    lower, info = torch.linalg.cholesky_ex(h + rho * eye)
    if bool(info.ne(0).any()):
        raise StadeError(f"ADMM: H + {rho:g} I is not positive definite.", "raise --admm-rho")
    return torch.cholesky_inverse(lower)


def _gradual_mask(v: torch.Tensor, fraction: float, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """True at the weights pruned at this step: the lowest |v| per row (N:M: only among each group's N lowest)."""
    score = v.abs()
    cols = score.shape[1]
    if pattern.structured:  # the N lowest of every M are the candidates; the mask grows among them
        score = score.masked_fill(~lowest_n_of_m(score, pattern), float("inf"))
    k = int(cols * sparsity * fraction)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
    return mask


@torch.no_grad()
def admm_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    mask: torch.Tensor | None,
    settings: AdmmParameters,
    sparsity: float = 0.0,
    pattern: Pattern | None = None,
) -> AdmmResult:
    """Update `weight` (out, in) on a fixed `mask` (True where pruned), or choose the mask gradually (mask=None).

    `hessian` is H (in, in) of the layer's input, any positive scale (2/n XᵀX). Rows are independent problems.
    """
    pattern = pattern or Pattern()
    h = hessian.detach().to(device=weight.device, dtype=torch.float32)
    w0 = weight.detach().to(torch.float32)
    diag = torch.diagonal(h)
    dead = diag <= 0  # channels that never fired: their weights cannot matter, prune-or-keep is free
    h = h + settings.damping * diag.mean() * torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    scale = torch.diagonal(h).clamp_min(torch.finfo(torch.float32).tiny).sqrt()  # (in,)
    scale = torch.where(dead, torch.ones_like(scale), scale)
    h = h / scale[:, None] / scale[None, :]  # unit diagonal
    w0 = w0 * scale  # the same problem in the rescaled coordinates
    target = w0 @ h  # W0 H, the constant part of every quadratic step
    rho = settings.rho
    inv = _inverse(h, rho)
    w = w0.clone()
    u = torch.zeros_like(w)
    fixed = mask
    for it in range(settings.iters):
        if mask is None and it < settings.mask_iters:
            t = (it + 1) / settings.mask_iters
            fixed = _gradual_mask(w + u, 1 - (1 - t) ** 3, sparsity, pattern)
        assert fixed is not None
        z = (w + u).masked_fill(fixed, 0.0)
        u = u + w - z
        if it >= (0 if mask is not None else settings.mask_iters) and settings.rho_growth > 1:
            u = u / settings.rho_growth  # the scaled dual is y / rho: rescale it with rho
            rho *= settings.rho_growth
            inv = _inverse(h, rho)
        w = (target + rho * (z - u)) @ inv
    assert fixed is not None
    out = (w + u).masked_fill(fixed, 0.0) / scale
    if not all_finite(out):
        raise StadeError("ADMM produced non-finite weights.", "calibrate on more tokens, or raise --admm-rho")
    return AdmmResult(out, fixed)
