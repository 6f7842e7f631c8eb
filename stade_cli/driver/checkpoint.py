"""A pruned model on disk: the bias switches plain transformers needs, the checkpoint and its stade.json.

Also `Snapshot`, which keeps the dense weights so that one loaded model serves a whole sweep.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from stade_cli.base.artifacts import REPORT_FILE, REPORT_KIND
from stade_cli.base.errors import StadeError
from stade_cli.base.files import atomic_dir, read_json, write_json
from stade_cli.base.modelcard import write_card
from stade_cli.base.versions import library_versions
from stade_cli.models.blocks import iterate_blocks
from stade_cli.models.experts import (
    FALLBACK,
    MIN_EXPERT_TOKENS,
    ExpertLayer,
    fused_experts,
    kind_counts,
    prunable_layers,
)
from stade_cli.models.layers import bias_param, linear_layers, weight_param
from stade_cli.models.loading import LoadedModel
from stade_cli.models.weights import WeightFiles
from stade_cli.stats.accumulators import LayerStats
from stade_cli.stats.artifact import Statistics

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from stade_cli.stages.config import PruneConfig, PruneReport

MAX_SHARD_SIZE = "2GB"  # per safetensors shard of a written checkpoint (streaming writes the same shards)


def bias_plan(model: PreTrainedModel, stats: Statistics, configs: list[PruneConfig]) -> dict[str, bool]:
    """The config switches that make plain transformers load the biases STADE adds, checked on a meta copy.

    Returns the switches to set; raises where the architecture cannot hold a needed bias.
    """
    needed = set()
    layers = {f"{p}.{n}": mod for _i, p, block in iterate_blocks(model) for n, mod in prunable_layers(block).items()}
    for c in configs:
        if not c.bias_update:
            continue
        for entry in stats.manifest["layers"]:
            st = LayerStats(1, torch.zeros(1), torch.zeros(1), bool(entry["fed_by_norm"]))
            if c.bias_layer(st) and bias_param(layers[entry["name"]]) is None:
                needed.add(entry["name"])
    if not needed:
        return {}
    cfg = model.config
    switches = {k: True for k, v in cfg.to_dict().items() if (k == "bias" or k.endswith("_bias")) and v is False}
    missing = sorted(needed)
    experts = [n for n in missing if isinstance(layers[n], ExpertLayer)]  # no config switch adds expert biases
    missing = [n for n in missing if n not in experts]
    if switches and missing:
        from transformers import AutoModelForCausalLM

        trial = cfg.__class__.from_dict({**cfg.to_dict(), **switches})
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(trial)
        missing = [n for n in missing if getattr(meta.get_submodule(n), "bias", None) is None]
    missing = experts + missing
    if missing:
        raise StadeError(
            f"{type(model).__name__} has no config switch that gives {missing[0]} a bias"
            + (f" (and {len(missing) - 1} more layers)" if len(missing) > 1 else "")
            + ", so STADE's bias update could not be saved in a checkpoint that plain transformers loads.",
            "pass --no-bias-update (the published code's effective behaviour) or choose a method without it",
        )
    return switches


def finish_biases(model: PreTrainedModel, switches: dict[str, bool]) -> None:
    """Set the bias switches and give every layer the switched config expects a bias (zeros where none)."""
    if not switches:
        return
    for k, v in switches.items():
        setattr(model.config, k, v)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model.config)
    for name, mod in meta.named_modules():
        if getattr(mod, "bias", None) is not None and isinstance(mod, nn.Linear):
            real = model.get_submodule(name)
            if bias_param(real) is None:
                weight = weight_param(real)
                real.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype))  # nn.Linear: (out, in)


def save_checkpoint(
    loaded: LoadedModel,
    report: PruneReport,
    stats: Statistics,
    out: Path,
    force: bool,
    device: torch.device,
    dtype: torch.dtype | None,
    command: str | None = None,
) -> dict[str, Any]:
    """Write a plain transformers checkpoint (sharded safetensors + index), tokenizer, stade.json (returned)
    and a README.md model card naming `command`, the command line that made it."""
    t0 = time.perf_counter()
    model = loaded.model
    with atomic_dir(out, force) as tmp:
        if dtype is not None and dtype != loaded.dtype:  # convert a copy: the loaded model serves the next run
            own = model.config.dtype
            model.config.dtype = dtype
            try:
                state = _converted(model.state_dict(), dtype)
                model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE, state_dict=state)
            finally:
                model.config.dtype = own
            # save_pretrained writes the dtype of the weights in memory: the config must name the saved one.
            config = read_json(tmp / "config.json", "Model config")
            config["dtype"] = str(dtype).removeprefix("torch.")
            write_json(tmp / "config.json", config)
        else:
            model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        loaded.tokenizer.save_pretrained(tmp)
        report.timings["write_s"] = round(time.perf_counter() - t0, 3)
        doc = report_dict(loaded, report, stats, device)
        doc["dtype"] = str(dtype or loaded.dtype).removeprefix("torch.")  # as saved
        write_json(tmp / REPORT_FILE, doc)
        write_card(tmp, doc, command)
    return doc


def _converted(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict in `dtype`, tied tensors (one storage) still one tensor, so that they are saved once."""
    done: dict[tuple[int, int, tuple[int, ...]], torch.Tensor] = {}
    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        key = (v.untyped_storage().data_ptr(), int(v.storage_offset()), tuple(v.shape))
        if key not in done:
            done[key] = v.to(dtype)
        out[k] = done[key]
    return out


