"""Which calibration windows a part of a run computes: `--shard I/N` of a job array, or rank I of N under torchrun.

Every part draws the same windows as a whole run (same data, seed, nsamples) and keeps a contiguous
range of them, so that the parts' statistics merge back, in window order, into the whole run's.
"""

from __future__ import annotations

from dataclasses import dataclass

from stade_cli.base.errors import StadeError


@dataclass(frozen=True)
class Part:
    """Part `index` (0-based) of `count` equal-as-possible contiguous ranges of the drawn windows."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise StadeError(
                f"--shard {self.index}/{self.count} is out of range.", "use I/N with 0 <= I < N, e.g. --shard 0/4"
            )

    @classmethod
    def parse(cls, text: str) -> Part:
        index, sep, count = text.partition("/")
        if not sep or not index.strip().isdigit() or not count.strip().isdigit():
            raise StadeError(f"--shard {text!r} is not of the form I/N.", "e.g. --shard 0/4 for the first of four")
        return cls(int(index), int(count))

    def bounds(self, n: int) -> tuple[int, int]:
        """[start, stop) of this part among `n` windows: the same split for --shard and for torchrun ranks."""
        return n * self.index // self.count, n * (self.index + 1) // self.count

    def take(self, n: int, what: str = "shard") -> tuple[int, int]:
        """This part's bounds among `n` windows, refused where some part would get none."""
        if n < self.count:
            raise StadeError(
                f"{n} calibration windows cannot be split into {self.count} {what}s (each needs at least one).",
                f"raise --nsamples to {self.count} or more, or use fewer {what}s",
            )
        return self.bounds(n)

    def all_bounds(self, n: int) -> list[list[int]]:
        """Every part's [start, stop) of the same split (a torchrun manifest records them)."""
        return [list(Part(i, self.count).bounds(n)) for i in range(self.count)]
