"""Bounded memory at scale: peak host RAM of calibrate, prune and eval on a synthetic 2.6 GB Llama (float32).

A random-weight Llama (hidden 2048, 12 blocks, vocab 8192) is written as sharded safetensors into
bench/work/scale/ (git-ignored), one block at a time, so this script itself never holds the model. Each
stage then runs as its own process, as a user runs it, and its peak RSS (the child's own VmHWM, written at
exit) is taken above a baseline process that only imports the interpreter and libraries. Targets (issue 11):
calibrate and streaming prune each <= 0.25x the model's bytes, eval with --max-memory at half the model <= 0.6x;
the in-memory prune is measured for contrast, and the streamed and in-memory checkpoints are compared
byte for byte.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/scale.py [--keep] [--only-eval] [--moe]

Writes bench/results/scale.json (--moe: a synthetic 1.4 GB Mixtral under per-expert names, as published, calibrated
and pruned streaming, peak RSS above baseline <= 0.3x its bytes, in bench/results/scale_moe.json). Memory is what
matters here; wall times are reported but the machine may be shared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "scale"
RESULTS = ROOT / "bench" / "results" / "scale.json"
TARGET = 0.25
EVAL_TARGET = 0.6  # eval with --max-memory at half the model
CONFIG = dict(
    vocab_size=8192,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
# --moe: a synthetic Mixtral (1.4 GB float32, 8 experts of 1024 x 1024 per block) under per-expert names, as the hub
# publishes MoE checkpoints: calibrate and streaming prune stack each block's experts as it is read (issue 22).
MOE_TARGET = 0.3
MOE_RESULTS = ROOT / "bench" / "results" / "scale_moe.json"
MOE_CONFIG = dict(
    vocab_size=8192,
    hidden_size=1024,
    intermediate_size=1024,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
NSAMPLES, SEQLEN = 8, 128
IMPORTS = (
    "import torch, transformers, safetensors, accelerate, stade_cli.cli; from transformers import LlamaForCausalLM"
)
CLI = "from stade_cli.cli import main; main()"
IN_MEMORY = """
import sys, torch
from stade_cli.models.loading import load_model
from stade_cli.driver.sweep import prune_checkpoints
from stade_cli.stages.config import PruneConfig
from stade_cli.stats.artifact import Statistics
model, stats, out = sys.argv[1:4]
loaded = load_model(model, "auto", "cpu")
stats = Statistics.load(stats)
prune_checkpoints(loaded, stats, [PruneConfig("wanda", 0.5)], out, torch.device("cpu"), save_pretrained=True)
"""


def block_names(model: torch.nn.Module, moe: bool) -> dict[str, list[tuple[str, torch.Size]]]:
    """Each shard's tensors (one shard per block, one for the rest): the model's own names, or (`moe`) the names
    save_pretrained writes, per-expert as on the hub, which transformers' own revert gives block by block."""
    from transformers.core_model_loading import revert_weight_conversion

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in model.state_dict().items():
        parts = name.split(".")
        key = f"layers.{parts[2]}" if name.startswith("model.layers.") else "outside"
        groups.setdefault(key, {})[name] = t
    if moe:  # the model has no recorded conversions, so the revert is the default one (as save_pretrained's)
        groups = {k: revert_weight_conversion(model, g) for k, g in groups.items()}
    return {k: [(n, t.shape) for n, t in g.items()] for k, g in groups.items()}


