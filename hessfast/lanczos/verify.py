"""The verification round's arithmetic (the method is described in :mod:`.restart`): how
wanted a value is, whether the current Ritz values beat the verified candidates, and how many
steps a round takes; and the residual floor every convergence decision uses.

Residual floor. A residual from the Lanczos relation (``||L^T y||``) or any other formula can
fall far below what the returned pair shows when ``||A v - theta v||`` is recomputed: the
vector is stored in the working dtype (rounding ``v`` alone moves the residual by about
``eps ||A||``) and every product ``A v`` is rounded (measured: a float64 eigsh reported
3.0e-18 where the recomputation gives 2.0e-15 with ``||A|| ~ 1``). So every reported residual
is ``max(computed, RESIDUAL_FLOOR_C * eps * ||A||_est)`` (:func:`residual_floor`), ``eps`` of
the working dtype (float64 for a float64 operator, else float32), and every decision that
compares a residual with a tolerance uses :func:`converge_threshold`, never below the floor.
``RESIDUAL_FLOOR_C = 64``, a constant measured rather than ``sqrt(n)``: over converged eigsh
pairs of the prescribed spectra (evenly spaced, geometric, clustered, Wishart, decaying,
n = 40..1000, which LA/SA) the recomputed ``||A v - theta v|| / (eps ||A||)`` reached 3.2,
6.9, 8.7 and 35 at n = 40, 100, 400 and 1000 in float32 (35: the clustered spectrum, whose
Lanczos relation said 0); 64 keeps a factor ~2 above that. A ``sqrt(n)`` floor would follow
the n-term sums of a dense product, but a network's product does not sum over its n
parameters, and ``sqrt(1e8) eps`` in float32 (1.2e-3 ||A||) would overrule every tolerance.
Dense operators far above n ~ 4000 can round past the floor (an adversarial rank-one matrix
with equal-magnitude entries rounds like ``n eps / 13``); bf16/fp16 operators and a bf16
basis round more than float32 and are not covered by it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .basis import select

__all__ = ["RESIDUAL_FLOOR_C", "VERIFY_MARGIN", "VERIFY_MAX_ESCALATION", "VERIFY_MIN_STEPS",
           "ZERO_SCALE", "beaten", "converge_threshold", "converged", "first_seen",
           "residual_floor", "verify_steps"]

VERIFY_MARGIN = 1.5  # verification steps per step the run needed to see past the k-th value
VERIFY_MIN_STEPS = 2
VERIFY_MAX_ESCALATION = 3  # a round after misses is (1 + min(misses, 3)) times longer
#: c of the residual floor ``c * eps * ||A||_est`` (module docstring: measured, not sqrt(n))
RESIDUAL_FLOOR_C = 64.0
#: convergence scale floor relative to ||A||_est: lets a zero eigenvalue converge
ZERO_SCALE = 1e-3


def residual_floor(norm_est: float, dtype: torch.dtype) -> float:
    """The smallest residual the arithmetic can show: ``RESIDUAL_FLOOR_C * eps * norm_est``,
    ``eps`` of the working dtype of an operator of ``dtype`` (float64 for float64, else
    float32), ``norm_est`` an estimate of ``||A||`` (0 for the zero operator: floor 0)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return RESIDUAL_FLOOR_C * torch.finfo(work).eps * max(float(norm_est), 0.0)


def operator_floor(A: Any, norm_est: float) -> float:
    """The smallest residual a run on ``A`` can show: the working precision's
    (:func:`residual_floor`) or the products' own error times ``||A||_est``
    (:attr:`~hessfast.LinearOperator.product_error` of a finite-difference operator, read
    each time: it may be measured with the first product), the larger."""
    err = getattr(A, "product_error", None) or 0.0
    return max(residual_floor(norm_est, A.dtype), float(err) * norm_est)


def converge_threshold(vals: torch.Tensor, tol: float, norm_est: float, floor: float
                       ) -> torch.Tensor:
    """The residual each value must reach to converge: ``max(tol * max(|theta|, 1e-3
    ||A||_est), floor)`` (``vals [m]`` float64). Below the floor no residual can be shown,
    so a pair whose floored residual is at the floor is converged as far as the working
    precision allows."""
    return torch.clamp(tol * torch.clamp(vals.abs(), min=ZERO_SCALE * norm_est), min=floor)


