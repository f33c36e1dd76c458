"""Basis ops for Krylov methods — the only module that knows which backends exist.

Every op has one name in C++ (``csrc/cpu``), CUDA (``csrc/cuda``), :mod:`hessfast._reference`
and here. Dispatch, per call:

1. native CUDA — tensors on a CUDA device and ``hessfast._C`` built with CUDA kernels;
2. native CPU — tensors on the CPU and ``hessfast._C`` importable;
3. reference — plain PyTorch, runs everywhere.

A fourth backend, ``triton`` (:mod:`hessfast.kernels.basis_triton`), runs on CUDA tensors (on
the CPU only under the Triton interpreter, ``TRITON_INTERPRET=1``, for tests); ``auto`` uses it
only for the ops listed in :data:`_CUDA_AUTO_TRITON` (none until measured on a GPU).

``HESSFAST_BACKEND=native|triton|reference|auto`` (default ``auto``) forces a choice; a forced
``native`` or ``triton`` that cannot run raises
:class:`hessfast.errors.BackendUnavailableError` with the reason. :func:`backend_report` says,
per op and device, what would run and why the others cannot.

Validation happens here, once: dtypes, devices, shapes, aliasing and layout, with ValueError /
TypeError naming the argument and its value. Inputs whose rows are not unit-stride are copied
to a contiguous layout first (correct, at the cost of a copy); a strided-row basis (row stride
> n) is read in place. These ops are not differentiable: they work on ``.detach()``ed data.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from hessfast import _native, _reference
from hessfast._reference import CAST_CHUNK_BYTES, DGKS_ETA
from hessfast.errors import BackendUnavailableError
from hessfast.kernels import _triton, basis_triton
from hessfast.kernels._triton import runs_on

__all__ = [
    "CAST_CHUNK_BYTES",
    "basis_dot",
    "basis_update",
    "reorthogonalize",
    "backend_report",
    "DGKS_ETA",
    "OPS",
]

OPS = ("basis_dot", "basis_update", "reorthogonalize")
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
WORK_DTYPES = (torch.float32, torch.float64)
_BACKENDS = ("auto", "native", "triton", "reference")


# ---------------------------------------------------------------------------------------------
# backend choice
# ---------------------------------------------------------------------------------------------


def _forced() -> str:
    value = os.environ.get("HESSFAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"HESSFAST_BACKEND must be one of {_BACKENDS}, got {value!r}")
    return value


def _native_reasons(device_type: str) -> list[str]:
    """Why the native backend cannot run on this device type (empty: it can)."""
    if not _native.available():
        return [f"hessfast._C failed to import ({_native.IMPORT_ERROR})"]
    if device_type == "cuda" and not _native.cuda_compiled():
        return ["hessfast._C was built without CUDA kernels (no nvcc at build time, or "
                "HESSFAST_CUDA=OFF)"]
    if device_type not in ("cpu", "cuda"):
        return [f"no native kernels for device type {device_type!r}"]
    return []


# Under HESSFAST_BACKEND=auto on a GPU, an op uses its CUDA kernel only where the kernel
# measured faster than torch's own path (bench/bench_ops.py --device cuda, NVIDIA H200,
# 2026-11-26, n=2e6, k=4): none does today. basis_dot ran at 0.23-1.46x, basis_update
# 0.70-1.24x and reorthogonalize 0.44-1.01x of torch (the kernels are latency-bound,
# ~1.2 TB/s against 4.4 TB/s streaming). HESSFAST_BACKEND=native forces them.
_CUDA_AUTO_NATIVE: frozenset[str] = frozenset()
_CUDA_AUTO_REASON = (
    "auto prefers torch on CUDA for this op: the native kernel measured slower than torch's "
    "matmul path on an H200 (bench/bench_ops.py); HESSFAST_BACKEND=native forces it"
)


# The Triton kernels (hessfast/kernels/basis_triton.py) have been checked under the Triton
# interpreter only: no GPU has timed them yet, so auto keeps torch's path on CUDA for every op.
# bench/bench_ops.py --device cuda --backend triton measures them against torch; an op joins
# this table only where the kernel measured faster there. HESSFAST_BACKEND=triton forces them.
_CUDA_AUTO_TRITON: frozenset[str] = frozenset()
_CUDA_AUTO_TRITON_REASON = (
    "auto does not use the Triton kernels on CUDA yet: not measured on a GPU (fill "
    "ops._CUDA_AUTO_TRITON from bench/bench_ops.py --device cuda --backend triton); "
    "HESSFAST_BACKEND=triton forces them"
)


def _triton_reasons(device_type: str) -> list[str]:
    """Why the Triton backend cannot run on this device type (empty: it can). Imports Triton
    (once per process) only when asked."""
    err = _triton.import_error()
    if err is not None:
        return [f"triton failed to import ({err}); install it with `pip install triton`"]
    if device_type == "cuda":
        return [] if torch.cuda.is_available() else ["no CUDA device visible to torch"]
    if device_type == "cpu":
        if runs_on("cpu"):
            return []
        return ["the Triton kernels run on CUDA; on the CPU only under the Triton interpreter "
                "(TRITON_INTERPRET=1 set before triton is imported; slow, for tests)"]
    return [f"no Triton kernels for device type {device_type!r}"]


#: Whether this process has warned that the native kernels are missing (once per process).
_FALLBACK_WARNED = False


def _warn_fallback() -> None:
    """One UserWarning per process when ``auto`` falls back to the reference on the CPU because
    ``hessfast._C`` did not import (a broken or missing build is otherwise invisible)."""
    global _FALLBACK_WARNED
    if _FALLBACK_WARNED:
        return
    _FALLBACK_WARNED = True
    warnings.warn(
        f"hessfast: native kernels unavailable ({_native.IMPORT_ERROR}); using the slower torch "
        "reference path; rebuild with pip install . or set HESSFAST_BACKEND=reference to "
        "silence",
        UserWarning,
        stacklevel=4,
    )


def _pick(op: str, device: torch.device, *, report: bool = False) -> str:
    forced = _forced()
    if forced == "reference":
        return "reference"
    if forced == "triton":
        why = _triton_reasons(device.type)
        if why:
            raise BackendUnavailableError(
                f"HESSFAST_BACKEND=triton but the Triton {op} cannot run on {device.type}: "
                f"{'; '.join(why)}. Unset HESSFAST_BACKEND (or set it to 'auto') to use the "
                "native kernels or the PyTorch reference."
            )
        return "triton"
    if (forced == "auto" and device.type == "cuda" and op in _CUDA_AUTO_TRITON
            and not _triton_reasons("cuda")):
        return "triton"
    reasons = _native_reasons(device.type)
    if not reasons:
        if forced == "auto" and device.type == "cuda" and op not in _CUDA_AUTO_NATIVE:
            return "reference"
        return "native"
    if forced == "auto" and device.type == "cpu" and not _native.available() and not report:
        _warn_fallback()
    if forced == "native":
        raise BackendUnavailableError(
            f"HESSFAST_BACKEND=native but the native {op} cannot run on {device.type}: "
            f"{'; '.join(reasons)}. Unset HESSFAST_BACKEND (or set it to 'auto') to fall back "
            "to the PyTorch reference."
        )
    return "reference"


def backend_report() -> dict[str, dict[str, Any]]:
    """For each op and device type: the backend a call would use now, and the reasons each
    backend cannot run (``not_supported_reasons``; empty list = it can)::

        {"basis_dot": {"cpu": {"selected": "native",
                               "not_supported_reasons": {"native": [], "reference": []}},
                       "cuda": {...}}, ...,
         "_triton": {"auto_on_cuda": [...], "why": ...,
                     "not_supported_reasons": {"basis_dot": {"cpu": [...], "cuda": [...]}, ...}},
         "_build": {...}}

    The Triton backend's reasons sit under ``"_triton"`` (per op and device) so that each op's
    entry keeps the native/reference layout.
    """
    forced = os.environ.get("HESSFAST_BACKEND", "auto")
    out: dict[str, dict[str, Any]] = {}
    for op in OPS:
        per_dev: dict[str, Any] = {}
        for dev in ("cpu", "cuda"):
            reasons = {"native": _native_reasons(dev), "reference": []}
            if dev == "cuda" and not torch.cuda.is_available():
                reasons["native"] = reasons["native"] + ["no CUDA device visible to torch"]
                reasons["reference"] = ["no CUDA device visible to torch"]
            try:
                selected = _pick(op, torch.device(dev), report=True)
            except BackendUnavailableError as exc:
                selected = f"error: {exc}"
            per_dev[dev] = {"selected": selected, "not_supported_reasons": reasons}
            if dev == "cuda" and selected == "reference" and not reasons["native"]:
                per_dev[dev]["why"] = _CUDA_AUTO_REASON
        out[op] = per_dev
    triton_reasons = {dev: _triton_reasons(dev) for dev in ("cpu", "cuda")}
    out["_triton"] = {
        "auto_on_cuda": sorted(_CUDA_AUTO_TRITON),
        "why": _CUDA_AUTO_TRITON_REASON,
        "not_supported_reasons": {op: {d: list(r) for d, r in triton_reasons.items()}
                                  for op in OPS},
    }
    out["_build"] = {"forced": forced, "native": _native.build_info()}
    return out


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def _check_tensor(name: str, t: Any, dtypes: tuple[torch.dtype, ...], ndim: int = 2) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_acc(
    acc_dtype: torch.dtype | None, storage: torch.dtype, work: torch.dtype
) -> torch.dtype:
    """The accumulation dtype: ``acc_dtype`` (default: float64 for a float64 basis, else
    float32), raised to the block's own dtype ``work`` so that a float64 block is never
    rounded to float32 (a float32/bf16 basis against float64 vectors keeps float64)."""
    if acc_dtype is None:
        acc_dtype = torch.float64 if storage == torch.float64 else torch.float32
    elif acc_dtype not in WORK_DTYPES:
        raise TypeError(f"acc_dtype must be torch.float32 or torch.float64, got {acc_dtype}")
    return torch.float64 if work == torch.float64 else acc_dtype


def _check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            desc = ", ".join(f"{n}={d}" for n, d in devices.items())
            raise ValueError(f"all tensors must be on one device, got {desc} ({name} differs)")
    return first


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [lo, hi) a tensor's elements may touch."""
    if t.numel() == 0:
        return (0, 0)
    lo = t.data_ptr()
    extent = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True))
    hi = lo + (extent + 1) * t.element_size()
    return lo, hi


