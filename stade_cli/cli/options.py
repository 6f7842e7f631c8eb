"""What every `stade` command shares: the option aliases, the error handling (`cli_errors`), the plan line.

Only typer at import time: the heavy libraries are imported inside the functions, so `stade --help` stays instant.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer

from stade_cli import __version__
from stade_cli.base.files import strict_json
from stade_cli.base.heap import bound_heap

P = ParamSpec("P")
R = TypeVar("R")


class Dtype(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


def named_models(value: str | list[str]) -> str | list[str]:
    """MODEL given as an empty name would be read as the current folder: refused before any work."""
    if any(not v.strip() for v in ([value] if isinstance(value, str) else value)):
        # most often a shell variable that was not set
        raise typer.BadParameter("the model is an empty name (''): give a folder, a hub id or smollm2-135m.")
    return value


# Shared option aliases: one definition, the same spelling in every command.
ModelArg = Annotated[
    str,
    typer.Argument(
        help="Hub id, local model folder, .gguf file, or the built-in offline model 'smollm2-135m'.",
        callback=named_models,
    ),
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
OnlyOpt = Annotated[
    str | None,
    typer.Option(
        "--only",
        help="Prune only the layers these comma-separated patterns match: 're:REGEX' (from the start of the full "
        "name) or a layer name such as mlp.down_proj. See docs/guide.md#choosing-layers.",
        rich_help_panel="Layers",
    ),
]
IgnoreOpt = Annotated[
    str | None,
    typer.Option(
        "--ignore",
        help="Keep dense the layers these comma-separated patterns match, e.g. 're:.*down_proj' or "
        "'re:model\\.layers\\.0\\.'.",
        rich_help_panel="Layers",
    ),
]


def cli_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Every failure as one red line plus a hint, never a traceback (STADE_DEBUG=1 shows it).

    A StadeError is the user's to fix (exit 1); out-of-memory gets the knobs that help (exit 1); any
    other exception is a bug: its traceback goes to a log file under $STADE_HOME (exit 1). Ctrl-C
    (exit 130) and SIGTERM from `timeout` or a scheduler (exit 143) clean up and say so.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from typer.exceptions import TyperException

        from stade_cli.base.errors import StadeError, Terminated, first_line

        previous = _on_sigterm()
        try:
            bound_heap()
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

    from stade_cli.base.console import err

    err.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        err.print(f"[yellow]Hint:[/] {escape(hint)}", highlight=False, soft_wrap=True)
    _say_left()
    err.print("[dim]Set STADE_DEBUG=1 for the traceback.[/]")
    raise typer.Exit(1)


def _interrupted(what: str, code: int) -> NoReturn:
    from stade_cli.base.console import err
    from stade_cli.base.files import LEFT

    err.print(f"[bold red]{what}[/]" + ("" if LEFT else " No partial output was left behind."))
    _say_left()
    raise typer.Exit(code)


def _say_left() -> None:
    """What the failed run keeps on disk (files.LEFT), one line each: the truth, not "nothing was left"."""
    from rich.markup import escape

    from stade_cli.base.console import err
    from stade_cli.base.files import LEFT

    for line in LEFT:
        err.print(f"[yellow]Kept:[/] {escape(line)}", highlight=False, soft_wrap=True)
    LEFT.clear()


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

    from stade_cli.base.errors import first_line
    from stade_cli.base.home import stade_home

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

    from stade_cli.base.errors import Terminated

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


def plan_line(
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

    from stade_cli.base.console import err
    from stade_cli.planning.plan import PlanConfig, ids_shape, preflight

    if data is not None and data.endswith(".safetensors"):  # token ids: the file says the shape
        shape = ids_shape(data)
        if shape is not None:
            kwargs["nsamples"] = min(kwargs.get("nsamples") or shape[0], shape[0])
            kwargs["seqlen"] = shape[1]
    if data is not None:
        kwargs["data"] = data
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    config = PlanConfig(**kwargs, dtype=dtype.value if dtype else None, timed=False)
    line = preflight(stage, model, config, dev, out, str(cache_dir) if cache_dir else None)  # every rank checks
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone speaks
        err.print(f"[dim]{escape(line)}[/]", highlight=False, soft_wrap=True)


def print_json(data: object) -> None:
    """Strict JSON on stdout, as every file stade writes (files.strict_json)."""
    from stade_cli.base.console import out

    out.print_json(json.dumps(strict_json(data), allow_nan=False))


def split_csv(value: str, option: str | None = None) -> list[str]:
    """A comma-separated option; with `option` named, an empty list is refused (it would do nothing)."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if option is not None and not items:
        raise typer.BadParameter(f"{value!r} names nothing; give at least one value.", param_hint=option)
    return items
