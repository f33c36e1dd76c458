"""Result types shared by hessfast's algorithms: the :class:`Status` every result carries, and
the records of the stochastic estimators (:class:`TraceResult`, :class:`DiagonalResult`).

Every result has ``num_matvecs`` (vectors multiplied by the operator), ``num_passes``
(``matmat`` calls: passes over the data for a model operator), ``status`` (a :class:`Status`)
and ``converged`` (a ``bool``; :class:`~hessfast.EigshResult` has one per pair, a ``[k]`` bool
tensor). :class:`~hessfast.SpectralDensity` lives with its methods in
:mod:`hessfast.density`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from enum import Enum

import torch

from ._checks import check_level

__all__ = ["DiagonalResult", "Status", "TraceResult", "z_value"]


class Status(str, Enum):
    """How a computation ended. A ``str`` subclass: ``status == "CONVERGED"`` holds, and
    ``str(status)`` / f-strings give the bare name.

    - ``CONVERGED``: the stopping test was met (eigsh: every wanted pair; ``trace`` with
      ``rtol``: the confidence interval), or a run without a stopping test (a fixed budget of
      probes, a fixed number of Lanczos steps or Chebyshev moments) finished as asked.
    - ``EXACT``: the answer was computed exactly, not estimated (``trace``/``diagonal`` from
      the n unit vectors once the budget covers n).
    - ``MAX_MATVECS``: ``max_matvecs`` was spent before the stopping test was met; the
      partial result is returned with a warning.
    - ``INVARIANT_SUBSPACE``: the Krylov space was exhausted before the wanted pairs (eigsh).
    - ``NONFINITE``: a product contained NaN or Inf (eigsh's partial result).
    - ``OUT_OF_BOUNDS``: KPM's Chebyshev vectors kept growing after the spectral bounds were
      widened: part of the spectrum lies outside them (is the operator symmetric?), so the
      moments are unreliable.
    """

    CONVERGED = "CONVERGED"
    EXACT = "EXACT"
    MAX_MATVECS = "MAX_MATVECS"
    INVARIANT_SUBSPACE = "INVARIANT_SUBSPACE"
    NONFINITE = "NONFINITE"
    OUT_OF_BOUNDS = "OUT_OF_BOUNDS"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def z_value(level: float) -> float:
    """Two-sided standard normal quantile: ``P(|N(0,1)| <= z) = level``."""
    return statistics.NormalDist().inv_cdf(0.5 + 0.5 * level)


class _Estimate:
    """What the estimator results share beyond their fields."""

    status: Status

    @property
    def exact(self) -> bool:
        """Computed from the n unit vectors, not estimated (``status == EXACT``)."""
        return self.status is Status.EXACT


@dataclass(frozen=True)
class TraceResult(_Estimate):
    """Result of :func:`hessfast.trace`.

    Attributes:
        value: the trace estimate (float64 arithmetic).
        stderr: estimated standard error of ``value``; ``0.0`` when the result is exact
            (the budget covered n), ``inf`` when a single sample leaves it unknown.
        num_matvecs: products with A spent by this call.
        num_passes: ``matmat`` calls by this call (passes over the data).
        method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        seed: seed of the private generator that drew the probes.
        converged: ``True`` when no ``rtol`` was given, when the result is exact, or when the
            confidence half-width reached ``rtol * |value|`` with at least ``min_samples``
            samples; ``False`` when ``max_matvecs`` ran out first (a warning was issued).
        status: ``EXACT`` (from the n unit vectors), ``CONVERGED`` (the interval was met, or
            no ``rtol`` was given and the budget was spent as asked) or ``MAX_MATVECS``.
        seconds: wall time.
        num_samples: random probes behind ``stderr`` (Hutchinson samples; Hutch++'s
            deflated samples; XTrace's leave-one-out estimates); ``0`` for the exact path.
    """

    value: float
    stderr: float
    num_matvecs: int
    num_passes: int
    method: str
    seed: int
    converged: bool
    status: Status
    seconds: float
    num_samples: int = 0

    def confidence_interval(self, level: float = 0.95) -> tuple[float, float]:
        """Normal interval ``value -/+ z * stderr`` with ``P(|N(0,1)| <= z) = level``."""
        level = check_level("level", level, who="TraceResult.confidence_interval")
        half = z_value(level) * self.stderr if self.stderr > 0 else 0.0
        return (self.value - half, self.value + half)


@dataclass(frozen=True)
class DiagonalResult(_Estimate):
    """Result of :func:`hessfast.diagonal`.

    Attributes:
        values: ``[n]`` estimate of ``diag(A)`` (float64 for float64 operators, else
            float32), on ``A.device``.
        stderr: ``[n]`` per-entry standard error (zeros for the exact path; ``inf`` with a
            single sample).
        num_matvecs: products with A spent by this call.
        num_passes: ``matmat`` calls by this call.
        method: ``"hutchinson"`` or ``"xdiag"``.
        seed: seed of the private generator.
        converged: always ``True`` (a fixed budget, spent as asked, or the exact path).
        status: ``EXACT`` (from the n unit vectors) or ``CONVERGED``.
        by_param: for model operators (A has ``unflatten``), ``values`` split into tensors
            of the parameters' shapes keyed by parameter name (views of ``values``);
            ``None`` otherwise.
        seconds: wall time.
    """

    values: torch.Tensor
    stderr: torch.Tensor
    num_matvecs: int
    num_passes: int
    method: str
    seed: int
    converged: bool
    status: Status
    by_param: dict[str, torch.Tensor] | None = None
    seconds: float = 0.0
