"""Curvature operators of a model's loss: the Hessian and the generalized Gauss-Newton.

``hessian(model, loss_fn, data)`` returns a :class:`~hessfast.linop.LinearOperator` over the
flattened selected parameters. Its ``matmat(V)`` multiplies a whole block ``V: [k, n]`` in one
pass over the data, by one of three paths that give the same numbers:

* ``"reuse_graph"`` keeps each batch's first-order gradient graph (``create_graph=True``) and
  differentiates it again for every block (double backward, batched over the k rows with
  ``is_grads_batched``). A product then costs one backward pass and no forward; used when the
  graphs of all batches fit in memory.
* ``"double_backward"`` rebuilds that graph for every batch on every pass (forward, backward,
  double backward); memory stays at one batch's graph.
* ``"fwd_rev"`` is forward-over-reverse with ``torch.func``: ``jvp`` of ``grad``, ``vmap``-ped
  over chunks of the k tangents.

``hvp_mode="auto"`` times the available paths and chunk sizes on the first batch, per block
size k, and records what it picked and why on the operator.

The operator is exactly the Hessian of the loss averaged over all samples: each batch's mean
loss is weighted by its number of samples over the total, so an uneven last batch is exact.
Nothing here touches the user's model state: parameters enter as detached leaves through
``torch.func.functional_call``, modes are restored, buffers that training-mode layers would
update are copies, ``.grad`` is never written, and the global RNG is restored after each pass.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from .errors import (
    AsymmetricOperatorError,
    ConfigurationError,
    DataChangedError,
    EmptyDataError,
    LossError,
    NonDeterministicError,
    NonFiniteError,
    NoParametersError,
    NotReiterableError,
    UnsupportedModelError,
)
from .linop import LinearOperator

__all__ = ["CurvatureOperator", "GGNOperator", "HessianOperator", "ggn", "hessian"]

HVP_MODES = ("auto", "reuse_graph", "double_backward", "fwd_rev")
BN_MODES = ("eval", "train", "as_is")
LOSS_FORMS = ("auto", "criterion", "model")

# Chunk sizes (rows of V per vmapped / batched call) that auto mode tries. Larger chunks
# amortise per-call overhead but grow activation memory linearly; on the 2-core CPU,
# forward-over-reverse at k=4 cost 0.55x its own k=1 per vector on a CNN while k=16 was
# worse than k=4 (memory traffic). Explicit modes use chunks of up to 32 rows.
# Timing a chunk of c rows costs about 2-3 c products, so the search is kept short: on a
# ResNet-20 a k=48 block spent 11.5 s choosing among 1/4/8/16/32/48 (three passes' worth).
_CHUNK_CANDIDATES = (1, 4, 16)
_MAX_CHUNK = 32
# Graph reuse beat forward-over-reverse and recomputed double backward at k = 1 and k = 4 on
# every model of bench/bench_hvp.py, on the 2-core CPU and on an H200 (2026-11-26); only
# larger blocks are timed.
_REUSE_WITHOUT_TIMING = 4


# ---------------------------------------------------------------------------------------
# data handling
# ---------------------------------------------------------------------------------------
def _tensor_leaves(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensor_leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensor_leaves(v)]
    return []


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return type(obj)((k, _to_device(v, device)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _is_single_batch(data: Any) -> bool:
    """Is ``data`` one batch rather than a sequence of batches?

    A tensor or a dict is one batch. A tuple is one batch (``(inputs, targets)``) unless all
    its items are tuples/lists/dicts (then it is a tuple of batches). A list is one batch
    only when all its items are tensors (``[inputs, targets]``).
    """
    if isinstance(data, (torch.Tensor, dict)):
        return True
    if isinstance(data, tuple) and len(data) > 0:
        return not all(isinstance(x, (tuple, list, dict)) for x in data)
    if isinstance(data, list) and len(data) > 0:
        return all(isinstance(x, torch.Tensor) for x in data)
    return False


def _fingerprint(batch: Any) -> tuple:
    """Shapes and float64 sums of every tensor in a batch: cheap, and changes when the
    batches are reshuffled or augmented between passes."""
    fp = []
    for t in _tensor_leaves(batch):
        if t.numel() == 0:
            fp.append((tuple(t.shape), 0.0))
            continue
        td = t.detach()
        s = td.double().sum().item() if not td.is_complex() else td.abs().double().sum().item()
        fp.append((tuple(t.shape), s))
    return tuple(fp)


def _fingerprints_equal(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for (sa, va), (sb, vb) in zip(a, b, strict=False):
        if sa != sb:
            return False
        if math.isnan(va) and math.isnan(vb):
            continue  # a NaN batch is the same NaN batch; the loss check names it
        if not (va == vb or abs(va - vb) <= 1e-9 * max(abs(va), abs(vb), 1.0)):
            return False
    return True


class _Data:
    """A re-iterable source of batches with a fixed, verified content."""

    def __init__(
        self,
        data: Any,
        batch_size_fn: Callable[[Any], int] | None,
        verify: bool = True,
    ) -> None:
        if data is None:
            raise EmptyDataError("data is None: pass one batch or a re-iterable of batches")
        if _is_single_batch(data):
            self._source: Iterable = [data]
        else:
            if isinstance(data, Iterator) or (hasattr(data, "__next__")):
                raise NotReiterableError(
                    f"data is a one-shot iterator ({type(data).__name__}): a curvature "
                    "operator passes over the data many times. Pass a list of batches or a "
                    "DataLoader (re-iterable), e.g. data=list(your_generator)"
                )
            if not isinstance(data, Iterable):
                raise TypeError(
                    f"data must be one batch (tuple/dict of tensors) or a re-iterable of "
                    f"batches, got {type(data).__name__}"
                )
            self._source = data
        self._batch_size_fn = batch_size_fn
        self.sizes: list[int] = []
        self.fingerprints: list[tuple] = []
        skipped = 0
        self._first: tuple[int, Any] | None = None
        for i, batch in enumerate(self._source):
            size = self._size(batch)
            if size == 0:
                skipped += 1
            elif self._first is None:
                self._first = (i, batch)
            self.sizes.append(size)
            self.fingerprints.append(_fingerprint(batch))
        self.num_samples = sum(self.sizes)
        if self.num_samples == 0:
            raise EmptyDataError(
                f"data yielded {len(self.sizes)} batches and 0 samples: the Hessian of a loss "
                "over no data is undefined. Check the dataset / DataLoader is not empty"
            )
        if skipped:
            warnings.warn(f"hessfast: skipping {skipped} empty batch(es) in data", stacklevel=3)
        self.num_batches = sum(1 for s in self.sizes if s > 0)
        if verify and len(self.sizes) > 1:
            # A shuffling loader almost surely changes its first batch: one look at the
            # start of a second pass catches it before any curvature is computed.
            for _, batch in zip(range(1), self._source, strict=False):
                if not _fingerprints_equal(_fingerprint(batch), self.fingerprints[0]):
                    raise DataChangedError(
                        "the first batch differs between two passes over the data: the "
                        "loader shuffles or augments at random, so the operator would change "
                        "from one product to the next. Use shuffle=False and no random "
                        "augmentation, or materialise the batches once: data=list(loader)"
                    )

    def _size(self, batch: Any) -> int:
        if self._batch_size_fn is not None:
            return int(self._batch_size_fn(batch))
        leaves = _tensor_leaves(batch)
        if not leaves:
            raise TypeError(
                f"a batch of type {type(batch).__name__} holds no tensors; batches are "
                "(inputs, targets) tuples or dicts of tensors. For other batch types pass "
                "batch_size_fn=lambda batch: <number of samples>"
            )
        t = leaves[0]
        return int(t.shape[0]) if t.dim() > 0 else 1

    def __iter__(self) -> Iterator[tuple[int, Any, float]]:
        """Yield (index, batch, weight = batch size / total) and verify the content."""
        count = 0
        for i, batch in enumerate(self._source):
            if i >= len(self.sizes) or not _fingerprints_equal(
                _fingerprint(batch), self.fingerprints[i]
            ):
                raise DataChangedError(
                    f"batch {i} differs from the first pass over the data: the operator is "
                    "defined by a fixed set of batches. Turn off shuffling (shuffle=False, "
                    "no random sampler), random augmentation and drop_last with shuffling, "
                    "or materialise the batches once: data=list(loader)"
                )
            count += 1
            if self.sizes[i] == 0:
                continue
            yield i, batch, self.sizes[i] / self.num_samples
        if count != len(self.sizes):
            raise DataChangedError(
                f"data yielded {count} batches on this pass but {len(self.sizes)} on the "
                "first: the data must be the same on every pass (no shuffling, no "
                "drop_last with a random sampler); materialise it: data=list(loader)"
            )

    def first(self) -> tuple[int, Any]:
        """The first non-empty batch (kept from the first pass) and its index."""
        assert self._first is not None  # guaranteed by num_samples > 0
        return self._first


# ---------------------------------------------------------------------------------------
# model plumbing
# ---------------------------------------------------------------------------------------
class _LossModule(nn.Module):
    """model + loss as one module, so ``functional_call`` re-parametrises the model also
    when the loss is a ``loss_fn(model, batch)`` callable that calls it."""

    def __init__(self, model: nn.Module, loss_fn: Callable, form: str) -> None:
        super().__init__()
        self.model = model
        # A list, so an nn.Module criterion is not registered as a submodule.
        self._loss = [loss_fn]
        self._form = form

    def forward(self, batch: Any) -> torch.Tensor:
        loss_fn = self._loss[0]
        if self._form == "model":
            return loss_fn(self.model, batch)
        inputs, targets = _split_batch(batch)
        return loss_fn(self.model(inputs), targets)


class _OutputModule(nn.Module):
    """model outputs for the GGN (criterion form only)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.model(inputs)


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ConfigurationError(
        f"with a criterion loss_fn(outputs, targets) each batch must be an (inputs, targets) "
        f"pair, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + ". For other batches pass a callable loss_fn(model, batch) -> scalar"
    )


