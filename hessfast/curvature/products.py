"""Graphs and products of a curvature operator, batch by batch: batch 0's first-order graph
(built once, shared by the pre-flight, the graph-size probe and the reuse cache), the graph
cache, the timings of the paths on batch 0 that auto mode's planner decides from
(:meth:`BatchProducts._time_paths`), and the one loop that multiplies a block batch by batch,
chunk by chunk, on the path the planner chose (a path that raises on its first pass is
reported for an explicit ``hvp_mode`` or replaced by the next one in auto mode).

:class:`BatchProducts` is a mixin of :class:`~hessfast.curvature.operator.CurvatureOperator`;
it uses the operator's data source, planner, guard and the subclass's batch-level pieces
(``_graph``, ``_graph_product``, ``_fwd_rev_product``, ``_fd_product``).

The finite-difference path (``hvp_mode="finite_difference"``, or auto mode's fallback when
no exact second derivative exists) runs outside the exact paths' guard: no ``create_graph``,
no forced math SDPA backend, compiled code as compiled. Its step comes from
:func:`.finitediff.fd_step`, and its error is measured once, before its first product, on
batch 0 with a second step (:meth:`BatchProducts._fd_calibrate`: 4 gradients), recorded as
``fd_step`` / ``fd_error`` and given to the symmetry check as its tolerance.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch

from .._checks import probe_generator
from ..errors import HessfastError
from ..linop import local_norm
from ..memory import measure_saved
from .data import to_device
from .finitediff import (
    KinkRecorder,
    coarse_message,
    fd_error,
    fd_step,
    kink_message,
    perturbation_rounding,
    search_step,
)
from .plan import FD_MODE, HVPPlan
from .preflight import check_finite

__all__ = ["FD_WARN_ERROR", "BatchProducts", "ChunkProduct"]

#: A finite-difference error estimate above this warns once (at its measurement).
FD_WARN_ERROR = 0.05

# One batch's product with a chunk: (V per parameter [c, *shape], last chunk?) -> [c, n].
ChunkProduct = Callable[[list[torch.Tensor], bool], torch.Tensor]


class BatchProducts:
    """The graph cache and the chunk loop of a curvature operator (a mixin)."""

    # set by CurvatureOperator.__init__
    _data: Any
    _planner: Any
    _graph_cache: dict[int, tuple[float, Any]]
    _proven: set[str]
    _kind: str
    device: torch.device
    param_names: list[str]
    dtype: torch.dtype
    shape: tuple[int, int]
    compute_dtype: torch.dtype
    hvp_mode: str
    hvp_mode_reason: str
    fd_step: float | None
    fd_error: float | None
    fd_kinks: list[str] | None
    _symmetry: Any
    _params: Any

    # -- graphs --------------------------------------------------------------------------
    def _batch0(self) -> tuple[int, Any]:
        """The first non-empty batch's index, and the batch on the operator's device."""
        index, batch = self._data.first()
        return index, to_device(batch, self.device)

    def _first_graph(self) -> Any:
        """Batch 0's first-order graph, built once (call inside :meth:`_guard`): the
        pre-flight checks its loss, the planner measures its size, graph reuse keeps it."""
        index = self._data.first()[0]
        if index in self._graph_cache:
            return self._graph_cache[index][1]
        _, batch = self._batch0()
        if self._planner.requested == FD_MODE:  # no second derivative: a plain gradient
            return self._first_order_graph(batch, index)
        if self._planner.needs_graph_size:
            state, nbytes = measure_saved(lambda: self._graph(batch, index),
                                          exclude=self.model.parameters())
            self._planner.record_graph_size(nbytes, self._data.num_batches, self.device)
        else:
            state = self._graph(batch, index)
        if self._planner.keeps_graphs:
            self._graph_cache[index] = (self._data.weight(index), state)
        return state

    def _first_order_graph(self, batch: Any, index: int) -> Any:
        """The batch's loss and ordinary gradient (no ``create_graph``): what the pre-flight
        checks of a finite-difference operator (call inside ``_guard(exact=False)``)."""
        raise NotImplementedError

    def _cached_graphs(self) -> dict[int, tuple[float, Any]]:
        """Every batch's graph, built on first use (batch 0's may be there already)."""
        if len(self._graph_cache) < self._data.num_batches:
            for index, batch, weight in self._data:
                if index not in self._graph_cache:
                    state = self._graph(to_device(batch, self.device), index)
                    self._graph_cache[index] = (weight, state)
            self._graph_cache = dict(sorted(self._graph_cache.items()))
        return self._graph_cache

    def free_graphs(self) -> None:
        """Release the cached gradient graphs and the finite-difference leaf buffers (the
        next product rebuilds what it needs)."""
        self._graph_cache = {}
        self._fd_leaf_buffers: list[torch.Tensor] | None = None

    def _fd_leaves(self) -> list[torch.Tensor]:
        """The perturbed parameters' buffers of the finite-difference path: one
        parameter-sized set, made on first use and refilled in place by every gradient
        (fresh copies per gradient cost page faults and allocator churn at 0.5 GB a set)."""
        leaves = getattr(self, "_fd_leaf_buffers", None)
        if leaves is None:
            leaves = self._fd_leaf_buffers = [
                torch.empty_like(p.detach(), memory_format=torch.contiguous_format
                                 ).requires_grad_(True) for p in self._params]
        return leaves

    def _batch0_product(
        self, mode: str, batch: Any, index: int, V: list[torch.Tensor]
    ) -> torch.Tensor:
        """One product of batch 0 by ``mode`` (what auto mode times)."""
        if mode == "reuse_graph":
            return self._graph_product(self._first_graph(), V, retain=True)
        if mode == "double_backward":
            return self._graph_product(self._graph(batch, index), V, retain=False)
        if mode == FD_MODE:
            return self._fd_product(batch, index, V)
        return self._fwd_rev_product(batch, V)

    # -- timings (what auto mode's planner decides from) ---------------------------------
    def _time_paths(
        self, modes: list[str], k: int, chunks: list[int]
    ) -> dict[tuple[str, int], float]:
        """Seconds per vector of each mode and chunk size on batch 0, with the same vectors
        for every mode, so that forward-over-reverse is also checked against double
        backward (:data:`~.plan.TimePaths`). A mode that fails or disagrees is reported to
        the planner, which marks it unavailable.

        Graph reuse runs no forward, so timing a small block's chunks (1 against k, for
        1 < k <= 4) costs about 3 products of the block, once per block size. The batched
        call won on the MLPs and CNNs of bench/bench_hvp.py, and lost on a GPT-2 with a 50k
        vocabulary on the 2-core CPU (5.4 vs 3.0 gradients per vector at k=4, 2 x 64
        tokens): batching copies its ``[k, tokens, vocab]`` intermediates."""
        planner = self._planner
        index, batch = self._batch0()
        gen = probe_generator(1234)
        blocks = {
            c: torch.randn(c, self.shape[0], generator=gen, dtype=self.dtype) for c in chunks
        }
        per_vector: dict[tuple[str, int], float] = {}
        results: dict[tuple[str, int], torch.Tensor] = {}
        for mode in modes:
            mode_best = math.inf
            try:
                with self._guard():
                    for j, c in enumerate(chunks):
                        Vs = self._split(blocks[c].to(self.device))
                        if j == 0:  # warm-up: allocator caches, lazy initialisation
                            self._batch0_product(mode, batch, index, Vs)
                        # best of two: one timing on a busy 2-core machine can be 2x off
                        # and mislead the choice (seen on a 4-batch MLP at k=16)
                        dt = math.inf
                        for _rep in range(2 if c <= 4 else 1):
                            t0 = time.perf_counter()
                            results[(mode, c)] = self._batch0_product(mode, batch, index, Vs)
                            self._sync()
                            dt = min(dt, time.perf_counter() - t0)
                        per_vector[(mode, c)] = dt / c
                        if dt / c > 1.05 * mode_best:
                            break  # larger chunks only add memory traffic from here on
                        mode_best = min(mode_best, dt / c)
            except HessfastError:
                raise  # the user's to fix (a loss, a NaN), not a sign the path cannot run
            except Exception as exc:  # noqa: BLE001 - a path that fails is just not used
                planner.path_failed(mode, exc)
        for (mode, c), ref in results.items():
            other = results.get(("fwd_rev", c))
            if mode != "fwd_rev" and other is not None:
                planner.check_agreement(ref, other, self.compute_dtype)
        return per_vector

    # -- products ----------------------------------------------------------------------
    @property
    def plans(self) -> Mapping[int, HVPPlan]:
        """The plan (path, chunk, timings, reason) per block size used so far."""
        return MappingProxyType(self._planner.plans)

    def _plan_for(self, k: int) -> HVPPlan:
        """The planner's plan for blocks of ``k``, given the timings of batch 0."""
        planner = self._planner
        if k not in planner.plans and planner.requested == "auto" and planner.needs_graph_size:
            with self._guard():
                self._first_graph()  # measures the graph: the planner decides graph reuse
        return planner.plan_for(
            k, time=self._time_paths, timed_on=self._data.first()[0], release=self.free_graphs
        )

    def _local_matmat(self, V: torch.Tensor) -> torch.Tensor:
        k = V.shape[0]
        while True:
            plan = self._plan_for(k)
            try:
                if plan.mode == FD_MODE and self.fd_error is None:
                    self.free_graphs()  # an exact path's graphs are of no use from here on
                    self._fd_calibrate()
                out = self._run(plan, V)
                break
            except (HessfastError, MemoryError, torch.cuda.OutOfMemoryError):
                raise
            except Exception as exc:
                if plan.mode in self._proven:
                    raise
                # The path cannot run on this model: raises for an explicit hvp_mode, else
                # the next plan takes another path.
                self._planner.path_failed(plan.mode, exc)
                self.free_graphs()
        self._proven.add(plan.mode)
        self.hvp_mode = plan.mode
        if self._planner.requested == "auto":
            self.hvp_mode_reason = plan.reason
        return out

    def _run(self, plan: HVPPlan, V: torch.Tensor) -> torch.Tensor:
        """The one chunk loop: every batch, every chunk of ``plan.chunk`` rows."""
        k = V.shape[0]
        chunk = max(1, min(plan.chunk, k))
        # finite differences return a fresh [k, n] of their own: the first batch's becomes the
        # sum (one parameter-sized row fewer at a large model's peak); other paths' outputs
        # are accumulated into a zeroed block
        out = None if plan.mode == FD_MODE and chunk >= k else self._zeros(k)
        with self._guard(exact=plan.mode != FD_MODE):
            for index, weight, product in self._batch_products(plan.mode):
                for a in range(0, k, chunk):
                    part = product(self._split(V[a : a + chunk]), a + chunk >= k)
                    check_finite(part, index, self._kind, self.param_names, self._split)
                    if out is None:
                        out = part.mul_(weight)
                    else:
                        out[a : a + chunk].add_(part, alpha=weight)
        return self._zeros(k) if out is None else out

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
            if mode == FD_MODE:
                yield index, weight, lambda Vs, last, b=batch, i=index: self._fd_product(
                    b, i, Vs
                )
            elif mode == "double_backward":
                state = self._graph(batch, index)
                yield index, weight, lambda Vs, last, s=state: self._graph_product(
                    s, Vs, retain=not last
                )
            else:
                yield index, weight, lambda Vs, last, b=batch: self._fwd_rev_product(b, Vs)

    # -- finite differences ------------------------------------------------------------
    def _theta_norm(self) -> float:
        """``||theta||`` of the selected parameters (float64 sums; the operator is a
        snapshot, so it is computed once)."""
        cached = getattr(self, "_theta_norm_cache", None)
        if cached is None:
            sq = sum(float(p.detach().double().pow(2).sum()) for p in self._params)
            cached = self._theta_norm_cache = math.sqrt(sq)
        return cached

    def _fd_row(
        self, batch: Any, index: int, v: list[torch.Tensor], step: float,
        into: torch.Tensor | None = None, norms: list[float] | None = None,
    ) -> torch.Tensor:
        """``(g(theta + e v) - g(theta - e v)) / 2e`` of one batch for one vector (per
        parameter ``[*shape]``), flat ``[n]`` in the operator's dtype, written into ``into``
        (a zeroed ``[n]`` row; a new one when None): both gradients are accumulated into it,
        the second with the opposite sign, so one product holds this row and the perturbed
        parameters, nothing else parameter-sized. ``norms``, when given, gets
        ``||g(theta + e v)||`` appended (the size of what the difference's rounding acts on)."""
        out = self._zeros(1)[0] if into is None else into
        self._fd_accumulate(batch, index, v, step, out, 1.0)
        if norms is not None:
            norms.append(local_norm(out))
        self._fd_accumulate(batch, index, v, -step, out, -1.0)
        return out.div_(2.0 * step)

    def _fd_accumulate(
        self, batch: Any, index: int, v: list[torch.Tensor], step: float, into: torch.Tensor,
        sign: float,
    ) -> None:
        """Add ``sign * g(theta + step v)`` of the batch into the flat ``[n]`` row ``into``
        (operator dtype), through perturbed COPIES of the parameters: the user's tensors are
        only read."""
        raise NotImplementedError

    def _fd_product(self, batch: Any, index: int, V: list[torch.Tensor]) -> torch.Tensor:
        """Central-difference products of one batch with a chunk ``V`` (per parameter
        ``[c, *shape]``): two gradients per row, each row its own step
        (:func:`.finitediff.fd_step` of ``||theta||``, the row's norm and the compute
        dtype), written into the rows of one ``[c, n]`` block. Returns ``[c, n]``."""
        c = V[0].shape[0]
        theta = self._theta_norm()
        out = self._zeros(c)
        for j in range(c):
            row = [x[j] for x in V]
            # float32 norms (no float64 copies): the step needs a few digits of ||v||
            norm = math.sqrt(sum(float(torch.linalg.vector_norm(x)) ** 2 for x in row))
            if norm == 0.0:
                continue  # H 0 = 0
            step = fd_step(theta, norm, self.compute_dtype) * self._fd_scale
            self._fd_row(batch, index, row, step, into=out[j])
        return out

    def _fd_calibrate(self) -> None:
        """Measure the finite-difference error once on batch 0 (12-16 gradients): the products
        at the step ``e`` and at ``2e`` (:func:`.finitediff.fd_error`) of a seeded random
        unit vector ``r`` and of ``H r / ||H r||``, one power step towards the directions of
        largest curvature, where the loss is most nonlinear and the truncation error largest
        (on tiny transformers 10-100 times a random vector's). Sets ``fd_step`` (the step of
        a unit vector) and ``fd_error`` (the larger estimate), which the symmetry check's
        tolerance takes."""
        index, batch = self._batch0()
        step = fd_step(self._theta_norm(), 1.0, self.compute_dtype)
        self._fd_scale = 1.0

        def unit_random() -> list[torch.Tensor]:
            # drawn in the operator's dtype (a float64 draw is 1 GB at GPT-2 small's 124M),
            # and drawn again when needed rather than kept through the step search
            v = torch.randn(self.shape[0], generator=probe_generator(4321), dtype=self.dtype)
            v = v.div_(local_norm(v))
            return [x[0] for x in self._split(v.to(self.device).unsqueeze(0))]

        with self._guard(exact=False):
            Vs = unit_random()
            g_norms: list[float] = []
            with KinkRecorder() as kinks:  # which kinked functions the loss runs
                hv = self._fd_row(batch, index, Vs, step, norms=g_norms)
            self.fd_kinks = kinks.seen
            del Vs
            check_finite(hv.unsqueeze(0), index, self._kind, self.param_names, self._split)
            g_norm = g_norms[0]
            hv_norm = local_norm(hv)
            if hv_norm == 0.0:  # no curvature along v: keep the rule's step
                best, worst = step, 0.0
            else:  # one power step: the stiffest cheap direction, where the error peaks
                Ws = [x[0] for x in self._split(hv.div_(hv_norm).unsqueeze(0))]
                del hv
                params = [p.detach() for p in self._params]

                def rounding(e: float, pieces: list[torch.Tensor]) -> float:
                    lost, total = perturbation_rounding(params, pieces, e)
                    return math.sqrt(lost / total) if total > 0.0 else 0.0

                best, worst, _ = search_step(
                    lambda e: self._fd_row(batch, index, Ws, e), step, g_norm,
                    self.compute_dtype, rounding=lambda e: rounding(e, Ws))
                del Ws
                # and the random vector at the chosen step: a smaller step raises its
                # (rounding) error, relative to its smaller product
                Vs = unit_random()
                lo = self._fd_row(batch, index, Vs, best)
                hi = self._fd_row(batch, index, Vs, 2.0 * best)
                worst = max(worst, fd_error(lo, hi, best, g_norm, self.compute_dtype)
                            + rounding(best, Vs))
                del lo, hi, Vs
        self._fd_scale = best / step
        self.fd_step = best
        self.fd_error = worst
        if self._symmetry is not None:
            self._symmetry.relative_error = self.fd_error
        if self.fd_kinks:
            warnings.warn(kink_message(self.fd_kinks, f"the {self._kind}'s"), UserWarning,
                          stacklevel=5)
        if worst > FD_WARN_ERROR:
            warnings.warn(coarse_message(
                worst, "the finite-difference products'", "measured on batch 0",
                self.param_dtype, self.compute_dtype,
                "Use float32 parameters (autocast keeps the bf16 compute)",
                "; an exact hvp_mode avoids this error where the model allows one"),
                UserWarning, stacklevel=5)
