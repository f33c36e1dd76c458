"""Shared helpers for the adapters: timing records, probe vectors, warnings."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch

from hessfast.testing import Timing, timeit


def timed(fn, device: str) -> Timing:
    """One cold call of ``fn``, synchronised on ``device``: what a user waits for."""
    return timeit(fn, repeats=1, warmup=0, device=device)


def seconds(setup: Timing, solve: Timing, warmup: Timing | None = None) -> dict:
    """The cell's time fields. ``setup_seconds``: operator construction (for hessfast with its
    pre-flight); ``solve_seconds``: the task on the operator; ``total_seconds``: both, back to
    back, from the first library call to the answer; ``warmup_seconds``: the hvp task's one
    untimed product between them (0 otherwise, never counted)."""
    return {"setup_seconds": setup.seconds, "solve_seconds": solve.seconds,
            "total_seconds": setup.seconds + solve.seconds,
            "warmup_seconds": warmup.seconds if warmup is not None else 0.0}


@contextmanager
def caught_warnings(notes: list):
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        yield
    for w in ws:
        msg = str(w.message).splitlines()[0][:200]
        if msg not in notes:
            notes.append(msg)


def probe_vector(n: int, device: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fixed vector every tool multiplies in the ``hvp`` task."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def flat_params(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


HVP_REPEATS = 20
