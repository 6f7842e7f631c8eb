"""The `stade` command line: parse, build a config, make one library call, render. Nothing else lives here."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer

from . import __version__

P = ParamSpec("P")
R = TypeVar("R")

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
# Help text goes through Rich markup: a literal "[" must be written "\\[", or the bracketed text vanishes.
RUN_DTYPE_HELP = "The dtype the model is loaded and run in. \\[default: the model's own on a GPU; float32 on CPU]"
DtypeOpt = Annotated[Dtype | None, typer.Option("--dtype", help=RUN_DTYPE_HELP, rich_help_panel="Hardware")]
CacheDirOpt = Annotated[
    Path | None, typer.Option("--cache-dir", help="Where downloaded weights and datasets are cached.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for drawing the calibration windows.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Windows per forward pass.", min=1)]


def _stage(flag: str, help: str, **kwargs: Any) -> Any:
    """An option of `stade prune`'s Stages panel (score, update, allocation, reconstruction and their settings)."""
    return typer.Option(flag, help=help, rich_help_panel="Stages", **kwargs)


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


def cli_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Every failure as one red line plus a hint, never a traceback (STADE_DEBUG=1 shows it).

    A StadeError is the user's to fix (exit 1); out-of-memory gets the knobs that help (exit 1); any
    other exception is a bug: its traceback goes to a log file under $STADE_HOME (exit 1). Ctrl-C
    (exit 130) and SIGTERM from `timeout` or a scheduler (exit 143) clean up and say so.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from typer.exceptions import TyperException

        from .errors import StadeError, Terminated, first_line

        previous = _on_sigterm()
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, TyperException):  # usage errors: click's own message and exit 2
            raise
        except StadeError as exc:
            if os.environ.get("STADE_DEBUG"):
                raise
            _fail(exc.message, exc.hint)
        except KeyboardInterrupt:
            _interrupted("Interrupted.", 130)
        except Terminated:
            _interrupted("Terminated (SIGTERM).", 143)
        except Exception as exc:
            if os.environ.get("STADE_DEBUG"):
                raise
            if isinstance(exc, OSError) and exc.filename:  # the machine's, not a bug: a file that cannot be used
                _fail(f"{exc.strerror or exc}: {str(exc.filename)!r}", None)
            if _out_of_memory(exc):
                _fail(
                    f"Out of memory: {first_line(exc)}",
                    "lower --batch-size, or use --device auto to run where there is more memory",
                )
            _fail(*_unexpected(exc))
        finally:
            _restore_sigterm(previous)

    return wrapper


def _fail(message: str, hint: str | None) -> NoReturn:
    from rich.markup import escape

    from .console import err

    err.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        err.print(f"[yellow]Hint:[/] {escape(hint)}", highlight=False, soft_wrap=True)
    err.print("[dim]Set STADE_DEBUG=1 for the traceback.[/]")
    raise typer.Exit(1)


def _interrupted(what: str, code: int) -> NoReturn:
    from .console import err

    err.print(f"[bold red]{what}[/] No partial output was left behind.")
    raise typer.Exit(code)


def _out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, and the CPU allocator's RuntimeError when main memory runs out."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def _unexpected(exc: BaseException) -> tuple[str, str]:
    """Write the traceback to $STADE_HOME/logs/stade-<time>.log; the message and hint that point at it."""
    import sys
    import traceback
    from datetime import datetime, timezone

    from .errors import first_line
    from .models import stade_home

    summary = f"Unexpected {type(exc).__name__}: {first_line(exc)}"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    log = stade_home() / "logs" / f"stade-{stamp}.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(
            f"stade {__version__}\ncommand: {' '.join(sys.argv)}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        )
    except OSError as log_exc:
        return summary, f"the report could not be written to {log} ({log_exc.strerror}); run with STADE_DEBUG=1"
    return f"{summary} (the full report is in {log})", "this is a bug in stade: please report it with that file"


