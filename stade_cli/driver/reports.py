"""What one prune run reports: per layer (LayerReport) and per run (PruneReport), which stade.json records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stade_cli.stages.config import PruneConfig
from stade_cli.stages.presets import FALLBACK, MIN_EXPERT_TOKENS


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    sparsity: float
    rel_error: float
    bias_updated: bool
    damping: float | None = None
    fallback: str | None = None  # an expert too few tokens reached: the score used instead of the method's
    dense: bool = False  # kept dense by --only / --ignore

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
        if self.dense:
            d["dense"] = True
        return d


@dataclass
class PruneReport:
    config: PruneConfig
    layers: list[LayerReport] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    route: str = "in-memory"  # where the blocks came from: "streaming" (read one at a time) or "in-memory"
    reconstruction: list[dict[str, Any]] = field(default_factory=list)  # per block, when reconstructing
    routers: tuple[int, int] = (0, 0)  # router layers and weights, left dense
    block_sparsity: dict[str, float] = field(default_factory=dict)  # per block, where an allocation varies it

    @property
    def achieved_sparsity(self) -> float:
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        pruned = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return pruned / total if total else 0.0

    @property
    def bias_updated(self) -> bool:
        return any(r.bias_updated for r in self.layers)

    def note_findings(self) -> None:
        """Warn about a ratio that pruned nothing, every layer whose Hessian needed more than the usual damping, and
        experts that fell back to magnitude."""
        ratio = self.config.sparsity or 0.0
        if ratio > 0 and self.layers and all(r.sparsity == 0 for r in self.layers):
            widest = max(r.shape[1] for r in self.layers)
            self.warnings.append(
                f"--sparsity {ratio:g} pruned no weight: a row prunes int({ratio:g} x its width) weights, none here "
                f"(the widest row has {widest}); use at least {1 / widest:.2g} to prune one weight per row"
            )
        fallback = [r.name for r in self.layers if r.fallback]
        if fallback:
            self.warnings.append(
                f"{len(fallback)} expert layers (e.g. {fallback[0]}) were reached by fewer than {MIN_EXPERT_TOKENS} "
                f"calibration tokens and were pruned by {FALLBACK}; calibrate on more tokens to use their statistics"
            )
        for r in self.layers:
            if r.damping is not None and r.damping > 0.01:
                self.warnings.append(f"{r.name}: Hessian needed damping {r.damping:g} (Cholesky failed at 0.01)")
