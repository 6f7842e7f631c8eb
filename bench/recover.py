"""What `stade finetune` recovers on SmolLM2-135M: held-out perplexity against training tokens, full and LoRA.

The built-in SmolLM2 is calibrated on the reference calibration ids (with Hessians) and pruned with ADMM, block
reconstruction and sequential inputs at 2:4 and at 50%; each pruned checkpoint is distilled from the dense model on
Wikipedia windows (the offline `sample-wiki`, another text than the news the calibration windows come from), in full
mode and with masked LoRA adapters. Every model (dense, pruned, fine-tuned) is evaluated on the reference held-out
news ids (147 windows of 512), on the fine-tuning's own held-out Wikipedia windows (the same windows as its curve)
and on the `stade_cloze` task. Each command is its own `stade` process, as a user runs it: its wall time, and its
peak RSS (its own rusage, os.wait4) above an import-only process's. Writes bench/results/recover.{json,md,png}
(`--quick`: recover-quick.*).

    .venv/bin/python bench/recover.py [--tokens 1000000] [--lora 16] [--threads 2]
    .venv/bin/python bench/recover.py --quick      # a smoke run: a tiny budget and few evaluation windows

Target (issue 20): fine-tuning recovers a good part of the held-out perplexity pruning lost, in both modes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "tests" / "data" / "reference-smollm2"
RESULTS = ROOT / "bench" / "results"
MODEL = "smollm2-135m"
SEQLEN = 512
PATTERNS = {"2:4": ["--pattern", "2:4"], "50%": ["--sparsity", "0.5"]}
PRUNE = ["--method", "admm", "--reconstruct", "block", "--sequential"]


@dataclass
class Settings:
    tokens: int = 1_000_000  # training tokens per fine-tuning run
    batch: int = 4  # windows per forward pass
    accum: int = 2  # forward passes per step
    lora: int = 16
    lr_full: float = 5e-5
    lr_lora: float = 5e-4
    warmup: int = 10
    heldout: int = 32  # held-out Wikipedia windows (the curve's, and evaluated)
    eval_every: int = 25
    news_windows: int = 147
    cloze_limit: int | None = None
    nsamples: int | None = None  # calibration windows of the reference ids (None: all 32)
    prune_extra: list[str] = field(default_factory=list)
    threads: int = 2

    @classmethod
    def quick(cls, threads: int) -> Settings:
        return cls(tokens=2 * SEQLEN, batch=1, accum=1, warmup=0, heldout=2, eval_every=2, news_windows=2,
                   cloze_limit=10, nsamples=4, prune_extra=["--admm-iters", "2", "--admm-mask-iters", "1",
                   "--reconstruct-steps", "1"], threads=threads)  # fmt: skip


def run(args: list[str], threads: int, python: bool = False) -> tuple[dict, str]:
    """`stade ARGS` (or `python ARGS`) in its own process: wall seconds, its own peak RSS, and its stdout."""
    import tempfile

    cmd = [sys.executable, *args] if python else [sys.executable, "-m", "stade_cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = str(ROOT)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        _pid, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - t0
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 2**10, 1)}, stdout


WIKI = """
import sys
from safetensors.torch import save_file
from transformers import AutoTokenizer
from stade_cli.data.sources import documents
from stade_cli.data.splits import text_split
from stade_cli.models.loading import resolve_model
tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
split = text_split(documents("sample-wiki", "train", None), tokenizer, int(sys.argv[2]), int(sys.argv[3]), 0, None)
save_file({"input_ids": split.heldout.reshape(1, -1).contiguous()}, sys.argv[1])
"""


def wiki_heldout(work: Path, s: Settings) -> Path:
    """The fine-tuning's held-out Wikipedia windows (its own split: the same seed, count and length), as ids [1, N],
    made in a child process: this one stays free of imports, since a child's ru_maxrss starts from its parent's."""
    path = work / f"wiki-heldout-{s.heldout}.safetensors"
    if not path.exists():
        run(["-c", WIKI, str(path), str(SEQLEN), str(s.heldout)], s.threads, python=True)
    return path


def calibration_ids(work: Path, nsamples: int | None) -> Path:
    """The reference calibration ids, or their first `nsamples` windows (a token-id file is taken whole)."""
    from safetensors.torch import load_file, save_file

    if nsamples is None:
        return REF / "calibration_ids.safetensors"
    path = work / f"calibration-{nsamples}.safetensors"
    ids = load_file(str(REF / "calibration_ids.safetensors"))
    save_file({k: v[:nsamples].contiguous() for k, v in ids.items()}, str(path))
    return path


def prepare(work: Path, s: Settings, times: dict) -> dict[str, Path]:
    """The statistics and the two pruned checkpoints (kept in `work` between runs of the same settings, with the
    times they took)."""
    kept = work / "preparation.json"
    times.update(json.loads(kept.read_text()) if kept.exists() else {})
    stats = work / "stats"
    if not (stats / "manifest.json").exists():
        ids = ["--data", str(calibration_ids(work, s.nsamples)), "--hessian"]
        times["calibrate"], _ = run(["calibrate", MODEL, *ids, "--device", "cpu", "--out", str(stats), "--force"],
                                    s.threads)  # fmt: skip
    pruned = {}
    for name, pattern in PATTERNS.items():
        out = work / f"pruned-{name.replace(':', 'of').replace('%', '')}"
        if not (out / "stade.json").exists():
            args = ["prune", MODEL, "--stats", str(stats), *PRUNE, *pattern, *s.prune_extra, "--device", "cpu"]
            times[f"prune {name}"], _ = run([*args, "--out", str(out), "--force"], s.threads)
        kept.write_text(json.dumps(times, indent=2) + "\n")
        pruned[name] = out
    return pruned


def finetune(pruned: Path, out: Path, mode: str, s: Settings) -> dict:
    """One fine-tuning run: its process's wall time and peak RSS, and its summary (the curve, the timings)."""
    lr = s.lr_lora if mode == "lora" else s.lr_full
    args = ["finetune", str(pruned), "--teacher", MODEL, "--data", "sample-wiki", "--seqlen", str(SEQLEN)]
    args += ["--tokens", str(s.tokens), "-b", str(s.batch), "--grad-accum", str(s.accum), "--lr", str(lr)]
    args += ["--warmup", str(s.warmup), "--heldout-windows", str(s.heldout), "--eval-every", str(s.eval_every)]
    args += (["--lora", str(s.lora)] if mode == "lora" else []) + ["--device", "cpu", "--force", "--json"]
    took, stdout = run([*args, "--out", str(out)], s.threads)
    summary = json.loads(stdout[stdout.index("{") :])
    tps = round(summary["tokens"] / summary["train_seconds"], 1)  # in optimizer steps alone
    return {**took, "tokens_per_s": tps, "planned_mib": planned(mode, s), "summary": summary}


