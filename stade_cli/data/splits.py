"""The windows `stade finetune` trains on and measures on, apart from the statistics' calibration windows.

The rule (docs/finetune.md#data): where the fine-tuning data is the calibration source, the calibration windows are
drawn again exactly as `stade calibrate` drew them (same source, count, length and seed; their hash is checked
against the statistics) and what they came from is left out: the documents they were cut from, or, where calibrate
joined the documents into one text, their token spans of it. The rest is joined into one text and cut into
non-overlapping windows, which a seeded shuffle deals into the held-out set (the first `heldout`) and the training
windows (the rest). A token-id file [n, seqlen] is taken window by window; the calibration's own file has no
window left, and is refused.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from stade_cli.base.errors import StadeError
from stade_cli.data.sources import Documents, TokenWindows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Split:
    """Training and held-out windows (n, seqlen), disjoint from each other and from the calibration windows."""

    train: torch.Tensor
    heldout: torch.Tensor
    notes: list[str] = field(default_factory=list)


def text_split(
    docs: Documents,
    tokenizer: PreTrainedTokenizerBase,
    seqlen: int,
    heldout: int,
    seed: int,
    calibration: TokenWindows | None,
) -> Split:
    """Windows of a text source, apart from `calibration` (the statistics' windows of the same source, or None)."""
    texts = [t for t in docs.texts if t.strip()]  # as the sampler sees them: its document indices refer to these
    if not texts:
        raise StadeError(f"Data source {docs.name!r} holds no text.", "give a source with documents in it")
    spans: list[tuple[int, int]] = []
    notes = []
    if calibration is not None and calibration.drawn is not None:
        if calibration.joined:
            cal_len = calibration.input_ids.shape[1]
            spans = [(p * cal_len, (p + 1) * cal_len) for p in calibration.drawn]
            notes.append(f"{len(spans)} calibration windows' token spans of the joined text left out")
        else:
            used = set(calibration.drawn)
            texts = [t for i, t in enumerate(texts) if i not in used]
            notes.append(f"{len(used)} documents the calibration windows were cut from left out")
    ids = tokenizer(docs.joiner.join(texts), add_special_tokens=True)["input_ids"]  # as calibrate joins them
    slots = [s for s in range(len(ids) // seqlen) if not any(a < (s + 1) * seqlen and s * seqlen < b for a, b in spans)]
    rows = torch.tensor([ids[s * seqlen : (s + 1) * seqlen] for s in slots], dtype=torch.int64).reshape(-1, seqlen)
    return deal(rows, heldout, seed, docs.name, notes)


def deal(rows: torch.Tensor, heldout: int, seed: int, source: str, notes: list[str] | None = None) -> Split:
    """A seeded shuffle of the windows: the first `heldout` are held out, the rest are trained on."""
    n = rows.shape[0]
    if n <= heldout:
        raise StadeError(
            f"Data source {source!r} gives {n} windows of {rows.shape[1]} tokens apart from the calibration windows; "
            f"{heldout} are held out, which leaves none to train on.",
            "give more text, or lower --heldout-windows or --seqlen",
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    picked = torch.tensor(order, dtype=torch.int64)
    return Split(rows[picked[heldout:]], rows[picked[:heldout]], list(notes or []))
