"""The `--method` presets are bit for bit what they were before pruning became composable stages (issue 13).

Runs the same `calibrate --hessian` and prune sweeps (every preset, 50% and 2:4, one-shot and sequential) on
SmolLM2 with the reference calibration ids, through the CLI of this checkout and of an earlier commit (a
temporary `git worktree`), and compares every tensor of every pruned checkpoint with `torch.equal`. Equal
weights give equal perplexities, so the presets' figures in bench/results/reproduce.md still hold.

    HF_HUB_OFFLINE=1 python bench/presets_exact.py [--ref 7ea45e7] [--threads 1]

Writes bench/results/presets-exact.json. Checkpoints are digested then deleted (about 8 GB per sweep).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "presets"
RESULTS = ROOT / "bench" / "results" / "presets-exact.json"
REF_COMMIT = "7ea45e7"  # the last commit of main before the stages (0ee0ccd)
IDS = ROOT / "tests" / "data" / "reference-smollm2" / "calibration_ids.safetensors"
PRESETS = "magnitude,wanda,stade,stadew,stade_plus,random,sparsegpt"
CLI = "from stade_cli.cli import main; main()"


def stade(checkout: Path, threads: int, *args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(checkout)}
    env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run([sys.executable, "-c", CLI, *args], cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL)


def digests(folder: Path) -> dict[str, str]:
    """sha256 of each tensor's bytes (with dtype and shape), over the checkpoint's safetensors files."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = f.get_tensor(name)
                h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
                out[name] = h.hexdigest()
    return out


def run_version(checkout: Path, tag: str, threads: int) -> dict[str, dict[str, str]]:
    """{sweep folder name + mode: tensor digests} for one checkout."""
    work = WORK / tag
    shutil.rmtree(work, ignore_errors=True)
    stats = work / "stats"
    stade(checkout, threads, "calibrate", "smollm2-135m", "--data", str(IDS), "--hessian", "--device", "cpu",
          "--out", str(stats))  # fmt: skip
    result: dict[str, dict[str, str]] = {}
    for mode in ("one-shot", "sequential"):
        out = work / mode
        args = ["prune", "smollm2-135m", "--stats", str(stats), "--method", PRESETS, "--sparsity", "0.5"]
        args += ["--pattern", "unstructured,2:4", "--device", "cpu", "--out", str(out)]
        stade(checkout, threads, *args, *(["--sequential"] if mode == "sequential" else []))
        for sub in sorted(p for p in out.iterdir() if p.is_dir()):
            result[f"{sub.name} {mode}"] = digests(sub)
            print(f"{tag}: {sub.name} {mode}", flush=True)
        shutil.rmtree(out)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default=REF_COMMIT, help="the earlier commit to compare with")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (same for both: sums depend on them)")
    opts = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    ref_tree = WORK / "ref-checkout"
    if ref_tree.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(ref_tree)], cwd=ROOT, check=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(ref_tree), opts.ref], cwd=ROOT, check=True)
    try:
        ref = run_version(ref_tree, "ref", opts.threads)
        now = run_version(ROOT, "now", opts.threads)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(ref_tree)], cwd=ROOT, check=False)
    rows = []
    for key in sorted(set(ref) | set(now)):
        a, b = ref.get(key, {}), now.get(key, {})
        same = bool(a) and a == b
        differ = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
        rows.append({"checkpoint": key, "tensors": len(b), "identical": same, "differing": differ[:5]})
        print(f"{key:45s} {len(b):4d} tensors  {'identical' if same else 'DIFFERENT: ' + ', '.join(differ[:3])}")
    doc = {"ref": opts.ref, "threads": opts.threads, "all_identical": all(r["identical"] for r in rows), "rows": rows}
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if doc["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