def make_model(folder: Path, moe: bool = False) -> int:
    """Write the random Llama (`moe`: Mixtral, per-expert names) block by block (one shard per block); returns the
    weights' bytes."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_tokenizer

    folder.mkdir(parents=True)
    config = MixtralConfig(**MOE_CONFIG) if moe else LlamaConfig(**CONFIG)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    groups = block_names(model, moe)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, (_key, members) in enumerate(groups.items()):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name, shape in members:
            shard[name] = torch.ones(shape) if "norm" in name else torch.randn(shape, generator=g) * 0.02
            weight_map[name] = fname
            total += shard[name].numel() * 4
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    ids = torch.randint(0, config.vocab_size, (NSAMPLES, SEQLEN), generator=g)
    save_file({"input_ids": ids}, str(folder.parent / "ids.safetensors"))
    held_out = torch.randint(0, config.vocab_size, (1, 4 * SEQLEN), generator=g)
    save_file({"input_ids": held_out}, str(folder.parent / "eval_ids.safetensors"))
    return total


# The child's own high-water mark, written at exit: ru_maxrss from wait4 would not do, since on Linux a child's
# maxrss starts from its parent's resident set at fork (it survives exec), and this process has written a model.
HWM = (
    "import atexit, os; atexit.register(lambda: open(os.environ['STADE_HWM'], 'w').write("
    "next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))));"
)


def run(args: list[str]) -> tuple[float, int]:
    """One fresh process (`args` = ['-c', code, ...]): (wall seconds, its own peak RSS in bytes, from VmHWM)."""
    hwm = WORK / "hwm.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "STADE_HWM": str(hwm)}
    t0 = time.perf_counter()
    code = subprocess.call(
        [sys.executable, "-c", HWM + args[1], *args[2:]], cwd=ROOT, env=env, stdout=subprocess.DEVNULL
    )
    if code != 0:
        raise SystemExit(f"failed: {' '.join(args[2:5])}")
    return time.perf_counter() - t0, int(hwm.read_text()) * 1024


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.suffix == ".safetensors" or p.name.endswith("index.json")
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep bench/work/scale afterwards")
    parser.add_argument("--only-eval", action="store_true", help="measure only eval, added to the results file")
    parser.add_argument("--moe", action="store_true", help="the MoE row: a per-expert-named Mixtral")
    opts = parser.parse_args()
    if opts.moe:
        return moe_main(opts.keep)
    shutil.rmtree(WORK, ignore_errors=True)
    model = WORK / "model"
    size = make_model(model)
    ids, stats = WORK / "ids.safetensors", WORK / "stats"
    cpu = ["--device", "cpu"]
    prune = ["-c", CLI, "prune", str(model), "--stats", str(stats), "--sparsity", "0.5", *cpu]
    calibrate = ["-c", CLI, "calibrate", str(model), "--data", str(ids), "--hessian", *cpu]
    evaluate = ["-c", CLI, "eval", str(model), "--ppl", str(WORK / "eval_ids.safetensors"), "--tasks", "none"]
    evaluate += ["--seqlen", str(SEQLEN), "--batch-size", "2", "--max-memory", f"cpu={size // 2}B"]
    stages = {
        "baseline": ["-c", IMPORTS],
        "calibrate --hessian": [*calibrate, "--out", str(stats)],
        "prune (streaming)": [*prune, "--method", "wanda", "--out", str(WORK / "streamed")],
        "prune sweep of 2 (streaming)": [*prune, "--method", "wanda,magnitude", "--out", str(WORK / "sweep")],
        "prune (in-memory)": ["-c", IN_MEMORY, str(model), str(stats), str(WORK / "in-memory")],
        "eval --max-memory cpu=half": [*evaluate, "--out", str(WORK / "results.json")],
    }
    if opts.only_eval:
        stages = {k: v for k, v in stages.items() if k in ("baseline", "eval --max-memory cpu=half")}
    rows = measure(stages, size)
    if opts.only_eval:  # add the eval figure to the last full run's results
        result = json.loads(RESULTS.read_text())
        result["stages"]["eval --max-memory cpu=half"] = rows["eval --max-memory cpu=half"]
        result["stages"]["eval --max-memory cpu=half"]["baseline_gib"] = rows["baseline"]["peak_rss_gib"]
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        if not opts.keep:
            shutil.rmtree(WORK, ignore_errors=True)
        return 0
    same = digest(WORK / "streamed") == digest(WORK / "in-memory")
    result = {
        "model": {**CONFIG, "float32_bytes": size, "gib": round(size / 2**30, 3)},
        "calibration": {"nsamples": NSAMPLES, "seqlen": SEQLEN, "hessian": True},
        "target_x_model_bytes": TARGET,
        "stages": rows,
        "streamed_equals_in_memory": same,
        "meets_target": all(rows[s]["x_model_bytes"] <= TARGET for s in ("calibrate --hessian", "prune (streaming)"))
        and rows["eval --max-memory cpu=half"]["x_model_bytes"] <= EVAL_TARGET,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not opts.keep:
        shutil.rmtree(WORK, ignore_errors=True)
    return 0 if result["meets_target"] and same else 1


def stored_names(folder: Path) -> set[str]:
    """The tensor names a checkpoint folder's safetensors files hold."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            names.update(fh.keys())
    return names


