"""The one-time check of a generic operator before an algorithm uses it: is it symmetric, and
does it give the same product twice?

Every algorithm (``eigsh``, ``lambda_max``, ``power_iteration``, ``condition_number``,
``trace``, ``diagonal``, ``spectral_density``) calls :func:`probe_operator` after validating
its arguments and before its first product. An operator is probed once: afterwards
``A.checked`` is True and later calls cost nothing. Not probed:

* ``LinearOperator.from_matrix`` operators (the matrix was checked symmetric, or the user
  waived it with ``check_symmetric=False``);
* ``LinearOperator.from_function(..., check=False)``, or any operator with
  ``A.checked = True`` set by its owner;
* operators whose class sets ``checks_itself = True`` because they run their own pre-flight:
  the model operators of :mod:`hessfast.curvature` (pre-flight ``check=True``; the user's
  ``check=False`` is respected too).

The probe: two random vectors ``X = [u; v]`` (``[2, n]``, standard normal, from a private
generator: the global RNG is untouched) multiplied twice, ``Y1 = A X`` and ``Y2 = A X``:
``PROBE_MATVECS = 4`` products in 2 ``matmat`` calls. They count in the operator's own
``A.num_matvecs`` / ``A.num_passes``; a result's ``num_matvecs`` counts the algorithm's
products only.

* determinism: ``||Y1 - Y2|| <= tol ||Y1||``;
* symmetry: ``|u.(Av) - v.(Au)| <= tol (||u|| ||Av|| + ||v|| ||Au||) / sqrt(n)`` (the dot
  products of random vectors are ``~1/sqrt(n)`` of the product of the norms, and so is their
  rounding);

with ``tol = PROBE_SLACK * eps * sqrt(n)``: ``eps`` of the operator's dtype (for float32,
that of TF32/bf16 when ``torch.get_float32_matmul_precision()`` lowers matmuls to them), and
``sqrt(n)`` the growth of rounding in a sum of n terms. Both tests are scale-invariant. What it
catches: an asymmetric part above ``~tol`` of the operator in the Frobenius norm (e.g.
``S + 1e-2 N``: found at any n in float64, up to n ~ 1e6 in float32), and random products
(noise, dropout, sampling) above ``~tol`` relative.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import AsymmetricOperatorError, NonDeterministicError, NonFiniteError

__all__ = ["PROBE_MATVECS", "PROBE_SLACK", "probe_operator"]

#: Products one probe costs (two vectors, multiplied twice).
PROBE_MATVECS = 4
#: Rounding allowance in units of ``eps * sqrt(n)``.
PROBE_SLACK = 16.0
_PROBE_SEED = 20261201
# float32 matmul precision below "highest": TF32 (10 explicit mantissa bits) or bf16 (7)
_LOWERED_EPS = {"high": 2.0**-10, "medium": 2.0**-7}
_FIX = (
    "if this is intended (rounding of a lower-precision computation), skip the check with "
    "LinearOperator.from_function(..., check=False) or by setting A.checked = True"
)


def _skip(A: Any) -> bool:
    # model operators (hessfast.curvature) set checks_itself: they run their own pre-flight
    return bool(getattr(A, "checked", False) or getattr(type(A), "checks_itself", False))


def _mark(A: Any) -> None:
    try:
        A.checked = True
    except AttributeError:  # a duck-typed operator that refuses attributes: probed each time
        pass


def rounding_eps(dtype: torch.dtype) -> float:
    """The unit roundoff the operator's products are computed with."""
    eps = torch.finfo(dtype).eps
    if dtype == torch.float32:
        eps = max(eps, _LOWERED_EPS.get(torch.get_float32_matmul_precision(), 0.0))
    return float(eps)


def probe_operator(A: Any, who: str) -> None:
    """Check once that ``A`` is symmetric and deterministic (module docstring).

    Raises:
        NonDeterministicError: two products of the same vectors differ beyond rounding.
        AsymmetricOperatorError: ``u.(Av)`` and ``v.(Au)`` differ beyond rounding.
        NonFiniteError: a probe product contains NaN or Inf.
    """
    n = int(A.shape[0])
    if _skip(A) or n == 0:
        return
    gen = torch.Generator(device="cpu").manual_seed(_PROBE_SEED)
    X = torch.randn((2, n), dtype=torch.float64, generator=gen)
    X = X.to(device=A.device, dtype=A.dtype)
    with torch.no_grad():
        Y1 = A.matmat(X)
        Y2 = A.matmat(X)
    x, y1, y2 = (t.detach().to(device="cpu", dtype=torch.float64) for t in (X, Y1, Y2))
    if not bool(torch.isfinite(y1).all() and torch.isfinite(y2).all()):
        raise NonFiniteError(
            f"{who}: the operator returned NaN or Inf for random vectors (the one-time check "
            "of a new operator, before any computation); check the operator function"
        )
    tol = PROBE_SLACK * rounding_eps(A.dtype) * math.sqrt(n)
    diff, size = float((y1 - y2).norm()), float(y1.norm())
    if diff > tol * size:
        raise NonDeterministicError(
            f"{who}: the operator is not deterministic: two products of the same 2 random "
            f"vectors differ by {diff / size:.3g} relative (||A x - A x|| / ||A x||; rounding "
            f"allows {tol:.3g}). Every hessfast algorithm needs the same product for the same "
            "vector (random noise, dropout, sampling or a random sketch inside the operator "
            "break convergence and error bars): make the operator deterministic (fix its "
            f"seed); {_FIX}"
        )
    u, v = x
    Au, Av = y1
    mismatch = abs(float(u @ Av) - float(v @ Au))
    scale = (float(u.norm() * Av.norm()) + float(v.norm() * Au.norm())) / math.sqrt(n)
    if mismatch > tol * scale:
        raise AsymmetricOperatorError(
            f"{who}: the operator is not symmetric: |u.(Av) - v.(Au)| = {mismatch:.3g} for "
            f"random u, v, {mismatch / scale:.3g} of the scale (||u|| ||Av|| + ||v|| ||Au||) "
            f"/ sqrt(n) where rounding allows {tol:.3g}. hessfast's algorithms need a "
            "symmetric operator (an asymmetric one gives wrong eigenvalues that still look "
            f"converged): symmetrize it, e.g. (A v + A^T v) / 2; {_FIX}"
        )
    _mark(A)
