"""Sharpness tracking during training: :class:`SharpnessTracker`.

Call ``tracker.step()`` once per training step (after ``optimizer.step()``, so that an
adaptive optimizer has a state); every ``every``-th call (the first included) builds a new
curvature operator at the current parameters (the operator is a snapshot), finds its top
``k`` eigenpairs with :func:`hessfast.eigsh`, and records a :class:`TrackPoint`.

Warm start. Each measurement starts Lanczos from the previous eigenvectors. With block size
``b`` (default :func:`hessfast.spectrum.default_block_size`: 1 on the CPU), the ``k`` previous
vectors are folded into ``b`` start rows (row ``j`` is the sum of vectors ``j, j+b, ...``): a
start vector rich in all ``k`` directions. Passing the ``[k, n]`` vectors as they are would
make eigsh grow the block to ``k``, which on the CPU costs more products than the warm start
saves (measured on an MLP 64-16-10 on sklearn digits, float64, SGD lr 0.5, every 4 steps,
k = 3, tol 1e-3: block 3 warm 21-24 products against 19-24 cold; folded into block 1,
13-16). Cold and warm runs use the same block size.

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

``ratio`` is the scaled governing sharpness over its threshold (the preconditioned one for adaptive
optimizers, whose raw ``threshold`` is None) and ``at_edge`` is ``ratio >= 0.9``
(:data:`EDGE_FRACTION`): at the edge of stability the sharpness hovers just at or above the
threshold, and 0.9 flags the approach with a margin for the measurement's tolerance. Coupled
``weight_decay`` (SGD, Adam, RMSprop) adds ``weight_decay`` to the curvature the update sees;
the tracked operator is the loss's own, without it.

The tracker never modifies the model, its modes, buffers or ``.grad``, the optimizer's state,
or the global RNG (eigsh draws from a private generator seeded with ``seed``).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn, optim

from ..condition import lr_curvature_scale
from ..curvature import ggn, hessian
from ..errors import ArgumentTypeError, ConfigurationError
from ..linop import LinearOperator
from ..results import check_vectors, write_json
from ..spectrum import EigshResult, default_block_size, eigsh
from .plot import new_figure
from .precond import SUPPORTED_OPTIMIZERS, preconditioned

__all__ = ["EDGE_FRACTION", "SharpnessTracker", "TrackPoint", "stability_thresholds"]

#: ``at_edge`` is ``ratio >= EDGE_FRACTION``.
EDGE_FRACTION = 0.9
_FORMAT = "hessfast.SharpnessTracker/1"


@dataclass
class TrackPoint:
    """One measurement. ``eigenvalues``/``residuals``: the top k of H, ``[k]`` lists, most
    wanted first; ``num_matvecs``: eigsh's products for this point (H's and the
    preconditioned operator's, without the operator's pre-flight); ``warm``: started from the
    previous point's vectors; ``seconds``: wall time of the whole measurement;
    ``lr_curvature_scale``: the curvature the optimizer sees over the operator's (``ratio``
    is ``lr_curvature_scale * sharpness / threshold``; the eigenvalues are the operator's)."""

    step: int
    lambda_max: float
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


