"""Exact output error of each pipeline on one SmolLM2 block's layers, from the cached H: a cheap quality proxy.

Sum over the block's linear layers of E||(W' - W)x + db||², relative to the dense E||Wx||² (one-shot, the
statistics of bench/quality.py). Minutes instead of hours: no perplexity, no sequential recalibration.

    python bench/quality_layers.py 15 > bench/results/quality-layers-block15.jsonl
"""

import json
import sys
from pathlib import Path

import torch

from stade_cli.driver.prune import output_error, prune_group
from stade_cli.models.layers import get_weight, linear_layers
from stade_cli.models.loading import load_model
from stade_cli.stages.config import PruneConfig
from stade_cli.stats.artifact import Statistics

torch.set_num_threads(1)
stats = Statistics.load(Path(__file__).resolve().parent / "work" / "quality" / "stats")
loaded = load_model("smollm2-135m", "float32", "cpu")
b = int(sys.argv[1])
prefix = f"model.layers.{b}"
block = loaded.model.model.layers[b]
groups = {}
for name, mod in linear_layers(block).items():
    full = f"{prefix}.{name}"
    g = stats.layers[full]["group"]
    groups.setdefault(g, []).append((full, get_weight(mod).detach().float()))
runs = [
    ("wanda", None),
    ("wanda", "bias"),
    ("stade", "none"),
    ("stade", None),
    ("wanda", "admm"),
    ("stade", "admm"),
    ("sparsegpt", None),
    ("admm", None),
]
for pat, ratio in (("unstructured", 0.5), ("2:4", None)):
    for m, u in runs:
        cfg = PruneConfig(m, ratio, pat, update=u)
        tot_e = tot_n = 0.0
        for members in groups.values():
            st = stats.layer(members[0][0], hessian=True)
            ws = [w for _, w in members]
            pruned = prune_group(ws, st, cfg, [n for n, _ in members])
            for w, (w_new, _mask, db, _d) in zip(ws, pruned, strict=True):
                e, n = output_error(w, w_new, db, st)
                tot_e += e
                tot_n += n
        print(json.dumps({"block": b, "pattern": pat, "pipeline": cfg.label, "rel_error": tot_e / tot_n}), flush=True)
