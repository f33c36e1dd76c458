"""Rank processes for test_distributed.py: ``python dist_workers.py SCENARIO RANK
WORLD PORT OUTDIR``. Each rank joins a gloo group on 127.0.0.1:PORT (30 s timeout, one
thread), runs the scenario and writes ``OUTDIR/SCENARIO-RANK.pt`` (a dict); the test
compares the ranks with each other and with one process on all the data.

The problem (model, batches, how the batches split over the ranks) is built here, so the
test process builds the same one for its single-process reference.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# 8 batches of unequal sizes; 3 ranks hold 5/3/0 of them, 2 ranks 3/5.
BATCH_SIZES = (3, 5, 4, 7, 2, 6, 5, 3)
SHARDS = {1: [list(range(8))], 2: [[0, 1, 2], [3, 4, 5, 6, 7]], 3: [[0, 1, 2, 3, 4], [5, 6, 7], []]}
D_IN, HIDDEN, CLASSES = 5, 7, 3  # 5*7 + 7 + 7*3 + 3 = 66 parameters


def problem(
    *, seed: int = 1234, sizes: tuple[int, ...] = BATCH_SIZES,
    dims: tuple[int, int, int] = (D_IN, HIDDEN, CLASSES), weight_scale: float = 0.7,
) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A float64 tanh MLP ``d_in -> hidden -> classes`` and one classification batch per
    entry of ``sizes``, the same in every process."""
    d_in, hidden, classes = dims
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * weight_scale)
    model = model.double()
    batches = [
        (torch.randn(s, d_in, generator=gen, dtype=torch.float64),
         torch.randint(0, classes, (s,), generator=gen))
        for s in sizes
    ]
    return model, batches


def shard(batches: list, world: int, rank: int, shards: dict | None = None) -> list:
    """This rank's batches (``shards``: world size -> each rank's batch indices)."""
    return [batches[i] for i in (shards or SHARDS)[world][rank]]


