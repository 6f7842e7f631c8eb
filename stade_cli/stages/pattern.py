"""Sparsity patterns: unstructured, or N of every M consecutive input columns (N:M). Free of torch, so that the
command line can check a pattern before anything heavy is imported."""

from __future__ import annotations

import re
from dataclasses import dataclass

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


def pattern_key(text: str) -> str:
    """What a --pattern value names, for spotting one named twice (2:4, 2/4 and 2of4 alike); a value that does not
    parse is its own key, and refused with its own message where the configurations are built."""
    try:
        return str(parse_pattern(text))
    except StadeError:
        return text


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
