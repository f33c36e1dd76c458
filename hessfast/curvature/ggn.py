"""The generalized Gauss-Newton of the sample-weighted mean loss: :class:`GGNOperator` and
:func:`ggn`.

For a batch with outputs ``f(theta)`` and criterion ``l(f, targets)``, the GGN is
``J^T H_l J`` with ``J = df/dtheta`` and ``H_l`` the Hessian of the criterion w.r.t. the
outputs: positive semi-definite for a convex criterion, and equal to the Hessian for a model
linear in its parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigurationError
from .autodiff import graph_vjp, scalar_vjp
from .cehead import CEHead
from .lmhead import LMHeadGraph, check_head, head_graph, head_product
from .model import OutputModule
from .operator import CurvatureOperator
from .options import DEFAULTS, CurvatureOptions, options_of, with_options_doc
from .preflight import check_loss

__all__ = ["GGNGraph", "GGNOperator", "ggn"]


@dataclass
class GGNGraph:
    """One batch's graph for ``J^T H_l J`` products (shapes for outputs ``[*out]``).

    Attributes:
        leaves: the selected parameters as detached leaves.
        loss: the batch's loss, detached (a scalar).
        out: the model outputs ``[*out]``, with their graph back to ``leaves``.
        out_d: ``out`` detached and made a leaf, the criterion's input.
        g_out: the criterion's gradient w.r.t. ``out_d`` ``[*out]``, with its graph; None
            when ``head`` gives the criterion's curvature.
        u: a zero ``[*out]`` leaf; ``jt_u = J^T u`` is linear in it, so the vjp of ``jt_u``
            with a vector v is ``J v`` (the double-vjp trick, no forward mode).
        jt_u: ``J^T u`` per parameter, with its graph.
        live: indices of the parameters whose ``jt_u`` depends on ``u``.
        head: the fused cross-entropy's curvature w.r.t. ``out`` (:mod:`.cehead`), or None.
    """

    leaves: list[torch.Tensor]
    loss: torch.Tensor
    out: torch.Tensor
    out_d: torch.Tensor
    g_out: torch.Tensor | None
    u: torch.Tensor
    jt_u: tuple[torch.Tensor | None, ...]
    live: list[int]
    head: CEHead | None = None

    def criterion_product(self, jv: torch.Tensor) -> torch.Tensor:
        """The criterion's Hessian w.r.t. the outputs applied to ``jv [c, *out]``."""
        if self.head is not None:
            return self.head.product(jv)
        return graph_vjp([self.g_out], [self.out_d], [jv], retain=True)[0]


# How to name the outputs and targets of batches that are not (inputs, targets) pairs.
_NAME = (
    "For other batches (a tokenizer's dict) name them: hf.ggn(model, criterion, data, "
    "outputs=lambda model, batch: model(**inputs).logits, targets=lambda batch: "
    "batch['labels']), or hf.ggn(model, None, data, causal_lm=True) for a causal language "
    "model (next-token cross-entropy, labels -100 ignored)"
)


