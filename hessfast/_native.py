"""Thin torch-facing wrappers over the native module :mod:`hessfast._C`.

``_C`` is torch-agnostic: it takes data pointers, row strides, dtype codes and (for CUDA) the
device index and stream handle. This module turns validated tensors into those arguments and
allocates every output. It never raises at import: a missing or broken ``_C`` is recorded in
:data:`IMPORT_ERROR` and :mod:`hessfast.ops` falls back to the reference.

Arguments must already be validated by :mod:`hessfast.ops` (dtypes, devices, shapes, aliasing,
unit inner stride); the C++ side re-checks the cheap things as a backstop and raises ValueError.
"""

from __future__ import annotations

from typing import Any

import torch

_C: Any = None
IMPORT_ERROR: str | None = None
try:
    from hessfast import _C  # type: ignore[no-redef]
except Exception as exc:  # noqa: BLE001 - any import failure means "no native backend"
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

#: Must match csrc/common.h::DType.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float64: 1,
    torch.bfloat16: 2,
    torch.float16: 3,
}


def available() -> bool:
    """True when ``hessfast._C`` imported (the CPU kernels are always in it)."""
    return _C is not None


def cuda_compiled() -> bool:
    """True when ``hessfast._C`` imported and carries CUDA kernels."""
    return _C is not None and bool(_C.cuda_compiled())


def build_info() -> dict[str, Any]:
    """Compiler, flags and CUDA version of the native build (``{"error": ...}`` when missing)."""
    if _C is None:
        return {"error": IMPORT_ERROR}
    info = dict(_C.build_info())
    info["cuda_compiled"] = bool(_C.cuda_compiled())
    info["openmp_threads"] = int(_C.openmp_threads())
    return info


def _mat(t: torch.Tensor) -> tuple[int, int, int]:
    """(pointer, row stride in elements, dtype code) of a [rows, n] tensor, unit inner stride."""
    rows, n = t.shape
    ld = t.stride(0) if rows > 1 else n
    return t.data_ptr(), ld, DTYPE_CODES[t.dtype]


def _target(t: torch.Tensor) -> tuple[Any, tuple[int, ...]]:
    """The _C submodule for the tensor's device and the trailing (device, stream) arguments."""
    if t.device.type == "cuda":
        dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return _C.cuda, (dev, torch.cuda.current_stream(dev).cuda_stream)
    return _C.cpu, ()


def basis_dot(V: torch.Tensor, W: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    """``C[m, k] = V[m, n] W[k, n]^T`` in ``acc_dtype`` (a new contiguous tensor)."""
    m, n = V.shape
    k = W.shape[0]
    C = torch.empty((m, k), dtype=acc_dtype, device=V.device)
    mod, extra = _target(V)
    mod.basis_dot(*_mat(V), *_mat(W), C.data_ptr(), DTYPE_CODES[acc_dtype], m, k, n, *extra)
    return C


def basis_update(V: torch.Tensor, C: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``W[k, n] -= C[m, k]^T V[m, n]`` in place (arithmetic in ``C.dtype``); returns ``W``."""
    m, n = V.shape
    k = W.shape[0]
    mod, extra = _target(V)
    mod.basis_update(*_mat(V), C.data_ptr(), DTYPE_CODES[C.dtype], *_mat(W), m, k, n, *extra)
    return W


def reorthogonalize(
    V: torch.Tensor, W: torch.Tensor, acc_dtype: torch.dtype, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CGS2 of ``W[k, n]`` against ``V[m, n]`` in place; returns ``C[m, k]``, ``norms[3, k]``."""
    m, n = V.shape
    k = W.shape[0]
    C = torch.empty((m, k), dtype=acc_dtype, device=V.device)
    norms = torch.empty((3, k), dtype=acc_dtype, device=V.device)
    mod, extra = _target(V)
    mod.reorthogonalize(
        *_mat(V), *_mat(W), C.data_ptr(), norms.data_ptr(), DTYPE_CODES[acc_dtype], m, k, n,
        float(eta), *extra,
    )
    return C, norms