def planned(mode: str, s: Settings) -> float:
    """`stade plan --finetune`'s peak host RAM for this run, the libraries aside (as the RSS above the baseline)."""
    args = ["plan", MODEL, "--finetune", "--batch-size", str(s.batch), "--seqlen", str(SEQLEN), "--device", "cpu"]
    _took, stdout = run([*args, *(["--lora", str(s.lora)] if mode == "lora" else []), "--no-time", "--json"], 1)
    ft = json.loads(stdout)["stages"]["finetune"]
    return round((ft["device_bytes"] - ft["host_terms"]["libraries"]) / 2**20, 1)


def evaluate(model: str, out: Path, wiki: Path, s: Settings) -> dict:
    """Held-out news and Wikipedia perplexity and the cloze accuracy of one model."""
    args = ["eval", model, "--ppl", f"{REF / 'heldout_ids.safetensors'},{wiki}", "--tasks", "stade_cloze"]
    args += ["--seqlen", str(SEQLEN), "--max-windows", str(s.news_windows), "--device", "cpu"]
    args += ["--limit", str(s.cloze_limit)] if s.cloze_limit else []
    took, _ = run([*args, "--out", str(out), "--force"], s.threads)
    results = json.loads(out.read_text())
    ppl = {Path(name).name: r["ppl"] for name, r in results["perplexity"].items()}  # keyed by the path given
    acc = results["zeroshot"]["tasks"]["stade_cloze"]["acc"]
    seconds = {Path(k.removeprefix("ppl:")).name: v for k, v in results["timings"].items()}
    return {**took, "news_ppl": ppl["heldout_ids.safetensors"], "wiki_ppl": ppl[wiki.name], "cloze_acc": acc,
            "seconds": seconds}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per fine-tuning run")
    ap.add_argument("--lora", type=int, default=16, help="the LoRA runs' rank")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 steps, 2 windows, 10 cloze items")
    args = ap.parse_args()
    s = Settings.quick(args.threads) if args.quick else Settings(tokens=args.tokens, threads=args.threads)
    s.lora = args.lora
    name = "recover-quick" if args.quick else "recover"
    work = ROOT / "bench" / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    baseline, _ = run(["-c", "import torch, transformers, stade_cli.cli"], s.threads, python=True)
    times: dict = {}
    pruned = prepare(work, s, times)
    wiki = wiki_heldout(work, s)
    rows = [{"model": "dense", "pattern": "", "mode": "", **evaluate(MODEL, work / "eval-dense.json", wiki, s)}]
    runs: dict = {}
    for pattern, folder in pruned.items():
        tag = folder.name.removeprefix("pruned-")
        rows.append({"model": "pruned", "pattern": pattern, "mode": "",
                     **evaluate(str(folder), work / f"eval-{tag}.json", wiki, s)})  # fmt: skip
        for mode in ("full", "lora"):
            out = work / f"tuned-{tag}-{mode}"
            runs[f"{pattern} {mode}"] = finetune(folder, out, mode, s)
            rows.append({"model": "fine-tuned", "pattern": pattern, "mode": mode,
                         **evaluate(str(out), work / f"eval-{tag}-{mode}.json", wiki, s)})  # fmt: skip
            write(name, s, baseline, times, runs, rows)
    print(json.dumps({k: {"tokens_per_s": r["tokens_per_s"], "wall_s": r["wall_s"]} for k, r in runs.items()}))
    return 0


