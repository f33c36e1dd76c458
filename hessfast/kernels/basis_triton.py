"""Triton kernels for the Krylov basis ops, same contracts as :mod:`hessfast._reference`.

- :func:`basis_dot_triton`: ``C[m, k] = V[m, n] W[k, n]^T``. A 1-D grid of programs
  ``(slab, m-tile, k-tile)``: each program reduces one contiguous slab of n (``chunks`` blocks
  of ``BN`` columns) into its own ``[BM, BK]`` tile of a partial buffer ``[slabs, m, k]``; one
  torch ``sum(0)`` adds the slabs (no atomics, nothing serialised). Programs of the same slab
  are adjacent in launch order, so their shared W columns are read from L2.
- :func:`basis_update_triton`: ``W[k, n] -= C[m, k]^T V[m, n]`` in place. Each program owns a
  slab of columns of W, so there is no reduction across programs at all.
- :func:`reorthogonalize_triton`: CGS2 composed from the two kernels. The norms of W before
  and after pass 1 are fused into them (per-slab partial sums of squares); the DGKS decision
  ``after1 < eta * before`` stays on the device as a flag per row, which the pass-2 kernels
  read: a program whose rows are all unflagged exits before reading V. No host
  synchronisation happens inside any op; every launch goes to torch's current stream.

Arithmetic: V is converted to the accumulation dtype on load (float32 for a bf16/fp16/fp32
basis, float64 for float64). ``mode="fma"`` (default) multiplies and adds in that dtype on the
CUDA cores. ``mode="dot"`` uses tensor cores without losing float32 accuracy: a bf16 basis is
exact in bf16, so W (or C) is split into three bf16 parts ``hi + mid + lo`` and three bf16 dots
accumulate in float32; an fp16/fp32 basis uses ``input_precision="tf32x3"``. float64 always
uses ``fma``. Which mode (and tile) is faster is for ``bench/bench_ops.py --backend triton``.

Triton is imported lazily in :func:`_kernels`; without it every entry point raises
:class:`~hessfast.errors.BackendUnavailableError`. On the CPU the kernels run only under
``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch

from hessfast._reference import DGKS_ETA
from hessfast.errors import BackendUnavailableError, ConfigurationError
from hessfast.kernels import _triton
from hessfast.kernels._triton import interpreted, runs_on

__all__ = [
    "basis_dot_triton",
    "basis_update_triton",
    "reorthogonalize_triton",
    "triton_import_error",
    "MODES",
]

MODES = ("fma", "dot")
_STORAGE = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_WORK = (torch.float32, torch.float64)
_KERNELS = None


def triton_import_error() -> str | None:
    """None when ``import triton`` works here, else the error: the one rule,
    :func:`hessfast.kernels._triton.import_error` (kept under this name for its callers)."""
    return _triton.import_error()


def _kernels():  # -> (dot kernel, update kernel, tl)
    """Build the Triton kernels on first use (Triton is imported here, not at module import)."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    triton, tl = _triton.load("the Triton basis kernels need Triton",
                              "set HESSFAST_BACKEND=auto")

    @triton.jit
    def _dot_kernel(v_ptr, w_ptr, part_ptr, nsq_ptr, flag_ptr, M, K, N, CHUNKS, TILES_M, TILES,
                    s_vm, s_vn, s_wk, s_wn, ACC: tl.constexpr, BM: tl.constexpr,
                    BK: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr,
                    NORM: tl.constexpr, FLAGS: tl.constexpr, DOT_T: tl.constexpr):
        pid = tl.program_id(0)
        slab = pid // TILES
        tm = (pid % TILES) % TILES_M
        tk = (pid % TILES) // TILES_M
        rm = (tm * BM + tl.arange(0, BM)).to(tl.int64)
        rk = (tk * BK + tl.arange(0, BK)).to(tl.int64)
        mmask = rm < M
        kmask = rk < K
        if FLAGS:  # pass 2 of CGS2: only the rows the DGKS test flagged
            kmask = kmask & (tl.load(flag_ptr + rk, mask=kmask, other=0) != 0)
        if tl.sum(kmask.to(tl.int32), axis=0) > 0:
            cols = tl.arange(0, BN)
            first = slab.to(tl.int64) * CHUNKS * BN
            acc3 = tl.zeros((BM, BK, BN), ACC)
            acc2 = tl.zeros((BM, BK), tl.float32)
            sq = tl.zeros((BK, BN), ACC)
            for c in range(0, CHUNKS):
                offs = first + c * BN + cols
                nmask = offs < N
                v = tl.load(v_ptr + rm[:, None] * s_vm + offs[None, :] * s_vn,
                            mask=mmask[:, None] & nmask[None, :], other=0.0)
                w = tl.load(w_ptr + rk[:, None] * s_wk + offs[None, :] * s_wn,
                            mask=kmask[:, None] & nmask[None, :], other=0.0).to(ACC)
                if MODE == 0:
                    acc3 += v.to(ACC)[:, None, :] * w[None, :, :]
                elif MODE == 1:  # bf16 basis: W = hi + mid + lo in bf16, three exact products
                    vb = v.to(tl.bfloat16).to(DOT_T)
                    hi = w.to(tl.bfloat16)
                    r = w - hi.to(tl.float32)
                    mid = r.to(tl.bfloat16)
                    lo = (r - mid.to(tl.float32)).to(tl.bfloat16).to(DOT_T)
                    hi, mid = hi.to(DOT_T), mid.to(DOT_T)
                    acc2 = tl.dot(vb, tl.trans(hi), acc2)
                    acc2 = tl.dot(vb, tl.trans(mid), acc2)
                    acc2 = tl.dot(vb, tl.trans(lo), acc2)
                else:
                    acc2 = tl.dot(v.to(tl.float32), tl.trans(w), acc2, input_precision="tf32x3")
                if NORM:
                    sq += w * w
            if MODE == 0:
                res = tl.sum(acc3, axis=2)
            else:
                res = acc2.to(ACC)
            out = part_ptr + slab.to(tl.int64) * M * K + rm[:, None] * K + rk[None, :]
            tl.store(out, res, mask=mmask[:, None] & kmask[None, :])
            if NORM:
                if tm == 0:  # one m-tile per (slab, k-tile) writes the norms
                    tl.store(nsq_ptr + slab.to(tl.int64) * K + rk, tl.sum(sq, axis=1),
                             mask=kmask)

    @triton.jit
    def _update_kernel(v_ptr, c_ptr, w_ptr, nsq_ptr, flag_ptr, M, K, N, CHUNKS, TILES_K,
                       s_vm, s_vn, s_cm, s_ck, s_wk, s_wn, ACC: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                       MODE: tl.constexpr, NORM: tl.constexpr, FLAGS: tl.constexpr,
                       DOT_T: tl.constexpr):
        pid = tl.program_id(0)
        slab = pid // TILES_K
        rk = ((pid % TILES_K) * BK + tl.arange(0, BK)).to(tl.int64)
        kmask = rk < K
        if FLAGS:
            kmask = kmask & (tl.load(flag_ptr + rk, mask=kmask, other=0) != 0)
        if tl.sum(kmask.to(tl.int32), axis=0) > 0:
            cols = tl.arange(0, BN)
            first = slab.to(tl.int64) * CHUNKS * BN
            sq = tl.zeros((BK, BN), ACC)
            for c in range(0, CHUNKS):
                offs = first + c * BN + cols
                nmask = offs < N
                acc = tl.zeros((BK, BN), ACC)
                if MODE == 0:
                    for i in range(0, M):
                        v = tl.load(v_ptr + i * s_vm + offs * s_vn, mask=nmask, other=0.0)
                        ci = tl.load(c_ptr + i * s_cm + rk * s_ck, mask=kmask, other=0.0)
                        acc += ci.to(ACC)[:, None] * v.to(ACC)[None, :]
                else:
                    acc2 = tl.zeros((BK, BN), tl.float32)
                    for i0 in range(0, M, BM):
                        rm = (i0 + tl.arange(0, BM)).to(tl.int64)
                        mmask = rm < M
                        v = tl.load(v_ptr + rm[:, None] * s_vm + offs[None, :] * s_vn,
                                    mask=mmask[:, None] & nmask[None, :], other=0.0)
                        ct = tl.load(c_ptr + rm[None, :] * s_cm + rk[:, None] * s_ck,
                                     mask=kmask[:, None] & mmask[None, :], other=0.0)
                        ct = ct.to(tl.float32)
                        if MODE == 1:
                            vb = v.to(tl.bfloat16).to(DOT_T)
                            hi = ct.to(tl.bfloat16)
                            r = ct - hi.to(tl.float32)
                            mid = r.to(tl.bfloat16)
                            lo = (r - mid.to(tl.float32)).to(tl.bfloat16).to(DOT_T)
                            hi, mid = hi.to(DOT_T), mid.to(DOT_T)
                            acc2 = tl.dot(hi, vb, acc2)
                            acc2 = tl.dot(mid, vb, acc2)
                            acc2 = tl.dot(lo, vb, acc2)
                        else:
                            acc2 = tl.dot(ct, v.to(tl.float32), acc2, input_precision="tf32x3")
                    acc = acc2.to(ACC)
                wp = w_ptr + rk[:, None] * s_wk + offs[None, :] * s_wn
                wmask = kmask[:, None] & nmask[None, :]
                w = (tl.load(wp, mask=wmask, other=0.0).to(ACC) - acc).to(w_ptr.dtype.element_ty)
                tl.store(wp, w, mask=wmask)
                if NORM:
                    wa = tl.where(wmask, w.to(ACC), 0.0)
                    sq += wa * wa
            if NORM:
                tl.store(nsq_ptr + slab.to(tl.int64) * K + rk, tl.sum(sq, axis=1), mask=kmask)

    _KERNELS = (_dot_kernel, _update_kernel, tl)
    return _KERNELS


