"""Why `magnitude` differs from the Wanda repository's figures: comparison group and ties.

- 50% unstructured: docs/methods.md prunes the lowest |W| in each output row; the Wanda repository's
  magnitude baseline uses one threshold per layer.
- 2:4: both pick the 2 lowest of every 4, but SmolLM2's weights come from a Q4_1 GGUF (16 levels per
  block of 32), so |W| often ties inside a group of 4. stade breaks ties by column index (docs/methods.md#masks);
  the repository takes whatever torch.topk(largest=False) returns.
This evaluates the repository's variants (`--all`: stade's too) on the reference held-out ids (all 147
windows of 512) and counts the ties.

    python bench/magnitude_scope.py
"""

from __future__ import annotations

import json
import sys

import torch
from reproduce import REF, REFERENCE, ROOT  # the published figures, in one place

from stade_cli.base.console import out
from stade_cli.data.sources import load_token_file
from stade_cli.evaluation.perplexity import perplexity
from stade_cli.models.blocks import iterate_blocks
from stade_cli.models.layers import linear_layers
from stade_cli.models.loading import load_model


@torch.no_grad()
def prune(model: torch.nn.Module, variant: str) -> float:
    """Prune in place; returns the fraction of 2:4 groups whose choice depends on tie-breaking."""
    tied = groups = 0
    for _i, _prefix, block in iterate_blocks(model):
        for mod in linear_layers(block).values():
            w = mod.weight.data
            if variant.startswith("2:4"):
                g = w.abs().reshape(w.shape[0], -1, 4)
                ordered = torch.sort(g, dim=-1).values
                tied += int((ordered[..., 1] == ordered[..., 2]).sum())
                groups += ordered.shape[0] * ordered.shape[1]
                if "topk" in variant:  # the repository's choice among ties
                    idx = torch.topk(g, 2, dim=-1, largest=False)[1]
                else:
                    idx = torch.sort(g, dim=-1, stable=True).indices[..., :2]
                w.copy_(w.reshape(g.shape).scatter(-1, idx, 0.0).reshape(w.shape))
            elif variant.startswith(
                "per-layer"
            ):  # one threshold for the whole layer, as the Wanda repository's prune_magnitude
                thresh = torch.sort(w.abs().flatten())[0][int(w.numel() * 0.5)]
                w[w.abs() <= thresh] = 0
            else:  # docs/methods.md: exactly half of every row, ties by index
                idx = torch.sort(w.abs(), dim=1, stable=True).indices[:, : w.shape[1] // 2]
                w.scatter_(1, idx, 0.0)
    return tied / groups if groups else 0.0


def main() -> None:
    heldout = load_token_file(REF / "heldout_ids.safetensors", "[1, N]")
    # stade's own variants (per row; ties by index) are the `magnitude` rows of bench/reproduce.py.
    variants = {
        "per-layer threshold (Wanda repository)": "unstructured",
        "2:4 ties by torch.topk (Wanda repository)": "2:4",
    }
    if "--all" in sys.argv:
        variants = {
            "per-row (stade, docs/methods.md)": "unstructured",
            "2:4 ties by index (stade, docs/methods.md)": "2:4",
            **variants,
        }
    rows = {}
    for variant, pattern in variants.items():
        loaded = load_model("smollm2-135m", "float32", "cpu")
        tied = prune(loaded.model, variant)
        ppl = perplexity(loaded.model, heldout, 512, 8, "cpu", description=variant).ppl
        ref = REFERENCE[("magnitude", pattern)]
        rows[variant] = {"ppl": ppl, "reference": ref, "rel_diff": (ppl - ref) / ref, "tied_groups": tied}
        out.print(
            f"magnitude {variant}: {ppl:.3f} (reference {ref}, {(ppl - ref) / ref:+.2%})"
            + (f"; 2:4 groups decided by a tie: {tied:.1%}" if pattern == "2:4" else "")
        )
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "magnitude-scope.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
