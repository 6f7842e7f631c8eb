"""The `stade` command line: parse, build a config, make one library call, render. Nothing else lives here.

The commands live one group per module (calibrate, stats, prune, plan, evaluate), their shared options and error
handling in options.py, the generated stage options in stages.py; this module makes the `stade` app and registers the
commands, in help order.
"""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from stade_cli import __version__
from stade_cli.cli.calibrate import calibrate
from stade_cli.cli.evaluate import compare, eval_
from stade_cli.cli.finetune import finetune
from stade_cli.cli.plan import methods, plan
from stade_cli.cli.prune import prune
from stade_cli.cli.stats import stats_merge, stats_show

app = typer.Typer(
    name="stade",
    help="Prune Hugging Face causal language models after training, with no retraining.\n\n"
    "Pipeline: [bold]calibrate[/] → [bold]prune[/] → ([bold]finetune[/]) → [bold]eval[/] → [bold]compare[/].\n\n"
    "Example: stade calibrate smollm2-135m --data sample-wiki --out stats/",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
stats_app = typer.Typer(help="Inspect statistics artifacts written by `stade calibrate`.", no_args_is_help=True)
app.add_typer(stats_app, name="stats")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"stade {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Prune Hugging Face causal language models after training."""


app.command()(calibrate)
stats_app.command("show")(stats_show)
stats_app.command("merge")(stats_merge)
app.command()(prune)
app.command()(finetune)
app.command()(plan)
app.command()(methods)
app.command("eval")(eval_)
app.command()(compare)


def main() -> None:
    """The `stade` process: after Ctrl-C or SIGTERM has been handled (exit 130 or 143), another one is ignored, so
    that it cannot interrupt the exit itself (torch's atexit hooks printed a KeyboardInterrupt traceback)."""
    try:
        app()
    except SystemExit as exc:
        if exc.code in (130, 143):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise


if __name__ == "__main__":
    main()
