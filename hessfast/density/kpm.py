"""The kernel polynomial method: Chebyshev moments ``mu_k = u^T T_k(B) u`` of the rescaled
operator ``B = (A - c I)/h`` (spectrum in ``[-1, 1]``), Jackson damping, and the
Chebyshev-Gauss rules that turn the moments into a quadrature measure per probe.

The bounds ``[c - h, c + h]`` come from a short Lanczos run on the first probe; a Chebyshev
vector that grows past ``1 + KPM_GROWTH_TOL`` proves they miss part of the spectrum, and the
interval is doubled around its centre (at most three times).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..lanczos.probes import probe_lanczos
from ..results import Status

__all__ = ["cheb_series", "cheb_weights", "jackson", "kpm", "kpm_bounds"]

#: Lanczos steps used by KPM to bound the spectrum.
KPM_BOUND_STEPS = 10
#: KPM bounds are widened by this fraction of their width (on top of the Ritz residuals).
KPM_MARGIN = 0.01
#: A Chebyshev vector with ``||T_k(B) u|| > 1 + KPM_GROWTH_TOL`` proves that the bounds miss part
#: of the spectrum (for ``||u|| = 1`` and a spectrum in [-1, 1] the norm is <= 1).
KPM_GROWTH_TOL = 1e-2


def jackson(M: int) -> torch.Tensor:
    """Jackson damping factors ``g_k``, k = 0..M-1 (g_0 = 1):
    ``g_k = ((M - k + 1) cos(pi k/(M+1)) + sin(pi k/(M+1)) cot(pi/(M+1))) / (M+1)``."""
    k = torch.arange(M, dtype=torch.float64)
    a = math.pi / (M + 1)
    return ((M - k + 1) * torch.cos(a * k) + torch.sin(a * k) / math.tan(a)) / (M + 1)


def cheb_series(t: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``coef_0 + 2 sum_{k>=1} coef_k T_k(t)`` for ``t`` in [-1, 1] (shape of t)."""
    k = torch.arange(coef.numel(), dtype=torch.float64)
    T = torch.cos(k[None, :] * torch.arccos(t.clamp(-1, 1))[:, None])  # [len(t), M]
    c = coef.clone()
    c[1:] *= 2
    return T @ c


def cheb_weights(mu: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Chebyshev-Gauss weights ``w_pj = (1/N)(mu_p0 + 2 sum_k mu_pk T_k(t_j))`` for the N
    points ``t``: ``sum_j w_pj T_l(t_j) = mu_pl`` for ``l < M``. ``mu: [P, M]`` -> ``[P, N]``."""
    M = mu.shape[1]
    k = torch.arange(M, dtype=torch.float64)
    T = torch.cos(k[:, None] * torch.arccos(t)[None, :])  # [M, N]
    c = mu.clone()
    c[:, 1:] *= 2
    return (c @ T) / t.numel()


def kpm_bounds(
    products: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, bdtype: torch.dtype
) -> tuple[float, float]:
    """``[lo, hi]`` from a short Lanczos run on one probe: the Ritz intervals
    ``theta_j +- |beta_k s_{k,j}|`` (each holds an eigenvalue), widened by ``KPM_MARGIN`` of the
    width; a point spectrum gets a small interval around it."""
    n = z.shape[1]
    tri = probe_lanczos(products, z, min(n, KPM_BOUND_STEPS), reorth="full", basis_dtype=bdtype)
    theta, _, resid = tri.gauss(0)
    lo, hi = float((theta - resid).min()), float((theta + resid).max())
    width, scale = hi - lo, max(abs(lo), abs(hi))
    if width > 1e-8 * scale and width > 0:
        pad = KPM_MARGIN * width
    else:
        pad = 1e-3 * scale if scale > 0 else 1.0
    return lo - pad, hi + pad


def kpm(
    products: Callable[[torch.Tensor], torch.Tensor], Z: torch.Tensor, M: int, bdtype: torch.dtype
) -> dict[str, Any]:
    """KPM from the unit probes ``Z: [P, n]``: bounds, ``M`` Chebyshev moments per probe by
    the doubling identities, and the Jackson-damped and raw Chebyshev-Gauss weights; the
    fields of :class:`SpectralDensity` (``OUT_OF_BOUNDS`` when the bounds keep failing)."""
    P = Z.shape[0]
    lo, hi = kpm_bounds(products, Z[:1], bdtype)
    K = M // 2  # = ceil((M - 1) / 2) passes: mu_0..mu_{2K} cover indices 0..M-1
    status = Status.FIXED_BUDGET  # a fixed number of moments, no stopping test
    for _attempt in range(4):
        c, h = 0.5 * (hi + lo), 0.5 * (hi - lo)
        mu = torch.zeros((P, 2 * K + 1), dtype=torch.float64)
        mu[:, 0] = 1.0
        v_prev = Z
        v = Z
        grew = 0.0
        for k in range(1, K + 1):
            BV = (products(v) - c * v) / h
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
        status = Status.OUT_OF_BOUNDS
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
    damped = cheb_weights(mu * jackson(M), t).clamp_min(0)
    damped = damped / damped.sum(1, keepdim=True)
    undamped = cheb_weights(mu, t)
    return dict(
        nodes=nodes,
        weights=damped,
        trace_weights=undamped,
        num_steps=M,
        steps=torch.full((P,), M, dtype=torch.int64),
        bounds=(lo, hi),
        default_sigma=math.pi * (hi - lo) / (2 * M),
        chebyshev_moments=mu,
        status=status,
    )
