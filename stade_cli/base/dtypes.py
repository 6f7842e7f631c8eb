"""The dtypes stade names: one map from names to torch dtypes."""

from __future__ import annotations

import torch

HESSIAN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
