"""The dtypes stade names, and how safetensors spells them: one table, every map derived from it."""

from __future__ import annotations

import torch

from stade_cli.base.errors import StadeError

# (name, torch dtype, safetensors code)
_TABLE = (
    ("float32", torch.float32, "F32"),
    ("float16", torch.float16, "F16"),
    ("bfloat16", torch.bfloat16, "BF16"),
    ("float64", torch.float64, "F64"),
    ("float8_e4m3fn", torch.float8_e4m3fn, "F8_E4M3"),
    ("float8_e5m2", torch.float8_e5m2, "F8_E5M2"),
    ("int64", torch.int64, "I64"),
    ("int32", torch.int32, "I32"),
    ("int16", torch.int16, "I16"),
    ("int8", torch.int8, "I8"),
    ("uint8", torch.uint8, "U8"),
    ("bool", torch.bool, "BOOL"),
)
BY_NAME = {name: dtype for name, dtype, _code in _TABLE}
BY_CODE = {code: dtype for _name, dtype, code in _TABLE}
CODE_OF = {dtype: code for _name, dtype, code in _TABLE}
RUN_DTYPES = ("float32", "float16", "bfloat16")  # what a model may be loaded, run and saved in (--dtype)
HESSIAN_DTYPES = ("float32", "bfloat16")  # what Hessians may be stored in (--hessian-dtype)


def parse_dtype(name: str | None, allowed: tuple[str, ...] = RUN_DTYPES, option: str = "--dtype") -> torch.dtype | None:
    """The torch dtype named `name` among `allowed` (None: not given)."""
    if name is None:
        return None
    if name not in allowed:
        raise StadeError(f"{option} {name!r} is not supported.", f"use one of {', '.join(allowed)}")
    return BY_NAME[name]


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: how artifacts and configs name a dtype."""
    return str(dtype).removeprefix("torch.")


def size_of(dtype: torch.dtype) -> int:
    return dtype.itemsize
