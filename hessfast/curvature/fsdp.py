"""The Hessian of an FSDP2 (``fully_shard``) model by central finite differences of its
own sharded gradients: :class:`FSDPHessian`, which :func:`hessfast.hessian` returns when the
model holds ``FSDPModule`` s.

Why finite differences. torch cannot differentiate an FSDP model twice: FSDP2 frees the
gathered parameters after use and reduce-scatters the gradients in post-backward hooks
(outside autograd), so a second backward meets freed storage and unreduced gradients, and
forward-mode AD fails on its hooks. Two ordinary FSDP gradients per vector give
``H v ~= (g(theta + e v) - g(theta - e v)) / (2 e)`` instead (error O(e^2) plus rounding
O(eps / e), recorded as ``H.fd_error``).

What each rank holds. Every vector of the operator is SHARDED like the parameters: a rank's
``[k, n]`` block holds its local shards (``p.to_local()``) of the selected parameters,
flattened in ``model.named_parameters()`` order, so ``n = H.shape[0]`` differs between
ranks and no rank ever holds a whole vector. ``H.shards`` is the FSDP mesh's group
(a :class:`hessfast.distributed.Comm`): a dot product is the local one summed over it
(:func:`hessfast.linop.row_dots`). Algorithms that run on shards (the lean Krylov modes)
take such an operator; the others refuse it (:func:`hessfast.linop.refuse_sharded`).

One product row: the local shards are set to ``theta + e v`` in place (under ``no_grad``),
the user's loss runs forward and ``.backward()`` batch by batch on this rank's data (FSDP
all-gathers the parameters and reduce-scatters the gradient as in training), the local
gradient shards are read, the same with ``theta - e v``, and the shards are RESTORED by
copying back the copy kept at construction (never by subtraction: bit for bit). The
user's ``.grad`` (each parameter's own object, or None), the modules' modes (``bn_mode``)
and the buffers (copied back after each pass) and the RNG are as they were afterwards.

Batch weights. FSDP's reduce-scatter AVERAGES the gradient over the R ranks of its mesh.
Each batch loss is therefore scaled by ``R n_b / N`` (mean-reduced loss) or ``R / N``
(sum-reduced), with ``N`` all ranks' samples, so the operator is the Hessian of the loss
averaged over all samples of all ranks, for any batch sizes. Every backward is a
collective, so every rank must hold the SAME NUMBER of non-empty batches (refused
otherwise). A user-set gradient divide factor (``set_gradient_divide_factor``) is not seen
and would scale the products.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from .._checks import all_finite
from .._digest import digest_text, tensor_digest
from ..distributed import Comm
from ..errors import (
    ArgumentTypeError,
    AsymmetricOperatorError,
    ConfigurationError,
    EmptyDataError,
    NonDeterministicError,
    NonFiniteError,
    ParametersChangedError,
    UnsupportedModelError,
)
from ..linop import LinearOperator, local_dots, row_dots
from .data import BatchSource
from .finitediff import (
    KinkRecorder,
    coarse_message,
    fd_error_from_norms,
    fd_step,
    kink_message,
    perturbation_rounding,
    search_step,
)
from .lossform import decide_loss_form, loss_reduction
from .model import (
    BatchSplit,
    LossModule,
    active_stochastic_modules,
    model_modes,
    select_params,
)
from .options import CurvatureOptions
from .products import FD_WARN_ERROR

__all__ = ["FSDPHessian", "fsdp_kind"]

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
#: Two evaluations of a deterministic loss agree to this many units of rounding.
REPEAT_EPS = 1e3
#: Slack of the symmetry check of the first two products, in units of the FD error.
SYMMETRY_SLACK = 8.0


def fsdp_kind(model: nn.Module) -> str | None:
    """``"fully_shard"`` when some module of ``model`` is an FSDP2 ``FSDPModule``,
    ``"FullyShardedDataParallel"`` for FSDP1, else None. Imports nothing: FSDP is looked
    for only when the user's code has loaded it."""
    import sys

    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return None
    two = getattr(fsdp, "FSDPModule", None)
    one = getattr(fsdp, "FullyShardedDataParallel", None)
    mods = list(model.modules())
    if isinstance(two, type) and any(isinstance(m, two) for m in mods):
        return "fully_shard"
    if isinstance(one, type) and any(isinstance(m, one) for m in mods):
        return "FullyShardedDataParallel"
    return None