def _detect_loss_form(loss_fn: Callable, loss_form: str) -> str:
    if loss_form not in LOSS_FORMS:
        raise ConfigurationError(f"loss_form must be one of {LOSS_FORMS}, got {loss_form!r}")
    if loss_form != "auto":
        return loss_form
    if isinstance(loss_fn, nn.Module):
        return "criterion"
    if getattr(loss_fn, "__module__", "") and str(loss_fn.__module__).startswith("torch"):
        return "criterion"
    try:
        first = next(iter(inspect.signature(loss_fn).parameters))
    except (TypeError, ValueError, StopIteration):
        return "criterion"
    return "model" if first in ("model", "module", "net", "network") else "criterion"


def _select_params(
    model: nn.Module, params: Sequence[str] | Sequence[torch.Tensor] | None
) -> tuple[list[str], list[nn.Parameter]]:
    named = list(model.named_parameters())  # de-duplicates tied parameters
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise NoParametersError(
                f"the model has {len(named)} parameters and none requires grad: there is "
                "nothing to differentiate. Unfreeze some (p.requires_grad_(True)) or pass "
                "params=[...]"
            )
        return [n for n, _ in chosen], [p for _, p in chosen]
    params = list(params)
    if not params:
        raise NoParametersError("params=[] selects no parameters: pass names or tensors")
    by_name = dict(named)
    by_id = {id(p): n for n, p in named}
    names: list[str] = []
    for item in params:
        if isinstance(item, str):
            if item not in by_name:
                raise ConfigurationError(
                    f"params: no parameter named {item!r} in the model; names look like "
                    f"{[n for n, _ in named[:3]]}"
                )
            names.append(item)
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise ConfigurationError(
                    f"params: a tensor of shape {tuple(item.shape)} is not a parameter of the "
                    "model (pass the model's own nn.Parameter objects or their names)"
                )
            names.append(by_id[id(item)])
        else:
            raise TypeError(f"params items must be names or tensors, got {type(item).__name__}")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigurationError(f"params lists the same parameter twice: {dup}")
    frozen = [n for n in names if not by_name[n].requires_grad]
    if frozen:
        warnings.warn(
            f"hessfast: params includes frozen parameters {frozen}; they are differentiated "
            "anyway, as requested",
            stacklevel=3,
        )
    return names, [by_name[n] for n in names]


