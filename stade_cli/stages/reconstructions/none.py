"""none: the masked (and updated) weights are final."""

from __future__ import annotations

from typing import Any

from stade_cli.stages.stage import reconstruction


@reconstruction("none", "no reconstruction: the masked (and updated) weights are final", paper="reconstruction")
def no_reconstruction(*_args: Any, **_kwargs: Any) -> None:
    return None
