"""`stade stats show` and `stade stats merge`: inspect and join statistics artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .cliutil import ForceOpt, JsonOpt, cli_errors, print_json


@cli_errors
def stats_show(
    path: Annotated[Path, typer.Argument(help="A folder written by `stade calibrate`.")],
    as_json: JsonOpt = False,
) -> None:
    """Summarise a statistics artifact: model, data, per-block channel mean/std ranges.

    Example: stade stats show stats/ --json
    """
    from .stats import Statistics
    from .tables import render_stats

    stats = Statistics.load(path)
    if as_json:
        print_json(stats.summary())
    else:
        render_stats(stats)


@cli_errors
def stats_merge(
    paths: Annotated[
        list[Path], typer.Argument(help="Shard folders written by `stade calibrate --shard I/N`.", metavar="SHARD")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged statistics artifact.")],
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Merge the shards of one calibration into the artifact the whole run would have written.

    Example: stade stats merge stats-0/ stats-1/ stats-2/ stats-3/ --out stats/
    """
    from .merge import merge_statistics
    from .tables import render_stats

    stats = merge_statistics(paths, out, force)
    if as_json:
        print_json(stats.summary())
    else:
        render_stats(stats)
