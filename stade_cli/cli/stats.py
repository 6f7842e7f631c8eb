"""`stade stats show` and `stade stats merge`: inspect and join statistics artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stade_cli.cli.options import ForceOpt, JsonOpt, cli_errors, print_json


@cli_errors
def stats_show(
    path: Annotated[Path, typer.Argument(help="A folder written by `stade calibrate`.")],
    as_json: JsonOpt = False,
) -> None:
    """Summarise a statistics artifact: model, data, per-block channel mean/std ranges.

    Example: stade stats show stats/ --json
    """
    from stade_cli.cli.tables import render_stats
    from stade_cli.stats.artifact import Statistics

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
    from stade_cli.cli.tables import render_stats
    from stade_cli.stats.merge import merge_statistics

    stats = merge_statistics(paths, out, force)
    if as_json:
        print_json(stats.summary())
    else:
        render_stats(stats)
