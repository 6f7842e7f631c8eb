"""owl: Outlier Weighed Layerwise sparsity (Yin et al., "Outlier Weighed Layerwise Sparsity (OWL)", ICML 2024):
blocks with more outliers keep more weights. Definition: docs/methods.md#owl."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stade_cli.base.errors import StadeError
from stade_cli.stages.stage import Allocation, Settings, allocation, setting

if TYPE_CHECKING:
    import torch

    from stade_cli.models.loading import LoadedModel
    from stade_cli.stages.pattern import Pattern
    from stade_cli.stats.artifact import Statistics


@dataclass(frozen=True)
class OwlSettings(Settings):
    """The paper's defaults: an outlier is a Wanda score above M = 5 times its block's mean; ratios within ±λ = 0.08."""

    m: float = setting(5.0, "OWL: outlier threshold, times the block's mean score.")
    lam: float = setting(0.08, "OWL: block ratios within sparsity ± lambda.", flag="--owl-lambda", key="lambda")

    def check(self) -> None:
        if self.m <= 0 or self.lam < 0:
            raise StadeError(f"OWL's M {self.m:g} must be > 0 and lambda {self.lam:g} >= 0.", "the paper: M=5, λ=0.08")


def check_owl(_stage: Allocation, settings: OwlSettings, pattern: Pattern, ratio: float) -> None:
    """Refuse what cannot work before any weight changes."""
    if pattern.structured:
        raise StadeError(
            f"--allocation owl needs unstructured sparsity: pattern {pattern} fixes the ratio of every group.",
            "use --pattern unstructured with --allocation owl, or --allocation uniform with N:M",
        )
    if ratio - settings.lam < 0 or ratio + settings.lam >= 1:
        raise StadeError(
            f"OWL's block ratios {ratio:g} ± {settings.lam:g} leave [0, 1).", "lower --owl-lambda or --sparsity"
        )


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """The fraction of a block's Wanda scores above m times their mean (OWL's layerwise outlier distribution)."""
    import torch

    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > m * flat.mean()).double().mean())


@allocation(
    "owl",
    "OWL: blocks with more outliers (|W|·||x|| > M × mean) keep more weights (Yin et al. 2024)",
    needs=("mean", "m2"),
    settings=OwlSettings,
    paper="owl",
    checks=check_owl,
    memory=lambda w, _s: 4 * w.linear + 2 * 4 * w.widest,  # a block's float32 scores, one layer's float32 copy
)
def owl(
    loaded: LoadedModel, stats: Statistics, ratio: float, _p: Pattern, settings: OwlSettings, device: Any
) -> dict[str, float]:
    """Block ratios from the cached statistics, spread linearly over [ratio - λ, ratio + λ] by outlier ratio.

    As in the paper, one ratio per decoder block, and their plain mean is the requested ratio. Every block
    of a decoder has the same parameter count, so that is also the parameter-weighted mean.
    """
    import torch

    from stade_cli.models.blocks import iterate_blocks, on_device
    from stade_cli.models.layers import get_weight, linear_layers

    prefixes, ratios = [], []
    for _i, prefix, block in iterate_blocks(loaded.model):
        with on_device(loaded, prefix, block, device):  # one block's weights at a time, as the prune itself
            scores = []
            for name, mod in linear_layers(block).items():
                st = stats.layer(f"{prefix}.{name}", device=device)
                w = get_weight(mod).detach().to(torch.float32)
                scores.append(w.abs() * st.norm.to(w.device, torch.float32))
            prefixes.append(prefix)
            ratios.append(outlier_ratio(scores, settings.m))
    d = torch.tensor(ratios, dtype=torch.float64)
    spread = d.max() - d.min()
    dens = (d - d.min()) / spread * (2 * settings.lam) if spread > 0 else torch.zeros_like(d)
    sparsity = ratio - (dens - dens.mean())  # more outliers: lower sparsity
    return {p: float(s) for p, s in zip(prefixes, sparsity, strict=True)}
