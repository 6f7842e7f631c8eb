"""Calibration in 1 process and in 2 processes under torchrun (gloo, CPU) on SmolLM2-135M, 32 x 512 tokens.

Runs `stade calibrate --hessian` on the reference calibration ids once as one process (OMP_NUM_THREADS=2)
and once as `torchrun --nproc-per-node 2` (OMP_NUM_THREADS=1 per rank, so both use the machine's two
cores), reports both wall times and their ratio, the time rank 0 spent in the collectives that merge the
statistics (and waiting for the other rank), and how far the two artifacts are apart (they must agree to
1e-6 relative, with the same token ids). Writes bench/results/distributed.json.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/distributed.py [--repeats 2]

With repeats, the runs alternate (1, 2, 2, 1, ...) and the fastest of each is kept, so that a load that
comes and goes on a shared machine weighs on both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
IDS = ROOT / "tests" / "data" / "reference-smollm2" / "calibration_ids.safetensors"
RESULTS = ROOT / "bench" / "results" / "distributed.json"


def calibrate(nproc: int, out: Path) -> float:
    """Wall seconds of one `stade calibrate` run, start of the process(es) included."""
    args = ["calibrate", "smollm2-135m", "--data", str(IDS), "--hessian", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(2 // nproc), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "stade_cli", *args]
    if nproc > 1:
        run = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port=29655"]
        cmd = [*run, "-m", "stade_cli", *args]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return wall


def max_rel_diff(a: object, b: object) -> dict[str, float]:
    """Largest difference over all layers, relative to each tensor's largest entry."""
    worst = {"mean": 0.0, "var": 0.0, "hessian": 0.0}
    for name in a.layers:  # type: ignore[attr-defined]
        x, y = a.layer(name, hessian=True), b.layer(name, hessian=True)  # type: ignore[attr-defined]
        for what in worst:
            p, q = getattr(x, what).double(), getattr(y, what).double()
            worst[what] = max(worst[what], float((p - q).abs().max() / q.abs().max()))
    return worst


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from stade_cli.stats.artifact import Statistics

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    repeats = parser.parse_args().repeats
    order = [n for r in range(repeats) for n in ((1, 2) if r % 2 == 0 else (2, 1))]
    all_walls: dict[int, list[float]] = {1: [], 2: []}
    timings: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for k, n in enumerate(order):
            out = Path(tmp) / f"p{n}-{k}"
            all_walls[n].append(calibrate(n, out))
            timings[n].append(Statistics.load(out).manifest.timings)
        one = Statistics.load(Path(tmp) / f"p1-{order.index(1)}")
        two = Statistics.load(Path(tmp) / f"p2-{order.index(2)}")
        diff = max_rel_diff(two, one)
        same_ids = bool(torch.equal(one.token_ids(), two.token_ids()))
    walls = {n: min(w) for n, w in all_walls.items()}
    t1 = min(timings[1], key=lambda t: t["calibrate_s"])
    t2 = min(timings[2], key=lambda t: t["calibrate_s"])
    result = {
        "model": "smollm2-135m",
        "tokens": "32 x 512 (tests/data/reference-smollm2/calibration_ids.safetensors)",
        "statistics": "mean, m2 and Hessians (--hessian)",
        "machine": f"{os.cpu_count()} CPU cores, shared with other jobs (timings are indicative; the ratio is "
        "measured within one run)",
        "runs": {"1 process": [round(w, 2) for w in all_walls[1]], "2 processes": [round(w, 2) for w in all_walls[2]]},
        "wall_s": {"1 process": round(walls[1], 2), "2 processes (torchrun, gloo)": round(walls[2], 2)},
        "speedup_2_over_1": round(walls[1] / walls[2], 3),
        "calibrate_s": {"1 process": t1["calibrate_s"], "2 processes": t2["calibrate_s"]},
        "collectives_s": t2["collectives_s"],
        "collectives_share_of_calibrate": round(t2["collectives_s"] / t2["calibrate_s"], 4),
        "wait_for_slowest_rank_s": t2["wait_s"],
        "max_relative_difference": diff,
        "same_token_ids": same_ids,
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python bench/distributed.py",
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not same_ids or max(diff.values()) > 1e-6:
        sys.exit("the 2-process artifact differs from the 1-process one by more than 1e-6")


if __name__ == "__main__":
    main()
