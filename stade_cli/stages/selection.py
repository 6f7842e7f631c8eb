"""Which layers a prune run prunes: `--only` and `--ignore` patterns over layer names (docs/guide.md#choosing-layers).

Papers and practitioners keep sensitive layers dense (the first and last blocks, attention, down_proj). A pattern is
written as llm-compressor's `targets` and `ignore` are: `re:` followed by a regular expression matched from the start
of the layer's full name (`re:.*down_proj`, `re:model\\.layers\\.0\\.`), or a plain name, which matches the layer of
that name or every layer whose name ends with `.` and it (`down_proj`, `self_attn.q_proj`). A layer is pruned when
`--only` is empty or one of its patterns matches, and none of `--ignore`'s does; the others are kept dense, exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from stade_cli.base.errors import StadeError


def _compile(option: str, pattern: str) -> re.Pattern[str]:
    if not pattern.strip():
        raise StadeError(f"{option} has an empty pattern.", "write e.g. --ignore 're:.*down_proj'")
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as exc:
            raise StadeError(
                f"{option} {pattern!r} is not a regular expression: {exc}.", "see Python's `re` syntax"
            ) from None
    return re.compile(rf"(?:.*\.)?{re.escape(pattern)}$")


def split_patterns(text: str | None) -> tuple[str, ...]:
    """Comma-separated patterns; a comma inside (), [] or {} belongs to its regular expression (`re:.{1,3}`)."""
    if text is None:
        return ()
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}" and depth > 0
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return tuple(p.strip() for p in parts)


@dataclass(frozen=True)
class LayerSelection:
    only: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    _compiled: dict[str, tuple[re.Pattern[str], ...]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for option, patterns in (("--only", self.only), ("--ignore", self.ignore)):
            self._compiled[option] = tuple(_compile(option, p) for p in patterns)

    @classmethod
    def parse(cls, only: str | None, ignore: str | None) -> LayerSelection:
        return cls(split_patterns(only), split_patterns(ignore))

    def __bool__(self) -> bool:
        return bool(self.only or self.ignore)

    def pruned(self, name: str) -> bool:
        """Whether layer `name` (its full name, e.g. model.layers.3.mlp.down_proj) is pruned."""
        if self.only and not any(p.match(name) for p in self._compiled["--only"]):
            return False
        return not any(p.match(name) for p in self._compiled["--ignore"])

    def check(self, names: Iterable[str]) -> None:
        """Refuse a pattern that matches no prunable layer, and a selection that leaves none to prune."""
        names = list(names)
        for option, patterns in (("--only", self.only), ("--ignore", self.ignore)):
            for text, pattern in zip(patterns, self._compiled[option], strict=True):
                if not any(pattern.match(n) for n in names):
                    example = names[0] if names else "none"
                    raise StadeError(
                        f"{option} {text!r} matches none of the model's {len(names)} prunable layers (e.g. {example}).",
                        "patterns match full layer names from the start: write 're:.*down_proj' or 'down_proj'",
                    )
        if names and not any(self.pruned(n) for n in names):
            raise StadeError(
                f"--only {list(self.only)} and --ignore {list(self.ignore)} leave no layer to prune.",
                "drop a pattern, or prune nothing at all by not running prune",
            )

    def record(self) -> dict[str, list[str]] | None:
        return {"only": list(self.only), "ignore": list(self.ignore)} if self else None