def _check_no_alias(out_name: str, out: torch.Tensor, **inputs: torch.Tensor | None) -> None:
    a0, a1 = _span(out)
    for name, t in inputs.items():
        if t is None or t.numel() == 0 or out.numel() == 0:
            continue
        b0, b1 = _span(t)
        if a0 < b1 and b0 < a1:
            raise ValueError(
                f"{out_name} must not alias {name}: {out_name} is updated in place while {name} "
                f"is read (overlapping memory at {a0:#x}..{a1:#x} and {b0:#x}..{b1:#x})"
            )


def _rows_ok(t: torch.Tensor) -> bool:
    """True when the native kernels can read t in place: unit inner stride, rows not overlapping."""
    rows, n = t.shape
    return (n <= 1 or t.stride(1) == 1) and (rows <= 1 or t.stride(0) >= n)


def _readable(t: torch.Tensor) -> torch.Tensor:
    return t if _rows_ok(t) else t.contiguous()


def _self_overlaps(t: torch.Tensor) -> bool:
    """True unless t's elements provably sit at distinct addresses: the dims of size > 1,
    ordered by stride, must each step over the whole extent of the previous ones (an
    ``expand``ed tensor, or ``as_strided`` rows that share elements, fail)."""
    dims = sorted((abs(st), size) for size, st in zip(t.shape, t.stride(), strict=True)
                  if size > 1)
    reach = 1  # elements spanned by the dims seen so far
    for stride, size in dims:
        if stride < reach:
            return True
        reach = stride * (size - 1) + reach
    return False


