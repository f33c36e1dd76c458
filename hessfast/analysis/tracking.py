"""Sharpness tracking during training: :class:`SharpnessTracker`.

Call ``tracker.step(loss)`` once per training step (after ``optimizer.step()``, so that an
adaptive optimizer has a state); every ``every``-th call (the first included) measures the
curvature at the current parameters (the operator is a snapshot), finds its top ``k``
eigenpairs with :func:`hessfast.eigsh`, and records a :class:`TrackPoint`.

Steps. ``every`` counts CALLS of :meth:`~SharpnessTracker.step` (calls 0, every, 2 every,
... measure). The recorded ``TrackPoint.step`` is the optimizer step: the ``step=`` argument
when given; else the optimizer's own count for an optimizer that keeps one (Adam, AdamW,
RMSprop, Adagrad: the largest ``state["step"]`` of its parameters, 0 before the first
``optimizer.step()``); else (SGD, no optimizer) the call index, 0-based. ``TrackPoint.call``
is the call index in every case.

The governing pair. ``sharpness`` and ``governing_threshold`` are the pair that decides the
edge for the optimizer at hand, so no caller branches on it: ``lambda_max`` and ``threshold``
for SGD and no optimizer, ``preconditioned_lambda_max`` and ``preconditioned_threshold`` for
Adam, AdamW, RMSprop and Adagrad (both kept as well).

Edge of stability (Cohen et al. 2021, 2022). The threshold is where the optimizer's update on a
quadratic of that curvature becomes unstable, from ``optimizer.param_groups[0]`` (``lr=``
overrides its learning rate):

* no optimizer: ``2 / lr`` when ``lr`` is given (gradient descent), else none;
* SGD: ``2 / lr``; heavy-ball momentum ``beta`` with dampening ``d``:
  ``(2 + 2 beta) / ((1 - d) lr)``; Nesterov (torch's form, ``d = 0``):
  ``(2 + 2 beta) / ((1 + 2 beta) lr)`` (the eigenvalue -1 of its two-term recursion);
* Adam / AdamW: the PRECONDITIONED sharpness ``lambda_max(D^-1/2 H D^-1/2)``
  (:func:`~hessfast.analysis.precond.preconditioned`) against
  ``(2 + 2 beta1) / ((1 - beta1) lr)`` (38 / lr for beta1 = 0.9);
* RMSprop: preconditioned, ``(2 + 2 momentum) / lr``; Adagrad: preconditioned, ``2 / lr_t``
  with ``lr_t = lr / (1 + t lr_decay)`` for the next step ``t + 1``.

The thresholds are learning-rate thresholds, so they meet the curvature the optimizer sees:
the operator is the Hessian of the MEAN loss over ``data``, and the tracker's model is
full-batch training over ``data``, so for a sum-reduced ``loss_fn`` the optimizer sees ``N``
(the samples of ``data``) times it. ``lr_curvature_scale`` (``lr_scale=`` to give it,
:func:`hessfast.condition.lr_curvature_scale` with ``full_batch=True`` by default: 1 for a
mean-reduced loss, N for a sum) multiplies the measured sharpness in ``ratio``; the recorded
eigenvalues keep the operator's scale.

``ratio`` is the scaled governing sharpness over its threshold and ``at_edge`` is
``ratio >= 0.9`` (:data:`EDGE_FRACTION`): at the edge of stability the sharpness hovers just at
or above the threshold, and 0.9 flags the approach with a margin for the measurement's
tolerance. Coupled ``weight_decay`` (SGD, Adam, RMSprop) adds ``weight_decay`` to the
curvature the update sees; the tracked operator is the loss's own, without it.

Warm-up. The thresholds of an adaptive optimizer hold for a FIXED preconditioner ``D``; over
its first steps ``D`` is an estimate from one or a few squared gradients (Adam's
bias-corrected ``v_hat`` after one step is ``g_1^2`` itself), so coordinates whose first
gradients were near zero get a tiny ``D`` and a preconditioned sharpness far above the later
level (the issue that asked for this saw 23,078 at Adam's first step), and it moves by
factors from one step to the next. A point of Adam, AdamW, RMSprop or Adagrad is therefore
``warmup`` while the optimizer's step count ``t < warmup`` and is never ``at_edge`` (its
``ratio`` is still recorded; the plot draws it hollow and grey). Default ``warmup``:
``min(ceil(1 / (1 - beta2)), 10)`` for Adam/AdamW (``alpha`` in place of ``beta2`` for
RMSprop), 10 for Adagrad, 0 for SGD and no optimizer (nothing is estimated). Measured on the
digits MLP 64-32-10 (1797 standardised samples, full batch): the preconditioned sharpness at
``t = 1, 2, 3, 4, 5, 6..25`` was 742, 423, 331, 312, 253, 150-590 (Adam, lr 1e-2), 7411,
2999, 2184, 1547, 1444, 1325-1456 (RMSprop, lr 1e-3) and 742, 299, 217, 154, 143, 130-133
(Adagrad, lr 1e-2): the one- and two-sample estimates stand 2-6x above the level the run
settles at by ``t ~ 5``, and 10 steps give that a margin of two (the RMSprop and Adagrad
first points had ``ratio`` 3.7, flagged at the edge without the rule). An EMA with a memory
``1 / (1 - beta2)`` shorter than 10 steps has forgotten its start by then, hence the ``min``.

Divergence. A point whose ``loss`` (as given) or parameters are not finite, or whose operator
raises :class:`~hessfast.errors.NonFiniteError` (a NaN/Inf loss, gradient or product), is
recorded with ``diverged=True``, ``lambda_max`` and ``sharpness`` None, no eigenvalues and the
``reason``, instead of raising into the training loop; the first one warns (a
``RuntimeWarning`` naming the step). Later calls go on: a non-finite ``loss`` costs nothing
(no operator is built), non-finite parameters about one gradient (the operator's first
product finds them), and a run that recovers (a grad scaler's skipped step) is measured
again.

Warm starts and their cost. Each measurement starts Lanczos from a prediction of the new
eigenvectors made from the last two measurements' (per operator: H and the preconditioned
one): the last vectors ``v_t`` themselves, or their linear extrapolation ``2 v_t - v_{t-1}``
(``v_{t-1}`` first rotated onto ``v_t``: the orthogonal Procrustes fit of the two ``[k, n]``
sets, a sign for k = 1). After each measurement the tracker measures, at no product, how far
each of the two predictions was from the vectors found (the norm of its rows' part outside
their span) and uses the better one next time, the extrapolation when neither was seen yet.
The extrapolation helps where the eigenvectors drift smoothly (ordinary training: on the
digits MLP at every = 1 the extrapolated start's relative residual on the new Hessian was
6-14x below the last vector's, 1-3e-3 against 1-2e-2), the last vectors where they swing back
and forth (a period-two oscillation, as at the edge of stability). eigsh stops at its first
product when the start already meets ``tol``; one verification step follows (2 products at
k = 1 on the CPU). Measured on the digits MLP 64-32-10 (SGD lr 0.1, tol 1e-3, block 1):
over the first 40 steps from the initialisation, where the top eigenvector turns fast, 4.6
products per point (7.7 from the last vector, 20 cold); after 300 steps of training 2.4, at
most 3 (2.6, at most 4, from the last vector); a small CNN on digits (n = 3818, SGD lr 0.5):
4.5 (5.7) and 2.8, at most 3 (2.7). ``bench/bench_tracking.py`` measures it. The tracker
keeps two ``[k, n]`` sets per operator for this.

With block size ``b`` (default :func:`hessfast.spectrum.default_block_size`: 1 on the CPU),
the ``k`` predicted vectors are folded into ``b`` start rows (row ``j`` is the sum of vectors
``j, j+b, ...``): a start vector rich in all ``k`` directions. Passing the ``[k, n]`` vectors as
they are would make eigsh grow the block to ``k``, which on the CPU costs more products than
the warm start saves (measured on an MLP 64-16-10 on sklearn digits, float64, SGD lr 0.5,
every 4 steps, k = 3, tol 1e-3: block 3 warm 21-24 products against 19-24 cold; folded into
block 1, 13-16). Cold and warm runs use the same block size.

Fixed cost per point. The first point builds the operator with its pre-flight
(:func:`hessfast.hessian`); every later point takes
:meth:`~hessfast.curvature.operator.CurvatureOperator.refreshed` of the previous one: a new
snapshot at the current parameters that skips what depends only on the model's structure,
modes, loss and data (the pre-flight's loss-call, repeatability and graph-structure checks and
their forward, the symmetry probe, the data's first pass, the product path's planning): they
run once per tracker, on the first point. It re-checks that the structure is unchanged first
(parameters and buffers present, of the same dtype, device, shape and ``requires_grad``; the
modes under ``bn_mode="as_is"``) and falls back to a full build with its pre-flight when it is
not, or when the data changed in place (the refreshed operator verifies every pass against the
first build's record of the data). Every product is still checked finite, and the parameters
before every product. The operator's graphs are freed after every point: between points the
tracker holds the vectors and the last operator without its graphs (a copy of the model's
buffers).

The tracker never modifies the model, its modes, buffers or ``.grad``, the optimizer's state,
or the global RNG (eigsh draws from a private generator seeded with ``seed``).
"""

