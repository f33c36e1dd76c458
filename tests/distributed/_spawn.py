"""The spawn harness of the tests in tests/distributed/: ``spawn`` starts ``world`` rank
processes of ``WORKER`` (``python WORKER SCENARIO RANK WORLD PORT OUTDIR``: one thread each, a
free port on 127.0.0.1, a 30 s group timeout), joins them with a deadline and returns EVERY exit
code; ``results`` loads what each rank wrote. ``WORKER`` is dist_workers.py; test_probe_parallel
and test_sharded_basis point it at their own worker with ``monkeypatch.setattr(_spawn,
"WORKER", ...)``. Not a test module (no ``test_`` prefix), imported as ``_spawn``: pytest puts
this folder on ``sys.path``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_workers.py")
DEADLINE_S = 120.0  # the whole spawned run; the group's own timeout is 30 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo() -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


def spawn(scenario: str, world: int, tmp_path: Path) -> tuple[list[int], list[str], float]:
    """Run ``world`` ranks of ``scenario``; returns exit codes, stderr tails, wall time."""
    _gloo()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    port = str(_free_port())
    logs = [tmp_path / f"{scenario}-{r}.log" for r in range(world)]
    t0 = time.perf_counter()
    procs = []
    for r in range(world):
        with open(logs[r], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), scenario, str(r), str(world), port,
                 str(tmp_path)], env=env, stdout=log, stderr=subprocess.STDOUT,
            ))
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, DEADLINE_S - (time.perf_counter() - t0))))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            for q in procs:
                q.wait()
            pytest.fail(f"{scenario}: a rank did not finish within {DEADLINE_S} s (a hang)")
    return codes, [log.read_text()[-3000:] for log in logs], time.perf_counter() - t0


def results(scenario: str, world: int, tmp_path: Path) -> list[dict]:
    return [torch.load(tmp_path / f"{scenario}-{r}.pt") for r in range(world)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
