"""The curvature along a transformers ``Trainer`` run: :class:`HessianCallback`.

Usage::

    from hessfast.integrations import HessianCallback
    cb = HessianCallback(every=100, k=1)               # top eigenvalue every 100 steps
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()                                    # logs hessian/lambda_max, ...
    cb.to_json("sharpness.json"); cb.plot("sharpness.png")

What it measures. At the end of every optimizer step whose number (``state.global_step``,
counting optimizer steps, not micro-batches) is a multiple of ``every``, a
:class:`~hessfast.analysis.tracking.SharpnessTracker` builds the curvature operator
(:func:`hessfast.hessian` or :func:`hessfast.ggn`, a snapshot) of the trainer's own model at
its current weights on a FIXED held set of batches, and finds its top ``k`` eigenvalues
(warm-started from the previous measurement's vectors). The held set is ``data=`` when given,
else the first ``num_batches`` training batches in DATASET order (samples ``0 ..
num_batches * per_device_train_batch_size - 1`` of ``train_dataloader.dataset``, through the
trainer's collator), drawn once at ``on_train_begin`` straight from the dataset: the
training loader's sampler is never iterated, so the shuffle order is untouched. The loss is
the one the model computes itself, ``model(**batch).loss`` (the batches need their
``labels``), unless ``loss_fn`` is given.

The edge of stability. The threshold comes from the trainer's optimizer
(:func:`~hessfast.analysis.tracking.stability_thresholds`: SGD ``2 / lr`` with momentum's
correction; Adam/AdamW, RMSprop, Adagrad against the PRECONDITIONED sharpness) and the
learning rate read from its ``param_groups`` at the measurement, after the scheduler's step:
the rate of the next update, the one the current curvature meets. Another optimizer
(Adafactor, 8-bit ones) gets no threshold, with a warning: ``lambda_max`` is still tracked.

Logged values (every logger of the trainer gets them, and ``trainer.state.log_history``), with
the prefix ``"hessian/"`` (``"ggn/"`` for the GGN): ``lambda_max`` and ``lambda_2`` ...
``lambda_k`` (the operator's top eigenvalues); ``sharpness`` and ``threshold`` (the governing
pair: the preconditioned sharpness for adaptive optimizers, ``lambda_max`` otherwise);
``ratio`` (sharpness over threshold) and ``at_edge`` (1.0 when ``ratio >= 0.9`` past the
warm-up); ``warmup`` (adaptive optimizers: 1.0 while the preconditioner is still in its first
steps, whose sharpness is a one-step artefact, never at the edge); ``diverged`` (1.0 when the
weights or the curvature were not finite: the point is recorded, training goes on);
``trace`` (with ``num_probes``); ``matvecs`` (the measurement's eigsh products). A value that
does not exist (no threshold at lr 0, no eigenvalue when diverged) is left out. Each point
also gets the training loss the trainer logs at its step (``TrackPoint.loss``), when it logs
there.

How it logs. A callback gets no reference to its trainer, and the ``logs`` dict that
``on_log`` receives reaches the reporting callbacks (wandb, TensorBoard, ...) BEFORE a user's
callback and is copied into ``log_history`` before any callback sees it, so editing it would
reach no logger. So the callback calls the trainer's public ``Trainer.log`` (one log event at
the measured step, as evaluation metrics are logged): the trainer is ``trainer=`` when given,
else found on the call stack at ``on_train_begin`` (the ``Trainer`` whose ``train()`` raised
the event). If none is found (a custom loop driving the callback), the values are appended to
``state.log_history`` only, with a warning.

The training run is untouched, bitwise. The operator reads the parameters through
``torch.func.functional_call`` and never writes the model, its buffers, its ``.grad`` or its
train/eval flags; the optimizer and its state are only read (the preconditioner); the
grad-scaler and the learning-rate scheduler are not touched. The curvature is that of the
model in eval mode (``bn_mode="eval"``: dropout off, BatchNorm on its running statistics):
deterministic, the function that training with dropout approximates; the model's own modes
are restored after every computation. The global random states (torch's CPU and initialised
CUDA generators, Python's ``random``, NumPy's) are saved before each measurement and restored
after it, and the held batches are drawn under the same guard (a collator that masks at
random, such as masked-LM, draws its masks once then), so the next dropout mask and the next
shuffle are those of a run without the callback.

What it costs, per measurement (the products are counted, in :attr:`TrackPoint.num_matvecs
<hessfast.analysis.tracking.TrackPoint>` and the logged ``matvecs``; each product is one
double-backward pass over every held batch):

* the operator: the first measurement builds it with its pre-flight on held batch 0
  (``check=`` of :func:`hessfast.hessian`: a few forwards and a gradient graph), later ones
  refresh it at the new weights (``CurvatureOperator.refreshed``: no pre-flight, the same
  plan); each builds one gradient graph per held batch;
* eigsh's products for the top ``k``, warm-started from the previous measurement's vectors;
* for Adam/AdamW, RMSprop and Adagrad: a second eigsh, on the preconditioned operator;
* with ``num_probes``: a second operator, refreshed the same way (its graphs, never a
  pre-flight), and ``num_probes`` products for the Hutch++ trace.

The held batches stay on the model's device for the whole run, and the eigsh basis holds a
few ``[k, n]`` vectors of the parameters' size while it runs.
"""