def vectors(n: int) -> torch.Tensor:
    """Three fixed float64 vectors ``[3, n]``."""
    return torch.randn(3, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def measure(model: nn.Module, batches: list, **kwargs: Any) -> dict[str, Any]:
    """Every quantity the test compares, for one operator configuration."""
    import hessfast as hf

    out: dict[str, Any] = {}
    mean, summed = nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")
    H = hf.hessian(model, mean, batches, **kwargs)
    V = vectors(H.shape[0])
    out["hvp"] = H.matvec(V[0])
    out["block"] = H.matmat(V)
    out["lambda_max"] = torch.tensor(hf.lambda_max(H, tol=1e-10))
    res = hf.eigsh(H, k=3, tol=1e-10)
    out["eig_values"] = res.eigenvalues
    out["eig_vectors"] = res.eigenvectors
    out["trace"] = torch.tensor(hf.trace(H, method="hutchinson", max_matvecs=12, seed=3).value)
    dens = hf.spectral_density(H, num_probes=3, num_steps=12, seed=5)
    out["slq_nodes"], out["slq_weights"] = dens.nodes, dens.weights
    out["num_samples"] = torch.tensor([H.num_samples, H.num_batches])
    out["sum_hvp"] = hf.hessian(model, summed, batches, **kwargs).matmat(V)
    out["ggn_block"] = hf.ggn(model, mean, batches, **kwargs).matmat(V)
    return out


def scenario_equal(rank: int, world: int) -> dict[str, Any]:
    """Every algorithm on the rank's shard (5/3/0 batches at 3 ranks): the test compares
    with one process on all the data."""
    import hessfast as hf

    model, batches = problem()
    out = measure(model, shard(batches, world, rank))
    # float64 parameters, a float32 layer inside: the ranks' pre-flights see float32 (the
    # empty rank sees nothing) and all must apply float32's symmetry tolerance
    mixed = nn.Sequential(model, Float32Softplus())
    H = hf.hessian(mixed, nn.MSELoss(), [(x, torch.zeros(len(x), CLASSES, dtype=x.dtype))
                                          for x, _ in shard(batches, world, rank)])
    out["mixed_block"] = H.matmat(vectors(H.shape[0]))
    out["mixed_compute_dtype"] = str(H.compute_dtype)
    return out


class Float32Softplus(nn.Module):
    """softplus computed in float32, returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(x.float()).to(x.dtype)


def _expect_failure(name: str, out: dict[str, Any], run: Callable[[], Any]) -> None:
    """Run a step that must raise on this rank; record the error's class, message and time."""
    t0 = time.perf_counter()
    try:
        run()
    except Exception as exc:  # noqa: BLE001 - recorded and checked by the test
        out[name] = (type(exc).__name__, str(exc), time.perf_counter() - t0)
    else:
        out[name] = ("no error", "", time.perf_counter() - t0)


def scenario_faults(rank: int, world: int) -> dict[str, Any]:
    """2 ranks: a DDP model; then rank 1 fails at construction (a NaN batch), in the 2nd
    product of lambda_max (a NaN output), after a parameter change, and by exiting."""
    import hessfast as hf

    out: dict[str, Any] = {}
    model, batches = problem()
    mine = shard(batches, world, rank)
    loss = nn.CrossEntropyLoss()
    ddp = nn.parallel.DistributedDataParallel(model)
    H = hf.hessian(ddp, loss, mine)
    out["ddp_block"] = H.matmat(vectors(H.shape[0]))
    out["ddp_unwrapped"] = H.model is model

    bad = list(mine)
    if rank == 1:
        bad[0] = (torch.full_like(bad[0][0], float("nan")), bad[0][1])
    _expect_failure("nan_at_construction", out, lambda: hf.hessian(model, loss, bad))

    state = {"armed": False, "calls": 0}

    def nan_in_second_pass(module: nn.Module, args: Any, output: torch.Tensor) -> Any:
        if not state["armed"] or rank != 1:
            return None
        state["calls"] += 1
        return output * float("nan") if state["calls"] == len(mine) + 1 else None

    handle = model.register_forward_hook(nan_in_second_pass)
    H2 = hf.hessian(model, loss, mine, hvp_mode="double_backward")
    state["armed"] = True
    before = H2.num_matvecs
    _expect_failure("nan_mid_run", out, lambda: hf.lambda_max(H2))
    out["nan_mid_run_products"] = H2.num_matvecs - before  # completed before the raise
    handle.remove()

    _expect_failure("all_empty", out, lambda: hf.hessian(model, loss, []))

    H3 = hf.hessian(model, loss, mine)
    H3.matvec(vectors(H3.shape[0])[0])
    before = H3.num_matvecs
    if rank == 1:
        with torch.no_grad():
            model[0].weight.mul_(1.0)  # a change of version: the snapshot is stale
    _expect_failure("params_changed", out, lambda: H3.matvec(vectors(H3.shape[0])[1]))
    out["params_changed_products"] = H3.num_matvecs - before
    return out


def scenario_peer_exit(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 exits before its first product; rank 0 must raise, not hang."""
    import hessfast as hf

    model, batches = problem()
    H = hf.hessian(model, nn.CrossEntropyLoss(), shard(batches, world, rank))
    if rank == 1:
        os._exit(7)
    out: dict[str, Any] = {}
    before = H.num_matvecs
    _expect_failure("peer_exit", out, lambda: H.matvec(vectors(H.shape[0])[0]))
    out["peer_exit_products"] = H.num_matvecs - before
    return out


OUTDIR = [""]  # where the results go (set by main)


def scenario_disagree(rank: int, world: int) -> dict[str, Any]:
    """3 ranks (5/3/0 batches): rank 2's model differs in one entry of its LAST parameter;
    rank 1 asks for another hvp_mode; then rank 1 another k, rank 2 another algorithm, rank 0
    another v0 and a checkpoint the others lack; then every rank the same call, which must
    still work. The products the refused calls ran are counted (none may run)."""
    import hessfast as hf

    out: dict[str, Any] = {}
    model, batches = problem()
    mine = shard(batches, world, rank)
    loss = nn.CrossEntropyLoss()
    other, _ = problem()
    if rank == 2:
        with torch.no_grad():
            other[2].bias[1] += 2.0**-40  # one bit pattern: invisible in any printed digit
    _expect_failure("params", out, lambda: hf.hessian(other, loss, mine))
    mode = "double_backward" if rank == 1 else "auto"
    _expect_failure("option", out, lambda: hf.hessian(model, loss, mine, hvp_mode=mode))
    H = hf.hessian(model, loss, mine)
    built = H.num_matvecs
    _expect_failure("k", out, lambda: hf.eigsh(H, k=3 if rank == 1 else 2, tol=1e-8))
    if rank == 2:
        _expect_failure("algorithm", out, lambda: hf.trace(H, 12, method="hutchinson"))
    else:
        _expect_failure("algorithm", out, lambda: hf.eigsh(H, k=2, tol=1e-8))
    v0 = vectors(H.shape[0])[:1] * (1.0 if rank == 0 else -1.0)
    _expect_failure("v0", out, lambda: hf.eigsh(H, k=1, v0=v0))
    # only rank 0 writes a checkpoint, but every rank must pass it: its fingerprint is a
    # collective (before: the ranks met in different collectives until the group's timeout)
    path = os.path.join(OUTDIR[0], "disagree.ckpt") if rank == 0 else None
    _expect_failure("checkpoint", out, lambda: hf.eigsh(H, k=2, checkpoint=path))
    out["products_refused"] = H.num_matvecs - built  # every refusal came before a product
    out["after"] = hf.eigsh(H, k=2, tol=1e-10).eigenvalues
    return out


def _refs(tensor: torch.Tensor) -> int:
    return sys.getrefcount(tensor)


def scenario_collectives_settle(rank: int, world: int) -> dict[str, Any]:
    """No hessfast collective leaves a buffer with gloo's worker thread at exit (the cause of
    the SIGABRT, hessfast/distributed/_gloo_settle.py). Large buffers (2.4 MB): 20
    all-reduces and 20 all-gathers, counting those that returned while another thread still
    referenced the buffer (its Python reference count above the one before the call). Small
    ones: 40 of each, then the exit hook's wait must end with nothing held."""
    from hessfast import distributed
    from hessfast.distributed import _gloo_settle

    comm = distributed.Comm()
    left = 0
    for i in range(20):
        buf = torch.full((300_000,), float(i), dtype=torch.float64)
        before = _refs(buf)
        comm._all_reduce(buf, torch.distributed.ReduceOp.SUM, "a test buffer")
        left += _refs(buf) > before
        buf = torch.full((100_000,), float(rank), dtype=torch.float64)
        before = _refs(buf)
        parts = comm._all_gather(buf, "a test buffer", "")
        alone = [torch.empty(0) for _ in parts]  # held by a list only, as parts should be
        left += _refs(buf) > before or [_refs(p) for p in parts] != [_refs(q) for q in alone]
    sums = []
    for i in range(40):
        buf = torch.full((3, 66), float(i), dtype=torch.float64)
        comm._all_reduce(buf, torch.distributed.ReduceOp.SUM, "a small buffer")
        sums.append(float(buf[0, 0]))
        comm._all_gather(buf[0], "a small buffer", "")
    drained = _gloo_settle.drain()
    return {"pending": int(left), "drained": drained, "held": len(_gloo_settle.pending),
            "sums_ok": sums == [world * float(i) for i in range(40)]}


def catch_and_exit(rank: int, world: int, outdir: str, port: str, i: int, how: str) -> None:
    """One process's life in :func:`run_exits`: join a new group, catch the error of rank 1's
    NaN batch (rank 1 its own, the others DistributedError), record its name and exit with 0
    at once (when a pending collective aborts a process), by ``how``: ``"plain"`` (no
    teardown at all), ``"shutdown"`` (:func:`hessfast.distributed.shutdown`) or
    ``"session"`` (the group made and torn down by :func:`hessfast.distributed.session`)."""
    import hessfast as hf

    model, batches = problem()
    mine = shard(batches, world, rank)
    if rank == 1:
        mine[0] = (torch.full_like(mine[0][0], float("nan")), mine[0][1])

    def run() -> None:
        try:
            hf.hessian(model, nn.CrossEntropyLoss(), mine)
            said = "no error"
        except Exception as exc:  # noqa: BLE001 - recorded and checked by the test
            said = type(exc).__name__
        with open(os.path.join(outdir, f"exits-{i}-{rank}.txt"), "w") as f:
            f.write(said)

    if how == "session":  # torchrun's environment, as hf.distributed.init reads it
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank),
                          WORLD_SIZE=str(world))
        with hf.distributed.session(backend="gloo", timeout_s=30):
            run()
        sys.exit(0)
    store = os.path.join(outdir, f"exits-store-{i}")
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    run()
    if how == "shutdown":
        hf.distributed.shutdown()
    sys.exit(0)


