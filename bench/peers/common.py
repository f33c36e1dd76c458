"""Shared helpers for the adapters: timing, probe vectors, result records."""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager

import torch


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class Clock:
    """Wall time of the setup (operator construction) and the solve, synchronized on CUDA."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.setup = 0.0
        self.solve = 0.0
        self.warmup = 0.0

    @contextmanager
    def phase(self, name: str):
        sync(self.device)
        t0 = time.perf_counter()
        yield
        sync(self.device)
        setattr(self, name, getattr(self, name) + time.perf_counter() - t0)


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
