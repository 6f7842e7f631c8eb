"""SparseGPT's peak host memory on one wide layer, against the solver of an earlier commit, with identical results.

A synthetic layer as wide as Llama-3-8B's down_proj (n = 14336 inputs, 4096 rows): H = X^T X / s from
s random inputs and a random weight, written once to bench/work/sparsegpt/. Each variant (this checkout's
solver, and the one at `--against`) runs in its own process, alternating (A, B, B, A): the Hessian's
factorisation and the pruning at 50% and 2:4, each called as the obs update calls it (on a fresh copy of the
weights, which this checkout's solver prunes in place). Peak RSS is the child's VmHWM above an import-only baseline
(which holds neither H nor W), so it counts H and W as a user's process holds them (the high-water mark is reset
after they are loaded: the file's pages read at load are not the solver's); the solver's own working memory is
the peak above the resident set once they are loaded. The weights and masks of
the two variants must be identical, tensor for tensor.

    .venv/bin/python bench/sparsegpt_memory.py [--n 14336] [--rows 4096] [--against REV] [--threads 2]

Writes bench/results/sparsegpt-memory.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "sparsegpt"
RESULTS = ROOT / "bench" / "results" / "sparsegpt-memory.json"
SOLVER = "stade_cli/stages/solvers/sparsegpt.py"
PATTERNS = ("unstructured", "2:4")


def status(field: str) -> float:
    """A /proc/self/status field in GiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise KeyError(field)


def solver(variant: str) -> ModuleType:
    """This checkout's solver module, or the earlier one written out of git into bench/work."""
    if variant == "now":
        import stade_cli.stages.solvers.sparsegpt as now

        return now
    path = WORK / f"sparsegpt_{variant}.py"
    spec = importlib.util.spec_from_file_location(f"sparsegpt_{variant}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def child(variant: str, inputs: Path, threads: int) -> dict:
    """Run in a fresh process: the baseline is read before H and W are loaded."""
    from stade_cli.stages.pattern import parse_pattern

    torch.set_num_threads(threads)
    mod = solver(variant)
    baseline = status("VmRSS")
    tensors = load_file(inputs)
    h, w = tensors["hessian"].clone(), tensors["weight"].clone()  # resident, not pages of the mapped file
    del tensors
    Path("/proc/self/clear_refs").write_text(
        "5"
    )  # the peak from here: the file's pages read at load are not the solver's
    loaded = status("VmRSS")
    row: dict = {"variant": variant, "baseline_gib": round(baseline, 3), "loaded_gib": round(loaded, 3), "patterns": {}}
    peak = loaded
    for name in PATTERNS:
        Path("/proc/self/clear_refs").write_text("5")  # the solver's peak, not the previous result's saving
        t0 = time.perf_counter()
        own = {"consume": True} if variant == "now" else {}  # the earlier solver always copied its input
        res = mod.sparsegpt_prune(w.clone(), h, 0.5, parse_pattern(name), **own)  # a fresh stack, as obs gives it
        wall = time.perf_counter() - t0
        peak = max(peak, status("VmHWM"))
        save_file({"weight": res.weight, "mask": res.mask.to(torch.uint8)}, WORK / f"out-{variant}-{slug(name)}.st")
        del res
        row["patterns"][name] = {"wall_s": round(wall, 2)}
    row["peak_above_baseline_gib"] = round(peak - baseline, 3)  # H and W included, as a user's process holds them
    row["peak_above_loaded_gib"] = round(peak - loaded, 3)  # the solver's own working memory
    return row


def slug(pattern: str) -> str:
    return pattern.replace(":", "of")


def make_inputs(n: int, rows: int, samples: int) -> Path:
    """H = X^T X / s and W, seeded, written once (the children read the same bytes)."""
    path = WORK / f"layer-{n}x{rows}-{samples}.st"
    if path.exists():
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, n, generator=gen)
    x[:, : n // 64] = 0  # a few dead input channels, as real Hessians have
    h = x.T @ x / samples
    del x
    w = torch.randn(rows, n, generator=gen) / n**0.5
    save_file({"hessian": h, "weight": w}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return path


def identical(a: str, b: str) -> dict:
    out = {}
    for name in PATTERNS:
        x, y = load_file(WORK / f"out-{a}-{slug(name)}.st"), load_file(WORK / f"out-{b}-{slug(name)}.st")
        out[name] = all(torch.equal(x[k], y[k]) for k in ("weight", "mask"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--against", default="31d91e2", help="the commit whose solver is compared")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--order", default="before,now,now,before", help="the variants' runs, in order")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.inputs), args.threads)))
        return
    inputs = make_inputs(args.n, args.rows, args.samples)
    old = subprocess.run(["git", "show", f"{args.against}:{SOLVER}"], cwd=ROOT, capture_output=True, text=True)
    (WORK / "sparsegpt_before.py").write_text(old.stdout)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    runs: dict[str, list[dict]] = {"before": [], "now": []}
    for variant in args.order.split(","):
        cmd = [sys.executable, __file__, "--child", variant, "--inputs", str(inputs), "--threads", str(args.threads)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        runs[variant].append(json.loads(done.stdout.splitlines()[-1]))
        print(variant, runs[variant][-1], flush=True)
    peak = {v: min(r["peak_above_baseline_gib"] for r in rs) for v, rs in runs.items()}
    working = {v: min(r["peak_above_loaded_gib"] for r in rs) for v, rs in runs.items()}
    result = {
        "layer": {"in": args.n, "rows": args.rows, "samples": args.samples, "nxn_gib": round(args.n**2 * 4 / 2**30, 3)},
        "weight_gib": round(args.rows * args.n * 4 / 2**30, 3),
        "against": args.against,
        "threads": args.threads,
        "runs": runs,
        "peak_above_baseline_gib": peak,
        "peak_drop": round(1 - peak["now"] / peak["before"], 3),
        "working_above_loaded_gib": working,
        "working_drop": round(1 - working["now"] / working["before"], 3),
        "identical": identical("before", "now"),
        "command": "python bench/sparsegpt_memory.py " + " ".join(sys.argv[1:]),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("peak_above_baseline_gib", "peak_drop", "working_drop", "identical")}))


if __name__ == "__main__":
    main()
