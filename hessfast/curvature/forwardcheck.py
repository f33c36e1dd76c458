"""The pre-flight's look at the forward itself (called by :func:`.preflight.preflight`).

* :func:`explain_call_error`: the user's forward or loss raised on batch 0's plain forward;
  the :class:`~hessfast.errors.LossCallError` gets a hint for the causes it recognises
  (dtype or device mismatch, a model returning a tuple to a criterion, targets of the wrong
  length, a batch of one under batch statistics).
* :func:`check_graph_structure`: from batch 0's first-order graph, parameters that get no
  gradient (an error when the forward used them only with gradient recording off, as
  ``torch.utils.checkpoint(use_reentrant=True)`` does when its inputs do not require grad;
  a warning otherwise) and an identically zero curvature (a warning).
* :func:`check_small_batches`: a later batch of one sample that BatchNorm in training
  statistics cannot normalise, found at construction rather than in the middle of a product.

The parameter uses and BatchNorm calls come from one extra forward of batch 0 under a
:class:`~torch.overrides.TorchFunctionMode` (:class:`ForwardRecord`), run only when a check
needs it (a parameter without gradient, or a batch of one with batch statistics).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConfigurationError, LossCallError, UnsupportedModelError
from .data import tensor_leaves

if TYPE_CHECKING:
    from .operator import CurvatureOperator

__all__ = ["ForwardRecord", "check_graph_structure", "check_small_batches", "explain_call_error"]


class ForwardRecord(TorchFunctionMode):
    """Records, during a forward, which parameters torch calls used differentiably (the
    result has a ``grad_fn``) or with gradient recording off, and the input shapes of
    BatchNorm calls in training statistics.

    Args:
        params: the tensors to watch (matched by storage address, so detached leaves of
            the same parameters count), per parameter ``[*shape]``.
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self._index = {p.data_ptr(): i for i, p in enumerate(params) if p.numel() > 0}
        self.with_grad: set[int] = set()
        self.without_grad: set[int] = set()
        self.batch_norm_inputs: list[torch.Size] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        seen = {
            self._index[t.data_ptr()]
            for a in (*args, *kwargs.values())
            for t in (a if isinstance(a, (list, tuple)) else (a,))
            if isinstance(t, torch.Tensor) and t.data_ptr() in self._index
        }
        if seen:
            # a differentiable use records a graph; bookkeeping (detach, .shape) does not
            recorded = any(
                isinstance(t, torch.Tensor) and t.grad_fn is not None
                for t in (out if isinstance(out, (list, tuple)) else (out,))
            )
            if recorded:
                self.with_grad |= seen
            elif not torch.is_grad_enabled():
                self.without_grad |= seen
        if func is F.batch_norm:
            training = kwargs.get("training", args[5] if len(args) > 5 else False)
            if training and isinstance(args[0], torch.Tensor):
                self.batch_norm_inputs.append(args[0].shape)
        return out


def record_forward(op: CurvatureOperator, batch: Any, index: int) -> ForwardRecord:
    """One forward of batch ``index`` under :class:`ForwardRecord` (call inside the guard)."""
    record = ForwardRecord(list(op._params))
    with record:
        op._loss_value(batch, index)
    return record


# (words in the user's error, lower case) -> the cause and the fix
_HINTS: list[tuple[tuple[str, ...], str]] = [
    (("more than 1 value per channel", "more than 1 spatial element"),
     "a batch of one sample under batch statistics (BatchNorm in training mode, "
     "bn_mode='train' or 'as_is'), which cannot be normalised: use bn_mode='eval' (running "
     "statistics, the default) or batches of at least 2 samples"),
    (("same device", "expected all tensors to be on"),
     "the batch and the model are on different devices: move the data to the model's device"),
    (("batch_size", "size mismatch", "must match the size", "does not match"),
     "the targets do not match the model's outputs: check that every batch is (inputs, "
     "targets) with one target per input, in that order"),
]