def _on_sigterm() -> Any:
    """Turn SIGTERM into an exception, so that partial outputs are removed as on Ctrl-C."""
    import signal
    import threading

    from .errors import Terminated

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(_signum: int, _frame: object) -> None:
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous: Any) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def command_line(ctx: typer.Context) -> str:
    """The running command as the user gave it (arguments, then each option set on the command line), for the
    model card: rebuilt from the parsed parameters, so that it reads the same however stade was started."""
    import shlex

    args, opts = ["stade", ctx.info_name or ""], []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name) if param.name else None
        if param.name is None or source is None or source.name != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        if param.param_type_name == "argument":
            args += [str(v) for v in (value if isinstance(value, list | tuple) else [value])]
        elif getattr(param, "is_flag", False):
            names = param.opts if value or not param.secondary_opts else param.secondary_opts
            opts.append(max(names, key=len))
        else:
            opts += [max(param.opts, key=len), str(value.value if isinstance(value, Enum) else value)]
    return shlex.join(args + opts)


def _plan_line(
    stage: str,
    model: str,
    dev: Any,
    out: Path | None,
    cache_dir: Path | None,
    data: str | None = None,
    dtype: Dtype | None = None,
    **kwargs: Any,
) -> None:
    """Print `stade plan`'s one line for this run on stderr; refuse a run that cannot fit (plan.preflight)."""
    from rich.markup import escape

    from .console import err
    from .plan import PlanConfig, ids_shape, preflight

    if data is not None and data.endswith(".safetensors"):  # token ids: the file says the shape
        shape = ids_shape(data)
        if shape is not None:
            kwargs["nsamples"] = min(kwargs.get("nsamples") or shape[0], shape[0])
            kwargs["seqlen"] = shape[1]
    if data is not None:
        kwargs["data"] = data
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    config = PlanConfig(**kwargs, dtype=dtype.value if dtype else None, timed=False)
    line = preflight(stage, model, config, dev, out, str(cache_dir) if cache_dir else None)
    err.print(f"[dim]{escape(line)}[/]", highlight=False, soft_wrap=True)


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
            help="c4 or wikitext2 (from the hub, as published), a local .txt/.jsonl/.parquet file, a .safetensors "
            "file of token ids \\[n, seqlen], or the offline samples sample-wiki and sample-news (pip install "
            "'stade\\[demo]').",
        ),
    ] = "c4",
    nsamples: Annotated[
        int | None,
        typer.Option(
            help="Number of calibration windows. \\[default: 128; a token-id file: all its windows]",
            show_default=False,
        ),
    ] = None,
    seqlen: Annotated[
        int | None, typer.Option(help="Tokens per window. \\[default: min(context, 2048)]", show_default=False)
    ] = None,
    seed: SeedOpt = 0,
    hessian: Annotated[
        bool, typer.Option("--hessian", help="Also keep the second-moment matrices sparsegpt needs.")
    ] = False,
    hessian_dtype: Annotated[
        str,
        typer.Option(
            "--hessian-dtype", help="float32 or bfloat16 (half the disk); SparseGPT solves in float32 either way."
        ),
    ] = "float32",
    batch_size: BatchOpt = 8,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="I/N: only part I (0-based) of N of the drawn windows, for a job array; join the parts with "
            "`stade stats merge`.",
            rich_help_panel="Several machines",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue a killed run from its last committed block.", rich_help_panel="Several machines"
        ),
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    cache_dir: CacheDirOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run calibration text through MODEL and save per-layer activation statistics.

    Example: stade calibrate meta-llama/Llama-3.2-1B --data c4 --hessian --out stats/

    Offline: stade calibrate smollm2-135m --data notes.txt --nsamples 32 --seqlen 512 --out stats/

    On K GPUs: torchrun --nproc-per-node K -m stade_cli calibrate MODEL --hessian --out stats/
    """
    from .calibrate import CalibrationConfig, load_data
    from .calibrate import calibrate as run
    from .distributed import cuda_device_for, group_for
    from .files import check_apart, check_writable
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
        hessian_dtype=hessian_dtype,
        shard=shard,
    )
    check_writable(out, force)
    check_apart(out, [("the model", model), ("the --data file", data)])
    dev = cuda_device_for(resolve_device(device))
    _plan_line(
        "calibrate",
        model,
        dev,
        out,
        cache_dir,
        data=data,
        nsamples=config.nsamples,
        seqlen=seqlen,
        hessian=hessian,
        hessian_dtype=hessian_dtype,
        batch_size=batch_size,
        dtype=dtype,
    )
    cache = str(cache_dir) if cache_dir else None
    docs = load_data(config, cache)  # before the model: a source that cannot be had fails in seconds
    loaded = load_model(model, dtype.value if dtype else None, dev, cache, lazy=True)
    with group_for(dev) as group:
        stats = run(loaded, config, out, dev, force=force, cache_dir=cache, docs=docs, resume=resume, group=group)
    if stats is None:  # another rank than 0: rank 0 reports
        return
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


@stats_app.command("merge")
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


def _csv(value: str, option: str | None = None) -> list[str]:
    """A comma-separated option; with `option` named, an empty list is refused (it would do nothing)."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if option is not None and not items:
        raise typer.BadParameter(f"{value!r} names nothing; give at least one value.", param_hint=option)
    return items


