"""The GGN of a model whose outputs are a linear head's logits, without ``[k, N, V]`` logit
directions: ``hf.ggn(..., lm_head=model.lm_head)``.

The criterion's outputs are ``logits = h W^T + b`` (rows ``[N, V]``, e.g. a causal LM's
shifted logits) and the criterion is torch's cross-entropy. The GGN is split at the head:
``J = [J_h ; head]`` with ``J_h`` the Jacobian of the hidden rows ``h [N, d]`` (through the
body, including a weight tied to the head's), so for directions ``V``:

    ``u = (J_h V) W^T + h dW^T + db``,  ``q = H_CE u``,
    ``G V = J_h^T (q W) + [q^T h at W] + [sum q at b]``

and :func:`hessfast.kernels.linear_ce.linear_ce_ggn_product` computes the middle in chunks of
tokens, so the product never holds more than a chunk of logit directions (the model's own
forward still computes the ``[N, V]`` logits once per graph). ``J_h V`` comes from the same
double-vjp trick as the GGN (``J_h^T u`` is linear in a zero leaf ``u``), ``J_h^T`` from one
backward. A weight tied to an embedding gets both its body and its head parts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ..errors import ConfigurationError
from ..kernels.linear_ce import linear_ce_ggn_product
from .autodiff import graph_vjp, scalar_vjp
from .cehead import CESpec, _usable

__all__ = ["LMHeadGraph", "check_head", "head_graph", "head_product"]


@dataclass
class LMHeadGraph:
    """One batch's graph for head-split GGN products.

    Attributes:
        leaves: the selected parameters as detached leaves.
        loss: the batch's loss (a scalar, detached).
        h: the hidden rows ``[N, d]`` entering the head, with their graph to ``leaves``.
        u: a zero ``[N, d]`` leaf; ``jt_u = J_h^T u`` is linear in it.
        jt_u: ``J_h^T u`` per parameter (None where h does not depend on it).
        live: parameters with curvature: those ``h`` depends on, and the head's own.
        weight, bias: the head's weight ``[V, d]`` and bias ``[V]`` (or None), detached.
        targets: ``[N]`` class indices.
        iw, ib: indices of the head's weight and bias among the selected parameters (None
            when not selected).
    """

    leaves: list[torch.Tensor]
    loss: torch.Tensor
    h: torch.Tensor
    u: torch.Tensor
    jt_u: tuple[torch.Tensor | None, ...]
    live: list[int]
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    iw: int | None
    ib: int | None

    @property
    def grads(self) -> tuple[Any, ...]:
        """Per parameter, something that is None exactly when the loss does not depend on
        it (read by the graph-structure check)."""
        own = {self.iw, self.ib}
        return tuple(self.leaves[i] if i in own else g for i, g in enumerate(self.jt_u))


def check_head(
    head: Any, model: nn.Module, params: Sequence[torch.Tensor], ce_spec: CESpec | None,
    loss_head_reason: str,
) -> tuple[int | None, int | None]:
    """Validate ``lm_head=`` for a GGN operator of ``model`` over the selected ``params``
    (``ce_spec``: the fused cross-entropy the loss is, or None with ``loss_head_reason``
    saying why not); the indices of the head's weight and bias among ``params`` (None when
    not selected)."""
    if not isinstance(head, nn.Linear):
        raise ConfigurationError(
            f"lm_head must be the model's output nn.Linear (e.g. model.lm_head), got "
            f"{type(head).__name__}")
    if not any(m is head for m in model.modules()):
        raise ConfigurationError(
            "lm_head is not a submodule of the model: pass the model's own head module "
            "(e.g. lm_head=model.lm_head)")
    if ce_spec is None:
        raise ConfigurationError(
            "lm_head= computes the cross-entropy GGN block in chunks, so loss_fn must be "
            "torch's cross-entropy (nn.CrossEntropyLoss without class weights, "
            f"F.cross_entropy, or causal_lm=True) with fused_loss=True; here: "
            f"{loss_head_reason}")
    ids = {id(p): i for i, p in enumerate(params)}
    iw = ids.get(id(head.weight))
    ib = None if head.bias is None else ids.get(id(head.bias))
    return iw, ib


def _rows(
    causal_lm: bool, h: torch.Tensor, head_out: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """The hidden rows matching the criterion's logit rows ``out [N, V]``."""
    if out.dim() != 2:
        raise ConfigurationError(
            f"lm_head= needs the criterion's outputs as logit rows [N, V], got shape "
            f"{tuple(out.shape)}: use causal_lm=True for a language model's [B, T, V] logits")
    if out is head_out:
        return h.reshape(-1, h.shape[-1])
    if causal_lm and head_out.dim() >= 2:
        return h[..., :-1, :].reshape(-1, h.shape[-1])
    raise ConfigurationError(
        "lm_head=: the criterion's outputs are not the head's logits (the model transforms "
        "them after the head); pass the head whose output the model returns, or drop lm_head=")


#: The operator's guarded call of the user's code on batch ``index``: ``call(fn, index,
#: *args)`` is ``fn(*args)`` with the user's errors made into hessfast's (LossCallError).
UserCall = Callable[..., Any]


