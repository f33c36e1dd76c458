"""Eigenpairs of a symmetric :class:`~hessfast.linop.LinearOperator`: :func:`eigsh`
(thick-restart block Lanczos with a verified wanted set, :mod:`hessfast.lanczos`), its dense
path for tiny operators, and :func:`lambda_max`. Power iteration lives in
:mod:`hessfast.power` (``eigsh(method="power")``), conditioning in :mod:`hessfast.condition`.
"""

from __future__ import annotations

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
from .lanczos.sharded import check_sharded, sharded_lanczos, sharding_comm
from .lanczos.verify import converge_threshold, residual_floor
from .linop import LinearOperator
from .memory import choose_basis
from .power import power_iteration
from .progress import set_total, track
from .results import JsonResult, Status

__all__ = ["EigshResult", "default_block_size", "eigsh", "lambda_max"]


@dataclass(frozen=True)
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
            ``CONVERGED`` Lanczos result is always verified (dense results are exact).
        verify_matvecs: products spent verifying (included in ``num_matvecs``).
        resumed_from_step: the step (one product each) a run with ``checkpoint=`` resumed
            from; None when it started afresh (or ran without a checkpoint).
        residual_floor: ``64 * eps * ||A||_est`` (``eps`` of the working dtype: float64 or
            float32): the smallest residual the arithmetic can show, so every residual is
            reported as ``max(computed, residual_floor)`` and the convergence test never asks
            for less (:func:`hessfast.lanczos.verify.residual_floor`).

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

    _VECTOR_FIELDS: ClassVar[tuple[str, ...]] = ("eigenvectors",)