def report_dict(loaded: LoadedModel, report: PruneReport, stats: Statistics, device: torch.device) -> dict[str, Any]:
    c = report.config
    return {
        "schema": 1,
        "kind": REPORT_KIND,
        "method": c.method,
        "stages": c.stages_dict(),
        "pattern": c.pattern,
        "sparsity": c.ratio,
        "achieved_sparsity": round(report.achieved_sparsity, 6),
        "bias_update": c.bias_update and any(r.bias_updated for r in report.layers),
        "sequential": c.sequential,
        "seed": c.seed,
        "route": report.route,
        "reconstruct": reconstruct_dict(report),
        "model": {"spec": loaded.spec, "path": loaded.path},
        "statistics": {
            "path": str(stats.path),
            "fingerprint": stats.fingerprint,
            "data": stats.manifest["data"]["source"],
            "nsamples": stats.manifest["data"]["nsamples"],
            "seqlen": stats.manifest["data"]["seqlen"],
        },
        "versions": library_versions(),
        "device": str(device),
        "timings": report.timings,
        "warnings": report.warnings,
        "weights": kind_counts([(r.name, r.shape, r.sparsity) for r in report.layers], report.routers),
        "expert_fallback": {
            "rule": f"experts reached by fewer than {MIN_EXPERT_TOKENS} calibration tokens are pruned by {FALLBACK}",
            "layers": [r.name for r in report.layers if r.fallback],
        },
        **({"block_sparsity": report.block_sparsity} if report.block_sparsity else {}),
        "layers": [r.as_dict() for r in report.layers],
    }


def reconstruct_dict(report: PruneReport) -> dict[str, Any]:
    """The reconstruction stage and its settings, with each block's held-out loss before and after."""
    c = report.config
    if c.reconstruct == "none":
        return {"method": "none"}
    from stade_cli.stages import reconstruct as r

    return {
        "method": c.reconstruct,
        "steps": c.reconstruct_steps,
        "optimizer": "adam",
        "lr": r.LR,
        "schedule": "cosine",
        "windows_per_step": r.WINDOWS_PER_STEP,
        "heldout_fraction": 1 / r.HOLDOUT,
        "loss": "sum of squared errors / sum of squared dense outputs",
        "blocks": report.reconstruction,
    }


class Snapshot:
    """The dense weights, biases and bias switches, kept so that one loaded model serves a whole sweep.

    Where the checkpoint's safetensors files hold the very same weights, the dense weights are read
    back from disk block by block instead of kept in memory: a sweep then costs no second copy of the model.
    """

    def __init__(self, model: PreTrainedModel, files: WeightFiles | None = None) -> None:
        self.model = model
        layers = {
            f"{prefix}.{local}": mod
            for _i, prefix, block in iterate_blocks(model)
            for local, mod in linear_layers(block).items()
        }
        _i, first_block, _b = next(iterate_blocks(model))
        self.files = files if files is not None and _same_on_disk(layers, first_block, files) else None
        self.linears = {
            name: (None if self.files else _copy(weight_param(mod)), _copy(bias_param(mod)))
            for name, mod in layers.items()
        }
        self.biased = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and bias_param(m) is not None}
        # Fused experts' 3-D weights (and biases): read back from the files where they are there by name.
        self.experts: dict[str, torch.Tensor | None] = {}
        for _i, prefix, block in iterate_blocks(model):
            for local, mod in fused_experts(block).items():
                for p, t in mod.named_parameters(recurse=False):
                    name = f"{prefix}.{local}.{p}"
                    on_disk = self.files is not None and name in self.files.file_of
                    self.experts[name] = None if on_disk else t.detach().clone()
        self.config = {k: v for k, v in model.config.to_dict().items() if k == "bias" or k.endswith("_bias")}

    def restore(self) -> None:
        if self.files is not None:
            for _i, prefix, block in iterate_blocks(self.model):
                layers = {f"{prefix}.{local}": mod for local, mod in linear_layers(block).items()}
                dtype = weight_param(next(iter(layers.values()))).dtype
                dense = self.files.read([f"{n}.weight" for n in layers], dtype)
                for name, mod in layers.items():
                    weight_param(mod).data.copy_(dense[f"{name}.weight"])
        for name, mod in self.model.named_modules():
            if name in self.linears:
                w, b = self.linears[name]
                if w is not None:
                    weight_param(mod).data.copy_(w)
                bias = bias_param(mod)
                if b is None:
                    mod.register_parameter("bias", None)
                elif bias is None:
                    mod.bias = nn.Parameter(b.clone())
                else:
                    bias.data.copy_(b)
            elif isinstance(mod, nn.Linear) and bias_param(mod) is not None and name not in self.biased:
                mod.register_parameter("bias", None)
        for name, dense_weight in self.experts.items():
            param = self.model.get_parameter(name)
            if dense_weight is None:
                assert self.files is not None
                dense_weight = self.files.read([name], param.dtype)[name]
            param.data.copy_(dense_weight)
        for k, v in self.config.items():
            setattr(self.model.config, k, v)


def _same_on_disk(layers: dict[str, nn.Module], first_block: str, files: WeightFiles) -> bool:
    """Whether every linear weight is in the files under its own name, and the first block's are equal there."""
    if any(f"{n}.weight" not in files.file_of for n in layers):
        return False
    first = {n: mod for n, mod in layers.items() if n.startswith(first_block + ".")}
    dense = files.read([f"{n}.weight" for n in first], weight_param(next(iter(first.values()))).dtype)
    return all(torch.equal(dense[f"{n}.weight"], weight_param(mod).detach().cpu()) for n, mod in first.items())


def _copy(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else p.detach().clone()
