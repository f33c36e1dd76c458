"""The verification round's arithmetic (the method is described in :mod:`.restart`): how
wanted a value is, whether the current Ritz values beat the verified candidates, and how many
steps a round takes."""

from __future__ import annotations

import math

import torch

from .basis import select

__all__ = ["VERIFY_MARGIN", "VERIFY_MAX_ESCALATION", "VERIFY_MIN_STEPS", "beaten",
           "first_seen", "verify_steps"]

VERIFY_MARGIN = 1.5  # verification steps per step the run needed to see past the k-th value
VERIFY_MIN_STEPS = 2
VERIFY_MAX_ESCALATION = 3  # a round after misses is (1 + min(misses, 3)) times longer


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
