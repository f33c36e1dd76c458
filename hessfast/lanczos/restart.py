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
(tests/lanczos/test_multiplicity.py, ``second``) ten rounds' bounds stayed at 0.3-1.5x the tolerance
while the true residuals were 0.1-0.6x, and the run stalled at 15 of 20 for 6000 products
(converged in 766 under another thread count only by the luck of the rotations).

The run's state (basis, projection, couplings, verification round) is :class:`.run.Run`; this
module is the loop that drives it. Nothing here imports torch.func or a kernel backend: the
arithmetic on the basis goes through ``ops``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..linop import LinearOperator
from .basis import select
from .checkpoint import Checkpoint, lanczos_state, restore_lanczos
from .run import LanczosState, Run
from .verify import beaten, first_seen, verify_steps
from .wanted import wanted_pairs

__all__ = ["LanczosState", "block_lanczos"]

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
    make_run: Callable[..., Run] | None = None,
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
        make_run: the run's class (default :class:`.run.Run`; :mod:`.sharded` passes its own).
    """
    run = (make_run or Run)(A, k, which, tol, max_basis, seed, reorth, basis_dtype,
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
            ref, ref_res = run.theta[want].clone(), run.res[want].clone()
            run.ref_slack = run.slack(ref)
            run.restart(want, drop_residual_block=True, dropped=Qn)
            # the candidates are now the basis' first rows, copied only if a thick restart
            # comes before the round ends (Run.keep_candidates)
            run.ref, run.ref_res, run.ref_vecs = ref, ref_res, None
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
            run.keep_candidates()
            run.restart(idx)
            run.restarts += 1
        run.block = Qn
    if run.ref is not None:  # the round that ended the run (verified, or cut by the budget)
        run.verify_mv += used() - run.verify_mv0
    verified = run.ref is not None and status == "CONVERGED"
    answer = (run.ref, run.candidates(), run.ref_res) if verified and run.ref is not None \
        else None
    theta, vecs, res, ok, status, ortho = wanted_pairs(run, k, which, status, answer)
    floor = run.floor()  # ||A||_est only grows: residuals kept earlier meet today's floor
    res = torch.clamp(res, min=floor)
    return LanczosState(
        theta=theta, vectors=vecs, residuals=res, converged=ok, status=status,
        num_matvecs=used(), num_passes=A.num_passes - start_passes,
        num_restarts=run.restarts, norm_estimate=run.norm_est, orthogonality=ortho,
        verified=verified, num_verifications=run.n_verify,
        num_misses=run.n_miss, verify_matvecs=run.verify_mv, residual_floor=floor)
