"""Benchmark the calibrate stage on SmolLM2-135M with the 32 x 512 reference calibration ids.

In one process: `stade_cli.driver.calibrate.calibrate` without and with Hessians on the model loaded as
`stade calibrate` loads it (blocks read from disk one at a time), then one plain batched dense
forward over the same tokens on the whole model (the floor). Reports the ratio calibrate / forward
(target <= 1.3), tokens/s, and peak RSS against the model's float32 size (target <= 2x).
Writes bench/results/calibrate.json.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/calibrate.py [--batch-size 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from stade_cli.models.loading import LoadedModel

ROOT = Path(__file__).resolve().parent.parent
IDS = ROOT / "tests" / "data" / "reference-smollm2" / "calibration_ids.safetensors"
RESULTS = ROOT / "bench" / "results" / "calibrate.json"
RATIO_TARGET = 1.3
RSS_TARGET = 2.0


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def float32_bytes(model: torch.nn.Module) -> int:
    """Size of the weights at float32, shared (tied) tensors counted once."""
    return sum(p.numel() for p in model.parameters()) * 4


@torch.inference_mode()
def dense_forward(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    """Wall seconds of one plain forward over all windows, in batches."""
    t0 = time.perf_counter()
    for start in range(0, ids.shape[0], batch_size):
        model(ids[start : start + batch_size])
    return time.perf_counter() - t0


def time_calibrate(loaded: LoadedModel, hessian: bool, batch_size: int, workdir: Path) -> tuple[float, float]:
    """Wall seconds of the whole library call (data, collection, writing) and of the collection alone."""
    from stade_cli.driver.calibrate import CalibrationConfig, calibrate

    config = CalibrationConfig(data=str(IDS), nsamples=None, seqlen=None, hessian=hessian, batch_size=batch_size)
    out = workdir / f"stats-{'h' if hessian else 'm'}"
    t0 = time.perf_counter()
    stats = calibrate(loaded, config, out, torch.device("cpu"), force=True)
    wall = time.perf_counter() - t0
    return wall, float(stats.manifest.timings["calibrate_s"])


def run(batch_size: int, repeats: int) -> dict:
    from safetensors.torch import load_file

    from stade_cli.models.loading import load_model

    ids = load_file(str(IDS))["input_ids"]
    # As `stade calibrate` loads it: blocks left on disk and read one at a time.
    lazy = load_model("smollm2-135m", dtype="float32", device="cpu", lazy=True)
    tokens = ids.numel()
    size = float32_bytes(lazy.model)
    rss_loaded = peak_rss_bytes()

    times: dict[str, list[float]] = {"calibrate": [], "calibrate_hessian": [], "forward": []}
    collects: dict[str, list[float]] = {"calibrate": [], "calibrate_hessian": []}
    rss: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # ru_maxrss only grows: calibrate's peaks are read before the whole model is loaded for the
        # plain forward, which also materialises the full logits (batch x seqlen x vocab floats).
        for key in ("calibrate", "calibrate_hessian"):
            wall, collect = time_calibrate(lazy, key == "calibrate_hessian", batch_size, Path(tmp))
            times[key].append(wall)
            collects[key].append(collect)
            rss[key] = peak_rss_bytes()
        model = load_model("smollm2-135m", dtype="float32", device="cpu").model
        dense_forward(model, ids[:1, :32], 1)  # warm-up: thread pools, allocator, every weight paged in
        rss_warm = peak_rss_bytes()
        # Later rounds interleave the runs, so that a busy machine slows all of them alike.
        for round_ in range(repeats):
            times["forward"].append(dense_forward(model, ids, batch_size))
            rss.setdefault("forward", peak_rss_bytes())
            if round_ + 1 < repeats:
                for key in ("calibrate", "calibrate_hessian"):
                    wall, collect = time_calibrate(lazy, key == "calibrate_hessian", batch_size, Path(tmp))
                    times[key].append(wall)
                    collects[key].append(collect)
    fwd = min(times["forward"])
    results: dict = {"tokens": tokens, "nsamples": ids.shape[0], "seqlen": ids.shape[1], "batch_size": batch_size}
    results["forward"] = {"wall_s": fwd, "all_s": times["forward"], "tokens_per_s": tokens / fwd}
    results["forward"]["peak_rss_bytes"] = rss["forward"]
    for key in ("calibrate", "calibrate_hessian"):
        wall = min(times[key])
        results[key] = {
            "wall_s": wall,
            "all_s": times[key],
            "collect_s": min(collects[key]),
            "ratio": wall / fwd,
            "tokens_per_s": tokens / wall,
            "peak_rss_bytes": rss[key],
            "rss_over_model": rss[key] / size,
            "rss_above_start_bytes": rss[key] - rss_loaded,
        }
    results["model_float32_bytes"] = size
    results["rss_lazy_loaded_bytes"] = rss_loaded
    results["rss_whole_model_warm_bytes"] = rss_warm
    results["torch_threads"] = torch.get_num_threads()
    results["load_average_1m"] = os.getloadavg()[0]
    results["targets"] = {"ratio": RATIO_TARGET, "rss_over_model": RSS_TARGET}
    results["versions"] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    return results


def render(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    gib = 1024**3
    table = Table(
        title=f"calibrate, SmolLM2-135M, {r['nsamples']} x {r['seqlen']} tokens, batch {r['batch_size']}, "
        f"{r['torch_threads']} threads"
    )
    for col in ("run", "wall s", "tokens/s", "ratio to forward", "peak RSS GiB", "RSS / model f32", "above start MiB"):
        table.add_column(col, justify="right")
    fwd = r["forward"]
    fwd_rss = f"{fwd['peak_rss_bytes'] / gib:.2f}"
    table.add_row("dense forward", f"{fwd['wall_s']:.2f}", f"{fwd['tokens_per_s']:,.0f}", "1.00", fwd_rss, "", "")
    for key, label in (("calibrate", "calibrate"), ("calibrate_hessian", "calibrate --hessian")):
        c = r[key]
        ok_ratio = "green" if c["ratio"] <= RATIO_TARGET else "red"
        ok_rss = "green" if c["rss_over_model"] <= RSS_TARGET else "red"
        table.add_row(
            label,
            f"{c['wall_s']:.2f}",
            f"{c['tokens_per_s']:,.0f}",
            f"[{ok_ratio}]{c['ratio']:.2f}[/]",
            f"{c['peak_rss_bytes'] / gib:.2f}",
            f"[{ok_rss}]{c['rss_over_model']:.2f}[/]",
            f"{c['rss_above_start_bytes'] / 2**20:,.0f}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"model float32 size {r['model_float32_bytes'] / gib:.2f} GiB; "
        f"RSS at start (libraries, embeddings; blocks on disk) {r['rss_lazy_loaded_bytes'] / gib:.2f} GiB; "
        f"with the whole model loaded and paged in {r['rss_whole_model_warm_bytes'] / gib:.2f} GiB; "
        f"load average {r['load_average_1m']:.1f}; "
        f"targets: ratio <= {RATIO_TARGET}, RSS <= {RSS_TARGET}x model"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="take the fastest of this many runs of each")
    args = parser.parse_args()
    results = run(args.batch_size, args.repeats)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    render(results)


if __name__ == "__main__":
    main()
