"""The artifacts stade writes and reads, each one written, versioned schema (docs/artifacts.md):

- the statistics manifest (`manifest.json` of `stade calibrate`, `stade stats merge`);
- the pruning report (`stade.json` beside every pruned checkpoint);
- a sweep's summary (`summary.json` in a sweep's `--out`);
- a results file (`stade eval --out`).

Every module writes and reads them through these records, by attribute. An older schema still loads (upgraded
here); a newer one is refused with a message that says to upgrade stade.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stade_cli.base.schema import Artifact, Record

REPORT_FILE = "stade.json"
SWEEP_SUMMARY = "summary.json"
MANIFEST_FILE = "manifest.json"


# ----------------------------------------------------------------------------------------------- statistics


@dataclass(kw_only=True)
class ModelRecord(Record):
    """The model an artifact was made from: as given, where it was found, and (for statistics) its identity."""

    spec: str
    path: str
    dtype: str | None = None
    fingerprint: str | None = None
    measured_sparsity: float | None = None  # exact zeros over the prunable weights, as evaluated
    model_type: str | None = None
    architecture: str | None = None
    num_hidden_layers: int | None = None
    hidden_size: int | None = None
    max_position_embeddings: int | None = None


@dataclass(kw_only=True)
class DataRecord(Record):
    source: str
    nsamples: int
    seqlen: int
    source_sha256: str | None = None
    token_ids_sha256: str | None = None
    seed: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class Windows(Record):
    """What was drawn, and which of those windows the artifact holds (a shard holds part of them)."""

    drawn: int
    drawn_sha256: str
    start: int
    stop: int
    shard: list[int] | None = None  # [I, N] of --shard I/N


@dataclass(kw_only=True)
class LayerEntry(Record):
    name: str
    block: int
    shape: list[int]  # (out, in)
    fed_by_norm: bool
    group: str  # layers with the same group share one input, hence these statistics
    kind: str | None = None  # attention, mlp or expert
    count: int | None = None  # tokens that reached it (an expert's own), else the manifest's count


@dataclass(kw_only=True)
class FileEntry(Record):
    bytes: int
    sha256: str


@dataclass(kw_only=True)
class Distributed(Record):
    world_size: int
    backend: str
    windows: list[list[int]]  # each rank's [start, stop)


@dataclass(kw_only=True)
class MergedFrom(Record):
    path: str
    fingerprint: str
    start: int
    stop: int


@dataclass(kw_only=True)
class StatsManifest(Artifact):
    KIND = "stade-statistics"
    SCHEMA = 1
    WHAT = "Statistics manifest"

    schema: int = SCHEMA
    kind: str = KIND
    versions: dict[str, str] = field(default_factory=dict)
    model: ModelRecord
    dtype: str
    device: str | None = None
    data: DataRecord
    windows: Windows | None = None  # None: an artifact from before shards, which holds every window it drew
    statistics: list[str]  # count, mean, m2, and hessian where kept
    hessian_dtype: str | None = None
    hessian_sha256: dict[str, str] | None = None  # per Hessian, to check each as it is read
    count: int
    layers: list[LayerEntry]
    experts: dict[str, Any] | None = None  # the fallback rule for experts too few tokens reached
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    distributed: Distributed | None = None
    merged_from: list[MergedFrom] | None = None
    files: dict[str, FileEntry]  # every data file's size and hash

    @property
    def whole_windows(self) -> Windows:
        """`windows`, or for an artifact from before shards every window it drew."""
        if self.windows is not None:
            return self.windows
        n = self.data.nsamples
        return Windows(drawn=n, drawn_sha256=self.data.token_ids_sha256 or "", start=0, stop=n, shard=None)


# ----------------------------------------------------------------------------------------------- pruning


@dataclass(kw_only=True)
class StageRecord(Record):
    name: str
    settings: dict[str, Any] | None = None


@dataclass(kw_only=True)
class StagesRecord(Record):
    score: list[str] | None = None  # the preset's scores; None where its update chooses the mask
    update: StageRecord
    allocation: StageRecord
    reconstruct: StageRecord


@dataclass(kw_only=True)
class LayerResult(Record):
    name: str
    shape: list[int]
    sparsity: float
    rel_error: float  # estimated squared output error over the dense output energy
    bias_updated: bool
    damping: float | None = None  # where a Hessian needed damping
    fallback: str | None = None  # an expert too few tokens reached: the score used instead of the method's
    dense: bool = False  # kept dense by --only / --ignore


@dataclass(kw_only=True)
class StatisticsRef(Record):
    path: str
    fingerprint: str
    data: str
    nsamples: int
    seqlen: int


@dataclass(kw_only=True)
class WeightCount(Record):
    layers: int
    weights: int
    pruned: int


@dataclass(kw_only=True)
class CurvePoint(Record):
    step: int
    tokens: int  # training tokens seen (all ranks) before this measurement
    heldout_loss: float  # mean next-token NLL over the held-out windows
    heldout_ppl: float


@dataclass(kw_only=True)
class FinetuneRecord(Record):
    """How `stade finetune` recovered a pruned checkpoint, with its mask held (docs/finetune.md)."""

    pruned: str  # the checkpoint fine-tuned, as given
    teacher: str | None = None  # None: the LM loss alone
    loss: str  # kd, lm or mix
    kd_weight: float
    temperature: float
    mode: str  # full or lora
    lora_rank: int | None = None
    lora_alpha: float | None = None
    data: str
    source_sha256: str | None = None
    seqlen: int
    train_windows: int
    heldout_windows: int
    data_notes: list[str] = field(default_factory=list)
    lr: float
    warmup: int
    batch_windows: int  # windows per optimizer step, all ranks together
    steps: int  # optimizer steps run
    tokens: int  # training tokens seen
    stopped_early: bool
    seed: int
    world_size: int = 1
    heldout_before: float  # held-out perplexity before the first step
    heldout_after: float  # and of the weights written
    best_step: int  # the step of the lowest held-out loss
    kept_step: int | None = None  # the step whose weights were written: best_step with --patience, else the last
    curve: list[CurvePoint]


@dataclass(kw_only=True)
class PruneRecord(Artifact):
    """stade.json: how a checkpoint was made, every layer's sparsity and estimated error."""

    KIND = "stade-prune-report"
    SCHEMA = 3  # 2: stages record their settings alike; the reconstruction's per-block results apart. 3: finetune
    WHAT = "Pruning report"

    schema: int = SCHEMA
    kind: str = KIND
    method: str
    stages: StagesRecord
    pattern: str
    sparsity: float
    achieved_sparsity: float
    bias_update: bool
    sequential: bool
    seed: int
    route: str  # where the blocks came from: streaming (read one at a time) or in-memory
    dtype: str | None = None  # as saved
    model: ModelRecord
    statistics: StatisticsRef
    versions: dict[str, str] = field(default_factory=dict)
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    weights: dict[str, WeightCount] = field(default_factory=dict)  # per kind of layer
    expert_fallback: dict[str, Any] | None = None
    block_sparsity: dict[str, float] | None = None  # per block, where an allocation varies it
    reconstruction: list[dict[str, Any]] | None = None  # per block, where a reconstruction ran
    selection: dict[str, list[str]] | None = None  # --only / --ignore patterns, where layers were kept dense
    layers: list[LayerResult]
    finetune: FinetuneRecord | None = None  # where `stade finetune` recovered the checkpoint

    @classmethod
    def upgrade(cls, data: dict[str, Any], schema: int) -> dict[str, Any]:
        """Schema 1 recorded each stage's settings in its own shape, and the reconstruction's twice; schema 2 lacks
        only the optional `finetune`."""
        if schema >= 2:
            return {**data, "schema": cls.SCHEMA}
        old, recon = data.get("stages") or {}, data.pop("reconstruct", None) or {}
        update = dict(old.get("update") or {"name": "none"})  # {"name": "admm", "admm": {...}}
        allocation = dict(old.get("allocation") or {"name": "uniform"})  # {"name": "owl", "m": 5, "lambda": 0.08}
        own = update.get(update["name"])
        stages = {
            "score": old.get("score"),
            "update": {"name": update["name"], **({"settings": own} if isinstance(own, dict) else {})},
            "allocation": {"name": allocation.pop("name"), **({"settings": allocation} if allocation else {})},
            "reconstruct": {"name": recon.get("method", "none")},
        }
        if recon.get("method", "none") != "none":
            settings = {k: v for k, v in recon.items() if k not in ("method", "blocks")}
            stages["reconstruct"] = {"name": recon["method"], "settings": settings}
            data["reconstruction"] = recon.get("blocks", [])
        return {**data, "schema": cls.SCHEMA, "stages": stages}


