"""Thick-restart block Lanczos for symmetric operators, with a verified wanted set.

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
by (*), floored at what the working precision can show (``max(., 64 eps ||A||_est)``,
:func:`.verify.residual_floor`). Pairs are converged when that residual is <= max(tol *
max(|theta_i|, 1e-3 * ||A||_est), floor) (docs/architecture.md, "Convergence"; the
verification's slack is the same threshold). At a thick restart the next block is the residual
block, whose product's coefficients against the kept Ritz vectors restore their coupling,
so (*) stays exact.

Rank deficiency of a new block (an invariant subspace, the zero operator, duplicate start
vectors) is detected from the singular values of its R factor relative to the operator's
scale, with ``<=`` so a zero operator works, and the lost directions are replaced by random
vectors orthogonal to the basis with zero coupling: (*) stays exact.

Verification. A Krylov space of block size b holds at most b vectors of any eigenspace, so with
an eigenvalue of multiplicity > b (a network's null space, permutation-symmetric units,
duplicated layers) the k wanted Ritz pairs can all converge while a copy of a wanted eigenvalue
was never seen: every returned pair is a true eigenpair, but not the k most wanted ones. So
convergence is only a candidate: the run restarts on the k candidates and continues from a
fresh random block orthogonal to them (not from their residual block) for ``s`` steps. ``s`` is
calibrated on the run itself: a missed eigenvalue is one at least as wanted as the k-th
candidate, and the run from its own random start needed ``t`` steps before its most wanted Ritz
value first beat the k-th candidate; the complement (the same spectrum less the candidates)
from a random start needs about as many to show a missed one there, so ``s = max(2, ceil(1.5
t))`` (a margin measured: 1.0 and 1.25 missed 6 and 3 of 48 seeded multiplicity cases, 1.5
none); for k = 1 one step (a missed copy of the only wanted value has that value, so the round
only re-checks that the start vector did not miss the top). After rounds that found misses the
wanted values are known to be repeated and the remaining copies are fainter in a random start
(one direction where the run saw many), so each later round is ``1 + min(misses, 3)`` times
longer. If a Ritz value of that complement beats the k-th candidate by more than its tolerance,
a miss is found: the iteration simply continues (the complement's Krylov space already holds
the missed direction) until the wanted set converges again, and is verified again. Only a
verification that finds nothing ends in ``CONVERGED``. Guarantee: the complement's Krylov space
from a random start sees every eigenvector with probability one; a missed eigenvalue
``lambda_c`` is found within ``s`` steps with probability at least ``1 - 1.65 sqrt(n)
exp(-sqrt(eps) (2s - 1))``, where ``eps`` is its gap over the k-th value relative to the
complement's spectral width (the Kuczynski-Wozniakowski bound for a random start); an exact
copy of a multiple eigenvalue is found in one or two steps when the rest of the spectrum is
clustered. Cost: at least 2 block steps; on network Hessians, whose top eigenvalues stand out,
5-15% more products. The candidates' residual block ``Q_d`` is dropped from the basis, so (*)
gains a term: ``A Q^T = Q^T T + Q_new^T L E^T + D^T G`` with ``G [d, m]`` the dropped
coupling (the candidates' ``L^T y[last]``, zero for rows added later, transformed with the Ritz
vectors at every restart; b rows per round) and ``D [d, n]`` the dropped rows, kept orthogonal
to the basis: after each step D loses its component along the block just multiplied (that
block's product put it into T, so the Rayleigh-Ritz can correct the candidates there). The
residual of a Ritz pair is then exact, ``||Q_new^T c + D^T g||`` with ``c = L^T y[last]``,
``g = G y``, from the small Gram matrices ``D D^T`` and ``Q_new D^T`` (d + b dot products a
step; D costs d rows of memory, b per round). The triangle bound ``||c|| + sum_rounds
||G_r y||`` used before (and still by a sharded basis, which keeps only columns of D's rows,
or a run resumed from a checkpoint, which does not save D) was up to the square root of the
number of rounds too large once the Rayleigh-Ritz rotated the copies of a repeated eigenvalue
(every copy a candidate of a different round) into each other: with -9.5 x20 wanted at b = 1
(tests/test_multiplicity.py, ``second``) ten rounds' bounds stayed at 0.3-1.5x the tolerance
while the true residuals were 0.1-0.6x, and the run stalled at 15 of 20 for 6000 products
(converged in 766 under another thread count only by the luck of the rotations).

This module imports nothing from torch.func and no kernel backend except through ``ops``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import ops
from .._checks import probe_generator, sample_probes, work_dtype
from ..linop import LinearOperator
from .basis import Basis, orthonormal_block, select
from .checkpoint import Checkpoint, lanczos_state, restore_lanczos
from .verify import beaten, converge_threshold, first_seen, residual_floor, verify_steps
from .wanted import wanted_pairs

__all__ = ["LanczosState", "block_lanczos"]

#: Ritz vectors are formed in column chunks of about this many bytes (no full-basis copy).
CHUNK_BYTES = 2**26


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
    verified: bool = False  # a verification of the wanted set found nothing missing
    num_verifications: int = 0  # verification rounds started
    num_misses: int = 0  # rounds that found a better eigenvalue than a candidate
    verify_matvecs: int = 0  # products spent in verification rounds
    residual_floor: float = 0.0  # every residual is >= it (.verify.residual_floor)


class _Run:
    """The state of one thick-restart run (basis, projection, locks, last Rayleigh-Ritz)."""

    def __init__(self, A: LinearOperator, k: int, which: str, tol: float, cap: int, seed: int,
                 reorth: str, basis_dtype: torch.dtype | None,
                 basis_device: torch.device | str | None, pin: bool = False) -> None:
        self.A, self.k, self.which, self.tol, self.reorth = A, k, which, tol, reorth
        self.n = A.shape[0]
        # vectors and accumulation in the working precision (float64 or float32)
        self.wdtype = self.acc = work_dtype(A.dtype)
        self.bdtype = basis_dtype or self.wdtype
        self.bdev = torch.device(basis_device) if basis_device is not None else A.device
        self.gen = probe_generator(seed)
        self.basis = self.make_basis(cap, pin)
        # dropped coupling of each verification round: A Q^T = ... + sum_r Q_r^T G_r
        self.G: list[torch.Tensor] = []  # each [b_r, m] float64
        # the dropped blocks' rows, kept orthogonal to the basis: [sum b_r, n] in the working
        # dtype (the residual of a Ritz pair is then exact); None where the basis holds only
        # some columns of each row (a sharded run keeps the bound)
        self.D: torch.Tensor | None = (
            torch.zeros(0, self.n, dtype=self.wdtype, device=self.bdev)
            if self.basis.Q.shape[1] == self.n else None)
        self.coupling = torch.zeros(0, 0, dtype=torch.float64)  # L^T Y[last]: [b', m]
        self.norm_est = 0.0
        self.theta = torch.zeros(0, dtype=torch.float64)
        self.Y = torch.zeros(0, 0, dtype=torch.float64)
        self.res = torch.zeros(0, dtype=torch.float64)
        self.ok = torch.zeros(0, dtype=torch.bool)
        # the loop's progress (saved by a checkpoint with the above): the next block, restarts,
        # converged count and (max, min) Ritz values per step, the verification round
        self.block, self.restarts = torch.zeros(0), 0
        self.history: list[int] = []
        self.extremes: list[tuple[float, float]] = []
        self.ref: torch.Tensor | None = None  # the candidates being verified
        self.ref_res = self.ref_vecs = torch.zeros(0)
        self.ref_slack = torch.zeros(0, dtype=torch.float64)
        self.verify_left = self.n_verify = self.n_miss = self.verify_mv = self.verify_mv0 = 0

    def make_basis(self, cap: int, pin: bool) -> Basis:
        """The basis storage: ``cap`` rows of n (a sharded run stores its columns only)."""
        return Basis(cap, self.n, self.bdtype, self.bdev, pin)

    def random_rows(self, count: int) -> torch.Tensor:
        """``[count, n]`` Gaussian rows from the run's private generator."""
        return sample_probes(self.gen, count, self.n, "gaussian", dtype=self.wdtype,
                             device=self.bdev)

    def start_block(self, b: int, v0: torch.Tensor | None) -> torch.Tensor:
        n, acc = self.n, self.acc
        X0 = self.random_rows(b)
        if v0 is not None:
            v = v0.reshape(-1, n).to(device=self.bdev, dtype=self.wdtype)[:b]  # [j, n]
            X0[: v.shape[0]] = v
        Qh, R = torch.linalg.qr(X0.T.to(acc))
        diag = torch.diagonal(R).abs()
        if bool((diag <= 1e-10 * max(float(diag.max()), 1e-300)).any()):
            # duplicate / zero start vectors: perturb with random ones (never divide by zero)
            X0 = X0 + 1e-3 * X0.norm(dim=1, keepdim=True).clamp_min(1.0) * self.random_rows(b)
            Qh, R = torch.linalg.qr(X0.T.to(acc))
        return Qh.T.to(self.wdtype)[: min(b, n)]

    def _coefficients(self, W: torch.Tensor, s: int, bb: int) -> torch.Tensor:
        """Orthogonalise ``W [bb, n]`` in place against the basis; its coefficients ``[m, bb]``."""
        acc, Qall = self.acc, self.basis.rows()
        if self.reorth == "full":
            return ops.reorthogonalize(Qall, W, acc_dtype=acc)[0]
        lo = max(0, s - bb)
        C = torch.zeros(self.basis.m, bb, dtype=acc, device=self.bdev)
        if self.reorth == "partial":
            Cfull = ops.basis_dot(Qall, W, acc_dtype=acc)
            wn = W.norm(dim=1).to(acc).clamp_min(torch.finfo(acc).tiny)
            eps = torch.finfo(self.bdtype).eps
            if lo > 0 and float((Cfull[:lo] / wn).abs().max()) > math.sqrt(eps):
                return ops.reorthogonalize(Qall, W, acc_dtype=acc)[0]
        C[lo:] = ops.reorthogonalize(Qall[lo:], W, acc_dtype=acc)[0]
        return C

    def step(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Multiply the block, extend T, Rayleigh-Ritz; the next block and its coupling
        ``(Qn [b', n], L [bb, b'])``, or None when the product is not finite."""
        basis, A, bb = self.basis, self.A, block.shape[0]
        s = basis.m
        basis.Q[s : s + bb] = block.to(self.bdtype)
        basis.m = s + bb
        W = A.matmat(block.to(A.dtype)).to(device=self.bdev, dtype=self.wdtype)
        if not bool(torch.isfinite(W).all()):
            basis.m = s
            return None
        self.norm_est = max(self.norm_est, float(W.norm(dim=1).max()))
        tiny = self.rayleigh_ritz(self._coefficients(W, s, bb).double().cpu(), s, bb)
        Qn, L = orthonormal_block(W, basis.rows(), tiny, self.gen, self.acc)
        if self.D is not None and self.D.shape[0]:
            # the dropped rows stay orthogonal to the basis: what the new block holds of them
            # is now in T (its product's coefficients), the rest stays in D^T G
            ops.reorthogonalize(basis.Q[s : s + bb], self.D, acc_dtype=self.acc)
        self.residuals(L, s, bb, Qn)
        return Qn, L

    def rayleigh_ritz(self, Cd: torch.Tensor, s: int, bb: int) -> float:
        """Store the new block's coefficients ``Cd [m, bb]`` as T's column block ``s``, solve
        the Ritz problem of T; the rank-deficiency threshold of the next block."""
        basis = self.basis
        basis.T[: basis.m, s : s + bb] = Cd
        basis.T[s : s + bb, : basis.m] = Cd.T
        Tjj = basis.T[s : s + bb, s : s + bb]  # average the two rounding errors
        basis.T[s : s + bb, s : s + bb] = 0.5 * (Tjj + Tjj.T)
        T = basis.T[: basis.m, : basis.m]
        self.theta, self.Y = torch.linalg.eigh(0.5 * (T + T.T))
        self.norm_est = max(self.norm_est, float(self.theta.abs().max()))
        return max(self.norm_est, torch.finfo(self.acc).tiny) * 64 * torch.finfo(self.acc).eps

    def residuals(self, L: torch.Tensor, s: int, bb: int, Qn: torch.Tensor | None = None
                  ) -> None:
        """Residuals and convergence flags of the Ritz pairs from the next block's coupling
        ``L [bb, b']`` (and the next block ``Qn [b', n]``, for the exact residual)."""
        # residual of Ritz pair i: ||L^T y_i[last block]||, plus the dropped couplings of
        # verification rounds (triangle inequality: an upper bound) ...
        Y, m = self.Y, self.basis.m
        self.coupling = L.T @ Y[s : s + bb] if L.numel() else torch.zeros(0, m, dtype=torch.float64)
        self.G = [torch.cat([g, g.new_zeros(g.shape[0], m - g.shape[1])], 1) for g in self.G]
        res = self.coupling.norm(dim=0) if L.numel() else torch.zeros_like(self.theta)
        for g in self.G:
            res = res + (g @ Y).norm(dim=0)
        exact = self.dropped_residuals(Qn) if self.G else None
        if exact is not None:  # ... or its exact value where the dropped rows are kept
            res = torch.minimum(res, exact)
        self.res = torch.clamp(res, min=self.floor())
        self.ok = self.res <= self.slack(self.theta)

    def dropped_residuals(self, Qn: torch.Tensor | None) -> torch.Tensor | None:
        """The exact residual norms ``[m]`` of all Ritz pairs while dropped couplings exist:
        ``r_i = Qn^T c_i + D^T g_i`` (``c = coupling``, ``g = G y_i``, D orthogonal to the
        basis, Qn too but not to D), so ``||r_i||^2 = |c_i|^2 + g_i^T (D D^T) g_i + 2 c_i^T
        (Qn D^T) g_i``; None where D is not kept (the bound is used)."""
        D, G = self.D, torch.cat(self.G)
        if D is None or Qn is None or D.shape[0] != G.shape[0]:
            self.D = None  # e.g. resumed from a checkpoint without D: the bound from now on
            return None
        acc = self.acc
        DD = (D.to(acc) @ D.to(acc).T).double().cpu()
        DN = (D.to(acc) @ Qn.to(device=D.device, dtype=acc).T).double().cpu()  # [d, b']
        Gy = G @ self.Y  # [d, m]
        c = self.coupling if self.coupling.numel() else torch.zeros(DN.shape[1], Gy.shape[1],
                                                                    dtype=torch.float64)
        sq = (c * c).sum(0) + (Gy * (DD @ Gy)).sum(0) + 2.0 * (c * (DN.T @ Gy)).sum(0)
        return sq.clamp_min(0.0).sqrt()

    def floor(self) -> float:
        """The residual floor at the current ``||A||_est`` (:func:`.verify.residual_floor`)."""
        return residual_floor(self.norm_est, self.A.dtype)

    def slack(self, vals: torch.Tensor) -> torch.Tensor:
        """The convergence tolerance of each value: max(tol * max(|theta|, 1e-3 ||A||_est),
        floor)."""
        return converge_threshold(vals, self.tol, self.norm_est, self.floor())

    def ritz_vectors(self, idx: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """Ritz vectors ``[len(idx), n]`` of the last Rayleigh-Ritz in the basis dtype, formed
        in column chunks of ~CHUNK_BYTES; ``into`` may be the basis' own first rows (each
        column chunk is read whole before it is written)."""
        Yi = self.Y[:, idx].T.to(self.acc).to(self.bdev)
        Q = self.basis.rows()
        out = torch.empty(len(idx), Q.shape[1], dtype=self.bdtype, device=self.bdev) \
            if into is None else into
        step = max(1, CHUNK_BYTES // (8 * max(Q.shape[0], 1)))
        for c in range(0, Q.shape[1], step):  # Q.shape[1]: n, or a sharded run's columns
            out[:, c : c + step] = (Yi @ Q[:, c : c + step].to(self.acc)).to(self.bdtype)
        return out

    def restart(self, idx: torch.Tensor, drop_residual_block: bool = False,
                dropped: torch.Tensor | None = None) -> None:
        """Keep the Ritz vectors ``idx`` (T becomes their diagonal).

        When the next block is the residual block, its product's coefficients against the
        kept vectors restore their coupling and (*) holds as before; when it is dropped
        (a verification round: ``dropped [b', n]``, the residual block), its coupling becomes
        a new G and its rows join D.
        """
        p, basis = idx.numel(), self.basis
        self.ritz_vectors(idx, into=basis.Q[:p])
        basis.m = p
        basis.T.zero_()
        basis.T[:p, :p] = torch.diag(self.theta[idx])
        Yi = self.Y[:, idx]
        self.G = [g @ Yi for g in self.G]
        if drop_residual_block and self.coupling.numel():
            self.G.append(self.coupling[:, idx].clone())
            if self.D is not None and dropped is not None \
                    and dropped.shape[0] == self.coupling.shape[0]:
                self.D = torch.cat([self.D, dropped.to(device=self.bdev, dtype=self.wdtype)])
            else:
                self.D = None
        self.theta, self.res, self.ok = self.theta[idx], self.res[idx], self.ok[idx]
        self.Y = torch.eye(p, dtype=torch.float64)

    def fresh_block(self, b: int) -> torch.Tensor:
        """``[b', n]`` random orthonormal rows orthogonal to the basis (b' < b near n)."""
        Z = self.random_rows(b)
        ops.reorthogonalize(self.basis.rows(), Z, acc_dtype=self.acc)
        tiny = math.sqrt(self.n) * 100 * torch.finfo(self.acc).eps  # Z's rows have norm ~sqrt(n)
        return orthonormal_block(Z, self.basis.rows(), tiny, self.gen, self.acc)[0]


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
    verify: bool = True,
    pin_memory: bool = False,
    checkpoint: Checkpoint | None = None,
    make_run: Callable[..., _Run] | None = None,
) -> LanczosState:
    """Thick-restart block Lanczos with locking and a verified wanted set (module docstring).

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
        verify: verify the converged wanted set before ``CONVERGED`` (default; off only for
            experiments: without it a multiple eigenvalue can be missed silently).
        pin_memory: allocate a host basis in pinned memory (operator on CUDA).
        checkpoint: save the state every so often and resume from it (:mod:`.checkpoint`).
        make_run: the run's class (default ``_Run``; :mod:`.sharded` passes its own).
    """
    run = (make_run or _Run)(A, k, which, tol, max_basis, seed, reorth, basis_dtype,
                             basis_device, pin_memory)
    b, cap, n = block_size, max_basis, A.shape[0]
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is None:
        run.block = run.start_block(b, v0)
    else:
        restore_lanczos(run, saved)
    start_mv = A.num_matvecs - (saved["used"] if saved else 0)
    start_passes = A.num_passes - (saved["passes"] if saved else 0)
    status = "MAX_MATVECS"

    def used() -> int:
        return A.num_matvecs - start_mv

    while True:
        if checkpoint is not None:  # kept for an interrupt, written when due
            checkpoint.top(lambda: lanczos_state(run, used(), A.num_passes - start_passes))
        if used() + run.block.shape[0] > max_matvecs:
            status = "MAX_MATVECS"
            break
        out = run.step(run.block)
        if out is None:
            status = "NONFINITE"
            break
        Qn, _ = out
        if checkpoint is not None:  # restarts below rewrite the basis in place
            checkpoint.busy()
        m = run.basis.m
        want = select(run.theta, k, which)
        nconv = int(run.ok[want].sum())
        run.history.append(nconv)
        run.extremes.append((float(run.theta[-1]), float(run.theta[0])))
        if run.ref is not None:  # -- a verification round is running ---------------------
            run.verify_left -= 1
            if beaten(run.theta, k, which, run.ref, run.ref_slack):
                run.n_miss += 1  # a better eigenvalue: iterate on, verify again when converged
                run.verify_mv += used() - run.verify_mv0
                run.ref = None
            elif run.verify_left <= 0 or Qn.shape[0] == 0:
                status = "CONVERGED"
                break
        elif nconv >= min(k, m) and m >= k:
            if not verify or m >= n or Qn.shape[0] == 0:
                # unverified on request, or the whole space is spanned (exact)
                status = "CONVERGED"
                break
            # -- start a verification round: lock the k candidates, fresh random block --------
            run.ref = ref = run.theta[want].clone()
            run.ref_slack = run.slack(ref)
            run.ref_res = run.res[want].clone()
            run.restart(want, drop_residual_block=True, dropped=Qn)
            run.ref_vecs = run.basis.rows(0, want.numel()).clone()
            run.restarts += 1
            run.n_verify += 1
            seen = first_seen(run.extremes, ref, run.ref_slack, which)
            run.verify_left = verify_steps(k, seen, run.n_miss)
            run.verify_mv0 = used()
            run.block = run.fresh_block(b)
            if run.block.shape[0] == 0:  # no room left: the candidates are the whole space
                status = "CONVERGED"
                break
            continue
        if Qn.shape[0] == 0:
            status = "INVARIANT_SUBSPACE"
            break
        if m + Qn.shape[0] > cap:
            # -- thick restart: keep the most wanted Ritz vectors, then the next block ----
            keep_n = min(m - Qn.shape[0], max(k + (m - k) // 2, k + b))
            idx = select(run.theta, keep_n, which)
            run.restart(idx)
            run.restarts += 1
        run.block = Qn
    if run.ref is not None:  # the round that ended the run (verified, or cut by the budget)
        run.verify_mv += used() - run.verify_mv0
    verified = run.ref is not None and status == "CONVERGED"
    answer = (run.ref, run.ref_vecs, run.ref_res) if verified and run.ref is not None else None
    theta, vecs, res, ok, status, ortho = wanted_pairs(run, k, which, status, answer)
    floor = run.floor()  # ||A||_est only grows: residuals kept earlier meet today's floor
    res = torch.clamp(res, min=floor)
    return LanczosState(
        theta=theta, vectors=vecs, residuals=res, converged=ok, status=status,
        num_matvecs=used(), num_passes=A.num_passes - start_passes,
        num_restarts=run.restarts, norm_estimate=run.norm_est, orthogonality=ortho,
        history=run.history, verified=verified, num_verifications=run.n_verify,
        num_misses=run.n_miss, verify_matvecs=run.verify_mv, residual_floor=floor)
