"""Rank processes for test_probe_parallel.py: ``python probe_workers.py SCENARIO
RANK WORLD PORT OUTDIR``, run by the spawn harness _spawn.py (the same
``dist_workers.main``: a gloo group on 127.0.0.1:PORT, 30 s timeout, one thread, the
scenario's dict written to ``OUTDIR/SCENARIO-RANK.pt``).

The mesh is ``probe x data`` with data = WORLD // 2: 4 ranks are a 2 x 2 mesh (each probe
group holds the 8 batches of ``dist_workers.problem`` split 3/5 over its two data ranks),
2 ranks a 2 x 1 mesh (each rank holds all 8 batches).
"""

from __future__ import annotations

import sys
from typing import Any

import dist_workers
import torch
from torch import nn

PROBE_GROUPS = 2


def measure(H: Any, mesh: Any) -> dict[str, Any]:
    """What the test compares: SLQ (Rademacher, 5 probes: an odd split 3/2; Gaussian; v0
    rows) and a fixed-budget Hutchinson trace (7 probes: 4/3), all on ``H`` over ``mesh``."""
    import hessfast as hf

    out: dict[str, Any] = {}
    dens = hf.spectral_density(H, num_probes=5, num_steps=12, seed=5, mesh=mesh)
    out["slq_nodes"], out["slq_weights"] = dens.nodes, dens.weights
    out["slq_steps"] = dens.steps_taken
    out["slq_bounds"] = torch.tensor(dens.bounds, dtype=torch.float64)
    out["slq_sigma"] = torch.tensor(dens.default_sigma, dtype=torch.float64)
    out["slq_matvecs"] = torch.tensor(dens.num_matvecs)
    gauss = hf.spectral_density(H, num_probes=3, num_steps=8, seed=2, probe="gaussian",
                                mesh=mesh)
    out["gauss_nodes"], out["gauss_weights"] = gauss.nodes, gauss.weights
    given = hf.spectral_density(H, num_steps=6, v0=dist_workers.vectors(H.shape[0]), mesh=mesh)
    out["v0_nodes"], out["v0_weights"] = given.nodes, given.weights
    tr = hf.trace(H, 7, method="hutchinson", seed=3, mesh=mesh)
    out["trace"] = torch.tensor([tr.value, tr.stderr, tr.num_samples, tr.num_matvecs],
                              dtype=torch.float64)
    return out


def _failure(run: Any) -> tuple[str, str]:
    try:
        run()
    except Exception as exc:  # noqa: BLE001 - recorded and checked by the test
        return type(exc).__name__, str(exc)
    return "no error", ""


def scenario_mesh(rank: int, world: int) -> dict[str, Any]:
    """Every measurement over the mesh; then an operator reduced over the whole world is
    refused, and a probe group that raises makes every rank raise."""
    import hessfast as hf

    mesh = hf.distributed.Mesh(probe=PROBE_GROUPS, data=world // PROBE_GROUPS)
    model, batches = dist_workers.problem()
    mine = dist_workers.shard(batches, mesh.data, mesh.data_rank)
    H = hf.hessian(model, nn.CrossEntropyLoss(), mine, process_group=mesh.data_group)
    out = measure(H, mesh)
    out["coords"] = (mesh.probe_index, mesh.data_rank, H.num_samples)

    whole = hf.hessian(model, nn.CrossEntropyLoss(), mine, process_group="auto")
    out["wrong_group"] = _failure(lambda: hf.spectral_density(whole, 4, 4, mesh=mesh))

    diag = torch.arange(1.0, 11.0, dtype=torch.float64)

    def product(V: torch.Tensor) -> torch.Tensor:
        W = V * diag
        if mesh.probe_index == 1:
            W[0, 0] = float("nan")
        return W

    op = hf.LinearOperator.from_function(product, 10, dtype=torch.float64, check=False)
    out["group_fails"] = _failure(lambda: hf.spectral_density(op, 4, 3, mesh=mesh))
    return out


SCENARIOS = {"mesh": scenario_mesh}


if __name__ == "__main__":
    dist_workers.SCENARIOS.update(SCENARIOS)
    sys.exit(dist_workers.main(sys.argv[1:]))