@contextmanager
def _model_modes(model: nn.Module, bn_mode: str) -> Iterator[None]:
    """Set the modes for a computation and restore every module's flags afterwards.

    Normalisation layers in training mode normalise with batch statistics whatever
    ``track_running_stats`` says; turning it off for the computation only stops their
    in-place running-statistics updates, which change nothing in the output but cannot run
    under ``torch.func`` transforms (and would otherwise need buffer copies).
    """
    saved = [(m, m.training) for m in model.modules()]
    tracked: list[tuple[nn.Module, bool]] = []
    try:
        if bn_mode == "eval":
            model.eval()
        elif bn_mode == "train":
            model.eval()
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    m.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.training:
                tracked.append((m, m.track_running_stats))
                m.track_running_stats = False
        yield
    finally:
        for m, flag in saved:
            m.training = flag
        for m, flag in tracked:
            m.track_running_stats = flag


def _active_stochastic_modules(model: nn.Module) -> list[str]:
    out = []
    for name, m in model.named_modules():
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd):
            out.append(f"{name or '<root>'} ({type(m).__name__})")
    return out


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 << 30


# ---------------------------------------------------------------------------------------
# the operator
# ---------------------------------------------------------------------------------------
@dataclass
class HVPPlan:
    """What auto mode chose for one block size k, and the timings it chose from."""

    mode: str
    chunk: int
    seconds_per_vector: dict[str, float] = field(default_factory=dict)
    reason: str = ""


