"""Conditioning of a symmetric operator: extreme eigenvalues, definiteness, negative
curvature and the stable learning rate 2/(s lambda_max), s the curvature the optimizer sees
over the operator's (:func:`lr_curvature_scale`: N or the batch size for a sum-reduced loss).

What each number needs: ``kappa``, ``definiteness``, ``negative_ratio`` and ``stable_lr`` need
only the two extreme eigenvalues (one ``eigsh`` run each, or values the caller already has:
``lambda_max=``, ``lambda_min=``). Only ``negative_mass`` needs a spectral density: computed
on request (``density=True``), or read from one the caller already has (``density=<a
SpectralDensity>``, no products).

A singular operator (a GGN with more parameters than outputs x samples) has a smallest
eigenvalue of exactly zero, which the residual test of ``eigsh`` (``tol`` relative to
``1e-3 ||A||``) may never meet in float32. The smallest end is therefore searched in stages
(``SINGULAR_STAGE`` products, then doubling, each warm-started from the last Ritz vector);
after each stage the Ritz value ``theta`` and residual ``r`` decide early: an eigenvalue lies
in ``[theta - r, theta + r]``, so ``|theta| + r <= zero_threshold`` shows a (numerically) zero
eigenvalue at the bottom of what Lanczos found; for an operator known to be positive
semi-definite (``psd``), ``0 <= lambda_min <= theta`` already, so ``theta <= zero_threshold``
suffices. Either way the result is ``"singular"`` with ``kappa = inf`` and one warning.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

from ._checks import as_operator, check_int, check_positive, check_seed, shift_seed
from ._probe import probe_operator
from .density import spectral_density
from .errors import ArgumentTypeError, ConfigurationError
from .lanczos.verify import residual_floor
from .linop import LinearOperator
from .progress import set_total, track
from .results import JsonResult, Status
from .spectrum import EigshResult, eigsh

__all__ = ["SINGULAR_STAGE", "ConditionResult", "LrScale", "Smallest", "condition_number",
           "lr_curvature_scale", "smallest_eigenvalue", "zero_threshold"]

#: products of the first stage of the smallest-eigenvalue search before the singular check
SINGULAR_STAGE = 48


@dataclass(frozen=True)
class LrScale:
    """How the curvature an optimizer sees relates to the operator's.

    A curvature operator is the Hessian (or GGN) of the MEAN loss over its samples, whatever
    ``loss_fn``'s reduction. An optimizer differentiates ``loss_fn`` itself: for a
    sum-reduced loss that is the sum over the samples of its step, whose curvature is
    ``samples x`` the mean-loss curvature. Every comparison with a learning rate multiplies
    the operator's eigenvalues by ``scale`` (the eigenvalues themselves keep the operator's
    scale).

    Attributes:
        scale: the optimizer's curvature over the operator's (1.0 for a mean-reduced loss).
        samples: the samples of one optimizer step's loss, when that decided ``scale``.
        reason: how ``scale`` was decided, in words (shown in reports).
    """

    scale: float
    samples: int | None
    reason: str


def lr_curvature_scale(A: Any, lr_scale: float | None = None, *, full_batch: bool = False,
                       who: str = "hessfast") -> LrScale:
    """The factor between the curvature an optimizer sees and the operator ``A``'s.

    Args:
        A: the operator; a curvature operator records ``loss_reduction`` and its batches.
        lr_scale: given explicitly: used as it is (a number > 0). For a sum-reduced loss it
            is the number of samples in the loss one optimizer step differentiates (the batch
            size for minibatch steps, all N samples for full-batch steps).
        full_batch: the optimizer steps on the loss over ALL of ``A``'s data at once (the
            model of :class:`~hessfast.analysis.tracking.SharpnessTracker`): a sum-reduced
            loss gives ``N``. Otherwise one optimizer step per batch of the data is assumed:
            one batch gives ``N``, several give the largest batch size (the step on the
            largest batch is the least stable; uneven batches are named in ``reason``).
        who: the public function asking, named in the error message of a bad ``lr_scale``.

    Defaults: a mean-reduced loss (or an operator that does not say how its loss reduces,
    e.g. a plain :class:`~hessfast.linop.LinearOperator`) gives 1.0.

    Raises:
        ConfigurationError: ``lr_scale`` not a finite number > 0.
    """
    if lr_scale is not None:
        lr_scale = check_positive("lr_scale", lr_scale, who=who)
        return LrScale(lr_scale, None, f"lr_scale={lr_scale:g} given: the optimizer sees "
                                       f"{lr_scale:g} x the operator's curvature")
    reduction = getattr(A, "loss_reduction", None)
    if reduction is None:
        return LrScale(1.0, None, "the operator does not record a loss reduction: its "
                                  "curvature is taken as the optimizer's (pass lr_scale= "
                                  "otherwise)")
    if reduction != "sum":
        return LrScale(1.0, None, f"{reduction}-reduced loss: the optimizer sees the mean-loss "
                                  "curvature (the operator's)")
    total = int(getattr(A, "num_samples", 0) or 0)
    sizes = [int(s) for s in getattr(A, "batch_sizes", ()) if s > 0]
    if full_batch or len(sizes) <= 1 or total <= 0:
        how = ("full-batch steps over all" if full_batch or len(sizes) > 1
               else "one batch holding all")
        return LrScale(float(total), total, f"sum-reduced loss, {how} {total} samples: the "
                                            f"optimizer sees {total} x the mean-loss curvature "
                                            "(pass lr_scale= otherwise)")
    big = max(sizes)
    uneven = "" if min(sizes) == big else (
        f"; batches are uneven ({min(sizes)} to {big}): the largest is used")
    return LrScale(float(big), big, f"sum-reduced loss, one optimizer step per batch of {big} "
                                    f"samples: the optimizer sees {big} x the mean-loss "
                                    f"curvature{uneven} (full-batch steps over all {total}: "
                                    f"pass lr_scale={total})")


@dataclass(frozen=True, repr=False, kw_only=True)
class ConditionResult(JsonResult):
    """Conditioning of a symmetric operator.

    Attributes:
        lambda_max, lambda_min: extreme eigenvalues (``eigsh`` LA and SA, or the values
            given). For a singular operator found early, ``lambda_min`` is the last Ritz
            value: within ``zero_threshold`` of zero (an upper bound on the true one).
        kappa: ``lambda_max / lambda_min`` when the operator is positive definite (lambda_min
            above the zero threshold), else ``inf``.
        definiteness: ``"positive definite"``, ``"singular"`` (|lambda_min| at or below the
            zero threshold ``tol * max(|lambda_max|, |lambda_min|)``, never below the
            residual floor :func:`zero_threshold`) or ``"indefinite"``.
        negative_ratio: ``|lambda_min| / lambda_max`` for an indefinite operator (how strong
            the negative curvature is against the positive), else 0.
        negative_mass: fraction of the spectrum below ``-zero_threshold``, from an SLQ
            density (indefinite operators with ``density`` True or given; else None).
        stable_lr: ``2 / (lr_curvature_scale * lambda_max)``: gradient descent on the loss the
            optimizer differentiates diverges along the top eigenvector with a larger step
            size (inf when lambda_max <= 0).
        lr_curvature_scale, lr_curvature_scale_reason: the factor between the curvature the
            optimizer sees and ``A``'s (N or the batch size for a sum-reduced loss, 1 for a
            mean; :func:`lr_curvature_scale`), and how it was decided.
        converged: lambda_max converged, and lambda_min converged or was shown to be within
            the zero threshold (``singular_early``).
        status: ``CONVERGED`` when ``converged`` (a singular operator recognised early
            included), else ``MAX_MATVECS`` (an extreme's budget ran out; eigsh warned).
        num_matvecs, num_passes, seconds: total cost of this call: products, ``matmat``
            calls (data passes) and wall time (reused values cost nothing).
        singular_early: the smallest-end search stopped early on a singular operator.

    ``to_dict()`` / ``to_json(path=None)`` as on every result (:class:`JsonResult`;
    ``kappa`` may be ``inf``).
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
    status: Status
    num_matvecs: int
    num_passes: int
    seconds: float
    singular_early: bool = False
    lr_curvature_scale: float = 1.0
    lr_curvature_scale_reason: str = ""


def condition_number(
    A: LinearOperator,
    *,
    tol: float = 1e-4,
    max_matvecs: int | None = None,
    density: Any = False,
    num_probes: int = 8,
    num_steps: int = 64,
    seed: int = 0,
    lambda_max: float | EigshResult | None = None,
    lambda_min: float | EigshResult | None = None,
    psd: bool | None = None,
    lr_scale: float | None = None,
    progress: bool | None = None,
) -> ConditionResult:
    """Condition number, definiteness and the stable learning rate of a symmetric operator.

    For a PSD operator (a GGN) ``kappa = lambda_max / lambda_min``; a Hessian is usually
    indefinite, and then ``kappa = inf`` and the result reports the negative curvature:
    ``lambda_min < 0``, ``|lambda_min| / lambda_max`` and, on request, the mass of the
    spectrum below zero. A singular operator is recognised early (module docstring). The
    bottom of a network's spectrum is a tight cluster near zero, so ``lambda_min`` may need
    many products; raise ``max_matvecs`` or ``tol`` if it does not converge (``converged``
    says so, with a warning from ``eigsh``).

    Args:
        A: symmetric operator ``[n, n]``.
        tol: eigsh's relative residual tolerance; also the zero threshold's factor.
        max_matvecs: budget of each extreme's eigsh run (default eigsh's, 1000).
        density: ``False`` (default: extremes only, no ``negative_mass``); ``True``: an SLQ
            density of ``num_probes x num_steps`` products for an indefinite operator; or a
            :class:`~hessfast.SpectralDensity` of A already computed (reused, no products).
        num_probes: probes of the SLQ density (``density=True`` only).
        num_steps: Lanczos steps per probe of the SLQ density (``density=True`` only).
        seed: seed of the private generators of eigsh's random starts and of the density's
            probes (the global RNG is not touched).
        lambda_max: reuse: the largest eigenvalue as a float, or an ``eigsh`` result with
            ``which`` ``"LA"`` or ``"BE"`` (its largest value; its convergence is kept).
        lambda_min: reuse: the smallest eigenvalue, a float or an ``"SA"``/``"BE"`` result.
        psd: A is known positive semi-definite (the singular shortcut above). None: True for
            a GGN operator (``ggn``: PSD for a convex criterion; pass False for another).
        lr_scale: the curvature the optimizer sees over A's, for ``stable_lr`` only. Default:
            :func:`lr_curvature_scale` (1 for a mean-reduced loss; for a sum-reduced one the
            samples of one step: N for one batch, the largest batch for several). Pass it
            when the steps differ (full-batch steps over several batches: ``lr_scale=N``).
        progress: a progress bar of products on stderr; None: when stderr is a terminal.

    Raises:
        ConfigurationError: a bad argument, named (e.g. a reused result of another size).
    """
    with track(A, "condition_number", enabled=progress):
        t0 = time.perf_counter()
        who = "hessfast.condition_number"
        A = as_operator(A, who, allow_empty=False)
        n = A.shape[0]
        tol = check_positive("tol", tol, who=who)
        if max_matvecs is not None:
            max_matvecs = check_int("max_matvecs", max_matvecs, 1, who=who)
        budget = max_matvecs if max_matvecs is not None else 1000
        if not isinstance(density, bool) and not _is_density(density):
            raise ConfigurationError(
                f"{who}: density must be True or False, or a SpectralDensity of A to reuse; got "
                f"{type(density).__name__}"
            )
        if _is_density(density) and int(density.n) != n:
            raise ConfigurationError(
                f"{who}: the density given is of an operator of size {density.n}, A has n={n}; "
                "pass the density computed on A"
            )
        num_probes = check_int("num_probes", num_probes, 1, who=who)
        num_steps = check_int("num_steps", num_steps, 1, who=who)
        seed = check_seed(seed, who=who)
        lrs = lr_curvature_scale(A, lr_scale, who=who)
        top = _known("lambda_max", lambda_max, ("LA", "BE"), n, who)
        bottom = _known("lambda_min", lambda_min, ("SA", "BE"), n, who)
        if psd is None:
            psd = getattr(A, "kind", None) == "GGN"
        elif not isinstance(psd, bool):
            raise ArgumentTypeError(f"{who}: psd must be True, False or None, got {psd!r}")
        set_total((top is None) * budget + (bottom is None) * budget
                  + (density is True) * num_probes * min(num_steps, n))
        if top is None or bottom is None:
            probe_operator(A, who)  # once, before counting: the result counts the algorithm's
        mv0, p0 = A.num_matvecs, A.num_passes
        if top is None:
            r = eigsh(A, k=1, which="LA", tol=tol, max_matvecs=max_matvecs, seed=seed)
            top = (float(r.eigenvalues[0]), bool(r.converged.all()))
        lmax, top_ok = top
        early = False
        if bottom is None:
            low = smallest_eigenvalue(A, lmax, tol, budget, shift_seed(seed, 1), psd, who)
            lmin, bottom_ok, early = low.value, low.converged, low.singular_early
        else:
            lmin, bottom_ok = bottom
        zero = zero_threshold(tol, max(abs(lmax), abs(lmin)), A.dtype)
        if early or -zero <= lmin <= zero:
            definiteness, kappa = "singular", math.inf
        elif lmin > zero:
            definiteness, kappa = "positive definite", lmax / lmin
        else:
            definiteness, kappa = "indefinite", math.inf
        neg_ratio = abs(lmin) / lmax if definiteness == "indefinite" and lmax > 0 else 0.0
        neg_mass = None
        if definiteness == "indefinite" and density is not False:
            d = density
            if density is True:
                d = spectral_density(A, num_probes=num_probes, num_steps=num_steps, seed=seed)
            neg_mass = float((d.weights * (d.nodes < -zero)).sum(dim=1).mean())
        return ConditionResult(
            lambda_max=lmax, lambda_min=lmin, kappa=kappa, definiteness=definiteness,
            negative_ratio=neg_ratio, negative_mass=neg_mass,
            stable_lr=2.0 / (lrs.scale * lmax) if lmax > 0 else math.inf, zero_threshold=zero,
            converged=bool(top_ok and bottom_ok),
            status=Status.CONVERGED if top_ok and bottom_ok else Status.MAX_MATVECS,
            num_matvecs=A.num_matvecs - mv0, num_passes=A.num_passes - p0,
            seconds=time.perf_counter() - t0, singular_early=early,
            lr_curvature_scale=lrs.scale, lr_curvature_scale_reason=lrs.reason,
        )


def zero_threshold(tol: float, norm: float, dtype: Any) -> float:
    """Eigenvalues within this of zero count as zero: ``tol * norm`` (``norm`` the largest
    |eigenvalue| known), never below the residual floor of the working precision
    (:func:`hessfast.lanczos.verify.residual_floor`): a Ritz value that close to zero cannot
    be told from zero by the arithmetic."""
    return max(tol * norm, residual_floor(norm, dtype))


def _is_density(d: Any) -> bool:
    return not isinstance(d, bool) and all(hasattr(d, a) for a in ("nodes", "weights", "n"))


def _known(
    name: str, value: Any, whiches: tuple[str, ...], n: int, who: str
) -> tuple[float, bool] | None:
    """A reused extreme as ``(value, converged)``, or None when not given."""
    if value is None:
        return None
    if isinstance(value, EigshResult):
        if value.which not in whiches:
            raise ConfigurationError(
                f"{who}: {name} from an eigsh result needs which in {whiches}, got "
                f"which={value.which!r}: that run does not hold this end of the spectrum"
            )
        if value.eigenvectors.shape[-1] != n:
            raise ConfigurationError(
                f"{who}: the {name} result is of an operator of size "
                f"{value.eigenvectors.shape[-1]}, A has n={n}; pass the result computed on A"
            )
        vals = value.eigenvalues
        i = int(vals.argmax()) if name == "lambda_max" else int(vals.argmin())
        return float(vals[i]), bool(value.converged[i])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
        value
    ):
        raise ConfigurationError(
            f"{who}: {name} must be a finite float or an EigshResult, got {value!r}"
        )
    return float(value), True


