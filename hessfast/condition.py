"""Conditioning of a symmetric operator: extreme eigenvalues, definiteness, negative
curvature and the stable learning rate 2/lambda_max."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ._checks import as_operator, check_int, check_positive, check_seed
from ._probe import probe_operator
from .errors import ConfigurationError
from .linop import LinearOperator
from .spectrum import eigsh

__all__ = ["ConditionResult", "condition_number"]


@dataclass(frozen=True)
class ConditionResult:
    """Conditioning of a symmetric operator.

    Attributes:
        lambda_max, lambda_min: extreme eigenvalues (``eigsh`` LA and SA).
        kappa: ``lambda_max / lambda_min`` when the operator is positive definite (lambda_min
            above the zero threshold), else ``inf``.
        definiteness: ``"positive definite"``, ``"singular"`` (|lambda_min| at or below the
            zero threshold ``tol * max(|lambda_max|, |lambda_min|)``) or ``"indefinite"``.
        negative_ratio: ``|lambda_min| / lambda_max`` for an indefinite operator (how strong
            the negative curvature is against the positive), else 0.
        negative_mass: fraction of the spectrum below ``-zero_threshold``, from an SLQ
            density (indefinite operators only; None otherwise or when ``density=False``).
        stable_lr: ``2 / lambda_max``: gradient descent with a larger step size diverges along
            the top eigenvector (inf when lambda_max <= 0).
        converged: both extreme eigenpairs converged.
        num_matvecs, seconds: total cost.
    """

    lambda_max: float
    lambda_min: float
    kappa: float
    definiteness: str
    negative_ratio: float
    negative_mass: float | None
    stable_lr: float
    zero_threshold: float
    converged: bool
    num_matvecs: int
    seconds: float


def condition_number(
    A: LinearOperator,
    *,
    tol: float = 1e-4,
    max_matvecs: int | None = None,
    density: bool = True,
    num_probes: int = 8,
    num_steps: int = 64,
    seed: int = 0,
) -> ConditionResult:
    """Condition number, definiteness and the stable learning rate of a symmetric operator.

    For a PSD operator (a GGN) ``kappa = lambda_max / lambda_min``; a Hessian is usually
    indefinite, and then ``kappa = inf`` and the result reports the negative curvature:
    ``lambda_min < 0``, ``|lambda_min| / lambda_max`` and the mass of the spectrum below zero
    from an SLQ density. The bottom of a network's spectrum is a tight cluster near zero, so
    ``lambda_min`` may need many products; raise ``max_matvecs`` or ``tol`` if it does not
    converge (``converged`` says so, with a warning from ``eigsh``).
    """
    t0 = time.perf_counter()
    who = "hessfast.condition_number"
    A = as_operator(A, who, allow_empty=False)
    tol = check_positive("tol", tol, who=who)
    if max_matvecs is not None:
        max_matvecs = check_int("max_matvecs", max_matvecs, 1, who=who)
    if not isinstance(density, bool):
        raise ConfigurationError(f"{who}: density must be True or False, got {density!r}")
    num_probes = check_int("num_probes", num_probes, 1, who=who)
    num_steps = check_int("num_steps", num_steps, 1, who=who)
    seed = check_seed(seed, who=who)
    probe_operator(A, who)  # once, before counting: the result counts the algorithm's products
    mv0 = A.num_matvecs
    top = eigsh(A, k=1, which="LA", tol=tol, max_matvecs=max_matvecs, seed=seed)
    seed2 = seed + 1 if seed < 2**64 - 1 else seed - 1  # the SA run's own start
    bottom = eigsh(A, k=1, which="SA", tol=tol, max_matvecs=max_matvecs, seed=seed2)
    lmax, lmin = float(top.eigenvalues[0]), float(bottom.eigenvalues[0])
    zero = tol * max(abs(lmax), abs(lmin))
    if lmin > zero:
        definiteness, kappa = "positive definite", lmax / lmin
    elif lmin >= -zero:
        definiteness, kappa = "singular", math.inf
    else:
        definiteness, kappa = "indefinite", math.inf
    neg_ratio = abs(lmin) / lmax if definiteness == "indefinite" and lmax > 0 else 0.0
    neg_mass = None
    if definiteness == "indefinite" and density:
        from .density import spectral_density

        d = spectral_density(A, num_probes=num_probes, num_steps=num_steps, seed=seed)
        neg_mass = float((d.weights * (d.nodes < -zero)).sum(dim=1).mean())
    return ConditionResult(
        lambda_max=lmax, lambda_min=lmin, kappa=kappa, definiteness=definiteness,
        negative_ratio=neg_ratio, negative_mass=neg_mass,
        stable_lr=2.0 / lmax if lmax > 0 else math.inf, zero_threshold=zero,
        converged=bool(top.converged.all() and bottom.converged.all()),
        num_matvecs=A.num_matvecs - mv0, seconds=time.perf_counter() - t0,
    )
