"""Rank processes for test_sharded_basis.py, run through dist_workers.py's harness
(``python tests/distributed/sharded_workers.py SCENARIO RANK WORLD PORT OUTDIR``: a gloo group on
127.0.0.1, one thread, 30 s timeout; each rank writes ``OUTDIR/SCENARIO-RANK.pt``).

The problems are built here so the test process builds the same ones for its single-process
references.
"""

from __future__ import annotations

import sys
from typing import Any

import dist_workers
import torch
from torch import nn

# 6 batches; 2 ranks hold 3/3 of them, 3 ranks 2/3/1.
BATCH_SIZES = (4, 6, 3, 5, 7, 2)
SHARDS = {1: [list(range(6))], 2: [[0, 1, 2], [3, 4, 5]], 3: [[0, 1], [2, 3, 4], [5]]}
D_IN, HIDDEN, CLASSES = 20, 40, 5  # 20*40 + 40 + 40*5 + 5 = 1045 parameters (not 3k)
MATRIX_N = 700  # a replicated matrix operator (700 = 5 x 128 + 60: the last shard is short)


def problem() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A float64 tanh MLP and 6 classification batches, the same in every process."""
    return dist_workers.problem(
        seed=4321, sizes=BATCH_SIZES, dims=(D_IN, HIDDEN, CLASSES), weight_scale=0.5
    )


def shard(batches: list, world: int, rank: int) -> list:
    """This rank's batches."""
    return dist_workers.shard(batches, world, rank, SHARDS)


def matrix() -> torch.Tensor:
    """``[700, 700]`` float64 with eigenvalues 10 (three times), 9 and 696 in [0, 5]: with
    block size 1 the copies of 10 are found by verification rounds and restarts."""
    from hessfast.testing.spectra import with_spectrum

    lam = torch.cat([torch.tensor([10.0, 10.0, 10.0, 9.0], dtype=torch.float64),
                     torch.linspace(0.0, 5.0, MATRIX_N - 4, dtype=torch.float64)])
    return with_spectrum(lam, seed=3)[0]


def scenario_sharded(rank: int, world: int) -> dict[str, Any]:
    """Top-3 of the data-parallel Hessian with a sharded and an unsharded basis (the basis
    allocations recorded), the memory plan, a replicated matrix operator with a triple top
    eigenvalue and a small basis (restarts, verification misses), and the refusals."""
    import hessfast as hf
    import hessfast.lanczos.run as run_mod
    import hessfast.lanczos.sharded as sharded_mod
    from hessfast.lanczos.basis import Basis

    seen: list[int] = []

    class Recording(Basis):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            seen.append(self.Q.nbytes)

    run_mod.Basis = Recording  # type: ignore[misc]
    sharded_mod.Basis = Recording  # type: ignore[misc]
    out: dict[str, Any] = {}
    model, batches = problem()
    H = hf.hessian(model, nn.CrossEntropyLoss(), shard(batches, world, rank))
    res = hf.eigsh(H, k=3, tol=1e-10, basis_sharding=True)
    out["sharded_bytes"] = seen[-1]
    plain = hf.eigsh(H, k=3, tol=1e-10)
    out["plain_bytes"] = seen[-1]
    for name, r in (("sharded", res), ("plain", plain)):
        out[f"{name}_values"], out[f"{name}_vectors"] = r.eigenvalues, r.eigenvectors
        out[f"{name}_status"], out[f"{name}_ortho"] = str(r.status), r.orthogonality
        out[f"{name}_residuals"] = r.residuals
    out["plan_bytes"] = hf.estimate_memory(H, "eigsh", k=3, world_size=world,
                                           basis_sharding=True, measure=False).basis
    A = hf.LinearOperator.from_matrix(matrix())
    r2 = hf.eigsh(A, k=4, tol=1e-10, max_basis=12, basis_sharding=True)
    out["matrix_values"], out["matrix_vectors"] = r2.eigenvalues, r2.eigenvectors
    out["matrix_status"], out["matrix_restarts"] = str(r2.status), r2.num_restarts
    for name, kwargs in (("refuse_block", dict(block_size=2)),
                         ("refuse_reorth", dict(reorth="partial")),
                         ("refuse_checkpoint", dict(checkpoint="unused.ckpt"))):
        dist_workers._expect_failure(
            name, out, lambda kw=kwargs: hf.eigsh(H, k=3, basis_sharding=True, **kw))
    return out


dist_workers.SCENARIOS["sharded"] = scenario_sharded

if __name__ == "__main__":
    sys.exit(dist_workers.main(sys.argv[1:]))
