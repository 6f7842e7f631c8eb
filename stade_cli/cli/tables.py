"""Rich renderings of artifacts and reports (stdout); the library never prints."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from stade_cli.base.console import out

if TYPE_CHECKING:
    from stade_cli.base.artifacts import LayerResult, PruneRecord, Results
    from stade_cli.evaluation.compare import Comparison
    from stade_cli.stats.artifact import Statistics


def render_stats(stats: Statistics) -> None:
    s = stats.summary()
    data = s["data"]
    out.print(f"[bold]Statistics[/] {escape(s['path'])}  [dim]{s['fingerprint'][:16]}[/]")
    out.print(
        f"model [cyan]{escape(s['model']['spec'])}[/] ({s['model']['architecture']}, {s['dtype']}), "
        f"{s['layers']} linear layers in {len(s['blocks'])} blocks"
    )
    out.print(
        f"data [cyan]{escape(data['source'])}[/]: {data['nsamples']} x {data['seqlen']} tokens, seed {data['seed']}, "
        f"ids sha256 {data['token_ids_sha256'][:12]}; statistics: {', '.join(s['statistics'])}"
    )
    for note in data.get("notes", []):
        out.print(f"[yellow]note:[/] {escape(note)}")
    for w in s.get("warnings", []):
        out.print(f"[yellow]warning:[/] {escape(w)}")
    table = Table(title="Layer inputs per block")
    for col in ("block", "inputs", "channels", "mean min", "mean max", "std min", "std max", "|mean|>std"):
        table.add_column(col, justify="right")
    for r in s["blocks"]:
        table.add_row(
            str(r["block"]),
            str(r["inputs"]),
            str(r["channels"]),
            f"{r['mean_min']:.3g}",
            f"{r['mean_max']:.3g}",
            f"{r['std_min']:.3g}",
            f"{r['std_max']:.3g}",
            str(r["off_centre"]),
        )
    out.print(table)


def render_methods(rows: list[dict]) -> None:
    table = Table(title="Pruning methods (presets) and stages (--update, --allocation)")
    for col in ("kind", "name", "statistics", "stages / description"):
        table.add_column(col)
    for r in rows:
        what = f"{r['stages']}: {r['description']}" if "stages" in r else r["description"]
        table.add_row(r["kind"], f"[bold]{r['name']}[/]", ", ".join(r["needs"]) or "weights only", what)
    out.print(table)


def _stages(report: PruneRecord) -> str:
    """The stages a run changed from its method's own: ' (update admm, allocation owl: 0.42-0.58)'."""
    stages = report.stages
    parts = [f"update {stages.update.name}"]
    if report.block_sparsity:
        ratios = report.block_sparsity.values()
        parts.append(f"allocation {stages.allocation.name}: blocks {min(ratios):.3f}-{max(ratios):.3f}")
    if stages.reconstruct.settings is not None:
        parts.append(f"reconstruct {stages.reconstruct.name}")
    return f" ({', '.join(parts)})"


def render_prune(path: str, report: PruneRecord) -> None:
    """Per-block sparsity and estimated relative output error of one pruned checkpoint."""
    blocks: dict[str, list[LayerResult]] = {}
    for layer in report.layers:
        blocks.setdefault(_block_of(layer.name), []).append(layer)
    mode = "sequential" if report.sequential else "one-shot"
    table = Table(
        title=f"{report.method}{_stages(report)} {report.pattern} {report.sparsity:g} ({mode}) → {escape(path)}",
        caption=f"achieved sparsity {report.achieved_sparsity:.4f}; "
        f"prune {report.timings.get('prune_s', 0):.1f}s, write {report.timings.get('write_s', 0):.1f}s",
    )
    for col in ("block", "layers", "sparsity", "rel. output error (mean)", "rel. output error (max)", "bias updated"):
        table.add_column(col, justify="right")
    for block, layers in blocks.items():
        numel = sum(entry.shape[0] * entry.shape[1] for entry in layers)
        sparsity = sum(entry.sparsity * entry.shape[0] * entry.shape[1] for entry in layers) / numel
        errors = [entry.rel_error for entry in layers]
        table.add_row(
            block,
            str(len(layers)),
            f"{sparsity:.4f}",
            f"{sum(errors) / len(errors):.4g}",
            f"{max(errors):.4g}",
            str(sum(entry.bias_updated for entry in layers)),
        )
    out.print(table)
    for w in report.warnings:
        out.print(f"[yellow]warning:[/] {escape(w)}")


def _block_of(name: str) -> str:
    """'model.layers.3.mlp.down_proj' -> '3': the first numeric component."""
    for part in name.split("."):
        if part.isdigit():
            return part
    return name


