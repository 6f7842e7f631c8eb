"""Rich renderings of artifacts and reports (stdout); the library never prints."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from .console import out

if TYPE_CHECKING:
    from .stats import Statistics


def render_stats(stats: Statistics) -> None:
    s = stats.summary()
    data = s["data"]
    out.print(f"[bold]Statistics[/] {s['path']}  [dim]{s['fingerprint'][:16]}[/]")
    out.print(
        f"model [cyan]{s['model']['spec']}[/] ({s['model']['architecture']}, {s['dtype']}), "
        f"{s['layers']} linear layers in {len(s['blocks'])} blocks"
    )
    out.print(
        f"data [cyan]{data['source']}[/]: {data['nsamples']} x {data['seqlen']} tokens, seed {data['seed']}, "
        f"ids sha256 {data['token_ids_sha256'][:12]}; statistics: {', '.join(s['statistics'])}"
    )
    for note in data.get("notes", []):
        out.print(f"[yellow]note:[/] {note}")
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
