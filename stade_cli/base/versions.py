"""The library versions every artifact records (statistics, stade.json, results), so a figure can be traced back.

A leaf module: it imports nothing of stade's but the version.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from stade_cli import __version__

LIBRARIES = ("torch", "transformers", "safetensors", "datasets", "lm_eval")


def library_versions() -> dict[str, str]:
    """stade, Python and each library in LIBRARIES ("not installed" for one that is missing)."""
    out = {"stade": __version__, "python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = "not installed"
    return out
