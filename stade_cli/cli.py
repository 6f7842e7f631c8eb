"""The `stade` command line: parse, build a config, make one library call, render. Nothing else lives here."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from . import __version__

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="stade",
    help="Prune Hugging Face causal language models after training, with no retraining.\n\n"
    "Pipeline: [bold]calibrate[/] → [bold]prune[/] → [bold]eval[/] → [bold]compare[/].\n\n"
    "Example: stade calibrate smollm2-135m --data sample-wiki --out stats/",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
stats_app = typer.Typer(help="Inspect statistics artifacts written by `stade calibrate`.", no_args_is_help=True)
app.add_typer(stats_app, name="stats")


class Dtype(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


# Shared option aliases: one definition, the same spelling in every command.
ModelArg = Annotated[
    str,
    typer.Argument(help="Hub id, local model folder, .gguf file, or the built-in offline model 'smollm2-135m'."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel="Hardware")]
DtypeOpt = Annotated[
    Dtype | None,
    typer.Option(
        "--dtype", help="Weights dtype [default: the model's own; float32 on CPU].", rich_help_panel="Hardware"
    ),
]
CacheDirOpt = Annotated[
    Path | None, typer.Option("--cache-dir", help="Where downloaded weights and datasets are cached.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed for sampling.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Windows per forward pass.", min=1)]


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


def cli_errors(fn: F) -> F:
    """Turn a StadeError into one red line plus a hint (exit 1); STADE_DEBUG=1 shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .console import err
        from .errors import StadeError

        try:
            return fn(*args, **kwargs)
        except StadeError as exc:
            if os.environ.get("STADE_DEBUG"):
                raise
            err.print(f"[bold red]Error:[/] {exc.message}", highlight=False)
            if exc.hint:
                err.print(f"[yellow]Hint:[/] {exc.hint}", highlight=False)
            err.print("[dim]Set STADE_DEBUG=1 for the traceback.[/]")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[bold red]Interrupted.[/] No partial output was left behind.")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: object) -> None:
    from .console import out

    out.print_json(json.dumps(data))


@app.command()
@cli_errors
def calibrate(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the statistics artifact.")],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="c4, wikitext2, sample-wiki, sample-news, or a .txt/.jsonl/.parquet file, or a .safetensors "
            "file of token ids [n, seqlen].",
        ),
    ] = "sample-wiki",
    nsamples: Annotated[int | None, typer.Option(help="Number of calibration windows [default: 128].")] = None,
    seqlen: Annotated[int | None, typer.Option(help="Tokens per window [default: min(context, 2048)].")] = None,
    seed: SeedOpt = 0,
    hessian: Annotated[
        bool, typer.Option("--hessian", help="Also keep the second-moment matrices sparsegpt needs.")
    ] = False,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    cache_dir: CacheDirOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run calibration text through MODEL and save per-layer activation statistics.

    Example: stade calibrate smollm2-135m --data sample-wiki --nsamples 32 --seqlen 512 --hessian --out stats/
    """
    from .calibrate import CalibrationConfig
    from .calibrate import calibrate as run
    from .files import check_writable
    from .models import load_model, resolve_device
    from .tables import render_stats

    is_ids = data.endswith(".safetensors")
    config = CalibrationConfig(
        data=data,
        nsamples=nsamples if nsamples is not None or is_ids else 128,
        seqlen=seqlen,
        seed=seed,
        hessian=hessian,
        batch_size=batch_size,
    )
    check_writable(out, force)
    dev = resolve_device(device)
    loaded = load_model(model, dtype.value if dtype else None, dev, str(cache_dir) if cache_dir else None)
    stats = run(loaded, config, out, dev, force=force, cache_dir=str(cache_dir) if cache_dir else None)
    if as_json:
        print_json(stats.summary())
    else:
        render_stats(stats)


@stats_app.command("show")
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
