"""A sharded Lanczos basis (``eigsh(..., basis_sharding=True)``, issue 9 section 3) on gloo.

Each spawned run (tests/distributed/sharded_workers.py through _spawn.py's harness: one
thread per rank, every exit code checked) computes the top 3 of the data-parallel Hessian of a
1045-parameter float64 MLP with a sharded and an unsharded basis, recording the basis
allocations; the test compares every rank with this process's single-process run on all the
data (1e-10), the ranks with each other (identical), and the shard bytes with the unsharded
ones (<= 0.55x at 2 ranks). A replicated matrix operator with a triple top eigenvalue and a
small basis exercises restarts and verification rounds on shards. Marked ``distributed``.
"""

from __future__ import annotations

from pathlib import Path

import _spawn
import pytest
import sharded_workers
import torch
from torch import nn

import hessfast as hf
from hessfast import distributed, errors

pytestmark = pytest.mark.distributed


def spawn(scenario: str, world: int, tmp_path: Path, monkeypatch) -> list[dict]:
    """_spawn's harness with this file's worker; every rank's results."""
    monkeypatch.setattr(_spawn, "WORKER", Path(sharded_workers.__file__))
    codes, logs, _ = _spawn.spawn(scenario, world, tmp_path)
    assert codes == [0] * world, logs
    return _spawn.results(scenario, world, tmp_path)


@pytest.fixture(scope="module")
def reference() -> tuple[hf.EigshResult, torch.Tensor]:
    """One process, all the data, unsharded; and the matrix operator's exact eigenvalues."""
    model, batches = sharded_workers.problem()
    res = hf.eigsh(hf.hessian(model, nn.CrossEntropyLoss(), batches), k=3, tol=1e-10)
    assert res.status == "CONVERGED"
    exact = torch.linalg.eigvalsh(sharded_workers.matrix()).flip(0)[:4]
    return res, exact


def _check(ranks: list[dict], reference: tuple[hf.EigshResult, torch.Tensor]) -> None:
    ref, exact = reference
    n = ref.eigenvectors.shape[1]
    first = ranks[0]
    assert first["sharded_status"] == "CONVERGED", first["sharded_residuals"]
    assert _spawn.rel(first["sharded_values"], ref.eigenvalues) < 1e-10
    dots = (first["sharded_vectors"] * ref.eigenvectors).sum(1).abs()  # signs are free
    assert (1 - dots).abs().max() < 1e-10, dots
    assert first["sharded_vectors"].shape == (3, n)
    assert first["sharded_ortho"] < 1e-10
    # the unsharded run under the same group agrees too (the same operator)
    assert _spawn.rel(first["plain_values"], ref.eigenvalues) < 1e-10
    assert first["matrix_status"] == "CONVERGED" and first["matrix_restarts"] >= 1
    assert _spawn.rel(first["matrix_values"], exact) < 1e-10, first["matrix_values"]
    for other in ranks:  # every rank returns the same result
        for key in ("sharded_values", "sharded_vectors", "matrix_values", "matrix_vectors"):
            assert torch.equal(other[key], first[key]), key
        for name in ("refuse_block", "refuse_reorth", "refuse_checkpoint"):
            kind, msg, _ = other[name]
            assert kind == "ConfigurationError" and "basis_sharding" in msg, (name, kind, msg)
    # shards partition the basis; the plan is the largest rank's allocation
    shard_bytes = [r["sharded_bytes"] for r in ranks]
    assert sum(shard_bytes) == first["plain_bytes"] == 32 * n * 8
    assert first["plan_bytes"] == max(shard_bytes)


def test_two_ranks_sharded_equals_one_process(tmp_path, monkeypatch, reference):
    ranks = spawn("sharded", 2, tmp_path, monkeypatch)
    _check(ranks, reference)
    ratio = max(r["sharded_bytes"] for r in ranks) / ranks[0]["plain_bytes"]
    assert ratio <= 0.55, ratio  # 533 of 1045 columns on the larger rank: 0.51


def test_three_ranks_n_not_divisible(tmp_path, monkeypatch, reference):
    ranks = spawn("sharded", 3, tmp_path, monkeypatch)
    _check(ranks, reference)
    ratio = max(r["sharded_bytes"] for r in ranks) / ranks[0]["plain_bytes"]
    assert ratio <= 0.4, ratio  # 384 of 1045: 0.37


# -- in-process checks (no process group) ---------------------------------------------


def test_without_a_process_group_basis_sharding_is_refused():
    A = hf.LinearOperator.from_matrix(sharded_workers.matrix()[:100, :100])
    with pytest.raises(errors.ConfigurationError, match="not initialised"):
        hf.eigsh(A, k=2, basis_sharding=True)
    with pytest.raises(errors.ArgumentTypeError, match="basis_sharding"):
        hf.eigsh(A, k=2, basis_sharding=1)


@pytest.mark.parametrize("n", [1, 127, 128, 129, 700, 1045, 4000, 10**6 + 3])
@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_shard_bounds_partition_aligned(n, size):
    bounds = [distributed.shard_bounds(n, size, r) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (_, hi), (lo, _) in zip(bounds, bounds[1:], strict=False):
        assert hi == lo and (lo % distributed.SHARD_ALIGN == 0 or lo == n)
    widest = distributed.shard_size(n, size)
    assert widest == max(hi - lo for lo, hi in bounds)
    assert widest <= -(-n // size) + distributed.SHARD_ALIGN
    plan = hf.estimate_memory(nn.Linear(n, 1, bias=False).double(), "eigsh", k=1, max_basis=1,
                              world_size=size, basis_sharding=True)
    assert plan.basis == widest * 8
