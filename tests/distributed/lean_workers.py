"""Rank processes for test_lean_sharded.py: ``python lean_workers.py SCENARIO RANK WORLD
PORT OUTDIR`` (the spawn harness _spawn.py; ``dist_workers.main`` sets up a gloo group).

The operator is a diagonal matrix whose vectors are SHARDED over the ranks
(``LinearOperator.shards`` = a :class:`hessfast.distributed.Comm`): rank r holds the entries
``[lo_r, hi_r)`` of every vector and multiplies them by its slice of the diagonal, so a
product needs no communication and every dot product is a sum over the ranks
(:func:`hessfast.linop.row_dots`). The algorithms must give the single-process answer.
"""

from __future__ import annotations

import sys
from typing import Any

import dist_workers
import torch

N = 300


def diagonal() -> torch.Tensor:
    """The whole diagonal ``[N]`` (float64): a spread spectrum with a clear top and bottom."""
    g = torch.Generator().manual_seed(0)
    d = torch.linspace(-1.0, 3.0, N, dtype=torch.float64)
    return d[torch.randperm(N, generator=g)]


def probes(P: int) -> torch.Tensor:
    """Global probes ``[P, N]`` every rank slices the same way (SLQ's v0)."""
    return torch.randn(P, N, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


def bounds(rank: int, world: int) -> tuple[int, int]:
    cut = [0, 130, N] if world == 2 else [round(N * r / world) for r in range(world + 1)]
    return cut[rank], cut[rank + 1]


def make_operator(rank: int, world: int, checked: bool = True) -> Any:
    """This rank's sharded diagonal operator (hessfast imported inside the worker);
    ``checked=False``: the algorithms' one-time operator probe runs on it."""
    import hessfast as hf
    from hessfast.distributed import Comm

    lo, hi = bounds(rank, world)
    d = diagonal()[lo:hi].clone()

    class Op(hf.LinearOperator):
        def __init__(self) -> None:
            super().__init__(hi - lo, torch.float64, "cpu")
            self.checked = checked
            self.shards = Comm()

        def _matmat(self, V: torch.Tensor) -> torch.Tensor:
            return V * d

    return Op()


def scenario_lean(rank: int, world: int) -> dict[str, Any]:
    import hessfast as hf

    A = make_operator(rank, world)
    lo, hi = bounds(rank, world)
    out: dict[str, Any] = {}
    out["lambda_max"] = torch.tensor(hf.lambda_max(A, tol=1e-10))
    r = hf.eigsh(A, k=1, which="SA", tol=1e-10)
    out["lambda_min"], out["krylov"] = r.eigenvalues, r.krylov
    out["vector_shard"], out["lo"], out["hi"] = r.eigenvectors[0], lo, hi
    dens = hf.spectral_density(A, num_steps=20, v0=probes(3)[:, lo:hi])
    out["slq_nodes"], out["slq_weights"], out["slq_krylov"] = dens.nodes, dens.weights, \
        dens.krylov
    rnd = hf.spectral_density(A, num_probes=2, num_steps=10, seed=4)
    out["rnd_nodes"] = rnd.nodes
    p = hf.power_iteration(A, tol=1e-8, max_matvecs=3000)
    out["power"] = torch.tensor([p.eigenvalue, float(p.converged)])
    t = hf.trace(A, 40, method="hutchinson", seed=2)
    out["trace"] = torch.tensor([t.value, t.stderr, t.num_samples])
    refusals = {}
    for name, run in (("eigsh_k3", lambda: hf.eigsh(A, k=3)),
                      ("full", lambda: hf.lambda_max(A, krylov="full")),
                      ("kpm", lambda: hf.spectral_density(A, method="kpm")),
                      ("hutch++", lambda: hf.trace(A, 30, method="hutch++"))):
        try:
            run()
            refusals[name] = "ran"
        except Exception as exc:  # noqa: BLE001 - recorded and checked by the test
            refusals[name] = f"{type(exc).__name__}: {exc}"
    out["refusals"] = refusals
    # an unchecked sharded operator: the probe judges whole-vector dots (all-reduced), so
    # every rank passes it and the answer is the same
    U = make_operator(rank, world, checked=False)
    out["probed_lambda_max"] = torch.tensor(hf.lambda_max(U, tol=1e-10))
    out["probed_mark"] = U.checked
    # ranks that pass different arguments: every rank raises, before any product
    before = A.num_matvecs
    try:
        hf.lambda_max(A, tol=1e-6 if rank == 1 else 1e-8)
        out["disagree"] = "ran"
    except Exception as exc:  # noqa: BLE001 - recorded and checked by the test
        out["disagree"] = f"{type(exc).__name__}: {exc}"
    out["disagree_products"] = A.num_matvecs - before
    return out


dist_workers.SCENARIOS["lean"] = scenario_lean

if __name__ == "__main__":
    sys.exit(dist_workers.main(sys.argv[1:]))
