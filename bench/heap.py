"""What bounding the heap costs in wall time: stade's glibc mmap threshold against glibc's defaults, in one run.

`base/heap.py` fixes glibc's mmap threshold so that memory freed by a block leaves the resident set. This
measures what that costs on SmolLM2 with the reference calibration ids (32 x 512): `calibrate --hessian`, and
`prune` with wanda and sparsegpt, one-shot and sequential, each as its own `stade` process (as a user runs it)
under each setting of STADE_HEAP: `glibc` (glibc's defaults), `1` (stade's default threshold, MiB) and `32`
(glibc's ceiling: SmolLM2's tensors stay in the heap). The settings alternate within each command (A, B, C, C,
B, A per repeat) and the fastest run of each is kept; the peak RSS of each is the child's own.

    .venv/bin/python bench/heap.py [--repeats 1] [--threads 2] [--settings glibc,1,32]

Writes bench/results/heap.json. Target (issue 19): every prune within 1.05x of glibc's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "heap"
RESULTS = ROOT / "bench" / "results" / "heap.json"
CALIBRATION = ROOT / "tests" / "data" / "reference-smollm2" / "calibration_ids.safetensors"
MODEL = "smollm2-135m"
TARGET = 1.05
PRUNES = {
    "wanda, one-shot": ["--method", "wanda"],
    "wanda, sequential": ["--method", "wanda", "--sequential"],
    "sparsegpt, one-shot": ["--method", "sparsegpt"],
    "sparsegpt, sequential": ["--method", "sparsegpt", "--sequential"],
}


def stade(args: list[str], setting: str, threads: int) -> dict:
    """One `stade` process under STADE_HEAP=`setting`: wall and CPU seconds, and its own peak RSS."""
    exe = shutil.which("stade", path=str(Path(sys.executable).parent)) or "stade"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STADE_HEAP": setting, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    child = subprocess.Popen([exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _pid, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"STADE_HEAP={setting} stade {' '.join(args)} failed (exit {status >> 8})")
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3)}


COMMON = ["--device", "cpu", "--force"]


def calibrate(out: Path) -> list[str]:
    return ["calibrate", MODEL, "--data", str(CALIBRATION), "--hessian", "--out", str(out), *COMMON]


def commands(stats: Path) -> dict[str, list[str]]:
    cmds = {"calibrate --hessian": calibrate(WORK / "stats-run")}
    for name, extra in PRUNES.items():
        out = WORK / name.replace(", ", "-").replace(" ", "")
        cmds[name] = ["prune", MODEL, "--stats", str(stats), "--sparsity", "0.5", *extra, "--out", str(out), *COMMON]
    return cmds


def measure(cmds: dict[str, list[str]], settings: list[str], repeats: int, threads: int) -> dict:
    rows: dict = {}
    for name, args in cmds.items():
        runs: dict[str, list[dict]] = {s: [] for s in settings}
        for _ in range(repeats):
            for setting in [*settings, *reversed(settings)]:
                runs[setting].append(stade(args, setting, threads))
        best = {s: min(r, key=lambda x: x["wall_s"]) for s, r in runs.items()}
        glibc = best["glibc"]["wall_s"]
        rows[name] = {
            "runs": runs,
            "best": best,
            "x_glibc": {s: round(b["wall_s"] / glibc, 3) for s, b in best.items()},
        }
        print(name, json.dumps(rows[name]["x_glibc"]), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1, help="alternations per command (each runs every setting twice)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", default="glibc,1,32", help="STADE_HEAP values; the first must be glibc")
    args = ap.parse_args()
    settings = args.settings.split(",")
    assert settings[0] == "glibc", "ratios are taken against glibc's defaults"
    WORK.mkdir(parents=True, exist_ok=True)
    stats = WORK / "stats"
    if not (stats / "manifest.json").exists():  # the prunes' statistics (the same bits under any setting)
        stade(calibrate(stats), "glibc", args.threads)
    rows = measure(commands(stats), settings, args.repeats, args.threads)
    worst = max(rows[name]["x_glibc"][settings[1]] for name in PRUNES)
    result = {
        "model": MODEL,
        "calibration": "tests/data/reference-smollm2/calibration_ids.safetensors (32 x 512)",
        "threads": args.threads,
        "settings": settings,
        "rows": rows,
        "target_x_glibc": TARGET,
        "worst_prune_x_glibc": worst,
        "meets_target": worst <= TARGET,
        "command": "python bench/heap.py " + " ".join(sys.argv[1:]),
        "load_average_at_end": os.getloadavg()[0],
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"worst_prune_x_glibc": worst, "meets_target": worst <= TARGET}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