def head_graph(
    head: nn.Linear, batch: Any, index: int, ids: tuple[int | None, int | None], *,
    call: UserCall, split: Callable[[Any], tuple[Any, Any]],
    outputs: Callable[[Sequence[torch.Tensor], Any], torch.Tensor], loss_fn: Callable,
    leaves: list[torch.Tensor], causal_lm: bool, check_rows: bool,
) -> LMHeadGraph:
    """Batch ``index``'s graph up to the head's input (see the module docstring).

    Args:
        head: the model's output ``nn.Linear`` (``lm_head=``, validated by
            :func:`check_head`), weight ``[V, d]``.
        batch: one batch of the data, as the data yields it.
        index: the batch's position in the data (for the error messages of ``call``).
        ids: the indices of the head's weight and bias among the selected parameters (None
            when not selected), as :func:`check_head` returns them.
        call: the operator's guarded call of the user's code.
        split: a batch to ``(inputs, targets)``.
        outputs: ``outputs(leaves, inputs)``, the model's outputs (the criterion's logit rows
            ``[N, V]``) with the selected parameters replaced by ``leaves``.
        loss_fn: the criterion ``loss_fn(outputs, targets)`` (torch's cross-entropy).
        leaves: fresh leaves of the selected parameters (``requires_grad``).
        causal_lm: the criterion sees the logits shifted by one token.
        check_rows: compare the head applied to its input rows with the criterion's
            logits (the operator does it once).

    Returns:
        The batch's :class:`LMHeadGraph`: hidden rows ``h [N, d]`` with their graph to
        ``leaves``, the detached loss, the head's detached weight and bias, targets ``[N]``.
    """
    inputs, targets = call(split, index, batch)
    seen: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple, result: torch.Tensor) -> None:
        seen["h"], seen["out"] = args[0], result
        seen["weight"], seen["bias"] = module.weight, module.bias

    handle = head.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            out = call(outputs, index, leaves, inputs)
    finally:
        handle.remove()
    if "h" not in seen:
        raise ConfigurationError("lm_head= was not called by the model's forward: pass the "
                                 "model's output head (e.g. lm_head=model.lm_head)")
    if not _usable(out, targets):
        raise ConfigurationError(
            "lm_head= needs class-index targets [N] matching the logit rows [N, V]; got "
            f"outputs {tuple(out.shape)} and targets "
            f"{getattr(targets, 'dtype', type(targets).__name__)}")
    with torch.enable_grad():
        h = _rows(causal_lm, seen["h"], seen["out"], out)
    weight = seen["weight"].detach()
    bias = None if seen["bias"] is None else seen["bias"].detach()
    if check_rows:  # the rows must be what the criterion sees
        again = F.linear(h.detach(), weight, bias)
        if again.shape != out.shape or not torch.allclose(
                again, out.detach(), rtol=1e-3, atol=1e-3 * float(out.detach().abs().max())):
            raise ConfigurationError(
                "lm_head=: the criterion's outputs are not the head applied to its input "
                "rows (the model changes the logits after the head); drop lm_head=")
    loss = call(loss_fn, index, out.detach(), targets).detach()
    with torch.enable_grad():
        u = torch.zeros_like(h, requires_grad=True)
        jt_u = scalar_vjp([h], leaves, [u], retain=True, create_graph=True)
    iw, ib = ids
    live = [i for i, g in enumerate(jt_u)
            if (g is not None and g.requires_grad) or i in (iw, ib)]
    return LMHeadGraph(leaves, loss, h, u, jt_u, live, weight, bias,
                       targets.reshape(-1).to(h.device), iw, ib)


def head_product(
    state: LMHeadGraph, V: list[torch.Tensor], *, retain: bool, param_dtype: torch.dtype,
    spec: CESpec, cat: Callable[[Sequence[torch.Tensor | None], int], torch.Tensor],
) -> torch.Tensor:
    """``G V`` for one batch, per parameter ``V[i] [c, *shape]``; returns ``[c, n]``
    (``cat``: the operator's per-parameter pieces to ``[c, n]``, zeros for None)."""
    c = V[0].shape[0]
    body = [i for i in state.live
            if state.jt_u[i] is not None and state.jt_u[i].requires_grad]
    h = state.h.detach()
    with torch.enable_grad():
        if body:
            vs = [V[i].to(param_dtype) for i in body]
            dh = graph_vjp([state.jt_u[i] for i in body], [state.u], vs, retain=True)[0]
        else:
            dh = torch.zeros((c, *h.shape), dtype=h.dtype, device=h.device)
    w = state.weight
    dW = (V[state.iw].to(w.dtype) if state.iw is not None
          else torch.zeros((c, *w.shape), dtype=w.dtype, device=w.device))
    db = None
    if state.bias is not None:
        db = (V[state.ib].to(w.dtype) if state.ib is not None
              else torch.zeros((c, *state.bias.shape), dtype=w.dtype, device=w.device))
    gh, gW, gb = linear_ce_ggn_product(h, w, state.bias, state.targets, dh.to(h.dtype), dW, db,
                                       ignore_index=spec.ignore_index, reduction=spec.reduction)
    res: list[torch.Tensor | None] = [None] * len(state.leaves)
    if state.h.requires_grad:  # else only the head's own parameters are selected
        with torch.enable_grad():
            res = list(graph_vjp([state.h], state.leaves, [gh], retain=retain))
    for i, g in ((state.iw, gW), (state.ib, gb)):
        if i is not None:
            res[i] = g if res[i] is None else res[i] + g
    return cat(res, c)
