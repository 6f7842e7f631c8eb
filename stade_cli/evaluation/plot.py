"""`stade compare --plot`: perplexity against sparsity, one line per method and pattern, a panel per dataset."""

from __future__ import annotations

from pathlib import Path

from stade_cli.base.errors import StadeError
from stade_cli.base.files import check_writable, write_error
from stade_cli.evaluation.compare import Comparison, Row


def _series(row: Row) -> str:
    return row.method if row.pattern in (None, "unstructured") else f"{row.method} {row.pattern}"


def check_plot_path(out: Path, force: bool) -> None:
    """--plot must name a .png file that does not exist yet (unless force) in a writable folder."""
    if out.suffix.lower() != ".png":
        raise StadeError(f"--plot {str(out)!r} does not end in .png; the plot is a PNG image.", "name it e.g. ppl.png")
    if out.is_dir():
        raise StadeError(f"--plot {str(out)!r} is a folder.", f"give a file name, e.g. {str(out / 'ppl.png')!r}")
    check_writable(out, force)


def plot(comparison: Comparison, out: str | Path, force: bool = False) -> Path:
    """Perplexity against sparsity, one line per method (and N:M pattern), one panel per dataset."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise StadeError("--plot needs matplotlib, which is not installed.", "pip install 'stade[plot]'") from None
    out = Path(out)
    check_plot_path(out, force)
    columns = [c for c in comparison.columns if c.result == "ppl"]
    if not columns:
        raise StadeError("Nothing to plot: no results have a perplexity.", "run `stade eval --ppl ...` first")
    names = sorted({_series(r) for r in comparison.rows if r.method != "dense"})
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one colour per method in every panel
    fig, axes = plt.subplots(1, len(columns), figsize=(5.5 * len(columns), 4.2), squeeze=False)
    for ax, col in zip(axes[0], columns, strict=True):
        dense = next((r.values[col.key] for r in comparison.rows if r.method == "dense" and col.key in r.values), None)
        series: dict[str, list[tuple[float, float]]] = {}
        for r in comparison.rows:
            if col.key in r.values and r.method != "dense":
                x = r.achieved_sparsity if r.achieved_sparsity is not None else r.sparsity or 0.0
                series.setdefault(_series(r), [] if dense is None else [(0.0, dense)]).append(
                    (100 * x, r.values[col.key])
                )
        if dense is not None:
            ax.axhline(dense, color="grey", linestyle="--", linewidth=1, label="dense")
        for name, points in sorted(series.items()):
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=name, color=colours[name])
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel(f"perplexity ({col.name}), log scale")
        ax.set_title(col.name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".incomplete.png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=120, format="png")
        tmp.replace(out)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(out, exc) from None
        raise
    finally:
        plt.close(fig)
    return out