def _dense_eigsh(A: LinearOperator, k: int, which: str, tol: float, t0: float) -> EigshResult:
    mv0, p0 = A.num_matvecs, A.num_passes
    M = A.to_dense().double()
    theta, Y = torch.linalg.eigh(0.5 * (M + M.T))
    idx = select(theta.cpu(), k, which).to(theta.device)
    vecs = Y[:, idx].T.contiguous()
    scale = float(theta.abs().max()) if theta.numel() else 0.0
    floor = residual_floor(scale, A.dtype)  # the vectors are returned in A's dtype
    res = (vecs @ M - theta[idx, None] * vecs).norm(dim=1).cpu().clamp(min=floor)
    ok = res <= converge_threshold(theta[idx].cpu(), tol, scale, floor)
    gram = vecs @ vecs.T
    ortho = float((gram - torch.eye(k, dtype=gram.dtype, device=gram.device)).abs().max())
    return EigshResult(
        theta[idx].cpu(), vecs.to(A.dtype), res, ok, Status.CONVERGED if bool(ok.all()) else
        Status.MAX_MATVECS, A.num_matvecs - mv0, A.num_passes - p0, 0, scale, ortho,
        time.perf_counter() - t0, which, tol, "dense", True, residual_floor=floor,
    )


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
            smallest residual the working precision can show).
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
            (an int: block steps; a float: seconds; default 60.0) and at once on Ctrl-C or
            SIGTERM; a call with the same path, operator and arguments resumes from it (with
            a warning and ``resumed_from_step``), giving the uninterrupted result. A file
            made by another run (arguments, parameters, data) is refused naming the
            difference (:mod:`hessfast.lanczos.checkpoint`; only rank 0 writes).
        basis_sharding: under a process group (a data-parallel operator's, else the
            default group; the operator must be the same on every rank), each rank stores
            only its 1/R slice of every basis vector; every rank returns the same result,
            equal to the unsharded run up to rounding (:mod:`hessfast.lanczos.sharded`).
            Block size 1 (the default then), ``reorth="full"``, no checkpoint; a group of
            one process runs unsharded; no process group raises ConfigurationError.
        progress: a progress bar of products on stderr (:mod:`hessfast.progress`; total:
            ``max_matvecs``); None: when stderr is a terminal.

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
        n = A.shape[0]
        check_choice("which", which, WHICH, who=who)
        k = check_int("k", k, 1, who=who)
        if k > n:
            raise ConfigurationError(f"{who}: k must be <= n={n}, got {k}")
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
        comm = sharding_comm(A, who) if basis_sharding else None
        if method == "power":
            if k != 1:
                raise ConfigurationError(
                    f"method='power' finds one eigenpair, got k={k}; use method='lanczos'"
                )
            if which not in ("LA", "LM"):
                raise ConfigurationError(f"method='power' supports which='LA' or 'LM', got {which}")
            set_total(max_matvecs)
            probe_operator(A, who)
            mv0, p0 = A.num_matvecs, A.num_passes
            r = power_iteration(A, which=which, tol=tol, max_matvecs=max_matvecs, seed=seed)
            vec = r.eigenvector.unsqueeze(0)
            if not r.converged:
                warnings.warn(
                    f"hessfast.eigsh(method='power'): not converged after {r.num_matvecs} "
                    f"products (residual {r.residual:.3g}); returning the partial result",
                    stacklevel=2,
                )
            return EigshResult(
                torch.tensor([r.eigenvalue], dtype=torch.float64), vec,
                torch.tensor([r.residual], dtype=torch.float64), torch.tensor([r.converged]),
                Status.CONVERGED if r.converged else Status.MAX_MATVECS, A.num_matvecs - mv0,
                A.num_passes - p0, 0, r.norm_estimate, 0.0, time.perf_counter() - t0, which,
                tol, "power", residual_floor=r.residual_floor,
            )
        if n <= dense_below or k > n // 2:
            warnings.warn(
                f"hessfast.eigsh: n={n} is tiny or k={k} is more than half of it; solving "
                f"densely ({n} products, float64 eigh)",
                stacklevel=2,
            )
            set_total(n)
            probe_operator(A, who)
            return _dense_eigsh(A, k, which, tol, t0)
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
        cap = max_basis if max_basis is not None else max(2 * k + 2 * b, 32)
        cap = min(cap, n)
        if cap < k + 2 * b and cap < n:
            raise ConfigurationError(
                f"max_basis={cap} is too small for k={k} and block_size={b}: it needs at least "
                f"k + 2*block_size = {k + 2 * b}"
            )
        given = None if explicit_dtype is None else basis_dtype
        shards = {} if comm is None else dict(world_size=comm.size, basis_sharding=True)
        bd, basis_device, pin = choose_basis(A, "eigsh", given, basis_device, who, k=k,
                                             block_size=b, max_basis=cap, **shards)
        basis_dtype = bd or basis_dtype
        probe_operator(A, who, agree_only=True)  # ranks agree before a checkpoint's collective
        ckpt = None if checkpoint is None else Checkpoint(checkpoint, "eigsh", dict(
            n=n, dtype=str(A.dtype), k=k, which=which, tol=tol, block_size=b, max_basis=cap,
            seed=seed, reorth=reorth, basis_dtype=str(basis_dtype), v0=tensor_digest(v0),
        ), checkpoint_every, who, operator=A)
        set_total(max_matvecs)
        probe_operator(A, who)
        lanczos = block_lanczos if comm is None else functools.partial(sharded_lanczos, comm=comm)
        with nullcontext() if ckpt is None else ckpt.guard():  # saves on Ctrl-C / SIGTERM
            st = lanczos(
                A, k, which, tol=tol, block_size=b, max_basis=cap, max_matvecs=max_matvecs,
                v0=v0, seed=seed, reorth=reorth, basis_dtype=basis_dtype,
                basis_device=basis_device, pin_memory=pin, checkpoint=ckpt,
            )
        lost = 100 * math.sqrt(torch.finfo(basis_dtype).eps)  # the basis' own precision
        if st.orthogonality > lost:
            warnings.warn(
                f"hessfast.eigsh: the returned vectors are far from orthogonal (max|V V^T - I| = "
                f"{st.orthogonality:.2g}, reorth={reorth!r}): duplicate 'ghost' eigenvalues and "
                "wrong residuals are likely. Use reorth='full'",
                stacklevel=2,
            )
        if st.status != "CONVERGED" and bool(st.converged.all()):
            warnings.warn(
                f"hessfast.eigsh: all {k} pairs converged but the check that no eigenvalue was "
                f"missed (verification, {st.verify_matvecs} products) did not finish within "
                f"max_matvecs={max_matvecs}; status {st.status}. Raise max_matvecs",
                stacklevel=2,
            )
        elif st.status != "CONVERGED":
            warnings.warn(
                f"hessfast.eigsh: {int(st.converged.sum())} of {k} pairs converged "
                f"(status {st.status}, {st.num_matvecs} products); returning the partial result "
                "with its residuals. Raise max_matvecs or tol",
                stacklevel=2,
            )
        return EigshResult(
            st.theta, st.vectors, st.residuals, st.converged, Status(st.status), st.num_matvecs,
            st.num_passes, st.num_restarts, st.norm_estimate, st.orthogonality,
            time.perf_counter() - t0, which, tol, "lanczos", st.verified, st.verify_matvecs,
            resumed_from_step=None if ckpt is None else ckpt.resumed_from_step,
            residual_floor=st.residual_floor,
        )


def default_block_size(A: LinearOperator, k: int) -> int:
    """The block size :func:`eigsh` uses when none is given: 1 on the CPU, ``min(k, 4)`` on
    an accelerator (bench/RESULTS.md: on 2 CPU cores a block of 4 products costs 4 single
    ones; on an H200 it costs about one)."""
    return 1 if A.device.type == "cpu" else min(k, 4)


def lambda_max(
    A: LinearOperator, tol: float = 1e-4, *, progress: bool | None = None, **kwargs: Any
) -> float:
    """The largest algebraic eigenvalue of A (``eigsh(A, k=1, which="LA", **kwargs)``).

    ``progress``: a progress bar of products on stderr; None: when stderr is a terminal.
    """
    with track(A, "lambda_max", enabled=progress):
        return float(eigsh(A, k=1, which="LA", tol=tol, **kwargs).eigenvalues[0])