@dataclass(kw_only=True)
class SweepRun(Record):
    path: str
    method: str
    pattern: str
    sparsity: float
    achieved_sparsity: float
    sequential: bool


@dataclass(kw_only=True)
class SweepSummary(Artifact):
    """summary.json: a sweep's index of its checkpoints."""

    KIND = "stade-prune-sweep"
    SCHEMA = 1
    WHAT = "Sweep summary"

    schema: int = SCHEMA
    kind: str = KIND
    runs: list[SweepRun]


# ----------------------------------------------------------------------------------------------- results


@dataclass(kw_only=True)
class PerplexityResult(Record):
    ppl: float
    mean_nll: float
    windows: int
    seqlen: int
    tokens: int
    seconds: float
    source_sha256: str | None = None
    ids_sha256: str | None = None
    batch_size: int | None = None
    notes: list[str] | None = None  # where the protocol differs from the published one


@dataclass(kw_only=True)
class ZeroShot(Record):
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> acc, acc_norm, their stderr, items
    mean: dict[str, float] = field(default_factory=dict)
    num_fewshot: int = 0
    limit: int | None = None


@dataclass(kw_only=True)
class EvalSettings(Record):
    ppl: list[str]
    tasks: list[str]
    seqlen: int
    batch_size: int
    limit: int | None = None
    max_windows: int | None = None


@dataclass(kw_only=True)
class Results(Artifact):
    """A results file: one model's perplexities and zero-shot accuracies, and how it was pruned."""

    KIND = "stade-results"
    SCHEMA = 1
    WHAT = "Results file"

    schema: int = SCHEMA
    kind: str = KIND
    created: str
    model: ModelRecord
    pruning: PruneRecord | None = None  # the checkpoint's stade.json; None for a model stade did not prune
    method: str = "dense"
    pattern: str | None = None
    sparsity: float | None = 0.0
    achieved_sparsity: float | None = 0.0
    device: str
    config: EvalSettings
    versions: dict[str, str] = field(default_factory=dict)
    perplexity: dict[str, PerplexityResult] = field(default_factory=dict)
    zeroshot: ZeroShot = field(default_factory=ZeroShot)
    timings: dict[str, float] = field(default_factory=dict)
