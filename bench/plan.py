"""`stade plan` against measurement: peak host RSS and disk of calibrate and prune, on SmolLM2 and on the
synthetic 2.6 GB Llama of bench/scale.py, each stage in its own process as a user runs it (CPU).

Memory is compared above the import-only baseline (the plan's `libraries` term taken out); disk is the
artifact's and the checkpoint's files. Target (issue 11): every estimate within 25% of the measurement.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/plan.py [--keep] [--compare-only]

Writes bench/results/plan.json. `--compare-only` recomputes the plans against the stored measurements.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's stade_cli
import scale

ROOT = scale.ROOT
WORK = ROOT / "bench" / "work" / "plan"
RESULTS = ROOT / "bench" / "results" / "plan.json"
TOLERANCE = 0.25
CASES = {  # model -> calibration shape and the prune methods measured
    "smollm2-135m": {"nsamples": 32, "seqlen": 512, "methods": ["wanda", "sparsegpt"]},
    "synthetic": {"nsamples": scale.NSAMPLES, "seqlen": scale.SEQLEN, "methods": ["wanda"]},
}


def folder_bytes(folder: Path, suffix: str = "") -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name.endswith(suffix))


def measure() -> dict:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    synthetic = WORK / "synthetic"
    scale.WORK = WORK  # make_model writes its ids next to the model folder
    scale.make_model(synthetic)
    cpu = ["--device", "cpu"]
    _wall, base = scale.run(["-c", scale.IMPORTS])
    rows: dict = {"baseline_rss_bytes": base, "models": {}}
    for name, case in CASES.items():
        model = "smollm2-135m" if name == "smollm2-135m" else str(synthetic)
        stats = WORK / f"{name}-stats"
        data = ["--data", "sample-wiki"] if name == "smollm2-135m" else ["--data", str(WORK / "ids.safetensors")]
        shape = ["--nsamples", str(case["nsamples"]), "--seqlen", str(case["seqlen"])]
        cal = ["-c", scale.CLI, "calibrate", model, *data, *shape, "--hessian", *cpu, "--out", str(stats)]
        wall, rss = scale.run(cal)
        row = {"calibrate": {"rss_above_baseline": rss - base, "disk": folder_bytes(stats), "wall_s": round(wall)}}
        print(f"{name} calibrate: {(rss - base) / 2**30:.3f} GiB above baseline", flush=True)
        for method in case["methods"]:
            out = WORK / f"{name}-{method}"
            args = ["-c", scale.CLI, "prune", model, "--stats", str(stats), "--method", method, "--sparsity", "0.5"]
            wall, rss = scale.run([*args, *cpu, "--out", str(out)])
            row[f"prune {method}"] = {
                "rss_above_baseline": rss - base,
                "disk": folder_bytes(out, ".safetensors"),
                "wall_s": round(wall),
            }
            print(f"{name} prune {method}: {(rss - base) / 2**30:.3f} GiB above baseline", flush=True)
            shutil.rmtree(out)
        rows["models"][name] = row
    (WORK / "synthetic-config").mkdir()
    shutil.copy(synthetic / "config.json", WORK / "synthetic-config" / "config.json")
    return rows


def compare(measured: dict) -> dict:
    from stade_cli.planning.plan import LIBRARIES, PlanConfig, make_plan

    table = []
    for name, case in CASES.items():
        spec = "smollm2-135m" if name == "smollm2-135m" else str(ROOT / "tests" / "data" / "configs" / "synthetic")
        for stage, got in measured["models"][name].items():
            method = stage.split()[1] if stage.startswith("prune") else "wanda"
            data = "sample-wiki" if name == "smollm2-135m" else "ids.safetensors"  # as measured
            cfg = PlanConfig(case["nsamples"], case["seqlen"], hessian=True, methods=(method,), timed=False, data=data)
            plan = make_plan(spec, cfg, torch.device("cpu"))
            s = plan.stages[stage.split()[0]]
            est_mem = s.host_bytes - LIBRARIES
            est_disk = s.disk if stage == "calibrate" else plan.checkpoint_bytes
            table.append(
                {
                    "model": name,
                    "stage": stage,
                    "memory_plan_gib": round(est_mem / 2**30, 3),
                    "memory_measured_gib": round(got["rss_above_baseline"] / 2**30, 3),
                    "memory_ratio": round(est_mem / got["rss_above_baseline"], 3),
                    "disk_plan_gb": round(est_disk / 1e9, 4),
                    "disk_measured_gb": round(got["disk"] / 1e9, 4),
                    "disk_ratio": round(est_disk / got["disk"], 4),
                }
            )
    ok = all(abs(r["memory_ratio"] - 1) <= TOLERANCE and abs(r["disk_ratio"] - 1) <= TOLERANCE for r in table)
    return {"tolerance": TOLERANCE, "within_tolerance": ok, "table": table}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep bench/work/plan afterwards")
    parser.add_argument("--compare-only", action="store_true", help="reuse the stored measurements")
    opts = parser.parse_args()
    if opts.compare_only:
        measured = json.loads(RESULTS.read_text())["measured"]
    else:
        measured = measure()
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"measured": measured}, indent=2) + "\n")
    result = {
        "cpu": "shared, loaded machine (memory matters here, not time)",
        "measured": measured,
        **compare(measured),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for r in result["table"]:
        print(
            f"{r['model']:14} {r['stage']:16} memory {r['memory_plan_gib']:.3f} vs {r['memory_measured_gib']:.3f} GiB "
            f"({r['memory_ratio']:.2f}x)  disk {r['disk_plan_gb']:.3f} vs {r['disk_measured_gb']:.3f} GB "
            f"({r['disk_ratio']:.3f}x)"
        )
    if not opts.keep and not opts.compare_only:
        shutil.rmtree(WORK, ignore_errors=True)
    return 0 if result["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
