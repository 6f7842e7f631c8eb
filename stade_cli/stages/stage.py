"""What a pruning stage is, and the four registries of them.

A stage is a score, an update, an allocation or a reconstruction: one module in its kind's package
(`stages/scores/`, `stages/updates/`, `stages/allocations/`, `stages/reconstructions/`) that registers itself with
its name, description, settings (a frozen dataclass of `setting` fields, each with its default and help) and needs
(the statistics it reads, and `inputs` where it runs the blocks on the calibration windows). Everything else reads
these descriptions: the command line's options, `stade methods`, PruneConfig's checks, the plan and stade.json. So a
new stage is one new module, and nothing else changes (docs/architecture.md, "Adding a stage").

Free of torch at import: the command line builds its options from here, and `stade --help` stays instant. Stage
modules import torch inside their functions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from stade_cli.base.errors import StadeError
from stade_cli.base.registry import Registry

STATISTICS = ("mean", "m2", "hessian")  # what calibration can keep for a layer
INPUTS = "inputs"  # a stage that runs each block on the calibration windows needs them


def setting(default: Any, help: str, *, flag: str | None = None, key: str | None = None, cli: bool = True) -> Any:
    """A field of a stage's settings: its default and help; `flag` overrides the option's name (default
    `--<prefix>-<field>`), `key` its name in stade.json; `cli=False` keeps it off the command line (recorded only)."""
    return field(default=default, metadata={"help": help, "flag": flag, "key": key, "cli": cli})


@dataclass(frozen=True)
class Settings:
    """A stage's settings. Subclasses are frozen dataclasses of `setting` fields; `check` refuses bad values."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise StadeError(f"{option_flag(self, f)} must be a finite number, got {value}.")
        self.check()

    def check(self) -> None:
        """Refuse a value the stage cannot run with, naming its option."""

    def record(self) -> dict[str, Any]:
        """The settings as stade.json records them."""
        return {f.metadata.get("key") or f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def flag(self, name: str) -> str:
        """The option that sets field `name`, for messages."""
        return option_flag(self, next(f for f in dataclasses.fields(self) if f.name == name))


_PREFIX: dict[type, str] = {}  # settings class -> its stage's option prefix


def option_flag(settings: Settings | type[Settings], f: dataclasses.Field) -> str:
    cls = settings if isinstance(settings, type) else type(settings)
    return f.metadata.get("flag") or f"--{_PREFIX.get(cls, cls.__name__.lower())}-{f.name.replace('_', '-')}"


@dataclass(frozen=True)
class Workload:
    """What `stade plan` knows when it asks a stage for its working memory: the widest layer group of a block (its
    layers stacked, rows x cols), the block, and the calibration windows. Sizes in elements unless named bytes."""

    rows: int
    cols: int  # the group's input size n
    widest: int  # the largest layer of the group
    block: int  # parameters of a block
    linear: int  # of which in its prunable layers
    tokens: int  # every calibration token
    window: int  # tokens of one window
    hidden: int
    elem: int  # bytes per element of the block as it runs
    activation_bytes: int  # one block's forward on one window

    @property
    def weights(self) -> int:
        return self.rows * self.cols

    @property
    def copy(self) -> int:
        """Bytes of float32 copies of the group's weights (none where they are float32 already)."""
        return 4 * self.weights if self.elem != 4 else 0

    @property
    def masked(self) -> int:
        """Bytes of scoring, masking and judging one group (driver.prune): the float32 copies, the new weights
        and masks, one layer's change and its square."""
        return self.copy + (4 + 1) * self.weights + 2 * 4 * self.widest


@dataclass(frozen=True)
class Stage:
    """A stage: its function and how it describes itself."""

    name: str
    description: str
    fn: Callable[..., Any] = field(repr=False)
    needs: tuple[str, ...] = ()  # from STATISTICS, and INPUTS
    settings: type[Settings] = Settings
    prefix: str = ""  # options are --<prefix>-<field>; "" for the stage's name
    paper: str = ""  # the section of docs/methods.md that defines it
    checks: Callable[..., None] | None = field(default=None, repr=False)  # (stage, settings, pattern, ratio)
    memory: Callable[[Workload, Any], int] | None = field(default=None, repr=False)  # working bytes, for the plan
    kind: ClassVar[str] = "stage"

    def __post_init__(self) -> None:
        unknown = set(self.needs) - {*STATISTICS, INPUTS}
        if unknown:
            raise ValueError(f"stage {self.name!r} needs {sorted(unknown)}: not a statistic stade keeps")
        if self.settings is not Settings:
            _PREFIX[self.settings] = self.prefix or self.name

    def check(self, settings: Any, pattern: Any, ratio: float) -> None:
        """Refuse a run this stage cannot do with this pattern and ratio (before any weight changes)."""
        if self.checks is not None:
            self.checks(self, settings, pattern, ratio)

    def record(self, settings: Settings) -> dict[str, Any]:
        return {"name": self.name, **({"settings": settings.record()} if dataclasses.fields(settings) else {})}


@dataclass(frozen=True)
class Score(Stage):
    """fn(w (out, in) float32, LayerStats, torch.Generator) -> scores (out, in); the lowest are pruned."""

    kind: ClassVar[str] = "score"


@dataclass(frozen=True)
class Update(Stage):
    """fn(ws, masks or None, LayerStats, UpdateJob) -> [(new weight, mask, bias change or None, damping or None)]
    for layers that share one input. `masks` is None where the update chooses them itself."""

    selects_mask: bool = False  # can choose the mask itself (then no score is needed)
    takes_mask: bool = True  # can update the weights on a mask a score chose
    adds_bias: bool = False  # changes biases (the checkpoint needs one per layer it updates; --no-bias-update skips it)
    kind: ClassVar[str] = "update"


@dataclass(frozen=True)
class Allocation(Stage):
    """fn(LoadedModel, Statistics, ratio, Pattern, settings, device) -> {block prefix: ratio}."""

    kind: ClassVar[str] = "allocation"


@dataclass(frozen=True)
class Reconstruction(Stage):
    """fn(block, BlockInputs, dense targets, device, settings, seed) -> its record of the block, or None."""

    kind: ClassVar[str] = "reconstruct"


@dataclass(frozen=True)
class UpdateJob:
    """What an update may read besides the weights: the target ratio and pattern, and its own settings."""

    ratio: float
    pattern: Any  # Pattern
    settings: Any = None  # the update's own Settings


SCORES: Registry[Score] = Registry("score", "--method", "stade_cli.stages.scores")
UPDATES: Registry[Update] = Registry("update", "--update", "stade_cli.stages.updates")
ALLOCATIONS: Registry[Allocation] = Registry("allocation", "--allocation", "stade_cli.stages.allocations")
RECONSTRUCTIONS: Registry[Reconstruction] = Registry(
    "reconstruction", "--reconstruct", "stade_cli.stages.reconstructions"
)
KINDS: dict[str, Registry[Any]] = {
    "score": SCORES,
    "update": UPDATES,
    "allocation": ALLOCATIONS,
    "reconstruct": RECONSTRUCTIONS,
}


def _registrar(registry: Registry[Any], cls: type[Stage]) -> Callable[..., Callable[[Callable], Callable]]:
    def register(name: str, description: str, **kw: Any) -> Callable[[Callable], Callable]:
        return registry.register(name, lambda fn: cls(name, description, fn, **kw))

    return register


score = _registrar(SCORES, Score)  # @score("wanda", "...", needs=("mean", "m2"))
update = _registrar(UPDATES, Update)
allocation = _registrar(ALLOCATIONS, Allocation)
reconstruction = _registrar(RECONSTRUCTIONS, Reconstruction)


def all_stages() -> list[Stage]:
    return [s for registry in KINDS.values() for s in registry]


@dataclass(frozen=True)
class Option:
    """One command-line option that sets one field of one stage's settings."""

    flag: str  # --admm-iters
    param: str  # admm_iters: the keyword the command receives
    stage: Stage
    field: str
    default: Any
    help: str


def options() -> list[Option]:
    """Every stage setting that the command line offers, in registry order."""
    out = []
    for stage in all_stages():
        for f in dataclasses.fields(stage.settings):
            if f.metadata.get("cli", True):
                flag = option_flag(stage.settings, f)
                out.append(
                    Option(flag, flag.lstrip("-").replace("-", "_"), stage, f.name, f.default, f.metadata["help"])
                )
    return out


def settings_from(values: dict[str, Any], used: set[str]) -> tuple[Settings, ...]:
    """The settings of the stages in `used` (their names) from the options' values (keyed by Option.param); the
    options of a stage the run does not use are not read, as they were not given."""
    fields: dict[type[Settings], dict[str, Any]] = {}
    for opt in options():
        if opt.param in values and opt.stage.name in used:
            fields.setdefault(opt.stage.settings, {})[opt.field] = values[opt.param]
    return tuple(cls(**kw) for cls, kw in fields.items())