from __future__ import annotations

import json
import math
import operator as _operator
import os
import time
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn, optim

from ..condition import lr_curvature_scale
from ..curvature import ggn, hessian
from ..errors import ArgumentTypeError, ConfigurationError, DataChangedError, NonFiniteError
from ..linop import LinearOperator
from ..results import check_vectors, write_json
from ..spectrum import EigshResult, default_block_size, eigsh
from .plot import new_figure
from .precond import SUPPORTED_OPTIMIZERS, preconditioned

__all__ = ["EDGE_FRACTION", "WARMUP_CAP", "SharpnessTracker", "TrackPoint", "default_warmup",
           "fold_start", "stability_thresholds"]

#: ``at_edge`` is ``ratio >= EDGE_FRACTION``.
EDGE_FRACTION = 0.9
#: The most optimizer steps an adaptive optimizer's points are warm-up by default (module
#: docstring, "Warm-up").
WARMUP_CAP = 10
_FORMAT = "hessfast.SharpnessTracker/1"


@dataclass
class TrackPoint:
    """One measurement (or one diverged step).

    ``eigenvalues``/``residuals``: the top k of H, ``[k]`` lists, most wanted first (empty for
    a diverged point); ``lambda_max``: the first (None for a diverged point); ``num_matvecs``:
    eigsh's products for this point (H's and the preconditioned operator's, without the
    operator's pre-flight); ``warm``: started from the previous points' vectors; ``seconds``:
    wall time of the whole measurement; ``lr_curvature_scale``: the curvature the optimizer
    sees over the operator's (``ratio`` is ``lr_curvature_scale * sharpness /
    governing_threshold``; the eigenvalues are the operator's).

    ``step``: the optimizer step (module docstring, "Steps"); ``call``: the index of the
    :meth:`SharpnessTracker.step` call; ``loss``: the loss given to that call (None: none
    given). ``sharpness`` / ``governing_threshold``: the governing pair (``lambda_max`` /
    ``threshold`` for SGD and no optimizer, the preconditioned pair for adaptive ones).
    ``warmup``: the adaptive optimizer's preconditioner is still in its first steps (never
    ``at_edge``). ``diverged``: the loss, the parameters or the curvature were not finite;
    ``reason`` says which.
    """

    step: int
    lambda_max: float | None
    eigenvalues: list[float]
    residuals: list[float]
    converged: bool
    threshold: float | None
    ratio: float | None
    at_edge: bool
    preconditioned_lambda_max: float | None
    preconditioned_eigenvalues: list[float] | None
    preconditioned_threshold: float | None
    lr: float | None
    num_matvecs: int
    warm: bool
    seconds: float
    lr_curvature_scale: float = 1.0
    loss: float | None = None
    sharpness: float | None = None
    governing_threshold: float | None = None
    warmup: bool = False
    diverged: bool = False
    reason: str | None = None
    call: int | None = None


