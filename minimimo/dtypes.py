"""Dtype names, written once: what "bf16", "bfloat16", "torch.float32" or "fp8" mean, and how wide they are.

Users, config files and the command line name dtypes in several spellings: `torch_dtype: "bfloat16"`
in a hub `config.json`, `--dtype float32`, `weight_dtype="fp8"`, `kv_dtype="bf16"`, or a
`torch.dtype` itself. Every module that reads such a name asks this table, so a spelling accepted
in one place is accepted (with the same meaning) everywhere.

This module does not import torch: the config and the memory planner count bytes without it.
"""

from __future__ import annotations

from typing import Any

WIDTHS = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}  # bytes per element
ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
           "fp8": "float8_e4m3fn"}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float8_e4m3fn": "fp8"}
COMPUTE = ("float32", "bfloat16", "float16")  # dtypes a model can compute in (FP8 is storage only)


def canonical(dtype: Any, what: str = "dtype") -> str:
    """torch.bfloat16, "torch.bfloat16", "bfloat16", "bf16" -> "bfloat16"; an unknown name raises."""
    name = str(dtype).removeprefix("torch.")
    name = ALIASES.get(name, name)
    if name not in WIDTHS:
        raise ValueError(f"{what} {dtype!r} is not one of {sorted(WIDTHS) + sorted(ALIASES)}")
    return name


def width(dtype: Any, what: str = "dtype") -> int:
    """Bytes per element: 4 for float32, 2 for bfloat16/float16, 1 for FP8."""
    return WIDTHS[canonical(dtype, what)]


def short(dtype: Any, what: str = "dtype") -> str:
    """The short spelling the planner and the command line print: "fp32", "bf16", "fp16", "fp8"."""
    return SHORT[canonical(dtype, what)]


def compute_dtype(dtype: Any, what: str = "dtype"):
    """The torch dtype to compute in (float32, bfloat16 or float16); FP8 and unknown names raise."""
    import torch

    name = canonical(dtype, what)
    if name not in COMPUTE:
        raise ValueError(f"{what} {dtype!r} is a storage dtype; compute in one of {list(COMPUTE)}")
    return getattr(torch, name)