def _f(x: Any) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def stability_thresholds(optimizer: optim.Optimizer | None, lr: float | None = None
                         ) -> tuple[float | None, float | None, float | None]:
    """``(lr, threshold, preconditioned_threshold)`` of the next step (module docstring).

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
        states = [optimizer.state.get(p, {}) for p in g["params"]]
        t = max((_f(s["step"]) for s in states if "step" in s), default=0.0)
        lr = lr / (1.0 + t * _f(g.get("lr_decay", 0.0)))
        return lr, None, 2.0 / lr
    raise ConfigurationError(
        f"SharpnessTracker: no stability threshold is known for {type(optimizer).__name__}; "
        "supported: SGD, Adam, AdamW, RMSprop, Adagrad. Pass optimizer=None and lr=<lr> to "
        "compare lambda_max with 2/lr, or optimizer=None alone to track lambda_max only"
    )


def _per_scale(points: list[TrackPoint]) -> str:
    """`` / s`` for a plot label when the thresholds were divided by the scale s."""
    s = points[-1].lr_curvature_scale
    return "" if s == 1 else f" / {s:g}"


def _fold(prev: torch.Tensor, b: int) -> torch.Tensor:
    """``[k, n]`` vectors to ``[min(b, k), n]`` start rows: row j sums rows j, j+b, ..."""
    rows = [prev[j::b].sum(dim=0) for j in range(min(b, prev.shape[0]))]
    return torch.stack(rows)


def _clean(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


class SharpnessTracker:
    """Top eigenvalues of the curvature along training, warm-started, with the EoS flag.

    Args:
        model, loss_fn, data: as for :func:`hessfast.hessian` (the data to measure on).
        every: measure on every ``every``-th call of :meth:`step` (calls 0, every, 2 every,
            ...; the call index is the point's ``step``).
        k: eigenpairs per measurement (``lambda_max`` is the first).
        optimizer: the training optimizer (SGD, Adam, AdamW, RMSprop, Adagrad) for the
            thresholds and, for adaptive ones, the preconditioned sharpness; only read.
        curvature: ``"hessian"`` or ``"ggn"``.
        tol: eigsh's relative residual tolerance. 1e-3, looser than the solvers' 1e-4
            (``eigsh``, ``lambda_max``): a tracker measures many points and records each
            residual next to its eigenvalue, and the edge-of-stability flag leaves a 10%
            margin (``EDGE_FRACTION``), so the products a tighter stop costs at every point
            buy nothing the flag can use; pass ``tol=1e-4`` for the solvers' precision.
        lr: learning rate for the thresholds (default ``optimizer.param_groups[0]["lr"]``).
        lr_scale: the curvature the optimizer sees over the operator's (module docstring).
            Default: 1 for a mean-reduced loss, N (all samples of ``data``) for a sum-reduced
            one: full-batch steps. Minibatch SGD on a sum over batches of B: ``lr_scale=B``.
        seed: eigsh's private seed (measurement i uses ``seed + i``).
        block_size, max_matvecs: passed to :func:`hessfast.eigsh` (block size default:
            :func:`~hessfast.spectrum.default_block_size`).
        **operator_kwargs: passed to :func:`hessfast.hessian` / :func:`hessfast.ggn`.
    """

    def __init__(self, model: nn.Module, loss_fn: Any, data: Any, *, every: int = 1,
                 k: int = 1, optimizer: optim.Optimizer | None = None,
                 curvature: str = "hessian", tol: float = 1e-3, lr: float | None = None,
                 seed: int = 0, block_size: int | None = None, max_matvecs: int | None = None,
                 lr_scale: float | None = None, **operator_kwargs: Any) -> None:
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
        self.history: list[TrackPoint] = []
        self._calls = 0
        self._vecs: torch.Tensor | None = None
        self._pvecs: torch.Tensor | None = None

    # -- measuring ----------------------------------------------------------------------
    def _solve(self, A: LinearOperator, prev: torch.Tensor | None, seed: int
               ) -> tuple[EigshResult, bool]:
        b = self.block_size if self.block_size is not None else default_block_size(A, self.k)
        warm = prev is not None and prev.shape[1] == A.shape[0]
        v0 = _fold(prev, b) if warm else None
        kw = {} if self.max_matvecs is None else {"max_matvecs": self.max_matvecs}
        res = eigsh(A, self.k, which="LA", tol=self.tol, v0=v0, block_size=b, seed=seed, **kw)
        return res, warm

    def step(self) -> TrackPoint | None:
        """Count one training step; measure on every ``every``-th call.

        Returns:
            the new :class:`TrackPoint` (also appended to :attr:`history`), or None.

        Raises:
            ConfigurationError: a tracker loaded with :meth:`from_json` (no model).
        """
        if self.model is None:
            raise ConfigurationError("SharpnessTracker.step: this tracker was loaded from JSON "
                                     "and has no model; build a new one to measure")
        idx = self._calls
        self._calls += 1
        if idx % self.every:
            return None
        t0 = time.perf_counter()
        seed = self.seed + len(self.history)
        build = hessian if self.curvature == "hessian" else ggn
        H = build(self.model, self.loss_fn, self.data, **self.operator_kwargs)
        lrs = lr_curvature_scale(H, self.lr_scale, full_batch=True, who="SharpnessTracker")
        self.lr_curvature_scale, self.lr_curvature_scale_reason = lrs.scale, lrs.reason
        res, warm = self._solve(H, self._vecs, seed)
        self._vecs = res.eigenvectors
        mv = res.num_matvecs
        lr, threshold, pthreshold = stability_thresholds(self.optimizer, self.lr)
        p_vals: list[float] | None = None
        if self.precond:
            if any(self.optimizer.state.get(p) for p in H.params):
                pres, pwarm = self._solve(preconditioned(H, self.optimizer), self._pvecs, seed)
                self._pvecs = pres.eigenvectors
                p_vals = [float(v) for v in pres.eigenvalues]
                mv += pres.num_matvecs
                warm = warm and pwarm
            else:
                warnings.warn(
                    f"SharpnessTracker.step (call {idx}): the optimizer has no state yet, so "
                    "no preconditioned sharpness at this point; call tracker.step() after "
                    "optimizer.step()", stacklevel=2)
        vals = [float(v) for v in res.eigenvalues]
        lam, plam = vals[0], (None if p_vals is None else p_vals[0])
        gov, thr = (plam, pthreshold) if self.precond else (lam, threshold)
        ratio = None if gov is None or thr is None else lrs.scale * gov / thr
        point = TrackPoint(
            step=idx, lambda_max=lam, eigenvalues=vals,
            residuals=[float(r) for r in res.residuals], converged=bool(res.converged.all()),
            threshold=threshold, ratio=ratio,
            at_edge=ratio is not None and ratio >= EDGE_FRACTION,
            preconditioned_lambda_max=plam, preconditioned_eigenvalues=p_vals,
            preconditioned_threshold=pthreshold, lr=lr, num_matvecs=mv, warm=warm,
            seconds=time.perf_counter() - t0, lr_curvature_scale=lrs.scale,
        )
        self.history.append(point)
        return point

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
            "optimizer": self.optimizer_name,
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
        names = {f.name for f in fields(TrackPoint)}
        self.history = [TrackPoint(**{k: v for k, v in p.items() if k in names})
                        for p in d["history"]]
        self._calls, self._vecs, self._pvecs = d["calls"], None, None
        return self

    def plot(self, path: str | os.PathLike | None = None) -> Any:
        """lambda_max (and the preconditioned sharpness, in its own panel) against the step,
        with the stability thresholds as dashed lines: the
        :class:`matplotlib.figure.Figure`, as every ``plot()`` of hessfast returns; with
        ``path``, also saved there as a PNG."""
        if not self.history:
            raise ConfigurationError("SharpnessTracker.plot: no measurements yet; call "
                                     "step() during training first")
        h = self.history
        steps = [p.step for p in h]
        has_p = any(p.preconditioned_lambda_max is not None for p in h)
        fig = new_figure("SharpnessTracker.plot", figsize=(7, 6.5 if has_p else 4))
        axes = fig.subplots(2 if has_p else 1, 1, sharex=True, squeeze=False)[:, 0]
        panels = [(axes[0], "lambda_max", "threshold", r"$\lambda_{\max}(H)$", "threshold")]
        if has_p:
            panels.append((axes[1], "preconditioned_lambda_max", "preconditioned_threshold",
                           r"$\lambda_{\max}(P^{-1/2} H P^{-1/2})$", "adaptive threshold"))
        nan = float("nan")
        for ax, key, tkey, label, tlabel in panels:
            ys = [nan if getattr(p, key) is None else getattr(p, key) for p in h]
            ax.plot(steps, ys, "o-", ms=3, label=label)
            # thresholds in the operator's units: the optimizer sees lr_curvature_scale x it
            ts = [nan if getattr(p, tkey) is None else getattr(p, tkey) / p.lr_curvature_scale
                  for p in h]
            if any(not math.isnan(t) for t in ts):
                ax.step(steps, ts, "--", where="post", color="tab:red",
                        label=f"{tlabel}{_per_scale(h)} (edge of stability)")
            edge = [(s, y) for s, y, p in zip(steps, ys, h, strict=True) if p.at_edge]
            if edge and (key != "lambda_max" or not has_p):
                ax.plot(*zip(*edge, strict=True), "x", color="tab:red", label="at edge")
            ax.set_ylabel("sharpness")
            finite = [y for y in ys + ts if not math.isnan(y)]
            if finite and min(finite) > 0 and max(finite) > 20 * min(finite):
                # Adam's first steps (tiny second moments) give a preconditioned sharpness
                # orders of magnitude above the rest: a linear axis would flatten the edge
                ax.set_yscale("log")
            ax.legend(loc="best", fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("training step")
        axes[0].set_title(f"Sharpness ({self.curvature}, top {self.k})")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, format="png", dpi=110)
        return fig
