"""What block-wise reconstruction buys on SmolLM2-135M: held-out perplexity and prune time, with and without.

One process: the built-in SmolLM2, the reference calibration ids (statistics with Hessians, or `--stats` to
reuse a folder made from them), then in-memory prunes from one loaded model. Each row with reconstruction is
timed against the same prune without it, in the same run; held-out perplexity over the 147 x 512 reference
windows. Rows without reconstruction can take their perplexity from bench/results/reproduce.json
(`--reuse-plain`: the same code, the same protocol) to save evaluations on a loaded machine.
Writes bench/results/reconstruct.{json,md} after every row.

    python bench/reconstruct.py --stats STATS --rows wanda:2:4,wanda:0.5 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from stade_cli.base.console import err
from stade_cli.data.sources import load_token_file
from stade_cli.driver.calibrate import CalibrationConfig, calibrate
from stade_cli.driver.dense import Snapshot
from stade_cli.driver.sweep import prune_model
from stade_cli.evaluation.perplexity import perplexity
from stade_cli.models.loading import load_model
from stade_cli.stages.config import PruneConfig
from stade_cli.stages.reconstructions.block import BlockSettings
from stade_cli.stages.stage import RECONSTRUCTIONS
from stade_cli.stats.artifact import Statistics

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "tests" / "data" / "reference-smollm2"
RESULTS = ROOT / "bench" / "results"


def parse_row(spec: str, steps: int) -> tuple[PruneConfig, PruneConfig]:
    """'wanda:2:4', 'sparsegpt:0.5', with an optional ':seq' -> (plain, with block reconstruction)."""
    parts = spec.split(":")
    seq = parts[-1] == "seq"
    if seq:
        parts = parts[:-1]
    method, rest = parts[0], parts[1:]
    pattern, ratio = ("unstructured", float(rest[0])) if len(rest) == 1 else (f"{rest[0]}:{rest[1]}", None)
    plain = PruneConfig(method, ratio, pattern, sequential=seq)
    block = (BlockSettings(steps=steps),)
    return plain, PruneConfig(method, ratio, pattern, sequential=seq, reconstruct="block", settings=block)


def reused(cfg: PruneConfig) -> float | None:
    path = RESULTS / "reproduce.json"
    if not path.exists():
        return None
    mode = "sequential, as published" if cfg.sequential else "one-shot (default)"
    for r in json.loads(path.read_text())["rows"]:
        if r["method"] == cfg.method and r["pattern"] == cfg.pattern and r["mode"] == mode:
            return float(r["ours"])
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stats", type=Path, help="statistics (with Hessians) from the reference calibration ids")
    ap.add_argument("--rows", default="wanda:2:4,wanda:0.5,sparsegpt:2:4,sparsegpt:0.5")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reuse-plain", action="store_true", help="plain rows' perplexity from reproduce.json")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--name", default="reconstruct")
    ap.add_argument("--windows", type=int, default=147, help="evaluate on the first N held-out windows only")
    ap.add_argument("--only", choices=["both", "none", "block"], default="both", help="which rows to run")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="1 on a machine shared with others")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    loaded = load_model("smollm2-135m", "float32", device)
    heldout = load_token_file(REF / "heldout_ids.safetensors", "[1, N]")[:, : args.windows * 512]
    if args.stats and (args.stats / "manifest.json").exists():
        stats = Statistics.load(args.stats)
    else:
        out = args.stats or ROOT / "bench" / "work" / "reconstruct-stats"
        cfg = CalibrationConfig(data=str(REF / "calibration_ids.safetensors"), nsamples=None, hessian=True)
        stats = calibrate(loaded, cfg, out, device)
    snap = Snapshot(loaded.model)
    rows: list[dict] = []
    for spec in args.rows.split(","):
        for cfg in parse_row(spec, args.steps):
            if args.only != "both" and cfg.reconstruct != args.only:
                continue
            snap.restore()
            report = prune_model(loaded, stats, cfg, device, batch_size=args.batch_size)
            full = args.windows >= 147
            ppl = reused(cfg) if args.reuse_plain and full and cfg.reconstruct == "none" else None
            source = "reproduce.json" if ppl is not None else "this run"
            if ppl is None:
                t0 = time.perf_counter()
                ppl = perplexity(loaded.model, heldout, 512, args.batch_size, device, description="held-out").ppl
                err.print(f"evaluation {time.perf_counter() - t0:.0f}s")
            blocks = report.reconstruction
            rows.append(
                {
                    "method": cfg.method,
                    "pattern": cfg.pattern,
                    "mode": "sequential" if cfg.sequential else "one-shot",
                    "reconstruct": cfg.reconstruct,
                    "steps": cfg.settings_for(RECONSTRUCTIONS.get(cfg.reconstruct)).steps if blocks else 0,
                    "ppl": ppl,
                    "ppl_from": source,
                    "windows": heldout.shape[1] // 512,
                    "prune_s": report.timings["prune_s"],
                    "heldout_before": sum(b["heldout_before"] for b in blocks) / len(blocks) if blocks else None,
                    "heldout_after": sum(b["heldout_after"] for b in blocks) / len(blocks) if blocks else None,
                    "steps_run": sum(b["steps_run"] for b in blocks) if blocks else 0,
                }
            )
            err.print(f"{spec} {cfg.reconstruct}: ppl {ppl:.3f} ({source}), prune {report.timings['prune_s']:.1f}s")
            write(rows, args.name)
    snap.restore()
    return 0


def write(rows: list[dict], name: str) -> None:
    plain = {(r["method"], r["pattern"], r["mode"]): r for r in rows if r["reconstruct"] == "none"}
    lines = [
        "| method | pattern | mode | reconstruct | held-out ppl | prune s | time ratio | block loss before → after |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        base = plain.get((r["method"], r["pattern"], r["mode"]))
        r["time_ratio"] = round(r["prune_s"] / base["prune_s"], 2) if base and base["prune_s"] else None
        loss = f"{r['heldout_before']:.3g} → {r['heldout_after']:.3g}" if r["heldout_before"] is not None else ""
        star = "*" if r["ppl_from"] != "this run" else ""
        lines.append(
            f"| {r['method']} | {r['pattern']} | {r['mode']} | {r['reconstruct']} | {r['ppl']:.2f}{star} | "
            f"{r['prune_s']:.1f} | {r['time_ratio'] or ''} | {loss} |"
        )
    lines.append("")
    lines.append("\\* from bench/results/reproduce.json (same code and protocol, not re-evaluated in this run).")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