def explain_call_error(exc: LossCallError, op: CurvatureOperator, batch: Any) -> LossCallError:
    """``exc`` with a hint for the cause when the user's error is recognisable (the user's
    exception stays chained); ``exc`` itself otherwise."""
    cause = exc.__cause__
    low = str(cause).lower()
    hint = None
    floats = {t.dtype for t in tensor_leaves(batch) if t.is_floating_point()}
    if floats - {op.param_dtype} and ("dtype" in low or "scalar type" in low or "type" in low):
        shown = ", ".join(sorted(str(d) for d in floats))
        hint = (
            f"the batch holds {shown} tensors and the model's parameters are "
            f"{op.param_dtype}: cast the data (x.to({op.param_dtype})) or the model "
            "(model.to(the data's dtype))"
        )
    elif "tuple" in low and op.loss_form == "criterion":
        hint = (
            "the model returns a tuple (e.g. (logits, aux)) and the criterion got it whole: "
            "make the model return the outputs only, or pass loss_fn(model, batch) that "
            "unpacks them, with loss_form='model'"
        )
    else:
        hint = next((h for words, h in _HINTS if any(w in low for w in words)), None)
    if hint is None:
        return exc
    out = LossCallError(f"{exc}. Likely cause: {hint}")
    out.__cause__ = cause
    return out


def _names(op: CurvatureOperator, indices: list[int]) -> str:
    shown = [op.param_names[i] for i in indices[:8]]
    more = f" and {len(indices) - 8} more" if len(indices) > 8 else ""
    return f"{shown}{more}"


def check_graph_structure(
    op: CurvatureOperator, state: Any, batch: Any, index: int, stacklevel: int
) -> None:
    """Parameters without gradient, and an identically zero curvature, on batch 0's graph.

    Raises:
        UnsupportedModelError: parameters the forward used only with gradient recording off.
    Warns:
        UserWarning: parameters the loss does not use; a curvature that is identically zero.
    """
    grads = getattr(state, "grads", None)
    if grads is None:
        grads = getattr(state, "jt_u", None)
    if grads is None:
        return
    missing = [i for i, g in enumerate(grads) if g is None]
    if missing:
        record = record_forward(op, batch, index)
        hidden = [i for i in missing if i in record.without_grad and i not in record.with_grad]
        if hidden:
            raise UnsupportedModelError(
                f"parameters {_names(op, hidden)} are used by the forward only with gradient "
                "recording off, so they get no gradient and their curvature would be "
                "silently zero. Cause: torch.utils.checkpoint(..., use_reentrant=True) whose "
                "inputs do not require grad (or a custom autograd.Function that does not take "
                "them as inputs, or torch.no_grad()). Fix: torch.utils.checkpoint(..., "
                "use_reentrant=False), or leave them out with params="
            )
        warnings.warn(
            f"hessfast: parameters {_names(op, missing)} receive no gradient on batch "
            f"{index} (unused by the loss, e.g. an unused head): their rows and columns of "
            f"the {op._kind} are zero. Leave them out with params= to shrink the operator",
            stacklevel=stacklevel,
        )
    g_out = getattr(state, "g_out", None)
    linear_out = isinstance(g_out, torch.Tensor) and not g_out.requires_grad
    if len(missing) < len(grads) and (not state.live or linear_out):
        warnings.warn(
            f"hessfast: the {op._kind} is identically zero on batch {index}: the gradient "
            "does not depend on the parameters (a loss linear in them), so every eigenvalue "
            "is 0",
            stacklevel=stacklevel,
        )


def _batch_statistics(model: nn.Module) -> bool:
    """Does a BatchNorm layer normalise with batch statistics (call inside the guard)?"""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and (m.training or m.running_mean is None)
        for m in model.modules()
    )


def check_small_batches(op: CurvatureOperator, batch: Any, index: int) -> None:
    """A later batch BatchNorm in training statistics cannot normalise (call in the guard).

    Raises:
        ConfigurationError: naming the batch, its size and the fixes.
    """
    sizes = op._data.sizes
    if 1 not in sizes or not _batch_statistics(op.model):
        return
    record = record_forward(op, batch, index)
    for shape in record.batch_norm_inputs:
        # values per channel a sample contributes (1 for BatchNorm1d on [B, C])
        per_sample = shape[0] * math.prod(shape[2:]) / sizes[index]
        bad = [i for i, s in enumerate(sizes) if 0 < s and s * per_sample <= 1]
        if bad:
            raise ConfigurationError(
                f"batch {bad[0]} holds {sizes[bad[0]]} sample and BatchNorm normalises with "
                f"batch statistics (bn_mode={op.bn_mode!r}): one value per channel cannot be "
                "normalised, so every product would fail on it. Use bn_mode='eval' (running "
                "statistics, the default), drop the batch (DataLoader(drop_last=True)) or "
                "merge it into another"
            )