@dataclass(frozen=True)
class Smallest:
    """The smallest-eigenvalue search's answer: the Ritz ``value`` and its ``residual``,
    whether it ``converged`` (or was found singular), ``singular_early``, and the
    ``num_matvecs`` it spent."""

    value: float
    residual: float
    converged: bool
    singular_early: bool
    num_matvecs: int


def smallest_eigenvalue(
    A: LinearOperator, lmax: float, tol: float, budget: int, seed: int, psd: bool, who: str,
    *, warn: bool = True,
) -> Smallest:
    """lambda_min by staged SA eigsh runs that stop early on a singular operator (the module
    docstring); ``warn``: one warning when it stops early (the report states it instead)."""
    zero = zero_threshold(tol, abs(lmax), A.dtype)
    used, stage, v0 = 0, min(SINGULAR_STAGE, budget), None
    while True:
        last = used + stage >= budget
        with warnings.catch_warnings():
            if not last:  # an intermediate stage ends short of convergence by design
                warnings.simplefilter("ignore")
            r = eigsh(A, k=1, which="SA", tol=tol, max_matvecs=stage, seed=seed, v0=v0)
        used += r.num_matvecs
        theta, res = float(r.eigenvalues[0]), float(r.residuals[0])
        if r.status == "CONVERGED" or bool(r.converged.all()):
            return Smallest(theta, res, True, False, used)
        if theta <= zero if psd else abs(theta) + res <= zero:
            if warn:
                warnings.warn(
                    f"{who}: A is singular: its smallest eigenvalue is within the zero "
                    f"threshold {zero:.3g} (tol * lambda_max): Ritz value {theta:.3g}, "
                    f"residual {res:.3g}{' (A is PSD)' if psd else ''} after {used} products, "
                    "so kappa = inf. Stopped there instead of converging a zero eigenvalue",
                    stacklevel=3,
                )
            return Smallest(theta, res, True, True, used)
        if last or used >= budget:
            return Smallest(theta, res, False, False, used)
        v0 = r.eigenvectors
        stage = min(2 * stage, budget - used)
