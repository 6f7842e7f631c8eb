"""Allocation stage: how the requested sparsity is spread over the decoder blocks, one registered function each.

`uniform` gives every block the requested ratio. `owl` is Outlier Weighed Layerwise sparsity (Yin et al.,
"Outlier Weighed Layerwise Sparsity (OWL)", ICML 2024): blocks with more outliers keep more weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from stade_cli.base.errors import StadeError
from stade_cli.models.blocks import iterate_blocks, on_device
from stade_cli.models.layers import get_weight, linear_layers
from stade_cli.models.loading import LoadedModel
from stade_cli.stages.masks import Pattern
from stade_cli.stages.scores import lookup
from stade_cli.stats.artifact import Statistics


@dataclass(frozen=True)
class OwlSettings:
    """The paper's defaults: an outlier is a Wanda score above M = 5 times its block's mean; ratios within ±λ = 0.08."""

    m: float = 5.0
    lam: float = 0.08


AllocateFn = Callable[[LoadedModel, Statistics, float, Pattern, OwlSettings, torch.device], dict[str, float]]


@dataclass(frozen=True)
class Allocation:
    name: str
    description: str
    fn: AllocateFn


ALLOCATIONS: dict[str, Allocation] = {}


def register(name: str, description: str) -> Callable[[AllocateFn], AllocateFn]:
    """Register an allocation under `name` (a new one is this decorator plus one function)."""

    def deco(fn: AllocateFn) -> AllocateFn:
        ALLOCATIONS[name] = Allocation(name, description, fn)
        return fn

    return deco


def get_allocation(name: str) -> Allocation:
    return lookup(ALLOCATIONS, "allocation", name, "--allocation")


def check_allocation(name: str, pattern: Pattern, ratio: float, owl: OwlSettings) -> None:
    """Refuse what cannot work before any weight changes."""
    if name == "owl":
        if pattern.structured:
            raise StadeError(
                f"--allocation owl needs unstructured sparsity: pattern {pattern} fixes the ratio of every group.",
                "use --pattern unstructured with --allocation owl, or --allocation uniform with N:M",
            )
        if owl.m <= 0 or owl.lam < 0:
            raise StadeError(f"OWL's M {owl.m:g} must be > 0 and lambda {owl.lam:g} >= 0.", "the paper: M=5, λ=0.08")
        if ratio - owl.lam < 0 or ratio + owl.lam >= 1:
            raise StadeError(
                f"OWL's block ratios {ratio:g} ± {owl.lam:g} leave [0, 1).", "lower --owl-lambda or --sparsity"
            )


@register("uniform", "every block at the requested ratio")
def uniform(
    loaded: LoadedModel, _stats: Statistics, ratio: float, _p: Pattern, _o: OwlSettings, _dev: torch.device
) -> dict[str, float]:
    return {prefix: ratio for _i, prefix, _b in iterate_blocks(loaded.model)}


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """The fraction of a block's Wanda scores above m times their mean (OWL's layerwise outlier distribution)."""
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > m * flat.mean()).double().mean())


@register("owl", "OWL: blocks with more outliers (|W|·||x|| > M × mean) keep more weights (Yin et al. 2024)")
def owl(
    loaded: LoadedModel, stats: Statistics, ratio: float, _p: Pattern, owl: OwlSettings, device: torch.device
) -> dict[str, float]:
    """Block ratios from the cached statistics, spread linearly over [ratio - λ, ratio + λ] by outlier ratio.

    As in the paper, one ratio per decoder block, and their plain mean is the requested ratio. Every block
    of a decoder has the same parameter count, so that is also the parameter-weighted mean.
    """
    prefixes, ratios = [], []
    for _i, prefix, block in iterate_blocks(loaded.model):
        with on_device(loaded, prefix, block, device):  # one block's weights at a time, as the prune itself
            scores = []
            for name, mod in linear_layers(block).items():
                st = stats.layer(f"{prefix}.{name}", device=device)
                w = get_weight(mod).detach().to(torch.float32)
                scores.append(w.abs() * st.norm.to(w.device, torch.float32))
            prefixes.append(prefix)
            ratios.append(outlier_ratio(scores, owl.m))
    d = torch.tensor(ratios, dtype=torch.float64)
    spread = d.max() - d.min()
    dens = (d - d.min()) / spread * (2 * owl.lam) if spread > 0 else torch.zeros_like(d)
    sparsity = ratio - (dens - dens.mean())  # more outliers: lower sparsity
    return {p: float(s) for p, s in zip(prefixes, sparsity, strict=True)}
