"""Numbers do not move by accident: every checkpoint and the statistics are what an earlier commit wrote.

Runs the same `calibrate --hessian` and prune runs on SmolLM2 with the reference calibration ids, through the
CLI of this checkout and of an earlier commit (a temporary `git worktree`), and compares every tensor of every
pruned checkpoint with `torch.equal` (by sha256 of its bytes, dtype and shape). The runs: every preset at 50% and
2:4, one-shot and sequential; and the stage combinations `admm`, `admm --reconstruct block`, `wanda --update admm`
(50% and 2:4) and `wanda --allocation owl` (50%: OWL refuses N:M), one-shot and sequential. Equal weights give equal
perplexities, so the figures in bench/results/ still hold. The statistics artifacts are compared too: every tensor
of their safetensors files, and the manifest apart from what differs by construction (paths, timings, versions,
the schema's own fields).

    HF_HUB_OFFLINE=1 python bench/presets_exact.py [--ref ac83709] [--threads 1] [--only ref|now] [--part K/N]

Each side's digests are cached in bench/work/presets/<side>-<commit>.json (the reference side once per commit;
`--only ref` fills that cache alone). `--only now --part K/N` runs every N-th prune of the new side, so that N
processes of `--threads 1` share the cores; a later run without `--only` merges the parts (their statistics,
calibrated by each part, must agree). Writes bench/results/presets-exact.json. Checkpoints are digested then
deleted.
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
REF_COMMIT = "ac83709"  # the last commit before the layers (issue 18)
IDS = ROOT / "tests" / "data" / "reference-smollm2" / "calibration_ids.safetensors"
PRESETS = "magnitude,wanda,stade,stadew,stade_plus,random,sparsegpt"
CLI = "from stade_cli.cli import main; main()"  # the same entry point in every layout
BOTH = "unstructured,2:4"
# (label, prune arguments, patterns); each runs one-shot and sequential
RUNS: list[tuple[str, list[str], str]] = [
    ("presets", ["--method", PRESETS], BOTH),
    ("admm", ["--method", "admm"], BOTH),
    ("admm-block", ["--method", "admm", "--reconstruct", "block"], BOTH),
    ("wanda-admm", ["--method", "wanda", "--update", "admm"], BOTH),
    ("wanda-owl", ["--method", "wanda", "--allocation", "owl"], "unstructured"),
]
# manifest entries that differ between two runs by construction (and the schema version itself)
VOLATILE = {"timings", "versions", "path", "files", "schema"}


def stade(checkout: Path, threads: int, *args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(checkout)}
    env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run([sys.executable, "-c", CLI, *args], cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL)


def digests(folder: Path) -> dict[str, str]:
    """sha256 of each tensor's bytes (with dtype and shape), over the folder's safetensors files."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = f.get_tensor(name)
                h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
                out[f"{path.name}:{name}" if path.name != "model.safetensors" else name] = h.hexdigest()
    return out


def stable(obj: object) -> object:
    """A manifest without what differs by construction, for comparison. An unset field is absent: the dicts before
    the schemas wrote it as null, the schemas' records leave it out (docs/artifacts.md)."""
    if isinstance(obj, dict):
        return {k: stable(v) for k, v in obj.items() if k not in VOLATILE and v is not None}
    if isinstance(obj, list):
        return [stable(v) for v in obj]
    return obj