# ---------------------------------------------------------------------------------------------
# launch planning
# ---------------------------------------------------------------------------------------------


def _p2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _check_device(*ts: torch.Tensor) -> None:
    dev = ts[0].device
    if any(t.device != dev for t in ts):
        raise ConfigurationError("all tensors must be on one device, got "
                                 + ", ".join(str(t.device) for t in ts))
    if runs_on(dev.type):
        return
    raise BackendUnavailableError(
        f"the Triton basis kernels run on CUDA tensors (got {dev.type}); on the CPU only under "
        "the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported; slow, for "
        "tests). Use hessfast.ops with HESSFAST_BACKEND=auto for CPU tensors")


def _check(V: torch.Tensor, W: torch.Tensor) -> None:
    for name, t, dts in (("V", V, _STORAGE), ("W", W, _WORK)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in dts:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t)
            raise ConfigurationError(
                f"{name} must be a 2-D tensor with dtype in {[str(d) for d in dts]}, got {got}")
    if W.shape[1] != V.shape[1]:
        raise ConfigurationError(
            f"W must have n={V.shape[1]} columns like V, got shape {tuple(W.shape)}")


def _acc(acc_dtype: torch.dtype | None, V: torch.Tensor, W: torch.Tensor) -> torch.dtype:
    default = torch.float64 if V.dtype == torch.float64 else torch.float32
    acc = torch.promote_types(acc_dtype or default, W.dtype)
    if acc not in _WORK:
        raise ConfigurationError(f"acc_dtype must be float32 or float64, got {acc_dtype}")
    return acc


