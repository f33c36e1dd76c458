"""Which product path and chunk size a curvature operator uses for a block of k vectors.

An explicit ``hvp_mode`` is used as given. ``hvp_mode="auto"`` keeps every batch's graph
(``reuse_graph``) when the graphs fit in memory, and otherwise rebuilds them per pass
(``double_backward``); for blocks larger than ``REUSE_WITHOUT_TIMING`` it times the graph
path against forward-over-reverse on the first batch and takes the fastest. The decision
per block size and its reason are kept in an :class:`HVPPlan`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch

from ..errors import UnsupportedModelError
from .data import to_device

if TYPE_CHECKING:
    from .operator import CurvatureOperator

__all__ = ["HVPPlan", "HVP_MODES", "Planner", "available_memory"]

HVP_MODES = ("auto", "reuse_graph", "double_backward", "fwd_rev")

# Chunk sizes (rows of V per vmapped / batched call) that auto mode tries. Larger chunks
# amortise per-call overhead but grow activation memory linearly; on the 2-core CPU,
# forward-over-reverse at k=4 cost 0.55x its own k=1 per vector on a CNN while k=16 was
# worse than k=4 (memory traffic). Explicit modes use chunks of up to 32 rows.
# Timing a chunk of c rows costs about 2-3 c products, so the search is kept short: on a
# ResNet-20 a k=48 block spent 11.5 s choosing among 1/4/8/16/32/48 (three passes' worth).
CHUNK_CANDIDATES = (1, 4, 16)
MAX_CHUNK = 32
# Graph reuse beat forward-over-reverse and recomputed double backward at k = 1 and k = 4 on
# every model of bench/bench_hvp.py, on the 2-core CPU and on an H200 (2026-11-26); only
# larger blocks are timed.
REUSE_WITHOUT_TIMING = 4
# The graphs of all batches may take this fraction of the free memory.
GRAPH_MEMORY_FRACTION = 4


@dataclass(frozen=True)
class HVPPlan:
    """What the operator does for blocks of k vectors, and why.

    Attributes:
        mode: the product path, one of ``reuse_graph``, ``double_backward``, ``fwd_rev``.
        chunk: rows of a block per batched call.
        seconds_per_vector: the timings auto mode chose from (``"mode/chunk=c"`` -> s).
        reason: why this path.
    """

    mode: str
    chunk: int
    seconds_per_vector: dict[str, float] = field(default_factory=dict)
    reason: str = ""


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device`` (host: ``MemAvailable``; 2 GiB when it cannot be read)."""
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


