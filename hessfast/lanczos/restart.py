"""Thick-restart block Lanczos for symmetric operators.

The basis ``Q: [m, n]`` (rows orthonormal) and the projected matrix ``T = Q A Q^T`` satisfy,
after every step,

    A Q^T = Q^T T + Q_new^T L E^T                                           (*)

where ``Q_new: [b, n]`` is the next block and ``E`` selects the last block of the basis. Each
step multiplies the current block by A in ONE ``matmat`` call (one data pass for a model
operator), orthogonalises the result against the whole basis with classical Gram-Schmidt
and a DGKS-triggered second pass (``ops.reorthogonalize``), and stores the coefficients it
returns as the corresponding column block of T. Because the coefficients against *every*
basis vector are kept, (*) also holds after a thick restart (Ritz vectors plus the next
block, the "arrowhead" T), so restarting needs no special cases.

Ritz pairs come from a float64 ``eigh`` of T; the residual of pair i is ``||L y_i[last]||``
by (*). Pairs are converged when that residual is <= tol * max(|theta_i|, 1e-3 * ||A||_est)
(TESTING.md). At a restart, converged wanted pairs are *locked*: their coupling to the next
block is set to zero (an error below their tolerance), so they stay exact Ritz pairs.

Rank deficiency of a new block (an invariant subspace, the zero operator, duplicate start
vectors) is detected from the singular values of its R factor relative to the operator's
scale, with ``<=`` so a zero operator works, and the lost directions are replaced by random
vectors orthogonal to the basis with zero coupling: (*) stays exact.

This module imports nothing from torch.func and no kernel backend except through ``ops``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from .. import ops
from ..errors import NonFiniteError
from ..linop import LinearOperator
from .basis import Basis, orthonormal_block, random_rows, select

__all__ = ["LanczosState", "block_lanczos"]


@dataclass
class LanczosState:
    """Everything a run produced; :func:`block_lanczos` returns it."""

    theta: torch.Tensor  # [k] float64 Ritz values of the wanted pairs, most wanted first
    vectors: torch.Tensor  # [k, n] Ritz vectors in the operator's dtype
    residuals: torch.Tensor  # [k] float64
    converged: torch.Tensor  # [k] bool
    status: str
    num_matvecs: int = 0
    num_passes: int = 0
    num_restarts: int = 0
    norm_estimate: float = 0.0
    orthogonality: float = 0.0  # max |X X^T - I| of the returned vectors
    history: list[int] = field(default_factory=list)  # converged count after each step


def block_lanczos(
    A: LinearOperator,
    k: int,
    which: str,
    *,
    tol: float,
    block_size: int,
    max_basis: int,
    max_matvecs: int,
    v0: torch.Tensor | None,
    seed: int,
    reorth: str = "full",
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
) -> LanczosState:
    """Thick-restart block Lanczos with locking; see the module docstring for the math.

    Args:
        A: symmetric operator ``[n, n]``.
        k: number of wanted pairs (``1 <= k < n``).
        which: ``LA``, ``SA``, ``LM`` or ``BE``.
        tol: relative residual tolerance.
        block_size: rows per block (one ``matmat`` per step).
        max_basis: basis rows before a thick restart (``>= k + 2 * block_size``).
        max_matvecs: budget of operator products (rows multiplied).
        v0: ``[n]`` or ``[j, n]`` start vectors (completed with random rows).
        seed: seed of the private generator for random rows.
        reorth: ``full`` (CGS2 against the whole basis, default), ``partial`` (the last two
            blocks always; the whole basis when the measured loss of orthogonality exceeds
            sqrt(eps)) or ``none`` (the last two blocks only: ghosts can appear).
        basis_dtype: storage dtype of the basis (default: the operator's dtype).
        basis_device: device of the basis (default: the operator's device).
    """
    n = A.shape[0]
    wdtype = A.dtype if A.dtype in (torch.float32, torch.float64) else torch.float32
    acc = torch.float64 if wdtype == torch.float64 else torch.float32
    bdtype = basis_dtype or wdtype
    bdev = torch.device(basis_device) if basis_device is not None else A.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.finfo(bdtype).eps
    b = block_size
    cap = max_basis
    basis = Basis(cap, n, bdtype, bdev)
    start_mv, start_passes = A.num_matvecs, A.num_passes

    # -- start block ------------------------------------------------------------------
    X0 = random_rows(b, n, gen, wdtype, bdev)
    if v0 is not None:
        v = v0.reshape(-1, n).to(device=bdev, dtype=wdtype)[:b]
        X0[: v.shape[0]] = v
    Qh, R = torch.linalg.qr(X0.T.to(acc))
    diag = torch.diagonal(R).abs()
    if bool((diag <= 1e-10 * max(float(diag.max()), 1e-300)).any()):
        # duplicate / zero start vectors: replace with random ones (never divide by zero)
        X0 = X0 + 1e-3 * X0.norm(dim=1, keepdim=True).clamp_min(1.0) * random_rows(
            b, n, gen, wdtype, bdev
        )
        Qh, R = torch.linalg.qr(X0.T.to(acc))
    block = Qh.T.to(wdtype)[: min(b, n)]

    norm_est = 0.0
    num_restarts = 0
    history: list[int] = []
    locked = torch.zeros(cap, dtype=torch.bool)
    lockres = torch.zeros(cap, dtype=torch.float64)  # residual of each locked basis row
    status = "MAX_MATVECS"
    theta = torch.zeros(0, dtype=torch.float64)
    Y = torch.zeros(0, 0, dtype=torch.float64)
    res = torch.zeros(0, dtype=torch.float64)

    while True:
        bb = block.shape[0]
        if A.num_matvecs - start_mv + bb > max_matvecs:
            status = "MAX_MATVECS"
            break
        s = basis.m
        basis.Q[s : s + bb] = block.to(bdtype)
        basis.m = s + bb
        W = A.matmat(block.to(A.dtype)).to(device=bdev, dtype=wdtype)
        if not bool(torch.isfinite(W).all()):
            basis.m = s
            status = "NONFINITE"
            break
        norm_est = max(norm_est, float(W.norm(dim=1).max()))
        Qall = basis.rows()
        if reorth == "full":
            C, _ = ops.reorthogonalize(Qall, W, acc_dtype=acc)
        else:
            lo = max(0, s - bb)
            C = torch.zeros(basis.m, bb, dtype=acc, device=bdev)
            if reorth == "partial":
                Cfull = ops.basis_dot(Qall, W, acc_dtype=acc)
                wn = W.norm(dim=1).to(acc).clamp_min(torch.finfo(acc).tiny)
                if lo > 0 and float((Cfull[:lo] / wn).abs().max()) > math.sqrt(eps):
                    C, _ = ops.reorthogonalize(Qall, W, acc_dtype=acc)
                    lo = -1
            if lo >= 0:
                local = Qall[lo:]
                C_local, _ = ops.reorthogonalize(local, W, acc_dtype=acc)
                C[lo:] = C_local
        Cd = C.double().cpu()
        Cd[locked[: basis.m]] = 0.0  # locked Ritz vectors: their coupling is deflated
        basis.T[: basis.m, s : s + bb] = Cd
        basis.T[s : s + bb, : basis.m] = Cd.T
        # symmetric diagonal block: average the two rounding errors
        Tjj = basis.T[s : s + bb, s : s + bb]
        basis.T[s : s + bb, s : s + bb] = 0.5 * (Tjj + Tjj.T)

        # Rayleigh-Ritz on the float64 projection
        m = basis.m
        T = basis.T[:m, :m]
        theta, Y = torch.linalg.eigh(0.5 * (T + T.T))
        norm_est = max(norm_est, float(theta.abs().max()))
        tiny = max(norm_est, torch.finfo(acc).tiny) * 64 * torch.finfo(acc).eps
        Qn, L = orthonormal_block(W, basis.rows(), tiny, gen, acc)
        # residual of Ritz pair i: ||L^T y_i[last block]||, plus the couplings deflated
        # when pairs were locked (triangle inequality: an upper bound, exact for a locked
        # vector itself)
        res = (L.T @ Y[s : s + bb]).norm(dim=0) if L.numel() else torch.zeros_like(theta)
        res = res + Y.abs().T @ lockres[:m]
        floor = 1e-3 * norm_est
        ok = res <= tol * torch.clamp(theta.abs(), min=floor)
        want = select(theta, k, which)
        nconv = int(ok[want].sum())
        history.append(nconv)
        if nconv >= min(k, m) and m >= k:
            status = "CONVERGED"
            break
        if Qn.shape[0] == 0:
            status = "INVARIANT_SUBSPACE"
            break
        if m + Qn.shape[0] > cap:
            # -- thick restart: keep the most wanted Ritz vectors, then the next block ----
            keep_n = min(m - Qn.shape[0], max(k + (m - k) // 2, k + b))
            idx = select(theta, keep_n, which)
            p = idx.numel()
            X = (Y[:, idx].T.to(acc).to(bdev) @ basis.rows().to(acc)).to(bdtype)  # [p, n]
            basis.Q[:p] = X
            basis.m = p
            basis.T.zero_()
            basis.T[:p, :p] = torch.diag(theta[idx])
            # The coupling of the next block to X (L^T Y[last, idx]) comes back as the
            # coefficients of its own product against X, so (*) needs nothing more here.
            # Converged pairs are locked: those coefficients will be zeroed.
            locked = torch.zeros(cap, dtype=torch.bool)
            locked[:p] = ok[idx]
            lockres = torch.zeros(cap, dtype=torch.float64)
            lockres[:p] = torch.where(ok[idx], res[idx], torch.zeros(()))
            theta, res = theta[idx], res[idx]
            Y = torch.eye(p, dtype=torch.float64)
            num_restarts += 1
        block = Qn

    # -- results: the last Rayleigh-Ritz (theta, Y, res) matches the basis in place -------
    m = basis.m
    if m == 0 or theta.numel() == 0:
        raise NonFiniteError(
            "the first operator product is not finite (NaN/Inf): check the operator"
        )
    want = select(theta, k, which)
    floor = 1e-3 * norm_est
    ok = res <= tol * torch.clamp(theta.abs(), min=floor)
    want = want[: min(k, m)]
    vecs = (Y[:, want].T.to(acc).to(bdev) @ basis.rows().to(acc)).to(A.dtype)
    vecs = vecs.to(A.device)
    gram = vecs.double() @ vecs.double().T
    ortho = float((gram - torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device))
                  .abs().max()) if gram.numel() else 0.0
    if status == "INVARIANT_SUBSPACE" and not bool(ok[want].all()):
        status = "MAX_MATVECS"
    if status == "INVARIANT_SUBSPACE" and want.numel() < k:
        warnings.warn(
            f"hessfast: the Krylov space became invariant at dimension {m} < k={k}",
            stacklevel=3,
        )
    return LanczosState(
        theta=theta[want].clone(),
        vectors=vecs,
        residuals=res[want].clone(),
        converged=ok[want].clone(),
        status=status,
        num_matvecs=A.num_matvecs - start_mv,
        num_passes=A.num_passes - start_passes,
        num_restarts=num_restarts,
        norm_estimate=norm_est,
        orthogonality=ortho,
        history=history,
    )
