"""The communication layer of :mod:`hessfast.distributed`: every collective hessfast runs goes
through :class:`Comm`, and the process-group helpers (:func:`init`, :func:`shutdown`,
:func:`session`, :func:`is_initialized`, :func:`world_size`, :func:`rank`,
:func:`is_main_process`) and shard arithmetic (:func:`shard_bounds`) live here.
:mod:`.mesh` builds on this module; this module imports nothing from it.

Collectives run outside autograd on detached, contiguous float32/float64 buffers (a plain
``dist.all_reduce`` has no autograd kernel, and gloo has no bfloat16 reductions), so a
product's buffer is never part of a graph. Two kinds of collective exist:

* :meth:`Comm.allreduce_sum_`: ONE flat all-reduce of a block product ``[k, n]`` in its own
  dtype (float32, or float64 for float64 operators);
* :meth:`Comm.error_barrier`: a small int all-reduce of a per-rank error flag run before
  every large collective. When one rank raised (a NaN batch, a changed parameter, a bad
  batch), every rank raises: the failing rank its own error, the others
  :class:`~hessfast.errors.DistributedError` naming the failing rank(s) and their error.
  No rank is left waiting in the big collective.

Agreement: :meth:`Comm.agree` compares what every rank holds (an operator's parameters and
options at construction, an algorithm's arguments before its first product) in ONE all-gather
of a fixed-size digest; on a difference every rank raises
:class:`~hessfast.errors.DistributedError` naming the ranks and the first differing entry.

Exit without a crash: no hessfast collective leaves a buffer with gloo's worker thread
when the process exits (a SIGABRT otherwise); :mod:`hessfast.distributed._gloo_settle` says
why and how. :func:`shutdown` lets the worker finish too before it destroys the group.

Sharded vectors (:mod:`hessfast.lanczos.sharded`): :func:`shard_bounds` gives each rank a
contiguous 128-aligned slice of ``[0, n)`` and :meth:`Comm.allgather_cols` rebuilds full rows
from the slices.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import DistributedError
from . import _gloo_settle as settle

# The longest failure message one rank sends to the others.
_MESSAGE_CHARS = 600
# An agreement digest: SHA-256 of the entries (32 bytes), then their byte length (8 bytes).
_SHA_BYTES = 32
# The longest value of an entry quoted in a disagreement message.
_VALUE_CHARS = 160
#: Shard boundaries of a sharded vector are multiples of this many entries (or n).
SHARD_ALIGN = 128


def shard_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """The contiguous slice ``[lo, hi)`` of ``[0, n)`` that ``rank`` of ``size`` stores: the
    ``ceil(n / 128)`` aligned units are split as evenly as possible (earlier ranks get the
    fewer), so boundaries are multiples of :data:`SHARD_ALIGN` and may straddle parameters;
    a rank's slice may be empty when ``n`` is small."""
    units = -(-n // SHARD_ALIGN)
    lo = min(n, SHARD_ALIGN * (rank * units // size))
    hi = min(n, SHARD_ALIGN * ((rank + 1) * units // size))
    return lo, hi


def shard_size(n: int, size: int) -> int:
    """The largest slice :func:`shard_bounds` gives any of ``size`` ranks (entries)."""
    return max(hi - lo for lo, hi in (shard_bounds(n, size, r) for r in range(size)))


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    """Is a default process group initialised (``torch.distributed`` present and set up)?"""
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized())


def world_size(group: Any = None) -> int:
    """Processes in ``group`` (default group); 1 without an initialised process group."""
    return _dist().get_world_size(group) if is_initialized() else 1


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (default group); 0 without a process group."""
    return _dist().get_rank(group) if is_initialized() else 0


def is_main_process(group: Any = None) -> bool:
    """True on rank 0, or without a process group: the one process that prints and writes."""
    return rank(group) == 0


def init(backend: str | None = None, timeout_s: float | None = None) -> None:
    """Initialise the default process group from torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); a no-op when one exists. Pair it with
    :func:`shutdown` at the end (also after a caught error), or use :func:`session`.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available (each rank
            then uses GPU ``LOCAL_RANK``), else gloo.
        timeout_s: the group's collective timeout in seconds (default torch's). It must
            exceed one pass over the largest rank's data: ranks wait for each other there.
    """
    dist = _dist()
    if not dist.is_available():
        raise DistributedError(
            "torch.distributed is not available in this torch build: install a torch with "
            "distributed support, or run on one process (process_group=None)"
        )
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=float(timeout_s))
    dist.init_process_group(backend, **kwargs)


def shutdown() -> None:
    """Tear down the default process group and every group made from it, without a barrier:
    safe after a caught error (a rank that failed, a lost peer), a no-op without a group and
    when called twice.

    It first lets torch's communication threads finish with the last collective (the cause
    of a SIGABRT at exit, module docstring), then calls
    ``torch.distributed.destroy_process_group()``. A failure of that teardown (a peer already
    gone) is reported as a warning: the process can still exit cleanly.
    """
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return
    settle.drain()
    settle.let_workers_run()
    try:
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - the process is leaving; say it, do not raise
        warnings.warn(
            f"hessfast.distributed.shutdown: destroy_process_group raised "
            f"{type(exc).__name__}: {exc}; the process group is abandoned",
            stacklevel=2,
        )


@contextmanager
def session(backend: str | None = None, timeout_s: float | None = None) -> Iterator[None]:
    """:func:`init` on entry and :func:`shutdown` on exit, whether the block returned or
    raised (the exception propagates)::

        with hf.distributed.session():        # torchrun's environment
            H = hf.hessian(model, loss_fn, my_shard)
            r = hf.eigsh(H, k=5)

    A process group that existed before the block is left to whoever created it (call
    :func:`shutdown` yourself). Arguments as for :func:`init`.
    """
    created = not is_initialized()
    init(backend, timeout_s)
    try:
        yield
    finally:
        if created:
            shutdown()


class Comm:
    """A process group as hessfast uses it.

    Args:
        group: a ``torch.distributed`` process group (None: the default group).

    Attributes:
        group, rank, size: the group, this process's rank in it and its size.
        backend: the group's backend name (``"gloo"``, ``"nccl"``, ...).
    """

    def __init__(self, group: Any = None) -> None:
        dist = _dist()
        settle.register_exit_hook()  # once per process that communicates
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group)).lower()

    def _device(self, like: torch.device | None = None) -> torch.device:
        """Where a buffer must live for this backend: NCCL needs CUDA, gloo takes the CPU
        (a mixed ``cpu:gloo,cuda:nccl`` group keeps a buffer where it is)."""
        if "nccl" in self.backend:
            if like is not None and like.type == "cuda":
                return like
            if "gloo" not in self.backend:
                return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_reduce(self, buf: torch.Tensor, op: Any, what: str) -> None:
        dist = _dist()
        small = settle.is_small([buf])
        work = buf.clone() if small else buf
        try:
            with settle.settled([work], small):
                dist.all_reduce(work, op=op, group=self.group)
            if small:
                buf.copy_(work)
        except Exception as exc:  # noqa: BLE001 - a timeout or a lost peer, said as such
            raise DistributedError(
                f"rank {self.rank} of {self.size}: the all-reduce of {what} failed "
                f"({type(exc).__name__}: {exc}). Another rank stopped (it crashed or was "
                "killed), did not take part (every rank of the process group must build the "
                "operator and run the same algorithm; for an operator on one process only, "
                "pass process_group=None), or its pass over the data took longer than the "
                "group's timeout (init_process_group(timeout=...))"
            ) from exc

    def _all_gather(self, buf: torch.Tensor, what: str, hint: str) -> list[torch.Tensor]:
        """Every rank's ``buf`` (equal shapes), in rank order; a failed collective becomes a
        DistributedError whose message ends with ``hint``."""
        small = settle.is_small([buf] * (self.size + 1))
        src = buf.detach().clone() if small else buf
        parts = [torch.empty_like(src) for _ in range(self.size)]
        try:
            with settle.settled([src, *parts], small), torch.no_grad():
                _dist().all_gather(parts, src, group=self.group)
        except Exception as exc:  # noqa: BLE001 - a timeout or a lost peer, said as such
            raise DistributedError(
                f"rank {self.rank} of {self.size}: the all-gather of {what} failed "
                f"({type(exc).__name__}: {exc}). {hint}"
            ) from exc
        return [p.clone() for p in parts] if small else parts

    def _gather_bytes(self, payload: bytes, what: str, longest: int | None = None) -> list[bytes]:
        """Every rank's ``payload``, in rank order: one all-gather of ``uint8`` buffers
        padded to the longest payload (``longest``, or learnt in a first all-gather of the
        lengths)."""
        device = self._device()  # NCCL gathers on the GPU
        if longest is None:
            size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
            sizes = self._all_gather(size, f"the sizes of {what}", "Another rank stopped")
            longest = max(int(x) for x in sizes)
        buf = torch.zeros(max(longest, 1), dtype=torch.uint8)
        if payload:
            buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        parts = self._all_gather(buf.to(device), what, "Another rank stopped")
        return [bytes(p.cpu().tolist()) for p in parts]

    def allreduce_sum_(self, buf: torch.Tensor, what: str = "a block product") -> torch.Tensor:
        """Sum ``buf`` (any shape, e.g. ``[k, n]``) over the ranks in ONE flat all-reduce, in
        place where the backend allows; returns the summed tensor (same dtype and device).

        float32 and float64 reduce as they are; other floating dtypes are reduced in
        float32 (gloo has no bfloat16). The buffer is detached: no autograd involvement.
        """
        if self.size == 1:
            return buf
        src = buf.detach()
        dtype = src.dtype if src.dtype in (torch.float32, torch.float64) else torch.float32
        device = self._device(src.device)
        work = src.to(device=device, dtype=dtype).contiguous()
        with torch.no_grad():
            self._all_reduce(work.view(-1), _dist().ReduceOp.SUM, what)
        if work.data_ptr() == src.data_ptr():
            return src
        return work.to(device=src.device, dtype=src.dtype)

    def allgather_cols(self, local: torch.Tensor, n: int, what: str) -> torch.Tensor:
        """Rows sharded by columns to full rows: this rank's ``local [r, hi - lo]`` (its
        :func:`shard_bounds` slice of ``n``) -> ``[r, n]`` on every rank, same dtype and
        device. One ``all_gather`` of equal buffers padded to the largest shard (float32, or
        float64 for float64 rows)."""
        lo, hi = shard_bounds(n, self.size, self.rank)
        if local.shape[1] != hi - lo:
            raise ValueError(f"local must have {hi - lo} columns (shard [{lo}, {hi}) of "
                             f"{n}), got shape {tuple(local.shape)}")
        rows, width = local.shape[0], shard_size(n, self.size)
        dtype = torch.float64 if local.dtype == torch.float64 else torch.float32
        device = self._device(local.device)
        buf = torch.zeros(rows, width, dtype=dtype, device=device)
        buf[:, : hi - lo] = local.detach().to(device=device, dtype=dtype)
        parts = self._all_gather(buf, what, "Another rank stopped or did not take part")
        out = torch.empty(rows, n, dtype=local.dtype, device=local.device)
        for r, part in enumerate(parts):
            a, b = shard_bounds(n, self.size, r)
            out[:, a:b] = part[:, : b - a].to(device=local.device, dtype=local.dtype)
        return out

    def allreduce_ints(self, values: Sequence[int], what: str, op: str = "sum") -> list[int]:
        """Elementwise ``sum`` or ``max`` of a few integers over the ranks."""
        buf = torch.tensor(list(values), dtype=torch.int64, device=self._device())
        reduce_op = _dist().ReduceOp.SUM if op == "sum" else _dist().ReduceOp.MAX
        with torch.no_grad():
            self._all_reduce(buf, reduce_op, what)
        return [int(x) for x in buf.tolist()]

    def agree(self, what: str, entries: Sequence[tuple[str, str]], fix: str) -> None:
        """Check that every rank holds the same ``entries`` (``(label, value)`` pairs in
        order, e.g. ``("argument k", "5")``).

        Cost: ONE all-gather of a ``[40]`` byte digest per rank (SHA-256 of the entries and
        their length). Only when the digests differ, a second all-gather brings every rank's
        entries, and every rank raises the same :class:`~hessfast.errors.DistributedError`.

        Args:
            what: what is compared, the start of the message (e.g. ``"hessfast.eigsh"``).
            entries: this rank's ``(label, value)`` pairs; values are compared as text.
            fix: the last sentence of the message: how to make the ranks agree.

        Raises:
            DistributedError: on every rank, naming the first label whose values differ, each
                rank's value (ranks with equal values grouped) and how many labels differ.
        """
        payload = json.dumps([[str(k), str(v)] for k, v in entries]).encode()
        digest = hashlib.sha256(payload).digest() + len(payload).to_bytes(8, "big")
        buf = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(self._device())
        parts = self._all_gather(
            buf, f"the agreement digests of {what}",
            "Another rank stopped, or ran something else at this point (every rank must "
            "build the same operators and run the same algorithms, in the same order)",
        )
        if all(torch.equal(p, buf) for p in parts):
            return
        longest = max(int.from_bytes(bytes(p[_SHA_BYTES:].cpu().tolist()), "big")
                      for p in parts)
        got = self._gather_bytes(payload, f"the entries of {what}", longest=longest)
        tables = [json.loads(g.rstrip(b"\0").decode() or "[]") for g in got]
        raise DistributedError(_disagreement(what, tables, fix))

    @contextmanager
    def error_barrier(self, what: str) -> Iterator[None]:
        """Run the block, then agree on whether any rank raised in it.

        Every rank enters the barrier whether its block raised or not (one small int
        all-reduce of ``[size]`` flags). None raised: nothing happens. Some raised: the
        failing ranks re-raise their own error, every other rank raises
        :class:`~hessfast.errors.DistributedError` naming the failing ranks and their
        errors (gathered in one extra collective on this error path only).
        """
        failure: Exception | None = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the barrier
            failure = exc
        if self.size == 1:
            if failure is not None:
                raise failure
            return
        flags = [0] * self.size
        flags[self.rank] = 1 if failure is not None else 0
        try:
            failed = [r for r, f in enumerate(self.allreduce_ints(flags, what)) if f]
        except DistributedError as exc:
            if failure is not None:
                raise failure from exc
            raise
        if not failed:
            return
        mine = "" if failure is None else f"{type(failure).__name__}: {failure}"
        mine = mine[:_MESSAGE_CHARS].encode()
        try:  # not all_gather_object: its buffers are torch's, never awaited (module doc)
            messages = [m.rstrip(b"\0").decode(errors="replace") for m in self._gather_bytes(
                mine, "the failing ranks' messages", longest=4 * _MESSAGE_CHARS)]
        except DistributedError:  # the flags alone still name the failing ranks
            messages = [""] * self.size
        if failure is not None:
            raise failure
        said = "; ".join(f"rank {r}: {messages[r] or 'an error'}" for r in failed)
        raise DistributedError(
            f"rank {self.rank} of {self.size} stops because rank(s) {failed} raised during "
            f"{what} ({said}). Fix the cause on that rank; every rank stops so that none "
            "waits forever in a collective"
        )


def _disagreement(what: str, tables: list[list[list[str]]], fix: str) -> str:
    """The message for ranks whose entries differ: the first differing label (in rank 0's
    order, then labels only later ranks have), each rank's value, the count of such labels."""
    values = [dict(map(tuple, t)) for t in tables]
    labels = list(dict.fromkeys(label for t in tables for label, _ in t))
    differing = [lb for lb in labels if len({v.get(lb) for v in values}) > 1]
    if not differing:  # equal entries, unequal digests: not expected; say what is known
        return (f"{what}: the ranks' digests differ though their entries read the same. "
                f"{fix}")
    first = differing[0]
    groups: dict[str | None, list[int]] = {}
    for r, v in enumerate(values):
        groups.setdefault(v.get(first), []).append(r)
    said = "; ".join(
        f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: "
        + ("(absent)" if val is None else _short(val))
        for val, rs in groups.items()
    )
    odd = [r for rs in list(groups.values())[1:] for r in rs]
    more = f" ({len(differing)} entries differ in all)" if len(differing) > 1 else ""
    return (
        f"{what}: the ranks disagree before any product: {first} differs ({said}){more}; "
        f"rank(s) {sorted(odd)} differ from rank 0. {fix}"
    )


def _short(text: str) -> str:
    return text if len(text) <= _VALUE_CHARS else text[: _VALUE_CHARS - 3] + "..."

