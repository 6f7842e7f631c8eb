"""A pruned checkpoint's own parts: the bias switches plain transformers needs, and its stade.json and model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from stade_cli.base.artifacts import (
    REPORT_FILE,
    LayerResult,
    ModelRecord,
    PruneRecord,
    StagesRecord,
    StatisticsRef,
    WeightCount,
)
from stade_cli.base.dtypes import dtype_name
from stade_cli.base.errors import StadeError
from stade_cli.base.files import write_json
from stade_cli.base.modelcard import write_card
from stade_cli.base.tensorfiles import header
from stade_cli.base.versions import library_versions
from stade_cli.driver.reports import PruneReport
from stade_cli.models import hf
from stade_cli.models.blocks import iterate_blocks
from stade_cli.models.experts import ExpertLayer, kind_counts, prunable_layers
from stade_cli.models.layers import bias_param
from stade_cli.models.loading import LoadedModel
from stade_cli.models.weights import SINGLE_FILE
from stade_cli.stages.config import PruneConfig
from stade_cli.stages.presets import FALLBACK, MIN_EXPERT_TOKENS
from stade_cli.stats.artifact import Statistics

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def uses_bias(stats: Statistics, config: PruneConfig) -> bool:
    """Whether pruning with `config` adds STADE's bias update to some layer (decided by the manifest alone)."""
    return any(config.bias_layer(e.fed_by_norm) for e in stats.manifest.layers)


def bias_plan(model: PreTrainedModel, stats: Statistics, configs: list[PruneConfig]) -> dict[str, bool]:
    """The config switches that make plain transformers load the biases STADE adds, checked on a meta copy.

    Returns the switches to set; raises where the architecture cannot hold a needed bias.
    """
    layers = {f"{p}.{n}": mod for _i, p, block in iterate_blocks(model) for n, mod in prunable_layers(block).items()}
    needed = sorted(
        {
            e.name
            for c in configs
            for e in stats.manifest.layers
            if c.bias_layer(e.fed_by_norm) and bias_param(layers[e.name]) is None
        }
    )
    if not needed:
        return {}
    switches = hf.bias_switches(model.config)
    experts = [n for n in needed if isinstance(layers[n], ExpertLayer)]  # no config switch adds expert biases
    missing = [n for n in needed if n not in experts]
    if switches and missing:
        biased = hf.biased_linears(model.config, switches)
        missing = [n for n in missing if n not in biased]
    missing = experts + missing
    if missing:
        raise StadeError(
            f"{type(model).__name__} has no config switch that gives {missing[0]} a bias"
            + (f" (and {len(missing) - 1} more layers)" if len(missing) > 1 else "")
            + ", so STADE's bias update could not be saved in a checkpoint that plain transformers loads.",
            "pass --no-bias-update (the published code's effective behaviour) or choose a method without it",
        )
    return switches


def prune_record(
    loaded: LoadedModel, report: PruneReport, stats: Statistics, device: torch.device, dtype: torch.dtype
) -> PruneRecord:
    """stade.json: how the checkpoint was made, every layer's sparsity and estimated error."""
    c = report.config
    data = stats.manifest.data
    fallback = [r.name for r in report.layers if r.fallback]
    return PruneRecord(
        method=c.method,
        stages=StagesRecord.parse(c.record()),
        pattern=c.pattern,
        sparsity=c.ratio,
        achieved_sparsity=round(report.achieved_sparsity, 6),
        bias_update=c.bias_update and report.bias_updated,
        sequential=c.sequential,
        seed=c.seed,
        route=report.route,
        dtype=dtype_name(dtype),  # as saved
        model=ModelRecord(spec=loaded.spec, path=loaded.path),
        statistics=StatisticsRef(
            path=str(stats.path),
            fingerprint=stats.fingerprint,
            data=data.source,
            nsamples=data.nsamples,
            seqlen=data.seqlen,
        ),
        versions=library_versions(),
        device=str(device),
        timings=report.timings,
        warnings=report.warnings,
        weights={
            k: WeightCount(**v)
            for k, v in kind_counts([(r.name, r.shape, r.sparsity) for r in report.layers], report.routers).items()
        },
        expert_fallback={
            "rule": f"experts reached by fewer than {MIN_EXPERT_TOKENS} calibration tokens are pruned by {FALLBACK}",
            "layers": fallback,
        },
        block_sparsity=report.block_sparsity or None,
        reconstruction=report.reconstruction or None,
        selection=c.layers.record(),
        layers=[LayerResult(**r.as_dict()) for r in report.layers],
    )


def finish_checkpoint(folder: Path, record: PruneRecord, command: str | None) -> None:
    """What every checkpoint holds beside its weights, config and tokenizer: stade.json and a README.md model card
    naming `command`, the command line that made it. The weights are checked whole first: a run never reports
    success for a checkpoint that cannot load."""
    check_weights_whole(folder)
    write_json(folder / REPORT_FILE, record.dump())
    write_card(folder, record, command)


def check_weights_whole(folder: Path) -> None:
    """Every weight file the checkpoint names is there, as long as its header says."""
    index = folder / "model.safetensors.index.json"
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [SINGLE_FILE]
    for name in ["config.json", *names]:
        path = folder / name
        ok = path.is_file()
        if ok and name.endswith(".safetensors"):
            entries = header(path).values()
            end = max((base + e["data_offsets"][1] for base, e in entries), default=path.stat().st_size)
            ok = path.stat().st_size == end
        if not ok:
            raise StadeError(f"The checkpoint written in {str(folder)!r} lacks {name} or has it cut short.",
                             "run again; if it recurs, check the disk")  # fmt: skip
