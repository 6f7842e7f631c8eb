"""What one prune run is asked to do: a preset, the stages that replace its own, and their settings.

Generic over the stages: each chosen stage is looked up in its registry, checked by its own rules, and carries its
own settings (given, or its defaults). No stage is named here but in the fields' defaults; the stade.json record, the
plan and the command line read the stages' own descriptions (stage.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stade_cli.base.errors import StadeError
from stade_cli.stages.pattern import Pattern, parse_pattern, resolve_sparsity
from stade_cli.stages.presets import PRESETS, Preset
from stade_cli.stages.selection import LayerSelection
from stade_cli.stages.stage import (
    ALLOCATIONS,
    INPUTS,
    RECONSTRUCTIONS,
    SCORES,
    STATISTICS,
    UPDATES,
    Settings,
    Stage,
    Update,
)
from stade_cli.stages.updates.none import NO_UPDATE


@dataclass(frozen=True)
class PruneConfig:
    """One pruning run: a method preset, optionally with its update, allocation or reconstruction replaced."""

    method: str
    sparsity: float | None = None  # None with an N:M pattern: N/M
    pattern: str = "unstructured"
    bias_update: bool = True  # STADE's bias compensation where the method asks for it
    sequential: bool = False
    seed: int = 0
    update: str | None = None  # None: the method's own
    allocation: str = "uniform"
    reconstruct: str = "none"
    settings: tuple[Settings, ...] = ()  # of the chosen stages; a stage given none runs with its defaults
    layers: LayerSelection = field(default_factory=LayerSelection)  # --only / --ignore: the others stay dense

    def __post_init__(self) -> None:
        preset = PRESETS.get(self.method)  # every name first: a typo is named before any value is judged
        object.__setattr__(self, "method", preset.name)
        object.__setattr__(self, "update", _replaced_update(preset, self.update))
        object.__setattr__(self, "allocation", ALLOCATIONS.get(self.allocation).name)
        object.__setattr__(self, "reconstruct", RECONSTRUCTIONS.get(self.reconstruct).name)
        pattern = parse_pattern(self.pattern)
        object.__setattr__(self, "pattern", str(pattern))
        object.__setattr__(self, "sparsity", resolve_sparsity(pattern, self.sparsity))
        object.__setattr__(self, "settings", self._own_settings())
        for stage in self.stages:
            stage.check(self.settings_for(stage), pattern, self.ratio)

    def _own_settings(self) -> tuple[Settings, ...]:
        """The given settings of the stages this run uses, one per stage, in a fixed order (configs compare equal
        whatever order they were given in); settings of stages it does not use are dropped."""
        by_class: dict[type, Settings] = {}
        for s in self.settings:
            if type(s) in by_class and by_class[type(s)] != s:
                raise StadeError(f"Two different {type(s).__name__} were given for one run.")
            by_class[type(s)] = s
        used = (by_class[st.settings] for st in self.stages if st.settings in by_class)
        return tuple(s for s in used if s != type(s)())  # a stage's defaults: the same run as none given

    # -- the stages
    @property
    def preset(self) -> Preset:
        return PRESETS.get(self.method)

    @property
    def stages(self) -> list[Stage]:
        """Every stage this run may apply: the preset's scores, its update(s), the allocation, the reconstruction."""
        scores: list[Stage] = [SCORES.get(s) for s in self.preset.scores]
        updates: list[Stage] = [UPDATES.get(u) for u in self.updates]
        return [*scores, *updates, ALLOCATIONS.get(self.allocation), RECONSTRUCTIONS.get(self.reconstruct)]

    def settings_for(self, stage: Stage) -> Any:
        """The stage's settings in this run: as given, else its defaults."""
        return next((s for s in self.settings if type(s) is stage.settings), None) or stage.settings()

    def layer_stages(self, fed_by_norm: bool) -> tuple[str | None, str]:
        """(score, or None where the update chooses the mask; update) for a layer fed by a norm or not."""
        score, update = self.preset.layer_stages(fed_by_norm)
        return score, self._applied(self.update or update)

    @property
    def updates(self) -> tuple[str, ...]:
        """Every update this run may apply."""
        return (self._applied(self.update or self.preset.update),)

    def _applied(self, update: str) -> str:
        """The update as run: an update that adds biases (STADE's) is no update under --no-bias-update."""
        return NO_UPDATE if UPDATES.get(update).adds_bias and not self.bias_update else update

    def bias_layer(self, fed_by_norm: bool) -> bool:
        """Whether a layer gets a bias update (so the checkpoint needs a bias there)."""
        return UPDATES.get(self.layer_stages(fed_by_norm)[1]).adds_bias

    # -- what it needs
    @property
    def needs(self) -> tuple[str, ...]:
        """The statistics this run reads: () for weights only, ("m2", "mean"), ("hessian",), ..."""
        return tuple(sorted({n for st in self.stages for n in st.needs if n in STATISTICS}))

    @property
    def needs_inputs(self) -> bool:
        """Whether the blocks run on the calibration windows: to recalibrate (sequential, with statistics to read)
        or for a stage that needs them (reconstruction). A weights-only score masks the same whatever the inputs."""
        return (self.sequential and bool(self.needs)) or any(INPUTS in st.needs for st in self.stages)

    # -- names
    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def ratio(self) -> float:
        assert self.sparsity is not None
        return self.sparsity

    @property
    def label(self) -> str:
        """The method, and the stages that replace its own: wanda, wanda+admm, admm+owl, admm+block."""
        parts = [self.method, *([self.update] if self.update else [])]
        parts += [
            getattr(self, k) for k in ("allocation", "reconstruct") if getattr(self, k) != getattr(PruneConfig, k)
        ]
        return "+".join(parts)

    @property
    def name(self) -> str:
        """Folder name in a sweep: method-pattern-sparsity (method+update+allocation where they differ)."""
        return f"{self.label}-{self.parsed_pattern.slug}-{self.ratio:g}"

    def record(self) -> dict[str, Any]:
        """The stages and their settings, as stade.json records them."""
        stages = {st.kind: st for st in self.stages if st.kind != "score"}
        return {
            "score": list(self.preset.scores) or None,
            **{kind: st.record(self.settings_for(st)) for kind, st in stages.items()},
        }


def _replaced_update(preset: Preset, name: str | None) -> str | None:
    """The `--update` that replaces the method's own: None where it is the method's own; refused where impossible."""
    if name is None:
        return None
    update: Update = UPDATES.get(name)
    if not preset.scores and update.name != preset.update:
        raise StadeError(
            f"Method {preset.name!r} chooses its mask with its own update ({preset.update}); "
            f"--update {update.name} cannot replace it.",
            f"pick a score method for --update {update.name}, e.g. --method wanda --update {update.name}",
        )
    if preset.scores and not update.takes_mask:
        raise StadeError(
            f"--update {update.name} chooses its own mask, so it cannot follow {preset.name!r}'s scores.",
            "use --method sparsegpt for the OBS solver, or --update admm to update a scored mask",
        )
    return None if update.name == preset.update else update.name  # the preset itself: one spelling
