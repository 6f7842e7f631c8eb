"""`stade plan` against measurement: peak host RSS and disk of calibrate and of prunes with every kind of stage, on
SmolLM2 and on the synthetic 2.6 GB Llama of bench/scale.py, each command in its own process as a user runs it (CPU).

The plan is made from the very PruneConfigs each prune runs (`--update admm`, `--allocation owl`, `--reconstruct
block`, a two-config sequential sweep). Memory is compared above the import-only baseline (the plan's `libraries`
term taken out); disk is the weight files (shards, headers and index) the plan says, against the files on disk.
Targets (issue 18): every memory estimate within 15% of the measurement, every disk figure exact.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/plan.py [--keep] [--compare-only] [--only NAME,...]

Writes bench/results/plan.json. `--compare-only` recomputes the plans against the stored measurements; `--only`
measures the named rows again (e.g. "smollm2-135m prune wanda+owl") and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's stade_cli
import scale

ROOT = scale.ROOT
WORK = ROOT / "bench" / "work" / "plan"
RESULTS = ROOT / "bench" / "results" / "plan.json"
TOLERANCE = 0.15
SPARSITY = ["--sparsity", "0.5"]
PRUNES = {  # row -> prune arguments; each is planned from the PruneConfigs it runs
    "prune wanda": ["--method", "wanda"],
    "prune sparsegpt": ["--method", "sparsegpt"],
    "prune wanda --update admm": ["--method", "wanda", "--update", "admm"],
    "prune wanda --allocation owl": ["--method", "wanda", "--allocation", "owl"],
    "prune wanda --reconstruct block": ["--method", "wanda", "--reconstruct", "block"],
    "prune wanda,sparsegpt --sequential": ["--method", "wanda,sparsegpt", "--sequential"],
}
CASES: dict[str, dict[str, Any]] = {  # model -> calibration shape and the prunes measured
    "smollm2-135m": {"nsamples": 32, "seqlen": 512, "data": "sample-wiki", "prunes": list(PRUNES)},
    "synthetic": {"nsamples": scale.NSAMPLES, "seqlen": scale.SEQLEN, "data": "ids", "prunes": ["prune wanda"]},
}


def weight_files(folder: Path) -> int:
    """Bytes of every checkpoint's weight files under `folder`: safetensors shards and their indexes."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.name.endswith((".safetensors", ".index.json")))


def commands(name: str, model: str, stats: Path, data: str) -> dict[str, list[str]]:
    case = CASES[name]
    shape = ["--nsamples", str(case["nsamples"]), "--seqlen", str(case["seqlen"]), "--device", "cpu"]
    rows = {
        "calibrate": ["-c", scale.CLI, "calibrate", model, "--data", data, *shape, "--hessian", "--out", str(stats)]
    }
    for row in case["prunes"]:
        args = ["-c", scale.CLI, "prune", model, "--stats", str(stats), *PRUNES[row], *SPARSITY, "--device", "cpu"]
        rows[row] = [*args, "--out", str(WORK / f"{name}-out")]
    return rows


def measure(only: set[str] | None, stored: dict[str, Any]) -> dict[str, Any]:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    synthetic = WORK / "synthetic"
    scale.WORK = WORK  # make_model writes its ids next to the model folder
    scale.make_model(synthetic)
    _wall, base = scale.run(["-c", scale.IMPORTS])
    measured: dict[str, Any] = {"baseline_rss_bytes": base, "models": stored.get("models", {})}
    for name in CASES:
        model = "smollm2-135m" if name == "smollm2-135m" else str(synthetic)
        data = "sample-wiki" if name == "smollm2-135m" else str(WORK / "ids.safetensors")
        stats = WORK / f"{name}-stats"
        rows = measured["models"].setdefault(name, {})
        for row, args in commands(name, model, stats, data).items():
            wanted = only is None or f"{name} {row}" in only
            if not wanted and row != "calibrate":
                continue
            wall, rss = scale.run(args)
            out = stats if row == "calibrate" else WORK / f"{name}-out"
            disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if row == "calibrate" else None
            if wanted:
                rows[row] = {"rss_above_baseline": rss - base, "disk": disk or weight_files(out), "wall_s": round(wall)}
                print(f"{name} {row}: {(rss - base) / 2**30:.3f} GiB above baseline", flush=True)
            if row != "calibrate":
                shutil.rmtree(out)
    (WORK / "synthetic-config").mkdir()
    shutil.copy(synthetic / "config.json", WORK / "synthetic-config" / "config.json")
    return measured