class GGNOperator(CurvatureOperator):
    """The generalized Gauss-Newton ``sum_b w_b J_b^T H_b J_b``: J the Jacobian of the model
    outputs, H the Hessian of the criterion w.r.t. the outputs. PSD for convex criteria."""

    _kind = "GGN"

    def __init__(
        self, model: nn.Module, loss_fn: Callable, data: Any, options: CurvatureOptions
    ) -> None:
        if options.hvp_mode == "finite_difference":
            raise ConfigurationError(
                "ggn() cannot use hvp_mode='finite_difference': a finite difference of "
                "gradients is a Hessian-vector product, not a GGN one (J^T H_l J needs the "
                "model's Jacobian, which gradients of the loss do not give). Use "
                "hessian(..., hvp_mode='finite_difference') for the Hessian, or an exact "
                "hvp_mode ('auto', 'reuse_graph', 'double_backward', 'fwd_rev') for the GGN"
            )
        self._lm_head: nn.Module | None = options.lm_head
        super().__init__(model, loss_fn, data, options)

    def _decide_loss_form(self, loss_form: str) -> tuple[str, str]:
        if loss_form == "model":
            raise ConfigurationError(
                "ggn needs a criterion loss_fn(outputs, targets), so that it can split the "
                "loss from the model outputs: loss_form='model' cannot be used with ggn. Pass "
                f"a criterion (e.g. nn.CrossEntropyLoss()) and (inputs, targets) batches. {_NAME}"
            )
        form, why = super()._decide_loss_form(loss_form)
        if form == "model":
            raise ConfigurationError(
                "ggn needs a criterion loss_fn(outputs, targets) with (inputs, targets) "
                "batches, so that it can split the loss from the model outputs; loss_fn was "
                f"taken as loss_fn(model, batch) because {why}. Pass a criterion (e.g. "
                "nn.CrossEntropyLoss()), or loss_form='criterion' if loss_fn is one. "
                + _NAME
            )
        return form, why

    def _build_wrappers(self) -> None:
        self._wrapper = OutputModule(self.model, self._batch_split)
        if self._lm_head is not None:
            self._head_ids = check_head(
                self._lm_head, self.model, self._params, self._ce_spec, self.loss_head_reason
            )
            self._head_checked = False  # head_graph compares its rows with the logits once
            if self._planner.requested == "fwd_rev":
                raise ConfigurationError(
                    "lm_head= splits the GGN inside the graph of double backward; "
                    "hvp_mode='fwd_rev' cannot use it: pass hvp_mode='auto'")
            self._planner.mark_unavailable("fwd_rev", "lm_head= uses the graph paths")
            self.loss_head = "fused linear cross-entropy (lm_head, chunked over tokens)"

    def _outputs(self, leaves: Sequence[torch.Tensor], inputs: Any) -> torch.Tensor:
        out = self._functional_call(self._wrapper, leaves, (inputs,))
        if not isinstance(out, torch.Tensor):
            raise ConfigurationError(
                f"ggn needs the model to return one tensor of outputs, got "
                f"{type(out).__name__}: pass outputs=lambda model, batch: ... that returns it "
                "(e.g. model(**batch).logits)"
            )
        return out

    def _graph(self, batch: Any, index: int) -> GGNGraph | LMHeadGraph:
        if self._lm_head is not None:
            state = head_graph(
                self._lm_head, batch, index, self._head_ids, call=self._call_loss,
                split=self._batch_split.split, outputs=self._outputs, loss_fn=self.loss_fn,
                leaves=self._leaves(), causal_lm=self._batch_split.causal_lm,
                check_rows=not self._head_checked,
            )
            self._head_checked = True
            return state
        inputs, targets = self._call_loss(self._batch_split.split, index, batch)
        leaves = self._leaves()
        with torch.enable_grad():
            out = self._call_loss(self._outputs, index, leaves, inputs)
            out_d = out.detach().requires_grad_(True)
            loss = self._call_loss(self.loss_fn, index, out_d, targets)
            check_loss(loss, index)
            head = CEHead.build(self._ce_spec, out_d, targets)
            g_out = None
            if head is None:
                g_out = torch.autograd.grad(loss, out_d, create_graph=True)[0]
            u = torch.zeros_like(out, requires_grad=True)
            jt_u = scalar_vjp([out], leaves, [u], retain=True, create_graph=True)
        live = [i for i, g in enumerate(jt_u) if g is not None and g.requires_grad]
        return GGNGraph(leaves, loss.detach(), out, out_d, g_out, u, jt_u, live, head)

    def _loss_value(self, batch: Any, index: int) -> torch.Tensor:
        inputs, targets = self._call_loss(self._batch_split.split, index, batch)
        with torch.enable_grad():  # the same code path as the graph's forward
            out = self._call_loss(self._outputs, index, self._leaves(), inputs).detach()
            return self._call_loss(self.loss_fn, index, out, targets).detach()

    def _graph_product(
        self, state: GGNGraph | LMHeadGraph, V: list[torch.Tensor], *, retain: bool
    ) -> torch.Tensor:
        if isinstance(state, LMHeadGraph):
            assert self._ce_spec is not None  # check_head: lm_head= needs the fused CE
            return head_product(state, V, retain=retain, param_dtype=self.param_dtype,
                                spec=self._ce_spec, cat=self._cat)
        c = V[0].shape[0]
        linear = state.head is None and not state.g_out.requires_grad
        if not state.live or linear:
            return self._zeros(c)
        vs = [V[i].to(self.param_dtype) for i in state.live]
        outs = [state.jt_u[i] for i in state.live]
        with torch.enable_grad():
            jv = graph_vjp(outs, [state.u], vs, retain=True)[0]
            hjv = state.criterion_product(jv)
            res = graph_vjp([state.out], state.leaves, [hjv], retain=retain)
        return self._cat(res, c)

    def _fwd_rev_product(self, batch: Any, V: list[torch.Tensor]) -> torch.Tensor:
        inputs, targets = self._batch_split.split(batch)
        primals = tuple(p.detach() for p in self._params)
        c = V[0].shape[0]

        def f(*ps: torch.Tensor) -> torch.Tensor:
            return self._outputs(ps, inputs)

        out, vjp_fn = torch.func.vjp(f, *primals)
        out = out.detach()
        tangents = tuple(v.to(self.param_dtype) for v in V)
        # J V by forward mode (vmapped over the chunk), the criterion's Hessian on the
        # outputs by plain double backward, J^T by the saved vjp. The criterion stays out of
        # torch.func: jvp-of-grad through mse_loss fails in torch 2.13 ("ZeroTensors are
        # immutable"), and the outputs are small.
        if c == 1:
            jv = torch.func.jvp(f, primals, tuple(t[0] for t in tangents))[1].unsqueeze(0)
        else:
            jv = torch.func.vmap(
                lambda *t: torch.func.jvp(f, primals, t)[1], randomness="same"
            )(*tangents)
        head = CEHead.build(self._ce_spec, out, targets)
        if head is not None:
            hjv = head.product(jv)
        else:
            with torch.enable_grad():
                out_d = out.requires_grad_(True)
                loss = self.loss_fn(out_d, targets)
                g_out = torch.autograd.grad(loss, out_d, create_graph=True)[0]
                if not g_out.requires_grad:  # loss linear in the outputs: H = 0
                    return self._zeros(c)
                hjv = graph_vjp([g_out], [out_d], [jv], retain=False)[0]
        if c == 1:
            res = tuple(r.unsqueeze(0) for r in vjp_fn(hjv[0]))
        else:
            res = torch.func.vmap(vjp_fn)(hjv)
        return self._cat(res, c)


