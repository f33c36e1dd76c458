"""Collectives that leave no buffer with gloo's worker thread when the process exits, for
:mod:`hessfast.distributed.comm` (the one module that runs collectives).

Why: gloo's worker thread lets go of a collective's tensors shortly AFTER the caller has its
result, and dropping a tensor that Python also holds takes the GIL. A process that exits right
after a collective (a caught error, the end of a script) leaves that thread waiting for the
GIL; when it gets it during interpreter finalisation, CPython ends the thread
(``pthread_exit``), the unwind meets a ``noexcept`` destructor and the process aborts with
"terminate called without an active exception" (SIGABRT; 3 of 10 two-rank runs of 300
all-reduces and an exit on torch 2.13).

How: a small collective (flags, digests, counts, a small product: at most 256 KiB,
:func:`is_small`) runs on private copies that are remembered until the worker lets go of
them, and an ``atexit`` hook (:func:`register_exit_hook`; it runs before finalisation begins)
releases the GIL until it has (:func:`drain`); a large one returns only once the worker let
go (their Python reference counts are back: a few ``time.sleep(0)``). Both are
:func:`settled`. For collectives the program ran itself (DDP's), the hook also releases the
GIL for 20 ms (:func:`let_workers_run`); :func:`hessfast.distributed.shutdown` does both
before it destroys the group.
"""

from __future__ import annotations

import atexit
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

__all__ = ["drain", "is_small", "let_workers_run", "pending", "register_exit_hook", "settled"]

# Longest wait for gloo's worker thread to release a collective's buffers (it takes
# microseconds once it has the GIL); past it the wait is given up for this process.
_RELEASE_WAIT_S = 1.0
_state: dict[str, bool] = {"on": True, "atexit": False}
# Collectives on at most this many bytes run on private copies that are remembered until
# the worker lets go (checked at the next collective, waited for at exit and in shutdown);
# larger ones wait at once (~1-2 ms on a loaded 2-core box, small beside their transfer).
_TRACK_BYTES = 1 << 18
# Longest wait at exit for those copies (the worker needs the GIL once: well under 1 ms).
_DRAIN_S = 0.25
#: Private copies of small collectives a communication thread may still hold.
pending: list[list[torch.Tensor]] = []


def register_exit_hook() -> None:
    """Make the process wait for the worker at exit (:func:`drain`, :func:`let_workers_run`);
    once per process, by the first communicator."""
    if not _state["atexit"]:
        _state["atexit"] = True
        atexit.register(_at_exit)


def is_small(tensors: Sequence[torch.Tensor]) -> bool:
    """Does a collective on ``tensors`` run on private copies that are remembered (CPU
    tensors of at most 256 KiB in all), rather than wait for the worker at once?"""
    return (all(t.device.type == "cpu" for t in tensors)
            and sum(t.numel() * t.element_size() for t in tensors) <= _TRACK_BYTES)


@contextmanager
def settled(tensors: list[torch.Tensor], small: bool) -> Iterator[None]:
    """Around ONE collective on ``tensors``: afterwards (also when it raised), ``small``
    ones (private copies) are remembered until the worker lets go of them, others are
    waited for here."""
    before, failed = _refcounts(tensors), True
    try:
        yield
        failed = False
    finally:
        if small:
            _track(tensors)
        else:
            _await_release(tensors, before, failed)


def let_workers_run(seconds: float = 0.02) -> None:
    """Release the GIL for a moment, so that a communication thread waiting for it (to drop
    the tensors of a collective the caller ran itself) gets it while the interpreter is
    fully alive."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.001)


def drain() -> bool:
    """Release the GIL until communication threads let go of every remembered copy
    (bounded by :data:`_DRAIN_S`: a frame of an uncaught error's traceback may keep a copy
    referenced); True when none is held any more. Runs at exit (before the interpreter
    starts finalising) and in :func:`hessfast.distributed.shutdown`."""
    end = time.monotonic() + _DRAIN_S
    while True:
        pending[:] = [t for t in pending if not _released(t)]
        if not pending or time.monotonic() > end:
            return not pending
        time.sleep(0.0005)


def _refcounts(tensors: Sequence[torch.Tensor]) -> list[int]:
    return [sys.getrefcount(t) for t in tensors]


def _alone() -> int:
    """:func:`_refcounts` of a tensor that only its list references."""
    return _refcounts([torch.empty(0)])[0]


def _released(tensors: list[torch.Tensor]) -> bool:
    """Does nothing but ``tensors`` (a list of private copies) reference them?"""
    return max(_refcounts(tensors), default=0) <= _alone()


def _track(tensors: list[torch.Tensor]) -> None:
    """Remember the private copies of a finished small collective until a communication
    thread lets go of them (forgetting those that were let go meanwhile)."""
    pending[:] = [t for t in pending if not _released(t)]
    if not _released(tensors):
        pending.append(tensors)


def _at_exit() -> None:
    drain()
    let_workers_run()


def _await_release(tensors: Sequence[torch.Tensor], before: list[int], failed: bool) -> None:
    """Return once no thread but this one references ``tensors`` (their Python reference
    counts are back to ``before``): gloo's worker thread drops a finished collective's
    tensors a moment after the caller wakes up, and needs the GIL for it (module docstring).
    ``time.sleep(0)`` hands it the GIL. Bounded by :data:`_RELEASE_WAIT_S`; a wait that runs
    out after a successful collective (another torch whose threads keep references) turns
    the wait off for this process."""
    if not _state["on"] or any(t.device.type != "cpu" for t in tensors):
        return
    end = time.monotonic() + _RELEASE_WAIT_S
    while _refcounts(tensors) != before:
        if time.monotonic() > end:
            if not failed:  # a failed collective's thread may still run: try again later
                _state["on"] = False
            return
        time.sleep(0)
