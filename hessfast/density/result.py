"""The result of :func:`hessfast.spectral_density`: a quadrature measure per probe, and what
it answers (densities, traces of functions, moments, plots)."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .._checks import check_int, check_positive
from ..errors import ArgumentTypeError, ConfigurationError
from ..results import JsonResult, Status
from .kpm import cheb_series, jackson

__all__ = ["MIN_STEPS", "SpectralDensity", "few_steps_message", "slq_sigma"]

#: Fewer SLQ steps per probe than this (short of ``n``) do not resolve the quantities read
#: off the quadrature beyond its low moments: the density's shape, ``tr|A|`` (the effective
#: rank) and the mass below a threshold (the negative mass). The m-point Gauss rule is exact
#: for polynomials of degree <= 2m - 1 only (so ``trace`` and ``moments(p)``, p <= 2m - 1, are
#: exact per probe at any m), and |x| or a step at x = -t are not polynomials: their error falls
#: only as the Ritz values fill the spectrum. Measured (same 8/16 Rademacher probes at every m,
#: Hessian of the mean cross-entropy over 512 digits images, zero threshold 1e-3 ||H||):
#:
#:   m (steps)                 1     2     4     8    12    16    24    32    48    64   128
#:   CNN n=6,090, 8 probes (effective rank ± probe stderr ~1.0; negative mass):
#:     effective rank       5.41  5.41  5.43 14.46  7.31 10.84  8.63  8.79  8.57  8.81  8.44
#:     negative mass %      0.00  0.00  0.00 32.8  0.86  0.87 11.4   4.80  4.58  8.14  6.53
#:   MLP n=2,410, 16 probes (exact: effective rank 11.83, negative mass 8.30 %):
#:     effective rank       9.67  9.67  9.73 11.95 13.01 12.57 11.74 13.46 12.00 12.55 12.38
#:     negative mass %      0.00  0.00  0.00  5.23  6.37  5.69  3.25 23.3   5.67 10.7   9.56
#:
#: Below 8 steps no Ritz value reaches the small negative eigenvalues: tr|H| collapses to
#: tr(H) and the negative mass to 0. From 8 to 16 steps the effective rank is off by 10-70 %;
#: from 24 on it stays within about 15 % of the 128-step value (within 1-2 probe standard
#: errors). The negative mass, a step function next to the large mass at 0, still moves by a
#: factor of 2 at 64 steps: it is a rough figure at any step count.
MIN_STEPS = 24


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class SpectralDensity(JsonResult):
    """An estimate of the spectral density of a symmetric ``n x n`` operator.

    ``to_dict()`` / ``to_json(path=None)`` as on every result (:class:`JsonResult`; the
    ``[P, N]`` quadrature is small and always included), :meth:`from_dict` rebuilds it.

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
        steps_taken: ``[P]`` int64: Lanczos steps each probe took (SLQ; ``< num_steps`` after
            a breakdown, when the Gauss rule is exact), ``num_steps`` for KPM. (``steps``: its
            deprecated old name.)
        probe: ``"rademacher"``, ``"gaussian"`` or ``"given"`` (the rows of ``v0``).
        seed: the probes' seed.
        bounds: ``(lo, hi)``. SLQ: extreme Ritz values widened by their Ritz residuals
            ``|beta_m s_{m,j}|``. KPM: the interval mapped to ``[-1, 1]``.
        default_sigma: the Gaussian width :meth:`density` uses when ``sigma=None`` (SLQ;
            ``(hi - lo) / num_steps``, see :meth:`density`); for KPM the Jackson kernel's
            resolution ``pi (hi - lo) / (2 num_moments)`` (information only).
        chebyshev_moments: KPM only: ``[P, num_moments]`` float64 raw moments ``u^T T_k(B) u``.
        num_matvecs, num_passes: products and ``A.matmat`` calls (data passes) spent.
        status: ``FIXED_BUDGET`` (the steps or moments asked for were computed; there is no
            stopping test) or, for KPM, ``OUT_OF_BOUNDS`` (the Chebyshev vectors kept growing:
            unreliable moments, with a warning).
        converged: ``status != OUT_OF_BOUNDS``.
        seconds: wall time.
        resumed_from_step: SLQ with ``checkpoint=``: the step (one product each) the run
            resumed from; None when it started afresh.
        krylov: SLQ's memory mode: ``"full"`` (each probe's basis kept, ``reorth`` as
            given) or ``"lean"`` (the plain recurrence, probes streamed one at a time: a few
            vectors whatever the probes and steps, :mod:`hessfast.density.slq`); KPM
            reports ``"lean"`` (it keeps no basis).
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    trace_weights: torch.Tensor
    method: str
    n: int
    num_steps: int
    steps_taken: torch.Tensor
    probe: str
    seed: int
    bounds: tuple[float, float]
    default_sigma: float
    num_matvecs: int
    num_passes: int
    status: Status
    converged: bool
    seconds: float
    chebyshev_moments: torch.Tensor | None = None
    resumed_from_step: int | None = None
    krylov: str = "full"

    _REPR_FIELDS: ClassVar[tuple[str, ...]] = (
        "method", "n", "num_probes", "num_steps", "bounds", "status", "num_passes",
        "num_matvecs", "seconds")

    # -- basic properties -------------------------------------------------------------------
    @property
    def num_probes(self) -> int:
        """Number of probes ``P``."""
        return int(self.nodes.shape[0])

    @property
    def steps(self) -> torch.Tensor:
        """Deprecated name of :attr:`steps_taken` (removed in the next release)."""
        warnings.warn(
            "SpectralDensity.steps is deprecated and will be removed in the next release: "
            "use SpectralDensity.steps_taken (num_steps is the int asked for)",
            DeprecationWarning, stacklevel=2,
        )
        return self.steps_taken

    @property
    def resolved(self) -> bool:
        """False for an SLQ run with fewer than :data:`MIN_STEPS` Lanczos steps per probe
        whose Krylov spaces were not exhausted (``num_steps < n`` and some probe took all its
        steps): its ``trace(torch.abs)``, its mass below a threshold and its smoothed density
        are not resolved (:func:`few_steps_message` says why and the fix). True for KPM, whose
        resolution is its Jackson kernel's (``default_sigma``)."""
        if self.method != "slq" or self.num_steps >= min(MIN_STEPS, self.n):
            return True
        return not bool((self.steps_taken >= self.num_steps).any())

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
            return self.default_sigma if self.method == "slq" else slq_sigma(
                self.bounds, max(1, self.num_steps // 2)
            )
        return check_positive("sigma", sigma, who="SpectralDensity")

    def _kpm_density(self, x: torch.Tensor) -> torch.Tensor:
        assert self.chebyshev_moments is not None
        lo, hi = self.bounds
        h = 0.5 * (hi - lo)
        M = self.chebyshev_moments.shape[1]
        coef = jackson(M) * self.chebyshev_moments.mean(0)
        # normaliser: integral of the clipped expansion over [lo, hi] by Chebyshev-Gauss
        Nq = max(4 * M, 1024)
        tq = torch.cos(math.pi * (torch.arange(Nq, dtype=torch.float64) + 0.5) / Nq)
        Z = float(cheb_series(tq, coef).clamp_min(0).mean())
        # 1 - t^2 = (1 + t)(1 - t) from the distances to the bounds, so that the endpoints
        # (where the Chebyshev weight is singular) are exactly outside, never 1 - t^2 = 1e-16
        up, down = (x - lo) / h, (hi - x) / h
        inside = (up > 0) & (down > 0)
        out = torch.zeros_like(x)
        ui, di = up[inside], down[inside]
        s = cheb_series(ui - 1, coef).clamp_min(0)
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
        p = check_int("p", p, 0)
        out = self.trace(lambda x: x**p, per_probe=per_probe)
        return out / self.n

    # -- serialisation ----------------------------------------------------------------------
    # to_dict / to_json: JsonResult's (float64 values round-trip exactly through json)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpectralDensity:
        """Inverse of :meth:`to_dict` (also accepts the output of ``json.loads``, and the
        dicts of earlier versions, which called ``steps_taken`` ``steps``)."""
        if not isinstance(d, dict):
            raise ArgumentTypeError(
                f"SpectralDensity.from_dict: expected a dict from to_dict(), got {type(d).__name__}"
            )
        if "steps_taken" not in d and "steps" in d:  # written before 0.2
            d = {**d, "steps_taken": d["steps"]}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in d
                   and f.name not in ("chebyshev_moments", "resumed_from_step", "krylov")]
        if missing:
            raise ConfigurationError(
                f"SpectralDensity.from_dict: missing fields {missing}; pass the dict that "
                "SpectralDensity.to_dict() produced"
            )
        f64 = torch.float64
        cheb = d.get("chebyshev_moments")
        return cls(
            nodes=torch.tensor(d["nodes"], dtype=f64),
            weights=torch.tensor(d["weights"], dtype=f64),
            trace_weights=torch.tensor(d["trace_weights"], dtype=f64),
            method=str(d["method"]), n=int(d["n"]), num_steps=int(d["num_steps"]),
            steps_taken=torch.tensor(d["steps_taken"], dtype=torch.int64),
            probe=str(d["probe"]),
            seed=int(d["seed"]), bounds=(float(d["bounds"][0]), float(d["bounds"][1])),
            default_sigma=float(d["default_sigma"]), num_matvecs=int(d["num_matvecs"]),
            num_passes=int(d["num_passes"]), status=Status(d["status"]),
            converged=bool(d["converged"]), seconds=float(d["seconds"]),
            chebyshev_moments=None if cheb is None else torch.tensor(cheb, dtype=f64),
            resumed_from_step=(None if d.get("resumed_from_step") is None
                               else int(d["resumed_from_step"])),
            krylov=str(d.get("krylov", "full")),
        )

    # -- plotting -----------------------------------------------------------------------------
    def plot(
        self,
        ax: Any = None,
        grid: Any = None,
        log: bool = True,
        sigma: float | None = None,
        *,
        floor: float = 1e-6,
        ritz: bool = True,
        path: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> Any:
        """Plot the density on ``ax`` (a new pyplot figure when None) and return the
        :class:`matplotlib.figure.Figure` (``fig.axes`` holds the axes), as every ``plot()``
        of hessfast does; with ``path``, the figure is also saved there (format from the
        suffix).

        ``grid`` defaults to 1000 points over ``bounds`` widened by 5 sigma. ``log=True`` (the
        default) uses a logarithmic y axis down to ``floor`` times the peak, so the outliers
        (a few eigenvalues of weight ~1/n far from the bulk, which a linear axis flattens to
        zero) stay visible next to the spike at 0. The Gaussian smoothing width is in the
        legend. ``ritz=True`` also marks every quadrature node (Ritz value) with positive
        weight as a tick at the bottom, and the largest and smallest with triangles: the
        extreme eigenvalue estimates that the smoothed curve can hide. Needs matplotlib
        (imported here only); extra ``kwargs`` go to ``ax.plot`` of the curve.
        """
        try:
            import matplotlib.pyplot as plt
            from matplotlib.transforms import blended_transform_factory
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "SpectralDensity.plot needs matplotlib, which is not installed: "
                "pip install matplotlib (the rest of hessfast works without it)"
            ) from exc
        floor = check_positive("floor", floor, who="SpectralDensity.plot")
        smoothed = self.method == "slq" or sigma is not None
        s = self._sigma(sigma) if smoothed else None
        if grid is None:
            lo, hi = self.bounds
            pad = 5 * s if s is not None else 0.0
            if hi - lo <= 0 and pad <= 0:
                pad = max(abs(lo), 1.0) * 1e-3
            grid = torch.linspace(lo - pad, hi + pad, 1000, dtype=torch.float64)
        x = _as_grid(grid)
        rho = self.density(x, sigma)
        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4))
        label = kwargs.pop("label", None)
        if label is None:
            label = (f"smoothed density (Gaussian width σ = {s:.3g})" if s is not None
                     else "density (Jackson-damped Chebyshev series)")
        ys = rho
        if log:
            peak = float(rho.max()) if rho.numel() else 1.0
            lowest = max(peak * floor, 1e-300)
            # below the floor: not drawn (a flat line there would look like a measurement)
            ys = torch.where(rho >= lowest, rho, torch.full_like(rho, math.nan))
            ax.set_yscale("log")
            ax.set_ylim(lowest, max(peak, lowest) * 3)
        ax.plot(x.numpy(), ys.numpy(), label=label, **kwargs)
        if ritz:
            keep = self.weights > 0
            nodes = self.nodes[keep].numpy()
            tr = blended_transform_factory(ax.transData, ax.transAxes)
            ax.plot(nodes, [0.015] * len(nodes), "|", color="0.35", ms=8, alpha=0.5,
                    transform=tr, label="quadrature nodes (Ritz values)")
            if len(nodes):
                top, bottom = float(nodes.max()), float(nodes.min())
                ax.plot([top], [0.06], "v", color="C3", ms=8, transform=tr,
                        label=f"largest Ritz value {top:.4g}")
                ax.plot([bottom], [0.06], "^", color="C0", ms=8, transform=tr,
                        label=f"smallest Ritz value {bottom:.4g}")
        ax.set_xlabel("eigenvalue λ")
        ax.set_ylabel("spectral density (per unit λ)")
        how = "stochastic Lanczos quadrature" if self.method == "slq" else "kernel polynomial"
        ax.set_title(f"Estimated eigenvalue distribution of a {self.n:,}-dimensional operator\n"
                     f"({how}, {self.num_probes} random probes)", fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
        fig = ax.get_figure()
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path)
        return fig



def few_steps_message(num_steps: int, n: int, who: str = "spectral_density") -> str:
    """The warning of an SLQ density with fewer than :data:`MIN_STEPS` steps per probe
    (:attr:`SpectralDensity.resolved` False): what is not resolved, and the fix.

    Args:
        num_steps: the Lanczos steps per probe that ran.
        n: the operator's size.
        who: the function named in the message.
    """
    fix = min(MIN_STEPS, n)
    return (
        f"hessfast: {who}: {num_steps} Lanczos step(s) per probe give a quadrature exact only "
        f"for polynomials of degree <= {2 * num_steps - 1}; the density's shape, tr|A| (the "
        "effective rank) and the negative mass are not resolved by so few steps (on small "
        "CNN/MLP Hessians they were off by 10-70 %, the negative mass read as 0 below 8 "
        f"steps). Use num_steps >= {fix} (hessfast analyze --num-steps {fix}); the trace "
        "is exact per probe at any step count"
    )


def _as_grid(grid: Any) -> torch.Tensor:
    x = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    if x.dim() != 1:
        x = x.reshape(-1)
    return x


def slq_sigma(bounds: tuple[float, float], m: int) -> float:
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

