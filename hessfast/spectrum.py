"""Eigenpairs of a symmetric :class:`~hessfast.linop.LinearOperator`: :func:`eigsh`
(thick-restart block Lanczos with a verified wanted set, :mod:`hessfast.lanczos`), its dense
path for tiny operators, and :func:`lambda_max`. Power iteration lives in
:mod:`hessfast.power` (``eigsh(method="power")``), conditioning in :mod:`hessfast.condition`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._checks import (
    as_operator,
    check_basis_device,
    check_basis_dtype,
    check_choice,
    check_int,
    check_positive,
    check_seed,
    check_start_vectors,
    work_dtype,
)
from ._digest import tensor_digest
from ._probe import probe_operator
from .errors import ArgumentTypeError, ConfigurationError
from .lanczos import WHICH, block_lanczos, select
from .lanczos.checkpoint import Checkpoint
from .lanczos.lean import lean_lanczos
from .lanczos.sharded import check_sharded, sharded_lanczos, sharding_comm
from .lanczos.verify import converged, residual_floor
from .linop import LinearOperator, global_size, refuse_sharded
from .memory import KRYLOV, choose_basis, full_basis_fits
from .power import _power
from .progress import set_total, track
from .results import JsonResult, Status

__all__ = ["EigshResult", "default_block_size", "eigsh", "lambda_max"]


@dataclass(frozen=True, repr=False, kw_only=True)
class EigshResult(JsonResult):
    """Eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``[k]`` float64, most wanted first (``LA``: descending; ``SA``:
            ascending; ``LM``: by decreasing magnitude; ``BE``: alternating high, low).
        eigenvectors: ``[k, n]`` unit rows, in the operator's dtype and device.
        residuals: ``[k]`` float64 ``||A v - theta v||`` (from the Lanczos relation), never
            below ``residual_floor``.
        converged: ``[k]`` bool: residual <= max(tol * max(|theta|, 1e-3 * ||A||_est),
            residual_floor).
        status: a :class:`~hessfast.results.Status` (a ``str``): ``CONVERGED`` (every pair
            converged and the set verified), ``MAX_MATVECS``, ``INVARIANT_SUBSPACE`` or
            ``NONFINITE``.
        num_matvecs: vectors multiplied by A; num_passes: ``matmat`` calls (data passes).
        num_restarts: thick restarts; norm_estimate: the ||A|| estimate used in the floor.
        orthogonality: ``max|V V^T - I|`` of the returned vectors.
        seconds: wall time.
        verified: a verification round (fresh random directions orthogonal to the converged
            pairs, see :mod:`hessfast.lanczos.restart`) found no better eigenvalue; a
            ``CONVERGED`` full or restarted Lanczos result is always verified (dense results
            are exact). A ``krylov="lean"`` result with k = 1 and power iteration are never
            verified (False): no basis to verify against; their value is an eigenvalue within
            its residual, the extreme one with probability one from a random start
            (:mod:`hessfast.lanczos.lean`).
        verify_matvecs: products spent verifying (included in ``num_matvecs``).
        resumed_from_step: the step (one product each) a run with ``checkpoint=`` resumed
            from; None when it started afresh (or ran without a checkpoint).
        residual_floor: ``64 * eps * ||A||_est`` (``eps`` of the working dtype: float64 or
            float32): the smallest residual the arithmetic can show, so every residual is
            reported as ``max(computed, residual_floor)`` and the convergence test never asks
            for less (:func:`hessfast.lanczos.verify.residual_floor`).
        krylov: which Krylov mode ran: ``"full"`` (the whole basis kept, today's default),
            ``"lean"`` (k = 1: the plain three-term recurrence, no basis,
            :mod:`hessfast.lanczos.lean`) or ``"restarted"`` (k > 1 lean: thick restart with
            a basis of ``k + 2 block_size + 4`` rows). The dense route reports ``"full"``,
            power iteration ``"lean"`` (two vectors, no basis).

    ``to_dict(vectors=True)`` / ``to_json(path=None)``: JSON-safe fields (tensors as lists;
    ``vectors=False`` leaves out ``eigenvectors``).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    status: Status
    num_matvecs: int
    num_passes: int
    num_restarts: int
    norm_estimate: float
    orthogonality: float
    seconds: float
    which: str
    tol: float
    method: str
    verified: bool = False
    verify_matvecs: int = 0
    resumed_from_step: int | None = None
    residual_floor: float = 0.0
    krylov: str = "full"

    _VECTOR_FIELDS: ClassVar[tuple[str, ...]] = ("eigenvectors",)


def eigsh(
    A: LinearOperator,
    k: int = 6,
    *,
    which: str = "LA",
    tol: float = 1e-4,
    max_matvecs: int | None = None,
    block_size: int | None = None,
    max_basis: int | None = None,
    v0: torch.Tensor | None = None,
    seed: int = 0,
    reorth: str = "full",
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    method: str = "lanczos",
    dense_below: int = 32,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | float | None = None,
    basis_sharding: bool = False,
    progress: bool | None = None,
    krylov: str = "auto",
    vectors: bool = True,
) -> EigshResult:
    """k eigenpairs of a symmetric operator by thick-restart block Lanczos.

    Args:
        A: symmetric operator ``[n, n]`` (a model's Hessian/GGN or any LinearOperator).
        k: number of pairs, ``1 <= k <= n``.
        which: ``LA`` largest algebraic, ``SA`` smallest, ``LM`` largest magnitude, ``BE``
            both ends.
        tol: relative residual tolerance; converged when ``||A v - theta v|| <= max(tol *
            max(|theta|, 1e-3 ||A||_est), residual_floor)`` (the ``1e-3`` lets zero
            eigenvalues converge; ``residual_floor``, see :class:`EigshResult`, is the
            smallest residual the working precision can show;
            :func:`hessfast.lanczos.verify.converged`). The default 1e-4 is every solver's
            (a precise call whose numbers are used as they are); the analysis (``analyze``,
            ``block_spectra``) uses 1e-3, a survey whose report shows the residuals.
        max_matvecs: budget of products (default ``max(1000, 40 k)``); on exhaustion the
            partial result is returned with a warning and ``status == "MAX_MATVECS"``.
        block_size: rows per block, one data pass each (default: 1 on the CPU, where a block
            of products costs as much as its vectors one by one and single-vector Lanczos
            needs the fewest products; ``min(k, 4)`` on a GPU, where a block of 4 costs about
            one product). Any block size is safe: the converged set is verified (see
            :class:`EigshResult`), so an eigenvalue of multiplicity above the block size is
            not missed silently.
        max_basis: basis rows before a thick restart (default ``max(2k + 2b, 32)``, <= n).
        v0: ``[n]`` or ``[j, n]`` start vectors, e.g. eigenvectors of an earlier run (with
            the default block size, the block grows to ``min(j, k)`` to use them all).
        seed: seed of the private generator for the random start (global RNG untouched).
        reorth: ``full`` (CGS2, default), ``partial`` or ``none``.
        basis_dtype: storage of the Krylov basis, e.g. ``torch.bfloat16`` (coefficients
            and the projection stay in fp32/fp64). Default: chosen by the memory plan
            (:func:`hessfast.estimate_memory`): the working dtype, else float32/bfloat16,
            else the host (pinned for CUDA), with a warning saying why.
        basis_device: where the basis lives, e.g. ``"cpu"`` while A runs on a GPU (default:
            the memory plan's choice, as for ``basis_dtype``). Given values are used as
            given, and refused only when the plan shows they cannot fit.
        method: ``lanczos`` or ``power`` (k = 1 only; for parity with PyHessian).
        dense_below: operators with ``n <= dense_below`` are solved densely (n products),
            with a warning.
        checkpoint: a file path: the run saves its state there every ``checkpoint_every``
            and at once on Ctrl-C or SIGTERM; a call with the same path, operator and
            arguments resumes from it (with a warning and ``resumed_from_step``), giving the
            uninterrupted result. A file made by another run (arguments, parameters, data)
            is refused naming the difference (:mod:`hessfast.lanczos.checkpoint`; only rank
            0 writes).
        checkpoint_every: how often the ``checkpoint`` file is written: an int counts block
            steps, a float seconds (default 60.0 seconds).
        basis_sharding: under a process group (a data-parallel operator's, else the
            default group; the operator must be the same on every rank), each rank stores
            only its 1/R slice of every basis vector; every rank returns the same result,
            equal to the unsharded run up to rounding (:mod:`hessfast.lanczos.sharded`).
            Block size 1 (the default then), ``reorth="full"``, no checkpoint; a group of
            one process runs unsharded; no process group raises ConfigurationError.
        progress: a progress bar of products on stderr (:mod:`hessfast.progress`; total:
            ``max_matvecs``); None: when stderr is a terminal.
        krylov: the Krylov memory mode. ``"full"``: the basis of ``max_basis`` rows (today's
            path, verified). ``"lean"``: a few vectors whatever the number of steps: for
            k = 1 the plain three-term recurrence with no basis (three vectors,
            :mod:`hessfast.lanczos.lean`; not verified, ``reorth`` unused, no checkpoint);
            for k > 1 thick restart with a small basis of ``k + 2 block_size + 4`` rows
            (``max_basis`` unless given; verified), reported as ``"restarted"``.
            ``"auto"`` (default): ``"full"`` when its basis fits the memory plan in the
            default storage within a quarter of the capacity
            (``memory.AUTO_BASIS_FRACTION``; :func:`hessfast.estimate_memory`), else
            ``"lean"`` with a
            ``UserWarning`` saying why (instead of a bf16/host basis or
            ``OutOfMemoryPlanError``); a given ``basis_dtype``, ``basis_device``,
            ``basis_sharding``, ``checkpoint`` or ``reorth`` other than ``"full"`` keeps the
            full path as before. An operator whose vectors are sharded over ranks
            (``A.shards``, an FSDP model) runs the lean modes (k = 1) only: ``"auto"`` picks
            them, ``"full"`` is refused. The mode that ran is ``result.krylov``.
        vectors: return the eigenvectors (default). False: ``eigenvectors`` is ``[0, n]``;
            the lean k = 1 mode then skips its second pass (the eigenvector costs a second
            run of the recurrence: as many products again). :func:`lambda_max` passes False.

    Returns:
        :class:`EigshResult`.

    Raises:
        ConfigurationError: a bad argument, named (``max_matvecs`` below one block or k,
            ``v0`` of the wrong shape, ``basis_dtype``, ``basis_device``, ``seed``...), or a
            checkpoint file made by a different run.
        OutOfMemoryPlanError: no basis storage fits the device (the message has the plan).
        AsymmetricOperatorError, NonDeterministicError: the one-time probe of an unchecked
            operator (:mod:`hessfast._probe`; 4 products, not in ``num_matvecs``) found it
            asymmetric or random.
    """
    with track(A, "eigsh", enabled=progress):
        t0 = time.perf_counter()
        who = "hessfast.eigsh"
        A = as_operator(A, who, allow_empty=False)
        n = A.shape[0]  # this rank's share of each vector when they are sharded (A.shards)
        n_all = global_size(A)  # the whole vectors' length: what size-based routes see
        check_choice("which", which, WHICH, who=who)
        k = check_int("k", k, 1, who=who)
        if k > n_all:
            raise ConfigurationError(f"{who}: k must be <= n={n_all}, got {k}")
        tol = check_positive("tol", tol, who=who)
        check_choice("reorth", reorth, ("full", "partial", "none"), who=who)
        check_choice("method", method, ("lanczos", "power"), who=who)
        seed = check_seed(seed, who=who)
        explicit_dtype = basis_dtype
        basis_dtype = check_basis_dtype(basis_dtype, work_dtype(A.dtype), who=who)
        max_matvecs = check_int("max_matvecs", max(1000, 40 * k) if max_matvecs is None
                                else max_matvecs, 1, who=who)
        basis_device = check_basis_device(basis_device, who=who)
        if v0 is not None:
            v0 = check_start_vectors(v0, n, who=who)
        if not isinstance(basis_sharding, bool):
            raise ArgumentTypeError(f"{who}: basis_sharding must be a bool, got {basis_sharding!r}")
        check_choice("krylov", krylov, KRYLOV, who=who)
        if not isinstance(vectors, bool):
            raise ArgumentTypeError(f"{who}: vectors must be a bool, got {vectors!r}")
        comm = sharding_comm(A, who) if basis_sharding else None
        route = _route(n_all, k, which, method, dense_below)
        if A.shards is not None:
            _check_shards(A, k, route, krylov, basis_sharding, checkpoint, who)
        plan = None
        if route == "lanczos":
            plan = _plan_lanczos(A, k, which, tol, seed, reorth, v0, block_size, max_basis,
                                 max_matvecs, explicit_dtype, basis_dtype, basis_device,
                                 checkpoint, checkpoint_every, comm, who, krylov)
            basis_dtype, basis_device = plan.basis_dtype, plan.basis_device  # as agreed below
        set_total(n if route == "dense" else max_matvecs)
        # once, before the first product: the ranks agree on the arguments above (read from
        # this frame), then an unchecked operator is probed for symmetry and determinism
        probe_operator(A, who)
        if route == "power":
            return _drop_vectors(_solve_power(A, which, tol, max_matvecs, seed, t0), vectors)
        if route == "dense":
            return _drop_vectors(_solve_dense(A, k, which, tol, t0), vectors)
        assert plan is not None
        if plan.krylov == "lean":
            return _solve_lean(A, which, tol, max_matvecs, v0, seed, vectors, t0)
        return _drop_vectors(_solve_lanczos(A, k, which, tol, max_matvecs, v0, seed, reorth,
                                            plan, comm, t0), vectors)


def _drop_vectors(r: EigshResult, vectors: bool) -> EigshResult:
    """``r`` itself, or with ``eigenvectors`` ``[0, n]`` when ``vectors`` is False."""
    if vectors:
        return r
    return dataclasses.replace(r, eigenvectors=r.eigenvectors[:0])


def _check_shards(A: LinearOperator, k: int, route: str, krylov: str, basis_sharding: bool,
                  checkpoint: object, who: str) -> None:
    """An operator whose vectors are sharded runs the lean k = 1 path or power iteration;
    everything that needs whole vectors is refused, naming what runs instead."""
    instead = ("On sharded vectors eigsh runs k=1 with krylov='lean' (or 'auto'), or "
               "method='power'; lambda_max does so by default.")
    if route == "dense":
        refuse_sharded(A, f"{who} (dense route: n <= dense_below or k > n/2, "
                          "pass dense_below=0)", instead)
    if route == "lanczos" and (k > 1 or krylov == "full" or basis_sharding
                               or checkpoint is not None):
        refuse_sharded(A, f"{who} (k={k}, krylov={krylov!r}, basis_sharding, checkpoint: "
                          "a stored basis)", instead)


def _route(n: int, k: int, which: str, method: str, dense_below: int) -> str:
    """Which solver :func:`eigsh` runs: ``"power"``, ``"dense"`` (tiny n or k > n / 2,
    with a warning) or ``"lanczos"``."""
    if method == "power":
        if k != 1:
            raise ConfigurationError(
                f"method='power' finds one eigenpair, got k={k}; use method='lanczos'"
            )
        if which not in ("LA", "LM"):
            raise ConfigurationError(f"method='power' supports which='LA' or 'LM', got {which}")
        return "power"
    if n <= dense_below or k > n // 2:
        warnings.warn(
            f"hessfast.eigsh: n={n} is tiny or k={k} is more than half of it; solving "
            f"densely ({n} products, float64 eigh)",
            stacklevel=3,
        )
        return "dense"
    return "lanczos"


@dataclass(frozen=True)
class _LanczosPlan:
    """What the Lanczos route runs with, chosen before the operator probe."""

    block_size: int
    max_basis: int
    basis_dtype: torch.dtype
    basis_device: torch.device | str | None
    pin_memory: bool
    checkpoint: Checkpoint | None
    krylov: str = "full"


def _plan_lanczos(A: LinearOperator, k: int, which: str, tol: float, seed: int, reorth: str,
                  v0: torch.Tensor | None, block_size: int | None, max_basis: int | None,
                  max_matvecs: int, explicit_dtype: torch.dtype | None,
                  basis_dtype: torch.dtype, basis_device: torch.device | str | None,
                  checkpoint: str | os.PathLike | None,
                  checkpoint_every: int | float | None, comm: Any, who: str,
                  krylov: str = "full") -> _LanczosPlan:
    """Block size, basis size and storage (the memory plan), the Krylov mode (``"auto"``
    resolved by the plan) and the checkpoint file (its arguments validated; bound to the
    operator's state after the probe) of the Lanczos route."""
    n = A.shape[0]
    w = work_dtype(A.dtype)
    if krylov == "lean" and k == 1 or A.shards is not None:
        if checkpoint is not None:
            raise ConfigurationError(
                f"{who}: checkpoint= needs a stored basis; krylov='lean' with k=1 keeps none "
                "(it is cheap to rerun). Drop checkpoint= or pass krylov='full'")
        return _LanczosPlan(block_size=1, max_basis=0, basis_dtype=w,
                            basis_device=None, pin_memory=False, checkpoint=None,
                            krylov="lean")
    b = block_size if block_size is not None else default_block_size(A, k)
    if block_size is None and v0 is not None:
        b = max(b, min(v0.shape[0], k))  # a warm start uses every given vector
    if comm is not None:
        b = 1 if block_size is None else b
        check_sharded(b, reorth, checkpoint, who)
    b = check_int("block_size", b, 1, who=who)
    b = min(b, n)
    if max_matvecs < max(b, k):
        raise ConfigurationError(
            f"{who}: max_matvecs={max_matvecs} is below what one run needs: a first block "
            f"of block_size={b} products and at least k={k} products for k pairs; raise "
            f"max_matvecs to at least {max(b, k)} (or lower block_size / k)"
        )
    small = k + 2 * b + 4  # the restarted lean basis: O(k) rows, not O(steps)
    cap = max_basis if max_basis is not None else max(2 * k + 2 * b, 32)
    if krylov == "lean":
        cap = max_basis if max_basis is not None else small
    cap = min(cap, n)
    mode = "restarted" if krylov == "lean" else "full"
    if (krylov == "auto" and explicit_dtype is None and basis_device is None and comm is None
            and checkpoint is None and reorth == "full"):
        fits, why = full_basis_fits(A, "eigsh", k=k, block_size=b, max_basis=cap)
        if not fits:
            lean_cap = small if max_basis is None else cap
            lean_cap = min(lean_cap, n)
            warnings.warn(
                f"hessfast: {who}: the full Krylov basis ({cap} rows of n={n:,}) is not kept "
                f"({why}); running krylov='lean' instead "
                + ("(the plain recurrence, no basis, not verified)" if k == 1 else
                   f"(thick restart with a {lean_cap}-row basis)")
                + ". Pass krylov='full' with basis_dtype/basis_device to keep a full basis",
                UserWarning, stacklevel=4)
            if k == 1:
                return _LanczosPlan(block_size=1, max_basis=0, basis_dtype=w,
                                    basis_device=None, pin_memory=False, checkpoint=None,
                                    krylov="lean")
            cap, mode = lean_cap, "restarted"
    if cap < k + 2 * b and cap < n:
        raise ConfigurationError(
            f"max_basis={cap} is too small for k={k} and block_size={b}: it needs at least "
            f"k + 2*block_size = {k + 2 * b}"
        )
    given = None if explicit_dtype is None else basis_dtype
    shards = {} if comm is None else dict(world_size=comm.size, basis_sharding=True)
    bd, basis_device, pin = choose_basis(A, "eigsh", given, basis_device, who, k=k,
                                         block_size=b, max_basis=cap,
                                         krylov="lean" if mode == "restarted" else "full",
                                         **shards)
    basis_dtype = bd or basis_dtype
    ckpt = None if checkpoint is None else Checkpoint(checkpoint, "eigsh", dict(
        n=n, dtype=str(A.dtype), k=k, which=which, tol=tol, block_size=b, max_basis=cap,
        seed=seed, reorth=reorth, basis_dtype=str(basis_dtype), v0=tensor_digest(v0),
    ), checkpoint_every, who)
    return _LanczosPlan(block_size=b, max_basis=cap, basis_dtype=basis_dtype,
                        basis_device=basis_device, pin_memory=pin, checkpoint=ckpt,
                        krylov=mode)


def _solve_power(A: LinearOperator, which: str, tol: float, max_matvecs: int, seed: int,
                 t0: float) -> EigshResult:
    """``eigsh(method="power")``: power iteration's loop (:func:`hessfast.power._power`) on
    the arguments eigsh validated and probed."""
    mv0, p0 = A.num_matvecs, A.num_passes
    r = _power(A, which, tol, max_matvecs, seed)
    if not r.converged:
        warnings.warn(
            f"hessfast.eigsh(method='power'): not converged after {r.num_matvecs} "
            f"products (residual {r.residual:.3g}); returning the partial result",
            stacklevel=3,
        )
    return EigshResult(
        eigenvalues=torch.tensor([r.eigenvalue], dtype=torch.float64),
        eigenvectors=r.eigenvector.unsqueeze(0),
        residuals=torch.tensor([r.residual], dtype=torch.float64),
        converged=torch.tensor([r.converged]), status=r.status,
        num_matvecs=A.num_matvecs - mv0, num_passes=A.num_passes - p0, num_restarts=0,
        norm_estimate=r.norm_estimate, orthogonality=0.0, seconds=time.perf_counter() - t0,
        which=which, tol=tol, method="power", residual_floor=r.residual_floor, krylov="lean",
    )


def _solve_lean(A: LinearOperator, which: str, tol: float, max_matvecs: int,
                v0: torch.Tensor | None, seed: int, vectors: bool, t0: float) -> EigshResult:
    """The lean k = 1 route: the plain three-term recurrence, no basis
    (:func:`hessfast.lanczos.lean.lean_lanczos`); its eigenvector by a second pass when
    ``vectors``. Not verified (see :class:`EigshResult`)."""
    r = lean_lanczos(A, which, tol=tol, max_matvecs=max_matvecs, v0=v0, seed=seed,
                     vectors=vectors)
    if not r.converged:
        warnings.warn(
            f"hessfast.eigsh(krylov='lean'): not converged after {r.steps} steps (residual "
            f"{r.residual:.3g}, status {r.status}); returning the partial result. Raise "
            "max_matvecs or tol",
            stacklevel=3,
        )
    if r.converged:
        _warn_inexact(A, tol, r.residual_floor, "hessfast.eigsh(krylov='lean')")
    n = A.shape[0]
    vec = r.vector[None] if r.vector is not None else torch.empty((0, n), dtype=A.dtype,
                                                                   device=A.device)
    status = Status.CONVERGED if r.converged else Status(r.status)
    return EigshResult(
        eigenvalues=torch.tensor([r.theta], dtype=torch.float64), eigenvectors=vec,
        residuals=torch.tensor([r.residual], dtype=torch.float64),
        converged=torch.tensor([r.converged]), status=status,
        num_matvecs=r.num_matvecs, num_passes=r.num_passes, num_restarts=0,
        norm_estimate=r.norm_estimate, orthogonality=0.0, seconds=time.perf_counter() - t0,
        which=which, tol=tol, method="lanczos", verified=False,
        residual_floor=r.residual_floor, krylov="lean",
    )


def _solve_dense(A: LinearOperator, k: int, which: str, tol: float, t0: float) -> EigshResult:
    """The dense route: ``A.to_dense()`` (n products) and a float64 ``eigh``."""
    mv0, p0 = A.num_matvecs, A.num_passes
    M = A.to_dense().double()
    theta, Y = torch.linalg.eigh(0.5 * (M + M.T))
    idx = select(theta.cpu(), k, which).to(theta.device)
    vecs = Y[:, idx].T.contiguous()
    scale = float(theta.abs().max()) if theta.numel() else 0.0
    floor = residual_floor(scale, A.dtype)  # the vectors are returned in A's dtype
    res = (vecs @ M - theta[idx, None] * vecs).norm(dim=1).cpu().clamp(min=floor)
    ok = converged(theta[idx].cpu(), res, tol, scale, A.dtype)
    gram = vecs @ vecs.T
    ortho = float((gram - torch.eye(k, dtype=gram.dtype, device=gram.device)).abs().max())
    return EigshResult(
        eigenvalues=theta[idx].cpu(), eigenvectors=vecs.to(A.dtype), residuals=res,
        converged=ok, status=Status.CONVERGED if bool(ok.all()) else Status.MAX_MATVECS,
        num_matvecs=A.num_matvecs - mv0, num_passes=A.num_passes - p0, num_restarts=0,
        norm_estimate=scale, orthogonality=ortho, seconds=time.perf_counter() - t0,
        which=which, tol=tol, method="dense", verified=True, residual_floor=floor,
    )


def _solve_lanczos(A: LinearOperator, k: int, which: str, tol: float, max_matvecs: int,
                   v0: torch.Tensor | None, seed: int, reorth: str, plan: _LanczosPlan,
                   comm: Any, t0: float) -> EigshResult:
    """The Lanczos route: thick-restart block Lanczos (sharded over ``comm`` when given),
    with a checkpoint when planned; warns about a partial or unorthogonal result."""
    ckpt = plan.checkpoint
    if ckpt is not None:
        ckpt.bind(A)  # after the probe: the ranks agreed before this collective
    lanczos = block_lanczos if comm is None else functools.partial(sharded_lanczos, comm=comm)
    with nullcontext() if ckpt is None else ckpt.guard():  # saves on Ctrl-C / SIGTERM
        st = lanczos(
            A, k, which, tol=tol, block_size=plan.block_size, max_basis=plan.max_basis,
            max_matvecs=max_matvecs, v0=v0, seed=seed, reorth=reorth,
            basis_dtype=plan.basis_dtype, basis_device=plan.basis_device,
            pin_memory=plan.pin_memory, checkpoint=ckpt,
        )
    lost = 100 * math.sqrt(torch.finfo(plan.basis_dtype).eps)  # the basis' own precision
    if st.orthogonality > lost:
        warnings.warn(
            f"hessfast.eigsh: the returned vectors are far from orthogonal (max|V V^T - I| = "
            f"{st.orthogonality:.2g}, reorth={reorth!r}): duplicate 'ghost' eigenvalues and "
            "wrong residuals are likely. Use reorth='full'",
            stacklevel=3,
        )
    if st.status != "CONVERGED" and bool(st.converged.all()):
        warnings.warn(
            f"hessfast.eigsh: all {k} pairs converged but the check that no eigenvalue was "
            f"missed (verification, {st.verify_matvecs} products) did not finish within "
            f"max_matvecs={max_matvecs}; status {st.status}. Raise max_matvecs",
            stacklevel=3,
        )
    elif st.status != "CONVERGED":
        warnings.warn(
            f"hessfast.eigsh: {int(st.converged.sum())} of {k} pairs converged "
            f"(status {st.status}, {st.num_matvecs} products); returning the partial result "
            "with its residuals. Raise max_matvecs or tol",
            stacklevel=3,
        )
    if st.status == "CONVERGED":
        _warn_inexact(A, tol, st.residual_floor, "hessfast.eigsh")
    return EigshResult(
        eigenvalues=st.theta, eigenvectors=st.vectors, residuals=st.residuals,
        converged=st.converged, status=Status(st.status), num_matvecs=st.num_matvecs,
        num_passes=st.num_passes, num_restarts=st.num_restarts,
        norm_estimate=st.norm_estimate, orthogonality=st.orthogonality,
        seconds=time.perf_counter() - t0, which=which, tol=tol, method="lanczos",
        verified=st.verified, verify_matvecs=st.verify_matvecs,
        resumed_from_step=None if ckpt is None else ckpt.resumed_from_step,
        residual_floor=st.residual_floor, krylov=plan.krylov,
    )


def _warn_inexact(A: LinearOperator, tol: float, floor: float, who: str) -> None:
    """Warn when a converged result could only converge to the products' own error
    (:attr:`~hessfast.LinearOperator.product_error` above ``tol``): the residuals are
    floored there (``floor``, the result's ``residual_floor``)."""
    err = A.product_error
    if err is None or err <= tol:
        return
    warnings.warn(
        f"{who}: converged only to the products' own accuracy: their relative error "
        f"(H.product_error = {err:.3g}, finite differences) is above tol={tol:g}, so no "
        f"residual below {floor:.3g} (residual_floor) can be shown. The values are "
        "uncertain at that level (above 0.05 they are not usable); use an exact hvp_mode "
        "where the model allows one, or float64 parameters",
        stacklevel=4,
    )


def default_block_size(A: LinearOperator, k: int) -> int:
    """The block size :func:`eigsh` uses when none is given: 1 on the CPU, ``min(k, 4)`` on
    an accelerator (bench/RESULTS.md: on 2 CPU cores a block of 4 products costs 4 single
    ones; on an H200 it costs about one)."""
    return 1 if A.device.type == "cpu" else min(k, 4)


def lambda_max(
    A: LinearOperator,
    tol: float = 1e-4,
    *,
    max_matvecs: int | None = None,
    block_size: int | None = None,
    max_basis: int | None = None,
    v0: torch.Tensor | None = None,
    seed: int = 0,
    reorth: str = "full",
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    method: str = "lanczos",
    dense_below: int = 32,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | float | None = None,
    basis_sharding: bool = False,
    progress: bool | None = None,
    krylov: str = "auto",
) -> float:
    """The largest algebraic eigenvalue of A: ``eigsh(A, k=1, which="LA", ...)``.

    Every keyword is :func:`eigsh`'s, passed on as given (see there). ``tol`` defaults to
    1e-4 like every solver (``eigsh``, ``power_iteration``, ``condition_number``): a solver
    is the precise call, whose one number the caller uses as it is. The analysis
    (``analyze``, ``block_spectra``, ``SharpnessTracker``) defaults to 1e-3: it is a survey of
    many parts whose report shows every residual next to its number.

    ``progress``: a progress bar of products on stderr; None: when stderr is a terminal.

    ``krylov``: as in :func:`eigsh`; ``"auto"`` runs the full verified basis when it fits
    within a quarter of the memory and the lean recurrence (three vectors, no basis) when it
    does not, or when ``A``'s vectors
    are sharded over ranks (an FSDP model). lambda_max fixes ``vectors=False``: it returns a
    number, so the lean mode never runs its eigenvector pass.

    Returns:
        the eigenvalue (a float); for its residual and status call :func:`eigsh`.
    """
    with track(A, "lambda_max", enabled=progress):
        return float(eigsh(
            A, k=1, which="LA", tol=tol, max_matvecs=max_matvecs, block_size=block_size,
            max_basis=max_basis, v0=v0, seed=seed, reorth=reorth, basis_dtype=basis_dtype,
            basis_device=basis_device, method=method, dense_below=dense_below,
            checkpoint=checkpoint, checkpoint_every=checkpoint_every,
            basis_sharding=basis_sharding, krylov=krylov, vectors=False,
        ).eigenvalues[0])
