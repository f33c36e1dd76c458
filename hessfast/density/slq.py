"""Stochastic Lanczos quadrature: each probe's ``m``-point Gauss rule from its Lanczos
tridiagonal ``T_m = S diag(theta) S^T`` (nodes ``theta_j``, weights ``S[0, j]^2``). The
recurrences run in :func:`hessfast.lanczos.probes.probe_lanczos`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..lanczos.probes import probe_lanczos
from ..results import Status
from .result import slq_sigma

__all__ = ["slq"]


def slq(
    products: Callable[[torch.Tensor], torch.Tensor],
    Z: torch.Tensor,
    m: int,
    reorth: str,
    bdtype: torch.dtype,
) -> dict[str, Any]:
    """SLQ from the unit probes ``Z: [P, n]`` with ``m <= n`` steps: the fields of
    :class:`SpectralDensity` (nodes and weights ``[P, m]``, padded after a breakdown)."""
    P = Z.shape[0]
    tri = probe_lanczos(products, Z, m, reorth=reorth, basis_dtype=bdtype)
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
        default_sigma=slq_sigma(bounds, m),
        status=Status.CONVERGED,
    )