def jobs(part: tuple[int, int]) -> list[tuple[str, list[str], str, str]]:
    """The (label, arguments, patterns, mode) prunes of part K of N, dealt out back and forth (sequential first,
    the slower) so that the parts take about as long."""
    every = [(label, args, patterns, mode) for label, args, patterns in RUNS for mode in ("sequential", "one-shot")]
    k, n = part
    return [job for i, job in enumerate(every) if (i % n if (i // n) % 2 == 0 else n - 1 - i % n) == k - 1]


def run_version(checkout: Path, tag: str, threads: int, part: tuple[int, int]) -> dict[str, dict]:
    """{checkpoint name + mode: tensor digests} and the statistics' digests and manifest, for one checkout."""
    work = WORK / (tag if part == (1, 1) else f"{tag}-p{part[0]}of{part[1]}")
    shutil.rmtree(work, ignore_errors=True)
    stats = work / "stats"
    stade(checkout, threads, "calibrate", "smollm2-135m", "--data", str(IDS), "--hessian", "--device", "cpu",
          "--out", str(stats))  # fmt: skip
    manifest = json.loads((stats / "manifest.json").read_text())
    result: dict[str, dict] = {"statistics": {"tensors": digests(stats), "manifest": stable(manifest)}}
    for label, args, patterns, mode in jobs(part):
        out = work / f"{label}-{mode}"
        cmd = ["prune", "smollm2-135m", "--stats", str(stats), *args, "--sparsity", "0.5", "--pattern", patterns]
        cmd += ["--device", "cpu", "--out", str(out), *(["--sequential"] if mode == "sequential" else [])]
        stade(checkout, threads, *cmd)
        subs = sorted(p for p in out.iterdir() if p.is_dir()) or [out]
        for sub in subs:
            result[f"{label}: {sub.name} {mode}"] = {"tensors": digests(sub)}
            print(f"{tag}: {label}: {sub.name} {mode}", flush=True)
        shutil.rmtree(out)
    return result


def cached_parts(tag: str, commit: str, threads: int) -> dict[str, dict] | None:
    """The parts of an earlier `--part K/N` run merged, when all N are there; their statistics must agree."""
    for n in range(2, 17):
        paths = [WORK / f"{tag}-{commit}-t{threads}-part{k}of{n}.json" for k in range(1, n + 1)]
        if not all(p.exists() for p in paths):
            continue
        parts = [json.loads(p.read_text()) for p in paths]
        if any(p["statistics"] != parts[0]["statistics"] for p in parts):
            raise SystemExit(f"the parts of {tag}-{commit} calibrated different statistics: rerun them")
        return {k: v for p in parts for k, v in p.items()}
    return None


def side(checkout: Path, tag: str, commit: str, threads: int, cache: bool, part: tuple[int, int]) -> dict[str, dict]:
    suffix = "" if part == (1, 1) else f"-part{part[0]}of{part[1]}"
    path = WORK / f"{tag}-{commit}-t{threads}{suffix}.json"
    if cache and path.exists():
        return json.loads(path.read_text())
    if cache and part == (1, 1) and (merged := cached_parts(tag, commit, threads)) is not None:
        return merged
    result = run_version(checkout, tag, threads, part)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def part_of(text: str) -> tuple[int, int]:
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise argparse.ArgumentTypeError(f"--part {text!r}: write K/N with 1 <= K <= N, e.g. 1/2")
    return int(k), int(n)


def compare_manifests(ref: dict, now: dict) -> dict[str, list[str]]:
    """Fields that differ, and fields only the newer manifest has (a newer schema's own: allowed)."""
    differ = sorted(k for k in set(ref) | set(now) if k in ref and ref.get(k) != now.get(k))
    return {"differing": differ, "new_fields": sorted(set(now) - set(ref))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default=REF_COMMIT, help="the earlier commit to compare with")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (same for both: sums depend on them)")
    ap.add_argument("--only", choices=("ref", "now"), help="run one side only (fills its cache)")
    ap.add_argument("--now", type=Path, default=ROOT, help="the checkout of the new side (default: this one)")
    ap.add_argument("--part", type=part_of, default=(1, 1), help="K/N: every N-th prune of the new side (--only now)")
    opts = ap.parse_args()
    if opts.part != (1, 1) and opts.only != "now":
        ap.error("--part runs a share of the new side: add --only now, then merge with a run without --only")
    WORK.mkdir(parents=True, exist_ok=True)
    git = ["git", "rev-parse", "--short"]
    ref_id = subprocess.run([*git, opts.ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    now_id = subprocess.run([*git, "HEAD"], cwd=opts.now, capture_output=True, text=True, check=True).stdout.strip()
    ref: dict[str, dict] = {}
    if opts.only != "now":
        ref_tree = WORK / "ref-checkout"
        cached = (WORK / f"ref-{ref_id}-t{opts.threads}.json").exists()
        if not cached:
            if ref_tree.exists():
                subprocess.run(["git", "worktree", "remove", "--force", str(ref_tree)], cwd=ROOT, check=True)
            subprocess.run(["git", "worktree", "add", "--detach", str(ref_tree), opts.ref], cwd=ROOT, check=True)
        try:
            ref = side(ref_tree, "ref", ref_id, opts.threads, cache=True, part=(1, 1))
        finally:
            if not cached:
                subprocess.run(["git", "worktree", "remove", "--force", str(ref_tree)], cwd=ROOT, check=False)
    if opts.only == "ref":
        return 0
    now = side(opts.now, "now", now_id, opts.threads, cache=opts.only is None, part=opts.part)  # reuse --only now
    if opts.only == "now":
        return 0
    rows = []
    for key in sorted(set(ref) | set(now)):
        a, b = ref.get(key, {}).get("tensors", {}), now.get(key, {}).get("tensors", {})
        same = bool(a) and a == b
        differ = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
        row = {"checkpoint": key, "tensors": len(b), "identical": same, "differing": differ[:5]}
        if key == "statistics":
            row["manifest"] = compare_manifests(stable(ref[key]["manifest"]), stable(now[key]["manifest"]))
            row["identical"] = same and not row["manifest"]["differing"]
        rows.append(row)
        print(f"{key:60s} {len(b):4d} tensors  {'identical' if row['identical'] else 'DIFFERENT: ' + str(differ[:3])}")
    doc = {
        "ref": opts.ref,
        "now": now_id,
        "threads": opts.threads,
        "checkpoints": len(rows) - 1,
        "all_identical": all(r["identical"] for r in rows),
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if doc["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
