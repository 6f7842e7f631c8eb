"""Why `magnitude` at 50% unstructured differs from the Wanda repository's figure: the comparison group.

method.md prunes the lowest |W| in each output row; the Wanda repository's magnitude baseline uses one
threshold per layer. This evaluates both on the reference held-out ids (all 147 windows of 512), so the
difference can be attributed exactly. (2:4 has no such difference: both group by row.)

    python bench/magnitude_scope.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stade_cli.blocks import iterate_blocks
from stade_cli.console import out
from stade_cli.data import load_token_file
from stade_cli.evaluate import perplexity
from stade_cli.models import linear_layers, load_model

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "tests" / "data" / "reference-smollm2"
REFERENCE = 470.735


@torch.no_grad()
def prune(model: torch.nn.Module, per_layer: bool) -> None:
    for _i, _prefix, block in iterate_blocks(model):
        for mod in linear_layers(block).values():
            w = mod.weight.data
            if per_layer:  # one threshold for the whole layer, as the Wanda repository's prune_magnitude
                thresh = torch.sort(w.abs().flatten())[0][int(w.numel() * 0.5)]
                w[w.abs() <= thresh] = 0
            else:  # method.md: exactly half of every row
                idx = torch.sort(w.abs(), dim=1, stable=True).indices[:, : w.shape[1] // 2]
                w.scatter_(1, idx, 0.0)


def main() -> None:
    heldout = load_token_file(REF / "heldout_ids.safetensors", "[1, N]")
    rows = {}
    for scope in ("per-row (stade, method.md)", "per-layer (Wanda repository)"):
        loaded = load_model("smollm2-135m", "float32", "cpu")
        prune(loaded.model, per_layer=scope.startswith("per-layer"))
        rows[scope] = perplexity(loaded.model, heldout, 512, 8, "cpu", description=scope).ppl
    for scope, ppl in rows.items():
        out.print(f"magnitude 50% {scope}: {ppl:.3f}  (reference {REFERENCE}, {(ppl - REFERENCE) / REFERENCE:+.2%})")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "magnitude-scope.json").write_text(json.dumps({"reference": REFERENCE, "ppl": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