class FSDPHessian(LinearOperator):
    """The Hessian of an FSDP2 model's sample-mean loss over all ranks' data, by central
    finite differences of FSDP gradients, on SHARDED vectors (module docstring).

    The options are :func:`hessfast.hessian`'s, with these differences: ``hvp_mode`` is
    ``"auto"`` or ``"finite_difference"`` (the exact paths cannot run); ``exact=True`` is
    refused; ``process_group`` is not used (the group is the FSDP mesh's); ``chunk_size``,
    ``reuse_graph`` and ``fused_loss`` do not apply (each row is two plain gradients). A
    rank whose loss raises during a product leaves the others waiting in FSDP's own
    collectives until the group's timeout (construction's own steps agree through an
    error barrier).

    Attributes:
        model, loss_fn, bn_mode: as given.
        shards: the FSDP mesh's group (:class:`hessfast.distributed.Comm`): each rank's
            vectors are its local shards; dots are summed over it.
        params, param_names: the selected parameters (DTensors) and names, in layout order.
        param_dtype: their dtype; the products' dtype (``H.dtype``) is at least float32.
        compute_dtype: the least precise dtype the model computes in on any rank (one
            watched gradient of batch 0 at construction); the step, the error estimate and
            the symmetry tolerance follow it.
        local_sizes: each selected parameter's local shard entries (sum = ``shape[0]``).
        global_size: the number of entries of the unsharded vectors (sum over the ranks).
        loss_form, loss_form_reason, loss_reduction, loss_reduction_reason: as the other
            operators (:mod:`hessfast.curvature.lossform`).
        num_samples, num_batches: all ranks' samples and non-empty batches.
        batch_sizes: this rank's batch sizes.
        hvp_mode, hvp_mode_reason: ``"finite_difference"``, and why.
        fd_step: the step ``e`` of the last product row, along the unit vector;
            fd_error: the estimated relative error of the products (step doubling on the
            first vector and on one power step from it, the larger), None before the first
            product.
        fd_kinks: the kinked functions (ReLU, max-pooling, clamp, abs, ...) the loss ran in
            the first product, sorted (a warning names them: finite differences across a
            kink are biased, and fd_error cannot see it); None before the first product.
        num_gradients: FSDP gradient passes run (one pass = this rank's batches): 1 at
            construction, 2 per vector, 6 more once for the error estimate.
        theta_norm: ``||theta||`` over all ranks, at construction.
    """

    kind = "Hessian"
    _kind = "Hessian"
    checks_itself = True
    fresh_products = True  # each product is written into a new [k, n] block

    def __init__(
        self, model: nn.Module, loss_fn: Callable, data: Any, options: CurvatureOptions
    ) -> None:
        if getattr(options, "exact", False):
            raise ConfigurationError(
                "exact=True, but the model is sharded by FSDP (fully_shard): torch cannot "
                "differentiate an FSDP model twice, so no exact Hessian product exists. Drop "
                "exact=True to get finite-difference products on the local shards, or measure "
                "the unsharded model (its full state dict in a plain model) with "
                "process_group='auto'"
            )
        if options.hvp_mode not in ("auto", "finite_difference"):
            raise ConfigurationError(
                f"hvp_mode={options.hvp_mode!r}, but the model is sharded by FSDP "
                "(fully_shard), whose products can only be finite differences of its "
                "gradients: pass hvp_mode='auto' or 'finite_difference'"
            )
        if getattr(options, "lm_head", None) is not None:
            raise ConfigurationError("lm_head= is for ggn() only")
        self.model = model
        if loss_fn is None and options.causal_lm:
            loss_fn = nn.CrossEntropyLoss()
        if not callable(loss_fn):
            raise ArgumentTypeError(
                f"loss_fn must be callable (a criterion or loss_fn(model, batch)), got "
                f"{type(loss_fn).__name__}"
            )
        self.loss_fn = loss_fn
        self.bn_mode = options.bn_mode
        from torch.distributed.fsdp import FSDPModule

        # FSDP keeps the root's parameters gathered after a forward without a backward, and
        # model.parameters() are then the gathered plain tensors: reshard first (this only
        # frees the gathered copies; the shards are the parameters' values)
        self._fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self._reshard()
        names, params = select_params(model, options.params)
        self.param_names, self.params = list(names), tuple(params)
        self.shards = Comm(self._group_of(self.params, self.param_names))
        comm = self.shards
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise UnsupportedModelError(
                f"the selected parameters have several dtypes {sorted(map(str, dtypes))}: "
                "the finite-difference operator needs one (cast the model before fully_shard)"
            )
        self.param_dtype = dtypes.pop()
        self.compute_dtype = self.param_dtype
        locals_ = [p.to_local() for p in self.params]
        self.local_sizes = [t.numel() for t in locals_]
        device = locals_[0].device
        dtype = torch.promote_types(self.param_dtype, torch.float32)
        super().__init__(sum(self.local_sizes), dtype, device)
        self.global_size = comm.allreduce_ints([self.shape[0]], "the vector sizes")[0]

        # the data: this rank's batches (the same rule as hessian(): one batch or a sequence),
        # read inside an error barrier: a rank whose data fail makes every rank raise
        self._split = BatchSplit(options.outputs, options.targets, options.causal_lm)
        self.loss_form, self.loss_form_reason = "criterion", "no batch on this rank"
        with comm.error_barrier("the FSDP operator's data"):
            with torch.random.fork_rng(devices=[]):
                self._data = BatchSource(
                    data, options.batch_size_fn, verify=options.check,
                    max_batches=options.max_batches, allow_empty=True,
                )
            if self._data.num_samples > 0:
                _, first = self._data.first()
                self.loss_form, self.loss_form_reason = decide_loss_form(
                    loss_fn, options.loss_form, first, model, self._data.rule, [],
                    named_split=self._split.named,
                )
            found, where = loss_reduction(loss_fn)
            self._data.set_reduction(found, where, options.loss_reduction)
        mine = [self._data.num_batches, self._data.num_samples]
        counts = comm.allreduce_ints([mine[0], -mine[0]], "the batch counts", op="max")
        if counts[0] != -counts[1]:
            raise ConfigurationError(
                f"rank {comm.rank} holds {mine[0]} non-empty batches, but the ranks' counts "
                f"range from {-counts[1]} to {counts[0]}: every FSDP backward is a collective, "
                "so every rank must run the same number of batches. Give each rank the same "
                "number of batches (a DistributedSampler with drop_last=True, or equal lists); "
                "their sizes may differ"
            )
        self.num_batches, self.num_samples = comm.allreduce_ints(mine, "the sample counts")
        if self.num_samples == 0:
            raise EmptyDataError(
                "no rank holds any sample: the Hessian of a loss over no data is undefined. "
                "Give every rank the same number of non-empty batches"
            )
        self.batch_sizes = tuple(self._data.sizes)
        self.loss_reduction = self._data.reduction
        self.loss_reduction_reason = self._data.reduction_reason
        self._wrapper = LossModule(model, loss_fn, self.loss_form, self._split)

        # the copy the parameters are restored from (and checked against before a product)
        with torch.no_grad():
            self._theta = [t.detach().clone() for t in locals_]
            self._buffers = [(b, b.detach().clone()) for b in model.buffers()]
        sq = sum(float(t.double().pow(2).sum()) for t in self._theta)
        sq = float(comm.allreduce_sum_(torch.tensor([sq], dtype=torch.float64), "||theta||")[0])
        self.theta_norm = math.sqrt(sq)
        self._check = options.check
        self._deterministic = options.check and options.check_deterministic
        self.num_gradients = 0
        self.compute_dtype = self._watch_compute_dtype()
        self.hvp_mode = "finite_difference"
        self.hvp_mode_reason = (
            "the model is sharded by FSDP (fully_shard): torch cannot differentiate it twice "
            "(FSDP frees the gathered parameters and reduce-scatters gradients in hooks "
            "outside autograd), so products are central differences of two FSDP gradients"
        )
        self.fd_step: float | None = None
        self.fd_error: float | None = None
        self.fd_kinks: list[str] | None = None  # kinked functions the loss runs (1st product)
        # the first vector and its product (local), until the second arrives; None: done
        self._symmetry: list[torch.Tensor] | None = []
        self._fd_scale = 1.0  # the chosen step over the rule's (set by the first product)
        warnings.warn(
            f"hessfast: {self.hvp_mode_reason}; their relative error is estimated on the "
            "first product (H.fd_error). Pass exact=True to refuse instead",
            UserWarning, stacklevel=3,
        )

    # -- construction helpers ---------------------------------------------------------
    @staticmethod
    def _group_of(params: tuple[torch.Tensor, ...], names: list[str]) -> Any:
        """The one process group all selected parameters are sharded over (dim 0 of a 1-D
        mesh); anything else is refused."""
        try:
            from torch.distributed.tensor import DTensor, Shard
        except ImportError as exc:  # pragma: no cover - FSDP2 implies DTensor
            raise UnsupportedModelError(f"torch.distributed.tensor is unavailable: {exc}") from exc
        groups = []
        for name, p in zip(names, params, strict=True):
            if not isinstance(p, DTensor):
                raise UnsupportedModelError(
                    f"parameter {name!r} is not sharded by fully_shard (a plain tensor in an "
                    "FSDP model: its gradient is not reduced over the ranks). Apply fully_shard "
                    "to the root module too (fully_shard(model) after its submodules), or "
                    "select the sharded parameters only (params=)"
                )
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise UnsupportedModelError(
                    f"parameter {name!r} has placements {tuple(p.placements)} on a "
                    f"{p.device_mesh.ndim}-D mesh: the finite-difference operator supports "
                    "fully_shard on a 1-D mesh (Shard(0)) only, not HSDP or tensor parallelism"
                )
            groups.append(p.device_mesh.get_group())
        if any(g is not groups[0] for g in groups):
            raise UnsupportedModelError(
                "the selected parameters are sharded over different process groups: the "
                "finite-difference operator needs one mesh for the whole model"
            )
        return groups[0]

    def _watch_compute_dtype(self) -> torch.dtype:
        """The least precise dtype the model computes in, over all ranks: one gradient of
        batch 0 on every rank watched by :class:`.forwardcheck.GraphWatch` (a float64 model
        whose loss upcasts to float32, as transformers' causal-LM loss, differentiates to
        float32's rounding, which sets the step and the symmetry tolerance)."""
        from .forwardcheck import GraphWatch

        watch = GraphWatch(self.param_dtype)
        with self._passes():
            index, batch = self._data.first()
            with torch.enable_grad():
                with watch:
                    loss = self._wrapper(batch)
                loss.backward()
            with torch.no_grad():
                again = self._wrapper(batch) if self._deterministic else loss
        self.num_gradients += 1
        order = sorted(_FLOATS, key=lambda d: torch.finfo(d).eps)
        mine = order.index(watch.compute_dtype) if watch.compute_dtype in order else 0
        least = self.shards.allreduce_ints([mine], "the compute dtype", op="max")[0]
        dtype = order[least]
        a, b = float(loss.detach()), float(again)
        random = not (a == b or abs(a - b) <= REPEAT_EPS * torch.finfo(dtype).eps
                      * max(abs(a), abs(b)))
        if self.shards.allreduce_ints([int(random)], "the determinism check")[0]:
            active = active_stochastic_modules(self.model)
            raise NonDeterministicError(
                f"two evaluations of the loss on batch {index} differ "
                f"{f'({a:.9g} vs {b:.9g})' if random else 'on another rank'}: the curvature "
                "is random and finite differences of it are noise. Cause: "
                + (f"active stochastic layers {', '.join(active)}; use bn_mode='eval' (the "
                   "default) or call model.eval()" if active else
                   "a random operation in the model or loss (dropout, noise, sampling)")
                + ". check_deterministic=False skips this check"
            )
        return dtype

    # -- the state the products leave as they found it --------------------------------
    @contextmanager
    def _passes(self) -> Iterator[None]:
        """Modes, the user's ``.grad``, buffers and the RNG saved around a product; the
        parameters' local shards restored from the copy (bit for bit)."""
        self._reshard()  # model.parameters() are the sharded ones only when resharded
        all_params = list(self.model.parameters())
        grads = [p.grad for p in all_params]
        try:
            for p in all_params:
                p.grad = None
            with torch.random.fork_rng(devices=self._rng_devices()), \
                    model_modes(self.model, self.bn_mode):
                yield
        finally:
            self._reshard()
            with torch.no_grad():
                for p, theta in zip(self.params, self._theta, strict=True):
                    p.to_local().copy_(theta)
                for b, saved in self._buffers:
                    b.copy_(saved)
            for p, g in zip(all_params, grads, strict=True):
                p.grad = g

    def _reshard(self) -> None:
        """Free every FSDP module's gathered parameters, so that the next forward
        all-gathers the local shards as they are now. FSDP keeps the root's parameters
        gathered after a forward (it expects the backward), so a forward without a backward
        (``no_grad`` evaluation, the user's or ours) would otherwise leave a stale gathered
        copy that ignores the shards just set."""
        for m in self._fsdp_modules:
            m.reshard()

    def _rng_devices(self) -> list[int]:
        if self.device.type == "cuda":
            return [self.device.index if self.device.index is not None else 0]
        return []

    def _check_unchanged(self) -> None:
        """Raise ParametersChangedError on every rank when some rank's shards differ from
        the copy taken at construction (an optimizer step, a load)."""
        changed = [
            name for name, p, theta in zip(self.param_names, self.params, self._theta,
                                          strict=True)
            if not torch.equal(p.to_local(), theta)
        ]
        flags = self.shards.allreduce_ints([len(changed)], "the parameter check")
        if flags[0]:
            raise ParametersChangedError(
                f"the model's parameters changed since the operator was built"
                f"{' (on this rank: ' + ', '.join(changed[:4]) + ')' if changed else ''}: an "
                "operator is the curvature at the parameters it was built at. Build a new "
                "operator after an optimizer step or a load"
            )

    # -- one gradient at theta + step * v ---------------------------------------------
    def _gradient(self, v: torch.Tensor, step: float) -> torch.Tensor:
        """The FSDP gradient's local shards ``[n]`` (in ``self.dtype``) of the weighted loss
        at ``theta + step * v`` (``v`` this rank's shards ``[n]``)."""
        self._reshard()
        with torch.no_grad():
            offset = 0
            for p, theta, size in zip(self.params, self._theta, self.local_sizes, strict=True):
                piece = v[offset:offset + size].view(theta.shape)
                offset += size
                # summed in float64 and rounded ONCE to the parameters' dtype
                moved = theta.double() + step * piece.double()
                p.to_local().copy_(moved.to(self.param_dtype))
            for b, saved in self._buffers:
                b.copy_(saved)
            for p in self.model.parameters():
                p.grad = None
        world = self.shards.size
        with torch.enable_grad():
            for _, batch, weight in self._data:
                loss = self._wrapper(batch)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise ConfigurationError(
                        f"loss_fn must return a scalar tensor, got "
                        f"{getattr(loss, 'shape', type(loss).__name__)}"
                    )
                # FSDP averages over the ranks: R * weight makes the global sample mean
                (loss * (world * weight * self._data.num_samples / self.num_samples)).backward()
        self.num_gradients += 1
        out = torch.empty(self.shape[0], dtype=self.dtype, device=self.device)
        offset = 0
        for p, size in zip(self.params, self.local_sizes, strict=True):
            g = p.grad
            if g is None:
                out[offset:offset + size] = 0
            else:
                out[offset:offset + size] = g.to_local().reshape(-1).to(self.dtype)
            offset += size
        return out

    def _central(self, v: torch.Tensor, step: float, mean: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(g(theta + e v) - g(theta - e v)) / 2e`` ``[n]`` and, when ``mean`` (the error
        estimate's gradient norm), the gradient at theta ``(g+ + g-) / 2`` ``[n]``, else
        None: one row fewer at the product's peak (local shards)."""
        plus = self._gradient(v, step)
        minus = self._gradient(v, -step)
        grad = (plus + minus).mul_(0.5) if mean else None
        plus.sub_(minus)
        del minus
        return plus.div_(2.0 * step), grad

    @property
    def product_error(self) -> float | None:
        """``fd_error`` (known from the first product on; see
        :attr:`hessfast.LinearOperator.product_error`)."""
        return self.fd_error

    def _rounding(self, v: torch.Tensor, step: float) -> float:
        """:func:`.finitediff.perturbation_rounding` of this rank's shards ``v [n]`` at
        ``step``, summed over the ranks: the relative part of ``e v`` that rounding
        ``theta + e v`` to the parameters' dtype loses."""
        pieces, offset = [], 0
        for theta, size in zip(self._theta, self.local_sizes, strict=True):
            pieces.append(v[offset:offset + size].view(theta.shape))
            offset += size
        lost, total = perturbation_rounding(list(self._theta), pieces, step)
        lost, total = (float(x) for x in self.shards.allreduce_sum_(
            torch.tensor([lost, total], dtype=torch.float64), "the perturbation's rounding"))
        return math.sqrt(lost / total) if total > 0.0 else 0.0

    def _step_doubling(self, hv: torch.Tensor, hv2: torch.Tensor, grad_sq: torch.Tensor,
                       step: float) -> float:
        """:func:`.finitediff.fd_error_from_norms` of the products ``hv`` (step ``e``) and
        ``hv2`` (``2e``) of one vector, with the gradient's local squared norm ``grad_sq``,
        the norms summed over the ranks."""
        local = torch.stack([self._sq(hv2 - hv).cpu(), self._sq(hv).cpu(),
                             grad_sq.double().cpu()])
        diff, size, g = (math.sqrt(max(float(x), 0.0)) for x in self.shards.allreduce_sum_(
            local, "the finite-difference error estimate"))
        return fd_error_from_norms(diff, size, step, g, self.compute_dtype)

    @staticmethod
    def _sq(t: torch.Tensor) -> torch.Tensor:
        """The local squared norm of ``t``, a 0-d float64 tensor (the row can be freed),
        summed in float64 slices (:func:`hessfast.linop.local_dots`: no float64 copy of the
        whole row)."""
        flat = t.reshape(1, -1)
        return local_dots(flat, flat)[0]

    def _estimate_error(self, hv: torch.Tensor, grad_sq: torch.Tensor) -> float:
        """Choose the step and estimate the products' relative error, once, along one power
        step from the first vector, ``Hv`` (the stiffest direction found cheaply, where the
        error peaks): :func:`.finitediff.search_step` halves (or doubles) the rule's step
        while the step-doubling estimate falls (a few products, once); sets
        ``self._fd_scale``, the factor later products apply to the rule's step. Norms are
        summed over the ranks, so every rank takes the same steps. At most 3 more rows live
        at once beside ``hv``."""
        w = hv  # read only: the products below only read their vector
        wn = float(row_dots(self, w.unsqueeze(0), w.unsqueeze(0))[0]) ** 0.5
        if wn == 0.0:
            return 0.0
        g = float(self.shards.allreduce_sum_(grad_sq.double().cpu().reshape(1),
                                             "the gradient's norm")[0]) ** 0.5

        def norm(t: torch.Tensor) -> float:
            return float(row_dots(self, t.reshape(1, -1), t.reshape(1, -1))[0]) ** 0.5

        w_step = fd_step(self.theta_norm, wn, self.compute_dtype)
        best, error, _ = search_step(lambda e: self._central(w, e)[0], w_step, g,
                                     self.compute_dtype, norm=norm,
                                     rounding=lambda e: self._rounding(w, e))
        self._fd_scale = best / w_step
        if error > FD_WARN_ERROR:
            warnings.warn(coarse_message(
                error, "the FSDP finite-difference products'", "measured with the first product",
                self.param_dtype, self.compute_dtype,
                "Keep float32 parameters (MixedPrecisionPolicy(param_dtype=torch.bfloat16) "
                "computes in bf16 from float32 shards)"), UserWarning, stacklevel=4)
        return error

    # -- the product --------------------------------------------------------------------
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` for this rank's shards ``V [k, n]``: 2 FSDP gradients per row."""
        self._check_unchanged()
        norms = row_dots(self, V, V).sqrt()  # [k], over all ranks
        out = torch.empty_like(V)
        with self._passes():
            for i in range(V.shape[0]):
                vn = float(norms[i])
                if vn == 0.0:
                    out[i] = 0
                    continue
                first = self.fd_error is None
                step = fd_step(self.theta_norm, vn, self.compute_dtype) * self._fd_scale
                # the first product notes which kinked functions the loss runs
                with KinkRecorder() if first else nullcontext() as kinks:
                    hv, grad = self._central(V[i], step, mean=first)
                out[i] = hv
                del hv
                if first:
                    self.fd_kinks = kinks.seen
                    if self.fd_kinks:
                        warnings.warn(kink_message(self.fd_kinks, "the FSDP Hessian's"),
                                      UserWarning, stacklevel=4)
                    assert grad is not None
                    grad_sq = self._sq(grad)
                    del grad
                    self.fd_error = self._estimate_error(out[i], grad_sq)
                    # this row again at the chosen step, and at twice it: a smaller step
                    # raises a random vector's (rounding) error relative to its product
                    step *= self._fd_scale
                    out[i] = self._central(V[i], step)[0]
                    twice = self._central(V[i], 2.0 * step)[0]
                    error = self._step_doubling(out[i], twice, grad_sq, step)
                    del twice
                    self.fd_error = max(self.fd_error, error + self._rounding(V[i], step))
                self.fd_step = step * vn  # the step along the unit vector
        bad = int(not all_finite(out))
        if self.shards.allreduce_ints([bad], "the finiteness check")[0]:
            raise NonFiniteError(
                "a finite-difference product of the FSDP model is NaN or Inf (on "
                f"{'this rank' if bad else 'another rank'}): the loss or its gradient "
                "overflows near the parameters; check the loss at theta, or use float32"
            )
        if self._check and self._symmetry is not None:
            self._observe(V, out)
        return out

    def _observe(self, V: torch.Tensor, HV: torch.Tensor) -> None:
        """The symmetry check of the first two vectors multiplied: ``u.(Hv) = v.(Hu)`` within
        the finite-difference error."""
        assert self._symmetry is not None
        if not self._symmetry:  # keep the first vector and its product (2 rows), no more
            self._symmetry = [V[0].clone(), HV[0].clone()]
            if V.shape[0] < 2:
                return
            V, HV = V[1:], HV[1:]
        u, hu = (t.unsqueeze(0) for t in self._symmetry)
        v, hv = V[:1], HV[:1]  # the second vector, read where it is
        dots = row_dots(self, torch.cat([u, v, u, v, hu, hv]), torch.cat([hv, hu, u, v, hu, hv]))
        uhv, vhu, uu, vv, hh_u, hh_v = (float(x) for x in dots)
        self._symmetry = None  # done: keep no vectors
        scale = math.sqrt(uu * hh_v) + math.sqrt(vv * hh_u)
        eps = torch.finfo(self.compute_dtype).eps
        # capped: a huge estimate (a random loss) must not wave any asymmetry through
        tol = SYMMETRY_SLACK * min(max(self.fd_error or 0.0, 64 * eps), 0.05)
        if abs(uhv - vhu) > tol * max(scale, 1e-300):
            raise AsymmetricOperatorError(
                f"the finite-difference Hessian of the FSDP model is not symmetric: "
                f"|u.(Hv) - v.(Hu)| = {abs(uhv - vhu):.3g} against the scale {scale:.3g} "
                f"(allowed {tol:.3g} relative, from the estimated error {self.fd_error:.3g}). "
                "The loss is random (dropout in bn_mode='as_is', sampling) or the step is "
                "too small for the dtype: make the loss deterministic or use float32/float64"
            )

    # -- the contract ---------------------------------------------------------------------
    def state_fingerprint(self) -> dict[str, str]:
        """This rank's part of the state: every selected parameter's local shard (shape,
        dtype, SHA-256), the buffers, the loss and its reduction, ``bn_mode``, the data's
        counts and this rank's batches' bits, and the rank's place in the group."""
        self._check_unchanged()
        loss = getattr(self.loss_fn, "__qualname__", type(self.loss_fn).__qualname__)
        out = {
            "operator": type(self).__name__,
            "rank": f"{self.shards.rank} of {self.shards.size}",
            "params": digest_text(",".join(self.param_names)),
            "loss": f"{getattr(self.loss_fn, '__module__', '')}.{loss}",
            "loss_reduction": self.loss_reduction,
            "bn_mode": str(self.bn_mode),
            "data.batches": str(self.num_batches),
            "data.samples": str(self.num_samples),
            "data.contents": digest_text(repr(self._data.fingerprints)),
        }
        for name, theta in zip(self.param_names, self._theta, strict=True):
            out[f"parameter:{name}"] = tensor_digest(theta)
        for (name, _), (_, saved) in zip(self.model.named_buffers(), self._buffers,
                                         strict=True):
            out[f"buffer:{name}"] = tensor_digest(saved)
        return out

    def __repr__(self) -> str:
        return (f"FSDPHessian(n={self.shape[0]} of {self.global_size} on rank "
                f"{self.shards.rank} of {self.shards.size}, dtype={self.dtype}, "
                f"finite differences)")