class Planner:
    """The plans of one operator, one per block size, decided on first use."""

    def __init__(self, requested: str, fixed_chunk: int | None, reuse: bool | None) -> None:
        self.requested = requested
        self.fixed_chunk = fixed_chunk
        self.reuse = reuse
        self.plans: dict[int, HVPPlan] = {}
        # path -> why it cannot be used (it failed, or disagrees with double backward)
        self.unavailable: dict[str, str] = {}
        self._fits: tuple[bool, str] | None = None

    def plan_for(self, op: CurvatureOperator, k: int) -> HVPPlan:
        """The plan for blocks of ``k`` vectors (decided, and timed in auto mode, once)."""
        if k not in self.plans:
            if self.requested != "auto":
                chunk = self.fixed_chunk or min(k, MAX_CHUNK)
                self.plans[k] = HVPPlan(self.requested, chunk, reason="requested")
            else:
                self.plans[k] = self._auto_plan(op, k)
        return self.plans[k]

    def _reuse_fits(self, op: CurvatureOperator) -> tuple[bool, str]:
        if self._fits is None:
            self._fits = self._measure_fit(op)
        return self._fits

    def _measure_fit(self, op: CurvatureOperator) -> tuple[bool, str]:
        if self.reuse is not None:
            return bool(self.reuse), "reuse_graph set by the caller"
        if op.num_batches == 1:
            return True, "one batch: its graph is built once and kept"
        # Measure what one batch's graph holds (saved tensors) and extrapolate.
        index, batch = op._data.first()
        batch = to_device(batch, op.device)
        seen: dict[tuple[int, int], int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            try:
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                seen[key] = t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):
                seen[(id(t), 0)] = t.numel() * t.element_size()
            return t

        with op._guard(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            state = op._graph(batch, index)
        del state
        need = sum(seen.values()) * op.num_batches
        budget = available_memory(op.device) // GRAPH_MEMORY_FRACTION
        if need <= budget:
            return True, f"graphs of {op.num_batches} batches ~{need / 2**20:.0f} MiB fit"
        return False, (
            f"graphs of {op.num_batches} batches ~{need / 2**20:.0f} MiB exceed a quarter of "
            f"free memory ({budget / 2**20:.0f} MiB)"
        )

    def _auto_plan(self, op: CurvatureOperator, k: int) -> HVPPlan:
        fits, why_fits = self._reuse_fits(op)
        graph_mode = "reuse_graph" if fits else "double_backward"
        if fits and k <= REUSE_WITHOUT_TIMING and "reuse_graph" not in self.unavailable:
            # Timing costs about ten products on the first batch, as much as a whole
            # lambda_max on a small model; for small blocks the answer is known.
            return HVPPlan(
                "reuse_graph", self.fixed_chunk or k,
                reason=f"auto for k={k}: reuse_graph without timing (fastest at k <= "
                f"{REUSE_WITHOUT_TIMING} on every benchmark model, CPU and H200); {why_fits}",
            )
        index, batch = op._data.first()
        batch = to_device(batch, op.device)
        gen = torch.Generator(device="cpu").manual_seed(1234)
        chunks = (
            [self.fixed_chunk]
            if self.fixed_chunk
            else sorted({c for c in CHUNK_CANDIDATES if c <= k} or {k})
        )
        timings: dict[str, float] = {}
        best: tuple[float, str, int] | None = None
        for mode in (graph_mode, "fwd_rev"):
            if mode in self.unavailable:
                continue
            mode_best = math.inf
            try:
                with op._guard():
                    state = None if mode == "fwd_rev" else op._graph(batch, index)
                    for j, c in enumerate(chunks):
                        V = torch.randn(c, op.shape[0], generator=gen, dtype=op.dtype)
                        Vs = op._split(V.to(op.device))
                        if mode == "fwd_rev":
                            run = partial(op._fwd_rev_product, batch, Vs)
                        else:
                            run = partial(op._graph_product, state, Vs, retain=True)
                        if j == 0:
                            run()  # warm-up: allocator caches, lazy initialisation
                        # best of two: one timing on a busy 2-core machine can be 2x off
                        # and mislead the choice (seen on a 4-batch MLP at k=16)
                        dt = math.inf
                        for _rep in range(2 if c <= 4 else 1):
                            t0 = time.perf_counter()
                            run()
                            op._sync()
                            dt = min(dt, time.perf_counter() - t0)
                        if mode == "double_backward":
                            # rebuilding the graph is part of every product on this path
                            t1 = time.perf_counter()
                            state = op._graph(batch, index)
                            op._sync()
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
                self.unavailable[mode] = f"{type(exc).__name__}: {exc}"
                continue
        if best is None:
            raise UnsupportedModelError(
                "no Hessian-vector-product path works for this model: "
                + "; ".join(f"{m}: {r}" for m, r in self.unavailable.items())
            )
        per_vec, mode, c = best
        reason = (
            f"auto for k={k}: fastest of {len(timings)} timed on batch {index} "
            f"({per_vec * 1e3:.3g} ms/vector); {why_fits}"
        )
        if self.unavailable:
            reason += "; unavailable: " + "; ".join(
                f"{m} ({r[:120]})" for m, r in self.unavailable.items()
            )
        if mode != "reuse_graph":
            op.free_graphs()
        return HVPPlan(mode, c, timings, reason)
