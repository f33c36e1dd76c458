"""The Hessian of the sample-weighted mean loss: :class:`HessianOperator` and
:func:`hessian`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .autodiff import graph_vjp
from .cehead import FusedCriterion
from .fsdp import FSDPHessian, fsdp_kind
from .model import LossModule
from .operator import CurvatureOperator
from .options import DEFAULTS, options_of, with_options_doc
from .preflight import check_loss

__all__ = ["HessianGraph", "HessianOperator", "hessian"]


@dataclass
class HessianGraph:
    """One batch's first-order graph.

    Attributes:
        leaves: the selected parameters as detached leaves, per parameter ``[*shape]``.
        loss: the batch's loss, detached (a scalar).
        grads: the gradient of the batch loss w.r.t. ``leaves``, with its graph
            (``create_graph=True``); None for a parameter the loss does not use.
        live: indices of the gradients that depend on the parameters (the rest have no
            second derivative).
    """

    leaves: list[torch.Tensor]
    loss: torch.Tensor
    grads: tuple[torch.Tensor | None, ...]
    live: list[int]


class HessianOperator(CurvatureOperator):
    """The Hessian of the sample-weighted mean loss over the selected parameters."""

    _kind = "Hessian"
    _supports_fd = True

    def _build_wrappers(self) -> None:
        self._wrapper = LossModule(self.model, self.loss_fn, self.loss_form, self._batch_split)
        # The double-backward graph takes the fused cross-entropy where it applies
        # (torch.func's forward-over-reverse keeps the plain loss).
        self._graph_wrapper = self._wrapper
        if self._ce_spec is not None:
            fused = FusedCriterion(self.loss_fn, self._ce_spec)
            self._graph_wrapper = LossModule(self.model, fused, self.loss_form, self._batch_split)

    def _loss(self, leaves: Sequence[torch.Tensor], batch: Any) -> torch.Tensor:
        return self._functional_call(self._wrapper, leaves, (batch,))

    def _graph_loss(self, leaves: Sequence[torch.Tensor], batch: Any) -> torch.Tensor:
        return self._functional_call(self._graph_wrapper, leaves, (batch,))

    def _graph(self, batch: Any, index: int) -> HessianGraph:
        leaves = self._leaves()
        with torch.enable_grad():
            loss = self._call_loss(self._graph_loss, index, leaves, batch)
            check_loss(loss, index)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return HessianGraph(leaves, loss.detach(), grads, live)

    def _first_order_graph(self, batch: Any, index: int) -> HessianGraph:
        leaves = self._leaves()
        with torch.enable_grad():
            loss = self._call_loss(self._loss, index, leaves, batch)
            check_loss(loss, index)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        # no second derivative is built: every parameter with a gradient counts as live
        # (the zero-curvature warning needs the graph and is not given)
        live = [i for i, g in enumerate(grads) if g is not None]
        return HessianGraph(leaves, loss.detach(), grads, live)

    def _loss_value(self, batch: Any, index: int) -> torch.Tensor:
        with torch.enable_grad():  # the same code path as the graph's forward
            return self._call_loss(self._loss, index, self._leaves(), batch).detach()

    def _graph_product(
        self, state: HessianGraph, V: list[torch.Tensor], *, retain: bool
    ) -> torch.Tensor:
        c = V[0].shape[0]
        if not state.live:  # the gradient is constant: the Hessian is zero
            return self._zeros(c)
        outs = [state.grads[i] for i in state.live]
        vs = [V[i].to(self.param_dtype) for i in state.live]
        with torch.enable_grad():
            res = graph_vjp(outs, state.leaves, vs, retain=retain)
        return self._cat(res, c)

    def _fd_accumulate(
        self, batch: Any, index: int, v: list[torch.Tensor], step: float, into: torch.Tensor,
        sign: float,
    ) -> None:
        # theta + step * v in the operator's own leaf buffers (allocated once, refilled in
        # place): the user's parameters are only read, never added to and restored. One fused
        # add in the parameters' dtype when it is float32/float64 (its rounding is what
        # finitediff.perturbation_rounding measures), float32 arithmetic rounded once for
        # bf16/fp16 parameters.
        leaves = self._fd_leaves()
        with torch.no_grad():
            for leaf, p, x in zip(leaves, self._params, v, strict=True):
                p = p.detach()
                if p.dtype in (torch.float32, torch.float64):
                    torch.add(p, x.to(p.dtype), alpha=step, out=leaf)
                else:
                    leaf.copy_(torch.add(p.float(), x.float(), alpha=step))
        views = [x[0] for x in self._split(into[None])]
        flat = all(w.dtype == leaf.dtype and w.device == leaf.device
                   for w, leaf in zip(views, leaves, strict=True))
        try:
            if flat:
                # each leaf's gradient is added in place into its slice of the ONE row
                # ``into`` as the backward reaches it (AccumulateGrad into a defined .grad),
                # with the loss's sign folded into the backward's seed: g(+) and -g(-) land
                # in the same row, and no gradient-sized list is ever held
                for leaf, w in zip(leaves, views, strict=True):
                    leaf.grad = w
            with torch.enable_grad():
                loss = self._call_loss(self._loss, index, leaves, batch)
                check_loss(loss, index)
                seed = torch.full_like(loss, sign)
                if flat:
                    loss.backward(seed, inputs=leaves)
                    return
                grads = torch.autograd.grad(loss, leaves, seed, allow_unused=True)
            into.add_(self._cat(grads, 1)[0])
        finally:
            for leaf in leaves:
                leaf.grad = None

    def _fwd_rev_product(self, batch: Any, V: list[torch.Tensor]) -> torch.Tensor:
        primals = tuple(p.detach() for p in self._params)
        c = V[0].shape[0]

        def loss_of(*ps: torch.Tensor) -> torch.Tensor:
            return self._loss(ps, batch)

        grad_fn = torch.func.grad(loss_of, argnums=tuple(range(len(primals))))

        def hvp(*tangents: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.func.jvp(grad_fn, primals, tangents)[1]

        tangents = tuple(v.to(self.param_dtype) for v in V)
        if c == 1:
            res = hvp(*(t[0] for t in tangents))
            res = tuple(r.unsqueeze(0) for r in res)
        else:
            res = torch.func.vmap(hvp, randomness="same")(*tangents)
        return self._cat(res, c)


# D417: the options' Args entries are written once, in curvature/options.py, and inserted
# into this docstring at import by with_options_doc (below), out of ruff's sight;
# tests/curvature/test_options_once.py checks that every argument has its entry.
def hessian(  # noqa: D417
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
) -> HessianOperator | FSDPHessian:
    """The Hessian of the mean loss of ``model`` over ``data``, as a symmetric operator.

    The operator is a SNAPSHOT of the curvature at the parameters (and buffer values) it is
    built at: every product checks that the parameters are unchanged and raises
    :class:`~hessfast.errors.ParametersChangedError` after an optimizer step,
    ``model.float()``/``model.to(dtype)``, ``p.data = ...`` or a ``requires_grad`` change.
    To follow training, build a new operator at each step.

    The operator is the Hessian of the loss averaged over SAMPLES, ``(1/N) sum_i l_i`` for
    ``N`` samples in all batches (the Hessian of the summed loss is ``N`` times it). A batch
    loss that is a mean over its ``n_b`` samples is weighted ``n_b / N``, one that is a sum
    ``1 / N``. How ``loss_fn`` reduces is read from ``loss_fn.reduction`` (torch's losses:
    ``"mean"``, ``"sum"``; ``"none"`` is refused) or from the default of a ``reduction``
    argument (``functools.partial(F.cross_entropy, reduction="sum")``); any other callable
    is assumed to return the batch MEAN: give a callable that returns the batch sum the
    attribute ``loss_fn.reduction = "sum"``.

    Attention, compiled code, precision. Every exact product and the pre-flight run under
    ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` (``hvp_mode="finite_difference"``
    products do not: they are ordinary gradients, with the fused kernels): the fused kernels of
    ``scaled_dot_product_attention`` (flash, memory-efficient, cuDNN, CPU flash) have
    neither a double backward nor forward-mode AD. The math backend stores the attention
    weights, ``batch x heads x S x S`` entries per layer for sequences of length S, a few
    times over in the graph a product keeps: attention's memory grows as O(S^2) (GPT-2
    small at 8 x 1024 tokens in float32: about 0.4 GB per layer per copy), as with
    transformers' ``attn_implementation="eager"``; both choices work. ``torch.compile``d
    code runs eagerly for the products (double backward through compiled code is
    unsupported; a compiled model is unwrapped to its ``_orig_mod``, with a warning).
    Activation checkpointing works with ``use_reentrant=False`` (the reentrant variant hides
    parameters from autograd and is refused). The pre-flight's symmetry and repeatability
    tolerances follow the least precise dtype the model really computes in,
    ``H.compute_dtype`` (a float64 transformers LLaMA runs its RMSNorm in float32, its LM
    loss upcasts to float32); products are accumulated in at least float32, so bfloat16
    models give float32 vectors. A custom ``autograd.Function`` whose backward returns
    gradients without a graph (fused linear-cross-entropy losses such as Liger's or Cut
    Cross-Entropy's, which compute the gradient in the forward), or one marked
    ``@once_differentiable``, has no usable second derivative: ``hvp_mode="auto"`` then
    falls back to finite differences with a warning (``H.hvp_mode == "finite_difference"``,
    the cause in ``H.hvp_mode_reason``, the error in ``H.fd_error``), and ``exact=True`` or
    an explicit exact ``hvp_mode`` refuses it.

    Args:
        model: the network; never modified (Parameters and buffers stay the same objects
            with the same values, modes restored, no ``.grad``, global RNG restored). A
            forward that writes buffers (observers, counters) gets fresh copies of their
            values at construction per batch, with a one-time warning. Float16 models warn
            once (second derivatives overflow easily; bfloat16 or a float32 copy is safer).
            ``DataParallel`` and ``DistributedDataParallel`` models are unwrapped (DDP's
            products are reduced over its process group); models on the meta device are
            refused.
        loss_fn: a criterion ``loss_fn(outputs, targets)`` for ``(inputs, targets)`` batches,
            or ``loss_fn(model, batch) -> scalar`` for batches of any kind. Which one is
            decided by ``loss_form``, else by ``loss_fn`` itself (a torch loss; a first
            parameter annotated ``nn.Module``/``Tensor`` or named ``model``, ``module``,
            ``net``, ``network``; else one trial call with a stand-in for the model that
            stops at its first use and never runs the model), else by batch 0 (criterion for
            a pair, model form otherwise); see :mod:`hessfast.curvature.lossform`. The
            decision and its reason: ``H.loss_form``, ``H.loss_form_reason``.
        data: ONE batch if it is a tensor, a tuple (e.g. ``(inputs, targets)``) or a dict;
            otherwise (a list, a DataLoader without shuffling, any re-iterable) a SEQUENCE
            of batches: ``[ids_0, ids_1, ids_2]`` is three batches. To pass one batch of
            another kind, wrap it: ``data=[batch]``. Data without ``len()`` (an
            ``IterableDataset``) may hold at most ``hessfast.curvature.data.
            MAX_UNSIZED_BATCHES`` (100_000) batches, else ``UnboundedDataError``.
        options (keyword-only): as the fields of
            :class:`~hessfast.curvature.options.CurvatureOptions`.

    Returns:
        :class:`HessianOperator` with ``shape == (n, n)``, n the number of selected
        parameter entries; ``matmat(V: [k, n]) -> [k, n]``. For a model sharded with FSDP2's
        ``fully_shard``: :class:`~hessfast.curvature.fsdp.FSDPHessian`, whose vectors hold
        this rank's parameter shards only (``n`` the local entries, ``H.global_size`` the
        model's, ``H.shards`` the ranks), multiplied by central finite differences of two
        ordinary FSDP gradients (with a warning; ``exact=True`` refuses); only the
        algorithms that run on sharded vectors take it (``lambda_max``, ``eigsh`` and
        ``spectral_density`` with ``krylov="lean"``, ``power_iteration``, Hutchinson
        ``trace``).

    Raises:
        ConfigurationError, ArgumentTypeError, NoParametersError: bad arguments (also a
            meta-device model, ``params`` as a bare string).
        DistributedError: a ``DistributedDataParallel`` model with ``process_group=None``,
            a shuffling ``DistributedSampler``, an error on another rank, a collective
            that failed or timed out (the group's timeout).
        EmptyDataError, NotReiterableError, DataChangedError, BatchError: the data cannot
            be read, or a criterion gets batches that are not ``(inputs, targets)`` pairs.
        LossError, LossCallError, NonFiniteError, NonDeterministicError: the pre-flight
            (``check=True``) found a bad, failing, non-finite or random loss on batch 0.
        UnboundedDataError: data without ``len()`` did not end within the batch limit.
        UnsupportedModelError: no path can differentiate the model twice (with
            ``exact=True``, or for a cause other than a missing second derivative), the forward
            uses parameters only with gradient recording off (reentrant checkpoint), or a
            custom ``autograd.Function`` returns gradients without a graph (a fused
            linear-cross-entropy loss, a fused kernel's backward).
        ConfigurationError: also BatchNorm in batch statistics with a batch of one sample.
        Products may raise ``NonFiniteError``, ``AsymmetricOperatorError`` (the first two
        vectors, with ``check=True``), ``DataChangedError``, ``ParametersChangedError``
        (the parameters changed since construction) and, for an explicit
        ``hvp_mode`` that cannot run, ``UnsupportedModelError``.
    """
    options = options_of(locals())
    if fsdp_kind(model) == "fully_shard":  # FSDP2: finite differences on the local shards
        return FSDPHessian(model, loss_fn, data, options)
    return HessianOperator(model, loss_fn, data, options)


with_options_doc(hessian, skip=("lm_head",))
