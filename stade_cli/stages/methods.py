"""Methods: the `--method` presets, each a score and an update (per layer for `stadew`). See method.md.

A preset keeps exactly the figures it always had: `sparsegpt` is the OBS solver choosing the mask and
updating the weights, `stade` is the stade score with STADE's bias update, `stadew` chooses per layer.
`--update` replaces a preset's update (e.g. `--method wanda --update admm`: wanda's mask, ADMM's weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stade_cli.base.errors import StadeError
from stade_cli.stages.admm import AdmmSettings
from stade_cli.stages.allocation import OwlSettings
from stade_cli.stages.scores import get_score, lookup
from stade_cli.stages.updates import get_update
from stade_cli.stats.accumulators import LayerStats

Rule = Callable[[LayerStats], tuple[str | None, str]]  # (score or None: the update chooses the mask, update)


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    rule: Rule
    scores: tuple[str, ...]  # every score the rule may pick (for `needs` and the listing)
    update: str  # the update it uses where its rule does not say otherwise (for the listing)

    def stages(self, st: LayerStats) -> tuple[str | None, str]:
        return self.rule(st)

    @property
    def needs(self) -> tuple[str, ...]:
        needs = {n for s in self.scores for n in get_score(s).needs} | set(get_update(self.update).needs)
        return tuple(sorted(needs))


METHODS: dict[str, Method] = {}


def preset(
    name: str,
    description: str,
    score: str | None,
    update: str = "none",
    rule: tuple[Rule, tuple[str, ...]] | None = None,
) -> None:
    """Register a preset: one score and one update for every layer, or a per-layer rule and the scores it uses."""
    if rule is None:
        METHODS[name] = Method(name, description, lambda _st: (score, update), (score,) if score else (), update)
    else:
        METHODS[name] = Method(name, description, rule[0], rule[1], update)


def get_method(name: str) -> Method:
    return lookup(METHODS, "method", name, "--method")


def resolve_update(method: Method, name: str | None) -> str | None:
    """The `--update` that replaces the method's own: None where it is the method's own; refused where impossible."""
    if name is None:
        return None
    update = get_update(name)
    if not method.scores and update.name != method.update:
        raise StadeError(
            f"Method {method.name!r} chooses its mask with its own update ({method.update}); "
            f"--update {update.name} cannot replace it.",
            f"pick a score method for --update {update.name}, e.g. --method wanda --update {update.name}",
        )
    if method.scores and not update.takes_mask:
        raise StadeError(
            f"--update {update.name} chooses its own mask, so it cannot follow {method.name!r}'s scores.",
            "use --method sparsegpt for the OBS solver, or --update admm to update a scored mask",
        )
    return None if update.name == method.update else update.name  # the preset itself: one spelling


def stages_record(
    method: Method, update: str, allocation: str, reconstruct: str, admm: AdmmSettings, owl: OwlSettings
) -> dict[str, Any]:
    """The stages of a run and their parameters, as stade.json records them."""
    record: dict[str, Any] = {"name": update}
    if update == "admm":
        record["admm"] = {
            "iters": admm.iters,
            "rho": admm.rho,
            "rho_growth": admm.rho_growth,
            "mask_iters": admm.mask_iters,
            "damping": admm.damping,
            "mask": "score" if method.scores else "gradual",
        }
    alloc: dict[str, Any] = {"name": allocation}
    if allocation == "owl":
        alloc.update(m=owl.m, **{"lambda": owl.lam})
    return {
        "score": list(method.scores) or None,
        "update": record,
        "allocation": alloc,
        "reconstruct": {"name": reconstruct},
    }


def _stadew(st: LayerStats) -> tuple[str | None, str]:
    return ("wanda", "none") if st.fed_by_norm else ("stade", "bias")


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


def stage_rows() -> list[dict[str, object]]:
    """Every method and every stage, for `stade methods`: kind, name, statistics read, description."""
    import torch

    from stade_cli.stages.allocation import ALLOCATIONS
    from stade_cli.stages.scores import SCORES
    from stade_cli.stages.updates import UPDATES

    norm_fed = LayerStats(1, torch.zeros(1), torch.zeros(1), True)
    other = LayerStats(1, torch.zeros(1), torch.zeros(1), False)
    rows: list[dict[str, object]] = []
    for m in METHODS.values():
        (s1, u1), (s2, u2) = m.stages(norm_fed), m.stages(other)
        stages = f"{s1 or 'its update'} + {u1}" + ("" if (s1, u1) == (s2, u2) else f" / {s2} + {u2} (not norm-fed)")
        rows.append(
            {
                "kind": "method",
                "name": m.name,
                "stages": stages,
                "needs": list(m.needs),
                "bias_update": "all layers"
                if u1 == u2 == "bias"
                else "layers not fed by a norm"
                if u2 == "bias"
                else "no",
                "description": m.description,
            }
        )
    for s in SCORES.values():
        rows.append({"kind": "score", "name": s.name, "needs": list(s.needs), "description": s.description})
    for u in UPDATES.values():
        rows.append({"kind": "update", "name": u.name, "needs": list(u.needs), "description": u.description})
    for a in ALLOCATIONS.values():
        rows.append(
            {
                "kind": "allocation",
                "name": a.name,
                "needs": ["mean", "m2"] if a.name != "uniform" else [],
                "description": a.description,
            }
        )
    return rows
