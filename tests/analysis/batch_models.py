"""The problem of tests/analysis/test_batch.py, at module level so that the worker processes
of a batch run (spawned: they import what they are sent) find it, both by its import name
(``batch_models``, the Python API) and by its path (``.../batch_models.py:make_model``, the
command line).

Two environment variables make the factories observable from the test:
``HF_BATCH_COUNTER`` (a file): every ``make_model()`` call appends a line to it, so a test
sees whether any process built a model; ``HF_BATCH_MARKER`` (a file holding ``"ACTION TAG"``):
while it exists the loss of the checkpoint whose ``tag`` buffer equals TAG raises
(``raise``), exits the process (``exit``: ``os._exit(3)``) or kills it (``kill``: SIGKILL).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IN, HIDDEN, OUT, SAMPLES = 5, 8, 3, 24


class TagMLP(nn.Module):
    """5-8-3 tanh MLP (75 parameters, float64) with a ``tag`` buffer the checkpoints set to
    their index, so the loss can tell them apart."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN, dtype=torch.float64)
        self.fc2 = nn.Linear(HIDDEN, OUT, dtype=torch.float64)
        self.register_buffer("tag", torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def make_model() -> TagMLP:
    """A new TagMLP (seeded privately: the global RNG is left alone)."""
    counter = os.environ.get("HF_BATCH_COUNTER")
    if counter:
        with open(counter, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TagMLP()


def make_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One fixed batch of 24 samples."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, OUT, (SAMPLES,), generator=g)
    return [(x, y)]


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy; fails as ``HF_BATCH_MARKER`` says (see the module)."""
    marker = os.environ.get("HF_BATCH_MARKER")
    if marker and Path(marker).is_file():
        action, tag = Path(marker).read_text(encoding="utf-8").split()
        if int(model.tag) == int(tag):
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if action == "exit":
                os._exit(3)
            raise ValueError(f"the marked checkpoint (tag {tag})")
    x, y = batch
    return F.cross_entropy(model(x), y)


def count(path: Path) -> int:
    """``make_model()`` calls recorded in the counter file ``path``."""
    return len(path.read_text(encoding="utf-8").splitlines()) if path.is_file() else 0
