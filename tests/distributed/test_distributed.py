"""The data-parallel operator over torch.distributed (issue 9 section 3), on gloo.

Each test spawns 2-3 rank processes (``tests/distributed/dist_workers.py``: one thread each, a free
port on 127.0.0.1, a 30 s group timeout), joins them with a deadline, checks EVERY exit code
and compares what each rank wrote with the other ranks and with this process's
single-process run on all the data (float64, 1e-10 relative). Several checks share one
spawned run: starting a rank costs a few seconds (the torch import). Marked ``distributed``:
``-m "not distributed"`` deselects them.
"""

from __future__ import annotations

import dist_workers
import pytest
import torch
from _spawn import rel, results, spawn
from torch import nn

import hessfast as hf
from hessfast import errors

pytestmark = pytest.mark.distributed


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
    it raise its own error and rank 0 a DistributedError naming rank 1 (words only the error
    barrier writes, never a timeout's), with no product completed past the failing one."""
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
        name0, msg0, _ = r0[step]
        name1, msg1, _ = r1[step]
        assert name1 == own, (step, name1, msg1)
        assert name0 == "DistributedError", (step, name0, msg0)
        assert "rank(s) [1]" in msg0 and own in msg0, msg0
    # lambda_max's first product completed on both ranks, its second raised on both; the
    # stale snapshot's product never completed
    assert r0["nan_mid_run_products"] == r1["nan_mid_run_products"] == 1
    assert r0["params_changed_products"] == r1["params_changed_products"] == 0
    for r in (r0, r1):  # no rank holds a sample: every rank says so
        assert r["all_empty"][0] == "EmptyDataError", r["all_empty"]


def test_a_rank_that_exits_does_not_hang_the_others(tmp_path):
    """Rank 1 exits (code 7) before a product: rank 0 raises DistributedError, no hang."""
    codes, logs, wall = spawn("peer_exit", 2, tmp_path)
    assert codes == [0, 7], logs
    (r0,) = [torch.load(tmp_path / "peer_exit-0.pt")]
    name, msg, _ = r0["peer_exit"]
    assert name == "DistributedError", (name, msg)
    assert "all-reduce" in msg and "process_group=None" in msg
    assert r0["peer_exit_products"] == 0  # the product never completed


def test_ranks_that_disagree_all_raise_naming_ranks_and_difference(tmp_path):
    """3 ranks. Rank 2's model differs from the others' in one bit pattern of its last
    parameter; rank 1 asks for another hvp_mode, another k; rank 2 runs another algorithm;
    rank 0 another v0, and a checkpoint file the others do not pass. Each time EVERY rank
    raises the same DistributedError, naming the differing ranks, the first difference and
    the values (words only the agreement writes, never a timeout's), before any product
    (before: a spectrum of neither model, gloo "Connection closed by peer" on one rank, or
    the group's timeout). Then the same call on
    every rank works and equals one process."""
    codes, logs, _ = spawn("disagree", 3, tmp_path)
    assert codes == [0, 0, 0], logs
    ranks = results("disagree", 3, tmp_path)
    expect = {
        "params": ("parameter '2.bias'", "rank(s) [2] differ"),
        "option": ("option hvp_mode", "rank 1: 'double_backward'", "rank(s) [1] differ"),
        "k": ("argument k", "ranks 0, 2: 2", "rank 1: 3", "rank(s) [1] differ"),
        "algorithm": ("the algorithm", "trace", "hessfast.eigsh", "rank(s) [2] differ"),
        "v0": ("argument v0", "rank(s) [1, 2] differ"),
        "checkpoint": ("argument checkpoint", "ranks 1, 2: None", "rank(s) [1, 2] differ"),
    }
    for step, words in expect.items():
        said = {r[step][1].split(": ", 1)[-1] for r in ranks}
        assert len(said) == 1, (step, said)  # the same words after "who (rank r of 3): "
        for r in ranks:
            name, msg, _ = r[step]
            assert name == "DistributedError", (step, name, msg)
            assert all(w in msg for w in words), (step, words, msg)
    assert [r["products_refused"] for r in ranks] == [0, 0, 0]
    assert "1 entries" not in ranks[0]["params"][1]  # only that one parameter differs
    model, batches = dist_workers.problem()
    H = hf.hessian(model, nn.CrossEntropyLoss(), batches)
    want = hf.eigsh(H, k=2, tol=1e-10).eigenvalues
    for r in ranks:
        assert torch.equal(r["after"], ranks[0]["after"])
    assert rel(ranks[0]["after"], want) < 1e-10


def test_collectives_leave_no_buffer_with_gloo_at_exit(tmp_path):
    """The cause of the SIGABRT at exit ("terminate called without an active exception"):
    gloo's worker thread drops a collective's tensors after the caller woke up, which takes
    the GIL; at interpreter exit that ends the thread inside a noexcept destructor. A large
    hessfast collective returns only once the worker let go (before: 13-34 of 80 returned
    with the buffer still held); small ones run on copies the exit hook waits for."""
    codes, logs, _ = spawn("settle", 2, tmp_path)
    assert codes == [0, 0], logs
    for r in results("settle", 2, tmp_path):
        assert r == {"pending": 0, "drained": True, "held": 0, "sums_ok": True}, r


def test_a_rank_that_catches_an_error_exits_with_code_0(tmp_path):
    """Five process lives per rank (forked, each with its own gloo group): rank 1's NaN batch
    raises NonFiniteError there and DistributedError on rank 0; both catch it and exit at
    once: without any teardown, after hf.distributed.shutdown(), and inside
    hf.distributed.session(). Every life exits with 0 (never -6, SIGABRT)."""
    codes, logs, _ = spawn("exits", 2, tmp_path)
    assert codes == [0, 0], logs
    for rank, r in enumerate(results("exits", 2, tmp_path)):
        assert r["statuses"] == [0] * len(r["runs"]), (rank, r, logs[rank])
        for i in range(len(r["runs"])):
            said = (tmp_path / f"exits-{i}-{rank}.txt").read_text()
            assert said == ("NonFiniteError" if rank == 1 else "DistributedError"), (i, said)


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


def test_shutdown_without_a_group_and_the_disagreement_message():
    """shutdown() is a no-op without a process group (and twice); the message of ranks that
    disagree names the first differing label in rank 0's order, groups ranks with equal
    values, marks a label a rank lacks, and counts the differing labels."""
    from hessfast import distributed
    from hessfast.distributed import comm

    distributed.shutdown()
    distributed.shutdown()
    tables = [
        [["argument k", "2"], ["argument tol", "1e-08"], ["argument seed", "0"]],
        [["argument k", "2"], ["argument tol", "1e-06"], ["argument seed", "0"]],
        [["argument k", "2"], ["argument tol", "1e-08"]],
    ]
    msg = comm._disagreement("hessfast.eigsh", tables, "Fix it.")
    assert msg.startswith("hessfast.eigsh: the ranks disagree before any product: argument tol")
    assert "ranks 0, 2: 1e-08; rank 1: 1e-06" in msg
    assert "(2 entries differ in all)" in msg and "rank(s) [1] differ" in msg
    assert msg.endswith("Fix it.")
    msg = comm._disagreement("x", [tables[0], tables[0], tables[2]], "")
    assert "argument seed differs (ranks 0, 1: 0; rank 2: (absent))" in msg