def _mode_code(mode: str, storage: torch.dtype, acc: torch.dtype) -> int:
    """0: fma in acc; 1: bf16x3 tensor-core dots (bf16 basis); 2: tf32x3 dots."""
    if mode not in MODES:
        raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "fma" or acc == torch.float64:
        return 0
    return 1 if storage == torch.bfloat16 else 2


def _plan(n: int, bn: int, tiles: int, device: torch.device, num_slabs: int | None):
    """(slabs, chunks per slab): enough programs to fill the device, each a contiguous slab."""
    blocks = -(-n // bn)
    if num_slabs is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            num_slabs = max(1, 8 * sms // tiles)
        else:
            num_slabs = 4
    chunks = -(-blocks // max(1, min(int(num_slabs), blocks)))
    return -(-blocks // chunks), chunks


def _tile(m: int, k: int, code: int, acc: torch.dtype, block: tuple[int, int, int] | None):
    """(BM, BK, BN); tensor-core dots need every dimension >= 16."""
    if block is not None:
        bm, bk, bn = (int(b) for b in block)
        if any(b < 1 or b & (b - 1) for b in (bm, bk, bn)):
            raise ConfigurationError(f"block sizes must be powers of two, got {block}")
    else:
        bk = min(_p2(k), 16)
        bm = min(_p2(m), 32 if acc == torch.float32 else 16)
        bn = max(16, min(256, (8192 if acc == torch.float32 else 4096) // (bm * bk)))
    if code:
        bm, bk, bn = max(bm, 16), max(bk, 16), max(bn, 16)
    return bm, bk, bn


def _tl_dtype(tl, dt: torch.dtype):
    return tl.float64 if dt == torch.float64 else tl.float32


def _dot_t(tl):
    """Operand type of the bf16x3 dots: bfloat16, except under the interpreter, whose tl.dot
    multiplies bfloat16 bit patterns as integers (Triton 3.9); there the same bf16 parts are
    multiplied in float32, where their products are exact, so the split itself is tested."""
    return tl.float32 if interpreted() else tl.bfloat16


def _dot(V, W, acc, code, *, norm, flags, num_slabs, block):
    dot_kernel, _, tl = _kernels()
    m, n = V.shape
    k = W.shape[0]
    bm, bk, bn = _tile(m, k, code, acc, block)
    tiles_m, tiles_k = -(-m // bm), -(-k // bk)
    slabs, chunks = _plan(n, bn, tiles_m * tiles_k, V.device, num_slabs)
    alloc = torch.zeros if flags is not None else torch.empty  # flagged-out rows stay zero
    part = alloc((slabs, m, k), dtype=acc, device=V.device)
    nsq = torch.empty((slabs, k), dtype=acc, device=V.device) if norm else part
    dot_kernel[(slabs * tiles_m * tiles_k,)](
        V, W, part, nsq, flags if flags is not None else part, m, k, n, chunks, tiles_m,
        tiles_m * tiles_k, V.stride(0), V.stride(1), W.stride(0), W.stride(1),
        ACC=_tl_dtype(tl, acc), BM=bm, BK=bk, BN=bn, MODE=code, NORM=norm,
        FLAGS=flags is not None, DOT_T=_dot_t(tl))
    return part.sum(0), (nsq.sum(0) if norm else None)


def _update(V, C, W, acc, code, *, norm, flags, num_slabs, block):
    _, update_kernel, tl = _kernels()
    m, n = V.shape
    k = W.shape[0]
    bm, bk, bn = _tile(m, k, code, acc, block)
    if block is None and code == 0:
        bn = max(16, min(1024, 4096 // bk))  # one row of V at a time: wide, vectorised rows
    tiles_k = -(-k // bk)
    slabs, chunks = _plan(n, bn, tiles_k, V.device, num_slabs)
    nsq = (torch.zeros if flags is not None else torch.empty)(
        (slabs, k), dtype=acc, device=V.device) if norm else C
    update_kernel[(slabs * tiles_k,)](
        V, C, W, nsq, flags if flags is not None else C, m, k, n, chunks, tiles_k,
        V.stride(0), V.stride(1), C.stride(0), C.stride(1), W.stride(0), W.stride(1),
        ACC=_tl_dtype(tl, acc), BM=bm, BK=bk, BN=bn, MODE=code, NORM=norm,
        FLAGS=flags is not None, DOT_T=_dot_t(tl))
    return nsq.sum(0) if norm else None


# ---------------------------------------------------------------------------------------------
# public wrappers
# ---------------------------------------------------------------------------------------------


def basis_dot_triton(
    V: torch.Tensor, W: torch.Tensor, *, acc_dtype: torch.dtype | None = None,
    mode: str = "fma", num_slabs: int | None = None, block: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """``C[m, k] = V[m, n] @ W[k, n]^T`` in ``acc_dtype`` (default float64 for a float64 basis,
    else float32; raised to W's dtype), like :func:`hessfast._reference.basis_dot`.

    V: ``[m, n]`` bf16/fp16/fp32/fp64, W: ``[k, n]`` fp32/fp64, any strides, on CUDA (or the CPU
    under ``TRITON_INTERPRET=1``). ``mode``, ``num_slabs`` (programs along n) and ``block``
    (``(BM, BK, BN)``, powers of two) tune the launch; None picks defaults.
    """
    _check(V, W)
    _check_device(V, W)
    acc = _acc(acc_dtype, V, W)
    m, n = V.shape
    k = W.shape[0]
    code = _mode_code(mode, V.dtype, acc)
    if m == 0 or k == 0 or n == 0:
        return torch.zeros((m, k), dtype=acc, device=V.device)
    return _dot(V, W, acc, code, norm=False, flags=None, num_slabs=num_slabs, block=block)[0]


def basis_update_triton(
    V: torch.Tensor, C: torch.Tensor, W: torch.Tensor, *, mode: str = "fma",
    num_slabs: int | None = None, block: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """``W[k, n] -= C[m, k]^T @ V[m, n]`` in place, arithmetic in ``promote(C, W)`` (W is never
    rounded below its own precision); returns ``W``. Like :func:`hessfast._reference.basis_update`.
    W must not alias V or C, nor overlap itself (:mod:`hessfast.ops` checks this)."""
    _check(V, W)
    _check_device(V, C, W)
    m, n = V.shape
    k = W.shape[0]
    if C.dtype not in _WORK or tuple(C.shape) != (m, k):
        raise ConfigurationError(
            f"C must be float32/float64 of shape (m, k) = ({m}, {k}), got {C.dtype} "
            f"{tuple(C.shape)}")
    acc = torch.promote_types(C.dtype, W.dtype)
    code = _mode_code(mode, V.dtype, acc)
    if m == 0 or k == 0 or n == 0:
        return W
    _update(V, C, W, acc, code, norm=False, flags=None, num_slabs=num_slabs, block=block)
    return W


def reorthogonalize_triton(
    V: torch.Tensor, W: torch.Tensor, *, acc_dtype: torch.dtype | None = None,
    eta: float = DGKS_ETA, mode: str = "fma", num_slabs: int | None = None,
    block: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CGS2 of the rows of ``W[k, n]`` against ``V[m, n]``, in place; the contract of
    :func:`hessfast._reference.reorthogonalize`: returns ``C[m, k] = C1 + C2`` and
    ``norms[3, k]`` (before, after pass 1, final) in the accumulation dtype. Row j gets pass 2
    iff ``norms[1, j] < eta * norms[0, j]``, decided on the device (no host synchronisation);
    four kernel launches when ``eta > 0`` (pass 2's programs exit early if no row is flagged).
    """
    _check(V, W)
    _check_device(V, W)
    if not isinstance(eta, (int, float)) or not eta >= 0:
        raise ConfigurationError(f"eta must be a number >= 0, got {eta!r}")
    acc = _acc(acc_dtype, V, W)
    m, n = V.shape
    k = W.shape[0]
    code = _mode_code(mode, V.dtype, acc)
    if k == 0 or m == 0 or n == 0:
        Wa = W.to(acc)
        nrm = torch.linalg.vector_norm(Wa, dim=1) if n > 0 else Wa.new_zeros(k)
        return torch.zeros((m, k), dtype=acc, device=W.device), nrm.expand(3, k).clone()
    kw = {"num_slabs": num_slabs, "block": block}
    Wa = W if W.dtype == acc else W.to(acc)  # float64 arithmetic for a float64 basis
    C, nsq0 = _dot(V, Wa, acc, code, norm=True, flags=None, **kw)
    before = nsq0.sqrt()
    after1 = _update(V, C, Wa, acc, code, norm=True, flags=None, **kw).sqrt()
    final = after1
    if eta > 0:
        redo = after1 < eta * before  # [k] on the device
        flags = redo.to(torch.int32)
        C2, _ = _dot(V, Wa, acc, code, norm=False, flags=flags, **kw)
        final2 = _update(V, C2, Wa, acc, code, norm=True, flags=flags, **kw).sqrt()
        C = C + C2  # C2 is zero in the columns of rows without a second pass
        final = torch.where(redo, final2, after1)
    if Wa is not W:
        W.copy_(Wa)
    return C, torch.stack([before, after1, final])
