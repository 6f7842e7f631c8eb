"""What one prune run is asked to do (PruneConfig) and what it reports (PruneReport, LayerReport, in stade.json).

Kept apart from prune.py's maths and driver so that the checkpoint writer, the CLI and the benchmarks can name a run
without importing the pruning code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stade_cli.base.errors import at_least
from stade_cli.stages.admm import AdmmSettings
from stade_cli.stages.allocation import OwlSettings, check_allocation, get_allocation
from stade_cli.stages.masks import Pattern, parse_pattern, resolve_sparsity
from stade_cli.stages.methods import Method, get_method, resolve_update, stages_record
from stade_cli.stages.reconstruct import DEFAULT_STEPS, get_reconstruction
from stade_cli.stages.scores import get_score
from stade_cli.stages.updates import get_update
from stade_cli.stats.accumulators import LayerStats


@dataclass(frozen=True)
class PruneConfig:
    """One pruning run: a method preset, optionally with its update or the block allocation replaced."""

    method: str
    sparsity: float | None = None  # None with an N:M pattern: N/M
    pattern: str = "unstructured"
    bias_update: bool = True  # STADE's bias compensation where the method asks for it
    sequential: bool = False
    seed: int = 0
    update: str | None = None  # None: the method's own
    allocation: str = "uniform"
    reconstruct: str = "none"  # "none" | "block": see reconstruct.py
    reconstruct_steps: int = DEFAULT_STEPS
    admm: AdmmSettings = field(default_factory=AdmmSettings)
    owl: OwlSettings = field(default_factory=OwlSettings)

    def __post_init__(self) -> None:
        method = get_method(self.method)
        object.__setattr__(self, "method", method.name)
        object.__setattr__(self, "reconstruct", get_reconstruction(self.reconstruct).name)
        at_least("--reconstruct-steps", self.reconstruct_steps, 1, "pass e.g. 40")
        pattern = parse_pattern(self.pattern)
        object.__setattr__(self, "pattern", str(pattern))
        object.__setattr__(self, "sparsity", resolve_sparsity(pattern, self.sparsity))
        object.__setattr__(self, "update", resolve_update(method, self.update))
        object.__setattr__(self, "allocation", get_allocation(self.allocation).name)
        check_allocation(self.allocation, pattern, self.ratio, self.owl)
        if "admm" in self.updates:
            self.admm.check()

    @property
    def preset(self) -> Method:
        return get_method(self.method)

    def stages(self, st: LayerStats) -> tuple[str | None, str]:
        """(score or None where the update chooses the mask, update) for one layer."""
        score, update = self.preset.stages(st)
        return score, self._applied(self.update or update)

    @property
    def updates(self) -> tuple[str, ...]:
        """Every update this run may apply."""
        return (self._applied(self.update or self.preset.update),)

    def _applied(self, update: str) -> str:
        """The update as run: STADE's bias compensation is no update under --no-bias-update."""
        return "none" if update == "bias" and not self.bias_update else update

    @property
    def needs(self) -> tuple[str, ...]:
        """The statistics this run reads: () for weights only, ("mean", "m2"), ("hessian",)."""
        needs = {n for s in self.preset.scores for n in get_score(s).needs}
        needs |= {n for u in self.updates for n in get_update(u).needs}
        if self.allocation == "owl":
            needs |= {"mean", "m2"}
        return tuple(sorted(needs))

    def bias_layer(self, st: LayerStats) -> bool:
        """Whether this layer gets STADE's bias compensation (so the checkpoint needs a bias there)."""
        return self.stages(st)[1] == "bias"

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def ratio(self) -> float:
        assert self.sparsity is not None
        return self.sparsity

    @property
    def label(self) -> str:
        """The method, and the stages that replace its own: wanda, wanda+admm, admm+owl."""
        parts = [self.method]
        if self.update is not None:
            parts.append(self.update)
        if self.allocation != "uniform":
            parts.append(self.allocation)
        if self.reconstruct != "none":
            parts.append(self.reconstruct)
        return "+".join(parts)

    @property
    def name(self) -> str:
        """Folder name in a sweep: method-pattern-sparsity (method+update+allocation where they differ)."""
        return f"{self.label}-{self.parsed_pattern.slug}-{self.ratio:g}"

    def stages_dict(self) -> dict[str, Any]:
        """The stages and their parameters, as stade.json records them."""
        record = stages_record(self.preset, self.updates[0], self.allocation, self.reconstruct, self.admm, self.owl)
        if self.reconstruct != "none":
            record["reconstruct"]["steps"] = self.reconstruct_steps
        return record


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    sparsity: float
    rel_error: float
    bias_updated: bool
    damping: float | None = None
    fallback: str | None = None  # an expert too few tokens reached: the score used instead of the method's

    def as_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "shape": list(self.shape),
            "sparsity": round(self.sparsity, 6),
            "rel_error": self.rel_error,
            "bias_updated": self.bias_updated,
        }
        if self.damping is not None:
            d["damping"] = self.damping
        if self.fallback is not None:
            d["fallback"] = self.fallback
        return d


@dataclass
class PruneReport:
    config: PruneConfig
    layers: list[LayerReport] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    route: str = "in-memory"  # how the checkpoint was written: "streaming" (block by block) or "in-memory"
    reconstruction: list[dict[str, Any]] = field(default_factory=list)  # per block, when reconstructing
    routers: tuple[int, int] = (0, 0)  # router layers and weights, left dense
    block_sparsity: dict[str, float] = field(default_factory=dict)  # per block, where an allocation varies it

    @property
    def achieved_sparsity(self) -> float:
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        pruned = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return pruned / total if total else 0.0
