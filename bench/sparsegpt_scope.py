"""Why sequential `sparsegpt` at 2:4 lands 1.9% away from the Wanda repository's figure (132.867).

stade follows method.md: H = 2/n sum_t x_t x_t^T over all calibration tokens, one H per group of layers
sharing an input, ties by index, calibration forwards in batches. The Wanda repository's SparseGPT
differs only in float arithmetic, not in the maths:
- it runs the block one sequence at a time and keeps H as a running average over sequences
  (H *= n/(n+1); H += (sqrt(2/(n+1)) x)^T (sqrt(2/(n+1)) x)), a different float summation order;
- each layer holds its own H and is solved alone; the rank-1 update is a (rows x 1) @ (1 x cols) matmul;
- 2:4 picks the 2 lowest of 4 with torch.topk, unstructured keeps entries <= the k-th smallest.
This prunes SmolLM2 sequentially with both arithmetics (and the repository's one with stade's H) and
evaluates all 147 held-out windows, to show how much of the gap float order alone makes.

    python bench/sparsegpt_scope.py [--pattern 2:4]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import nn

from stade_cli.blocks import capture_inputs, iterate_blocks, run_block
from stade_cli.calibrate import CalibrationConfig, calibrate
from stade_cli.console import out
from stade_cli.data import load_token_file
from stade_cli.evaluate import perplexity
from stade_cli.masks import parse_pattern
from stade_cli.models import linear_layers, load_model
from stade_cli.prune import PruneConfig, prune_model

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "tests" / "data" / "reference-smollm2"
REFERENCE = {"unstructured": 62.172, "2:4": 132.867}
CPU = torch.device("cpu")


class RunningHessian:
    """The repository's accumulation: a running average over sequences, each scaled before the product."""

    def __init__(self, dim: int) -> None:
        self.h = torch.zeros(dim, dim)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        seqs = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).t().float()
        self.h *= self.n / (self.n + seqs)
        self.n += seqs
        x = math.sqrt(2 / self.n) * x
        self.h += x @ x.t()


class SumHessian:
    """method.md's: 2/n times the plain sum over tokens."""

    def __init__(self, dim: int) -> None:
        self.h = torch.zeros(dim, dim)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.h.addmm_(x.t(), x)
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        return self.h * (2.0 / self.n)


@torch.no_grad()
def solve_like_repository(w: torch.Tensor, h: torch.Tensor, pattern: str, blocksize: int = 128) -> torch.Tensor:
    """One layer, the repository's way: topk for N:M, `<= k-th` for unstructured, matmul rank-1 updates."""
    pat = parse_pattern(pattern)
    w = w.clone().float()
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    idx = torch.arange(h.shape[0])
    h[idx, idx] += 0.01 * torch.mean(torch.diag(h))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    cols = w.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        d = torch.diag(hinv1)
        if pat.structured:
            m1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            tmp = w1**2 / d.reshape(1, -1) ** 2
            m1 = tmp <= torch.sort(tmp.flatten())[0][int(tmp.numel() * 0.5)]
        for i in range(i2 - i1):
            if pat.structured and i % pat.m == 0:
                tmp = w1[:, i : i + pat.m] ** 2 / d[i : i + pat.m].reshape(1, -1) ** 2
                m1.scatter_(1, i + torch.topk(tmp, pat.n, dim=1, largest=False)[1], True)
            col = w1[:, i]
            q = col.clone()
            q[m1[:, i]] = 0
            q1[:, i] = q
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return w


@torch.no_grad()
def prune_like_repository(model: nn.Module, ids: torch.Tensor, pattern: str, running: bool) -> None:
    """Sequential, one sequence at a time through each block, one H per layer."""
    inputs = capture_inputs(model, ids, 1, CPU)
    for _i, _prefix, block in iterate_blocks(model):
        layers = linear_layers(block)
        acc = {n: (RunningHessian if running else SumHessian)(m.weight.shape[1]) for n, m in layers.items()}
        handles = [m.register_forward_hook(lambda _m, a, _o, h=acc[n]: h.add(a[0])) for n, m in layers.items()]
        run_block(block, inputs, CPU)
        for hd in handles:
            hd.remove()
        for n, m in layers.items():
            h = acc[n].h if running else acc[n].value()
            m.weight.data = solve_like_repository(m.weight.data, h, pattern)
        inputs.hidden = run_block(block, inputs, CPU)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pattern", default="2:4", choices=["2:4", "unstructured"])
    args = ap.parse_args()
    ids = load_token_file(REF / "calibration_ids.safetensors", "[n, seqlen]")
    heldout = load_token_file(REF / "heldout_ids.safetensors", "[1, N]")
    ref = REFERENCE[args.pattern]
    rows = {}

    def record(label: str, model: nn.Module) -> None:
        ppl = perplexity(model, heldout, 512, 8, CPU, description=label).ppl
        rows[label] = {"ppl": ppl, "reference": ref, "rel_diff": (ppl - ref) / ref}
        out.print(f"sparsegpt {args.pattern} {label}: {ppl:.3f} (reference {ref}, {(ppl - ref) / ref:+.2%})")

    for label, running in (("repository arithmetic", True), ("repository solver, stade's H", False)):
        loaded = load_model("smollm2-135m", "float32", "cpu")
        prune_like_repository(loaded.model, ids, args.pattern, running)
        record(label, loaded.model)
    # stade itself with the repository's batch of one sequence (bench/reproduce.py has batches of 8).
    loaded = load_model("smollm2-135m", "float32", "cpu")
    calibration = CalibrationConfig(data=str(REF / "calibration_ids.safetensors"), nsamples=None, batch_size=1)
    stats = calibrate(loaded, calibration, ROOT / "bench" / "work" / "sparsegpt-scope", CPU, force=True)
    cfg = PruneConfig("sparsegpt", 0.5 if args.pattern == "unstructured" else None, args.pattern, sequential=True)
    prune_model(loaded, stats, cfg, CPU, batch_size=1)
    record("stade --sequential, batches of 1", loaded.model)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"sparsegpt-scope-{args.pattern.replace(':', 'of')}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