def _check_writable(name: str, t: torch.Tensor) -> None:
    """The in-place operand must not overlap itself (e.g. an ``expand``ed tensor, or
    ``as_strided`` rows that share memory)."""
    if t.numel() > 1 and _self_overlaps(t):
        raise ValueError(
            f"{name} has overlapping elements (shape {tuple(t.shape)}, stride {t.stride()}: "
            "some of its entries share memory), so it cannot be updated in place; pass a "
            f"tensor that owns its memory (e.g. {name}.clone())"
        )


def _writable(t: torch.Tensor) -> torch.Tensor:
    """Layouts the kernels cannot update in place go through a contiguous copy (the caller
    copies the result back)."""
    return t if _rows_ok(t) else t.contiguous()


def _writeback(dst: torch.Tensor, src: torch.Tensor) -> None:
    if src.data_ptr() != dst.data_ptr() or src.stride() != dst.stride():
        dst.copy_(src)


# ---------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def basis_dot(
    V: torch.Tensor, W: torch.Tensor, *, acc_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Coefficients of a block against a basis: ``C[m, k] = V[m, n] @ W[k, n]^T``.

    V: basis in storage dtype (float32, bfloat16, float16, float64). W: float32/float64.
    acc_dtype: float32 or float64 (default: float64 for a float64 basis, else float32), raised
    to float64 when W is float64; the result has this dtype. The native kernels read V exactly once.
    """
    _check_tensor("V", V, STORAGE_DTYPES)
    _check_tensor("W", W, WORK_DTYPES)
    acc = _check_acc(acc_dtype, V.dtype, W.dtype)
    device = _check_same_device(V=V, W=W)
    if W.shape[1] != V.shape[1]:
        raise ValueError(f"W must have n={V.shape[1]} columns like V, got shape {tuple(W.shape)}")
    m, n = V.shape
    k = W.shape[0]
    if m == 0 or k == 0 or n == 0:
        return torch.zeros((m, k), dtype=acc, device=device)
    backend = _pick("basis_dot", device)
    if backend == "reference":
        return _reference.basis_dot(V, W, acc_dtype=acc)
    if backend == "triton":
        return basis_triton.basis_dot_triton(V.detach(), W.detach(), acc_dtype=acc)
    return _native.basis_dot(_readable(V.detach()), _readable(W.detach()), acc)


@torch.no_grad()
def basis_update(V: torch.Tensor, C: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Remove basis components from a block, in place: ``W[k, n] -= C[m, k]^T @ V[m, n]``.

    V: storage dtype; C: float32/float64, the arithmetic dtype (float64 when W is float64:
    W is never rounded); W: float32/float64, must not alias V or overlap itself. Returns
    ``W``. The native kernels read V exactly once.
    """
    _check_tensor("V", V, STORAGE_DTYPES)
    _check_tensor("C", C, WORK_DTYPES)
    _check_tensor("W", W, WORK_DTYPES)
    device = _check_same_device(V=V, C=C, W=W)
    m, n = V.shape
    k = W.shape[0]
    if W.shape[1] != n:
        raise ValueError(f"W must have n={n} columns like V, got shape {tuple(W.shape)}")
    if tuple(C.shape) != (m, k):
        raise ValueError(f"C must have shape (m, k) = ({m}, {k}), got {tuple(C.shape)}")
    _check_no_alias("W", W, V=V, C=C)
    _check_writable("W", W)
    if m == 0 or k == 0 or n == 0:
        return W
    if W.dtype == torch.float64 and C.dtype != torch.float64:
        C = C.double()  # arithmetic in at least W's precision: a float64 W is never rounded
    backend = _pick("basis_update", device)
    if backend == "reference":
        return _reference.basis_update(V, C, W)
    if backend == "triton":  # reads any strides and writes W in place
        basis_triton.basis_update_triton(V.detach(), C.detach(), W.detach())
        return W
    Wn = _writable(W.detach())
    _native.basis_update(_readable(V.detach()), C.detach().contiguous(), Wn)
    _writeback(W, Wn)
    return W


