"""The entry point :func:`diagonal` and its methods: Bekas' Hutchinson-style estimator and
XDiag."""

from __future__ import annotations

import math
import time

import torch

from .._checks import check_choice, check_seed
from .._probe import probe_operator
from ..linop import LinearOperator, refuse_sharded
from ..progress import set_total, track
from ..results import DiagonalResult, Status
from .exchangeable import Exchangeable, xdiag_estimates, xdiag_jackknife_stderr
from .session import Session, max_matvecs_arg

__all__ = ["DIAGONAL_METHODS", "diagonal"]

DIAGONAL_METHODS = ("hutchinson", "xdiag")
_WHO = "diagonal"


def diagonal(
    A: LinearOperator,
    max_matvecs: int = 99,
    *,
    method: str = "hutchinson",
    seed: int = 0,
    num_matvecs: int | None = None,
    progress: bool | None = None,
) -> DiagonalResult:
    """Estimate ``diag(A)`` of a symmetric ``n x n`` operator from block products.

    Args:
        A: the operator (or a dense square tensor).
        max_matvecs: budget of products. ``"hutchinson"`` uses all of it in one pass of
            Rademacher probes: ``d = sum_i z_i * (A z_i) / sum_i z_i * z_i`` (Bekas et al.;
            the denominator is m for Rademacher probes), streamed through blocks of at most
            256 MB. ``"xdiag"`` uses ``k = m // 2`` probes and ``A Q`` (two passes). With
            ``max_matvecs >= n`` both read the exact diagonal from the n unit vectors instead
            (n products, status ``EXACT``).
        method: ``"hutchinson"`` (default) or ``"xdiag"``.
        seed: seed of the private probe generator.
        num_matvecs: deprecated name of ``max_matvecs`` (a DeprecationWarning; removed in
            the next release).
        progress: a progress bar of products on stderr (total: the budget, or n on the
            exact path); None: when stderr is a terminal.

    Returns:
        :class:`DiagonalResult` with ``values [n]`` and per-entry ``stderr [n]``
        (Hutchinson: the sample std of ``z_j (A z)_j`` over sqrt(m); XDiag: the Efron-Stein
        jackknife over its k probes, conservative), ``dof`` for the t quantile of
        ``confidence_interval`` and status ``FIXED_BUDGET`` (or ``EXACT``); ``by_param``
        maps the values to the parameter shapes for a model operator.

    Raises:
        ConfigurationError: bad method or budget, non-square A.
        NonFiniteError: a product contains NaN or Inf.
    """
    with track(A, "diagonal", enabled=progress):
        t0 = time.perf_counter()
        max_matvecs = max_matvecs_arg(max_matvecs, num_matvecs, _WHO)
        check_choice("method", method, DIAGONAL_METHODS, who=_WHO)
        seed = check_seed(seed, who=_WHO)
        sess = Session(A, f"diagonal({method})", seed=seed)
        m = sess.budget(method, max_matvecs)
        set_total(min(m, sess.n))
        probe_operator(sess.A, sess.products.who)
        status = Status.FIXED_BUDGET
        dof = None
        sharded = sess.A.shards is not None
        if sharded and method != "hutchinson":
            refuse_sharded(sess.A, f"{_WHO}(method={method!r})",
                           "On sharded vectors diagonal runs method='hutchinson' (each rank "
                           "estimates its own entries).")
        if not sharded and (sess.n == 0 or m >= sess.n):
            values = sess.exact_diagonal()
            stderr = torch.zeros_like(values)
            status = Status.EXACT
        elif method == "hutchinson":
            values, stderr = _bekas(sess, m)
            dof = m - 1 if m >= 2 else None
        else:
            values, stderr = _xdiag(sess, m)
            dof = m // 2 - 1 if m // 2 >= 3 else None
        unflatten = getattr(sess.A, "unflatten", None)
        by_param = unflatten(values) if callable(unflatten) else None
        return DiagonalResult(
            values=values, stderr=stderr, num_matvecs=sess.matvecs, num_passes=sess.passes,
            method=method, seed=seed, converged=True, status=status, by_param=by_param,
            seconds=time.perf_counter() - t0, dof=dof,
        )


def _bekas(sess: Session, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean(z * A z)`` over m Rademacher probes and its per-entry standard error ``[n]``:
    Chan's pairwise update of mean and sum of squared deviations, float64 per block."""
    mean = torch.zeros(sess.n, dtype=torch.float64, device=sess.device)
    m2 = torch.zeros_like(mean)
    count = 0
    for size in sess.chunks(m):
        Zb = sess.probes(size)
        X = (Zb * sess.apply_block(Zb)).double()
        bmean = X.mean(0)
        bm2 = ((X - bmean) ** 2).sum(0)
        delta = bmean - mean
        tot = count + size
        mean = mean + delta * (size / tot)
        m2 = m2 + bm2 + delta**2 * (count * size / tot)
        count = tot
    values = mean.to(sess.work)
    if count < 2:
        return values, torch.full_like(values, math.inf)
    return values, (m2 / (count - 1)).sqrt().div(math.sqrt(count)).to(sess.work)


def _xdiag(sess: Session, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """XDiag with ``k = m // 2`` probes: the mean of the k leave-one-out estimates and the
    Efron-Stein jackknife standard error (:func:`xdiag_jackknife_stderr`; the spread of the
    leave-one-out estimates over sqrt(k) ignores their correlation), ``[n]`` each."""
    st = Exchangeable(sess)
    st.grow(m // 2)
    return xdiag_estimates(st).mean(0), xdiag_jackknife_stderr(st)