def render_sweep(results: list[tuple[str, PruneRecord]]) -> None:
    table = Table(title="Pruned checkpoints")
    for col in ("method", "pattern", "sparsity", "achieved", "mode", "bias update", "prune s", "path"):
        table.add_column(col)
    for path, r in results:
        table.add_row(
            r.method,
            r.pattern,
            f"{r.sparsity:g}",
            f"{r.achieved_sparsity:.4f}",
            "sequential" if r.sequential else "one-shot",
            "yes" if r.bias_update else "no",
            f"{r.timings.get('prune_s', 0):.1f}",
            escape(path),
        )
    out.print(table)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def render_results(results: Results) -> None:
    """One `stade eval` results document: the model, its pruning, perplexities and zero-shot accuracies."""
    model = results.model
    pattern = f", {results.pattern}" if results.pattern else ""
    out.print(
        f"[bold]Results[/] [cyan]{escape(model.spec)}[/] ({model.architecture}, {model.dtype}, {results.device}): "
        f"{results.method}{pattern}, target {100 * (results.sparsity or 0.0):.1f}% / "
        f"measured {100 * (model.measured_sparsity or 0.0):.1f}% sparse"
    )
    if results.perplexity:
        table = Table(title="Perplexity")
        for col in ("dataset", "ppl", "windows", "seqlen", "tokens", "seconds"):
            table.add_column(col, justify="left" if col == "dataset" else "right")
        for name, r in results.perplexity.items():
            table.add_row(
                escape(name), f"{r.ppl:.4f}", str(r.windows), str(r.seqlen), str(r.tokens), f"{r.seconds:.1f}"
            )
        out.print(table)
    zs = results.zeroshot
    if zs.tasks:
        limit = f", limit {zs.limit} per task" if zs.limit else ""
        table = Table(title=f"Zero-shot accuracy (%), {zs.num_fewshot}-shot{limit}")
        for col in ("task", "acc", "± stderr", "acc_norm", "± stderr ", "items"):
            table.add_column(col, justify="left" if col == "task" else "right")
        for name, e in zs.tasks.items():
            table.add_row(
                escape(name),
                _pct(e.get("acc")),
                _pct(e.get("acc_stderr")),
                _pct(e.get("acc_norm")),
                _pct(e.get("acc_norm_stderr")),
                str(e.get("items") or ""),
            )
        table.add_section()
        table.add_row("[bold]mean[/]", _pct(zs.mean.get("acc")), "", _pct(zs.mean.get("acc_norm")), "", "")
        out.print(table)


def render_comparison(comparison: Comparison) -> None:
    """The comparison table: best value per column in bold green, deltas to the baseline beside each value."""
    from stade_cli.evaluation.compare import format_cell, row_facts

    title = "Comparison" + (f" (deltas against {escape(comparison.baseline)})" if comparison.baseline else "")
    table = Table(title=title)
    for col in ("model", "method", "pattern", "target", "achieved"):
        table.add_column(col, justify="left" if col in ("model", "method", "pattern") else "right")
    for c in comparison.columns:
        arrow = "↑" if c.higher_is_better else "↓"
        table.add_column(f"{escape(c.label)} {arrow}", justify="right")
    for r in comparison.rows:
        cells = [
            f"[bold]{escape(r.label)}[/] [dim](baseline)[/]" if r.is_baseline else escape(r.label),
            *map(escape, row_facts(r)),
        ]
        for c in comparison.columns:
            text = format_cell(r, c)
            cells.append(f"[bold green]{text}[/]" if comparison.is_best(r, c.key) else text)
        table.add_row(*cells)
    out.print(table)
    for note in comparison.notes:
        out.print(f"[yellow]note:[/] {escape(note)}")


def render_plan(plan: dict) -> None:
    """`stade plan`: sizes, then each stage's peak memory by term."""
    gb = 1e9
    out.print(
        f"[bold]Plan[/] {escape(plan['model'])} on {plan['device']} ({plan['dtype']}): {plan['parameters']:,} "
        f"parameters in {plan['blocks']} blocks; {plan['nsamples']} x {plan['seqlen']} calibration tokens"
    )
    out.print(
        f"statistics artifact [cyan]{plan['artifact_bytes'] / gb:.2f} GB[/], "
        f"checkpoint [cyan]{plan['checkpoint_bytes'] / gb:.2f} GB[/] per pruned model"
    )
    on_cpu = plan["device"] == "cpu"
    table = Table("stage", "peak host RAM" if on_cpu else "peak device memory", "host RAM", "disk", "time (estimate)")
    for name, s in plan["stages"].items():
        secs = s["seconds_estimate"]
        table.add_row(
            name,
            f"{s['device_bytes'] / gb:.2f} GB",
            "" if on_cpu else f"{s['host_bytes'] / gb:.2f} GB",
            f"{s['disk_bytes'] / gb:.2f} GB" if s["disk_bytes"] else "",
            "" if secs is None else f"{secs / 60:.1f} min" if secs >= 120 else f"{secs:.0f} s",
        )
    out.print(table)
    for name, s in plan["stages"].items():
        terms = ", ".join(f"{k} {v / gb:.2f}" for k, v in s["device_terms"].items())
        out.print(f"[dim]{name}: {escape(terms)} (GB)[/]")
    for note in plan["notes"]:
        out.print(f"[yellow]note:[/] {escape(note)}")
