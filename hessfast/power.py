"""Power iteration with a residual-based stop: the baseline the peer libraries use, as
``eigsh(method="power")``. Plain power iteration converges to the eigenvalue of largest
*magnitude*; with ``which="LA"`` a shifted second run turns a negative dominant eigenvalue
into the largest algebraic one, so a negative number is never reported as lambda_max when a
positive eigenvalue exists.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from ._checks import (
    as_operator,
    check_choice,
    check_int,
    check_positive,
    check_seed,
)
from ._probe import probe_operator
from .lanczos.lean import sharded_generator
from .lanczos.verify import converged, residual_floor
from .linop import LinearOperator, row_dots
from .progress import set_postfix, set_total, track
from .results import JsonResult, Status

__all__ = ["PowerResult", "power_iteration"]


@dataclass(frozen=True, repr=False, kw_only=True)
class PowerResult(JsonResult):
    """Result of :func:`power_iteration`.

    Attributes:
        eigenvalue: the Ritz value (float64 arithmetic).
        eigenvector: ``[n]`` unit vector.
        residual: ``||A v - theta v||`` (computed in float64 from the product), never below
            ``residual_floor``.
        converged: residual <= max(tol * max(|theta|, 1e-3 * ||A||_est), residual_floor)
            (:func:`hessfast.lanczos.verify.converged`).
        status: ``CONVERGED`` when ``converged``, else ``MAX_MATVECS`` (the budget ran out
            first).
        num_matvecs: products with A.
        num_passes: ``matmat`` calls (one product each: power iteration multiplies one
            vector at a time).
        seconds: wall time.
        norm_estimate: ``||A||_est``, the largest ``||A v||`` seen.
        residual_floor: ``64 * eps * ||A||_est`` with ``eps`` of the working dtype
            (:func:`hessfast.lanczos.verify.residual_floor`): the product is rounded in that
            dtype, so a smaller residual cannot be shown.

    ``to_dict(vectors=True)`` / ``to_json(path=None)``: JSON-safe fields (``vectors=False``
    leaves out ``eigenvector``).
    """

    eigenvalue: float
    eigenvector: torch.Tensor
    residual: float
    converged: bool
    status: Status
    num_matvecs: int
    num_passes: int
    seconds: float
    norm_estimate: float = 0.0
    residual_floor: float = 0.0

    _VECTOR_FIELDS: ClassVar[tuple[str, ...]] = ("eigenvector",)


def _iterate(
    A: LinearOperator, v: torch.Tensor, shift: float, tol: float, max_matvecs: int
) -> tuple[float, torch.Tensor, float, bool, int, float]:
    """Power iteration on ``A - shift I``; returns the Ritz value of A itself."""
    theta, res, norm_est, used = 0.0, math.inf, 0.0, 0
    for _ in range(max_matvecs):
        w = A.matvec(v).double()
        used += 1
        vd = v.double()
        # dot products summed over the ranks when the vectors are sharded (row_dots)
        theta = float(row_dots(A, vd[None], w[None])[0])
        norm_est = max(norm_est, math.sqrt(max(float(row_dots(A, w[None], w[None])[0]), 0.0)))
        floor = residual_floor(norm_est, A.dtype)
        r = w - theta * vd
        res = max(math.sqrt(max(float(row_dots(A, r[None], r[None])[0]), 0.0)), floor)
        del r
        if used % 10 == 1:
            set_postfix(ritz=f"{theta:.4g}", res=f"{res:.2g}")
        ok = converged(theta, res, tol, norm_est, A.dtype)
        if ok:
            return theta, v, res, True, used, norm_est
        w = w - shift * v.double()
        wn = math.sqrt(max(float(row_dots(A, w[None], w[None])[0]), 0.0))
        if wn == 0.0:  # v is in the null space of A - shift I: exact eigenvector
            return theta, v, res, ok, used, norm_est
        v = (w / wn).to(v.dtype)
    return theta, v, res, False, used, norm_est


def power_iteration(
    A: LinearOperator,
    *,
    which: str = "LA",
    tol: float = 1e-4,
    max_matvecs: int = 1000,
    seed: int = 0,
    progress: bool | None = None,
) -> PowerResult:
    """Dominant eigenpair of a symmetric operator by power iteration.

    Args:
        A: symmetric operator ``[n, n]``.
        which: ``"LM"`` (largest magnitude, what plain power iteration finds) or ``"LA"``
            (largest algebraic: when the dominant eigenvalue is negative, a second run on
            ``A - theta I`` finds the top of the spectrum).
        tol: relative residual tolerance.
        max_matvecs: budget over both runs.
        seed: seed of the start vector (a private generator; the global RNG is untouched).
        progress: a progress bar of products on stderr (total: ``max_matvecs``); None: when
            stderr is a terminal.

    An operator whose vectors are sharded over ranks (``A.shards``, an FSDP model) works:
    every dot product and norm is summed over the ranks (:func:`hessfast.linop.row_dots`),
    so every rank takes the same decisions, and the start vector's slices are drawn per rank
    from a generator keyed by ``(seed, rank)`` (the result then depends on the world size);
    ``eigenvector`` is this rank's slice.

    Returns:
        :class:`PowerResult`.
    """
    with track(A, "power_iteration", enabled=progress):
        who = "hessfast.power_iteration"
        A = as_operator(A, who, allow_empty=False)
        check_choice("which", which, ("LA", "LM"), who=who)
        tol = check_positive("tol", tol, who=who)
        max_matvecs = check_int("max_matvecs", max_matvecs, 1, who=who)
        seed = check_seed(seed, who=who)
        set_total(max_matvecs)
        probe_operator(A, who)
        return _power(A, which, tol, max_matvecs, seed)


def _unit(A: LinearOperator, v: torch.Tensor) -> torch.Tensor:
    """``v [n]`` (float64, CPU) scaled to (global) norm 1, in A's dtype on its device."""
    v = v.to(A.device)
    return (v / math.sqrt(float(row_dots(A, v[None], v[None])[0]))).to(A.dtype)


def _power(A: LinearOperator, which: str, tol: float, max_matvecs: int, seed: int
           ) -> PowerResult:
    """The algorithm of :func:`power_iteration` on validated, probed arguments (also
    ``eigsh(method="power")``'s route: it validates, probes and tracks progress itself)."""
    n = A.shape[0]
    t0 = time.perf_counter()
    p0 = A.num_passes
    gen = sharded_generator(A, seed)  # keyed by (seed, rank) when A's vectors are sharded
    v = _unit(A, torch.randn(n, generator=gen, dtype=torch.float64))
    theta, v, res, ok, used, norm = _iterate(A, v, 0.0, tol, max_matvecs)
    if which == "LA" and theta < 0 and used < max_matvecs:
        # The dominant eigenvalue is negative; A - theta I is PSD with its largest
        # eigenvalue at lambda_max - theta, so power iteration on it finds lambda_max.
        v0 = _unit(A, torch.randn(n, generator=gen, dtype=torch.float64))
        theta, v, res, ok, more, norm2 = _iterate(A, v0, theta, tol, max_matvecs - used)
        used += more
        norm = max(norm, norm2)
    floor = residual_floor(norm, A.dtype)
    return PowerResult(
        eigenvalue=theta, eigenvector=v, residual=max(res, floor), converged=ok,
        num_matvecs=used, seconds=time.perf_counter() - t0, norm_estimate=norm,
        residual_floor=floor, num_passes=A.num_passes - p0,
        status=Status.CONVERGED if ok else Status.MAX_MATVECS,
    )