class CurvatureOperator(LinearOperator):
    """Common machinery of :class:`HessianOperator` and :class:`GGNOperator`."""

    _kind = "curvature"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Any,
        *,
        params: Sequence[str] | Sequence[torch.Tensor] | None,
        bn_mode: str,
        hvp_mode: str,
        check: bool,
        check_deterministic: bool,
        batch_size_fn: Callable[[Any], int] | None,
        loss_form: str,
        chunk_size: int | None,
        reuse_graph: bool | None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if hvp_mode not in HVP_MODES:
            raise ConfigurationError(f"hvp_mode must be one of {HVP_MODES}, got {hvp_mode!r}")
        if bn_mode not in BN_MODES:
            raise ConfigurationError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ConfigurationError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.model = model
        self.loss_fn = loss_fn
        self.bn_mode = bn_mode
        self.loss_form = _detect_loss_form(loss_fn, loss_form)
        self.param_names, self._params = _select_params(model, params)
        devices = {p.device for p in self._params}
        if len(devices) > 1:
            raise ConfigurationError(
                f"the selected parameters live on several devices {sorted(map(str, devices))}; "
                "hessfast needs them on one device (move the model with model.to(device))"
            )
        dtypes = {p.dtype for p in self._params}
        if len(dtypes) > 1:
            raise ConfigurationError(
                f"the selected parameters have several dtypes {sorted(map(str, dtypes))}; "
                "cast the model to one dtype"
            )
        pdtype = dtypes.pop()
        if not pdtype.is_floating_point:
            raise ConfigurationError(f"parameters must be floating point, got {pdtype}")
        self.param_dtype = pdtype
        self.param_shapes: list[torch.Size] = [p.shape for p in self._params]
        self._numels = [p.numel() for p in self._params]
        self._offsets = [0]
        for m in self._numels:
            self._offsets.append(self._offsets[-1] + m)
        self._layout = list(
            zip(self.param_names, self._offsets[:-1], self._offsets[1:], self.param_shapes,
                strict=True)
        )
        device = devices.pop()
        # Products and their sums over batches in at least fp32 (bf16/fp16 models).
        super().__init__(self._offsets[-1], torch.promote_types(pdtype, torch.float32), device)

        # Iterating a DataLoader draws a seed from the global RNG: fork it (once around
        # both passes, so a shuffling loader still shows itself in the second one).
        with torch.random.fork_rng(devices=self._rng_devices(device)):
            self._data = _Data(data, batch_size_fn, verify=check)
        self.num_samples = self._data.num_samples
        self.num_batches = self._data.num_batches
        self._selected_ids = {id(p) for p in self._params}
        self._other_params = {
            n: p for n, p in model.named_parameters() if id(p) not in self._selected_ids
        }
        # Buffers that training-mode layers (BatchNorm) update in place are copies, so the
        # user's running statistics never move. In eval mode nothing writes them.
        copy_buffers = bn_mode != "eval"
        self._buffers = {
            n: (b.detach().clone() if copy_buffers else b) for n, b in model.named_buffers()
        }
        self._requested_mode = hvp_mode
        self._fixed_chunk = None if chunk_size is None else int(chunk_size)
        self._reuse_request = reuse_graph
        self._graph_cache: dict[int, Any] | None = None
        self._plans: dict[int, HVPPlan] = {}
        self._fits: tuple[bool, str] | None = None
        self._unavailable: dict[str, str] = {}
        self.hvp_mode: str = hvp_mode
        self.hvp_mode_reason: str = "not decided yet: decided on the first product"
        self.checked = False
        self._build_wrappers()
        if check:
            self._preflight(check_deterministic)
        if hvp_mode != "auto":
            self.hvp_mode_reason = "requested"

    # -- hooks for subclasses ----------------------------------------------------------
    def _build_wrappers(self) -> None:
        raise NotImplementedError

    def _graph(self, batch: Any, index: int) -> Any:
        """Build one batch's first-order graph (the state double backward needs)."""
        raise NotImplementedError

    def _graph_product(self, state: Any, V: list[torch.Tensor], retain: bool) -> torch.Tensor:
        """Products of one batch's graph with a chunk; ``V`` per parameter ``[c, *shape]``."""
        raise NotImplementedError

    def _fwd_rev_product(self, batch: Any, V: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # -- vector layout ---------------------------------------------------------------------
    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector ``[n]`` (or block ``[k, n]``) into parameter-shaped pieces."""
        lead = tuple(v.shape[:-1])
        return {
            name: v[..., a:b].reshape(*lead, *shape) for name, a, b, shape in self._layout
        }

    def flatten(self, tensors: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`unflatten`: parameter-shaped pieces to one vector ``[n]``."""
        if isinstance(tensors, dict):
            tensors = [tensors[n] for n in self.param_names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def _split(self, V: torch.Tensor) -> list[torch.Tensor]:
        k = V.shape[0]
        return [
            V[:, a:b].reshape(k, *shape) for _, a, b, shape in self._layout
        ]

    def _cat(self, pieces: Sequence[torch.Tensor | None], k: int) -> torch.Tensor:
        out = []
        for piece, numel in zip(pieces, self._numels, strict=False):
            if piece is None:
                out.append(torch.zeros(k, numel, dtype=self.dtype, device=self.device))
            else:
                out.append(piece.reshape(k, numel).to(self.dtype))
        return torch.cat(out, dim=1)

    def _leaves(self) -> list[torch.Tensor]:
        return [p.detach().requires_grad_(True) for p in self._params]

    def _state_dict_for(self, leaves: Sequence[torch.Tensor], prefix: str) -> dict:
        mapping = {prefix + n: t for n, t in zip(self.param_names, leaves, strict=False)}
        mapping.update({prefix + n: p.detach() for n, p in self._other_params.items()})
        mapping.update({prefix + n: b for n, b in self._buffers.items()})
        return mapping

    @staticmethod
    def _rng_devices(device: torch.device) -> list[int]:
        if device.type == "cuda":
            return [device.index if device.index is not None else torch.cuda.current_device()]
        return []

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Modes set and restored; the global RNG restored after the block."""
        devices = self._rng_devices(self.device)
        with torch.random.fork_rng(devices=devices), _model_modes(self.model, self.bn_mode):
            yield

    def _check_loss(self, loss: Any, index: int) -> None:
        if not isinstance(loss, torch.Tensor):
            raise LossError(
                f"loss_fn returned {type(loss).__name__} on batch {index}; it must return a "
                "scalar tensor (not a Python float: no .item())"
            )
        if loss.numel() != 1:
            raise LossError(
                f"loss_fn returned a tensor of shape {tuple(loss.shape)} on batch {index}; it "
                "must be a scalar: reduce it (reduction='mean')"
            )
        if not loss.is_floating_point():
            raise LossError(f"loss_fn returned dtype {loss.dtype}; it must be floating point")
        if not loss.requires_grad:
            raise LossError(
                f"the loss on batch {index} does not depend on the selected parameters "
                "(no grad_fn): do not compute it under torch.no_grad(), with .detach() or "
                ".item(), and check params selects parameters the loss uses"
            )
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteError(
                f"the loss is {loss.item()} on batch {index}: fix the data or the model "
                "(log(0), division by zero, overflow) before measuring curvature"
            )

    # -- products ----------------------------------------------------------------------------
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        k = V.shape[0]
        plan = self._plan_for(k)
        self.hvp_mode = plan.mode
        if self._requested_mode == "auto":
            self.hvp_mode_reason = plan.reason
        out = torch.zeros(k, self.shape[0], dtype=self.dtype, device=self.device)
        chunk = max(1, min(plan.chunk, k))
        with self._guard():
            if plan.mode == "reuse_graph":
                states = self._cached_graphs()
                for index, weight, state in states:
                    for a in range(0, k, chunk):
                        part = self._graph_product(state, self._split(V[a : a + chunk]), True)
                        self._check_finite(part, index)
                        out[a : a + chunk].add_(part, alpha=weight)
            else:
                for index, batch, weight in self._data:
                    batch = _to_device(batch, self.device)
                    if plan.mode == "double_backward":
                        state = self._graph(batch, index)
                        for a in range(0, k, chunk):
                            last = a + chunk >= k
                            part = self._graph_product(
                                state, self._split(V[a : a + chunk]), not last
                            )
                            self._check_finite(part, index)
                            out[a : a + chunk].add_(part, alpha=weight)
                        del state
                    else:
                        for a in range(0, k, chunk):
                            part = self._fwd_rev_product(batch, self._split(V[a : a + chunk]))
                            self._check_finite(part, index)
                            out[a : a + chunk].add_(part, alpha=weight)
        return out

    def _check_finite(self, part: torch.Tensor, index: int) -> None:
        if not torch.isfinite(part).all():
            raise NonFiniteError(
                f"the {self._kind} product on batch {index} contains NaN/Inf: the loss is "
                "finite but its second derivative is not (sqrt/norm at 0, log near 0, fp16 "
                "overflow). Use float32/float64 and check the model's numerics"
            )

    def _cached_graphs(self) -> list[tuple[int, float, Any]]:
        if self._graph_cache is None:
            self._graph_cache = {}
        if not self._graph_cache:
            for index, batch, weight in self._data:
                batch = _to_device(batch, self.device)
                self._graph_cache[index] = (weight, self._graph(batch, index))
        return [(i, w, s) for i, (w, s) in self._graph_cache.items()]

    def free_graphs(self) -> None:
        """Release the cached gradient graphs (the next product rebuilds them if needed)."""
        self._graph_cache = {} if self._graph_cache is not None else None

    # -- path choice -------------------------------------------------------------------------
    def _reuse_fits(self) -> tuple[bool, str]:
        if self._reuse_request is not None:
            return bool(self._reuse_request), "reuse_graph set by the caller"
        if self.num_batches == 1:
            return True, "one batch: its graph is built once and kept"
        # Measure what one batch's graph holds (saved tensors) and extrapolate.
        index, batch = self._data.first()
        batch = _to_device(batch, self.device)
        seen: dict[tuple[int, int], int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            try:
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                seen[key] = t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):
                seen[(id(t), 0)] = t.numel() * t.element_size()
            return t

        with self._guard(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            state = self._graph(batch, index)
        del state
        per_batch = sum(seen.values())
        need = per_batch * self.num_batches
        budget = _available_memory(self.device) // 4
        if need <= budget:
            return True, f"graphs of {self.num_batches} batches ~{need / 2**20:.0f} MiB fit"
        return False, (
            f"graphs of {self.num_batches} batches ~{need / 2**20:.0f} MiB exceed a quarter of "
            f"free memory ({budget / 2**20:.0f} MiB)"
        )

    def _plan_for(self, k: int) -> HVPPlan:
        if k in self._plans:
            return self._plans[k]
        mode = self._requested_mode
        if mode != "auto":
            chunk = self._fixed_chunk or min(k, _MAX_CHUNK)
            plan = HVPPlan(mode, chunk, reason="requested")
        else:
            plan = self._auto_plan(k)
        self._plans[k] = plan
        return plan

    def _auto_plan(self, k: int) -> HVPPlan:
        if self._fits is None:
            self._fits = self._reuse_fits()
        fits, why_fits = self._fits
        graph_mode = "reuse_graph" if fits else "double_backward"
        if fits and k <= _REUSE_WITHOUT_TIMING and "reuse_graph" not in self._unavailable:
            # Timing costs about ten products on the first batch, as much as a whole
            # lambda_max on a small model; for small blocks the answer is known.
            return HVPPlan(
                "reuse_graph", self._fixed_chunk or k,
                reason=f"auto for k={k}: reuse_graph without timing (fastest at k <= "
                f"{_REUSE_WITHOUT_TIMING} on every benchmark model, CPU and H200); {why_fits}",
            )
        index, batch = self._data.first()
        batch = _to_device(batch, self.device)
        gen = torch.Generator(device="cpu").manual_seed(1234)
        chunks = (
            [self._fixed_chunk]
            if self._fixed_chunk
            else sorted({c for c in _CHUNK_CANDIDATES if c <= k} or {k})
        )
        timings: dict[str, float] = {}
        best: tuple[float, str, int] | None = None
        for mode in (graph_mode, "fwd_rev"):
            if mode in self._unavailable:
                continue
            mode_best = math.inf
            try:
                with self._guard():
                    state = None if mode == "fwd_rev" else self._graph(batch, index)
                    for j, c in enumerate(chunks):
                        V = torch.randn(c, self.shape[0], generator=gen, dtype=self.dtype)
                        Vs = self._split(V.to(self.device))
                        if mode == "fwd_rev":
                            run = partial(self._fwd_rev_product, batch, Vs)
                        else:
                            run = partial(self._graph_product, state, Vs, True)
                        if j == 0:
                            run()  # warm-up: allocator caches, lazy initialisation
                        # best of two: one timing on a busy 2-core machine can be 2x off
                        # and mislead the choice (seen on a 4-batch MLP at k=16)
                        dt = math.inf
                        for _rep in range(2 if c <= 4 else 1):
                            t0 = time.perf_counter()
                            run()
                            self._sync()
                            dt = min(dt, time.perf_counter() - t0)
                        if mode == "double_backward":
                            # rebuilding the graph is part of every product on this path
                            t1 = time.perf_counter()
                            state = self._graph(batch, index)
                            self._sync()
                            dt += time.perf_counter() - t1
                        per_vec = dt / c
                        timings[f"{mode}/chunk={c}"] = per_vec
                        if best is None or per_vec < best[0]:
                            best = (per_vec, mode, c)
                        if per_vec > 1.05 * mode_best:
                            break  # larger chunks only add memory traffic from here on
                        mode_best = min(mode_best, per_vec)
                    del state
            except Exception as exc:  # noqa: BLE001 - a path that fails is just not used
                self._unavailable[mode] = f"{type(exc).__name__}: {exc}"
                continue
        if best is None:
            raise UnsupportedModelError(
                "no Hessian-vector-product path works for this model: "
                + "; ".join(f"{m}: {r}" for m, r in self._unavailable.items())
            )
        per_vec, mode, c = best
        reason = (
            f"auto for k={k}: fastest of {len(timings)} timed on batch {index} "
            f"({per_vec * 1e3:.3g} ms/vector); {why_fits}"
        )
        if self._unavailable:
            reason += "; unavailable: " + "; ".join(
                f"{m} ({r[:120]})" for m, r in self._unavailable.items()
            )
        if mode != "reuse_graph":
            self.free_graphs()
        return HVPPlan(mode, c, timings, reason)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- pre-flight ----------------------------------------------------------------------------
    def _preflight(self, check_deterministic: bool) -> None:
        """One small product on the first batch by every path: the loss is a valid scalar,
        the paths agree, the product is finite, symmetric and (optionally) repeatable."""
        index, batch = self._data.first()
        batch = _to_device(batch, self.device)
        gen = torch.Generator(device="cpu").manual_seed(0)
        V = torch.randn(2, self.shape[0], generator=gen, dtype=self.dtype).to(self.device)
        Vs = self._split(V)
        results: dict[str, torch.Tensor] = {}
        errors: dict[str, BaseException] = {}
        with self._guard():
            try:
                state = self._graph(batch, index)
                results["double_backward"] = self._graph_product(state, Vs, False)
            except (LossError, NonFiniteError, ConfigurationError):
                raise
            except Exception as exc:  # noqa: BLE001
                errors["double_backward"] = exc
                self._unavailable["double_backward"] = f"{type(exc).__name__}: {exc}"
                self._unavailable["reuse_graph"] = "double backward failed"
                state = None
            try:
                results["fwd_rev"] = self._fwd_rev_product(batch, Vs)
            except (LossError, NonFiniteError, ConfigurationError):
                raise
            except Exception as exc:  # noqa: BLE001
                errors["fwd_rev"] = exc
                self._unavailable["fwd_rev"] = f"{type(exc).__name__}: {exc}"
            if not results:
                raise UnsupportedModelError(
                    "neither double backward nor torch.func forward-over-reverse can "
                    "differentiate this model twice: "
                    + "; ".join(f"{m}: {type(e).__name__}: {e}" for m, e in errors.items())
                    + ". Common fixes: inplace=False on activations; "
                    "torch.backends.cudnn.flags(enabled=False) for RNNs; the math SDPA "
                    "backend for attention; checkpoint(use_reentrant=False)"
                ) from next(iter(errors.values()))
            requested = self._requested_mode
            if requested in ("reuse_graph", "double_backward") and "double_backward" in errors:
                raise UnsupportedModelError(
                    f"hvp_mode={requested!r} needs double backward, which fails here: "
                    f"{errors['double_backward']}; use hvp_mode='fwd_rev' or 'auto'"
                ) from errors["double_backward"]
            if requested == "fwd_rev" and "fwd_rev" in errors:
                raise UnsupportedModelError(
                    f"hvp_mode='fwd_rev' fails on this model: {errors['fwd_rev']}; use "
                    "hvp_mode='double_backward' or 'auto'"
                ) from errors["fwd_rev"]
            for hv in results.values():
                self._check_finite(hv, index)
            hv = next(iter(results.values()))
            # Element-wise comparisons are against the largest entry of the product.
            scale = max(hv.abs().max().item(), torch.finfo(self.dtype).tiny)
            eps = torch.finfo(self.param_dtype).eps
            if check_deterministic:
                # The RNG stream has advanced since the first product (the guard restores it
                # only at the end), so a dropout layer draws new masks on the rebuilt path.
                again = (
                    self._graph_product(self._graph(batch, index), Vs, False)
                    if state is not None
                    else self._fwd_rev_product(batch, Vs)
                )
                diff = (again - hv).abs().max().item()
                if diff > 1e3 * eps * scale:
                    active = _active_stochastic_modules(self.model)
                    cause = (
                        f"active stochastic layers: {', '.join(active)}; use bn_mode='eval' "
                        "(the default) or call model.eval()"
                        if active
                        else "a random operation in the model or loss (dropout, noise, "
                        "sampling), or non-deterministic kernels"
                    )
                    raise NonDeterministicError(
                        f"two products with the same vector on batch {index} differ by "
                        f"{diff:.3g} (scale {scale:.3g}): the curvature is random. Cause: "
                        f"{cause}. check_deterministic=False skips this check"
                    )
            # Both paths must agree: they compute the same matrix.
            if len(results) == 2:
                a, b = results["double_backward"], results["fwd_rev"]
                gap = (a - b).abs().max().item()
                if gap > 1e4 * eps * scale:
                    self._unavailable["fwd_rev"] = (
                        f"disagrees with double backward by {gap:.3g} (scale {scale:.3g})"
                    )
                    if self._requested_mode == "fwd_rev":
                        raise UnsupportedModelError(
                            f"torch.func forward-over-reverse disagrees with double backward "
                            f"by {gap:.3g} on this model; use hvp_mode='double_backward'"
                        )
            uHv = torch.dot(V[0].double(), hv[1].double()).item()
            vHu = torch.dot(V[1].double(), hv[0].double()).item()
            # |u.Hv| <= ||u|| ||Hv|| <= ||u|| sqrt(n) max|Hv|
            tol = 1e4 * eps * scale * math.sqrt(self.shape[0]) * float(V[0].norm().item())
            if abs(uHv - vHu) > tol:
                raise AsymmetricOperatorError(
                    f"u.(Hv) = {uHv:.6g} but v.(Hu) = {vHu:.6g} on batch {index}: the "
                    f"{self._kind} product is not symmetric, so the loss is not a fixed "
                    "function of the parameters (randomness, in-place updates of state)"
                )
        self.checked = True

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.shape[0]}, params={len(self.param_names)}, "
            f"samples={self.num_samples}, batches={self.num_batches}, "
            f"hvp_mode={self.hvp_mode!r}, dtype={self.dtype}, device={self.device})"
        )


def _graph_vjp(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor],
    retain: bool,
    batched: bool,
) -> tuple[torch.Tensor | None, ...]:
    """``autograd.grad`` over a chunk of grad_outputs: batched when it can, else a loop."""
    if not batched:
        return torch.autograd.grad(
            outputs, inputs, grad_outputs, retain_graph=retain, allow_unused=True
        )
    try:
        with warnings.catch_warnings():
            # The vmap fallback for an op without a batching rule warns per call.
            warnings.simplefilter("ignore", UserWarning)
            return torch.autograd.grad(
                outputs,
                inputs,
                grad_outputs,
                # kept even when the caller is done: the loop below may need it
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
    except RuntimeError:
        c = grad_outputs[0].shape[0]
        rows = [
            torch.autograd.grad(
                outputs, inputs, [g[i] for g in grad_outputs], retain_graph=True,
                allow_unused=True,
            )
            for i in range(c)
        ]
        return tuple(
            None if rows[0][j] is None else torch.stack([r[j] for r in rows])
            for j in range(len(inputs))
        )


class HessianOperator(CurvatureOperator):
    """The Hessian of the sample-weighted mean loss over the selected parameters."""

    _kind = "Hessian"

    def _build_wrappers(self) -> None:
        self._wrapper = _LossModule(self.model, self.loss_fn, self.loss_form)

    def _loss(self, leaves: Sequence[torch.Tensor], batch: Any) -> torch.Tensor:
        mapping = self._state_dict_for(leaves, "model.")
        return torch.func.functional_call(self._wrapper, mapping, (batch,))

    def _graph(self, batch: Any, index: int) -> Any:
        leaves = self._leaves()
        with torch.enable_grad():
            loss = self._loss(leaves, batch)
            self._check_loss(loss, index)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return leaves, grads, live

    def _graph_product(self, state: Any, V: list[torch.Tensor], retain: bool) -> torch.Tensor:
        leaves, grads, live = state
        c = V[0].shape[0]
        if not live:  # the gradient is constant: the Hessian is zero
            return torch.zeros(c, self.shape[0], dtype=self.dtype, device=self.device)
        outs = [grads[i] for i in live]
        vs = [V[i].to(self.param_dtype) for i in live]
        with torch.enable_grad():
            if c == 1:
                res = _graph_vjp(outs, leaves, [v[0] for v in vs], retain, False)
                res = tuple(None if r is None else r.unsqueeze(0) for r in res)
            else:
                res = _graph_vjp(outs, leaves, vs, retain, True)
        return self._cat(res, c)

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


class GGNOperator(CurvatureOperator):
    """The generalized Gauss-Newton ``sum_b w_b J_b^T H_b J_b``: J the Jacobian of the model
    outputs, H the Hessian of the criterion w.r.t. the outputs. PSD for convex criteria."""

    _kind = "GGN"

    def _build_wrappers(self) -> None:
        if self.loss_form != "criterion":
            raise ConfigurationError(
                "ggn needs a criterion loss_fn(outputs, targets) with (inputs, targets) "
                "batches, so that it can split the loss from the model outputs; got a "
                "loss_fn(model, batch) callable"
            )
        self._wrapper = _OutputModule(self.model)

    def _outputs(self, leaves: Sequence[torch.Tensor], inputs: Any) -> torch.Tensor:
        mapping = self._state_dict_for(leaves, "model.")
        out = torch.func.functional_call(self._wrapper, mapping, (inputs,))
        if not isinstance(out, torch.Tensor):
            raise ConfigurationError(
                f"ggn needs the model to return one tensor of outputs, got {type(out).__name__}"
            )
        return out

    def _graph(self, batch: Any, index: int) -> Any:
        inputs, targets = _split_batch(batch)
        leaves = self._leaves()
        with torch.enable_grad():
            out = self._outputs(leaves, inputs)
            out_d = out.detach().requires_grad_(True)
            loss = self.loss_fn(out_d, targets)
            self._check_loss(loss, index)
            g_out = torch.autograd.grad(loss, out_d, create_graph=True)[0]
            # J v through the double-vjp trick: u -> J^T u is linear, its vjp is J v.
            u = torch.zeros_like(out, requires_grad=True)
            jt_u = torch.autograd.grad(out, leaves, u, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(jt_u) if g is not None and g.requires_grad]
        return leaves, out, out_d, g_out, u, jt_u, live

    def _graph_product(self, state: Any, V: list[torch.Tensor], retain: bool) -> torch.Tensor:
        leaves, out, out_d, g_out, u, jt_u, live = state
        c = V[0].shape[0]
        if not live or not g_out.requires_grad:
            return torch.zeros(c, self.shape[0], dtype=self.dtype, device=self.device)
        batched = c > 1
        vs = [V[i].to(self.param_dtype) for i in live]
        outs = [jt_u[i] for i in live]
        with torch.enable_grad():
            if batched:
                jv = _graph_vjp(outs, [u], vs, True, True)[0]
                hjv = _graph_vjp([g_out], [out_d], [jv], True, True)[0]
                res = _graph_vjp([out], leaves, [hjv], retain, True)
            else:
                jv = torch.autograd.grad(outs, u, [v[0] for v in vs], retain_graph=True)[0]
                hjv = torch.autograd.grad(g_out, out_d, jv, retain_graph=True)[0]
                res = torch.autograd.grad(out, leaves, hjv, retain_graph=retain, allow_unused=True)
                res = tuple(None if r is None else r.unsqueeze(0) for r in res)
        return self._cat(res, c)

    def _fwd_rev_product(self, batch: Any, V: list[torch.Tensor]) -> torch.Tensor:
        inputs, targets = _split_batch(batch)
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
        with torch.enable_grad():
            out_d = out.requires_grad_(True)
            g_out = torch.autograd.grad(self.loss_fn(out_d, targets), out_d, create_graph=True)[0]
            if not g_out.requires_grad:  # loss linear in the outputs: H = 0
                return torch.zeros(c, self.shape[0], dtype=self.dtype, device=self.device)
            if c == 1:
                hjv = _graph_vjp([g_out], [out_d], [jv[0]], False, False)[0].unsqueeze(0)
            else:
                hjv = _graph_vjp([g_out], [out_d], [jv], False, True)[0]
        if c == 1:
            res = tuple(r.unsqueeze(0) for r in vjp_fn(hjv[0]))
        else:
            res = torch.func.vmap(vjp_fn)(hjv)
        return self._cat(res, c)


def hessian(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    params: Sequence[str] | Sequence[torch.Tensor] | None = None,
    bn_mode: str = "eval",
    hvp_mode: str = "auto",
    check: bool = True,
    check_deterministic: bool = True,
    batch_size_fn: Callable[[Any], int] | None = None,
    loss_form: str = "auto",
    chunk_size: int | None = None,
    reuse_graph: bool | None = None,
) -> HessianOperator:
    """The Hessian of the mean loss of ``model`` over ``data``, as a symmetric operator.

    Args:
        model: the network; never modified (modes restored, buffers untouched, no ``.grad``,
            global RNG restored).
        loss_fn: a criterion ``loss_fn(outputs, targets)`` for ``(inputs, targets)`` batches,
            or ``loss_fn(model, batch) -> scalar`` (detected by a first argument named
            ``model``, or forced with ``loss_form="model"``).
        data: one batch, or a re-iterable of batches (list, DataLoader without shuffling).
        params: parameter names or tensors to differentiate; default all trainable ones.
        bn_mode: ``"eval"`` (dropout off, BatchNorm running statistics), ``"train"``
            (BatchNorm with each batch's statistics, running statistics never updated,
            dropout off), ``"as_is"`` (the model's own modes; active dropout makes the
            pre-flight raise).
        hvp_mode: ``"auto"``, ``"reuse_graph"``, ``"double_backward"`` or ``"fwd_rev"``.
        check: run the pre-flight (one small product by every path on the first batch:
            valid loss, finite, symmetric, paths agree).
        check_deterministic: in the pre-flight, also repeat a product and require equality.
        batch_size_fn: number of samples of a batch (default: first dim of its first tensor).
        loss_form: ``"auto"``, ``"criterion"`` or ``"model"``.
        chunk_size: rows of a block per batched call (default: chosen by timing / up to 32).
        reuse_graph: force graph reuse on/off in auto mode (default: when it fits memory).

    Returns:
        :class:`HessianOperator` with ``shape == (n, n)``, n the number of selected
        parameter entries; ``matmat(V: [k, n]) -> [k, n]``.
    """
    return HessianOperator(
        model, loss_fn, data, params=params, bn_mode=bn_mode, hvp_mode=hvp_mode, check=check,
        check_deterministic=check_deterministic, batch_size_fn=batch_size_fn,
        loss_form=loss_form, chunk_size=chunk_size, reuse_graph=reuse_graph,
    )


def ggn(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    params: Sequence[str] | Sequence[torch.Tensor] | None = None,
    bn_mode: str = "eval",
    hvp_mode: str = "auto",
    check: bool = True,
    check_deterministic: bool = True,
    batch_size_fn: Callable[[Any], int] | None = None,
    chunk_size: int | None = None,
    reuse_graph: bool | None = None,
) -> GGNOperator:
    """The generalized Gauss-Newton ``J^T H_loss J`` of the mean loss (PSD for convex losses).

    ``loss_fn`` must be a criterion ``loss_fn(outputs, targets)`` (e.g.
    ``nn.CrossEntropyLoss()``, ``nn.MSELoss()``, or any twice-differentiable function of
    the outputs); batches are ``(inputs, targets)``. Other arguments as in :func:`hessian`.

    Returns:
        :class:`GGNOperator`, ``matmat(V: [k, n]) -> [k, n]``.
    """
    if callable(loss_fn) and _detect_loss_form(loss_fn, "auto") == "model":
        raise ConfigurationError(
            "ggn needs a criterion loss_fn(outputs, targets) with (inputs, targets) batches, "
            "so that it can split the loss from the model outputs; got a loss_fn(model, "
            "batch) callable. Pass the criterion (e.g. nn.CrossEntropyLoss()) instead"
        )
    return GGNOperator(
        model, loss_fn, data, params=params, bn_mode=bn_mode, hvp_mode=hvp_mode, check=check,
        check_deterministic=check_deterministic, batch_size_fn=batch_size_fn,
        loss_form="criterion", chunk_size=chunk_size, reuse_graph=reuse_graph,
    )
