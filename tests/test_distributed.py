"""The data-parallel operator over torch.distributed (issue 9 section 3), on gloo.

Each test spawns 2-3 rank processes (``tests/dist_workers.py``: one thread each, a free
port on 127.0.0.1, a 30 s group timeout), joins them with a deadline, checks EVERY exit code
and compares what each rank wrote with the other ranks and with this process's
single-process run on all the data (float64, 1e-10 relative). Several checks share one
spawned run: starting a rank costs a few seconds (the torch import). Marked ``distributed``:
``-m "not distributed"`` deselects them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import dist_workers
import pytest
import torch
from torch import nn

import hessfast as hf
from hessfast import errors

pytestmark = pytest.mark.distributed

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


def test_three_ranks_5_3_0_batches_equal_one_process(tmp_path):
    """HVP, block HVP, lambda_max, top-3, Hutchinson trace, SLQ, a sum-reduced criterion and
    the GGN: every rank equals the single-process run on all 8 batches (1e-10), and the
    ranks agree exactly (the algorithms saw the same products)."""
    codes, logs, _ = spawn("equal", 3, tmp_path)
    assert codes == [0, 0, 0], logs
    ranks = results("equal", 3, tmp_path)
    model, batches = dist_workers.problem()
    ref = dist_workers.measure(model, batches)
    assert ranks[0]["num_samples"].tolist() == [sum(dist_workers.BATCH_SIZES), 8]
    mixed = ranks[0]["mixed_block"]
    for r in ranks:  # every rank, the empty one too, took the precision the others saw
        assert r.pop("mixed_compute_dtype") == "torch.float32"
        assert torch.equal(r.pop("mixed_block"), mixed)
    for key, want in ref.items():
        if key == "eig_vectors":  # signs are free
            dots = (ranks[0][key] * want).sum(1).abs()
            assert (1 - dots).abs().max() < 1e-10, key
        else:
            assert rel(ranks[0][key], want) < 1e-10, (key, ranks[0][key], want)
        for other in ranks[1:]:
            assert torch.equal(torch.as_tensor(other[key]), torch.as_tensor(ranks[0][key])), key


def test_ddp_model_and_a_failing_rank_stop_every_rank(tmp_path):
    """A DDP model is unwrapped and reduced over its group; rank 1 failing (a NaN batch at
    construction, a NaN output in the 2nd product of lambda_max, a parameter change) makes
    it raise its own error and rank 0 a DistributedError naming rank 1, within seconds."""
    codes, logs, _ = spawn("faults", 2, tmp_path)
    assert codes == [0, 0], logs
    r0, r1 = results("faults", 2, tmp_path)
    model, batches = dist_workers.problem()
    H = hf.hessian(model, nn.CrossEntropyLoss(), batches)
    want = H.matmat(dist_workers.vectors(H.shape[0]))
    assert r0["ddp_unwrapped"] and r1["ddp_unwrapped"]
    assert rel(r0["ddp_block"], want) < 1e-10
    assert torch.equal(r0["ddp_block"], r1["ddp_block"])
    for step, own in [("nan_at_construction", "NonFiniteError"),
                      ("nan_mid_run", "NonFiniteError"),
                      ("params_changed", "ParametersChangedError")]:
        name0, msg0, t0 = r0[step]
        name1, msg1, t1 = r1[step]
        assert name1 == own, (step, name1, msg1)
        assert name0 == "DistributedError", (step, name0, msg0)
        assert "rank(s) [1]" in msg0 and own in msg0, msg0
        assert t0 < 15 and t1 < 15, (step, t0, t1)
    for r in (r0, r1):  # no rank holds a sample: every rank says so
        assert r["all_empty"][0] == "EmptyDataError", r["all_empty"]


def test_a_rank_that_exits_does_not_hang_the_others(tmp_path):
    """Rank 1 exits (code 7) before a product: rank 0 raises DistributedError, no hang."""
    codes, logs, wall = spawn("peer_exit", 2, tmp_path)
    assert codes == [0, 7], logs
    (r0,) = [torch.load(tmp_path / "peer_exit-0.pt")]
    name, msg, seconds = r0["peer_exit"]
    assert name == "DistributedError", (name, msg)
    assert "all-reduce" in msg and "process_group=None" in msg
    assert seconds < 35, seconds


# -- in-process checks (no process group) ---------------------------------------------


def test_shuffling_distributed_sampler_refused():
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    model, batches = dist_workers.problem()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    ds = TensorDataset(x, y)
    shuffled = DataLoader(ds, batch_size=4, sampler=DistributedSampler(
        ds, num_replicas=2, rank=0, shuffle=True))
    with pytest.raises(errors.DistributedError, match="shuffle=False"):
        hf.hessian(model, nn.CrossEntropyLoss(), shuffled, process_group=None)
    fixed = DataLoader(ds, batch_size=4, sampler=DistributedSampler(
        ds, num_replicas=3, rank=0, shuffle=False))
    with pytest.warns(UserWarning, match="repeats 1 sample"):  # 35 samples over 3 ranks
        H = hf.hessian(model, nn.CrossEntropyLoss(), fixed, process_group=None)
    assert H.num_samples == 12


def test_process_group_argument_checked():
    model, batches = dist_workers.problem()
    with pytest.raises(errors.DistributedError, match="'auto', None or"):
        hf.hessian(model, nn.CrossEntropyLoss(), batches, process_group="world")
    with pytest.raises(errors.DistributedError, match="not initialised"):
        hf.hessian(model, nn.CrossEntropyLoss(), batches, process_group=object())
    H = hf.hessian(model, nn.CrossEntropyLoss(), batches)  # auto without a group: local
    assert (H.num_samples, H.local_num_samples) == (35, 35)


def test_multi_gpu_data_parallel_warns_and_uses_the_module():
    model, batches = dist_workers.problem()
    wrapped = nn.DataParallel(model)
    wrapped.device_ids = [0, 1]  # as over two GPUs (this machine may have none)
    with pytest.warns(UserWarning, match="DataParallel over GPUs"):
        H = hf.hessian(wrapped, nn.CrossEntropyLoss(), batches)
    assert H.model is model
