"""Spectral density of a symmetric operator: stochastic Lanczos quadrature (SLQ) and the
kernel polynomial method (KPM).

The (normalised) spectral density of a symmetric ``A: [n, n]`` with eigenpairs
``(lambda_i, q_i)`` is the measure ``phi(x) = (1/n) sum_i delta(x - lambda_i)``. For a unit
probe ``u`` the measure ``mu_u(x) = sum_i (q_i^T u)^2 delta(x - lambda_i)`` has the same
expectation as ``phi`` when ``E[u u^T] = I/n`` (Rademacher ``+-1/sqrt(n)`` entries, or a
normalised Gaussian = uniform on the sphere), so averaging ``mu_u`` over probes estimates
``phi``, and ``int f d phi = tr(f(A))/n``.

* **SLQ** replaces each ``mu_u`` by its ``m``-point Gauss rule: ``m`` steps of Lanczos from
  ``u`` give the tridiagonal ``T_m = S diag(theta) S^T``; nodes are the Ritz values
  ``theta_j`` and weights ``w_j = S[0, j]^2`` (``>= 0``, ``sum_j w_j = 1``). The rule is exact
  for polynomials of degree ``<= 2m - 1``: ``sum_j w_j theta_j^p = u^T A^p u``.
* **KPM** computes the Chebyshev moments ``mu_k = u^T T_k(B) u`` of the rescaled operator
  ``B = (A - c I)/h`` whose spectrum lies in ``[-1, 1]``, and expands
  ``phi(t) ~ (g_0 mu_0 + 2 sum_k g_k mu_k T_k(t)) / (pi sqrt(1 - t^2))`` with Jackson damping
  ``g_k``.

All probes advance together: each step is ONE ``A.matmat`` of the ``[P, n]`` block of current
vectors, so a model operator makes one pass over its data per step whatever the number of
probes.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import ops
from .errors import ConfigurationError, NonFiniteError
from .linop import LinearOperator

__all__ = ["SpectralDensity", "draw_probes", "spectral_density"]

METHODS = ("slq", "kpm")
PROBES = ("rademacher", "gaussian")
REORTHS = ("full", "none")
BASIS_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

#: Breakdown threshold relative to the running estimate of ||A|| (max ||A q|| seen), in units
#: of the working precision's eps: ``beta <= max(BREAKDOWN_EPS, sqrt(n)) eps ||A||_est`` ends a
#: probe's recurrence (nodes then move by at most that much: far below any plot resolution).
BREAKDOWN_EPS = 16.0
#: Lanczos steps used by KPM to bound the spectrum.
KPM_BOUND_STEPS = 10
#: KPM bounds are widened by this fraction of their width (on top of the Ritz residuals).
KPM_MARGIN = 0.01
#: A Chebyshev vector with ``||T_k(B) u|| > 1 + KPM_GROWTH_TOL`` proves that the bounds miss part
#: of the spectrum (for ``||u|| = 1`` and a spectrum in [-1, 1] the norm is <= 1).
KPM_GROWTH_TOL = 1e-2


# ---------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class SpectralDensity:
    """An estimate of the spectral density of a symmetric ``n x n`` operator.

    Attributes:
        nodes: ``[P, N]`` float64 (CPU) quadrature nodes per probe. SLQ: the Ritz values of
            each probe's Lanczos tridiagonal, ``N = num_steps`` (clipped to ``n``), ascending;
            a probe whose recurrence broke down after ``k < N`` steps is padded with copies
            of its largest node and weight 0. KPM: ``N = 2 * num_moments`` Chebyshev-Gauss
            points mapped to ``bounds``, the same for every probe.
        weights: ``[P, N]`` float64, ``>= 0``, each row sums to 1. SLQ: Gauss weights
            ``S[0, j]^2``. KPM: the Jackson-damped expansion of each probe's measure sampled
            at the nodes (non-negative because the Jackson kernel is).
        trace_weights: ``[P, N]`` float64 weights used by :meth:`trace` and :meth:`moments`.
            SLQ: ``weights``. KPM: the *undamped* Chebyshev-Gauss weights, which reproduce the
            moments ``u^T A^p u`` exactly for ``p < num_moments`` but may be negative.
        method: ``"slq"`` or ``"kpm"``.
        n: operator size.
        num_steps: SLQ: Lanczos steps per probe (after clipping to ``n``); KPM: the number of
            Chebyshev moments.
        steps: ``[P]`` int64: Lanczos steps each probe took (SLQ; ``< num_steps`` after a
            breakdown, when the Gauss rule is exact), ``num_steps`` for KPM.
        probe: ``"rademacher"``, ``"gaussian"`` or ``"given"``.
        seed: the probes' seed.
        bounds: ``(lo, hi)``. SLQ: extreme Ritz values widened by their Ritz residuals
            ``|beta_m s_{m,j}|``. KPM: the interval mapped to ``[-1, 1]``.
        default_sigma: the Gaussian width :meth:`density` uses when ``sigma=None`` (SLQ;
            ``(hi - lo) / num_steps``, see :meth:`density`); for KPM the Jackson kernel's
            resolution ``pi (hi - lo) / (2 num_moments)`` (information only).
        chebyshev_moments: KPM only: ``[P, num_moments]`` float64 raw moments ``u^T T_k(B) u``.
        num_matvecs, num_passes: products and ``A.matmat`` calls (data passes) spent.
        seconds: wall time.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    trace_weights: torch.Tensor
    method: str
    n: int
    num_steps: int
    steps: torch.Tensor
    probe: str
    seed: int
    bounds: tuple[float, float]
    default_sigma: float
    num_matvecs: int
    num_passes: int
    seconds: float
    chebyshev_moments: torch.Tensor | None = None

    # -- basic properties -------------------------------------------------------------------
    @property
    def num_probes(self) -> int:
        """Number of probes ``P``."""
        return int(self.nodes.shape[0])

    def __repr__(self) -> str:
        lo, hi = self.bounds
        return (
            f"SpectralDensity(method={self.method!r}, n={self.n}, num_probes={self.num_probes}, "
            f"num_steps={self.num_steps}, bounds=({lo:.4g}, {hi:.4g}), "
            f"num_passes={self.num_passes}, num_matvecs={self.num_matvecs}, "
            f"seconds={self.seconds:.3g})"
        )

    # -- density ------------------------------------------------------------------------------
    def density(
        self, grid: Any, sigma: float | None = None, *, log: bool = False
    ) -> torch.Tensor:
        """The estimated density on ``grid``.

        SLQ (and KPM with an explicit ``sigma``): the quadrature measure broadened by a
        Gaussian of width ``sigma``, which integrates to 1 over the real line:
        ``rho(x) = (1/P) sum_pj w_pj exp(-(x - theta_pj)^2 / (2 sigma^2)) / (sigma sqrt(2 pi))``.

        Default ``sigma`` (SLQ): ``(hi - lo) / num_steps``. Rule: a Gaussian of width ``sigma``
        on an interval of width ``W`` is approximated to ~1e-3 by a polynomial of degree about
        ``3.7 W / (2 sigma)``; the m-point Gauss rule integrates degree ``2m - 1`` exactly, so
        ``sigma ~ W / m`` is the narrowest width at which each probe's rule resolves the kernel
        (narrower widths show the individual Ritz values instead of a density).

        KPM with ``sigma=None``: the Jackson-damped Chebyshev expansion of the probe-averaged
        moments, ``(g_0 + 2 sum_k g_k mu_k T_k(t)) / (pi h sqrt(1 - t^2))`` with
        ``t = (x - c)/h``, clipped at 0, renormalised to integrate to 1 over ``bounds``, and 0
        outside them.

        Args:
            grid: ``[G]`` points (tensor, array or sequence).
            sigma: Gaussian width (> 0), or None for the default above.
            log: return the natural log of the density instead (computed with a log-sum-exp,
                so the far tails of the Gaussian mixture stay finite; ``-inf`` where the KPM
                density is 0). Use it for log-scale plots of the spike at 0.

        Returns:
            ``[G]`` float64 tensor.
        """
        x = _as_grid(grid)
        if self.method == "kpm" and sigma is None:
            rho = self._kpm_density(x)
            return torch.log(rho) if log else rho
        s = self._sigma(sigma)
        logrho = _gaussian_mixture_log(x, self.nodes, self.weights, s)
        return logrho if log else torch.exp(logrho)

    def log_density(self, grid: Any, sigma: float | None = None) -> torch.Tensor:
        """``density(grid, sigma, log=True)``: natural log of the density, ``[G]`` float64."""
        return self.density(grid, sigma, log=True)

    def _sigma(self, sigma: float | None) -> float:
        if sigma is None:
            return self.default_sigma if self.method == "slq" else _slq_sigma(
                self.bounds, max(1, self.num_steps // 2)
            )
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ConfigurationError(f"sigma must be a number > 0 or None, got {sigma!r}")
        if not math.isfinite(float(sigma)):
            raise ConfigurationError(f"sigma must be finite, got {sigma!r}")
        return float(sigma)

    def _kpm_density(self, x: torch.Tensor) -> torch.Tensor:
        assert self.chebyshev_moments is not None
        lo, hi = self.bounds
        h = 0.5 * (hi - lo)
        M = self.chebyshev_moments.shape[1]
        coef = _jackson(M) * self.chebyshev_moments.mean(0)
        # normaliser: integral of the clipped expansion over [lo, hi] by Chebyshev-Gauss
        Nq = max(4 * M, 1024)
        tq = torch.cos(math.pi * (torch.arange(Nq, dtype=torch.float64) + 0.5) / Nq)
        Z = float(_cheb_series(tq, coef).clamp_min(0).mean())
        # 1 - t^2 = (1 + t)(1 - t) from the distances to the bounds, so that the endpoints
        # (where the Chebyshev weight is singular) are exactly outside, never 1 - t^2 = 1e-16
        up, down = (x - lo) / h, (hi - x) / h
        inside = (up > 0) & (down > 0)
        out = torch.zeros_like(x)
        ui, di = up[inside], down[inside]
        s = _cheb_series(ui - 1, coef).clamp_min(0)
        out[inside] = s / (math.pi * h * torch.sqrt(ui * di) * Z)
        return out

    # -- traces -------------------------------------------------------------------------------
    def trace(
        self, f: Callable[[torch.Tensor], Any], *, per_probe: bool = False
    ) -> float | torch.Tensor:
        """Estimate ``tr(f(A)) = n int f d phi``, e.g. ``f = torch.log`` for ``log det A``.

        Per probe ``p``: ``n sum_j tw_pj f(x_pj)`` with the ``trace_weights``; the estimate is
        the mean over probes. SLQ: exact for ``f`` a polynomial of degree ``<= 2 steps_p - 1``
        (and for every ``f`` once ``num_steps = n``), i.e. equal to Hutchinson's
        ``z^T f(A) z`` on the same probes. KPM: the Chebyshev interpolant of ``f`` against the
        raw moments, exact for polynomials of degree ``< num_moments``.

        Args:
            f: elementwise function of a float64 tensor (``torch.log``, ``lambda x: x**2``).
            per_probe: return the ``[P]`` per-probe estimates instead of their mean.
        """
        vals = f(self.nodes.clone())
        vals = torch.as_tensor(vals, dtype=torch.float64)
        if vals.shape != self.nodes.shape:
            vals = torch.broadcast_to(vals, self.nodes.shape)
        w = self.trace_weights
        terms = torch.where(w == 0, torch.zeros((), dtype=torch.float64), w * vals)
        est = self.n * terms.sum(1)
        return est if per_probe else float(est.mean())

    def trace_stderr(self, f: Callable[[torch.Tensor], Any]) -> float:
        """Standard error of :meth:`trace` over the probes (``std / sqrt(P)``; nan for P = 1)."""
        est = self.trace(f, per_probe=True)
        assert isinstance(est, torch.Tensor)
        if est.numel() < 2:
            return math.nan
        return float(est.std(unbiased=True) / math.sqrt(est.numel()))

    def moments(self, p: int, *, per_probe: bool = False) -> float | torch.Tensor:
        """Estimate of ``tr(A^p) / n``, ``p = 0, 1, 2, ...``.

        SLQ: exact per probe (``= u^T A^p u``) for ``p <= 2 steps_p - 1``; KPM: for
        ``p < num_moments``. ``per_probe=True`` returns the ``[P]`` values ``u_p^T A^p u_p``.
        """
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise ConfigurationError(f"p must be an integer >= 0, got {p!r}")
        out = self.trace(lambda x: x**p, per_probe=per_probe)
        return out / self.n

    # -- plotting -----------------------------------------------------------------------------
    def plot(
        self,
        ax: Any = None,
        grid: Any = None,
        log: bool = False,
        sigma: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Plot the density on ``ax`` (a new figure when None) and return the axes.

        ``grid`` defaults to 1000 points over ``bounds`` widened by 3 sigma; ``log=True`` uses
        a logarithmic y axis (the spike at 0 of a network Hessian next to its outliers).
        Needs matplotlib (imported here only).
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "SpectralDensity.plot needs matplotlib, which is not installed: "
                "pip install matplotlib (the rest of hessfast works without it)"
            ) from exc
        if grid is None:
            lo, hi = self.bounds
            pad = 3 * self._sigma(sigma) if (self.method == "slq" or sigma is not None) else 0.0
            width = hi - lo
            if width <= 0 and pad <= 0:
                pad = max(abs(lo), 1.0) * 1e-3
            grid = torch.linspace(lo - pad, hi + pad, 1000, dtype=torch.float64)
        x = _as_grid(grid)
        rho = self.density(x, sigma)
        if ax is None:
            _, ax = plt.subplots()
        xs, ys = x.numpy(), rho.numpy()
        if log:
            floor = max(float(rho.max()) * 1e-14, 1e-300)
            ys = rho.clamp_min(floor).numpy()
            ax.set_yscale("log")
        ax.plot(xs, ys, **kwargs)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(f"{self.method.upper()} spectral density (n={self.n}, P={self.num_probes})")
        return ax


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _as_grid(grid: Any) -> torch.Tensor:
    x = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    if x.dim() != 1:
        x = x.reshape(-1)
    return x


def _slq_sigma(bounds: tuple[float, float], m: int) -> float:
    """``(hi - lo) / m``; a spectrum narrower than ``1e-5`` of its magnitude (a point mass up to
    float32 roundoff) gets 1e-3 of its magnitude, the zero spectrum 1e-3."""
    lo, hi = bounds
    width = hi - lo
    scale = max(abs(lo), abs(hi))
    if width > 1e-5 * scale and width > 0:
        return width / m
    return 1e-3 * scale if scale > 0 else 1e-3


def _gaussian_mixture_log(
    x: torch.Tensor, nodes: torch.Tensor, weights: torch.Tensor, sigma: float
) -> torch.Tensor:
    """``log((1/P) sum_pj w_pj N(x; node_pj, sigma^2))`` for every x, by log-sum-exp."""
    P = nodes.shape[0]
    nd = nodes.reshape(-1)
    lw = torch.log(weights.reshape(-1))  # -inf for padded / zero weights
    keep = torch.isfinite(lw)
    nd, lw = nd[keep], lw[keep]
    const = -math.log(P) - math.log(sigma * math.sqrt(2 * math.pi))
    out = torch.empty_like(x)
    chunk = max(1, 4_000_000 // max(1, nd.numel()))
    for i in range(0, x.numel(), chunk):
        xi = x[i : i + chunk]
        z = (xi[:, None] - nd[None, :]) / sigma
        out[i : i + chunk] = torch.logsumexp(lw[None, :] - 0.5 * z * z, dim=1) + const
    return out


def _jackson(M: int) -> torch.Tensor:
    """Jackson damping factors ``g_k``, k = 0..M-1 (g_0 = 1):
    ``g_k = ((M - k + 1) cos(pi k/(M+1)) + sin(pi k/(M+1)) cot(pi/(M+1))) / (M+1)``."""
    k = torch.arange(M, dtype=torch.float64)
    a = math.pi / (M + 1)
    return ((M - k + 1) * torch.cos(a * k) + torch.sin(a * k) / math.tan(a)) / (M + 1)


def _cheb_series(t: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``coef_0 + 2 sum_{k>=1} coef_k T_k(t)`` for ``t`` in [-1, 1] (shape of t)."""
    k = torch.arange(coef.numel(), dtype=torch.float64)
    T = torch.cos(k[None, :] * torch.arccos(t.clamp(-1, 1))[:, None])  # [len(t), M]
    c = coef.clone()
    c[1:] *= 2
    return T @ c


def _cheb_weights(mu: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Chebyshev-Gauss weights ``w_pj = (1/N)(mu_p0 + 2 sum_k mu_pk T_k(t_j))`` for the N
    points ``t``: ``sum_j w_pj T_l(t_j) = mu_pl`` for ``l < M``. ``mu: [P, M]`` -> ``[P, N]``."""
    M = mu.shape[1]
    k = torch.arange(M, dtype=torch.float64)
    T = torch.cos(k[:, None] * torch.arccos(t)[None, :])  # [M, N]
    c = mu.clone()
    c[:, 1:] *= 2
    return (c @ T) / t.numel()


def draw_probes(
    n: int,
    num_probes: int,
    *,
    seed: int = 0,
    probe: str = "rademacher",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The unit probes :func:`spectral_density` uses: ``[num_probes, n]``, rows of norm 1.

    ``"rademacher"``: entries ``+-1/sqrt(n)``; ``"gaussian"``: normalised standard normal rows
    (uniform on the sphere). Both satisfy ``E[u u^T] = I / n``, so ``n u^T A u`` is an unbiased
    estimate of ``tr(A)`` (Hutchinson with ``z = sqrt(n) u``). Drawn from a private
    ``torch.Generator(device).manual_seed(seed)``; the global RNG is untouched. The values
    depend on (seed, n, num_probes, probe, dtype, device).
    """
    if probe not in PROBES:
        raise ConfigurationError(f"probe must be one of {PROBES}, got {probe!r}")
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    if probe == "rademacher":
        Z = torch.randint(0, 2, (num_probes, n), generator=gen, device=dev).to(dtype) * 2 - 1
        return Z / math.sqrt(n)
    Z = torch.randn((num_probes, n), generator=gen, device=dev, dtype=dtype)
    return Z / torch.linalg.vector_norm(Z, dim=1, keepdim=True)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _products(A: LinearOperator, V: torch.Tensor, work: torch.dtype, step: int) -> torch.Tensor:
    """``A V`` in the working dtype (a fresh tensor), checked for NaN/Inf."""
    W = A.matmat(V).to(dtype=work, copy=True)
    if not bool(torch.isfinite(W).all()):
        raise NonFiniteError(
            f"spectral_density: the operator returned NaN or Inf at step {step} (block of "
            f"{V.shape[0]} vectors); check the model/loss for overflow (fp16?) or NaN data"
        )
    return W


# ---------------------------------------------------------------------------------------------
# Lanczos with all probes in one block
# ---------------------------------------------------------------------------------------------


@dataclass
class _Tridiags:
    alpha: torch.Tensor  # [P, m] float64 (CPU)
    beta: torch.Tensor  # [P, m] float64: beta[p, j] couples steps j and j+1
    steps: torch.Tensor  # [P] int64
    last_beta: torch.Tensor  # [P] float64: residual norm after the last step (0 on breakdown)

    def gauss(self, p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ritz values (ascending), Gauss weights and Ritz residuals of probe p (float64)."""
        k = int(self.steps[p])
        T = torch.diag(self.alpha[p, :k])
        if k > 1:
            off = self.beta[p, : k - 1]
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        w = S[0] ** 2
        w = w / w.sum()
        resid = (self.last_beta[p] * S[-1]).abs()
        return theta, w, resid


def _lanczos_probes(
    A: LinearOperator,
    Z: torch.Tensor,
    m: int,
    *,
    reorth: str,
    basis_dtype: torch.dtype,
) -> _Tridiags:
    """m Lanczos steps from each row of the unit block ``Z: [P, n]`` (working dtype), all
    probes in one ``A.matmat`` per step.

    Step j, for the active rows ``q_j``: ``w = A q_j``; ``alpha_j = q_j^T w``;
    ``w -= alpha_j q_j + beta_{j-1} q_{j-1}``; with ``reorth="full"`` ``w`` is then
    orthogonalised against the probe's own basis ``Q_p[:j+1]`` by CGS2 (``ops.reorthogonalize``,
    DGKS second pass); ``beta_j = ||w||``. A probe with
    ``beta_j <= max(16, sqrt(n)) eps ||A||_est`` has found an invariant subspace: its recurrence
    ends (its Gauss rule is exact) and the block shrinks.
    """
    P, n = Z.shape
    work = Z.dtype
    dev = Z.device
    eps = torch.finfo(work).eps
    alpha = torch.zeros((P, m), dtype=torch.float64)
    beta = torch.zeros((P, m), dtype=torch.float64)
    steps = torch.zeros(P, dtype=torch.int64)
    last_beta = torch.zeros(P, dtype=torch.float64)
    Q = None
    if reorth == "full":
        Q = torch.empty((P, m, n), dtype=basis_dtype, device=dev)
        Q[:, 0] = Z.to(basis_dtype)
    active = torch.arange(P)
    q = Z.clone()
    q_prev: torch.Tensor | None = None
    b_prev: torch.Tensor | None = None
    anorm = 0.0
    # roundoff of a product is ~ sqrt(n) eps ||A||: a residual below it is an invariant subspace
    tol = max(BREAKDOWN_EPS, math.sqrt(n)) * eps
    for j in range(m):
        W = _products(A, q, work, j)
        anorm = max(anorm, float(torch.linalg.vector_norm(W, dim=1).max()))
        a = (q * W).sum(1)
        W -= a[:, None] * q
        if q_prev is not None and b_prev is not None:
            W -= b_prev[:, None] * q_prev
        if Q is not None:
            for i, p in enumerate(active.tolist()):
                ops.reorthogonalize(Q[p, : j + 1], W[i : i + 1])
        b = torch.linalg.vector_norm(W, dim=1)
        a_c, b_c = a.double().cpu(), b.double().cpu()
        alpha[active, j] = a_c
        steps[active] = j + 1
        if j == m - 1:
            last_beta[active] = b_c
            break
        done = b_c <= tol * anorm  # `<=`: the zero operator breaks down at once
        keep = ~done
        if not bool(keep.any()):
            break
        beta[active[keep], j] = b_c[keep]
        keep_dev = keep.to(dev)
        q_new = W[keep_dev] / b[keep_dev][:, None]
        q_prev, b_prev = q[keep_dev], b[keep_dev]
        q = q_new
        active = active[keep]
        if Q is not None:
            Q[active, j + 1] = q_new.to(basis_dtype)
    return _Tridiags(alpha, beta, steps, last_beta)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def spectral_density(
    A: LinearOperator,
    num_probes: int = 8,
    num_steps: int = 64,
    *,
    method: str = "slq",
    seed: int = 0,
    probe: str = "rademacher",
    reorth: str = "full",
    basis_dtype: torch.dtype | None = None,
    num_moments: int | None = None,
    probes: torch.Tensor | None = None,
) -> SpectralDensity:
    """Estimate the spectral density of a symmetric operator by SLQ or KPM.

    Args:
        A: symmetric :class:`~hessfast.linop.LinearOperator` ``[n, n]``.
        num_probes: P >= 1 random probes, advanced together (one ``A.matmat`` of ``[P, n]``
            per step).
        num_steps: SLQ: Lanczos steps per probe, m >= 1 (clipped to ``n``: the rule is then
            exact). Data passes: ``m``. KPM: sets the default ``num_moments = 2 m``.
        method: ``"slq"`` (stochastic Lanczos quadrature) or ``"kpm"`` (kernel polynomial
            method with Jackson damping).
        seed: seed of the private generator that draws the probes (:func:`draw_probes`).
        probe: ``"rademacher"`` or ``"gaussian"`` (normalised: uniform on the sphere).
        reorth: ``"full"`` (each probe's new vector is reorthogonalised against its whole
            basis by CGS2; memory ``P m n`` in ``basis_dtype``) or ``"none"`` (plain
            three-term recurrence: cheaper, but lost orthogonality produces ghost Ritz values
            that distort the weights). Only SLQ stores a basis.
        basis_dtype: storage dtype of the Lanczos basis (``torch.float64``, ``float32``,
            ``bfloat16``, ``float16``); default: the working dtype (float64 for a float64
            operator, else float32). Coefficients and current vectors stay in the working dtype.
        num_moments: KPM: Chebyshev moments M >= 1 (default ``2 num_steps``). The doubling
            ``mu_{2k} = 2 <T_k u, T_k u> - mu_0``, ``mu_{2k+1} = 2 <T_{k+1} u, T_k u> - mu_1``
            gives them in ``ceil((M - 1)/2)`` data passes, plus ``min(n, 10)`` Lanczos passes
            for the bounds.
        probes: optional ``[P, n]`` starting vectors (rows are normalised); overrides
            ``num_probes``, ``seed`` and ``probe``.

    Returns:
        :class:`SpectralDensity`.

    Raises:
        ConfigurationError: a bad argument (named in the message).
        NonFiniteError: the operator returned NaN or Inf.
    """
    if not isinstance(A, LinearOperator):
        raise TypeError(f"A must be a hessfast LinearOperator, got {type(A).__name__}")
    if method not in METHODS:
        raise ConfigurationError(f"method must be one of {METHODS}, got {method!r}")
    if probe not in PROBES:
        raise ConfigurationError(f"probe must be one of {PROBES}, got {probe!r}")
    if reorth not in REORTHS:
        raise ConfigurationError(f"reorth must be one of {REORTHS}, got {reorth!r}")
    num_probes = _check_int("num_probes", num_probes, 1)
    num_steps = _check_int("num_steps", num_steps, 1)
    seed = _check_int("seed", seed, -(2**63))
    if basis_dtype is not None and basis_dtype not in BASIS_DTYPES:
        raise ConfigurationError(
            f"basis_dtype must be None or one of {BASIS_DTYPES}, got {basis_dtype!r}"
        )
    if num_moments is not None:
        if method != "kpm":
            raise ConfigurationError("num_moments applies to method='kpm' only")
        num_moments = _check_int("num_moments", num_moments, 1)
    n = A.shape[0]
    if n < 1:
        raise ConfigurationError("A has size n = 0: there is no spectrum to estimate")

    work = torch.float64 if A.dtype == torch.float64 else torch.float32
    bdtype = basis_dtype if basis_dtype is not None else work
    probe_name = probe
    if probes is not None:
        if not isinstance(probes, torch.Tensor) or probes.dim() != 2 or probes.shape[1] != n:
            shape = tuple(probes.shape) if isinstance(probes, torch.Tensor) else type(probes)
            raise ConfigurationError(f"probes must be a tensor [P, {n}], got {shape}")
        if probes.shape[0] < 1:
            raise ConfigurationError("probes must have at least one row")
        Z = probes.detach().to(device=A.device, dtype=work)
        if not bool(torch.isfinite(Z).all()):
            raise NonFiniteError("probes contain NaN or Inf")
        nz = torch.linalg.vector_norm(Z, dim=1, keepdim=True)
        if bool((nz == 0).any()):
            raise ConfigurationError("probes has a zero row; every probe must be nonzero")
        Z = Z / nz
        num_probes = Z.shape[0]
        probe_name = "given"
    else:
        Z = draw_probes(n, num_probes, seed=seed, probe=probe, dtype=work, device=A.device)

    t0 = time.perf_counter()
    mv0, ps0 = A.num_matvecs, A.num_passes
    with torch.no_grad():
        if method == "slq":
            fields = _slq(A, Z, min(num_steps, n), reorth, bdtype)
        else:
            M = num_moments if num_moments is not None else 2 * num_steps
            fields = _kpm(A, Z, M, bdtype)
    return SpectralDensity(
        method=method,
        n=n,
        probe=probe_name,
        seed=seed,
        num_matvecs=A.num_matvecs - mv0,
        num_passes=A.num_passes - ps0,
        seconds=time.perf_counter() - t0,
        **fields,
    )


def _slq(
    A: LinearOperator, Z: torch.Tensor, m: int, reorth: str, bdtype: torch.dtype
) -> dict[str, Any]:
    P = Z.shape[0]
    tri = _lanczos_probes(A, Z, m, reorth=reorth, basis_dtype=bdtype)
    nodes = torch.empty((P, m), dtype=torch.float64)
    weights = torch.zeros((P, m), dtype=torch.float64)
    lo, hi = math.inf, -math.inf
    for p in range(P):
        theta, w, resid = tri.gauss(p)
        k = theta.numel()
        nodes[p, :k] = theta
        nodes[p, k:] = theta[-1]
        weights[p, :k] = w
        lo = min(lo, float((theta - resid).min()))
        hi = max(hi, float((theta + resid).max()))
    bounds = (lo, hi)
    return dict(
        nodes=nodes,
        weights=weights,
        trace_weights=weights,
        num_steps=m,
        steps=tri.steps.clone(),
        bounds=bounds,
        default_sigma=_slq_sigma(bounds, m),
    )


def _kpm_bounds(A: LinearOperator, z: torch.Tensor, bdtype: torch.dtype) -> tuple[float, float]:
    """``[lo, hi]`` from a short Lanczos run on one probe: the Ritz intervals
    ``theta_j +- |beta_k s_{k,j}|`` (each holds an eigenvalue), widened by ``KPM_MARGIN`` of the
    width; a point spectrum gets a small interval around it."""
    n = z.shape[1]
    tri = _lanczos_probes(A, z, min(n, KPM_BOUND_STEPS), reorth="full", basis_dtype=bdtype)
    theta, _, resid = tri.gauss(0)
    lo, hi = float((theta - resid).min()), float((theta + resid).max())
    width, scale = hi - lo, max(abs(lo), abs(hi))
    if width > 1e-8 * scale and width > 0:
        pad = KPM_MARGIN * width
    else:
        pad = 1e-3 * scale if scale > 0 else 1.0
    return lo - pad, hi + pad


def _kpm(A: LinearOperator, Z: torch.Tensor, M: int, bdtype: torch.dtype) -> dict[str, Any]:
    P = Z.shape[0]
    work = Z.dtype
    lo, hi = _kpm_bounds(A, Z[:1], bdtype)
    K = M // 2  # = ceil((M - 1) / 2) passes: mu_0..mu_{2K} cover indices 0..M-1
    for _attempt in range(4):
        c, h = 0.5 * (hi + lo), 0.5 * (hi - lo)
        mu = torch.zeros((P, 2 * K + 1), dtype=torch.float64)
        mu[:, 0] = 1.0
        v_prev = Z
        v = Z
        grew = 0.0
        for k in range(1, K + 1):
            BV = (_products(A, v, work, k) - c * v) / h
            v_next = BV if k == 1 else 2 * BV - v_prev
            v_prev, v = v, v_next
            # v = T_k(B) u, v_prev = T_{k-1}(B) u
            vv = (v * v).sum(1).double().cpu()
            vp = (v * v_prev).sum(1).double().cpu()
            if k == 1:
                mu[:, 1] = vp
            else:
                mu[:, 2 * k - 1] = 2 * vp - mu[:, 1]
            mu[:, 2 * k] = 2 * vv - mu[:, 0]
            grew = max(grew, float(vv.max().sqrt()))
            if grew > 1 + KPM_GROWTH_TOL:
                break
        if grew <= 1 + KPM_GROWTH_TOL:
            break
        # part of the spectrum lies outside [lo, hi]: widen around the centre and redo
        lo, hi = c - 2 * h, c + 2 * h
    else:
        warnings.warn(
            "spectral_density(method='kpm'): Chebyshev vectors still grow after widening the "
            "bounds 3 times; the moments are unreliable (is the operator symmetric?)",
            RuntimeWarning,
            stacklevel=3,
        )
    mu = mu[:, :M]
    Nq = 2 * M
    t = torch.cos(math.pi * (torch.arange(Nq, dtype=torch.float64) + 0.5) / Nq).flip(0)
    c, h = 0.5 * (hi + lo), 0.5 * (hi - lo)
    nodes = (c + h * t).expand(P, Nq).clone()
    damped = _cheb_weights(mu * _jackson(M), t).clamp_min(0)
    damped = damped / damped.sum(1, keepdim=True)
    undamped = _cheb_weights(mu, t)
    return dict(
        nodes=nodes,
        weights=damped,
        trace_weights=undamped,
        num_steps=M,
        steps=torch.full((P,), M, dtype=torch.int64),
        bounds=(lo, hi),
        default_sigma=math.pi * (hi - lo) / (2 * M),
        chebyshev_moments=mu,
    )
