"""Where stade keeps what it makes once and reuses: converted models, prepared text, task files, logs."""

from __future__ import annotations

import os
from pathlib import Path


def stade_home() -> Path:
    """Where converted models and prepared text live ($STADE_HOME, default ~/.cache/stade)."""
    return Path(os.environ.get("STADE_HOME", Path.home() / ".cache" / "stade")).expanduser()
