"""The mask check of bench/peers.py: how closely two checkpoints' masks agree, layer by layer and block 0 apart.

Block 0 is the one like-for-like comparison of two sequential runs: every later block sees inputs that the earlier
blocks' small differences have already moved.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

PATTERNS = ("unstructured", "2:4")
LINEAR = re.compile(r"\.layers\.(\d+)\.\w+\.(\w+)\.weight$")  # the decoder blocks' linear layers


def slug(pattern: str) -> str:
    return pattern.replace(":", "of")


def linear_weights(checkpoint: str) -> dict[str, Any]:
    """The decoder blocks' linear weights of a checkpoint, by name, read from its safetensors files."""
    from safetensors import safe_open

    found = {}
    for f in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            found.update({k: st.get_tensor(k) for k in st.keys() if LINEAR.search(k)})  # noqa: SIM118
    return found


def mask_check(checkpoints: dict[str, str]) -> dict[str, Any]:
    """Per layer, the fraction of positions where LLMC's and stade's masks (zero or not) agree: SparseGPT, both
    sequential; Wanda, LLMC sequential against stade one-shot (like for like in block 0 only)."""
    pairs = {f"sparsegpt {p}": (f"llmc-sparsegpt-{slug(p)}", f"stade-sparsegpt-seq-{slug(p)}") for p in PATTERNS}
    pairs |= {f"wanda {p}": (f"llmc-wanda-{slug(p)}", f"stade-wanda-oneshot-{slug(p)}") for p in PATTERNS}
    result = {}
    for key, (a, b) in pairs.items():
        wa, wb = linear_weights(checkpoints[a]), linear_weights(checkpoints[b])
        layers = []
        for name in sorted(wa, key=lambda n: (int(LINEAR.search(n).group(1)), n)):  # type: ignore[union-attr]
            za, zb = wa[name] == 0, wb[name] == 0
            block, kind = LINEAR.search(name).groups()  # type: ignore[union-attr]
            agree, sparsity = (
                int((za == zb).sum()),
                {"llmc": float(za.float().mean()), "stade": float(zb.float().mean())},
            )
            layers.append({"name": name, "block": int(block), "kind": kind, "agree_n": agree, "n": za.numel()})
            layers[-1] |= {"agree": agree / za.numel(), "sparsity": sparsity}
        kinds = sorted({r["kind"] for r in layers})
        worst = min(layers, key=lambda r: r["agree"])
        result[key] = {
            "pair": [a, b],
            "agree": _pooled(layers),
            "agree_block0": _pooled([r for r in layers if r["block"] == 0]),
            "by_kind": {k: _pooled([r for r in layers if r["kind"] == k]) for k in kinds},
            "worst": {"name": worst["name"], "agree": worst["agree"]},
            "layers": [{k: v for k, v in r.items() if k not in ("agree_n", "n", "block", "kind")} for r in layers],
        }
    return result


def _pooled(layers: list[dict[str, Any]]) -> float:
    return sum(r["agree_n"] for r in layers) / sum(r["n"] for r in layers)
