"""How a one-shot `stade prune` of SmolLM2 on the CPU spends its time, and its peak memory.

Each prune runs as its own `stade prune` process (as a user runs it) on one statistics artifact; the
command's wall time is split into scoring+masking (from its stade.json) and the rest (start-up,
loading, writing). Peak RSS is the child's ru_maxrss, against the model's float32 size.

    python bench/prune.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.table import Table

from stade_cli.base.console import out

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "prune"
CALIBRATION = ROOT / "tests" / "data" / "reference-smollm2" / "calibration_ids.safetensors"
MODEL_F32_BYTES = 134_515_008 * 4  # SmolLM2-135M's parameters in float32
CASES = [("wanda", "unstructured", "0.5"), ("stade", "2:4", None), ("sparsegpt", "unstructured", "0.5")]


def stade(*args: str) -> tuple[float, int]:
    """Run one stade command in a fresh process; (wall seconds, peak RSS bytes of that process)."""
    exe = shutil.which("stade", path=str(Path(sys.executable).parent)) or "stade"
    t0 = time.perf_counter()
    child = subprocess.Popen([exe, *args], stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _pid, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not the max over all children
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"stade {' '.join(args)} failed")
    return wall, usage.ru_maxrss * 1024


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    stats = WORK / "stats"
    stade("calibrate", "smollm2-135m", "--data", str(CALIBRATION), "--hessian", "--device", "cpu", "--out", str(stats))
    rows = []
    for method, pattern, ratio in CASES:
        dest = WORK / f"{method}-{pattern.replace(':', 'of')}"
        extra = ["--sparsity", ratio] if ratio else []
        wall, rss = stade(
            "prune",
            "smollm2-135m",
            "--stats",
            str(stats),
            "--method",
            method,
            "--pattern",
            pattern,
            *extra,
            "--device",
            "cpu",
            "--out",
            str(dest),
        )
        report = json.loads((dest / "stade.json").read_text())
        rows.append(
            {
                "method": method,
                "pattern": pattern,
                "wall_s": round(wall, 2),
                "prune_s": report["timings"]["prune_s"],
                "write_s": report["timings"]["write_s"],
                "prune_fraction": round(report["timings"]["prune_s"] / wall, 3),
                "peak_rss_gib": round(rss / 2**30, 3),
                "rss_vs_f32_model": round(rss / MODEL_F32_BYTES, 2),
            }
        )
    table = Table(title="stade prune (one-shot) on SmolLM2-135M, CPU: where the command's time goes")
    for col in rows[0]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    out.print(table)
    out.print(
        "targets: scoring+masking a minority of the command (prune_fraction < 0.5); peak RSS <= 2.5x float32 model"
    )
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "prune.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