@app.command()
@cli_errors
def prune(
    ctx: typer.Context,
    model: ModelArg,
    stats: Annotated[Path, typer.Option("--stats", "-s", help="Statistics folder from `stade calibrate`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output checkpoint folder (a sweep: one sub-folder each).")],
    method: Annotated[str, typer.Option("--method", "-m", help="Method(s), comma-separated; see `stade methods`.")],
    sparsity: Annotated[
        str | None,
        typer.Option(
            "--sparsity",
            help="Ratio(s) in \\[0, 1), comma-separated. \\[default: N/M for an N:M pattern]",
            show_default=False,
        ),
    ] = None,
    pattern: Annotated[
        str, typer.Option("--pattern", "-p", help="unstructured or N:M (2:4, 4:8, ...), comma-separated.")
    ] = "unstructured",
    sequential: Annotated[
        bool, typer.Option("--sequential", help="Recalibrate each block on the pruned blocks' outputs (published).")
    ] = False,
    bias_update: Annotated[
        bool, typer.Option("--bias-update/--no-bias-update", help="STADE's bias compensation (stade, stadew).")
    ] = True,
    reconstruct: Annotated[
        str,
        _stage(
            "--reconstruct",
            "none, or block: after masking each block, tune its kept weights to the dense block's outputs.",
        ),
    ] = "none",
    reconstruct_steps: Annotated[
        int, typer.Option("--reconstruct-steps", help="Adam steps per block (at most; stops early).", min=1)
    ] = 20,  # reconstruct.DEFAULT_STEPS (not imported here: torch would slow down --help)
    update: Annotated[
        str | None,
        _stage(
            "--update",
            "Replace the method's weight update: none, bias, obs, admm (see `stade methods`). "
            "\\[default: the method's own]",
            show_default=False,
        ),
    ] = None,
    allocation: Annotated[str, _stage("--allocation", "Sparsity per block: uniform, or owl (unstructured only).")] = (
        "uniform"
    ),
    admm_iters: Annotated[int, _stage("--admm-iters", "ADMM iterations.", min=1)] = 20,
    admm_rho: Annotated[float, _stage("--admm-rho", "ADMM penalty rho (on H scaled to unit diagonal).")] = 1.0,
    admm_rho_growth: Annotated[
        float, _stage("--admm-rho-growth", "Multiply rho by this each iteration once the mask is fixed.")
    ] = 1.0,
    admm_mask_iters: Annotated[int, _stage("--admm-mask-iters", "Iterations that grow the mask (--method admm).")] = 15,
    owl_m: Annotated[float, _stage("--owl-m", "OWL: outlier threshold, times the block's mean score.")] = 5.0,
    owl_lambda: Annotated[float, _stage("--owl-lambda", "OWL: block ratios within sparsity ± lambda.")] = 0.08,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random method's noise (no other method draws).")] = 0,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    dtype: Annotated[
        Dtype | None,
        typer.Option(
            "--dtype",
            help="The dtype the checkpoint is saved in. \\[default: the checkpoint's own] Scores are always computed "
            "in float32, and --sequential's forward passes run in float32 on CPU (the checkpoint's own dtype on a "
            "GPU).",
            rich_help_panel="Hardware",
        ),
    ] = None,
    cache_dir: CacheDirOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Prune MODEL with cached statistics and write checkpoints that plain transformers loads, each with a
    README.md model card (eval adds its results) and stade.json.

    Example: stade prune smollm2-135m --stats stats/ --method wanda,stade --pattern unstructured,2:4
    --sparsity 0.5 --out pruned/

    With block reconstruction: stade prune smollm2-135m --stats stats/ --method wanda --pattern 2:4
    --reconstruct block --reconstruct-steps 20 --out pruned/

    Stages: stade prune smollm2-135m --stats stats/ --method wanda --update admm --allocation owl --sparsity 0.6
    --out pruned/

    On K GPUs (sequential): torchrun --nproc-per-node K -m stade_cli prune MODEL --sequential ...
    """
    from .admm import AdmmSettings
    from .allocation import OwlSettings
    from .distributed import cuda_device_for, group_for, launched
    from .errors import StadeError
    from .files import check_apart, check_writable
    from .masks import parse_pattern
    from .models import load_model, parse_dtype, resolve_device
    from .prune import written_paths
    from .pruneconfig import PruneConfig
    from .stats import Statistics
    from .streaming import prune_checkpoints
    from .tables import render_prune, render_sweep

    ratios: list[float | None] = [None]
    if sparsity is not None:
        try:
            ratios = [float(r) for r in _csv(sparsity, "--sparsity")]
        except ValueError:
            raise typer.BadParameter(
                f"{sparsity!r} is not a comma-separated list of numbers.", param_hint="--sparsity"
            ) from None
    configs: list[PruneConfig] = []
    for m in _csv(method, "--method"):
        for p in _csv(pattern, "--pattern"):
            for r in ratios:  # an N:M pattern fixes the ratio: every --sparsity given must agree with it
                c = PruneConfig(
                    m,
                    r,
                    p,
                    bias_update,
                    sequential,
                    seed,
                    reconstruct=reconstruct,
                    reconstruct_steps=reconstruct_steps,
                    update=update,
                    allocation=allocation,
                    admm=AdmmSettings(admm_iters, admm_rho, admm_rho_growth, admm_mask_iters),
                    owl=OwlSettings(owl_m, owl_lambda),
                )
                if not (parse_pattern(p).structured and c in configs):
                    configs.append(c)
    for path in written_paths(out, configs):
        check_writable(path, force)
        check_apart(path, [("--stats", stats), ("the model", model)])
    if launched() and not sequential:
        raise StadeError(
            "Under torchrun, prune splits the calibration windows over the ranks: that needs --sequential.",
            "add --sequential, or run a one-shot prune as a single process (it has no windows to split)",
        )
    stats_art = Statistics.load(stats)
    dev = cuda_device_for(resolve_device(device))
    _plan_line(
        "prune",
        model,
        dev,
        None,
        cache_dir,
        nsamples=stats_art.manifest["data"]["nsamples"],
        seqlen=stats_art.manifest["data"]["seqlen"],
        methods=tuple(sorted({c.method for c in configs})),
        sequential=sequential,
        batch_size=batch_size,
        dtype=dtype,
    )  # the disk: stream_sweep's check_space
    # Computed in float32 on CPU (the checkpoint's own dtype on a GPU), as calibrate runs; saved in --dtype, by
    # default the checkpoint's own. Blocks stream from disk one at a time where the checkpoint allows (streaming.py).
    loaded = load_model(model, None, dev, str(cache_dir) if cache_dir else None, lazy=True)
    with group_for(dev) as group:
        results = prune_checkpoints(
            loaded,
            stats_art,
            configs,
            out,
            dev,
            force,
            parse_dtype(dtype.value if dtype else None),
            batch_size,
            command=command_line(ctx),
            group=group,
        )
    if not results:  # another rank than 0 under torchrun: rank 0 reports
        return
    if as_json:
        print_json(
            [{"path": str(p), **r} for p, r in results]
            if len(results) > 1
            else {"path": str(results[0][0]), **results[0][1]}
        )
    elif len(results) == 1:
        render_prune(str(results[0][0]), results[0][1])
    else:
        render_sweep([(str(p), r) for p, r in results])


@app.command()
@cli_errors
def plan(
    model: ModelArg,
    data: Annotated[
        str, typer.Option("--data", help="Calibration source: a text source, or a .safetensors file of token ids.")
    ] = "sample-wiki",
    nsamples: Annotated[int, typer.Option(help="Calibration windows.", min=1)] = 128,
    seqlen: Annotated[int | None, typer.Option(help="Tokens per window.", show_default="min(context, 2048)")] = None,
    hessian: Annotated[bool, typer.Option("--hessian", help="Plan calibrate with Hessians (sparsegpt).")] = False,
    hessian_dtype: Annotated[str, typer.Option("--hessian-dtype", help="float32 or bfloat16.")] = "float32",
    method: Annotated[str, typer.Option("--method", "-m", help="Method(s) to prune with, comma-separated.")] = "wanda",
    pattern: Annotated[str, typer.Option("--pattern", "-p", help="unstructured or N:M.")] = "unstructured",
    sequential: Annotated[bool, typer.Option("--sequential", help="Plan a sequential prune.")] = False,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    timed: Annotated[
        bool, typer.Option("--time/--no-time", help="Time one block here for the time estimate (random weights).")
    ] = True,
    cache_dir: CacheDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Estimate memory, disk and time of calibrate, prune and eval from MODEL's config alone (no weights read).

    MODEL may also be a folder or a config.json file with no weights. Memory figures are peaks derived from the
    shapes; the time is an ESTIMATE scaled from one block's forward pass timed on this device.

    Example: stade plan meta-llama/Llama-3.1-8B --nsamples 128 --seqlen 2048 --hessian --method sparsegpt
    --device cuda
    """
    from .masks import parse_pattern
    from .models import resolve_device
    from .plan import PlanConfig, make_plan
    from .tables import render_plan

    for p in _csv(pattern, "--pattern"):
        parse_pattern(p)  # a bad pattern is refused as prune would
    config = PlanConfig(
        nsamples,
        seqlen,
        hessian,
        hessian_dtype,
        tuple(_csv(method, "--method")),
        pattern,
        sequential,
        batch_size,
        dtype.value if dtype else None,
        timed,
        data,
    )
    result = make_plan(model, config, resolve_device(device), str(cache_dir) if cache_dir else None)
    if as_json:
        print_json(result.to_dict())
    else:
        render_plan(result.to_dict())


