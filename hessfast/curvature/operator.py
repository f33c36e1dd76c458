"""The machinery both curvature operators share: validation, the parameter layout (flatten /
unflatten), the guard that leaves the user's model and RNG as they were, the loss checks,
and the products' entry point (the graph cache and the chunk loop live in :mod:`.products`).

A subclass supplies the batch-level pieces: the first-order graph of a batch
(:meth:`~CurvatureOperator._graph`), its product with a chunk of vectors given per parameter
as ``[c, *shape]`` and returned flat as ``[c, n]`` (:meth:`~CurvatureOperator._graph_product`),
and the same product by forward-over-reverse (:meth:`~CurvatureOperator._fwd_rev_product`).
Batch 0's graph is built once and shared by the pre-flight, the graph-size probe and the
reuse cache. A path that raises on its first pass is reported (explicit ``hvp_mode``) or
replaced by the next one (auto).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from .._digest import digest_text, tensor_digest, tensors_digest
from ..errors import (
    ArgumentTypeError,
    BatchError,
    ConfigurationError,
    HessfastError,
    LossCallError,
)
from ..kernels.ce_curvature import ce_backend
from ..linop import LinearOperator
from ..memory import measure_saved
from .cehead import CESpec, ce_spec
from .data import BatchSource, tensor_leaves
from .dataparallel import RankGroup, operator_entries, refuse_fsdp
from .guard import BufferCopies, ParamFingerprint, SlotGuard, tensor_slots
from .layout import ParamLayout
from .lossform import decide_loss_form, loss_reduction
from .model import (
    BatchSplit,
    check_params,
    model_modes,
    select_params,
    twice_differentiable,
    unwrap_model,
)
from .options import CurvatureOptions
from .plan import FD_MODE, Planner
from .preflight import SymmetryProbe, preflight
from .products import BatchProducts

__all__ = ["CurvatureOperator"]

#: A checkpoint's data fingerprint lists one digest per batch up to this many batches (its
#: refusal then names the changed batches), one digest of them all beyond.
MAX_LISTED_BATCHES = 4096

class CurvatureOperator(BatchProducts, LinearOperator):
    """Common machinery of :class:`HessianOperator` and :class:`GGNOperator`.

    An operator is a SNAPSHOT: the curvature at the parameters it was built at, with the
    buffers' values at construction. Every product first checks the parameters (identity,
    dtype, device, shape, storage, version, ``requires_grad``, an exact checksum: well under 1%
    of a product) and raises :class:`~hessfast.errors.ParametersChangedError` after an
    optimizer step, ``model.float()``, ``p.data = ...``; build a new operator then. The
    user's model is only read: parameters are re-bound per evaluation by
    ``torch.func.functional_call`` (every module's entries are checked by identity and put
    back afterwards), buffers are fresh copies per evaluation (a forward that writes one is
    reported once by a warning), modes and the global RNG are restored.

    Attributes:
        model, loss_fn, bn_mode: as given (a ``DataParallel`` model unwrapped).
        loss_form: ``"criterion"`` or ``"model"``: how ``loss_fn`` is called.
        loss_reduction, loss_reduction_reason: ``"mean"`` or ``"sum"`` (how a batch's loss
            reduces over its samples, which sets the batch weights), and where it was read.
        params: the selected parameters (a tuple, in layout order).
        param_names, param_shapes, param_dtype: their names, shapes and dtype.
        compute_dtype: the least precise dtype the model computes in (seen by the
            pre-flight: a float64 model with float32 pieces inside computes in float32);
            the pre-flight's symmetry and repeatability tolerances follow it.
        num_samples, num_batches: the data (empty batches not counted; of all ranks).
        batch_sizes: the samples of each of this process's batches, in data order (a
            tuple; empty batches included as 0).
        hvp_mode, hvp_mode_reason: the path of the last product, and why
            (``"finite_difference"`` when auto mode fell back to it: the reason names the
            missing second derivative).
        fd_step, fd_error: the finite-difference path's step for a unit vector
            (:func:`~.finitediff.fd_step`) and the relative error of its products, measured
            once on batch 0 with a second step (:func:`~.finitediff.fd_error`); set at
            construction for ``hvp_mode="finite_difference"`` (with ``check=True``), before
            the first product when auto mode falls back; None while the path has not run.
        fd_kinks: the functions with a kink (ReLU, max-pooling, clamp, abs:
            :data:`~.finitediff.KINKED_OPS`) that the loss ran during that measurement,
            sorted ([] for none; None while it has not run). Across a kink a central
            difference is biased in a way ``fd_error`` cannot see: a non-empty list warns.
        loss_head, loss_head_reason: how the criterion's curvature w.r.t. the outputs is
            computed (``"autograd"`` or ``"fused cross-entropy (triton|torch)"``), and why.
        plans: the plan per block size used so far.
    """

    _kind = "curvature"
    # may auto mode fall back to finite differences of gradients (the Hessian only)?
    _supports_fd = False
    # the pre-flight (check=True) replaces the algorithms' one-time probe (hessfast._probe)
    checks_itself = True
    # every product is a new [k, n] block (the chunk loop's sum, or zeros)
    fresh_products = True

    def __init__(
        self, model: nn.Module, loss_fn: Callable, data: Any, options: CurvatureOptions
    ) -> None:
        # Under a process group each rank builds its part from its own data inside an error
        # barrier (all raise if one does), then the ranks settle the counts and the loss's
        # reading (RankGroup.settle) and compare their models and options (RankGroup.agree).
        self._ranks = RankGroup(model, data, options.process_group)
        with self._ranks.barrier("the operator's construction"):  # this rank's part
            if not isinstance(model, nn.Module):
                raise ArgumentTypeError(
                    f"model must be a torch.nn.Module, got {type(model).__name__}"
                )
            model = unwrap_model(model)
            refuse_fsdp(model)
            if loss_fn is None and options.causal_lm:
                loss_fn = nn.CrossEntropyLoss()  # the mean over tokens; ignore_index=-100
            if not callable(loss_fn):
                raise ArgumentTypeError(
                    f"loss_fn must be callable (a criterion loss_fn(outputs, targets) or "
                    f"loss_fn(model, batch); None only with causal_lm=True), got "
                    f"{type(loss_fn).__name__}"
                )
            # how a criterion's outputs and targets come from a batch
            self._batch_split = BatchSplit(options.outputs, options.targets, options.causal_lm)
            self.model = model
            self.loss_fn = loss_fn
            self.bn_mode = options.bn_mode
            self.param_names, self._params = select_params(model, options.params)
            device, self.param_dtype = check_params(self.param_names, self._params)
            self.compute_dtype = self.param_dtype  # the pre-flight sees what the forward uses
            # The operator is the curvature at these parameters: checked before every product.
            self._fingerprint = ParamFingerprint(model)
            self._slot_guard = SlotGuard(model)
            self.param_shapes: list[torch.Size] = [p.shape for p in self._params]
            self._layout = ParamLayout(self.param_names, self.param_shapes)
            # Products and their sums over batches in at least fp32 (bf16/fp16 models).
            dtype = torch.promote_types(self.param_dtype, torch.float32)
            super().__init__(self._layout.n, dtype, device)

            # Iterating a DataLoader draws a seed from the global RNG: fork it (once around
            # both passes, so a shuffling loader still shows itself in the second one).
            with torch.random.fork_rng(devices=self._rng_devices(device)):
                self._data = BatchSource(
                    data, options.batch_size_fn, verify=options.check,
                    max_batches=options.max_batches, allow_empty=self._ranks.active,
                )
            # this process's data; num_samples and num_batches become all ranks' (settle)
            self.local_num_samples = self.num_samples = self._data.num_samples
            self.local_num_batches = self.num_batches = self._data.num_batches
            self.batch_sizes = tuple(self._data.sizes)
            if self._data.num_samples:
                self.loss_form, self.loss_form_reason = self._decide_loss_form(options.loss_form)
            else:  # a rank without batches: the form the other ranks decided (settle)
                self.loss_form, self.loss_form_reason = RankGroup.empty_loss_form(options.loss_form)
            # The batch weights depend on how the loss reduces over a batch (mean or sum).
            found, where = loss_reduction(self.loss_fn)
            self._data.set_reduction(found, where, options.loss_reduction)
            self.loss_reduction = self._data.reduction
            self.loss_reduction_reason = self._data.reduction_reason
            selected = {id(p) for p in self._params}
            self._other_params = {
                n: p for n, p in model.named_parameters() if id(p) not in selected
            }
            # Every evaluation gets fresh copies of the buffers as they are now: a forward that
            # writes one (BatchNorm in training mode, an observer, a counter) changes neither the
            # user's model nor the next evaluation.
            self._buffers = BufferCopies(list(model.named_buffers()))
            self._buffer_keys = {n: id(b) for n, b in model.named_buffers()}
            self._slots = tensor_slots(model)
            # the modules' modes the checks ran under (bn_mode="as_is" keeps them: refreshed())
            self._modes = [m.training for m in model.modules()]
            self._param_facts = [_param_facts(p) for p in self._params]
            fixed_chunk = None if options.chunk_size is None else int(options.chunk_size)
            self._planner = Planner(
                options.hvp_mode, fixed_chunk, options.reuse_graph, self._data.num_batches,
                exact=options.exact, fd_ok=self._supports_fd,
            )
            # the finite-difference path's step for a unit vector and its relative error,
            # measured before its first product (None while it has not run)
            self.fd_step: float | None = None
            self.fd_error: float | None = None
            self.fd_kinks: list[str] | None = None
            # index -> (weight, graph state); batch 0's entry is shared with the pre-flight
            self._graph_cache: dict[int, tuple[float, Any]] = {}
            self._proven: set[str] = set()  # paths that completed a pass
            self.hvp_mode: str = options.hvp_mode
            self.hvp_mode_reason: str = (
                "not decided yet: decided on the first product"
                if options.hvp_mode == "auto"
                else "requested"
            )
            self._symmetry: SymmetryProbe | None = None
            self._saved_bytes: int | None = None  # saved_bytes(), measured on first ask
            self._ce_spec = self._decide_loss_head(options.fused_loss)
            self._build_wrappers()
            if options.check and self._data.num_samples:  # a rank without batches: others check
                self.compute_dtype = preflight(
                    _CheckedView(self), options.check_deterministic,
                    requested=self._planner.requested, path_failed=self._planner.path_failed,
                    check_agreement=self._planner.check_agreement,
                )
            if options.check and options.check_deterministic:
                self._symmetry = SymmetryProbe(self._kind, self.compute_dtype)
            if options.check and self._data.num_samples and self._planner.requested == FD_MODE:
                self._fd_calibrate()  # H.fd_error from construction on

        agreed = self._ranks.settle(
            self.local_num_samples, self.local_num_batches, self.loss_form,
            self.loss_reduction, self.compute_dtype,
        )
        self.num_samples, self.num_batches = agreed.num_samples, agreed.num_batches
        self.loss_form, self.loss_reduction = agreed.loss_form, agreed.loss_reduction
        if agreed.compute_dtype != self.compute_dtype:  # a less precise rank: its tolerance
            self.compute_dtype = agreed.compute_dtype
            if self._symmetry is not None:
                self._symmetry = SymmetryProbe(self._kind, agreed.compute_dtype)
                if self.fd_error is not None:
                    self._symmetry.relative_error = self.fd_error
        self._ranks.agree(self._kind, operator_entries(
            f"{type(self).__name__} n={self.shape[0]} {self.dtype}", self.param_names,
            self.loss_fn, options, self._fingerprint, self._buffers.saved,
        ))

    # -- hooks for subclasses ----------------------------------------------------------
    def _decide_loss_form(self, loss_form: str) -> tuple[str, str]:
        """How ``loss_fn`` is called, and why (the rule of :mod:`.lossform`)."""
        _, batch = self._data.first()
        return decide_loss_form(
            self.loss_fn, loss_form, batch, self.model, self._data.rule,
            self._rng_devices(self.device), named_split=self._batch_split.named,
        )

    def _decide_loss_head(self, fused: bool) -> CESpec | None:
        """Whether the criterion's curvature w.r.t. the outputs comes from the fused
        cross-entropy product (:mod:`.cehead`); sets ``loss_head`` and its reason."""
        spec = ce_spec(self.loss_fn) if self.loss_form == "criterion" else None
        if not fused:
            self.loss_head, self.loss_head_reason = "autograd", "fused_loss=False"
            return None
        if spec is None:
            self.loss_head = "autograd"
            self.loss_head_reason = (
                "loss_fn is not a cross-entropy hessfast fuses (nn.CrossEntropyLoss without "
                "class weights, F.cross_entropy, or a partial of it, called as a criterion)"
            )
            return None
        self.loss_head = f"fused cross-entropy ({ce_backend(self.device)[0]})"
        self.loss_head_reason = (
            "loss_fn is torch's cross-entropy: its curvature w.r.t. the logits is the fused "
            "product p*u - p*(p.u) for class-index targets (probability targets fall back "
            "to autograd); fused_loss=False turns it off"
        )
        return spec

    def _build_wrappers(self) -> None:
        raise NotImplementedError

    def _graph(self, batch: Any, index: int) -> Any:
        """One batch's first-order graph (the state double backward needs), with the
        batch's loss, checked, as ``state.loss``."""
        raise NotImplementedError

    def _loss_value(self, batch: Any, index: int) -> torch.Tensor:
        """The batch's loss by a fresh forward (no backward), detached."""
        raise NotImplementedError

    def _graph_product(
        self, state: Any, V: list[torch.Tensor], *, retain: bool
    ) -> torch.Tensor:
        """Products of one batch's graph with a chunk ``V`` (per parameter ``[c, *shape]``);
        ``retain=False`` lets the graph go after this chunk. Returns ``[c, n]``."""
        raise NotImplementedError

    def _fwd_rev_product(self, batch: Any, V: list[torch.Tensor]) -> torch.Tensor:
        """Forward-over-reverse products of one batch with a chunk; returns ``[c, n]``."""
        raise NotImplementedError

    # -- vector layout -----------------------------------------------------------------
    @property
    def kind(self) -> str:
        """Which curvature this operator is: ``"Hessian"`` or ``"GGN"`` (the word its
        messages use)."""
        return self._kind

    @property
    def params(self) -> tuple[nn.Parameter, ...]:
        """The selected parameters, in layout order (the order of :attr:`param_names` and
        of the flat vectors' pieces). Read-only: the operator is a snapshot of them."""
        return tuple(self._params)

    @property
    def ranks(self) -> RankGroup:
        """The ranks the products are reduced over (:class:`~.dataparallel.RankGroup`:
        ``active``, ``comm``, ``rank``, ``world_size``, ``digest``; one process: inactive).
        Read-only: what the algorithms' collective checks ask of a data-parallel operator."""
        return self._ranks

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector ``[n]`` (or block ``[k, n]``) into parameter-shaped pieces."""
        return self._layout.unflatten(v)

    def flatten(self, tensors: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`unflatten`: parameter-shaped pieces to one vector ``[n]``."""
        return self._layout.flatten(tensors)

    @property
    def product_error(self) -> float | None:
        """``fd_error`` when the products are finite differences, else None (exact paths:
        see :attr:`hessfast.LinearOperator.product_error`)."""
        return self.fd_error if self.hvp_mode == "finite_difference" else None

    def _split(self, V: torch.Tensor) -> list[torch.Tensor]:
        return self._layout.split(V)

    def _cat(self, pieces: Sequence[torch.Tensor | None], c: int) -> torch.Tensor:
        return self._layout.cat(pieces, c, self.dtype, self.device)

    def _zeros(self, c: int) -> torch.Tensor:
        return torch.zeros(c, self.shape[0], dtype=self.dtype, device=self.device)

    def _leaves(self) -> list[torch.Tensor]:
        return [p.detach().requires_grad_(True) for p in self._params]

    def _functional_call(
        self, wrapper: nn.Module, leaves: Sequence[torch.Tensor], args: tuple
    ) -> Any:
        """``wrapper(*args)`` (the user's model as its submodule ``model``) with the selected
        parameters replaced by ``leaves``, the others detached, and fresh buffer copies.

        Every distinct parameter/buffer slot of the model gets its own entry and
        ``tie_weights=False``: torch's tying expands a name to every path, which swaps a
        module reused at two places twice and restores it once (pytorch/pytorch#164759)."""
        values: dict[int, torch.Tensor] = {
            id(p): t for p, t in zip(self._params, leaves, strict=True)
        }
        values.update({id(p): p.detach() for p in self._other_params.values()})
        copies = self._buffers.fresh()
        values.update({self._buffer_keys[n]: b for n, b in copies.items()})
        mapping = {
            "model." + name: values[key]
            for key, names in self._slots.items()
            if key in values
            for name in names
        }
        out = torch.func.functional_call(wrapper, mapping, args, tie_weights=False)
        self._buffers.note_writes(copies)
        return out

    # -- guards and checks -------------------------------------------------------------
    @staticmethod
    def _rng_devices(device: torch.device) -> list[int]:
        if device.type == "cuda":
            return [device.index if device.index is not None else torch.cuda.current_device()]
        return []

    @contextmanager
    def _guard(self, *, exact: bool = True) -> Iterator[None]:
        """Modes and differentiable kernels set and restored; the global RNG restored after
        the block. ``exact=False`` (the finite-difference path, first-order gradients only)
        leaves the kernels as they are: fused attention and compiled code run."""
        devices = self._rng_devices(self.device)
        with ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            stack.enter_context(self._slot_guard.hold())
            stack.enter_context(model_modes(self.model, self.bn_mode))
            if exact:  # SDPA's math backend, compiled code run eagerly
                stack.enter_context(twice_differentiable())
            yield

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _call_loss(self, fn: Callable[..., Any], index: int, *args: Any) -> Any:
        """Evaluate the user's loss (or model) on batch ``index``. What it raises, and a
        batch a criterion cannot take, become errors that say how the data and ``loss_fn``
        were read and how to read them otherwise."""
        try:
            return fn(*args)
        except BatchError as exc:
            raise BatchError(f"batch {index}: {exc}. {self._reading()}") from exc
        except HessfastError:
            raise
        except Exception as exc:
            raise LossCallError(
                f"evaluating the loss on batch {index} raised {type(exc).__name__}: {exc}. "
                + self._reading()
            ) from exc

    def _reading(self) -> str:
        """How hessfast read the data and loss_fn, and how to override it."""
        if self.loss_form == "model":
            call, other = "loss_fn(model, batch)", "'criterion'"
        else:
            call, other = self._batch_split.describe(), "'model'"
        return (
            f"Read as: {self._data.rule}; loss_fn called as {call} because "
            f"{self.loss_form_reason}; if loss_fn takes the other form, pass loss_form={other}"
        )

    # -- products ----------------------------------------------------------------------
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        with self._ranks.barrier("a product"):  # every rank raises if one does
            self._fingerprint.check(self._kind)  # a rank without batches adds zeros:
            out = self._local_matmat(V) if self._data.num_samples else self._zeros(len(V))
        out = self._ranks.reduce(out)  # one all-reduce under a process group
        self._ranks.check_symmetry(self._symmetry, V, out)
        return out

    def refreshed(self) -> CurvatureOperator:
        """The same operator at the model's CURRENT parameter values: a new snapshot that
        reuses this one's checked structure, for a measurement repeated along training
        (:class:`~hessfast.analysis.tracking.SharpnessTracker` refreshes its operator at
        every point).

        Skipped, because it depends on the model's structure, modes, loss and data and not
        on the parameters' values: the pre-flight (the loss call and its form, the custom
        ``autograd.Function`` and graph-structure checks with their warnings, the
        repeatability check's second forward, forward-over-reverse's agreement), the data's
        first pass (the refreshed operator shares this one's batches and their recorded
        fingerprints: every pass is still verified against them, so changed data raises
        :class:`~hessfast.errors.DataChangedError`) and the planner's decisions (the
        product path and chunk sizes, timed or measured once) and the symmetry probe of the
        first two products (``u.(Hv) == v.(Hu)``: what it catches, a loss that is not a
        fixed function of the parameters, is a property of the model and loss, probed once
        on the operator this one descends from). Taken afresh: the parameters' fingerprint
        (checked before every product, as always), the buffers' values, the graphs (built
        by the first product) and the counters. Every product is still checked finite, so a
        parameter or loss that became NaN/Inf raises
        :class:`~hessfast.errors.NonFiniteError` on the first product.

        Returns:
            a new operator of the same class, model, loss, data and options.

        Raises:
            ConfigurationError: more than the values changed since this operator was built
                (a parameter or buffer added, removed or replaced, its dtype, device, shape
                or ``requires_grad``; the modules' modes under ``bn_mode="as_is"``), or the
                operator cannot be refreshed (finite-difference products, whose step and
                error are measured per snapshot; a process group, whose ranks agree on
                every snapshot): build a new operator with ``hf.hessian`` / ``hf.ggn``.
        """
        why = self._refresh_refusal()
        if why is not None:
            raise ConfigurationError(
                f"{type(self).__name__}.refreshed: {why}; build a new operator instead "
                f"(hf.{'ggn' if self._kind == 'GGN' else 'hessian'}(model, loss_fn, data, "
                "...), which runs the pre-flight again)")
        new = copy.copy(self)
        new.num_matvecs = new.num_passes = 0
        new._fingerprint = ParamFingerprint(self.model)
        new._buffers = BufferCopies(list(self.model.named_buffers()))
        new._buffers.written = list(self._buffers.written)  # its warning stays once
        new._graph_cache = {}
        new._fd_leaf_buffers = None
        new.__dict__.pop("_theta_norm_cache", None)
        planner = copy.copy(self._planner)
        planner.plans, planner.failures = dict(planner.plans), dict(planner.failures)
        planner.unavailable = dict(planner.unavailable)
        new._planner = planner
        new._proven = set(self._proven)
        new._symmetry = None  # probed on this operator's first products: the same function
        return new

    def _refresh_refusal(self) -> str | None:
        """Why :meth:`refreshed` cannot reuse this operator's checks (None: it can)."""
        if self._ranks.active:
            return "a process group's ranks agree on every snapshot"
        if (self._planner.requested == FD_MODE or self._planner.fallback is not None
                or self.hvp_mode == FD_MODE):
            return "finite-difference products measure their step and error per snapshot"
        if tensor_slots(self.model) != self._slots:
            return "the model's parameters or buffers were added, removed or replaced"
        if [_param_facts(p) for p in self._params] != self._param_facts:
            return "a selected parameter's dtype, device, shape or requires_grad changed"
        buffers = dict(self.model.named_buffers())
        for name, saved in self._buffers.saved.items():
            now = buffers.get(name)
            if now is None or now.shape != saved.shape or now.dtype != saved.dtype:
                return f"buffer {name!r} changed its shape or dtype"
        if self.bn_mode == "as_is" and [m.training for m in self.model.modules()] != self._modes:
            return "the modules' train/eval modes changed (bn_mode='as_is' keeps them)"
        return None

    def state_fingerprint(self) -> dict[str, str]:
        """What the curvature is a function of, for a checkpoint to bind to
        (:meth:`LinearOperator.state_fingerprint`): ``parameter:<name>`` for every parameter
        of the model (selected or not: all shape the loss) and ``buffer:<name>`` for every
        buffer as at construction, each ``"(shape):dtype:sha256"`` of its bits; the operator's
        kind, selected parameters, loss and its reduction, ``bn_mode``; and the data: the
        number of batches and samples, and each batch's size and bits (``data.contents``: one
        digest per batch, or per rank under a process group). Cost: one read of the
        parameters (SHA-256, ~0.2 s per 100 MB on 2 cores) and one pass over the batches
        without a forward (a DataLoader loads them once more); once per checkpointed run.

        Raises:
            ParametersChangedError: the parameters changed since the operator was built.
            DataChangedError: the data differ from the first pass.
        """
        loss = getattr(self.loss_fn, "__qualname__", type(self.loss_fn).__qualname__)
        out = {
            "operator": type(self).__name__,
            "params": digest_text(",".join(self.param_names)),
            "loss": f"{getattr(self.loss_fn, '__module__', '')}.{loss}",
            "loss_reduction": self.loss_reduction,
            "bn_mode": str(self.bn_mode),
            "data.batches": str(self.num_batches),
            "data.samples": str(self.num_samples),
        }
        with self._ranks.barrier("the operator's fingerprint for a checkpoint"):
            self._fingerprint.check(self._kind)
            out.update((f"parameter:{n}", tensor_digest(p))
                       for n, p in self.model.named_parameters())
            out.update((f"buffer:{n}", tensor_digest(b)) for n, b in self._buffers.saved.items())
            batches = ["0:empty"] * len(self._data.sizes)  # by the batch's index in data
            with torch.random.fork_rng(devices=self._rng_devices(self.device)):  # a loader's seed
                for i, batch, _ in self._data:
                    batches[i] = f"{self._data.sizes[i]}:{tensors_digest(tensor_leaves(batch))}"
        if self._ranks.comm is not None:  # each rank its own batches: every rank's digest
            mine = [0] * self._ranks.world_size
            mine[self._ranks.rank] = int(digest_text(",".join(batches))[:15], 16)
            every = self._ranks.comm.allreduce_ints(mine, "the checkpoint's data fingerprint")
            out["data.contents"] = ",".join(f"rank{r}:{v:015x}" for r, v in enumerate(every))
        elif len(batches) <= MAX_LISTED_BATCHES:  # a refusal names the changed batches
            out["data.contents"] = ",".join(batches)
        else:
            out["data.contents"] = digest_text(",".join(batches))
        return out

    def saved_bytes(self) -> int:
        """Bytes autograd saves for batch 0's first-order graph (forward and gradient with
        its graph, each storage once; :meth:`LinearOperator.saved_bytes`): measured by
        building that graph once more under the operator's guard (about one gradient; the
        user's model and RNG untouched), then cached. With
        ``hvp_mode="finite_difference"``: an ordinary gradient's graph (no ``create_graph``,
        the fused kernels), which is what its products hold. The model's parameters, which
        layers save for their backward, are not counted (the plan has them)."""
        if self._saved_bytes is None:
            fd = self._planner.requested == FD_MODE
            with self._guard(exact=not fd):
                index, batch = self._batch0()
                graph = self._first_order_graph if fd else self._graph
                self._saved_bytes = measure_saved(lambda: graph(batch, index),
                                                   exclude=self.model.parameters())[1]
        return self._saved_bytes

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.shape[0]}, params={len(self.param_names)}, "
            f"samples={self.num_samples}, batches={self.num_batches}, "
            f"hvp_mode={self.hvp_mode!r}, dtype={self.dtype}, device={self.device})"
        )


def _param_facts(p: torch.Tensor) -> tuple:
    """What a parameter's curvature rows depend on besides its values."""
    return (p.dtype, p.device, tuple(p.shape), p.requires_grad)


class _CheckedView:
    """The operator as its pre-flight checks see it (:class:`._contract.CheckedOperator`):
    public names for the few private pieces they use, so that the checks never hold the
    operator itself."""

    def __init__(self, op: CurvatureOperator) -> None:
        self.kind = op._kind
        self.model = op.model
        self.bn_mode = op.bn_mode
        self.loss_form = op.loss_form
        self.param_names = op.param_names
        self.param_dtype = op.param_dtype
        self.params = op.params
        self.batch_sizes = op.batch_sizes
        self.n = op.shape[0]
        self.dtype = op.dtype
        self.device = op.device
        # the finite-difference path is checked as it runs: ordinary gradients, fused kernels
        fd = op._planner.requested == FD_MODE
        self.guard = (lambda: op._guard(exact=False)) if fd else op._guard
        self.batch0 = op._batch0
        self.first_graph = op._first_graph
        self.loss_value = op._loss_value
        self.split = op._split
        self.graph_product = op._graph_product
        self.fwd_rev_product = op._fwd_rev_product