# D417: the options' Args entries are written once, in curvature/options.py, and inserted
# into this docstring at import by with_options_doc (below), out of ruff's sight;
# tests/curvature/test_options_once.py checks that every argument has its entry.
def ggn(  # noqa: D417
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    params: Sequence[str] | Sequence[torch.Tensor] | None = DEFAULTS.params,
    bn_mode: str = DEFAULTS.bn_mode,
    hvp_mode: str = DEFAULTS.hvp_mode,
    check: bool = DEFAULTS.check,
    check_deterministic: bool = DEFAULTS.check_deterministic,
    batch_size_fn: Callable[[Any], int] | None = DEFAULTS.batch_size_fn,
    loss_form: str = DEFAULTS.loss_form,
    chunk_size: int | None = DEFAULTS.chunk_size,
    reuse_graph: bool | None = DEFAULTS.reuse_graph,
    loss_reduction: str = DEFAULTS.loss_reduction,
    max_batches: int | None = DEFAULTS.max_batches,
    process_group: Any = DEFAULTS.process_group,
    outputs: Callable[[nn.Module, Any], Any] | None = DEFAULTS.outputs,
    targets: Callable[[Any], Any] | None = DEFAULTS.targets,
    causal_lm: bool = DEFAULTS.causal_lm,
    fused_loss: bool = DEFAULTS.fused_loss,
    exact: bool = DEFAULTS.exact,
    lm_head: nn.Module | None = DEFAULTS.lm_head,
) -> GGNOperator:
    """The generalized Gauss-Newton ``J^T H_loss J`` of the mean loss (PSD for convex losses).

    ``loss_fn`` must be a criterion ``loss_fn(outputs, targets)`` (e.g.
    ``nn.CrossEntropyLoss()``, ``nn.MSELoss()``, or any twice-differentiable function of
    the outputs); batches are ``(inputs, targets)``. As for the Hessian, the GGN is that of
    the loss averaged over samples, whatever the criterion's ``reduction`` (``"mean"`` or
    ``"sum"``; see :func:`~hessfast.hessian`). ``loss_form="criterion"`` overrides a
    detection that takes ``loss_fn`` for ``loss_fn(model, batch)``. As in
    :func:`~hessfast.hessian`: attention (the math SDPA backend: O(S^2) memory in
    the sequence length), compiled code and precision.

    Batches of other kinds name their outputs and targets (see ``outputs``, ``targets`` and
    ``causal_lm`` in :func:`~hessfast.hessian`). The GGN of a causal language model on a
    tokenizer's batches ``{"input_ids", "attention_mask", "labels"}``, labels -100 at
    padding, in one call::

        G = hf.ggn(model, None, batches, causal_lm=True)
        # the same, spelled out:
        G = hf.ggn(model, nn.CrossEntropyLoss(), batches, causal_lm=True,
                   outputs=lambda model, b: model(input_ids=b["input_ids"],
                                                  attention_mask=b["attention_mask"]).logits,
                   targets=lambda b: b["labels"])

    A sequence classifier (BERT): ``hf.ggn(model, nn.CrossEntropyLoss(), batches,
    targets=lambda b: b["labels"])``; the outputs default to the ``.logits`` of
    ``model(**b)`` without the labels.

    With torch's cross-entropy (``fused_loss=True``, the default; see
    :func:`~hessfast.hessian`) the criterion's Hessian ``diag(p) - p p^T`` is applied to
    ``J V`` by the fused product, and no double-backward graph of the loss is built or kept.

    ``lm_head=model.lm_head`` (the model's output ``nn.Linear``, the criterion torch's
    cross-entropy on its logit rows, e.g. ``causal_lm=True``) splits the GGN at the head: the
    head's block is computed in chunks of tokens (:mod:`hessfast.kernels.linear_ce`), so a
    product never holds the ``[k, N, V]`` logit directions of a large vocabulary; the body's
    part goes through the hidden states. Same numbers as without it, to rounding; a weight
    tied to the embedding gets both parts. Graph paths only (not ``hvp_mode="fwd_rev"``).

    Like :func:`~hessfast.hessian`, the operator is a SNAPSHOT of the curvature at the
    parameters it is built at: a product after they changed (an optimizer step,
    ``model.float()``) raises :class:`~hessfast.errors.ParametersChangedError`; build a new
    operator at the new parameters. The model is never modified.

    Args:
        model, loss_fn, data: as in :func:`~hessfast.hessian`.
        options (keyword-only): as the fields of
            :class:`~hessfast.curvature.options.CurvatureOptions`.

    Returns:
        :class:`GGNOperator`, ``matmat(V: [k, n]) -> [k, n]``.
    """
    return GGNOperator(model, loss_fn, data, options_of(locals()))


with_options_doc(ggn)
