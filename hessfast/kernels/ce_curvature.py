"""The softmax cross-entropy Hessian w.r.t. the logits applied to k directions.

For one row of logits ``l`` (length V) with ``p = softmax(l)`` the Hessian of
``cross_entropy(l, target)`` w.r.t. ``l`` is ``diag(p) - p p^T`` (independent of the target),
so its product with a direction ``u`` is ``p * u - p * (p . u)``. For logits ``[N, V]`` and k
directions ``[k, N, V]`` this module computes, per row and direction,

    ``out[j, i] = scale * (p_i * U[j, i] - p_i * (p_i . U[j, i]))``     (``[k, N, V]``)

with rows whose ``mask`` is False (``ignore_index`` targets) set to zero and ``scale`` the
loss reduction's factor (``1 / num_valid`` for ``reduction="mean"``, 1 for ``"sum"``).

- :func:`ce_hessian_product_reference`: plain torch (the reference and the CPU path).
- :func:`ce_hessian_product_triton`: one Triton program per row, two passes over V in
  ``BLOCK_V`` chunks. Pass 1 keeps the online softmax state (running max ``m``, ``s = sum
  exp(l - m)``) and the k unnormalised dots ``d_j = sum exp(l - m) u_j``, all rescaled by
  ``exp(m_old - m_new)`` when the max grows; then ``p . u_j = d_j / s``. Pass 2 writes the
  product. No buffer besides the output is allocated; ``scale`` and ``mask`` are read from
  device tensors (no host synchronisation).
- :func:`ce_hessian_product`: Triton on CUDA when it imports, else the reference
  (:func:`ce_backend`; ``HESSFAST_CE_BACKEND`` forces one).

Precision: softmax and the dots are computed in float32 for float32/bfloat16/float16 inputs
and in float64 for float64 inputs (the kernel's accumulation dtype follows the input, so a
float64 call stays float64 end to end); the output has the dtype of ``U``.
"""

from __future__ import annotations

import os

import torch

from hessfast.errors import BackendUnavailableError, ConfigurationError
from hessfast.kernels import _triton
from hessfast.kernels._triton import runs_on

__all__ = [
    "CE_BACKENDS",
    "ce_backend",
    "ce_hessian_product",
    "ce_hessian_product_reference",
    "ce_hessian_product_triton",
    "triton_available",
]


