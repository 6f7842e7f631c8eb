"""The masks a pattern gives: the lowest scores per output row (unstructured) or per block of M columns (N:M)."""

from __future__ import annotations

import torch

from stade_cli.stages.pattern import Pattern

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
