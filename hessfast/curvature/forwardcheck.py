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
* :class:`GraphWatch`: watches batch 0's first-order graph being built, at no extra
  forward: the precision the model really computes in (:attr:`GraphWatch.compute_dtype`,
  which scales the pre-flight's tolerances), and custom ``autograd.Function`` nodes whose
  backward returns gradients that carry no graph (fused losses such as Liger's or Cut
  Cross-Entropy's linear-cross-entropy, kernels with a hand-written backward), refused by
  :func:`check_custom_functions`.

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
from .model import shown_names  # re-exported: preflight imports it from here

if TYPE_CHECKING:
    from ._contract import CheckedOperator

__all__ = [
    "ForwardRecord",
    "GraphWatch",
    "check_custom_functions",
    "check_graph_structure",
    "check_small_batches",
    "explain_call_error",
    "shown_names",
]


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


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for t in obj if isinstance(t, torch.Tensor)]
    return []


class GraphWatch(TorchFunctionMode):
    """Watches a first-order graph being built (the forward and its ``create_graph``
    backward), for what the finished graph no longer shows.

    * :attr:`compute_dtype`: the least precise floating dtype among the results of torch
      calls that depend on the parameters (they require grad): a float64 model whose norm
      or softmax runs in float32 inside (transformers' RMSNorm, its causal-LM loss's
      ``logits.float()``) computes to float32's rounding, not float64's, and its products
      are symmetric and repeatable only to that. Tensors without a graph (masks, rotary
      tables) do not count: they are constants of the function.
    * :attr:`flat_functions`: custom ``torch.autograd.Function`` nodes of the graph whose
      backward, under ``create_graph=True``, returned non-zero gradients without a graph for
      inputs that depend on the parameters: ``{name: did a graph come in}``. Such a
      backward is not differentiated by the second pass, so the curvature through it would
      be silently wrong (zero where it is not).

    Args:
        dtype: the parameters' dtype (the most precise the answer can be).
    """

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.compute_dtype = dtype
        self._eps = torch.finfo(dtype).eps
        self.flat_functions: dict[str, bool] = {}

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.autograd.grad and kwargs.get("create_graph", False):
            return self._watched_grad(args, kwargs)
        out = func(*args, **kwargs)
        for t in _tensors(out):
            if t.requires_grad and (t.is_floating_point() or t.is_complex()):
                eps = torch.finfo(t.dtype).eps
                if eps > self._eps:
                    self._eps, self.compute_dtype = eps, t.dtype
        return out

    def _watched_grad(self, args: tuple, kwargs: dict) -> Any:
        """``torch.autograd.grad`` with a hook on every custom Function node of the graph."""
        outputs = args[0] if args else kwargs["outputs"]
        stack = [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None]
        seen: set[int] = set()
        handles = []
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, torch.autograd.function.BackwardCFunction):
                handles.append(node.register_hook(self._hook_for(node)))
            stack.extend(fn for fn, _ in node.next_functions)
        try:
            return torch.autograd.grad(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    def _hook_for(self, node: Any) -> Any:
        cls = getattr(node, "_forward_cls", None)
        name = getattr(cls, "__name__", type(node).__name__)

        def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
            grads = [g for g in grad_inputs if isinstance(g, torch.Tensor)]
            if any(_delayed_error(g) for g in grads):
                # @once_differentiable: the gradients carry torch's DelayedError node, whose
                # inputs have no graph, so a second derivative through them is silently 0
                self.flat_functions[name] = True
                return
            if any(g.requires_grad for g in grads) or not any(
                bool(g.count_nonzero()) for g in grads
            ):
                return  # differentiable, or an exact zero (a step function's derivative)
            if all(any(g is o for o in grad_outputs) for g in grads):
                return  # passed through unchanged (full backward hooks): the identity
            graph_in = any(
                isinstance(g, torch.Tensor) and g.requires_grad for g in grad_outputs
            )
            self.flat_functions[name] = self.flat_functions.get(name, False) or graph_in

        return hook


def _delayed_error(g: torch.Tensor) -> bool:
    """Is ``g`` the output of torch's ``DelayedError`` node (a backward marked
    ``@once_differentiable`` run under ``create_graph=True``)?"""
    return g.grad_fn is not None and type(g.grad_fn).__name__ in ("Error", "DelayedError")


def check_custom_functions(op: CheckedOperator, watch: GraphWatch) -> None:
    """Refuse a graph with a custom ``autograd.Function`` whose backward is not
    differentiable (:attr:`GraphWatch.flat_functions`).

    Raises:
        UnsupportedModelError: naming the Function, the likely cause and the fix.
    """
    if not watch.flat_functions:
        return
    names = ", ".join(sorted(watch.flat_functions))
    if any(watch.flat_functions.values()):
        cause = (
            "its backward gets gradients with a graph and returns gradients without one: it "
            "is computed outside autograd (a fused Triton/CUDA kernel, such as Liger's "
            "RMSNorm, SwiGLU or RoPE, flash-attn's attention, a backward marked "
            "@once_differentiable, or one under torch.no_grad()/.detach())"
        )
        fix = (
            "use the model's plain PyTorch layers for curvature (unpatch the fused "
            "kernels; attn_implementation='sdpa' or 'eager' for transformers' attention), "
            "or write the backward with differentiable torch operations"
        )
    else:
        cause = (
            "it returns gradients computed without autograd, as fused losses that compute "
            "the gradient in the forward do (Liger's or Cut Cross-Entropy's "
            "linear-cross-entropy)"
        )
        fix = (
            "for curvature use the plain head: logits from the model's lm_head and "
            "torch.nn.functional.cross_entropy (unpatch the fused loss, or pass "
            "ggn/hessian a loss built from model(...).logits, e.g. causal_lm=True). If the "
            "Function is linear in its inputs, its second derivative is zero and the "
            "operator would be right: check=False skips this check"
        )
    raise UnsupportedModelError(
        f"the custom torch.autograd.Function {names} has no usable second derivative: "
        f"{cause}, so the {op.kind} through it would be silently wrong. Fix: {fix}; or "
        "hessian(..., hvp_mode='finite_difference'), which needs only first derivatives "
        "(hvp_mode='auto' falls back to it unless exact=True)"
    )


def record_forward(op: CheckedOperator, batch: Any, index: int) -> ForwardRecord:
    """One forward of batch ``index`` under :class:`ForwardRecord` (call inside the guard)."""
    record = ForwardRecord(list(op.params))
    with record:
        op.loss_value(batch, index)
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


def explain_call_error(exc: LossCallError, op: CheckedOperator, batch: Any) -> LossCallError:
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


def _names(op: CheckedOperator, indices: list[int]) -> str:
    return shown_names([op.param_names[i] for i in indices])


def check_graph_structure(
    op: CheckedOperator, state: Any, batch: Any, index: int, stacklevel: int
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
            f"the {op.kind} are zero. Leave them out with params= to shrink the operator",
            stacklevel=stacklevel,
        )
    g_out = getattr(state, "g_out", None)
    linear_out = isinstance(g_out, torch.Tensor) and not g_out.requires_grad
    if len(missing) < len(grads) and (not state.live or linear_out):
        warnings.warn(
            f"hessfast: the {op.kind} is identically zero on batch {index}: the gradient "
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


def check_small_batches(op: CheckedOperator, batch: Any, index: int) -> None:
    """A later batch BatchNorm in training statistics cannot normalise (call in the guard).

    Raises:
        ConfigurationError: naming the batch, its size and the fixes.
    """
    sizes = op.batch_sizes
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
