"""Rich consoles and progress bars: results go to stdout, progress and hints to stderr."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

out = Console()
err = Console(stderr=True)


def progress(disable: bool = False) -> Progress:
    """A progress bar on stderr with a free-text field for rates such as tokens/s (`disable`: drawn by another
    process, e.g. rank 0 under torchrun)."""
    return Progress(
        # Descriptions hold data and model names: shown as they are, never read as Rich markup.
        TextColumn("{task.description}", style="bold blue", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}", markup=False),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
        disable=disable,
    )
