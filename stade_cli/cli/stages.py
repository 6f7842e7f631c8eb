"""The Stages options of `stade prune` and `stade plan`, generated from the stage registries: each kind's selector
(--update, --allocation, --reconstruct) and each stage's settings (--admm-iters, --owl-lambda, ...). A new stage's
options appear here without an edit. Torch-free: the registries describe themselves without it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any

import typer

from stade_cli.cli.options import split_csv

PANEL = "Stages"
SELECTORS = {  # kind -> help; the option's name is the registry's
    "update": "Replace the method's weight update",
    "allocation": "Sparsity per block",
    "reconstruct": "After masking each block, tune its kept weights",
}


def _selector(kind: str) -> inspect.Parameter:
    from stade_cli.stages.config import PruneConfig
    from stade_cli.stages.stage import KINDS

    registry = KINDS[kind]
    default = getattr(PruneConfig, kind)  # the field's default
    shown = "the method's own" if default is None else default
    option = typer.Option(
        registry.option,
        help=f"{SELECTORS[kind]}: {', '.join(registry.names())} (see `stade methods`). \\[default: {shown}]",
        show_default=False,
        rich_help_panel=PANEL,
    )
    annotation = Annotated[str | None, option] if default is None else Annotated[str, option]
    return inspect.Parameter(kind, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def stage_parameters() -> list[inspect.Parameter]:
    """The selectors, then every stage setting the command line offers (stage.options)."""
    from stade_cli.stages.stage import options

    params = [_selector(kind) for kind in SELECTORS]
    for opt in options():
        option = typer.Option(opt.flag, help=opt.help, rich_help_panel=PANEL)
        params.append(
            inspect.Parameter(
                opt.param,
                inspect.Parameter.KEYWORD_ONLY,
                default=opt.default,
                annotation=Annotated[type(opt.default), option],
            )
        )
    return params


def with_stage_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give `command` the stage options: Typer reads its signature, and its `**stages` receives their values."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = signature.replace(parameters=[*own, *stage_parameters()])  # type: ignore[attr-defined]
    return command


def prune_configs(
    method: str,
    pattern: str,
    sparsity: str | None,
    stages: dict[str, Any],
    default_ratio: float | None = None,
    **common: Any,
) -> list[Any]:
    """One PruneConfig per method x pattern x ratio of the comma-separated options, with the chosen stages and
    their settings (`stages`: the stage options' values by parameter name). `default_ratio`: the unstructured ratio
    where --sparsity is not given (the plan's; prune refuses to guess)."""
    from stade_cli.base.errors import named_once
    from stade_cli.base.registry import normalise
    from stade_cli.stages.config import PruneConfig
    from stade_cli.stages.pattern import parse_pattern, pattern_key
    from stade_cli.stages.stage import settings_from

    ratios: list[float | None] = [None]
    if sparsity is not None:
        try:
            ratios = [float(r) for r in split_csv(sparsity, "--sparsity")]
        except ValueError:
            raise typer.BadParameter(
                f"{sparsity!r} is not a comma-separated list of numbers.", param_hint="--sparsity"
            ) from None
    chosen = {kind: stages[kind] for kind in SELECTORS}
    values = {k: v for k, v in stages.items() if k not in SELECTORS}
    methods, patterns = split_csv(method, "--method"), split_csv(pattern, "--pattern")
    named_once("--method", methods, [normalise(m) for m in methods])
    named_once("--pattern", patterns, [pattern_key(p) for p in patterns])
    named_once("--sparsity", ratios)
    configs: list[PruneConfig] = []
    for m in methods:
        for p in patterns:
            for r in ratios:  # an N:M pattern fixes the ratio: every --sparsity given must agree with it
                if r is None and not parse_pattern(p).structured:
                    r = default_ratio
                plain = PruneConfig(m, r, p, **common, **chosen)  # which stages run: only their options are read
                used = {st.name for st in plain.stages}
                c = replace(plain, settings=settings_from(values, used)) if values else plain
                if not (parse_pattern(p).structured and c in configs):
                    configs.append(c)
    return configs
