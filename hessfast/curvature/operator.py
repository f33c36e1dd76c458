"""The machinery both curvature operators share: validation, the parameter layout (flatten /
unflatten), the guard that leaves the user's model and RNG as they were, the loss checks,
the graph cache and the one loop that multiplies a block batch by batch, chunk by chunk.

A subclass supplies three products of one batch with a chunk of vectors (given per parameter
as ``[c, *shape]``, returned flat as ``[c, n]``): from a kept first-order graph
(:meth:`~CurvatureOperator._graph_product`, after :meth:`~CurvatureOperator._graph` built it)
and by forward-over-reverse (:meth:`~CurvatureOperator._fwd_rev_product`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..errors import ConfigurationError, LossError, NonFiniteError
from ..linop import LinearOperator
from .data import BatchSource, to_device
from .model import BN_MODES, LOSS_FORMS, model_modes, select_params
from .plan import HVP_MODES, HVPPlan, Planner
from .preflight import preflight

__all__ = ["CurvatureOperator", "CurvatureOptions", "graph_vjp"]

# One batch's product with a chunk: (V per parameter [c, *shape], last chunk?) -> [c, n].
ChunkProduct = Callable[[list[torch.Tensor], bool], torch.Tensor]


@dataclass(frozen=True)
class CurvatureOptions:
    """The options of :func:`~hessfast.hessian` and :func:`~hessfast.ggn` (documented
    there), validated once."""

    params: Sequence[str] | Sequence[torch.Tensor] | None = None
    bn_mode: str = "eval"
    hvp_mode: str = "auto"
    check: bool = True
    check_deterministic: bool = True
    batch_size_fn: Callable[[Any], int] | None = None
    loss_form: str = "auto"
    chunk_size: int | None = None
    reuse_graph: bool | None = None

    def __post_init__(self) -> None:
        if self.hvp_mode not in HVP_MODES:
            raise ConfigurationError(
                f"hvp_mode must be one of {HVP_MODES}, got {self.hvp_mode!r}"
            )
        if self.bn_mode not in BN_MODES:
            raise ConfigurationError(f"bn_mode must be one of {BN_MODES}, got {self.bn_mode!r}")
        if self.loss_form not in LOSS_FORMS:
            raise ConfigurationError(
                f"loss_form must be one of {LOSS_FORMS}, got {self.loss_form!r}"
            )
        if self.chunk_size is not None and int(self.chunk_size) < 1:
            raise ConfigurationError(f"chunk_size must be >= 1 or None, got {self.chunk_size}")


class CurvatureOperator(LinearOperator):
    """Common machinery of :class:`HessianOperator` and :class:`GGNOperator`."""

    _kind = "curvature"

    def __init__(
        self, model: nn.Module, loss_fn: Callable, data: Any, options: CurvatureOptions
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.bn_mode = options.bn_mode
        self.loss_form = self._decide_loss_form(options.loss_form)
        self.param_names, self._params = select_params(model, options.params)
        device, self.param_dtype = self._check_params()
        self.param_shapes: list[torch.Size] = [p.shape for p in self._params]
        self._numels = [p.numel() for p in self._params]
        offsets = [0]
        for m in self._numels:
            offsets.append(offsets[-1] + m)
        self._layout = list(
            zip(self.param_names, offsets[:-1], offsets[1:], self.param_shapes, strict=True)
        )
        # Products and their sums over batches in at least fp32 (bf16/fp16 models).
        dtype = torch.promote_types(self.param_dtype, torch.float32)
        super().__init__(offsets[-1], dtype, device)

        # Iterating a DataLoader draws a seed from the global RNG: fork it (once around
        # both passes, so a shuffling loader still shows itself in the second one).
        with torch.random.fork_rng(devices=self._rng_devices(device)):
            self._data = BatchSource(data, options.batch_size_fn, verify=options.check)
        self.num_samples = self._data.num_samples
        self.num_batches = self._data.num_batches
        selected = {id(p) for p in self._params}
        self._other_params = {
            n: p for n, p in model.named_parameters() if id(p) not in selected
        }
        # Buffers that training-mode layers (BatchNorm) update in place are copies, so the
        # user's running statistics never move. In eval mode nothing writes them.
        copy_buffers = options.bn_mode != "eval"
        self._buffers = {
            n: (b.detach().clone() if copy_buffers else b) for n, b in model.named_buffers()
        }
        fixed_chunk = None if options.chunk_size is None else int(options.chunk_size)
        self._planner = Planner(options.hvp_mode, fixed_chunk, options.reuse_graph)
        self._graph_cache: dict[int, tuple[float, Any]] = {}
        self.hvp_mode: str = options.hvp_mode
        self.hvp_mode_reason: str = (
            "not decided yet: decided on the first product"
            if options.hvp_mode == "auto"
            else "requested"
        )
        self._build_wrappers()
        if options.check:
            preflight(self, options.check_deterministic)

    def _check_params(self) -> tuple[torch.device, torch.dtype]:
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
        dtype = dtypes.pop()
        if not dtype.is_floating_point:
            raise ConfigurationError(f"parameters must be floating point, got {dtype}")
        return devices.pop(), dtype

    # -- hooks for subclasses ----------------------------------------------------------
    def _decide_loss_form(self, loss_form: str) -> str:
        raise NotImplementedError

    def _build_wrappers(self) -> None:
        raise NotImplementedError

    def _graph(self, batch: Any, index: int) -> Any:
        """Build one batch's first-order graph (the state double backward needs)."""
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
        """``[c, n]`` -> per parameter ``[c, *shape]`` (views)."""
        c = V.shape[0]
        return [V[:, a:b].reshape(c, *shape) for _, a, b, shape in self._layout]

    def _cat(self, pieces: Sequence[torch.Tensor | None], c: int) -> torch.Tensor:
        """Per parameter ``[c, *shape]`` (None: zero) -> ``[c, n]`` in the operator dtype."""
        out = []
        for piece, numel in zip(pieces, self._numels, strict=True):
            if piece is None:
                out.append(torch.zeros(c, numel, dtype=self.dtype, device=self.device))
            else:
                out.append(piece.reshape(c, numel).to(self.dtype))
        return torch.cat(out, dim=1)

    def _zeros(self, c: int) -> torch.Tensor:
        return torch.zeros(c, self.shape[0], dtype=self.dtype, device=self.device)

    def _leaves(self) -> list[torch.Tensor]:
        return [p.detach().requires_grad_(True) for p in self._params]

    def _state_dict_for(self, leaves: Sequence[torch.Tensor], prefix: str) -> dict:
        mapping = {prefix + n: t for n, t in zip(self.param_names, leaves, strict=True)}
        mapping.update({prefix + n: p.detach() for n, p in self._other_params.items()})
        mapping.update({prefix + n: b for n, b in self._buffers.items()})
        return mapping

    # -- guards and checks -------------------------------------------------------------
    @staticmethod
    def _rng_devices(device: torch.device) -> list[int]:
        if device.type == "cuda":
            return [device.index if device.index is not None else torch.cuda.current_device()]
        return []

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Modes set and restored; the global RNG restored after the block."""
        devices = self._rng_devices(self.device)
        with torch.random.fork_rng(devices=devices), model_modes(self.model, self.bn_mode):
            yield

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

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

    def _check_finite(self, part: torch.Tensor, index: int) -> None:
        if not torch.isfinite(part).all():
            raise NonFiniteError(
                f"the {self._kind} product on batch {index} contains NaN/Inf: the loss is "
                "finite but its second derivative is not (sqrt/norm at 0, log near 0, fp16 "
                "overflow). Use float32/float64 and check the model's numerics"
            )

    # -- products ----------------------------------------------------------------------
    @property
    def plans(self) -> Mapping[int, HVPPlan]:
        """The plan (path, chunk, timings, reason) per block size used so far."""
        return MappingProxyType(self._planner.plans)

    @property
    def _plans(self) -> dict[int, HVPPlan]:  # read by bench/bench_spectrum.py
        return self._planner.plans

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        k = V.shape[0]
        plan = self._planner.plan_for(self, k)
        self.hvp_mode = plan.mode
        if self._planner.requested == "auto":
            self.hvp_mode_reason = plan.reason
        out = self._zeros(k)
        chunk = max(1, min(plan.chunk, k))
        with self._guard():
            for index, weight, product in self._batch_products(plan.mode):
                for a in range(0, k, chunk):
                    part = product(self._split(V[a : a + chunk]), a + chunk >= k)
                    self._check_finite(part, index)
                    out[a : a + chunk].add_(part, alpha=weight)
        return out

    def _batch_products(self, mode: str) -> Iterator[tuple[int, float, ChunkProduct]]:
        """``(index, weight, product of this batch with a chunk)`` for every batch."""
        if mode == "reuse_graph":
            for index, (weight, state) in self._cached_graphs().items():
                yield index, weight, lambda Vs, last, s=state: self._graph_product(
                    s, Vs, retain=True
                )
            return
        for index, batch, weight in self._data:
            batch = to_device(batch, self.device)
            if mode == "double_backward":
                state = self._graph(batch, index)
                yield index, weight, lambda Vs, last, s=state: self._graph_product(
                    s, Vs, retain=not last
                )
            else:
                yield index, weight, lambda Vs, last, b=batch: self._fwd_rev_product(b, Vs)

    def _cached_graphs(self) -> dict[int, tuple[float, Any]]:
        if not self._graph_cache:
            for index, batch, weight in self._data:
                batch = to_device(batch, self.device)
                self._graph_cache[index] = (weight, self._graph(batch, index))
        return self._graph_cache

    def free_graphs(self) -> None:
        """Release the cached gradient graphs (the next product rebuilds them if needed)."""
        self._graph_cache = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.shape[0]}, params={len(self.param_names)}, "
            f"samples={self.num_samples}, batches={self.num_batches}, "
            f"hvp_mode={self.hvp_mode!r}, dtype={self.dtype}, device={self.device})"
        )


def graph_vjp(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor],
    *,
    retain: bool,
    batched: bool,
) -> tuple[torch.Tensor | None, ...]:
    """``autograd.grad`` of ``outputs`` w.r.t. ``inputs`` with ``grad_outputs``; ``batched``:
    each grad output carries a leading chunk dimension ``[c, ...]``, done in one call when
    autograd can batch it, else row by row."""
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
