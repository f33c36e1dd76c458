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

Modules: :mod:`.api` (the entry point :func:`spectral_density`, :func:`draw_probes`),
:mod:`.slq` (Gauss rules; the probe Lanczos runs in :mod:`hessfast.lanczos.probes`),
:mod:`.kpm` (Chebyshev moments, bounds, Jackson damping), :mod:`.result`
(:class:`SpectralDensity`: densities, traces, moments, plots).
"""

from __future__ import annotations

from .api import METHODS, draw_probes, spectral_density
from .result import MIN_STEPS, SpectralDensity

__all__ = ["METHODS", "MIN_STEPS", "SpectralDensity", "draw_probes", "spectral_density"]