from __future__ import annotations

import inspect
import math
import random
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import transformers
from torch import nn, optim

from .._checks import check_choice, check_int, check_positive, check_seed
from ..analysis.tracking import SharpnessTracker, TrackPoint, stability_thresholds
from ..curvature import ggn, hessian
from ..curvature.data import is_single_batch, to_device
from ..errors import ArgumentTypeError, ConfigurationError, LossError, NonFiniteError
from ..estimators import trace
from ..results import write_json

__all__ = ["HessianCallback"]

_WHO = "HessianCallback"
_CURVATURES = ("hessian", "ggn")
_FORMAT = "hessfast.HessianCallback/1"
# Hutch++ splits its budget into a sketch, a projection and a residual: 3 products at least.
_MIN_TRACE_PRODUCTS = 3


def _model_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The loss a transformers model computes itself: ``model(**batch).loss``."""
    if not isinstance(batch, Mapping):
        raise LossError(f"{_WHO}: the default loss calls model(**batch), which needs dict "
                        f"batches, got a {type(batch).__name__}; pass loss_fn=")
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise LossError(f"{_WHO}: model(**batch) returned no .loss; the held batches need "
                        f"their 'labels' (keys: {sorted(batch)}), or pass loss_fn=")
    return loss


def _is_causal_lm(model: nn.Module) -> bool:
    """Is ``model`` one of transformers' causal language models (next-token targets)?"""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # a transformers that moved it: the user says causal_lm= instead
        return False
    names: set[str] = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([v] if isinstance(v, str) else v)
    return type(model).__name__ in names


def _torch_optimizer(optimizer: Any) -> optim.Optimizer | None:
    """The torch optimizer inside the trainer's (accelerate wraps it in ``.optimizer``)."""
    while optimizer is not None and not isinstance(optimizer, (
            optim.SGD, optim.Adam, optim.RMSprop, optim.Adagrad)):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, optim.Optimizer) else None


def _calling_trainer() -> Any:
    """The ``Trainer`` whose event is being dispatched: the nearest frame up the call stack
    whose ``self`` is one (callbacks are given no reference to it), or None."""
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, transformers.Trainer):
            return obj
        frame = frame.f_back
    return None


