"""uniform: every block at the requested ratio."""

from __future__ import annotations

from typing import Any

from stade_cli.stages.stage import allocation


@allocation("uniform", "every block at the requested ratio", paper="allocations")
def uniform(loaded: Any, _stats: Any, ratio: float, _pattern: Any, _settings: Any, _device: Any) -> dict[str, float]:
    from stade_cli.models.blocks import iterate_blocks

    return {prefix: ratio for _i, prefix, _b in iterate_blocks(loaded.model)}