def _f(x: Any) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def stability_thresholds(optimizer: optim.Optimizer | None, lr: float | None = None
                         ) -> tuple[float | None, float | None, float | None]:
    """``(lr, threshold, preconditioned_threshold)`` of the next step (module docstring).

    Args:
        optimizer: the training optimizer (SGD, Adam, AdamW, RMSprop, Adagrad) or None.
        lr: the learning rate to use instead of ``optimizer.param_groups[0]["lr"]``.

    Returns:
        the learning rate and the two thresholds (None where they do not apply).

    Raises:
        ConfigurationError: an optimizer of another kind (pass ``optimizer=None, lr=...``).
    """
    if optimizer is None:
        return lr, (None if lr is None else 2.0 / lr), None
    g = optimizer.param_groups[0]
    lr = _f(g["lr"]) if lr is None else lr
    if lr <= 0:
        return lr, None, None
    if isinstance(optimizer, optim.SGD):
        beta, damp = _f(g.get("momentum", 0.0)), _f(g.get("dampening", 0.0))
        if beta == 0.0:
            return lr, 2.0 / lr, None
        if g.get("nesterov", False):
            return lr, (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * lr), None
        return lr, ((2.0 + 2.0 * beta) / ((1.0 - damp) * lr) if damp < 1.0 else None), None
    if isinstance(optimizer, optim.Adam):
        beta1 = _f(g["betas"][0])
        return lr, None, (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
    if isinstance(optimizer, optim.RMSprop):
        return lr, None, (2.0 + 2.0 * _f(g.get("momentum", 0.0))) / lr
    if isinstance(optimizer, optim.Adagrad):
        t = _optimizer_steps(optimizer) or 0
        lr = lr / (1.0 + t * _f(g.get("lr_decay", 0.0)))
        return lr, None, 2.0 / lr
    raise ConfigurationError(
        f"SharpnessTracker: no stability threshold is known for {type(optimizer).__name__}; "
        "supported: SGD, Adam, AdamW, RMSprop, Adagrad. Pass optimizer=None and lr=<lr> to "
        "compare lambda_max with 2/lr, or optimizer=None alone to track lambda_max only"
    )


def default_warmup(optimizer: optim.Optimizer | None) -> int:
    """The optimizer steps whose points are warm-up by default (module docstring,
    "Warm-up"): ``min(ceil(1 / (1 - beta2)), WARMUP_CAP)`` for Adam/AdamW (RMSprop: its
    ``alpha``), ``WARMUP_CAP`` for Adagrad, 0 for SGD and None.

    Args:
        optimizer: the training optimizer, or None.

    Returns:
        the number of steps (an int >= 0).
    """
    if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
        return 0
    g = optimizer.param_groups[0]
    decay = (_f(g["betas"][1]) if isinstance(optimizer, optim.Adam)
             else _f(g.get("alpha", 0.0)) if isinstance(optimizer, optim.RMSprop) else 1.0)
    if decay >= 1.0:
        return WARMUP_CAP
    return min(math.ceil(1.0 / (1.0 - decay)), WARMUP_CAP)


def _optimizer_steps(optimizer: optim.Optimizer | None) -> int | None:
    """The optimizer's own step count: the largest ``state["step"]`` of its parameters (0
    before the first step) for Adam, AdamW, RMSprop and Adagrad; None for others (SGD keeps
    no count)."""
    if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
        return None
    steps = [_f(s["step"]) for s in optimizer.state.values()
             if isinstance(s, dict) and "step" in s]
    return int(max(steps, default=0.0))


def _per_scale(points: list[TrackPoint]) -> str:
    """`` / s`` for a plot label when the thresholds were divided by the scale s."""
    s = points[-1].lr_curvature_scale
    return "" if s == 1 else f" / {s:g}"


def _threshold_label(points: list[TrackPoint], key: str, name: str) -> str:
    """The threshold line's legend entry with its value: ``"2/lr = 20"`` (the plotted value,
    over the scale when there is one), the last value and "(varies)" when it changed over
    the run (an lr schedule)."""
    pairs = [(getattr(p, key), p.lr, p.lr_curvature_scale) for p in points
             if getattr(p, key) is not None]
    thr, lr, scale = pairs[-1]
    coef = f"{thr * lr:.3g}/lr" if lr else "threshold"
    value = f"{coef}{'' if scale == 1 else f' / {scale:g}'} = {thr / scale:.3g}"
    shown = {f"{t / s:.3g}" for t, _, s in pairs}
    return f"{name}: {value}" + (" (varies; last shown)" if len(shown) > 1 else "")


def fold_start(prev: torch.Tensor, b: int) -> torch.Tensor:
    """``[k, n]`` vectors to ``[min(b, k), n]`` start rows: row j sums rows j, j+b, ... (the
    warm start of the tracker and of ``analyze(v0=)``: module docstring, "Warm start").

    Args:
        prev: the previous eigenvectors ``[k, n]``.
        b: the block size of the next run.
    """
    rows = [prev[j::b].sum(dim=0) for j in range(min(b, prev.shape[0]))]
    return torch.stack(rows)


def _clean(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def _unit_rows(V: torch.Tensor) -> torch.Tensor:
    """``V [k, n]`` with unit rows (zero rows stay zero)."""
    return V / V.norm(dim=1, keepdim=True).clamp_min(torch.finfo(V.dtype).tiny)


def _outside(P: torch.Tensor, V: torch.Tensor) -> float:
    """How far the unit rows of ``P [k, n]`` are from the span of the orthonormal rows of
    ``V [k, n]``: the Frobenius norm of their part outside it (0: inside)."""
    P = _unit_rows(P.to(V.dtype))
    return float((P - (P @ V.T) @ V).norm())


class _Starts:
    """The start vectors of one tracked operator's next measurement (module docstring,
    "Warm starts"): the last vectors or their linear extrapolation, whichever predicted the
    last measurement better."""

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None  # [k, n] unit rows of the last measurement
        self.before: torch.Tensor | None = None  # the measurement before, rotated onto last
        self.extrapolate = True  # used when both predictions exist; updated by what was seen

    def _linear(self) -> torch.Tensor | None:
        if self.last is None or self.before is None:
            return None
        return _unit_rows(2.0 * self.last - self.before)

    def predict(self, n: int) -> torch.Tensor | None:
        """``[k, n]`` start vectors (None: none fit an operator of size n)."""
        if self.last is None or self.last.shape[1] != n:
            return None
        linear = self._linear()
        return linear if linear is not None and self.extrapolate else self.last

    def update(self, vecs: torch.Tensor) -> None:
        """Record a measurement's ``[k, n]`` vectors, and which prediction was closer."""
        V = _unit_rows(vecs.detach())
        if self.last is not None and self.last.shape == V.shape:
            linear = self._linear()
            if linear is not None:
                self.extrapolate = _outside(linear, V) < _outside(self.last, V)
            # rotate the last vectors onto the new ones (orthogonal Procrustes; a sign for
            # k = 1), so that the difference of the two sets is their drift, not a flip
            overlap = V @ self.last.T  # [k, k]
            if overlap.shape[0] == 1:
                self.before = self.last if float(overlap) >= 0 else -self.last
            else:
                u, _, vh = torch.linalg.svd(overlap.double())
                self.before = (u @ vh).to(V.dtype) @ self.last
        else:
            self.before = None
        self.last = V

    def forget(self) -> None:
        """Drop the drift (after a diverged point the spacing of the measurements breaks)."""
        self.before = None


def _loss_value(loss: Any) -> float | None:
    """The loss a caller passed, as a float (None stays None)."""
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ConfigurationError(
                f"SharpnessTracker.step: loss must be a scalar (one element), got a tensor of "
                f"shape {tuple(loss.shape)}; pass loss.mean() or the step's reduced loss")
        return float(loss.detach().reshape(()).item())
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise ArgumentTypeError(
            f"SharpnessTracker.step: loss must be a float, a one-element tensor or None, got "
            f"{type(loss).__name__}")
    return float(loss)


class SharpnessTracker:
    """Top eigenvalues of the curvature along training, warm-started, with the EoS flag.

    Args:
        model: the model being trained, as for :func:`hessfast.hessian` (only read).
        loss_fn: as for :func:`hessfast.hessian`.
        data: the data to measure on, as for :func:`hessfast.hessian` (kept fixed: every
            point measures the same batches).
        every: measure on every ``every``-th call of :meth:`step` (calls 0, every, 2 every,
            ...: CALLS, whatever ``step=`` says; module docstring, "Steps").
        k: eigenpairs per measurement (``lambda_max`` is the first).
        optimizer: the training optimizer (SGD, Adam, AdamW, RMSprop, Adagrad) for the
            thresholds, the step count and, for adaptive ones, the preconditioned sharpness;
            only read.
        curvature: ``"hessian"`` or ``"ggn"``.
        tol: eigsh's relative residual tolerance. 1e-3, looser than the solvers' 1e-4
            (``eigsh``, ``lambda_max``): a tracker measures many points and records each
            residual next to its eigenvalue, and the edge-of-stability flag leaves a 10%
            margin (``EDGE_FRACTION``), so the products a tighter stop costs at every point
            buy nothing the flag can use; pass ``tol=1e-4`` for the solvers' precision.
        lr: learning rate for the thresholds (default ``optimizer.param_groups[0]["lr"]``).
        seed: eigsh's private seed (measurement i uses ``seed + i``).
        block_size: passed to :func:`hessfast.eigsh` (default:
            :func:`~hessfast.spectrum.default_block_size`).
        max_matvecs: passed to :func:`hessfast.eigsh`.
        lr_scale: the curvature the optimizer sees over the operator's (module docstring).
            Default: 1 for a mean-reduced loss, N (all samples of ``data``) for a sum-reduced
            one: full-batch steps. Minibatch SGD on a sum over batches of B: ``lr_scale=B``.
        warmup: the adaptive optimizer's first steps whose points are ``warmup`` (never at
            the edge): points with the optimizer's step count below it. Default
            :func:`default_warmup` (module docstring, "Warm-up"); 0 turns it off.
        **operator_kwargs: passed to :func:`hessfast.hessian` / :func:`hessfast.ggn`.
    """

    def __init__(self, model: nn.Module, loss_fn: Any, data: Any, *, every: int = 1,
                 k: int = 1, optimizer: optim.Optimizer | None = None,
                 curvature: str = "hessian", tol: float = 1e-3, lr: float | None = None,
                 seed: int = 0, block_size: int | None = None, max_matvecs: int | None = None,
                 lr_scale: float | None = None, warmup: int | None = None,
                 **operator_kwargs: Any) -> None:
        who = "SharpnessTracker"
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"{who}: model must be an nn.Module, got "
                                    f"{type(model).__name__}")
        for name, val in (("every", every), ("k", k)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ConfigurationError(f"{who}: {name} must be an int >= 1, got {val!r}")
        if curvature not in ("hessian", "ggn"):
            raise ConfigurationError(
                f"{who}: curvature must be 'hessian' or 'ggn', got {curvature!r}")
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
            raise ConfigurationError(f"{who}: tol must be a positive number, got {tol!r}")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))
                               or not lr > 0):
            raise ConfigurationError(f"{who}: lr must be a positive number or None, got {lr!r}")
        if lr_scale is not None and (isinstance(lr_scale, bool) or not isinstance(
                lr_scale, (int, float)) or not math.isfinite(lr_scale) or not lr_scale > 0):
            raise ConfigurationError(f"{who}: lr_scale must be a finite number > 0 or None, "
                                     f"got {lr_scale!r}")
        if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int)
                                   or warmup < 0):
            raise ConfigurationError(f"{who}: warmup must be an int >= 0 (optimizer steps) or "
                                     f"None for the default, got {warmup!r}")
        if optimizer is not None and not isinstance(optimizer, optim.Optimizer):
            raise ArgumentTypeError(f"{who}: optimizer must be a torch.optim.Optimizer or "
                                    f"None, got {type(optimizer).__name__}")
        if optimizer is not None:
            stability_thresholds(optimizer, None if lr is None else float(lr))  # kind check
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.every, self.k, self.optimizer, self.curvature = every, k, optimizer, curvature
        self.tol, self.lr, self.seed = float(tol), None if lr is None else float(lr), seed
        self.block_size, self.max_matvecs = block_size, max_matvecs
        self.lr_scale = None if lr_scale is None else float(lr_scale)
        self.lr_curvature_scale, self.lr_curvature_scale_reason = 1.0, ""
        self.operator_kwargs = operator_kwargs
        self.precond = isinstance(optimizer, SUPPORTED_OPTIMIZERS)
        self.optimizer_name = None if optimizer is None else type(optimizer).__name__
        self.warmup = default_warmup(optimizer) if warmup is None else warmup
        self.history: list[TrackPoint] = []
        self._calls = 0
        self._starts, self._pstarts = _Starts(), _Starts()
        self._op: LinearOperator | None = None  # the last operator built, refreshed next
        self._warned_divergence = False

    # -- measuring ----------------------------------------------------------------------
    def _solve(self, A: LinearOperator, starts: _Starts, seed: int
               ) -> tuple[EigshResult, bool]:
        b = self.block_size if self.block_size is not None else default_block_size(A, self.k)
        prev = starts.predict(A.shape[0])
        v0 = None if prev is None else fold_start(prev.to(A.dtype), b)
        kw = {} if self.max_matvecs is None else {"max_matvecs": self.max_matvecs}
        res = eigsh(A, self.k, which="LA", tol=self.tol, v0=v0, block_size=b, seed=seed, **kw)
        starts.update(res.eigenvectors)
        return res, v0 is not None

    def _operator(self, fresh: bool) -> LinearOperator:
        """The curvature at the current parameters: the last operator refreshed (module
        docstring, "Fixed cost per point"), or a full build with its pre-flight."""
        if self._op is not None and not fresh:
            try:
                return self._op.refreshed()
            except ConfigurationError:  # more than the values changed: check it all again
                pass
        build = hessian if self.curvature == "hessian" else ggn
        return build(self.model, self.loss_fn, self.data, **self.operator_kwargs)

    def step(self, loss: float | torch.Tensor | None = None, *,
             step: int | None = None) -> TrackPoint | None:
        """Count one training step; measure on every ``every``-th call.

        Args:
            loss: this step's training loss, recorded on the point (a float or a
                one-element tensor, read with ``.item()``: pass it after
                ``loss.backward()``); a non-finite one records a diverged point. None:
                none recorded.
            step: the optimizer step to record (default: the optimizer's own count, else the
                call index; module docstring, "Steps"). ``every`` counts calls whatever it
                says.

        Returns:
            the new :class:`TrackPoint` (also appended to :attr:`history`), or None.

        Raises:
            ConfigurationError: a tracker loaded with :meth:`from_json` (no model); a
                ``loss`` of more than one element or a negative ``step``.
            ArgumentTypeError: a ``loss`` or ``step`` of another type.
        """
        if self.model is None:
            raise ConfigurationError("SharpnessTracker.step: this tracker was loaded from JSON "
                                     "and has no model; build a new one to measure")
        value = _loss_value(loss)
        if step is not None:
            if isinstance(step, bool):
                raise ArgumentTypeError("SharpnessTracker.step: step must be an int, got bool")
            try:
                step = _operator.index(step)
            except TypeError:
                raise ArgumentTypeError(f"SharpnessTracker.step: step must be an int, got "
                                        f"{type(step).__name__}") from None
            if step < 0:
                raise ConfigurationError(f"SharpnessTracker.step: step must be >= 0, got {step}")
        call = self._calls
        self._calls += 1
        if call % self.every:
            return None
        t0 = time.perf_counter()
        count = _optimizer_steps(self.optimizer)
        at = step if step is not None else count if count is not None else call
        lr, threshold, pthreshold = stability_thresholds(self.optimizer, self.lr)
        base = dict(step=at, call=call, loss=value, threshold=threshold,
                    preconditioned_threshold=pthreshold, lr=lr,
                    governing_threshold=pthreshold if self.precond else threshold,
                    warmup=self.precond and count is not None and count < self.warmup)
        reason = self._not_finite(value)
        spent = 0
        if reason is None:
            try:
                point = self._measure(base, call, t0)
            except NonFiniteError as exc:
                reason = f"{type(exc).__name__}: {exc}"
                spent = self._spent
        if reason is not None:
            point = self._diverged(base, reason, spent, t0)
        self.history.append(point)
        return point

    def _not_finite(self, loss: float | None) -> str | None:
        """Why this step is diverged before any product (None: the loss given, if any, is
        finite). Non-finite parameters are found by the operator (its loss, gradient or
        first product: NonFiniteError), at the cost of one gradient, not by a read of every
        parameter at every point."""
        if loss is not None and not math.isfinite(loss):
            return f"the loss given to step() is {loss}"
        return None

    def _diverged(self, base: dict[str, Any], reason: str, spent: int,
                  t0: float) -> TrackPoint:
        """A diverged point (module docstring, "Divergence"); warns the first time."""
        if not self._warned_divergence:
            self._warned_divergence = True
            warnings.warn(
                f"SharpnessTracker.step (step {base['step']}): training has diverged: "
                f"{reason}. The point is recorded with diverged=True instead of measured, "
                "and so is every later non-finite one; the tracker raises nothing",
                RuntimeWarning, stacklevel=3)
        self._starts.forget()
        self._pstarts.forget()
        return TrackPoint(
            **base, lambda_max=None, eigenvalues=[], residuals=[], converged=False, ratio=None,
            at_edge=False, preconditioned_lambda_max=None, preconditioned_eigenvalues=None,
            num_matvecs=spent, warm=False, seconds=time.perf_counter() - t0,
            lr_curvature_scale=self.lr_curvature_scale, sharpness=None, diverged=True,
            reason=reason)

    def _measure(self, base: dict[str, Any], call: int, t0: float) -> TrackPoint:
        """One measurement at the current parameters (may raise NonFiniteError)."""
        self._spent = 0
        try:
            return self._measure_on(self._operator(fresh=False), base, call, t0)
        except DataChangedError:
            # a refreshed operator shares the first build's record of the data: the caller
            # changed the data in place since, so measure on a full build of the data now
            return self._measure_on(self._operator(fresh=True), base, call, t0)

    def _measure_on(self, H: LinearOperator, base: dict[str, Any], call: int,
                    t0: float) -> TrackPoint:
        seed = self.seed + len(self.history)
        try:
            lrs = lr_curvature_scale(H, self.lr_scale, full_batch=True, who="SharpnessTracker")
            self.lr_curvature_scale, self.lr_curvature_scale_reason = lrs.scale, lrs.reason
            res, warm = self._solve(H, self._starts, seed)
            mv = res.num_matvecs
            p_vals: list[float] | None = None
            if self.precond:
                if any(self.optimizer.state.get(p) for p in H.params):
                    pres, pwarm = self._solve(preconditioned(H, self.optimizer), self._pstarts,
                                              seed)
                    p_vals = [float(v) for v in pres.eigenvalues]
                    mv += pres.num_matvecs
                    warm = warm and pwarm
                else:
                    warnings.warn(
                        f"SharpnessTracker.step (call {call}): the optimizer has no state "
                        "yet, so no preconditioned sharpness at this point; call "
                        "tracker.step() after optimizer.step()", stacklevel=4)
        finally:
            self._spent = H.num_matvecs
            self._op = H
            free = getattr(H, "free_graphs", None)
            if free is not None:
                free()  # nothing held between points: the next one refreshes the operator
        vals = [float(v) for v in res.eigenvalues]
        lam, plam = vals[0], (None if p_vals is None else p_vals[0])
        gov, thr = (plam, base["preconditioned_threshold"]) if self.precond \
            else (lam, base["threshold"])
        ratio = None if gov is None or thr is None else lrs.scale * gov / thr
        return TrackPoint(
            **base, lambda_max=lam, eigenvalues=vals,
            residuals=[float(r) for r in res.residuals], converged=bool(res.converged.all()),
            ratio=ratio,
            at_edge=ratio is not None and ratio >= EDGE_FRACTION and not base["warmup"],
            preconditioned_lambda_max=plam, preconditioned_eigenvalues=p_vals,
            num_matvecs=mv, warm=warm, seconds=time.perf_counter() - t0,
            lr_curvature_scale=lrs.scale, sharpness=gov,
        )

    # -- records ------------------------------------------------------------------------
    def to_dict(self, *, vectors: bool = False) -> dict[str, Any]:
        """JSON-safe settings and history (non-finite floats as None). ``vectors``: the
        result interface's flag (the history holds no ``[n]`` arrays)."""
        check_vectors(vectors)
        return {
            "format": _FORMAT, "every": self.every, "k": self.k, "curvature": self.curvature,
            "tol": self.tol, "lr": self.lr, "calls": self._calls,
            "lr_scale": self.lr_scale, "lr_curvature_scale": self.lr_curvature_scale,
            "lr_curvature_scale_reason": self.lr_curvature_scale_reason,
            "optimizer": self.optimizer_name, "warmup": self.warmup,
            "history": [{k: _clean(v) for k, v in asdict(p).items()} for p in self.history],
        }

    def to_json(self, path: str | os.PathLike | None = None, *, indent: int | None = None,
                vectors: bool = False) -> str:
        """The :meth:`to_dict` record as strict JSON text, through the writer of every result
        (:meth:`hessfast.results.JsonResult.to_json`: ``indent=None`` gives this record's
        indent of 1; with ``path``, written there atomically). Returns the text."""
        return write_json(self.to_dict(vectors=vectors), path,
                          indent=1 if indent is None else indent, strict=True)

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> SharpnessTracker:
        """A tracker holding a saved history (JSON text, or a path to a file of it), for
        :attr:`history` and :meth:`plot`; it has no model, so :meth:`step` raises."""
        text = str(source)
        if isinstance(source, os.PathLike) or not text.lstrip().startswith("{"):
            with open(source, encoding="utf-8") as fh:
                text = fh.read()
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ConfigurationError(
                f"SharpnessTracker.from_json: not a tracker record (format "
                f"{d.get('format') if isinstance(d, dict) else None!r}, expected {_FORMAT!r});"
                " pass the text of SharpnessTracker.to_json()")
        self = cls.__new__(cls)
        self.model = self.loss_fn = self.data = self.optimizer = None
        self.every, self.k, self.curvature = d["every"], d["k"], d["curvature"]
        self.tol, self.lr, self.seed = d["tol"], d["lr"], 0
        self.block_size = self.max_matvecs = None
        self.lr_scale = d.get("lr_scale")
        self.lr_curvature_scale = d.get("lr_curvature_scale", 1.0)
        self.lr_curvature_scale_reason = d.get("lr_curvature_scale_reason", "")
        self.operator_kwargs = {}
        self.optimizer_name = d["optimizer"]
        self.precond = d["optimizer"] in ("Adam", "AdamW", "RMSprop", "Adagrad")
        self.warmup = d.get("warmup", 0)
        self.history = [_point_from_dict(p, self.precond) for p in d["history"]]
        self._calls = d["calls"]
        self._starts, self._pstarts = _Starts(), _Starts()
        self._op, self._warned_divergence = None, False
        return self

    def plot(self, path: str | os.PathLike | None = None) -> Any:
        """lambda_max (and the preconditioned sharpness, in its own panel) against the step,
        with the stability thresholds as dashed lines (their value in the legend), warm-up
        points hollow and grey, diverged steps as dotted vertical lines, and a panel of the
        loss when the points carry one: the :class:`matplotlib.figure.Figure`, as every
        ``plot()`` of hessfast returns; with ``path``, also saved there as a PNG.

        Args:
            path: where to save the PNG (None: not saved).

        Returns:
            the figure.

        Raises:
            ConfigurationError: no point recorded yet.
        """
        if not self.history:
            raise ConfigurationError("SharpnessTracker.plot: no measurements yet; call "
                                     "step() during training first")
        h = self.history
        steps = [p.step for p in h]
        has_p = any(p.preconditioned_lambda_max is not None for p in h)
        has_loss = any(p.loss is not None for p in h)
        rows = 1 + has_p + has_loss
        fig = new_figure("SharpnessTracker.plot", figsize=(7, 2.5 + 2.2 * rows))
        axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
        panels = [(axes[0], "lambda_max", "threshold", r"$\lambda_{\max}(H)$", "threshold")]
        if has_p:
            panels.append((axes[1], "preconditioned_lambda_max", "preconditioned_threshold",
                           r"$\lambda_{\max}(P^{-1/2} H P^{-1/2})$", "adaptive threshold"))
        nan = float("nan")
        diverged = [p.step for p in h if p.diverged]
        for ax, key, tkey, label, tlabel in panels:
            ys = [nan if getattr(p, key) is None else getattr(p, key) for p in h]
            ax.plot(steps, ys, "-", color="tab:blue", lw=1, label=label)
            main = [(s, y) for s, y, p in zip(steps, ys, h, strict=True) if not p.warmup]
            if main:
                ax.plot(*zip(*main, strict=True), "o", ms=3, color="tab:blue")
            early = [(s, y) for s, y, p in zip(steps, ys, h, strict=True) if p.warmup]
            if early and (key == "preconditioned_lambda_max" or not has_p):
                ax.plot(*zip(*early, strict=True), "o", ms=4, mfc="none", color="grey",
                        label="warm-up (never at the edge)")
            # thresholds in the operator's units: the optimizer sees lr_curvature_scale x it
            ts = [nan if getattr(p, tkey) is None else getattr(p, tkey) / p.lr_curvature_scale
                  for p in h]
            if any(not math.isnan(t) for t in ts):
                ax.step(steps, ts, "--", where="post", color="tab:red",
                        label=f"{_threshold_label(h, tkey, tlabel)} (edge of stability)")
            edge = [(s, y) for s, y, p in zip(steps, ys, h, strict=True) if p.at_edge]
            if edge and (key != "lambda_max" or not has_p):
                ax.plot(*zip(*edge, strict=True), "x", color="tab:red", label="at edge")
            ax.set_ylabel("sharpness")
            _log_when_wide(ax, ys + ts)
        if has_loss:
            ax = axes[-1]
            ls = [nan if p.loss is None else p.loss for p in h]
            ax.plot(steps, ls, "o-", ms=3, color="tab:green", label="training loss")
            ax.set_ylabel("loss")
            _log_when_wide(ax, ls)
        for ax in axes:
            for i, s in enumerate(diverged):
                ax.axvline(s, ls=":", color="tab:red", lw=1,
                           label="diverged" if i == 0 else None)
            ax.legend(loc="best", fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("training step")
        axes[0].set_title(f"Sharpness ({self.curvature}, top {self.k})")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, format="png", dpi=110)
        return fig


def _log_when_wide(ax: Any, values: list[float]) -> None:
    """A log y axis when the positive values span more than a factor 20."""
    finite = [y for y in values if not math.isnan(y)]
    if finite and min(finite) > 0 and max(finite) > 20 * min(finite):
        # Adam's first steps (tiny second moments) give a preconditioned sharpness
        # orders of magnitude above the rest: a linear axis would flatten the edge
        ax.set_yscale("log")


def _point_from_dict(p: dict[str, Any], precond: bool) -> TrackPoint:
    """A :class:`TrackPoint` from its JSON record; records written before the governing
    pair, the loss, warm-up and divergence (tracker records of hessfast <= issue 19) get
    them from their other fields."""
    names = {f.name for f in fields(TrackPoint)}
    kw = {k: v for k, v in p.items() if k in names}
    if "sharpness" not in p:
        kw["sharpness"] = p.get("preconditioned_lambda_max") if precond else p.get("lambda_max")
    if "governing_threshold" not in p:
        kw["governing_threshold"] = (p.get("preconditioned_threshold") if precond
                                     else p.get("threshold"))
    return TrackPoint(**kw)
