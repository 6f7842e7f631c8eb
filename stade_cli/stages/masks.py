"""Sparsity patterns and the masks they give: per output row (unstructured) or per block of M columns (N:M)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from stade_cli.base.errors import StadeError


@dataclass(frozen=True)
class Pattern:
    """`unstructured`, or N:M (N of every M consecutive input columns pruned in each row)."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def ratio(self) -> float:
        return self.n / self.m if self.m else 0.0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else "unstructured"

    @property
    def slug(self) -> str:
        """For folder names: '2of4' rather than '2:4', which some file systems refuse."""
        return f"{self.n}of{self.m}" if self.m else "unstructured"


def parse_pattern(text: str) -> Pattern:
    text = text.strip().lower()
    if text == "unstructured":
        return Pattern()
    match = re.fullmatch(r"(\d+)\s*[:/]\s*(\d+)|(\d+)of(\d+)", text)
    if not match:
        raise StadeError(f"Unknown pattern {text!r}.", "use unstructured or N:M such as 2:4 or 4:8")
    n, m = (int(g) for g in match.groups() if g is not None)
    if not 0 < n < m:
        raise StadeError(f"Pattern {text!r} is not a valid N:M pattern: N must satisfy 0 < N < M.", "e.g. 2:4 or 4:8")
    return Pattern(n, m)


def resolve_sparsity(pattern: Pattern, sparsity: float | None) -> float:
    """The sparsity ratio the pattern implies; a contradicting --sparsity is an error, not an override."""
    if pattern.structured:
        if sparsity is not None and abs(sparsity - pattern.ratio) > 1e-9:
            raise StadeError(
                f"--sparsity {sparsity} contradicts pattern {pattern}, which prunes {pattern.ratio:g}.",
                f"omit --sparsity or set it to {pattern.ratio:g}",
            )
        return pattern.ratio
    if sparsity is None:
        raise StadeError("--sparsity is needed for the unstructured pattern.", "e.g. --sparsity 0.5")
    if not 0.0 <= sparsity < 1.0:
        raise StadeError(f"--sparsity {sparsity} is outside [0, 1).", "e.g. --sparsity 0.5")
    return sparsity


def check_divisible(pattern: Pattern, layer: str, in_features: int) -> None:
    if pattern.structured and in_features % pattern.m:
        raise StadeError(
            f"Layer {layer} has {in_features} input columns, not divisible by M={pattern.m} of pattern {pattern}.",
            "choose an M that divides every layer's input size",
        )


ROW_CHUNK = 1 << 22  # entries of `scores` selected at once: kthvalue's temporaries are 12 bytes per entry


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the `k` lowest entries of each row of `scores` (rows, cols), ties broken by lower column first.

    The same set as the first `k` of a stable ascending sort, found by selection (kthvalue) instead:
    only the k-th value is located, so it costs O(cols) per row rather than a full sort. Rows go in chunks:
    kthvalue copies its input and indexes it in int64, three times the scores' own size for a whole layer.
    """
    rows, cols = scores.shape
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= cols:
        return torch.ones_like(scores, dtype=torch.bool)
    step = max(ROW_CHUNK // cols, 1)
    if rows <= step:
        return _lowest_k_rows(scores, k)
    mask = torch.empty_like(scores, dtype=torch.bool)
    for start in range(0, rows, step):
        mask[start : start + step] = _lowest_k_rows(scores[start : start + step], k)
    return mask


def _lowest_k_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    kth = scores.kthvalue(k, dim=1, keepdim=True).values
    below = scores < kth
    at = scores == kth
    need = k - below.sum(1, keepdim=True)  # how many of the entries equal to the k-th value to take
    # Rows where a tie straddles the cut take the first of the tied entries, by a cumsum over those rows alone:
    # it is int64, 8 bytes per weight, and float32 or bfloat16 weights tie often enough to hit most layers.
    split = (at.sum(1, keepdim=True) != need).squeeze(1).nonzero().squeeze(1)
    tied = at[split]
    fixed = below[split] | (tied & (tied.cumsum(1) <= need[split]))
    mask = below.logical_or_(at)
    mask[split] = fixed
    return mask


def lowest_n_of_m(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """True at the N lowest of every M consecutive columns of each row of `scores` (rows, cols), ties broken by
    lower column first (a stable sort): the one N:M selection, for scores, SparseGPT's groups and ADMM's."""
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // pattern.m, pattern.m)  # (out, in/M, M)
    idx = torch.sort(grouped, dim=-1, stable=True).indices[..., : pattern.n]
    return torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)


def mask_from_scores(scores: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """True where a weight is pruned: the lowest scores, ties broken by lower column index first."""
    if pattern.structured:
        return lowest_n_of_m(scores, pattern)
    return lowest_k(scores, int(scores.shape[1] * sparsity))
