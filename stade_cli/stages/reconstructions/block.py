"""block: after a block is masked and updated, tune its kept weights so that its outputs match the dense block's, the
mask held exactly: the regional optimisation of Wanda++ (Yang et al., ACL Findings 2025) and the local reconstruction
of Roux et al. (arXiv 2510.14444). The maths: solvers/reconstruction.py; the definition:
docs/methods.md#block-reconstruction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stade_cli.base.errors import StadeError, at_least
from stade_cli.stages.stage import Settings, reconstruction, setting


# Defaults measured on SmolLM2-135M block 0, wanda 2:4, 32 x 512 calibration windows (docs/guide.md): held-out block
# loss 0.108 -> 0.074 / 0.067 / 0.065 after 20 one-window steps at lr 3e-4 / 1e-3 / 3e-3, against 0.076 after 40
# four-window steps at 1e-4 (six times the compute). 1e-3: nearly the best, a safer step size.
@dataclass(frozen=True)
class BlockSettings(Settings):
    steps: int = setting(20, "Adam steps per block (at most; stops early).", flag="--reconstruct-steps")
    lr: float = setting(1e-3, "Adam's peak learning rate, cosine-decayed to zero.", flag="--reconstruct-lr")
    windows_per_step: int = setting(1, "Calibration windows in one optimiser step.", cli=False)
    holdout: int = setting(8, "One calibration window in this many is held out for early stopping.", cli=False)
    eval_every: int = setting(10, "Steps between held-out checks.", cli=False)
    patience: int = setting(2, "Held-out checks without improvement before stopping.", cli=False)

    def check(self) -> None:
        at_least("--reconstruct-steps", self.steps, 1, "pass e.g. 40")
        if self.lr <= 0:
            raise StadeError(f"--reconstruct-lr must be above 0, got {self.lr:g}.", "the default is 1e-3")

    def record(self) -> dict[str, Any]:
        return {**super().record(), "optimizer": "adam", "schedule": "cosine", "loss": "sum of squared errors / sum "
                "of squared dense outputs"}  # fmt: skip


@reconstruction(
    "block",
    "tune each block's kept weights to the dense block's outputs (Wanda++ RO; arXiv 2510.14444)",
    needs=("inputs",),
    settings=BlockSettings,
    prefix="reconstruct",
    paper="block-reconstruction",
    memory=lambda w, _s: (
        (4 * w.block if w.elem != 4 else 0)  # float32 master weights
        + 4 * 4 * w.linear  # Adam's two moments, the gradients, the best weights so far
        + 3 * w.activation_bytes * 4 // w.elem  # one window's forward kept for the backward, in float32
    ),  # the dense targets are block inputs of the run: the plan counts them with those
)
def reconstruct(
    block: Any, inputs: Any, targets: Any, device: Any, settings: BlockSettings, seed: int
) -> dict[str, Any]:
    from stade_cli.stages.solvers.reconstruction import reconstruct_block

    return reconstruct_block(block, inputs, targets, device, settings, seed)
