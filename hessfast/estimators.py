"""Randomized trace and diagonal estimators for a symmetric :class:`LinearOperator`.

Everything here sees the operator only through block products ``A.matmat(V: [k, n])``; a
block is one pass over the data for a model operator, so probes always travel in blocks.

Trace (:func:`trace`):

* ``"hutchinson"`` (Girard 1989, Hutchinson 1990): ``tr(A) ~ (1/m) sum_i z_i^T A z_i`` with
  independent probes, ``E[z z^T] = I``. With Rademacher probes the variance of one sample is
  ``2 (||A||_F^2 - sum_i a_ii^2)``; with Gaussian probes ``2 ||A||_F^2``.
* ``"hutch++"`` (Meyer, Musco, Musco and Woodruff, SOSA 2021): a third of the budget sketches
  the range, ``Q = orth(A S)``; the top part ``tr(Q^T A Q)`` is computed exactly from ``A Q``
  and Hutchinson runs on the deflated operator ``(I - QQ^T) A (I - QQ^T)``. Error
  ``O(1/m)`` instead of ``O(1/sqrt(m))`` for PSD operators with decaying spectra.
* ``"xtrace"`` (Epperly, Tropp and Webber, SIMAX 2024): the exchangeable estimator. Every
  probe serves both the sketch and the residual: with ``Y = A Omega`` and ``Q_(i)`` an
  orthonormal basis of ``Y`` without column i,
  ``t_i = tr(Q_(i)^T A Q_(i)) + w_i^T (I - Q_(i)Q_(i)^T) A (I - Q_(i)Q_(i)^T) w_i``
  and the estimate is the mean of the ``t_i``. The leave-one-out bases come from one QR by
  downdating (see :func:`_xtrace_estimates`), never from k separate factorizations.

Diagonal (:func:`diagonal`):

* ``"hutchinson"`` (Bekas, Kokiopoulou and Saad 2007): ``diag(A) ~ sum z*(Az) / sum z*z``.
* ``"xdiag"`` (Epperly, Tropp and Webber): the same exchangeable construction for
  ``diag(A) = diag(P_i A) + diag((I - P_i) A)`` with the second part estimated by Bekas'
  estimator on the probe that ``P_i`` left out.

Error bars are honest sample statistics: Hutchinson's is the sample standard deviation over
sqrt(m); Hutch++'s comes from the deflated Hutchinson samples only (the sketched part is
exact given Q); XTrace's and XDiag's from the spread of the leave-one-out estimates. The
adaptive mode (``rtol``) stops on a normal confidence interval after a minimum number of
samples, never on the relative change of a running mean (which exits at once on negative
or zero traces).

Randomness comes from a private ``torch.Generator`` seeded with ``seed``: the global RNG is
never touched, and the same seed gives the same result.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigurationError, NonFiniteError
from .linop import LinearOperator

__all__ = ["DiagonalResult", "TraceResult", "diagonal", "trace"]

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace")
DIAGONAL_METHODS = ("hutchinson", "xdiag")
PROBES = ("rademacher", "gaussian")
# Fewest matvecs each method needs when it cannot afford the exact computation (n products).
_MIN_MATVECS = {"hutchinson": 1, "hutch++": 3, "xtrace": 2, "xdiag": 2}
# Unit vectors per pass on the exact path when no block_size is given (memory: rows x n).
_EXACT_BLOCK = 1024


# ---------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------


def _z_value(level: float) -> float:
    """Two-sided standard normal quantile: ``P(|N(0,1)| <= z) = level``."""
    return statistics.NormalDist().inv_cdf(0.5 + 0.5 * level)


@dataclass(frozen=True)
class TraceResult:
    """Result of :func:`trace`.

    Attributes:
        value: the trace estimate (float64 arithmetic).
        stderr: estimated standard error of ``value``; ``0.0`` when the result is exact
            (the budget covered n), ``inf`` when a single sample leaves it unknown.
        num_matvecs: products with A spent by this call.
        num_passes: ``matmat`` calls by this call (passes over the data).
        method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        seed: seed of the private generator that drew the probes.
        converged: ``True`` when no ``rtol`` was given, or when the confidence half-width
            reached ``rtol * |value|`` with at least ``min_samples`` samples; ``False`` when
            the budget ran out first (a warning was issued).
        seconds: wall time.
        num_samples: random probes behind ``stderr`` (Hutchinson samples; Hutch++'s
            deflated samples; XTrace's leave-one-out estimates); ``0`` for the exact path.
        exact: the trace was computed from n unit vectors (``num_matvecs >= n`` with
            ``"hutch++"`` or ``"xtrace"``).
    """

    value: float
    stderr: float
    num_matvecs: int
    num_passes: int
    method: str
    seed: int
    converged: bool
    seconds: float
    num_samples: int = 0
    exact: bool = False

    def confidence_interval(self, level: float = 0.95) -> tuple[float, float]:
        """Normal interval ``value -/+ z * stderr`` with ``P(|N(0,1)| <= z) = level``."""
        if not (0.0 < level < 1.0):
            raise ConfigurationError(f"level must be in (0, 1), got {level!r}")
        half = _z_value(level) * self.stderr if self.stderr > 0 else 0.0
        return (self.value - half, self.value + half)


@dataclass(frozen=True)
class DiagonalResult:
    """Result of :func:`diagonal`.

    Attributes:
        values: ``[n]`` estimate of ``diag(A)`` (float64 for float64 operators, else
            float32), on ``A.device``.
        stderr: ``[n]`` per-entry standard error (zeros for the exact path; ``inf`` with a
            single sample).
        num_matvecs: products with A spent by this call.
        num_passes: ``matmat`` calls by this call.
        method: ``"hutchinson"`` or ``"xdiag"``.
        seed: seed of the private generator.
        by_param: for model operators (A has ``unflatten``), ``values`` split into tensors
            of the parameters' shapes keyed by parameter name (views of ``values``);
            ``None`` otherwise.
        seconds: wall time.
        exact: computed from n unit vectors (``"xdiag"`` with ``num_matvecs >= n``).
    """

    values: torch.Tensor
    stderr: torch.Tensor
    num_matvecs: int
    num_passes: int
    method: str
    seed: int
    by_param: dict[str, torch.Tensor] | None = None
    seconds: float = 0.0
    exact: bool = False


# ---------------------------------------------------------------------------------------
# shared machinery
# ---------------------------------------------------------------------------------------


class _Session:
    """One estimator run: probes from a private generator, counted and checked products.

    Probes are drawn on the CPU (so the result does not depend on the device) and moved to
    ``A.device``. Products come back in the working dtype: float64 for float64 operators,
    float32 otherwise (bf16/fp16 operators are widened).
    """

    def __init__(self, A: Any, seed: int, probe: str, block_size: int | None, who: str) -> None:
        self.A = A
        self.n = int(A.shape[0])
        self.device = torch.device(A.device)
        self.work = torch.float64 if A.dtype == torch.float64 else torch.float32
        self.gen = torch.Generator(device="cpu").manual_seed(int(seed))
        self.probe = probe
        self.block_size = block_size
        self.who = who
        self.matvecs = 0
        self.passes = 0

    def probes(self, k: int) -> torch.Tensor:
        """``[k, n]`` probes with ``E[z z^T] = I`` in the working dtype on ``A.device``."""
        if self.probe == "rademacher":
            Z = torch.empty((k, self.n), dtype=self.work).bernoulli_(0.5, generator=self.gen)
            Z.mul_(2.0).sub_(1.0)
        else:
            Z = torch.randn((k, self.n), dtype=self.work, generator=self.gen)
        return Z.to(self.device)

    def chunks(self, k: int, default_cap: int | None = None) -> list[int]:
        """Rows per ``matmat`` call for a block of k rows (``block_size`` caps them)."""
        cap = self.block_size or default_cap or max(k, 1)
        return [min(cap, k - i) for i in range(0, k, cap)]

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """``A`` applied to the rows of ``V: [k, n]``, one ``matmat`` per chunk."""
        outs = []
        start = 0
        for size in self.chunks(V.shape[0]):
            outs.append(self._one(V[start : start + size]))
            start += size
        return torch.cat(outs, dim=0) if len(outs) != 1 else outs[0]

    def _one(self, V: torch.Tensor) -> torch.Tensor:
        out = self.A.matmat(V)
        self.matvecs += V.shape[0]
        self.passes += 1
        out = out.to(device=self.device, dtype=self.work)
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteError(
                f"{self.who}: the operator returned NaN or Inf for a block of {V.shape[0]} "
                f"probe vectors (product {self.matvecs}); check the loss and the data"
            )
        return out

    def exact_diagonal(self) -> torch.Tensor:
        """``diag(A)`` from the n unit vectors, in blocks: ``[n]`` in the working dtype."""
        d = torch.empty(self.n, dtype=self.work, device=self.device)
        start = 0
        for size in self.chunks(self.n, _EXACT_BLOCK):
            E = torch.zeros((size, self.n), dtype=self.work, device=self.device)
            idx = torch.arange(size, device=self.device)
            E[idx, start + idx] = 1.0
            AE = self._one(E)
            d[start : start + size] = AE[idx, start + idx]
            start += size
        return d


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigurationError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_operator(A: Any, who: str) -> Any:
    """Accept a LinearOperator (or a duck-typed one); wrap a dense square tensor."""
    if isinstance(A, torch.Tensor):
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ConfigurationError(f"{who}: A must be square [n, n], got shape {tuple(A.shape)}")
        return LinearOperator.from_matrix(A)
    for attr in ("matmat", "shape", "dtype", "device"):
        if not hasattr(A, attr):
            raise TypeError(
                f"{who}: A must be a hessfast.LinearOperator (matmat, shape, dtype, device), "
                f"got {type(A).__name__} without {attr!r}"
            )
    shape = tuple(A.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ConfigurationError(f"{who}: A must be square, got shape {shape}")
    if A.dtype.is_complex or not A.dtype.is_floating_point:
        raise ConfigurationError(f"{who}: A must have a real floating dtype, got {A.dtype}")
    return A


def _check_budget(who: str, method: str, num_matvecs: Any, n: int) -> int:
    m = _check_int("num_matvecs", num_matvecs, 1)
    need = min(_MIN_MATVECS[method], max(n, 1))
    if m < need:
        raise ConfigurationError(
            f"{who}: method={method!r} needs num_matvecs >= {need} for n = {n}, got {m}"
        )
    return m


def _mean_stderr(samples: torch.Tensor) -> tuple[float, float]:
    """Sample mean and ``std / sqrt(m)`` (unbiased variance); stderr inf for one sample."""
    m = samples.numel()
    mean = float(samples.mean())
    if m < 2:
        return mean, math.inf
    return mean, float(samples.std(unbiased=True)) / math.sqrt(m)


def _orth_rows(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Householder QR of the columns ``Y^T``: rows ``Q: [k, n]`` orthonormal and ``R: [k, k]``
    with ``Y^T = Q^T R`` (so ``Y = R^T Q``)."""
    Qc, R = torch.linalg.qr(Y.T, mode="reduced")
    return Qc.T.contiguous(), R


def _append_orth(
    Q: torch.Tensor, Ynew: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Extend orthonormal rows ``Q: [k, n]`` by new rows ``Ynew: [j, n]``.

    Returns ``(Qa [j, n], C [j, k], Ra [j, j])`` with ``[Q; Qa]`` orthonormal and
    ``Ynew = C Q + Ra^T Qa`` (to rounding). Classical Gram-Schmidt twice ("twice is
    enough"); if the new rows lie (numerically) in span(Q) the basis is still completed
    orthonormally, so a rank-deficient operator never yields a non-orthogonal basis.
    """
    C = torch.zeros((Ynew.shape[0], Q.shape[0]), dtype=Q.dtype, device=Q.device)
    Yp = Ynew
    for _ in range(2):
        D = Yp @ Q.T
        Yp = Yp - D @ Q
        C = C + D
    Qa, _ = _orth_rows(Yp)
    for _ in range(2):  # rounding-level Yp: make the completed basis orthogonal to Q
        Qa = Qa - (Qa @ Q.T) @ Q
    Qa, _ = _orth_rows(Qa)
    Ra = Qa @ Yp.T
    return Qa, C, Ra


def _downdate_directions(R: torch.Tensor, eps: float) -> torch.Tensor:
    """Unit columns ``s_i`` with ``s_i ⟂ R e_j`` for every ``j != i``: column i of ``R^{-T}``
    normalized, from the SVD ``R = U diag(sigma) V^T`` as ``U diag(1/sigma) V^T e_i``.

    Removing the direction ``Q s_i`` from ``span(Q)`` leaves ``span(Y without column i)``.
    Singular values below ``eps * k * sigma_max`` (a numerically rank-deficient sketch) are
    clamped there: the direction then points into the part of ``span(Q)`` that Y does not
    use, which is the exact-arithmetic limit, and no infinity appears.
    """
    k = R.shape[0]
    U, sig, Vh = torch.linalg.svd(R)
    smax = float(sig.max()) if k else 0.0
    if smax == 0.0:
        return torch.eye(k, dtype=R.dtype, device=R.device)
    floor = smax * max(k, 10) * eps
    inv = 1.0 / sig.clamp(min=floor)
    S = (U * inv) @ Vh  # columns: R^{-T} e_i up to the clamp
    return S / S.norm(dim=0, keepdim=True)


# ---------------------------------------------------------------------------------------
# XTrace / XDiag core
# ---------------------------------------------------------------------------------------


class _Exchangeable:
    """State shared by XTrace and XDiag: probes ``Om``, an orthonormal basis ``Q`` of
    ``Y = A Om`` with ``Y = R^T Q`` (rows), and ``Z = A Q`` (rows). It grows by appending
    probes: the basis is extended, so only the new rows of ``Z`` cost products."""

    def __init__(self, sess: _Session) -> None:
        self.sess = sess
        n, work, dev = sess.n, sess.work, sess.device
        self.Om = torch.zeros((0, n), dtype=work, device=dev)
        self.Q = torch.zeros((0, n), dtype=work, device=dev)
        self.Z = torch.zeros((0, n), dtype=work, device=dev)
        self.R = torch.zeros((0, 0), dtype=torch.float64)  # column convention, CPU float64

    @property
    def k(self) -> int:
        return self.Om.shape[0]

    def grow(self, j: int) -> None:
        """Draw j more probes: one block ``A Om_new`` and one block ``A Q_new``."""
        Om_new = self.sess.probes(j)
        Y_new = self.sess.apply(Om_new)
        if self.k == 0:
            Qa, R = _orth_rows(Y_new)
            Rnew = R.double().cpu()
        else:
            Qa, C, Ra = _append_orth(self.Q, Y_new)
            k = self.k
            Rnew = torch.zeros((k + j, k + j), dtype=torch.float64)
            Rnew[:k, :k] = self.R
            Rnew[:k, k:] = C.T.double().cpu()
            Rnew[k:, k:] = Ra.double().cpu()
        Z_new = self.sess.apply(Qa)
        self.Om = torch.cat([self.Om, Om_new])
        self.Q = torch.cat([self.Q, Qa])
        self.Z = torch.cat([self.Z, Z_new])
        self.R = Rnew

    def directions(self) -> torch.Tensor:
        return _downdate_directions(self.R, torch.finfo(self.sess.work).eps)


def _xtrace_estimates(st: _Exchangeable) -> torch.Tensor:
    """The k leave-one-out estimates ``t_i`` of XTrace (float64, CPU).

    With ``P_i = Q (I - s_i s_i^T) Q^T`` the projector onto ``span(Y without y_i)``
    (column convention, ``Y = Q R``), write ``w_i = Q^T omega_i``, ``t_i = Z^T omega_i``,
    ``H = Q^T A Q``, ``c_i = s_i^T w_i`` and ``v_i = w_i - c_i s_i``. Then
    ``tr(P_i A) = tr(H) - s_i^T H s_i`` and, since ``(I - P_i) omega_i = omega_i - Q v_i``
    and ``A (I - P_i) omega_i = Q r_i - Z v_i``,
    ``omega_i^T (I-P_i) A (I-P_i) omega_i = c_i s_i^T r_i - t_i^T v_i + v_i^T H v_i``.
    Only k x k quantities appear, so all k estimates cost O(n k^2 + k^3).
    """
    Q, Z, Om = st.Q, st.Z, st.Om
    H = (Q @ Z.T).double().cpu()  # H[a, b] = q_a^T A q_b
    H = 0.5 * (H + H.T)
    W = (Q @ Om.T).double().cpu()  # column i: Q^T omega_i
    T = (Z @ Om.T).double().cpu()  # column i: Z^T omega_i
    R = st.R
    S = st.directions()
    c = (S * W).sum(0)
    V = W - S * c
    sHs = (S * (H @ S)).sum(0)
    sr = (S * R).sum(0)
    vHv = (V * (H @ V)).sum(0)
    tv = (T * V).sum(0)
    return torch.trace(H) - sHs + c * sr - tv + vHv


def _xdiag_estimates(st: _Exchangeable) -> torch.Tensor:
    """The k leave-one-out diagonal estimates ``[k, n]`` of XDiag (working dtype).

    ``d_i = diag(P_i A) + omega_i * ((I - P_i) A omega_i)`` (Rademacher: ``omega * omega = 1``)
    with ``diag(P_i A) = rowsum(Q * Z) - (Q s_i) * (Z s_i)`` and, because ``A omega_i = Q r_i``
    lies in span(Q), ``(I - P_i) A omega_i = (s_i^T r_i) Q s_i``.
    """
    S = st.directions()
    sr = (S * st.R).sum(0)
    St = S.T.to(device=st.Q.device, dtype=st.Q.dtype)
    QS = St @ st.Q  # row i: (Q s_i)^T
    ZS = St @ st.Z
    base = (st.Q * st.Z).sum(0)
    coef = sr.to(device=st.Q.device, dtype=st.Q.dtype).unsqueeze(1)
    return base.unsqueeze(0) - QS * ZS + coef * (st.Om * QS)


# ---------------------------------------------------------------------------------------
# trace
# ---------------------------------------------------------------------------------------


def _next_block(
    count: int, est: float, stderr: float, z: float, rtol: float, remaining: int, floor_frac: float
) -> int:
    """Size of the next adaptive block: the 1/sqrt(m) prediction of the samples still
    needed (+10%), at least ``floor_frac * count`` (few passes), at most ``remaining``."""
    target = rtol * abs(est)
    if target > 0 and math.isfinite(stderr):
        needed = count * (z * stderr / target) ** 2
        want = math.ceil(1.1 * needed) - count if needed < 1e15 else remaining
    else:
        want = remaining
    want = max(want, math.ceil(floor_frac * count), 1)
    return int(min(want, remaining))


def _hutchinson_block(sess: _Session, k: int, Q: torch.Tensor | None) -> torch.Tensor:
    """k samples ``z^T A z`` (or of the deflated operator with ``z <- (I - QQ^T) z``),
    float64; probes are drawn per ``matmat`` chunk so memory stays ``block_size x n``."""
    out = []
    for size in sess.chunks(k):
        G = sess.probes(size)
        if Q is not None and Q.shape[0]:
            G = G - (G @ Q.T) @ Q
        AG = sess._one(G)
        out.append((G * AG).sum(1, dtype=torch.float64).cpu())
    return torch.cat(out)


def trace(
    A: LinearOperator,
    num_matvecs: int = 99,
    *,
    method: str = "hutch++",
    seed: int = 0,
    rtol: float | None = None,
    confidence: float = 0.95,
    min_samples: int = 10,
    block_size: int | None = None,
    probe: str = "rademacher",
) -> TraceResult:
    """Estimate ``tr(A)`` of a symmetric ``n x n`` operator from block products.

    Args:
        A: the operator (``A.matmat(V: [k, n]) -> [k, n]``); a dense square tensor is
            wrapped with :meth:`LinearOperator.from_matrix`.
        num_matvecs: the budget of products with A. ``"hutch++"`` needs >= 3 and
            ``"xtrace"`` >= 2 (or >= n). With ``num_matvecs >= n``, ``"hutch++"`` and
            ``"xtrace"`` compute the trace exactly from the n unit vectors (n products,
            ``stderr = 0``) instead of spending the budget on a sketch that covers R^n;
            this holds in the adaptive mode too (the cost is then at most n).
        method: ``"hutchinson"``, ``"hutch++"`` (default) or ``"xtrace"``.
        seed: seed of the private probe generator (the global RNG is not used).
        rtol: adaptive mode: stop once the ``confidence`` interval half-width
            ``z * stderr <= rtol * |estimate|`` with at least ``min_samples`` samples, or
            when the budget is spent (then ``converged=False`` and a warning).
        confidence: level of that interval, in (0, 1).
        min_samples: fewest samples (probes behind the standard error) before the adaptive
            rule may stop; at least 2 are always used.
        block_size: most rows per ``matmat`` call (None: a whole phase in one call).
        probe: ``"rademacher"`` (default) or ``"gaussian"``.

    Returns:
        :class:`TraceResult`. Budget use with ``rtol=None``: Hutchinson m probes in one
        pass; Hutch++ ``k = m // 3`` sketch probes (one pass), ``A Q`` (one pass) and
        ``m - 2k`` deflated probes (one pass); XTrace ``k = m // 2`` probes and ``A Q`` (two
        passes). Adaptive Hutch++ spends the same sketch (a third of the budget, so pass
        a realistic budget, not a huge cap), then deflated Hutchinson blocks sized by the
        1/sqrt(m) prediction of the samples still needed; adaptive XTrace starts from
        ``max(min_samples, 2)`` probes and extends its basis (at most doubling per step),
        so its cost follows the accuracy asked for, not the budget.

    Raises:
        ConfigurationError: bad method, probe, budget, rtol, confidence, min_samples,
            block_size, or a non-square A.
        NonFiniteError: a product contains NaN or Inf.
    """
    t0 = time.perf_counter()
    who = "trace"
    if method not in TRACE_METHODS:
        raise ConfigurationError(f"{who}: method must be one of {TRACE_METHODS}, got {method!r}")
    if probe not in PROBES:
        raise ConfigurationError(f"{who}: probe must be one of {PROBES}, got {probe!r}")
    A = _check_operator(A, who)
    n = int(A.shape[0])
    m = _check_budget(who, method, num_matvecs, n)
    seed = _check_int("seed", seed, -(2**63))
    if rtol is not None:
        if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not (
            math.isfinite(rtol) and rtol > 0
        ):
            raise ConfigurationError(
                f"{who}: rtol must be a finite number > 0 or None, got {rtol!r}"
            )
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not (
        0.0 < confidence < 1.0
    ):
        raise ConfigurationError(f"{who}: confidence must be in (0, 1), got {confidence!r}")
    min_samples = _check_int("min_samples", min_samples, 1)
    if block_size is not None:
        block_size = _check_int("block_size", block_size, 1)
    z = _z_value(confidence)
    sess = _Session(A, seed, probe, block_size, f"trace({method})")

    def result(value: float, stderr: float, converged: bool, samples: int, exact: bool = False):
        return TraceResult(
            value=float(value), stderr=float(stderr), num_matvecs=sess.matvecs,
            num_passes=sess.passes, method=method, seed=seed, converged=converged,
            seconds=time.perf_counter() - t0, num_samples=samples, exact=exact,
        )

    if n == 0:
        return result(0.0, 0.0, True, 0, exact=True)
    if method != "hutchinson" and m >= n:
        d = sess.exact_diagonal()
        return result(float(d.sum(dtype=torch.float64)), 0.0, True, 0, exact=True)

    min_eff = max(min_samples, 2)

    def met(est: float, err: float, count: int) -> bool:
        return count >= min_eff and z * err <= rtol * abs(est)  # type: ignore[operator]

    if method in ("hutchinson", "hutch++"):
        offset, Q = 0.0, None
        if method == "hutch++":
            k = m // 3
            S = sess.probes(k)
            Q, _ = _orth_rows(sess.apply(S))
            AQ = sess.apply(Q)
            offset = float((Q * AQ).sum(dtype=torch.float64))
        remaining = m - sess.matvecs
        if rtol is None:
            samples = _hutchinson_block(sess, remaining, Q)
            mean, err = _mean_stderr(samples)
            return result(offset + mean, err, True, samples.numel())
        samples = torch.zeros(0, dtype=torch.float64)
        mean, err, converged = 0.0, math.inf, False
        while remaining > 0:
            count = samples.numel()
            if count < min_eff:
                j = min(min_eff - count, remaining)
            else:
                j = _next_block(count, offset + mean, err, z, rtol, remaining, 0.25)
            samples = torch.cat([samples, _hutchinson_block(sess, j, Q)])
            remaining -= j
            mean, err = _mean_stderr(samples)
            if met(offset + mean, err, samples.numel()):
                converged = True
                break
        res = result(offset + mean, err, converged, samples.numel())
    else:  # xtrace
        st = _Exchangeable(sess)
        kmax = m // 2
        if rtol is None:
            st.grow(kmax)
            ests = _xtrace_estimates(st)
            mean, err = _mean_stderr(ests)
            return result(mean, err, True, st.k)
        converged = False
        st.grow(min(min_eff, kmax))
        while True:
            ests = _xtrace_estimates(st)
            mean, err = _mean_stderr(ests)
            if met(mean, err, st.k):
                converged = True
                break
            room = kmax - st.k
            if room <= 0:
                break
            if st.k < min_eff:
                j = min(min_eff - st.k, room)
            else:  # XTrace beats 1/sqrt(m): cap the prediction by doubling
                j = min(_next_block(st.k, mean, err, z, rtol, room, 0.25), st.k)
            st.grow(j)
        res = result(mean, err, converged, st.k)
    if not res.converged:
        warnings.warn(
            f"hessfast: trace(method={method!r}) spent its budget of {m} matvecs before the "
            f"{confidence:.0%} interval reached rtol={rtol:g}: estimate {res.value:.6g} "
            f"+/- {z * res.stderr:.3g} from {res.num_samples} samples; raise num_matvecs",
            stacklevel=2,
        )
    return res


# ---------------------------------------------------------------------------------------
# diagonal
# ---------------------------------------------------------------------------------------


def diagonal(
    A: LinearOperator,
    num_matvecs: int = 99,
    *,
    method: str = "hutchinson",
    seed: int = 0,
) -> DiagonalResult:
    """Estimate ``diag(A)`` of a symmetric ``n x n`` operator from block products.

    Args:
        A: the operator (or a dense square tensor).
        num_matvecs: budget of products. ``"hutchinson"`` uses all of it in one pass of
            Rademacher probes: ``d = sum_i z_i * (A z_i) / sum_i z_i * z_i`` (Bekas et al.;
            the denominator is m for Rademacher probes). ``"xdiag"`` uses ``k = m // 2``
            probes and ``A Q`` (two passes); with ``num_matvecs >= n`` it reads the exact
            diagonal from the n unit vectors instead (n products).
        method: ``"hutchinson"`` (default) or ``"xdiag"``.
        seed: seed of the private probe generator.

    Returns:
        :class:`DiagonalResult` with ``values [n]`` and per-entry ``stderr [n]``
        (Hutchinson: the sample std of ``z_j (A z)_j`` over sqrt(m); XDiag: the spread of
        the k leave-one-out estimates over sqrt(k)); ``by_param`` maps the values to the
        parameter shapes for a model operator.

    Raises:
        ConfigurationError: bad method or budget, non-square A.
        NonFiniteError: a product contains NaN or Inf.
    """
    t0 = time.perf_counter()
    who = "diagonal"
    if method not in DIAGONAL_METHODS:
        raise ConfigurationError(
            f"{who}: method must be one of {DIAGONAL_METHODS}, got {method!r}"
        )
    A = _check_operator(A, who)
    n = int(A.shape[0])
    m = _check_budget(who, method, num_matvecs, n)
    seed = _check_int("seed", seed, -(2**63))
    sess = _Session(A, seed, "rademacher", None, f"diagonal({method})")
    exact = False
    if n == 0 or (method == "xdiag" and m >= n):
        values = sess.exact_diagonal()
        stderr = torch.zeros_like(values)
        exact = True
    elif method == "hutchinson":
        # Chan's pairwise update of mean and sum of squared deviations, float64 per block.
        mean = torch.zeros(n, dtype=torch.float64, device=sess.device)
        m2 = torch.zeros_like(mean)
        count = 0
        for size in sess.chunks(m):
            Zb = sess.probes(size)
            X = (Zb * sess._one(Zb)).double()
            bmean = X.mean(0)
            bm2 = ((X - bmean) ** 2).sum(0)
            delta = bmean - mean
            tot = count + size
            mean = mean + delta * (size / tot)
            m2 = m2 + bm2 + delta**2 * (count * size / tot)
            count = tot
        values = mean.to(sess.work)
        if count >= 2:
            stderr = (m2 / (count - 1)).sqrt().div(math.sqrt(count)).to(sess.work)
        else:
            stderr = torch.full_like(values, math.inf)
    else:  # xdiag
        st = _Exchangeable(sess)
        st.grow(m // 2)
        E = _xdiag_estimates(st)
        values = E.mean(0)
        k = E.shape[0]
        stderr = E.std(0, unbiased=True) / math.sqrt(k) if k >= 2 else torch.full_like(
            values, math.inf
        )
    unflatten = getattr(A, "unflatten", None)
    by_param = unflatten(values) if callable(unflatten) else None
    return DiagonalResult(
        values=values, stderr=stderr, num_matvecs=sess.matvecs, num_passes=sess.passes,
        method=method, seed=seed, by_param=by_param, seconds=time.perf_counter() - t0,
        exact=exact,
    )
