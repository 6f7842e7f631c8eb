"""The `--method` presets: each a score and an update (per layer for `stadew`). Definitions: docs/methods.md#presets.

A preset keeps exactly the figures it always had: `sparsegpt` is the OBS solver choosing the mask and updating the
weights, `stade` is the stade score with STADE's bias update, `stadew` chooses per layer by whether a normalisation
layer feeds it. `--update` replaces a preset's update (e.g. `--method wanda --update admm`: wanda's mask, ADMM's
weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from stade_cli.base.registry import Registry

Rule = Callable[[bool], tuple[str | None, str]]  # fed by a norm -> (score, or None: the update chooses; update)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    rule: Rule
    scores: tuple[str, ...]  # every score the rule may pick
    update: str  # the update where its rule does not say otherwise

    def layer_stages(self, fed_by_norm: bool) -> tuple[str | None, str]:
        """(score, or None where the update chooses the mask; update) for a layer fed by a norm or not."""
        return self.rule(fed_by_norm)


PRESETS: Registry[Preset] = Registry("method", "--method")
# An expert that fewer calibration tokens reached has no statistics worth the name: it is pruned by FALLBACK, which
# needs none, and every such layer is named in stade.json (docs/methods.md#mixture-of-experts-models).
MIN_EXPERT_TOKENS = 16
FALLBACK = "magnitude"


def preset(
    name: str,
    description: str,
    score: str | None,
    update: str = "none",
    rule: tuple[Rule, tuple[str, ...]] | None = None,
) -> None:
    """Register a preset: one score and one update for every layer, or a per-layer rule and the scores it uses."""
    if rule is None:
        PRESETS.add(name, Preset(name, description, lambda _fed: (score, update), (score,) if score else (), update))
    else:
        PRESETS.add(name, Preset(name, description, rule[0], rule[1], update))


def _stadew(fed_by_norm: bool) -> tuple[str | None, str]:
    return ("wanda", "none") if fed_by_norm else ("stade", "bias")


preset("random", "seeded uniform scores, no update (a floor to beat)", "random")
preset("magnitude", "|W|, no update: no calibration data", "magnitude")
preset("wanda", "|W| * ||x_j||, no update (Sun et al. 2023)", "wanda")
preset("stade", "|W| * std(x_j) and STADE's bias update", "stade", "bias")
preset("stade_plus", "W^2 * (var + mean^2), no update: the paper's STADE* ablation", "stade_plus")
preset(
    "stadew",
    "stade + bias on layers not fed by a norm (o_proj, down_proj, ...), wanda on norm-fed ones (q/k/v, gate/up)",
    None,
    "bias",
    (_stadew, ("wanda", "stade")),
)
preset("sparsegpt", "SparseGPT: the OBS solver chooses the mask and updates the kept weights", None, "obs")
preset("admm", "ADMM with gradual mask selection (Boza 2024's ADMM-Grad): mask and weights from H", None, "admm")
