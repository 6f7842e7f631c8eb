"""`stade finetune`'s curve: held-out perplexity against training tokens, a PNG beside the checkpoint."""

from __future__ import annotations

from pathlib import Path

from stade_cli.base.artifacts import CurvePoint
from stade_cli.base.files import write_error

CURVE_FILE = "finetune-curve.png"


def plot_curve(folder: Path, curve: list[CurvePoint]) -> Path | None:
    """Write the curve into `folder`; None where matplotlib is not installed (the curve is in stade.json too)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    out = folder / CURVE_FILE
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.plot([c.tokens for c in curve], [c.heldout_ppl for c in curve], marker="o", color="C0")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity, log scale")
    ax.set_title("stade finetune")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=120, format="png")
    except OSError as exc:
        raise write_error(out, exc) from None
    finally:
        plt.close(fig)
    return out
