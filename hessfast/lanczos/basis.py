"""Shared pieces of the Lanczos methods: the row basis with its float64 projection, random
rows from a private generator, the orthonormalisation of a new block with rank-deficiency
replacement, and the selection of wanted Ritz values."""

from __future__ import annotations

import torch

from .. import ops
from .._checks import sample_probes

__all__ = ["WHICH", "Basis", "orthonormal_block", "select"]

WHICH = ("LA", "SA", "LM", "BE")


def select(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices of the k most wanted values of ``theta [m]``, most wanted first.

    For ``BE`` the order alternates high, low, high, ... so any prefix is balanced.
    """
    m = theta.numel()
    k = min(k, m)
    if which == "LA":
        return torch.argsort(theta, descending=True)[:k]
    if which == "SA":
        return torch.argsort(theta)[:k]
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True)[:k]
    order = torch.argsort(theta)
    out, lo, hi = [], 0, m - 1
    while len(out) < k:
        out.append(int(order[hi]))
        hi -= 1
        if len(out) < k:
            out.append(int(order[lo]))
            lo += 1
    return torch.tensor(out, dtype=torch.long)


class Basis:
    """Row basis ``Q[:m]`` in a storage dtype/device, and the float64 projection T."""

    def __init__(self, capacity: int, n: int, dtype: torch.dtype, device: torch.device,
                 pin: bool = False):
        self.Q = torch.empty(capacity, n, dtype=dtype, device=device, pin_memory=pin)
        self.T = torch.zeros(capacity, capacity, dtype=torch.float64)
        self.m = 0

    def rows(self, a: int = 0, b: int | None = None) -> torch.Tensor:
        """The basis rows ``Q[a:b]`` (``b`` None: up to the ``m`` rows filled so far), a view
        ``[b - a, n]`` in the storage dtype and device."""
        return self.Q[a : self.m if b is None else b]


def orthonormal_block(
    W: torch.Tensor,
    basis: torch.Tensor,
    tiny: float,
    gen: torch.Generator,
    acc: torch.dtype,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``W [b, n]`` (already orthogonal to ``basis``) into ``L Qn``; ``inplace``: W is
    the caller's to overwrite (a single row is then normalised in place, one row saved).

    Returns ``Qn [b', n]`` with orthonormal rows, orthogonal to ``basis``, and ``L [b, b']``
    with ``W = L Qn`` up to the directions whose singular value is <= ``tiny``, which are
    replaced by random orthonormal directions with zero coupling. ``b' < b`` only when the
    basis plus the block would exceed the space (n).
    """
    b, n = W.shape
    room = n - basis.shape[0]
    if b == 1:
        # one vector: its norm is the whole factorisation (a QR and an SVD of [n, 1] cost
        # about 0.25 ms a step at n = 26k, a fifth of a small model's product)
        S = torch.linalg.vector_norm(W.to(acc)).double().cpu().reshape(1)
        div = S.to(device=W.device, dtype=W.dtype).clamp_min(torch.finfo(W.dtype).tiny)
        Qn = W.div_(div) if inplace else W / div
        L = S.reshape(1, 1).clone()
    else:
        Qh, R = torch.linalg.qr(W.T.to(acc))  # [n, b], [b, b]
        # The small factors live on the CPU in float64, like T; only Qn stays on W's device.
        U, S, Vh = torch.linalg.svd(R.double().cpu())
        Qn = (Qh.double() @ U.to(Qh.device)).T.to(W.dtype)  # [b, n]; W^T = Qh U S Vh
        L = Vh.T * S  # [b, b] float64 on the CPU: W = L Qn
    keep = S > tiny
    bad = (~keep).nonzero().flatten().tolist()
    if bad:
        L[:, bad] = 0.0
        good = keep.nonzero().flatten()
        fresh_rows = []
        for _ in bad:
            if basis.shape[0] + len(good) + len(fresh_rows) >= n:
                break
            fresh = sample_probes(gen, 1, n, "gaussian", dtype=W.dtype, device=W.device)
            others = torch.cat([basis.to(W.dtype), Qn[good.to(Qn.device)], *fresh_rows], dim=0)
            # one call is CGS2: the DGKS test adds the second pass when cancellation needs it
            ops.reorthogonalize(others, fresh, acc_dtype=acc)
            nrm = float(fresh.norm())
            if nrm <= 1e-8:  # numerically no room left
                break
            fresh_rows.append(fresh / nrm)
        nkept = len(fresh_rows)
        Qn_new = torch.cat([Qn[good.to(Qn.device)], *fresh_rows], dim=0)
        L_new = torch.cat([L[:, good], torch.zeros(b, nkept, dtype=torch.float64)], dim=1)
        Qn, L = Qn_new, L_new
    if Qn.shape[0] > room:
        Qn, L = Qn[:room], L[:, :room]
    return Qn, L