def plan_of(name: str, row: str) -> Any:
    from stade_cli.planning.plan import PlanConfig, make_plan
    from stade_cli.stages.config import PruneConfig

    case = CASES[name]
    spec = "smollm2-135m" if name == "smollm2-135m" else str(ROOT / "tests" / "data" / "configs" / "synthetic")
    configs: tuple[PruneConfig, ...] = ()
    if row != "calibrate":
        args = dict(zip(PRUNES[row][::2], PRUNES[row][1::2], strict=False))
        sequential = "--sequential" in PRUNES[row]
        stages = {"update": args.get("--update"), "allocation": args.get("--allocation", "uniform")}
        stages["reconstruct"] = args.get("--reconstruct", "none")
        configs = tuple(PruneConfig(m, 0.5, sequential=sequential, **stages) for m in args["--method"].split(","))
    data = "sample-wiki" if name == "smollm2-135m" else "ids.safetensors"  # as measured
    cfg = PlanConfig(case["nsamples"], case["seqlen"], hessian=True, configs=configs, timed=False, data=data)
    return make_plan(spec, cfg, torch.device("cpu"))


def compare(measured: dict) -> dict:
    from stade_cli.planning.plan import LIBRARIES

    table = []
    for name, rows in measured["models"].items():
        for row, got in rows.items():
            plan = plan_of(name, row)
            s = plan.stages["calibrate" if row == "calibrate" else "prune"]
            est_mem = s.host_bytes - LIBRARIES
            est_disk = s.disk if row == "calibrate" else sum(plan.checkpoints.values())
            table.append(
                {
                    "model": name,
                    "stage": row,
                    "memory_plan_gib": round(est_mem / 2**30, 3),
                    "memory_measured_gib": round(got["rss_above_baseline"] / 2**30, 3),
                    "memory_ratio": round(est_mem / got["rss_above_baseline"], 3),
                    "disk_plan_bytes": est_disk,
                    "disk_measured_bytes": got["disk"],
                    "disk_exact": est_disk == got["disk"],
                    "terms": s.host,
                }
            )
    mem_ok = all(abs(r["memory_ratio"] - 1) <= TOLERANCE for r in table)
    disk_ok = all(r["disk_exact"] for r in table if r["stage"] != "calibrate")
    return {"tolerance": TOLERANCE, "memory_within_tolerance": mem_ok, "prune_disk_exact": disk_ok, "table": table}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep bench/work/plan afterwards")
    parser.add_argument("--compare-only", action="store_true", help="reuse the stored measurements")
    parser.add_argument("--only", help="comma-separated rows to measure again ('MODEL STAGE'), keeping the others")
    opts = parser.parse_args()
    stored = json.loads(RESULTS.read_text())["measured"] if RESULTS.exists() else {}
    if opts.compare_only:
        measured = stored
    else:
        only = set(opts.only.split(",")) if opts.only else None
        measured = measure(only, stored if only else {})
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"measured": measured}, indent=2) + "\n")
    result = {"cpu": "2 cores; memory matters here, not time", "measured": measured, **compare(measured)}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for r in result["table"]:
        print(
            f"{r['model']:14} {r['stage']:36} memory {r['memory_plan_gib']:.3f} vs {r['memory_measured_gib']:.3f} "
            f"GiB ({r['memory_ratio']:.2f}x)  disk {r['disk_plan_bytes']} vs {r['disk_measured_bytes']}"
        )
    if not opts.keep and not opts.compare_only:
        shutil.rmtree(WORK, ignore_errors=True)
    return 0 if result["memory_within_tolerance"] and result["prune_disk_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
