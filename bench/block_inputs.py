"""Per block: how far `stade calibrate`'s statistics are from hooks in one plain full-model forward.

A tiny random model of a family from the test matrix (default Gemma-3: blocks 0 and 2 sliding-window
attention with a window of 8 tokens, block 1 global, windows of 32 tokens). Each block's figure is the
largest relative difference, over its layers, of the channel means (norm of the difference over norm
of the reference), of the variances, and of the Hessians.

    PYTHONPATH=. python bench/block_inputs.py [--family gemma3] [--lazy]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_architectures import (  # noqa: E402
    ARCHITECTURES,
    BATCH,
    Hooks,
    prunable,
    save_model,
    windows,
)

import stade_cli  # noqa: E402
from stade_cli.driver.calibrate import CalibrationConfig, calibrate  # noqa: E402
from stade_cli.models.loading import load_model  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="gemma3", choices=sorted(ARCHITECTURES))
    ap.add_argument("--lazy", action="store_true", help="blocks read from disk one at a time")
    args = ap.parse_args()
    blocks = ARCHITECTURES[args.family].blocks
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(args.family, Path(tmp) / "model")
        data = windows(Path(tmp) / "ids.safetensors")
        loaded = load_model(str(path), dtype="float32", device="cpu", lazy=args.lazy)
        config = CalibrationConfig(data=str(data), nsamples=None, seqlen=None, hessian=True, batch_size=BATCH)
        stats = calibrate(loaded, config, Path(tmp) / "stats", torch.device("cpu"))
        full = load_model(str(path), dtype="float32", device="cpu").model
        ref = Hooks(prunable(full, blocks)).run(full, stats.token_ids())
        types = getattr(full.config, "layer_types", None)
        print(f"stade code: {Path(stade_cli.__file__).parent}")
        print(f"{args.family}: {full.config.num_hidden_layers} blocks, layer types {types}")
        print("block  mean      var       hessian")
        per_block: dict[int, list[float]] = {}
        for name, n in ref.count.items():
            k = int(name.removeprefix(blocks + ".").split(".")[0])
            got = stats.layer(name, hessian=True)
            mean = ref.sum[name] / n
            var = (ref.sumsq[name] - n * mean.square()) / (n - 1)
            errs = [rel(got.mean, mean), rel(got.var, var), rel(got.hessian, ref.xtx[name] * (2.0 / n))]
            per_block[k] = [max(a, b) for a, b in zip(per_block.get(k, [0.0] * 3), errs, strict=True)]
        for k in sorted(per_block):
            print(f"{k:5d}  " + "  ".join(f"{e:.1e}" for e in per_block[k]))


if __name__ == "__main__":
    main()