@contextmanager
def _global_rng_kept() -> Iterator[None]:
    """Restore every global random state on exit: torch's CPU generator and the CUDA ones
    already initialised (initialising CUDA here would change nothing but cost), Python's
    ``random`` and NumPy's (when NumPy is imported: no one draws from it otherwise)."""
    cpu = torch.get_rng_state()
    cuda = (torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    py = random.getstate()
    np = sys.modules.get("numpy")
    np_state = np.random.get_state() if np is not None else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        if np_state is not None:
            np.random.set_state(np_state)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class HessianCallback(transformers.TrainerCallback):
    """Track the curvature's top eigenvalues, the trace and the edge of stability during
    ``Trainer.train()`` (module docstring: what, how it logs, what it costs).

    Args:
        every: measure at the end of optimizer steps ``every, 2 every, ...`` (counted as
            ``state.global_step``: optimizer steps, not micro-batches).
        k: eigenvalues per measurement (``lambda_max`` is the first).
        curvature: ``"hessian"`` or ``"ggn"`` (the GGN's default loss is
            ``nn.CrossEntropyLoss()`` on the model's ``.logits`` and ``batch["labels"]``,
            shifted for next-token prediction on transformers' causal LMs).
        num_probes: products for a Hutch++ trace per measurement (0: none; else >= 3).
        data: the held batches: one batch (a dict) or a list of them; default: the first
            ``num_batches`` training batches in dataset order (module docstring). Moved to the
            model's device at ``on_train_begin``.
        num_batches: how many training batches to hold when ``data`` is None.
        tol: eigsh's relative residual tolerance
            (:class:`~hessfast.analysis.tracking.SharpnessTracker`'s default).
        loss_fn: as for :func:`hessfast.hessian`; default ``model(**batch).loss``.
        seed: eigsh's private seed (measurement i uses ``seed + i``; the trace too).
        trainer: the ``Trainer`` to log through; default: found when training starts.
        warmup: an adaptive optimizer's first steps whose points are marked ``warmup`` and
            never at the edge (:class:`~hessfast.analysis.tracking.SharpnessTracker`; default
            :func:`~hessfast.analysis.tracking.default_warmup`).
        block_size: eigsh's block size (default: the tracker's).
        max_matvecs: eigsh's product budget per solve (default: eigsh's).
        **operator_kwargs: options of :func:`hessfast.hessian` / :func:`hessfast.ggn`
            (``params=``, ``bn_mode=``, ``causal_lm=``, ...).

    Raises:
        ConfigurationError: a bad ``every``, ``k``, ``curvature``, ``num_probes``,
            ``num_batches``, ``tol``, ``seed``, an empty ``data`` or an unknown option.
        ArgumentTypeError: a ``loss_fn`` that is not callable, a ``trainer`` that is not a
            ``transformers.Trainer``.
    """

    def __init__(self, *, every: int, k: int = 1, curvature: str = "hessian",
                 num_probes: int = 0, data: Any = None, num_batches: int = 1,
                 tol: float = 1e-3, loss_fn: Callable | None = None, seed: int = 0,
                 trainer: Any = None, warmup: int | None = None,
                 block_size: int | None = None, max_matvecs: int | None = None,
                 **operator_kwargs: Any) -> None:
        self.every = check_int("every", every, 1, who=_WHO)
        self.k = check_int("k", k, 1, who=_WHO)
        self.curvature = check_choice("curvature", curvature, _CURVATURES, who=_WHO)
        self.num_probes = check_int("num_probes", num_probes, 0, who=_WHO)
        if 0 < self.num_probes < _MIN_TRACE_PRODUCTS:
            raise ConfigurationError(
                f"{_WHO}: num_probes must be 0 (no trace) or >= {_MIN_TRACE_PRODUCTS} (Hutch++ "
                f"needs a sketch, a projection and a residual product), got {num_probes!r}")
        self.num_batches = check_int("num_batches", num_batches, 1, who=_WHO)
        self.tol = check_positive("tol", tol, who=_WHO)
        self.seed = check_seed(seed, who=_WHO)
        if loss_fn is not None and not callable(loss_fn):
            raise ArgumentTypeError(f"{_WHO}: loss_fn must be callable or None, got "
                                    f"{type(loss_fn).__name__}")
        if trainer is not None and not isinstance(trainer, transformers.Trainer):
            raise ArgumentTypeError(f"{_WHO}: trainer must be a transformers.Trainer or None, "
                                    f"got {type(trainer).__name__}")
        build = hessian if self.curvature == "hessian" else ggn
        known = set(inspect.signature(build).parameters) - {"model", "loss_fn", "data"}
        unknown = sorted(set(operator_kwargs) - known)
        if unknown:
            raise ConfigurationError(
                f"{_WHO}: unknown option(s) {unknown} for hessfast.{self.curvature}; it takes "
                f"{sorted(known)}")
        if data is not None and not is_single_batch(data) and not hasattr(data, "__iter__"):
            raise ConfigurationError(f"{_WHO}: data must be a batch (a dict) or a list of "
                                     f"batches, got a {type(data).__name__}")
        self.data, self.loss_fn, self.trainer = data, loss_fn, trainer
        if warmup is not None:
            check_int("warmup", warmup, 0, who=_WHO)
        self.warmup, self.block_size, self.max_matvecs = warmup, block_size, max_matvecs
        self.operator_kwargs = dict(operator_kwargs)
        self.prefix = f"{self.curvature}/"
        self.tracker: SharpnessTracker | None = None
        self.traces: dict[int, tuple[float, float]] = {}
        self._batches: list[Any] | None = None
        self._operator_args: tuple[Callable, dict[str, Any]] | None = None
        self._trace_op: Any = None
        self._warned_no_logger = False

    # -- what it has -------------------------------------------------------------------------
    @property
    def history(self) -> list[TrackPoint]:
        """The measurements (:class:`~hessfast.analysis.tracking.TrackPoint`, ``step`` the
        optimizer step), oldest first; empty before training."""
        return [] if self.tracker is None else self.tracker.history

    @property
    def batches(self) -> list[Any] | None:
        """The held batches, on the model's device (None before ``on_train_begin``)."""
        return self._batches

    # -- trainer events ----------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Find the trainer, hold the batches and build the tracker on the trainer's model
        and optimizer (a later ``train()`` on the same pair goes on with the same tracker).

        Args:
            args: the ``TrainingArguments``.
            state: the ``TrainerState``.
            control: the ``TrainerControl``.
            **kwargs: the trainer's objects (``model``, ``optimizer``, ``train_dataloader``).
        """
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"{_WHO}: the trainer gave no model (got "
                                    f"{type(model).__name__}); it needs an nn.Module")
        if self.trainer is None:
            self.trainer = _calling_trainer()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if self._batches is None:
            with _global_rng_kept():
                batches = (self._given_batches() if self.data is not None
                           else self._training_batches(args, kwargs.get("train_dataloader")))
            self._batches = [to_device(b, device) for b in batches]
        optimizer = _torch_optimizer(kwargs.get("optimizer"))
        old = self.tracker
        if old is not None and old.model is model and old.optimizer is optimizer:
            return
        self.tracker = self._new_tracker(model, optimizer)
        if old is not None:  # a new model or optimizer: new warm starts, one history
            self.tracker.history[:0] = old.history

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Measure when ``state.global_step`` is a multiple of ``every``, and log.

        Args:
            args: the ``TrainingArguments``.
            state: the ``TrainerState``.
            control: the ``TrainerControl``.
            **kwargs: the trainer's objects (unused: the tracker holds the model).
        """
        step = int(state.global_step)
        if self.tracker is None or step % self.every:
            return
        with _global_rng_kept():
            point = self._measure(step)
        self._emit(self.metrics(point), state, control)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        """Record the trainer's logged training loss on the point of the same step (the
        mean over the logging interval, as the trainer logs it).

        Args:
            args: the ``TrainingArguments``.
            state: the ``TrainerState``.
            control: the ``TrainerControl``.
            logs: the values being logged.
            **kwargs: the trainer's objects (unused).
        """
        h = self.history
        if not logs or "loss" not in logs or not h or h[-1].step != state.global_step:
            return
        if h[-1].loss is None:
            h[-1].loss = float(logs["loss"])

    # -- measuring ---------------------------------------------------------------------------
    def _given_batches(self) -> list[Any]:
        batches = [self.data] if is_single_batch(self.data) else list(self.data)
        if not batches:
            raise ConfigurationError(f"{_WHO}: data holds no batch; pass one batch (a dict) "
                                     "or a non-empty list of them, or data=None")
        return batches

    def _training_batches(self, args: Any, loader: Any) -> list[Any]:
        """The first ``num_batches`` batches of the training set in dataset order, collated
        as the trainer collates (its sampler is never iterated: the shuffle is untouched)."""
        ds = getattr(loader, "dataset", None)
        if (ds is None or isinstance(ds, torch.utils.data.IterableDataset)
                or not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__")):
            raise ConfigurationError(
                f"{_WHO}: cannot draw held batches from the training data (no indexable "
                f"dataset behind the trainer's loader: {type(ds).__name__}); pass data=[batch, "
                "...] with labels")
        size = getattr(loader, "batch_size", None) or args.per_device_train_batch_size
        collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
        n = len(ds)
        batches = [collate([ds[i] for i in range(start, min(start + size, n))])
                   for start in range(0, min(n, self.num_batches * size), size)]
        if not batches:
            raise ConfigurationError(f"{_WHO}: the training dataset is empty; pass data=")
        return batches

    def _new_tracker(self, model: nn.Module, optimizer: optim.Optimizer | None
                     ) -> SharpnessTracker:
        if optimizer is not None:
            try:
                stability_thresholds(optimizer)
            except ConfigurationError:
                warnings.warn(
                    f"hessfast: {_WHO}: no edge-of-stability threshold is known for "
                    f"{type(optimizer).__name__} (SGD, Adam, AdamW, RMSprop, Adagrad are); "
                    "tracking lambda_max without one", stacklevel=3)
                optimizer = None
        loss_fn, kw = self.loss_fn, dict(self.operator_kwargs)
        if loss_fn is None and self.curvature == "hessian":
            loss_fn = _model_loss
            kw.setdefault("loss_form", "model")
        elif loss_fn is None:
            loss_fn = nn.CrossEntropyLoss()
            kw.setdefault("causal_lm", _is_causal_lm(model))
        self._operator_args = (loss_fn, kw)
        return SharpnessTracker(
            model, loss_fn, self._batches, every=1, k=self.k, optimizer=optimizer,
            curvature=self.curvature, tol=self.tol, seed=self.seed, warmup=self.warmup,
            block_size=self.block_size, max_matvecs=self.max_matvecs, **kw)

    def _measure(self, step: int) -> TrackPoint:
        """One tracker point at optimizer step ``step``, and the trace. A diverged run is
        recorded by the tracker (``diverged``, with its warning), never raised into
        training; it gets no trace."""
        index = len(self.history)
        # the loss of this step is logged by the trainer after this event: on_log adds it
        point = self.tracker.step(loss=None, step=step)
        if self.num_probes and not point.diverged:
            try:
                tr = trace(self._trace_operator(), max_matvecs=self.num_probes,
                           seed=self.seed + index)
            except NonFiniteError as exc:
                warnings.warn(f"hessfast: {_WHO}: no trace at step {step}: {exc}",
                              RuntimeWarning, stacklevel=3)
            else:
                self.traces[step] = (tr.value, tr.stderr)
        return point

    def _trace_operator(self) -> Any:
        """The trace's operator at the current weights: the last one refreshed (no pre-flight,
        the same batches and plan), else a new one; its first build skips the pre-flight,
        which the tracker's operator ran on the same model, loss and batches."""
        if self._trace_op is not None:
            try:
                self._trace_op = self._trace_op.refreshed()
                return self._trace_op
            except ConfigurationError:  # more than the weights changed: build it anew
                pass
        loss_fn, kw = self._operator_args
        build = hessian if self.curvature == "hessian" else ggn
        self._trace_op = build(self.tracker.model, loss_fn, self._batches,
                               **{"check": False, **kw})
        return self._trace_op

    def metrics(self, point: TrackPoint) -> dict[str, float]:
        """The values logged for ``point`` (module docstring), None ones left out.

        Args:
            point: a point of :attr:`history`.

        Returns:
            ``{"hessian/lambda_max": ..., ...}`` (prefix ``"ggn/"`` for the GGN).
        """
        p = self.prefix
        out: dict[str, float | None] = {f"{p}lambda_max": point.lambda_max}
        for i, v in enumerate(point.eigenvalues[1:], start=2):
            out[f"{p}lambda_{i}"] = v
        out[f"{p}sharpness"], out[f"{p}threshold"] = point.sharpness, point.governing_threshold
        if point.ratio is not None:
            out[f"{p}ratio"], out[f"{p}at_edge"] = point.ratio, float(point.at_edge)
        if self.tracker is not None and self.tracker.precond:
            out[f"{p}warmup"] = float(point.warmup)
        if point.diverged:
            out[f"{p}diverged"] = 1.0
        if point.step in self.traces:
            out[f"{p}trace"] = self.traces[point.step][0]
        out[f"{p}matvecs"] = float(point.num_matvecs)
        return {key: float(v) for key, v in out.items() if v is not None}

    def _emit(self, metrics: dict[str, float], state: Any, control: Any) -> None:
        if self.trainer is not None:
            # The trainer's on_log dispatch clears control.should_log, the flag by which the
            # trainer logs its own loss right after this event: kept as it was, that log
            # still happens (and covers the same steps as without the callback).
            flag = control.should_log
            self.trainer.log(dict(metrics))  # log() adds the epoch to the dict it is given
            control.should_log = flag
            self.trainer.control.should_log = flag
            return
        state.log_history.append({**metrics, "step": state.global_step})
        if not self._warned_no_logger:
            self._warned_no_logger = True
            warnings.warn(
                f"hessfast: {_WHO}: no transformers.Trainer found on the call stack, so the "
                "measurements go to state.log_history only, not to the trainer's loggers; "
                "pass trainer= to log through Trainer.log", stacklevel=3)

    # -- records -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The tracker's record (:meth:`SharpnessTracker.to_dict
        <hessfast.analysis.tracking.SharpnessTracker.to_dict>`, so
        ``SharpnessTracker.from_json`` reads it back) with the callback's settings under
        ``"callback"`` and the traces under ``"trace"`` (``[{"step", "value", "stderr"}]``).

        Raises:
            ConfigurationError: nothing measured yet (no tracker before training).
        """
        if self.tracker is None:
            raise ConfigurationError(f"{_WHO}: nothing to record before Trainer.train() has "
                                     "started")
        d = self.tracker.to_dict()
        d["callback"] = {"format": _FORMAT, "every": self.every, "k": self.k,
                         "curvature": self.curvature, "num_probes": self.num_probes,
                         "num_batches": len(self._batches or []), "tol": self.tol,
                         "seed": self.seed}
        d["trace"] = [{"step": s, "value": _finite(v), "stderr": _finite(e)}
                      for s, (v, e) in sorted(self.traces.items())]
        return d

    def to_json(self, path: Any = None, *, indent: int | None = None) -> str:
        """:meth:`to_dict` as strict JSON text (indent 1 by default), written atomically to
        ``path`` when given.

        Args:
            path: a file to write, or None.
            indent: JSON indent (default 1).

        Returns:
            the JSON text.
        """
        return write_json(self.to_dict(), path, indent=1 if indent is None else indent,
                          strict=True)

    def plot(self, path: Any = None) -> Any:
        """The tracker's figure (:meth:`SharpnessTracker.plot
        <hessfast.analysis.tracking.SharpnessTracker.plot>`): sharpness against the optimizer
        step with the thresholds.

        Args:
            path: a PNG file to save it to, or None.

        Returns:
            the :class:`matplotlib.figure.Figure`.

        Raises:
            ConfigurationError: nothing measured yet.
        """
        if self.tracker is None:
            raise ConfigurationError(f"{_WHO}.plot: no measurements yet; run Trainer.train() "
                                     "with the callback first")
        return self.tracker.plot(path)
