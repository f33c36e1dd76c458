""":func:`analyze`: one call from a model to a :class:`~hessfast.analysis.report.Report` of its
curvature, built from the existing algorithms (``eigsh``, ``spectral_density``, ``trace``,
``block_spectra``), each part's cost and source recorded. One helper per part, called in
order by :func:`analyze`: :func:`_build_operator`, :func:`_top_k`, :func:`_lambda_min`,
:func:`_density`, :func:`_trace`, :func:`_per_layer`."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch

from .._checks import (
    as_operator,
    check_choice,
    check_int,
    check_positive,
    check_seed,
    shift_seed,
)
from .._version import __version__
from ..condition import (
    SINGULAR_STAGE,
    LrScale,
    Smallest,
    lr_curvature_scale,
    smallest_eigenvalue,
    zero_threshold,
)
from ..curvature import GGNOperator, HessianOperator, ggn, hessian
from ..density import MIN_STEPS, SpectralDensity, spectral_density
from ..errors import ArgumentTypeError, ConfigurationError
from ..estimators import trace as hutch
from ..estimators.session import renamed_arg
from ..linop import LinearOperator
from ..progress import track
from ..spectrum import EigshResult, default_block_size, eigsh
from .blocks import block_spectra
from .provenance import describe_operator, provenance
from .report import Report
from .tracking import fold_start

__all__ = ["analyze"]

WHO = "hessfast.analyze"
CURVATURES = ("hessian", "ggn")
#: The SLQ trace is kept when its standard error is at most this fraction of |trace|.
TRACE_RTOL = 0.1
#: analyze's own keywords (an unknown keyword is compared with these and the operator's).
_OWN = ("curvature", "k", "num_probes", "num_steps", "per_layer", "groups", "tol", "seed", "lr",
        "lr_scale", "progress", "v0")


def analyze(
    model: Any,
    loss_fn: Callable | None = None,
    data: Any = None,
    *,
    curvature: str = "hessian",
    k: int = 5,
    num_probes: int = 8,
    num_steps: int = 64,
    per_layer: bool = True,
    groups: Any = "modules",
    tol: float = 1e-3,
    seed: int = 0,
    lr: float | None = None,
    lr_scale: float | None = None,
    progress: bool | None = None,
    v0: torch.Tensor | None = None,
    probes: int | None = None,
    steps: int | None = None,
    **operator_kwargs: Any,
) -> Report:
    """The curvature report of a model: extreme eigenvalues, trace, density, definiteness,
    stable learning rate, effective rank and per-layer spectra, with the cost of each part.

    Parts, in order (each one's products, data passes, seconds and source in ``parts``):

    * ``operator``: ``hf.hessian(model, loss_fn, data, **operator_kwargs)`` (or ``hf.ggn``):
      the pre-flight checks (skipped when an operator is given).
    * ``top_k``: ``eigsh(H, k, which="LA", tol)``: lambda_max, the top-k eigenvalues and
      their residuals.
    * ``lambda_min``: ``eigsh(H, 1, which="SA", tol)`` in stages (``hf.condition_number``'s
      search), at most ``max(300, 4 num_steps)`` products: a singular operator (a GGN with
      more parameters than outputs x samples; its zero eigenvalue may never meet the residual
      test) is recognised after the first stage of 48 products instead of spending the
      budget; a GGN is taken as PSD (a convex criterion). The residual says how good it is.
    * ``density``: SLQ ``spectral_density(H, num_probes, num_steps)``. The same run gives the
      trace (each probe's ``n u^T H u`` is exact from its Lanczos coefficients: Hutchinson on
      the density's probes), the negative mass (quadrature weight below ``-zero_threshold``)
      and ``tr|H|`` for the effective rank, at no extra products.
    * ``trace`` (only when ``num_probes < 8`` or the density's standard error exceeds
      ``0.1 |trace|``): an extra ``hf.trace(H, max_matvecs=max(30, 3 num_probes))``
      (Hutch++); the estimate with the smaller standard error (or the exact one: Hutch++ with
      ``n <= max_matvecs``) is reported, the part says which.
    * ``per_layer`` (``per_layer=True``): ``block_spectra(H, groups, tol, num_probes=max(2,
      num_probes))``: lambda_max and trace of every group's diagonal block, the groups
      sharing data passes.

    Definiteness: with ``zero = tol * max(|lambda_max|, |lambda_min|)`` and ``r`` the
    residual of lambda_min, ``lambda_min > zero + r``: positive definite (``condition =
    lambda_max / lambda_min``); ``|lambda_min| <= zero + r``: positive semi-definite
    (singular to tolerance); ``lambda_min < -(zero + r)``: indefinite (``lambda_max <=
    zero``: negative semi-definite). ``condition`` is None unless positive definite.

    Why ``tol`` defaults to 1e-3 here and to 1e-4 in the solvers (``eigsh``, ``lambda_max``,
    ``power_iteration``, ``condition_number``): a report surveys many quantities at once
    (top-k, lambda_min, per-layer blocks) and prints every residual next to its value, so a
    looser stop that costs fewer products is visible where it matters; a solver is a single
    precise call whose caller usually reads the value alone. Pass ``tol=1e-4`` for the
    solvers' precision.

    Args:
        model: an ``nn.Module``; or an already-built operator (``hf.hessian(...)``,
            ``hf.ggn(...)`` or any symmetric :class:`~hessfast.linop.LinearOperator`
            ``[n, n]``), with ``loss_fn``, ``data`` and ``operator_kwargs`` omitted.
        loss_fn: the loss, as for :func:`hessfast.hessian` (a criterion
            ``loss_fn(outputs, targets)`` or ``loss_fn(model, batch)``); omitted for a given
            operator.
        data: one batch or a sequence of batches, as for :func:`hessfast.hessian`; omitted
            for a given operator.
        curvature: ``"hessian"`` or ``"ggn"`` (ignored for a given operator).
        k: number of top eigenvalues, ``1 <= k <= n``.
        num_probes: SLQ probes (>= 1), the name of :func:`hessfast.spectral_density`.
        num_steps: Lanczos steps per SLQ probe (>= 1), the name of
            :func:`hessfast.spectral_density`.
        per_layer: also compute the per-group spectra.
        groups: parameter groups for ``per_layer`` (see
            :func:`hessfast.analysis.blocks.param_groups`); a plain LinearOperator without
            parameter names needs explicit coordinate lists, else ``per_layer`` is skipped
            (the part says so).
        tol: relative residual tolerance of the eigenvalues, and the zero threshold's scale
            (1e-3: see above).
        seed: seed of the private generators (the global RNG is not touched).
        lr: the training learning rate, if known: the report compares the curvature the
            optimizer sees, ``lr_curvature_scale * lambda_max``, with ``2 / lr`` and the plot
            marks it.
        lr_scale: the curvature the optimizer sees over the operator's, for ``lr`` and
            ``stable_lr`` (the eigenvalues keep the operator's scale: the Hessian of the MEAN
            loss). Default (:func:`hessfast.condition.lr_curvature_scale`): 1 for a
            mean-reduced loss; for a sum-reduced loss (``H.loss_reduction == "sum"``) the
            samples of one optimizer step, taken as one step per batch of ``data``: N for a
            single batch, the largest batch size for several (uneven batches are named in
            the report). Pass it when your steps differ, e.g. ``lr_scale=N`` for full-batch
            steps on a sum over several batches, or the batch size you train with. The
            report says which scale it used (``lr_curvature_scale``, its reason, a summary
            line).
        progress: progress bars per part (``hessfast.progress.track``; None: automatic).
        v0: a warm start for ``top_k``: ``[j, n]`` vectors, typically the previous report's
            :attr:`~hessfast.analysis.report.Report.top_eigenvectors` at nearby weights (a
            checkpoint earlier in training). They are folded into the block size as
            :class:`~hessfast.analysis.tracking.SharpnessTracker` folds its previous vectors
            (row ``i`` sums vectors ``i, i+b, ...``); the ``top_k`` part records
            ``"warm": True``. Only the products change: the residual test is the same.
        probes: deprecated name of ``num_probes`` (DeprecationWarning; removed next release).
        steps: deprecated name of ``num_steps`` (DeprecationWarning; removed next release).
        operator_kwargs: passed to ``hf.hessian`` / ``hf.ggn`` (``params=``, ``causal_lm=``,
            ``hvp_mode=``, ``bn_mode=`` ...); a keyword neither analyze nor they take is
            refused by analyze, naming the close ones.

    Returns:
        :class:`~hessfast.analysis.report.Report` (JSON-safe fields).

    Raises:
        ConfigurationError: a bad argument (named in the message); whatever building the
        operator raises (see :func:`hessfast.hessian`).
        ArgumentTypeError: a keyword that neither analyze nor the operator takes.
    """
    num_probes = renamed_arg(num_probes, probes, "num_probes", "probes", WHO, default=8)
    num_steps = renamed_arg(num_steps, steps, "num_steps", "steps", WHO, default=64)
    k = check_int("k", k, 1, who=WHO)
    num_probes = check_int("num_probes", num_probes, 1, who=WHO)
    num_steps = check_int("num_steps", num_steps, 1, who=WHO)
    tol = check_positive("tol", tol, who=WHO)
    seed = check_seed(seed, who=WHO)
    if not isinstance(per_layer, bool):
        raise ConfigurationError(f"{WHO}: per_layer must be True or False, got {per_layer!r}")
    if lr is not None:
        lr = check_positive("lr", lr, who=WHO)
    if lr_scale is not None:
        lr_scale = check_positive("lr_scale", lr_scale, who=WHO)
    parts: list[dict[str, Any]] = []

    H, kind = _build_operator(model, loss_fn, data, curvature, operator_kwargs, parts)
    n = int(H.shape[0])
    lrs = lr_curvature_scale(H, lr_scale, who=WHO)
    if k > n:
        raise ConfigurationError(f"{WHO}: k must be <= n = {n} (the operator's size), got {k}")
    top = _top_k(H, k, tol, seed, progress, parts, _start(v0, H, k))
    lmax = float(top.eigenvalues[0])
    bottom = _lambda_min(H, lmax, tol, seed, num_steps, kind == "GGN", progress, parts)
    lmin, rmin = bottom.value, bottom.residual
    zero = zero_threshold(tol, max(abs(lmax), abs(lmin)), H.dtype)
    definiteness, condition, note = _definiteness(lmax, lmin, rmin, zero)
    d, spectrum = _density(H, num_probes, num_steps, seed, zero, max(abs(lmax), abs(lmin)),
                           progress, parts)
    tr, tr_err = _trace(H, num_probes, seed, spectrum.trace, spectrum.trace_stderr, progress,
                        parts)
    layers = _per_layer(H, groups, tol, num_probes, seed, progress, parts) if per_layer else None
    report = _report(H, kind, n, top, bottom, lmax, lmin, tr, tr_err, condition, definiteness,
                     note, zero, spectrum, d, layers, parts, lrs, lr, lr_scale,
                     settings=dict(k=k, num_probes=num_probes, num_steps=num_steps, tol=tol,
                                   seed=seed, lr_scale=lr_scale, per_layer=per_layer,
                                   groups=_name(groups)))
    report.provenance = provenance(H, kind, loss_fn, operator_kwargs)
    report.top_eigenvectors = top.eigenvectors
    return report


# -- the parts, in order ----------------------------------------------------------------------
def _build_operator(model: Any, loss_fn: Any, data: Any, curvature: str,
                    operator_kwargs: dict[str, Any], parts: list[dict[str, Any]]
                    ) -> tuple[LinearOperator, str]:
    """The operator and its kind (``"Hessian"``, ``"GGN"`` or ``"operator"``): the one given,
    or ``hf.hessian``/``hf.ggn`` built here (part ``operator``)."""
    if isinstance(model, LinearOperator) or (
        hasattr(model, "matmat") and not isinstance(model, torch.nn.Module)
    ):
        if loss_fn is not None or data is not None or operator_kwargs:
            raise ConfigurationError(
                f"{WHO}: got an operator as the first argument together with loss_fn, data or "
                "operator options; pass either analyze(model, loss_fn, data, ...) or "
                "analyze(H, ...) with an operator already built"
            )
        H = as_operator(model, WHO, allow_empty=False)
        if isinstance(H, HessianOperator):
            return H, "Hessian"
        return H, "GGN" if isinstance(H, GGNOperator) else "operator"
    check_choice("curvature", curvature, CURVATURES, who=WHO)
    if data is None:
        raise ConfigurationError(
            f"{WHO}: data is required: analyze(model, loss_fn, data) with one batch "
            "(inputs, targets) or a re-iterable sequence of batches"
        )
    build = hessian if curvature == "hessian" else ggn
    _check_operator_kwargs(build, curvature, operator_kwargs)
    t0 = time.perf_counter()
    H = build(model, loss_fn, data, **operator_kwargs)
    parts.append(_part("operator", [], H.num_matvecs, H.num_passes, t0,
                       f"hf.{curvature}(...): pre-flight checks (finiteness, determinism, "
                       "symmetry) and the product plan"))
    return H, "Hessian" if curvature == "hessian" else "GGN"


def _check_operator_kwargs(build: Callable, curvature: str, kwargs: dict[str, Any]) -> None:
    """Refuse, naming analyze, a keyword that neither analyze nor ``build`` takes (it would
    otherwise surface as ``hessian() got an unexpected keyword argument``)."""
    sig = inspect.signature(build)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    options = [p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = [key for key in kwargs if key not in options]
    if not unknown:
        return
    near = sorted({m for key in unknown
                   for m in difflib.get_close_matches(key, [*_OWN, *options], n=2)})
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    raise ArgumentTypeError(
        f"{WHO}: unknown keyword argument{'s' if len(unknown) > 1 else ''} "
        f"{', '.join(repr(key) for key in unknown)}.{hint} analyze takes {', '.join(_OWN)}, "
        f"and passes hf.{curvature}'s options: {', '.join(options)}"
    )


def _start(v0: Any, H: LinearOperator, k: int) -> tuple[torch.Tensor, int] | None:
    """``(start rows, block size)`` of a warm start ``v0`` (``[j, n]`` or ``[n]``), or None."""
    if v0 is None:
        return None
    n = int(H.shape[0])
    if not isinstance(v0, torch.Tensor) or v0.dim() not in (1, 2) or v0.shape[-1] != n:
        got = tuple(v0.shape) if isinstance(v0, torch.Tensor) else type(v0).__name__
        raise ConfigurationError(
            f"{WHO}: v0 must be a tensor [j, n] with n = {n} (the operator's size), e.g. the "
            f"previous report's top_eigenvectors, got {got}; pass v0=None for a cold start")
    if not bool(torch.isfinite(v0).all()):
        raise ConfigurationError(f"{WHO}: v0 holds non-finite values; pass v0=None for a "
                                 "cold start")
    b = default_block_size(H, k)
    rows = fold_start(v0.reshape(-1, n), b).to(device=H.device, dtype=H.dtype)
    return rows, b


def _top_k(H: LinearOperator, k: int, tol: float, seed: int, progress: bool | None,
           parts: list[dict[str, Any]], start: tuple[torch.Tensor, int] | None = None
           ) -> EigshResult:
    """Part ``top_k``: lambda_max, the top-k eigenvalues and their residuals (from the warm
    ``start`` rows and block size when given)."""
    warm = dict(v0=start[0], block_size=start[1]) if start is not None else {}
    with _Part(H, "top_k", progress) as p:
        top = eigsh(H, k, which="LA", tol=tol, seed=seed, **warm)
    part = p.record(["lambda_max", "top_eigenvalues", "stable_lr"],
                    f"eigsh(k={k}, which='LA', tol={tol:g}"
                    f"{', warm v0' if start is not None else ''}): {top.method}, {top.status}")
    part["warm"] = start is not None
    parts.append(part)
    return top


def _lambda_min(H: LinearOperator, lmax: float, tol: float, seed: int, num_steps: int,
                psd: bool, progress: bool | None, parts: list[dict[str, Any]]) -> Smallest:
    """Part ``lambda_min``: condition_number's staged search (``psd``: a GGN of a convex
    criterion, lambda_min >= 0)."""
    budget = max(300, 4 * num_steps)
    with _Part(H, "lambda_min", progress) as p:
        bottom = smallest_eigenvalue(H, lmax, tol, budget, shift_seed(seed, 1), psd, WHO,
                                     warn=False)
    how = ("stopped early: singular (Ritz value within the zero threshold"
           f"{', the GGN is PSD' if psd else ' by more than its residual'})"
           if bottom.singular_early else ("CONVERGED" if bottom.converged else "MAX_MATVECS"))
    parts.append(p.record(["lambda_min", "definiteness", "condition"],
                          f"eigsh(k=1, which='SA', tol={tol:g}) in stages of "
                          f"{SINGULAR_STAGE}, 2x, ... up to {budget} products "
                          f"(hf.condition_number's search): {how}"))
    return bottom


@dataclass(frozen=True)
class _Spectrum:
    """What the density's probes give for free."""

    trace: float
    trace_stderr: float
    negative_mass: float
    effective_rank: float
    unresolved: dict[str, str]


def _density(H: LinearOperator, num_probes: int, num_steps: int, seed: int, zero: float,
             norm: float, progress: bool | None, parts: list[dict[str, Any]]
             ) -> tuple[SpectralDensity, _Spectrum]:
    """Part ``density``: SLQ, and the trace, negative mass and effective rank of its
    quadrature (``norm = max(|lambda_max|, |lambda_min|)``)."""
    n = int(H.shape[0])
    with _Part(H, "density", progress) as p:
        d = spectral_density(H, num_probes=num_probes, num_steps=num_steps, seed=seed)
    tr, tr_err = d.trace(lambda x: x), d.trace_stderr(lambda x: x)
    neg = float((d.weights * (d.nodes < -zero)).sum(dim=1).mean())
    erank = d.trace(torch.abs) / norm if norm > 0 else 0.0
    unresolved = {} if d.resolved else {
        q: f"{min(num_steps, n)} Lanczos steps per probe are too few for the density's shape, "
           f"the effective rank and the negative mass; use num_steps >= {min(MIN_STEPS, n)}"
           f" (hessfast analyze --num-steps {min(MIN_STEPS, n)})"
        for q in ("density", "effective_rank", "negative_mass")}
    parts.append(p.record(
        ["density", "trace", "negative_mass", "effective_rank"],
        f"SLQ, {num_probes} Rademacher probes x {min(num_steps, n)} Lanczos steps; trace = mean "
        "of the probes' n u^T H u (exact per probe), negative mass = quadrature weight below "
        "-zero_threshold, tr|H| by the same quadrature"))
    return d, _Spectrum(tr, tr_err, neg, erank, unresolved)


def _trace(H: LinearOperator, num_probes: int, seed: int, tr: float, tr_err: float,
           progress: bool | None, parts: list[dict[str, Any]]) -> tuple[float, float]:
    """Part ``trace`` (only when the density's trace is too rough): Hutch++, reported when
    its stderr is smaller (the density part then drops ``trace`` from its quantities)."""
    if not (num_probes < 8 or not math.isfinite(tr_err) or tr_err > TRACE_RTOL * abs(tr)):
        return tr, tr_err
    m = max(30, 3 * num_probes)
    with _Part(H, "trace", progress) as p:
        t = hutch(H, max_matvecs=m, method="hutch++", seed=shift_seed(seed, 2))
    use = t.exact or not math.isfinite(tr_err) or t.stderr < tr_err
    why = (f"the density's {num_probes} probes gave {tr:.6g} ± {tr_err:.3g}; hutch++ with "
           f"max_matvecs={m} gave {t.value:.6g} ± {t.stderr:.3g} ({t.status}); reported: "
           + ("hutch++" if use else "the density's (smaller stderr)"))
    parts.append(p.record(["trace"] if use else [], why))
    if not use:
        return tr, tr_err
    parts[-2]["quantities"].remove("trace")
    return t.value, t.stderr


def _per_layer(H: LinearOperator, groups: Any, tol: float, num_probes: int, seed: int,
               progress: bool | None, parts: list[dict[str, Any]]
               ) -> list[dict[str, Any]] | None:
    """Part ``per_layer``: every group's block spectrum from shared passes (skipped, and the
    part says why, for an operator without parameter names and ``groups="modules"``)."""
    if groups == "modules" and not getattr(H, "param_names", None):
        parts.append(dict(name="per_layer", quantities=[], num_matvecs=0, num_passes=0,
                          seconds=0.0, source="skipped: a plain LinearOperator has no "
                          "parameter names; pass groups= as coordinate lists"))
        return None
    with _Part(H, "per_layer", False) as p:  # block_spectra tracks its own progress
        bs = block_spectra(H, groups, tol=tol, num_probes=max(2, num_probes),
                           seed=seed, progress=progress)
    layers = bs.to_dict()["groups"]
    parts.append(p.record(["per_layer"], f"block_spectra(groups={_name(groups)}, "
                          f"num_probes={max(2, num_probes)}): {len(layers)} groups, all "
                          "sharing each data pass (masked vectors of the full operator)"))
    return layers


def _report(H: LinearOperator, kind: str, n: int, top: EigshResult, bottom: Smallest,
            lmax: float, lmin: float, tr: float, tr_err: float, condition: float | None,
            definiteness: str, note: str, zero: float, spectrum: _Spectrum,
            d: SpectralDensity, layers: list[dict[str, Any]] | None,
            parts: list[dict[str, Any]], lrs: LrScale, lr: float | None,
            lr_scale: float | None, settings: dict[str, Any]) -> Report:
    """The :class:`Report` of the parts' numbers."""
    density = d.to_dict()
    del density["kind"]  # a dict of the density's fields, as Report.density documents
    return Report(
        curvature=kind, n=n, operator=describe_operator(H),
        lambda_max=lmax, lambda_max_residual=float(top.residuals[0]),
        top_eigenvalues=top.eigenvalues.tolist(), top_residuals=top.residuals.tolist(),
        top_converged=bool(top.converged.all()),
        lambda_min=lmin, lambda_min_residual=bottom.residual,
        lambda_min_converged=bottom.converged,
        trace=tr, trace_stderr=tr_err, condition=condition, definiteness=definiteness,
        condition_note=note, zero_threshold=zero, negative_mass=spectrum.negative_mass,
        stable_lr=2.0 / (lrs.scale * lmax) if lmax > 0 else None,
        effective_rank=spectrum.effective_rank,
        effective_rank_definition="tr|H| / max(|lambda_max|, |lambda_min|), tr|H| from the "
        "SLQ quadrature (= tr(H) / lambda_max for a PSD operator)",
        density={**density, "sigma": d.default_sigma}, per_layer=layers, parts=parts,
        unresolved=spectrum.unresolved,
        settings=settings,
        lr=lr, lr_curvature_scale=lrs.scale, lr_curvature_scale_reason=lrs.reason,
        residual_floor=top.residual_floor, hessfast_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _definiteness(lmax: float, lmin: float, rmin: float, zero: float
                  ) -> tuple[str, float | None, str]:
    """(definiteness, condition or None, explanation) from the extreme eigenvalues."""
    margin = zero + rmin
    if lmin > margin:
        return ("positive definite", lmax / lmin,
                f"lambda_min = {lmin:.4g} > zero threshold {zero:.3g} + its residual "
                f"{rmin:.2g}; condition = lambda_max / lambda_min")
    if lmin >= -margin:
        return ("positive semi-definite (singular to tolerance)", None,
                f"|lambda_min| = {abs(lmin):.3g} <= zero threshold {zero:.3g} + its residual "
                f"{rmin:.2g}: singular to tolerance, condition number infinite")
    if lmax <= zero:
        return ("negative semi-definite", None,
                f"lambda_max = {lmax:.4g} <= zero threshold {zero:.3g}")
    return ("indefinite", None,
            f"lambda_min = {lmin:.4g} < -(zero threshold {zero:.3g} + residual {rmin:.2g}): "
            "negative curvature; |lambda_min| / lambda_max = "
            f"{abs(lmin) / lmax:.3g}, condition number undefined")


class _Part:
    """Products, data passes and seconds of one part; a progress bar unless
    ``progress=False``."""

    def __init__(self, A: Any, name: str, progress: bool | None) -> None:
        self.A, self.name, self.progress = A, name, progress
        self._ctx: Any = contextlib.nullcontext()

    def __enter__(self) -> _Part:
        self.mv, self.ps, self.t0 = self.A.num_matvecs, self.A.num_passes, time.perf_counter()
        if self.progress is not False:
            self._ctx = track(self.A, self.name, enabled=self.progress)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)
        self.mv = self.A.num_matvecs - self.mv
        self.ps = self.A.num_passes - self.ps
        self.seconds = time.perf_counter() - self.t0

    def record(self, quantities: list[str], source: str) -> dict[str, Any]:
        return dict(name=self.name, quantities=quantities, num_matvecs=int(self.mv),
                    num_passes=int(self.ps), seconds=self.seconds, source=source)


def _part(name: str, quantities: list[str], mv: int, ps: int, t0: float, source: str
          ) -> dict[str, Any]:
    return dict(name=name, quantities=quantities, num_matvecs=int(mv), num_passes=int(ps),
                seconds=time.perf_counter() - t0, source=source)


def _name(groups: Any) -> Any:
    return groups if isinstance(groups, (str, list, dict)) else repr(groups)