def _check(logits: torch.Tensor, U: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Shapes: logits ``[N, V]``, U ``[k, N, V]``, mask ``[N]`` bool or None."""
    if logits.dim() != 2:
        raise ConfigurationError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if U.dim() != 3 or tuple(U.shape[1:]) != tuple(logits.shape):
        raise ConfigurationError(
            f"U must be [k, N, V] = [k, {logits.shape[0]}, {logits.shape[1]}], "
            f"got shape {tuple(U.shape)}")
    if not (logits.is_floating_point() and U.is_floating_point()):
        raise ConfigurationError("logits and U must be floating point")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (logits.shape[0],)):
        raise ConfigurationError(
            f"mask must be a bool tensor of shape [N] = [{logits.shape[0]}], "
            f"got {mask.dtype} of shape {tuple(mask.shape)}")


def _compute_dtype(logits: torch.Tensor, U: torch.Tensor) -> torch.dtype:
    """float64 when either input is float64, else float32."""
    if logits.dtype == torch.float64 or U.dtype == torch.float64:
        return torch.float64
    return torch.float32


def ce_hessian_product_reference(
    logits: torch.Tensor,
    U: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """``scale * (p * u - p * (p . u))`` per row, plain torch.

    Args:
        logits: ``[N, V]``.
        U: ``[k, N, V]``, the k directions.
        mask: ``[N]`` bool; rows where it is False give zeros. None: every row counts.
        scale: a float or a 0-d tensor (read on the device, never with ``.item()``).

    Returns:
        ``[k, N, V]`` in ``U``'s dtype; computed in float32 (float64 for float64 inputs).
    """
    _check(logits, U, mask)
    cdt = _compute_dtype(logits, U)
    p = torch.softmax(logits.to(cdt), dim=-1)                       # [N, V]
    u = U.to(cdt)                                                   # [k, N, V]
    pu = (p * u).sum(dim=-1, keepdim=True)                          # [k, N, 1]
    out = p * (u - pu)                                              # [k, N, V]
    if isinstance(scale, torch.Tensor):
        out = out * scale.to(device=out.device, dtype=cdt)
    else:
        out = out * scale
    if mask is not None:
        out = torch.where(mask.to(out.device)[None, :, None], out, torch.zeros((), dtype=cdt,
                                                                             device=out.device))
    return out.to(U.dtype)


def triton_available() -> bool:
    """Whether ``import triton`` works here: the one rule,
    :func:`hessfast.kernels._triton.available` (kept under this name for its callers)."""
    return _triton.available()


_KERNEL = None


def _kernel():  # -> triton JITFunction
    """Build the Triton kernel on first use (Triton is imported here, not at module import)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    triton, tl = _triton.load("the fused cross-entropy curvature kernel needs Triton",
                              "use ce_hessian_product_reference")

    @triton.jit
    def _ce_hvp_kernel(
        logits_ptr, u_ptr, out_ptr, mask_ptr, scale_ptr,
        V, K,
        s_ln, s_lv, s_uk, s_un, s_uv, s_ok, s_on, s_ov,
        HAS_MASK: tl.constexpr, ACC: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, BLOCK_K).to(tl.int64)
        kmask = ks < K
        vs = tl.arange(0, BLOCK_V)
        l_row = logits_ptr + row * s_ln
        u_row = u_ptr + row * s_un + ks[:, None] * s_uk
        o_row = out_ptr + row * s_on + ks[:, None] * s_ok
        valid = True
        if HAS_MASK:
            valid = tl.load(mask_ptr + row) != 0
        # pass 1: online max, sum of exp and the k unnormalised dots
        m = tl.full((), float("-inf"), ACC)
        s = tl.zeros((), ACC)
        d = tl.zeros((BLOCK_K,), ACC)
        for start in range(0, V, BLOCK_V):
            offs = start + vs
            vmask = offs < V
            lg = tl.load(l_row + offs * s_lv, mask=vmask, other=float("-inf")).to(ACC)
            u = tl.load(u_row + offs[None, :] * s_uv, mask=kmask[:, None] & vmask[None, :],
                        other=0.0).to(ACC)
            m_new = tl.maximum(m, tl.max(lg, axis=0))
            alpha = tl.exp(m - m_new)
            e = tl.exp(lg - m_new)
            s = s * alpha + tl.sum(e, axis=0)
            d = d * alpha + tl.sum(e[None, :] * u, axis=1)
            m = m_new
        pu = d / s
        c = tl.load(scale_ptr).to(ACC)
        # pass 2: write scale * p * (u - p.u)
        for start in range(0, V, BLOCK_V):
            offs = start + vs
            vmask = offs < V
            m2 = kmask[:, None] & vmask[None, :]
            lg = tl.load(l_row + offs * s_lv, mask=vmask, other=float("-inf")).to(ACC)
            u = tl.load(u_row + offs[None, :] * s_uv, mask=m2, other=0.0).to(ACC)
            p = tl.exp(lg - m) / s
            val = c * p[None, :] * (u - pu[:, None])
            val = tl.where(valid, val, 0.0)
            tl.store(o_row + offs[None, :] * s_ov, val.to(out_ptr.dtype.element_ty), mask=m2)

    _KERNEL = (_ce_hvp_kernel, triton, tl)
    return _KERNEL


def ce_hessian_product_triton(
    logits: torch.Tensor,
    U: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float | torch.Tensor = 1.0,
    block_v: int | None = None,
) -> torch.Tensor:
    """The fused Triton kernel for ``scale * (p * u - p * (p . u))``, same contract as
    :func:`ce_hessian_product_reference`.

    Args:
        logits: ``[N, V]`` (any strides), on CUDA (or the CPU under ``TRITON_INTERPRET=1``).
        U: ``[k, N, V]`` (any strides).
        mask: ``[N]`` bool or None.
        scale: a float or a 0-d tensor; a tensor is read inside the kernel.
        block_v: the V chunk (a power of two); None picks one from V and k.

    Returns:
        ``[k, N, V]`` contiguous, in ``U``'s dtype: the only memory allocated.

    Raises:
        BackendUnavailableError: Triton does not import (``pip install triton``).
    """
    _check(logits, U, mask)
    kernel, triton, tl = _kernel()
    k, n, v = U.shape
    out = torch.empty((k, n, v), dtype=U.dtype, device=U.device)
    if out.numel() == 0:
        return out
    cdt = _compute_dtype(logits, U)
    acc = tl.float64 if cdt == torch.float64 else tl.float32
    if isinstance(scale, torch.Tensor):
        scale_t = scale.reshape(()).to(device=logits.device, dtype=cdt)
    else:
        scale_t = torch.full((), float(scale), dtype=cdt, device=logits.device)
    block_k = max(1, triton.next_power_of_2(k))
    if block_v is None:
        block_v = max(16, min(triton.next_power_of_2(v), 8192 // block_k))
    if block_v & (block_v - 1):
        raise ConfigurationError(f"block_v must be a power of two, got {block_v}")
    mask_arg = mask.to(device=logits.device, dtype=torch.int8) if mask is not None else scale_t
    kernel[(n,)](
        logits, U, out, mask_arg, scale_t,
        v, k,
        logits.stride(0), logits.stride(1),
        U.stride(0), U.stride(1), U.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        HAS_MASK=mask is not None, ACC=acc, BLOCK_K=block_k, BLOCK_V=block_v,
    )
    return out


CE_BACKENDS = ("auto", "triton", "torch")


def ce_backend(device: torch.device) -> tuple[str, str]:
    """``("triton" | "torch", why)``: what :func:`ce_hessian_product` runs for tensors on
    ``device``. ``HESSFAST_CE_BACKEND=auto|triton|torch`` (default auto: Triton on CUDA when it
    imports, torch otherwise); ``triton`` on the CPU needs ``TRITON_INTERPRET=1`` (tests).

    This is hessfast's SECOND backend dispatcher, besides :mod:`hessfast.ops` (which picks
    native / Triton / reference for the basis ops under ``HESSFAST_BACKEND``): the softmax-CE
    curvature product is not a basis op, so it has its own switch and environment variable.
    Both ask the same Triton rule (:mod:`hessfast.kernels._triton`: :func:`~._triton.available`
    and :func:`~._triton.runs_on`). ``hessfast info`` reports its choice
    (:func:`backend_report`)."""
    forced = os.environ.get("HESSFAST_CE_BACKEND", "auto").strip().lower() or "auto"
    if forced not in CE_BACKENDS:
        raise ConfigurationError(
            f"HESSFAST_CE_BACKEND must be one of {CE_BACKENDS}, got {forced!r}")
    if forced == "torch":
        return "torch", "HESSFAST_CE_BACKEND=torch"
    if forced == "triton":
        if not _triton.available():
            raise BackendUnavailableError(
                "HESSFAST_CE_BACKEND=triton but Triton does not import: pip install triton, "
                "or unset HESSFAST_CE_BACKEND")
        if not runs_on(device.type):
            raise BackendUnavailableError(
                f"HESSFAST_CE_BACKEND=triton but the tensors are on {device.type}: the Triton "
                "kernel runs on CUDA (or anywhere under TRITON_INTERPRET=1); unset "
                "HESSFAST_CE_BACKEND")
        return "triton", "HESSFAST_CE_BACKEND=triton"
    if device.type == "cuda":
        if _triton.available():
            return "triton", "CUDA tensors and Triton imports"
        return "torch", "Triton does not import (pip install triton)"
    return "torch", f"the Triton kernel runs on CUDA only; {device.type} uses plain torch"


def ce_hessian_product(
    logits: torch.Tensor,
    U: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """``scale * (p * u - p * (p . u))`` per row: the Triton kernel or
    :func:`ce_hessian_product_reference`, as :func:`ce_backend` decides.

    Args:
        logits: ``[N, V]``, the rows whose softmax ``p [N, V]`` is taken.
        U: ``[k, N, V]``, the k directions.
        mask: ``[N]`` bool; rows where it is False give zeros. None: every row counts.
        scale: a float or a 0-d tensor (read on the device, never with ``.item()``).

    Returns:
        ``[k, N, V]`` in ``U``'s dtype.
    """
    if ce_backend(logits.device)[0] == "triton":
        return ce_hessian_product_triton(logits, U, mask=mask, scale=scale)
    return ce_hessian_product_reference(logits, U, mask=mask, scale=scale)


def backend_report() -> dict[str, dict[str, str]]:
    """Which implementation :func:`ce_hessian_product` uses on each device, and why (what
    ``hessfast info`` prints): ``{"cpu": {"selected": ..., "why": ...}, "cuda": {...}}``.
    The GGN and the Hessian use it for a torch cross-entropy criterion (``fused_loss``)."""
    out: dict[str, dict[str, str]] = {}
    for dev in ("cpu", "cuda"):
        if dev == "cuda" and not torch.cuda.is_available():
            out[dev] = {"selected": "none", "why": "no CUDA device visible"}
            continue
        try:
            selected, why = ce_backend(torch.device(dev))
        except (BackendUnavailableError, ConfigurationError) as exc:
            selected, why = "error", str(exc)
        out[dev] = {"selected": selected, "why": why}
    return out
