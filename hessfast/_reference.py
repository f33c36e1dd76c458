"""Plain-PyTorch twins of the native basis ops: the test oracle and the last-resort backend.

Same signatures and semantics as :mod:`hessfast.ops` (which validates arguments before calling
here). Arithmetic happens in the accumulation dtype ``acc_dtype``: the basis is converted to it
on the fly, exactly like the kernels do. This module imports nothing from hessfast.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

__all__ = ["basis_dot", "basis_update", "reorthogonalize", "DGKS_ETA"]

#: DGKS threshold: a row gets a second Gram-Schmidt pass when the first one removed more than
#: 1 - 1/sqrt(2) of its length (||w_after|| < eta ||w_before||).
DGKS_ETA = 1.0 / math.sqrt(2.0)


#: Bytes of a basis converted to the accumulation dtype at once: a bf16/fp16 basis is cast in
#: row chunks of this size, so its fp32 copy never exists whole (it would cost more memory
#: than an fp32 basis).
CAST_CHUNK_BYTES = 64 << 20


def _default_acc(storage: torch.dtype) -> torch.dtype:
    return torch.float64 if storage == torch.float64 else torch.float32


def _rows(V: torch.Tensor, acc: torch.dtype) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows, V[rows] in acc)``: all of ``V`` when no cast is needed, else row chunks of at
    most :data:`CAST_CHUNK_BYTES` once converted."""
    m, n = V.shape
    if V.dtype == acc or m == 0:
        yield slice(0, m), V.to(acc)
        return
    per = max(1, CAST_CHUNK_BYTES // max(1, n * torch.empty((), dtype=acc).element_size()))
    for a in range(0, m, per):
        yield slice(a, min(m, a + per)), V[a : a + per].to(acc)


def _dot(V: torch.Tensor, Wa: torch.Tensor) -> torch.Tensor:
    """``V Wa^T`` (``[m, k]``) in ``Wa.dtype``, ``V`` converted chunk by chunk."""
    C = torch.empty(V.shape[0], Wa.shape[0], dtype=Wa.dtype, device=Wa.device)
    for rows, Vc in _rows(V, Wa.dtype):
        torch.matmul(Vc, Wa.T, out=C[rows])
    return C


def _subtract(V: torch.Tensor, C: torch.Tensor, Wa: torch.Tensor) -> None:
    """``Wa -= C^T V`` in place, ``V`` converted chunk by chunk."""
    for rows, Vc in _rows(V, Wa.dtype):
        Wa.sub_(C[rows].T @ Vc)


def basis_dot(
    V: torch.Tensor, W: torch.Tensor, *, acc_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``C[m, k] = V[m, n] @ W[k, n]^T`` in ``acc_dtype`` (default: float64 for a float64 basis,
    else float32)."""
    acc = torch.promote_types(acc_dtype or _default_acc(V.dtype), W.dtype)
    return _dot(V, W.to(acc))


def basis_update(V: torch.Tensor, C: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``W[k, n] -= C[m, k]^T @ V[m, n]`` in place, computed in ``C.dtype``; returns ``W``."""
    acc = torch.promote_types(C.dtype, W.dtype)  # never round W below its own precision
    Wa = W.to(acc)
    _subtract(V, C.to(acc), Wa)
    if Wa.data_ptr() != W.data_ptr():
        W.copy_(Wa)
    return W


def reorthogonalize(
    V: torch.Tensor,
    W: torch.Tensor,
    *,
    acc_dtype: torch.dtype | None = None,
    eta: float = DGKS_ETA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classical Gram-Schmidt of the rows of ``W[k, n]`` against the rows of ``V[m, n]``, in place,
    with a second pass per row when the DGKS test fires (CGS2).

    Pass 1: ``C1 = V W^T``; ``W -= C1^T V``. Row ``j`` gets pass 2 (``C2 = V w_j``;
    ``w_j -= C2^T V``) iff ``||w_j||_after1 < eta * ||w_j||_before``; ``eta = 0`` disables it.
    The decision is per row: rows that kept most of their length are not touched again.

    Returns ``C[m, k] = C1 + C2`` (``C2 = 0`` on rows without a second pass) and
    ``norms[3, k]``: ``||w_j||`` before, after pass 1, and final — all in ``acc_dtype``.
    """
    acc = torch.promote_types(acc_dtype or _default_acc(V.dtype), W.dtype)
    Wa = W.to(acc)
    before = torch.linalg.vector_norm(Wa, dim=1)
    C = _dot(V, Wa)
    _subtract(V, C, Wa)
    after1 = torch.linalg.vector_norm(Wa, dim=1)
    final = after1.clone()
    redo = (after1 < eta * before).nonzero().flatten()
    if redo.numel() > 0:
        Ws = Wa[redo]
        C2 = _dot(V, Ws)
        _subtract(V, C2, Ws)
        Wa[redo] = Ws
        C[:, redo] += C2
        final[redo] = torch.linalg.vector_norm(Ws, dim=1)
    W.copy_(Wa)
    return C, torch.stack([before, after1, final])