def converged(theta: float | torch.Tensor, residuals: float | torch.Tensor, tol: float,
              norm_est: float, dtype: torch.dtype, floor: float = 0.0
              ) -> bool | torch.Tensor:
    """THE convergence rule of every eigenvalue solver (eigsh's Lanczos and dense paths,
    power iteration, the per-layer lockstep Lanczos): a Ritz pair ``(theta, v)`` is converged
    when ``||A v - theta v|| <= max(tol * max(|theta|, 1e-3 ||A||_est), residual_floor)``.

    ``1e-3 ||A||_est`` (:data:`ZERO_SCALE`) lets an eigenvalue near zero converge; the floor
    (:func:`residual_floor` of ``norm_est`` and the operator's ``dtype``) is the smallest
    residual the working precision can show, so the rule never asks for less.

    Args:
        theta: a Ritz value (float) or values ``[m]`` (float64 tensor).
        residuals: their residual norms, same shape (as reported: already floored).
        tol: relative tolerance.
        norm_est: the estimate of ``||A||`` both the scale and the floor use.
        dtype: the operator's dtype (picks ``eps`` of the floor).
        floor: a higher floor when the products themselves are inexact (the lean run's
            ``product_error * ||A||_est`` of a finite-difference operator); 0: none.

    Returns:
        a ``bool`` for a float ``theta``, else a ``[m]`` bool tensor.
    """
    floor = max(residual_floor(norm_est, dtype), float(floor))
    vals = torch.as_tensor(theta, dtype=torch.float64)
    ok = torch.as_tensor(residuals, dtype=torch.float64) <= converge_threshold(
        vals, tol, norm_est, floor)
    return ok if isinstance(theta, torch.Tensor) else bool(ok)


def score(vals: torch.Tensor, which: str) -> torch.Tensor:
    """How wanted each value is at its position of a ``select`` order (larger = more)."""
    if which == "LA":
        return vals
    if which == "SA":
        return -vals
    if which == "LM":
        return vals.abs()
    sign = torch.ones_like(vals)
    sign[1::2] = -1.0  # BE: high, low, high, ...
    return vals * sign


def beaten(theta: torch.Tensor, k: int, which: str, ref: torch.Tensor, slack: torch.Tensor
            ) -> bool:
    """Whether the k most wanted of ``theta`` beat the verified values ``ref [k]`` anywhere
    by more than ``slack [k]`` (both in ``select`` order)."""
    cur = theta[select(theta, k, which)]
    if cur.numel() < ref.numel():
        return False
    return bool((score(cur, which) > score(ref, which) + slack).any())


def first_seen(extremes: list[tuple[float, float]], ref: torch.Tensor, slack: torch.Tensor,
                which: str) -> int:
    """Steps the run needed before its most wanted Ritz value first beat the k-th candidate
    by more than its slack (0 where a group has a single candidate); ``extremes`` holds
    each step's (max, min) Ritz values. For ``BE`` the high and low halves count apart."""
    if which == "BE":
        groups = [("LA", ref[0::2], slack[0::2]), ("SA", ref[1::2], slack[1::2])]
    else:
        groups = [(which, ref, slack)]
    worst = 0
    for w, vals, sl in groups:
        if vals.numel() < 2:
            continue
        last, tol = float(vals[-1]), float(sl[-1])
        for t, (hi, lo) in enumerate(extremes, start=1):
            best = {"LA": hi - last, "SA": last - lo, "LM": max(abs(hi), abs(lo)) - abs(last)}
            if best[w] > tol:
                worst = max(worst, t)
                break
        else:
            worst = max(worst, len(extremes))
    return worst




def verify_steps(k: int, seen: int, misses: int) -> int:
    """Block steps of a verification round: ``max(2, ceil(VERIFY_MARGIN * seen))`` (one for
    k = 1), times ``1 + min(misses, VERIFY_MAX_ESCALATION)`` after rounds that found misses."""
    least = VERIFY_MIN_STEPS if k > 1 else 1
    return max(least, math.ceil(VERIFY_MARGIN * seen)) * (1 + min(misses, VERIFY_MAX_ESCALATION))