@torch.no_grad()
def reorthogonalize(
    V: torch.Tensor,
    W: torch.Tensor,
    *,
    acc_dtype: torch.dtype | None = None,
    eta: float = DGKS_ETA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonalise the rows of ``W[k, n]`` against the basis ``V[m, n]`` in place (CGS2).

    Pass 1: ``C1 = V W^T; W -= C1^T V``. A row ``w_j`` gets a second pass
    (``c2 = V w_j; w_j -= c2^T V``) iff ``||w_j||_after < eta ||w_j||_before`` (DGKS,
    ``eta = 1/sqrt(2)``; ``eta = 0`` never, ``eta = inf`` always). The test is **per row**: a
    second pass costs one more read of V whatever the number of rows, and rows that kept
    most of their length are left untouched. Norms are fused into the kernels' passes.

    Returns ``(C, norms)``: ``C[m, k] = C1 + C2`` (the total coefficients, ``C2 = 0`` on rows
    without a second pass) and ``norms[3, k]`` = ``||w_j||`` before, after pass 1, and final,
    both in ``acc_dtype`` (float64 whenever W is float64, whatever the basis: W keeps its
    precision). A row had a second pass iff ``norms[1] < eta * norms[0]``.
    """
    _check_tensor("V", V, STORAGE_DTYPES)
    _check_tensor("W", W, WORK_DTYPES)
    acc = _check_acc(acc_dtype, V.dtype, W.dtype)
    device = _check_same_device(V=V, W=W)
    if not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"eta must be a number >= 0, got {eta!r}")
    m, n = V.shape
    k = W.shape[0]
    if W.shape[1] != n:
        raise ValueError(f"W must have n={n} columns like V, got shape {tuple(W.shape)}")
    _check_no_alias("W", W, V=V)
    _check_writable("W", W)
    if k == 0 or m == 0 or n == 0:
        nrm = torch.linalg.vector_norm(W.to(acc), dim=1) if n > 0 else W.new_zeros(k, dtype=acc)
        return torch.zeros((m, k), dtype=acc, device=device), nrm.expand(3, k).clone()
    backend = _pick("reorthogonalize", device)
    if backend == "reference":
        return _reference.reorthogonalize(V, W, acc_dtype=acc, eta=eta)
    if backend == "triton":
        return basis_triton.reorthogonalize_triton(V.detach(), W.detach(), acc_dtype=acc,
                                                   eta=float(eta))
    Wn = _writable(W.detach())
    out = _native.reorthogonalize(_readable(V.detach()), Wn, acc, float(eta))
    _writeback(W, Wn)
    return out