def measure(stages: dict[str, list[str]], size: int) -> dict[str, dict[str, float]]:
    """Each stage's wall time and peak RSS, and above the baseline's (the first stage), in bytes and x `size`."""
    rows = {}
    for name, args in stages.items():
        wall, rss = run(args)
        rows[name] = {"wall_s": round(wall, 1), "peak_rss_gib": round(rss / 2**30, 3)}
        print(f"{name}: {rss / 2**30:.2f} GiB peak RSS, {wall:.0f} s", flush=True)
    base = rows["baseline"]["peak_rss_gib"] * 2**30
    for name, row in rows.items():
        if name != "baseline":
            above = row["peak_rss_gib"] * 2**30 - base
            row["above_baseline_gib"] = round(above / 2**30, 3)
            row["x_model_bytes"] = round(above / size, 3)
    return rows


def moe_main(keep: bool) -> int:
    """The MoE row: calibrate and streaming prune of a per-expert-named Mixtral, against the in-memory prune."""
    shutil.rmtree(WORK, ignore_errors=True)
    model = WORK / "model"
    size = make_model(model, moe=True)
    ids, stats = WORK / "ids.safetensors", WORK / "stats"
    cpu = ["--device", "cpu"]
    prune = ["-c", CLI, "prune", str(model), "--stats", str(stats), "--sparsity", "0.5", *cpu]
    calibrate = ["-c", CLI, "calibrate", str(model), "--data", str(ids), "--hessian", *cpu]
    stages = {
        "baseline": ["-c", IMPORTS],
        "calibrate --hessian": [*calibrate, "--out", str(stats)],
        "prune (streaming)": [*prune, "--method", "wanda", "--out", str(WORK / "streamed")],
        "prune (in-memory)": ["-c", IN_MEMORY, str(model), str(stats), str(WORK / "in-memory")],
    }
    rows = measure(stages, size)
    route = json.loads((WORK / "streamed" / "stade.json").read_text())["route"]
    names = [stored_names(f) for f in (WORK / "streamed", model)]
    result = {
        "model": {**MOE_CONFIG, "float32_bytes": size, "gib": round(size / 2**30, 3), "names": "per-expert"},
        "calibration": {"nsamples": NSAMPLES, "seqlen": SEQLEN, "hessian": True},
        "target_x_model_bytes": MOE_TARGET,
        "stages": rows,
        "route": route,
        "input_names_kept": names[0] == names[1],
        "streamed_equals_in_memory": digest(WORK / "streamed") == digest(WORK / "in-memory"),
        "meets_target": all(
            rows[s]["x_model_bytes"] <= MOE_TARGET for s in ("calibrate --hessian", "prune (streaming)")
        ),
    }
    MOE_RESULTS.parent.mkdir(parents=True, exist_ok=True)
    MOE_RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not keep:
        shutil.rmtree(WORK, ignore_errors=True)
    ok = result["meets_target"] and result["streamed_equals_in_memory"] and result["input_names_kept"]
    return 0 if ok and route == "streaming" else 1


if __name__ == "__main__":
    sys.exit(main())