EXIT_RUNS = ("plain", "plain", "shutdown", "session", "plain")


def run_exits(rank: int, world: int, outdir: str, port: str) -> dict[str, Any]:
    """Several process lives (:func:`catch_and_exit`), each a child forked from this
    process (torch imported once: a life costs a fraction of a second) with its own gloo
    group; returns each child's exit status (0, or -signal)."""
    statuses = []
    for i, how in enumerate(EXIT_RUNS):
        pid = os.fork()
        if pid == 0:  # the child: a whole process life, ending in interpreter finalisation
            try:
                catch_and_exit(rank, world, outdir, port, i, how)
            except SystemExit:
                raise
            except BaseException:  # noqa: BLE001 - a broken life exits 3, never runs on
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        statuses.append(os.waitstatus_to_exitcode(status))
    return {"statuses": statuses, "runs": list(EXIT_RUNS)}


SCENARIOS = {"equal": scenario_equal, "faults": scenario_faults, "peer_exit": scenario_peer_exit,
             "disagree": scenario_disagree, "settle": scenario_collectives_settle}


def main(argv: list[str]) -> int:
    scenario, rank, world, port, outdir = argv[0], int(argv[1]), int(argv[2]), argv[3], argv[4]
    torch.set_num_threads(1)
    import torch.distributed as dist

    import hessfast as hf

    OUTDIR[0] = outdir
    if scenario == "exits":  # no group in this process: each forked child makes its own
        out = run_exits(rank, world, outdir, port)
        torch.save(out, os.path.join(outdir, f"{scenario}-{rank}.pt"))
        return 0
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    out = SCENARIOS[scenario](rank, world)
    torch.save(out, os.path.join(outdir, f"{scenario}-{rank}.pt"))
    hf.distributed.shutdown()  # barrier-free: also after a peer left (peer_exit)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
