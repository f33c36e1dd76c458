"""Memory-lean Lanczos: the plain three-term recurrence with NO stored basis (the
``krylov="lean"`` mode of :func:`hessfast.eigsh` with k = 1 and of :func:`hessfast.lambda_max`).

Memory. The recurrence keeps ``q_prev``, ``q`` and ``w = A q`` (three vectors of ``n`` in the
working dtype) plus what one product of ``A`` needs; the tridiagonal ``T_m`` (``alpha [m]``,
``beta [m]``) grows in float64 on the CPU. Its extra memory is therefore three vectors,
whatever the number of steps (four with the eigenvector pass below), against ``max_basis``
rows for the full basis.

Step j: ``w = A q_j``; ``alpha_j = q_j . w``; ``w -= alpha_j q_j + beta_{j-1} q_{j-1}``;
``beta_j = ||w||``; ``q_{j+1} = w / beta_j``. Every inner product and norm goes through
:func:`hessfast.linop.row_dots`, so an operator whose vectors are sharded over ranks
(``A.shards``, e.g. an FSDP model) runs unchanged: each rank holds its slice of the three
vectors and every rank gets the same all-reduced numbers, hence takes the same decisions.
``||A q_j||`` (the norm estimate of the residual floor and the convergence scale) is read from
T itself: ``||A q_j||^2 = beta_{j-1}^2 + alpha_j^2 + beta_j^2`` by the recurrence (no extra
dot product).

Ritz values. A float64 ``eigh`` of ``T_m`` every step while m <= 64; beyond, the wanted
extreme eigenpair of the tridiagonal alone (bisection and inverse iteration, O(m): SciPy's
``eigh_tridiagonal``) every ``ceil(m / 32)`` steps, so a run of thousands of steps spends
milliseconds on T (a dense ``eigh`` of a 3000-step T takes seconds). The wanted value
(the largest for ``LA``, the smallest for ``SA``, the larger magnitude for ``LM``) has the Ritz
residual ``|beta_m s_m|`` (``s`` its eigenvector of T, ``s_m`` the last entry): in exact
arithmetic that is ``||A y - theta y||`` for the Ritz vector ``y = sum_j s_j q_j``. It is
floored at :func:`.verify.residual_floor` and judged by THE rule, :func:`.verify.converged`.

Why lost orthogonality does not hurt the extreme value. Without reorthogonalisation the
``q_j`` lose orthogonality exactly as Ritz values converge (Paige), and T then shows copies
("ghosts") of values that have already converged. Paige's analysis of the finite-precision
recurrence gives two facts that make the extreme Ritz value trustworthy: (1) every Ritz value
of the computed T lies in ``[lambda_min - O(eps ||A||), lambda_max + O(eps ||A||)]`` (the
computed T is, to rounding, a section of a larger exact Lanczos process on a matrix whose
eigenvalues cluster at A's), so no ghost can lie beyond the true extreme; (2) a Ritz value
with a small Ritz residual ``|beta_m s_m|`` is within about that residual (plus
``O(eps ||A||)``) of an eigenvalue of A. A ghost is a second copy of a converged value, never
a new value outside the spectrum: the extreme Ritz value converges to lambda_max as in exact
arithmetic (convergence can be delayed a little while copies form, never reversed), and
its Ritz residual still bounds its distance to an eigenvalue. What the plain recurrence does
NOT give is the multiplicity of a value (copies are indistinguishable from ghosts) nor
interior values: hence k = 1 only here; k > 1 uses a small restarted basis
(:func:`hessfast.eigsh` ``krylov="lean"``), and tests/lanczos/test_lean.py checks the extreme
value against ``eigvalsh`` on clustered, repeated, wide-range and negative spectra.

Not verified. The full mode ends with a verification round (a fresh random block orthogonal
to the converged pair, :mod:`.restart`); the lean mode has no basis to be orthogonal to, so
its result has ``verified=False`` (like power iteration's): the value is an eigenvalue within
its residual, and the largest one with probability one from a random start (a start exactly
orthogonal to the top eigenvector misses it, as every Krylov method would).

Eigenvectors. Only when asked (``vectors=True``): a second pass re-runs the SAME recurrence
from the same start vector for the same number of steps, accumulating ``y = sum_j s_j q_j``
(one more vector). The operator must be deterministic (every operator hessfast builds is, and
an unchecked one is probed for it once): the second pass recomputes ``alpha_j`` and reports
the largest drift from the first. Its products are counted in ``num_matvecs`` (so a lean run
with vectors costs twice the products of one without).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import all_finite, probe_generator, probe_key, work_dtype
from ..errors import NonFiniteError
from ..linop import LinearOperator, row_dots
from .verify import converged, operator_floor

__all__ = ["LEAN_WHICH", "LeanResult", "lean_lanczos", "start_vector", "sharded_generator"]

#: the values the plain recurrence finds reliably: the extremes only
LEAN_WHICH = ("LA", "SA", "LM", "BE")
#: Ritz values every step up to this many steps, then every ceil(m / RITZ_EVERY_DIV) steps
RITZ_EVERY_STEP_UP_TO = 64
RITZ_EVERY_DIV = 32
#: breakdown (invariant subspace) below ``max(16, sqrt(n)) eps ||A||_est``, as in .probes
BREAKDOWN_EPS = 16.0


@dataclass
class LeanResult:
    """What :func:`lean_lanczos` found (float64 numbers on the CPU)."""

    theta: float
    vector: torch.Tensor | None  # [n] unit Ritz vector (a local shard when A.shards is set)
    residual: float  # |beta_m s_m|, floored
    converged: bool
    status: str  # CONVERGED, MAX_MATVECS, INVARIANT_SUBSPACE
    steps: int
    num_matvecs: int
    num_passes: int
    norm_estimate: float
    residual_floor: float
    drift: float = 0.0  # max |alpha_j| difference of the eigenvector pass (0: none)


def sharded_generator(A: LinearOperator, seed: int) -> torch.Generator:
    """The private generator of random vectors of ``A``: seeded with ``seed``, or, when the
    vectors are sharded (``A.shards``), with a key of ``(seed, rank)``
    (:func:`hessfast._checks.probe_key`) so every rank draws its own slice. Results then
    depend on the world size (the global vector is the ranks' slices in order)."""
    comm = A.shards
    if comm is None:
        return probe_generator(seed)
    return probe_generator(probe_key(seed, int(getattr(comm, "rank", 0))))


def start_vector(A: LinearOperator, v0: torch.Tensor | None, seed: int) -> torch.Tensor:
    """The unit start vector ``[n]`` (the local shard when ``A.shards`` is set) in the working
    dtype on ``A.device``: ``v0``'s first row, else a Gaussian draw from
    :func:`sharded_generator`; the norm is the global one (:func:`row_dots`)."""
    n = A.shape[0]
    work = work_dtype(A.dtype)
    if v0 is not None:
        v = v0.reshape(-1, n)[0].to(device=A.device, dtype=torch.float64, copy=True)
    else:
        v = torch.randn(n, generator=sharded_generator(A, seed), dtype=torch.float64)
        v = v.to(A.device)
    nrm = math.sqrt(float(row_dots(A, v[None], v[None])[0]))
    if not nrm > 0.0:
        raise NonFiniteError("the start vector is zero or not finite; pass another v0 or seed")
    return v.div_(nrm).to(work)  # in place: the float64 draw is two vectors' worth already


def _product(A: LinearOperator, q: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    w = A.matmat(q[None])[0]
    w = w.to(dtype=work)
    if not all_finite(w):
        raise NonFiniteError(
            "lean Lanczos: the operator returned NaN or Inf; check the model and loss for "
            "overflow (fp16?) and the data for NaN"
        )
    return w


def _ritz(alpha: list[float], beta: list[float], which: str
          ) -> tuple[float, torch.Tensor, float]:
    """The wanted Ritz value of ``T_m``, its eigenvector ``s [m]`` and the largest Ritz
    magnitude seen (for ``||A||_est``). Small T: a dense float64 ``eigh``; from
    :data:`RITZ_EVERY_STEP_UP_TO` steps on, the selected extreme eigenpair(s) of the
    tridiagonal by bisection and inverse iteration (LAPACK ``stebz``/``stein`` through SciPy,
    O(m) each, installed with scikit-learn), else the dense ``eigh`` (O(m^3))."""
    m = len(alpha)
    tri = _tridiagonal_solver() if m > RITZ_EVERY_STEP_UP_TO else None
    if tri is not None:
        import numpy as np

        d, e = np.asarray(alpha, dtype=np.float64), np.asarray(beta[: m - 1], dtype=np.float64)
        ends = {"LA": (m - 1,), "BE": (m - 1,), "SA": (0,)}.get(which, (0, m - 1))
        pairs = [tri(d, e, select="i", select_range=(i, i)) for i in ends]
        vals = [float(w[0]) for w, _ in pairs]
        j = 0 if len(pairs) == 1 or abs(vals[0]) >= abs(vals[1]) else 1
        s = torch.from_numpy(np.ascontiguousarray(pairs[j][1][:, 0])).clone()
        return vals[j], s, max(abs(v) for v in vals)
    T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(beta[: m - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    theta, S = torch.linalg.eigh(T)
    if which in ("LA", "BE"):
        i = m - 1
    elif which == "SA":
        i = 0
    else:  # LM
        i = m - 1 if abs(float(theta[-1])) >= abs(float(theta[0])) else 0
    return float(theta[i]), S[:, i].clone(), float(theta.abs().max())


def _tridiagonal_solver() -> Any:
    """SciPy's ``eigh_tridiagonal`` (selected eigenpairs in O(m)), or None without SciPy."""
    try:
        from scipy.linalg import eigh_tridiagonal
    except ImportError:  # pragma: no cover - SciPy comes with scikit-learn
        return None
    return eigh_tridiagonal


def lean_lanczos(
    A: LinearOperator,
    which: str,
    *,
    tol: float,
    max_matvecs: int,
    v0: torch.Tensor | None,
    seed: int,
    vectors: bool = False,
) -> LeanResult:
    """One extreme eigenvalue of ``A`` by the plain Lanczos recurrence (module docstring).

    Args:
        A: symmetric operator ``[n, n]`` (its vectors may be sharded: ``A.shards``).
        which: ``LA`` (and ``BE``, the same for one value), ``SA`` or ``LM``.
        tol: relative residual tolerance of :func:`.verify.converged`.
        max_matvecs: budget of products of the first pass (the eigenvector pass takes as
            many again as the first pass used).
        v0: ``[n]`` or ``[j, n]`` start vector(s), the first row used (local shards when
            ``A.shards`` is set).
        seed: seed of the random start when ``v0`` is None.
        vectors: run the second pass and return the Ritz vector.

    Returns:
        :class:`LeanResult`.
    """
    n = A.shape[0]
    work = work_dtype(A.dtype)
    mv0, p0 = A.num_matvecs, A.num_passes
    q0 = start_vector(A, v0, seed)
    alpha: list[float] = []
    beta: list[float] = []
    norm_est = 0.0
    bd_tol = max(BREAKDOWN_EPS, math.sqrt(max(n, 1))) * torch.finfo(work).eps
    theta, s, res, ok, status = 0.0, torch.ones(1, dtype=torch.float64), math.inf, False, \
        "MAX_MATVECS"
    q_prev: torch.Tensor | None = None
    q = q0
    if not vectors:  # only the eigenvector pass restarts from q0: do not hold a 4th vector
        del q0
    for j in range(max_matvecs):
        w = _product(A, q, work)
        a = float(row_dots(A, q[None], w[None])[0])
        w.add_(q, alpha=-a)
        if q_prev is not None:
            w.add_(q_prev, alpha=-beta[-1])
        b = math.sqrt(max(float(row_dots(A, w[None], w[None])[0]), 0.0))
        alpha.append(a)
        m = j + 1
        b_prev = beta[-1] if beta else 0.0
        norm_est = max(norm_est, math.sqrt(b_prev * b_prev + a * a + b * b))
        floor = operator_floor(A, norm_est)
        breakdown = b <= bd_tol * norm_est
        # m >= n is no stop: without reorthogonalisation n steps do not span the space
        last = m == max_matvecs or breakdown
        due = m <= RITZ_EVERY_STEP_UP_TO or m % math.ceil(m / RITZ_EVERY_DIV) == 0
        if due or last:
            theta, s, big = _ritz(alpha, beta, which)
            norm_est = max(norm_est, big)
            floor = operator_floor(A, norm_est)
            res = max(abs(b * float(s[-1])), floor)
            ok = bool(converged(theta, res, tol, norm_est, A.dtype, floor=floor))
            if ok:
                status = "CONVERGED"
                break
        if breakdown:
            status = "INVARIANT_SUBSPACE"
            break
        beta.append(b)
        q_prev, q = q, w.div_(b)
        del w
    steps = len(alpha)
    used1 = A.num_matvecs - mv0
    del q, q_prev  # the second pass starts again from q0
    vec, drift = None, 0.0
    if vectors:
        vec, drift = _vector_pass(A, q0, s, alpha, beta, work)
    floor = operator_floor(A, norm_est)  # norm_est only grows: today's floor
    return LeanResult(theta=theta, vector=vec, residual=max(res, floor),
                      converged=ok, status=status, steps=steps,
                      num_matvecs=A.num_matvecs - mv0 if vectors else used1,
                      num_passes=A.num_passes - p0, norm_estimate=norm_est,
                      residual_floor=floor, drift=drift)


def _vector_pass(A: LinearOperator, q0: torch.Tensor, s: torch.Tensor, alpha: list[float],
                 beta: list[float], work: torch.dtype) -> tuple[torch.Tensor, float]:
    """The second pass: the same recurrence from ``q0`` with the FIRST pass's coefficients
    (so the q_j are the same vectors up to the operator's determinism), accumulating
    ``y = sum_j s_j q_j``; returns the unit ``y`` and the largest ``|alpha_j|`` drift."""
    m = len(alpha)
    y = q0 * float(s[0])
    q_prev: torch.Tensor | None = None
    q = q0
    drift = 0.0
    for j in range(m - 1):  # q_{j+1} needs the product of q_j: m - 1 products
        w = _product(A, q, work)
        a = float(row_dots(A, q[None], w[None])[0])
        drift = max(drift, abs(a - alpha[j]))
        w.add_(q, alpha=-alpha[j])
        if q_prev is not None:
            w.add_(q_prev, alpha=-beta[j - 1])
        q_prev, q = q, w.div_(beta[j])
        del w
        y.add_(q, alpha=float(s[j + 1]))
    ny = math.sqrt(float(row_dots(A, y[None], y[None])[0]))
    return (y / ny).to(A.dtype), drift
