"""`stade eval` and `stade compare`: measure results files, then set them side by side."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from stade_cli.base.artifacts import Results

from stade_cli.cli.options import (
    BatchOpt,
    CacheDirOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    cli_errors,
    named_models,
    plan_line,
    print_json,
)


@cli_errors
def eval_(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Hub id, local model folder, .gguf file, or 'smollm2-135m'; several models are evaluated in turn "
            "in one process (libraries and tasks loaded once).",
            metavar="MODEL",
            callback=named_models,
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
    from stade_cli.base.console import err
    from stade_cli.base.files import check_apart, check_writable, claimed
    from stade_cli.cli.tables import render_results
    from stade_cli.evaluation.evaluate import EvalConfig, evaluate_spec, prepare, results_paths
    from stade_cli.models.dispatch import parse_max_memory, wants_dispatch
    from stade_cli.models.loading import resolve_device, resolve_model

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
    for model in models:  # a local folder that is no model fails in a second, before any dataset loads
        if Path(model).expanduser().is_dir():
            resolve_model(model)
    ready, most_tokens = prepare(config, cache)  # every task and dataset loaded before the first model runs
    documents = []
    with contextlib.ExitStack() as held:
        for path in paths:  # each results file is this run's from now: a second eval writing it is refused
            held.enter_context(claimed(path))
        for model, path in zip(models, paths, strict=True):
            if not spread:  # a model spread over devices fits by construction
                plan_line("eval", model, dev, None, cache_dir, seqlen=seqlen, nsamples=min(batch_size, max_windows
                          or batch_size), batch_size=batch_size, dtype=dtype, eval_tokens=most_tokens)  # fmt: skip
            run_dtype = dtype.value if dtype else None
            results = evaluate_spec(model, config, dev, cache, ready, run_dtype, max_memory if spread else None, spread)
            _save(path, results, force)
            documents.append(results)
            if not as_json:
                render_results(results)
    if as_json:
        print_json(documents[0].dump() if len(documents) == 1 else [d.dump() for d in documents])


def _save(path: Path, results: Results, force: bool) -> None:
    """The results file, and the model card's results where `stade prune` wrote the model; nothing computed is lost
    when the results cannot be written: they go to stdout."""
    from stade_cli.base.console import err
    from stade_cli.base.errors import StadeError
    from stade_cli.base.modelcard import add_results
    from stade_cli.evaluation.evaluate import write_results

    try:
        write_results(path, results, force)
    except StadeError as exc:
        print_json(results.dump())
        raise StadeError(exc.message, "the results are printed above on stdout; save them from there") from None
    if results.pruning is not None:  # a folder `stade prune` wrote: its model card gets the results
        try:
            add_results(Path(results.model.path), results)
        except OSError as exc:
            err.print(f"Warning: the model card was not updated ({exc.strerror}).", style="yellow", highlight=False)


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

    from stade_cli.base.console import err
    from stade_cli.cli.tables import render_comparison
    from stade_cli.evaluation.compare import compare as run
    from stade_cli.evaluation.plot import check_plot_path
    from stade_cli.evaluation.plot import plot as draw

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
