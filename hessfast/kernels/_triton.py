"""Where hessfast's Triton kernels can run: one rule for every kernel and dispatcher."""

from __future__ import annotations

import os

__all__ = ["interpreted", "runs_on"]


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, read by
    Triton at import: tests only, tiny shapes)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(device_type: str) -> bool:
    """Whether a Triton kernel can take tensors of ``device_type``: CUDA, or the CPU under
    the interpreter."""
    return device_type == "cuda" or (device_type == "cpu" and interpreted())
