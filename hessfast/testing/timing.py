"""One timer for every benchmark: warm-up calls, timed calls, best and median.

    from hessfast.testing import timeit

    t = timeit(lambda: H.matmat(V), repeats=7, device=V.device)
    t.median, t.best, t.times         # seconds
    t = timeit(lambda: hf.eigsh(H, k=5), repeats=1, warmup=0)   # one cold run
    t.seconds, t.result               # its time and what it returned

CUDA work is asynchronous: the device is synchronised before and after every timed call, so a
time covers the kernels the call launched, not only their launch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Timing", "timeit"]


@dataclass(frozen=True)
class Timing:
    """Seconds of the timed calls of :func:`timeit` (warm-up calls not included)."""

    times: tuple[float, ...]
    """Seconds of each timed call, in call order."""
    warmup: int
    """Untimed calls made before the timed ones."""
    result: Any = field(default=None, repr=False, compare=False)
    """What the last call returned."""

    @property
    def best(self) -> float:
        """The fastest call: the least disturbed by other load, for costs that do not vary."""
        return min(self.times)

    @property
    def median(self) -> float:
        """The median call: robust to a few disturbed runs, for costs that do vary."""
        return statistics.median(self.times)

    @property
    def seconds(self) -> float:
        """The time of a single timed call (``repeats=1``); the median otherwise."""
        return self.times[0] if len(self.times) == 1 else self.median


def _synchronize(device: torch.device | str | None) -> None:
    if device is None:
        # nothing to wait for unless this process has started CUDA
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(
    fn: Callable[[], Any],
    *,
    repeats: int = 5,
    warmup: int = 1,
    setup: Callable[[], Any] | None = None,
    device: torch.device | str | None = None,
) -> Timing:
    """Wall-clock seconds of ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Args:
        fn: the call to time, no arguments (use a lambda or ``functools.partial``).
        repeats: timed calls (>= 1).
        warmup: untimed calls before them (>= 0): one-time costs such as lazy
            initialisation, caches or a path planner's timing. ``warmup=0, repeats=1`` times
            one cold call, what a user waits for the first time.
        setup: called before every call (warm-up and timed) and not timed, e.g. to restore
            an input that ``fn`` modifies in place.
        device: synchronise this device around every timed call; ``None`` synchronises the
            current CUDA device when this process has initialised CUDA, nothing otherwise.

    Returns:
        :class:`Timing` with the time of every timed call and the last call's result.
    """
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if not (isinstance(warmup, int) and warmup >= 0):
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    result = None
    for _ in range(warmup):
        if setup is not None:
            setup()
        result = fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        _synchronize(device)
        t0 = time.perf_counter()
        result = fn()
        _synchronize(device)
        times.append(time.perf_counter() - t0)
    return Timing(times=tuple(times), warmup=warmup, result=result)