@app.command()
@cli_errors
def methods(as_json: JsonOpt = False) -> None:
    """List the methods (presets) and every pruning stage: scores, updates, allocations.

    Example: stade methods --json
    """
    from .methods import stage_rows

    rows = stage_rows()
    if as_json:
        print_json(rows)
    else:
        from .tables import render_methods

        render_methods(rows)


@app.command("eval")
@cli_errors
def eval_(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Hub id, local model folder, .gguf file, or 'smollm2-135m'; several models are evaluated in turn "
            "in one process (libraries and tasks loaded once).",
            metavar="MODEL",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="The results JSON file to write; with several models, a folder for one file each."
        ),
    ],
    ppl: Annotated[
        str,
        typer.Option(
            "--ppl",
            help="Perplexity datasets, comma-separated: wikitext2 and c4 (from the hub, as published), a local "
            ".txt/.jsonl/.parquet file, a .safetensors file of ids \\[1, N], or the offline sample-news and "
            "sample-wiki (pip install 'stade\\[demo]'); 'none' skips perplexity.",
        ),
    ] = "wikitext2",
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks",
            help="Zero-shot lm_eval tasks, comma-separated: 'paper' (the published seven: "
            "boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa; from the hub), task names, "
            "local task .yaml files, or the offline 'stade_cloze'. \\[default: none, perplexity only]",
            show_default=False,
        ),
    ] = None,
    seqlen: Annotated[
        int | None,
        typer.Option(help="Tokens per perplexity window. \\[default: min(context, 2048)]", show_default=False),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most N items per zero-shot task (for quick checks).")] = None,
    max_windows: Annotated[
        int | None,
        typer.Option(help="Only the first N perplexity windows (quick checks; the published protocol uses all)."),
    ] = None,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    max_memory: Annotated[
        str | None,
        typer.Option(
            "--max-memory",
            help="Spread the model over devices within these budgets, as accelerate spells them: "
            "0=70GiB,1=70GiB,cpu=200GiB (the rest is read from disk as it runs). --device auto with several GPUs "
            "spreads over them even without it.",
            rich_help_panel="Hardware",
        ),
    ] = None,
    dtype: DtypeOpt = None,
    cache_dir: CacheDirOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure each MODEL's perplexity (and, with --tasks, zero-shot accuracy) as published; write a results file.

    Example: stade eval pruned/wanda-50/ --out results/wanda-50.json

    As published: stade eval pruned/wanda-50/ --ppl wikitext2,c4 --tasks paper --out results/wanda-50.json

    Offline: stade eval pruned/wanda-50/ --ppl sample-news --tasks stade_cloze --out results/wanda-50.json

    Several models (e.g. a whole sweep): stade eval smollm2-135m pruned/*/ --ppl sample-news --out results/
    """
    import tempfile

    from .console import err
    from .dispatch import dispatch_kwargs, parse_max_memory, wants_dispatch
    from .errors import StadeError
    from .evaluate import EvalConfig, evaluate_model, prepare, results_paths, write_results
    from .files import check_apart, check_writable
    from .modelcard import add_results
    from .models import load_model, resolve_device
    from .tables import render_results

    config = EvalConfig.from_strings(
        ppl, tasks, seqlen=seqlen, batch_size=batch_size, limit=limit, max_windows=max_windows
    )
    paths = results_paths(models, out)
    for path in paths:
        check_writable(path, force)
        check_apart(path, [("the model", m) for m in models] + [("the --ppl file", p) for p in config.ppl])
    if tasks is None:
        err.print(
            "Perplexity only. For zero-shot accuracy add --tasks paper (the published seven, from the hub) "
            "or --tasks stade_cloze (offline).",
            style="dim",
            highlight=False,
        )
    dev = resolve_device(device)
    cache = str(cache_dir) if cache_dir else None
    spread = wants_dispatch(device, max_memory)
    if max_memory is not None:
        parse_max_memory(max_memory)  # a bad budget fails before any model loads
    ready = prepare(config, cache)  # every task and dataset loaded before the first model runs
    documents = []
    for model, path in zip(models, paths, strict=True):
        if not spread:  # a model spread over devices fits by construction
            _plan_line(
                "eval",
                model,
                dev,
                None,
                cache_dir,
                seqlen=seqlen,
                nsamples=batch_size,
                batch_size=batch_size,
                dtype=dtype,
            )
        with tempfile.TemporaryDirectory(prefix="stade-offload-") as offload:
            dispatch = dispatch_kwargs(max_memory, offload) if spread else None
            loaded = load_model(model, dtype.value if dtype else None, dev, cache, dispatch=dispatch)
            results = evaluate_model(loaded, config, dev, cache, ready)
            del loaded  # the next model loads into the memory this one frees
        try:
            write_results(path, results, force)
        except StadeError as exc:  # nothing computed is lost: the results go to stdout instead
            print_json(results)
            raise StadeError(exc.message, "the results are printed above on stdout; save them from there") from None
        if results["pruning"] is not None:  # a folder `stade prune` wrote: its model card gets the results
            try:
                add_results(Path(results["model"]["path"]), results)
            except OSError as exc:
                err.print(f"Warning: the model card was not updated ({exc.strerror}).", style="yellow", highlight=False)
        documents.append(results)
        if not as_json:
            render_results(results)
    if as_json:
        print_json(documents[0] if len(documents) == 1 else documents)


@app.command()
@cli_errors
def compare(
    results: Annotated[list[Path], typer.Argument(help="Results files from `stade eval`, or folders of them.")],
    baseline: Annotated[
        Path | None,
        typer.Option(
            "--baseline",
            help="The results to compare against. \\[default: the dense model, if any]",
            show_default=False,
        ),
    ] = None,
    sort: Annotated[
        str | None, typer.Option("--sort", help="Sort by a column: a result (ppl:wikitext2, acc:mean), sparsity, ...")
    ] = None,
    as_json: JsonOpt = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table on stdout.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV on stdout.")] = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Also draw perplexity against sparsity to this .png file.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing --plot file.")] = False,
) -> None:
    """Compare results files side by side: best value per column, change against the dense baseline.

    Example: stade compare results/ --sort ppl:wikitext2 --plot ppl.png
    """
    from rich.markup import escape

    from .compare import check_plot_path
    from .compare import compare as run
    from .compare import plot as draw
    from .console import err
    from .tables import render_comparison

    if as_json + markdown + as_csv > 1:
        raise typer.BadParameter("choose one of --json, --markdown and --csv.")
    if plot is not None:
        check_plot_path(plot, force)
    comparison = run(results, baseline, sort)
    if plot is not None:
        err.print(f"Plot written to {escape(str(draw(comparison, plot, force)))}", highlight=False)
    if as_json:
        print_json(comparison.to_dict())
    elif markdown or as_csv:
        typer.echo(comparison.to_markdown() if markdown else comparison.to_csv(), nl=False)
        for note in comparison.notes:  # why columns are apart, or rows without deltas: beside the table, not in it
            err.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    else:
        render_comparison(comparison)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