def write(name: str, s: Settings, baseline: dict, times: dict, runs: dict, rows: list[dict]) -> None:
    base = baseline["peak_rss_mib"] or 0.0
    for r in [*runs.values(), *times.values(), *rows]:
        r["rss_above_baseline_mib"] = round(r["peak_rss_mib"] - base, 1) if r.get("peak_rss_mib") else None
    result = {
        "model": MODEL,
        "settings": asdict(s),
        "calibration": "tests/data/reference-smollm2/calibration_ids.safetensors",
        "prune": " ".join(PRUNE),
        "baseline": baseline,
        "preparation": times,
        "finetune": runs,
        "rows": rows,
        "command": "python bench/recover.py " + " ".join(sys.argv[1:]),
        "load_average_at_end": os.getloadavg()[0],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table(s, rows, runs) + "\n")
    plot(RESULTS / f"{name}.png", runs, rows)


def table(s: Settings, rows: list[dict], runs: dict) -> str:
    lines = [
        f"SmolLM2-135M, ADMM + block reconstruction, sequential; distilled on sample-wiki, {s.tokens} tokens per run, "
        f"{s.threads} threads. News: {s.news_windows} held-out windows of {SEQLEN}; Wikipedia: {s.heldout}.",
        "",
        "| model | pattern | mode | news ppl | wiki ppl | cloze acc | tokens/s | wall s | RSS above baseline MiB "
        "| plan MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ft = runs.get(f"{r['pattern']} {r['mode']}", {}) if r["mode"] else {}
        acc = "" if r["cloze_acc"] is None else f"{r['cloze_acc']:.3f}"
        lines.append(
            f"| {r['model']} | {r['pattern']} | {r['mode']} | {r['news_ppl']:.2f} | {r['wiki_ppl']:.2f} | {acc} | "
            f"{ft.get('tokens_per_s', '')} | {ft.get('wall_s', '')} | {ft.get('rss_above_baseline_mib', '')} | "
            f"{ft.get('planned_mib', '')} |"
        )
    rates = {k: r["tokens_per_s"] for k, r in runs.items()}
    if rates:
        hours = ", ".join(f"{k} {1e6 / v / 3600:.1f} h" for k, v in rates.items())
        lines += ["", f"At these rates ({s.threads} threads), 1,000,000 training tokens take: {hours}."]
    return "\n".join(lines)


def plot(path: Path, runs: dict, rows: list[dict]) -> None:
    """Held-out Wikipedia perplexity against training tokens: one panel per pattern, full and LoRA on it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    dense = next(r["wiki_ppl"] for r in rows if r["model"] == "dense")
    fig, axes = plt.subplots(1, len(PATTERNS), figsize=(10, 4), squeeze=False)
    for ax, pattern in zip(axes[0], PATTERNS, strict=True):
        for mode in ("full", "lora"):
            run_ = runs.get(f"{pattern} {mode}")
            if run_ is not None:
                curve = run_["summary"]["curve"]
                ax.plot([p["tokens"] for p in curve], [p["heldout_ppl"] for p in curve], marker="o", label=mode)
        ax.axhline(dense, linestyle="--", color="grey", label="dense")
        ax.set(title=f"{pattern}", xlabel="training tokens", ylabel="held-out Wikipedia perplexity", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
