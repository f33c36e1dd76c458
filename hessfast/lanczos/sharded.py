"""A sharded Lanczos basis: ``hessfast.eigsh(A, k, basis_sharding=True)`` under a process group.

Every rank stores only its contiguous slice ``[lo, hi)`` of each basis vector
(:func:`hessfast.distributed.shard_bounds`: 128-aligned boundaries, which may straddle
parameters), so the basis memory per rank falls R-fold; the float64 projection T, the Ritz
problem, the couplings and every decision of the loop are replicated and identical on all
ranks. The run is the thick-restart loop of :mod:`.restart` unchanged (restarts, locking,
verification rounds): :class:`ShardedRun` replaces the basis storage and the steps that touch
basis columns.

Per step (block size b = 1 in this version):

1. the current block ``[b, n]`` is kept whole on every rank (it is one all-gather old) and
   multiplied by A; the operator's product is already summed over the ranks (one all-reduce,
   :mod:`hessfast.curvature.dataparallel`), and each rank keeps its slice ``[b, hi - lo]``.
   v1 slices the full product; a reduce-scatter in the operator would send 1/R of the bytes;
2. classical Gram-Schmidt against the shard basis: ``ops.basis_dot`` on the shard, ONE
   all-reduce of the ``[m + 1, b]`` coefficients and squared row norms per pass,
   ``ops.basis_update`` on the shard. The DGKS test for the second pass is made on those
   all-reduced numbers: ``||w - Q^T c||^2 = ||w||^2 - ||c||^2`` for orthonormal Q, so a row
   is reorthogonalised when ``||c||^2 > (1 - eta^2) ||w||^2`` (the same condition as
   ``ops.reorthogonalize``'s ``||w||_after < eta ||w||_before``, without one more collective);
3. the new vector's norm is one all-reduced sum of squares; a lost direction (norm below the
   run's threshold) is replaced by a random vector (drawn whole from the run's generator, like
   the unsharded run) orthogonalised against the shard basis;
4. the next block is all-gathered from the shards (one all-gather of ``[b, n]``).

Ritz vectors (restarts, the returned pairs) are formed locally on each shard; the returned
eigenvectors are all-gathered into ``[k, n]`` at the end, so every rank returns the same
result. Compared with the unsharded run the arithmetic differs only in rounding (sums split
over the ranks). Not supported yet (refused with :class:`~hessfast.errors.ConfigurationError`):
``block_size > 1`` (needs a block QR of an all-reduced Gram matrix: CholQR2 with rank-deficiency
detection), ``reorth`` other than ``"full"`` and ``checkpoint=``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch

from .. import distributed, ops
from .._checks import all_finite, sample_probes
from ..errors import ConfigurationError
from ..linop import LinearOperator, refuse_sharded
from .basis import Basis
from .restart import block_lanczos
from .run import LanczosState, Run

__all__ = ["ShardedRun", "check_sharded", "sharded_lanczos", "sharding_comm"]


def sharding_comm(A: LinearOperator, who: str) -> distributed.Comm | None:
    """The group a sharded basis is split over: a data-parallel operator's own group, else
    the default group (a replicated operator, the same on every rank). None for a group of
    one process: the unsharded run is then the same thing.

    Raises:
        ConfigurationError: no process group is initialised, or A is a curvature operator
            built for one process's data (``process_group=None``) under a larger group.
    """
    refuse_sharded(A, f"{who}(basis_sharding=True)",
                   "Its vectors are sharded already: drop basis_sharding (eigsh k=1 then runs "
                   "krylov='lean').")
    if not distributed.is_initialized():
        raise ConfigurationError(
            f"{who}: basis_sharding=True splits the basis over the ranks of a process group, "
            "but torch.distributed is not initialised: launch with torchrun and call "
            "hessfast.distributed.init() (or torch.distributed.init_process_group) first, "
            "or drop basis_sharding"
        )
    ranks = getattr(A, "ranks", None)
    if ranks is not None and ranks.active:
        return ranks.comm
    if ranks is not None and distributed.world_size() > 1:
        raise ConfigurationError(
            f"{who}: basis_sharding=True needs the same operator on every rank, but this "
            "curvature operator holds this process's data only (process_group=None, or a "
            "group of one): build it with process_group='auto' (the default) so that its "
            "products are summed over the ranks"
        )
    if distributed.world_size() == 1:
        return None
    return distributed.Comm()


def check_sharded(block_size: int, reorth: str, checkpoint: Any, who: str) -> None:
    """Refuse what the sharded run does not support yet (module docstring)."""
    bad = []
    if block_size != 1:
        bad.append(f"block_size={block_size} (only 1 is supported)")
    if reorth != "full":
        bad.append(f"reorth={reorth!r} (only 'full' is supported)")
    if checkpoint is not None:
        bad.append("checkpoint= (a sharded basis is not saved yet)")
    if bad:
        raise ConfigurationError(
            f"{who}: basis_sharding=True does not support {', '.join(bad)} in this version. "
            "Use block_size=1, reorth='full' and no checkpoint, or basis_sharding=False"
        )


class ShardedRun(Run):
    """A :class:`~.run.Run` whose basis rows hold only this rank's columns
    ``[lo, hi)`` (``basis.Q: [cap, hi - lo]``); blocks, products and Ritz values stay full
    and replicated. Supports block size 1 and ``reorth="full"``."""

    def __init__(self, *args: Any, comm: distributed.Comm, **kwargs: Any) -> None:
        self.comm = comm
        n = args[0].shape[0]
        self.lo, self.hi = distributed.shard_bounds(n, comm.size, comm.rank)
        super().__init__(*args, **kwargs)

    def make_basis(self, cap: int, pin: bool) -> Basis:
        """``cap`` rows of this rank's ``hi - lo`` columns."""
        return Basis(cap, self.hi - self.lo, self.bdtype, self.bdev, pin)

    # -- collectives -----------------------------------------------------------------------

    def sq_norms(self, W: torch.Tensor) -> torch.Tensor:
        """``[k]`` float64 CPU squared norms of the full rows whose shards are ``W [k, nl]``."""
        local = torch.linalg.vector_norm(W.to(self.acc), dim=1).double() ** 2
        return self.comm.allreduce_sum_(local, "norms of sharded vectors").cpu()

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Shards ``[r, nl]`` -> full rows ``[r, n]`` (no collective for r = 0: every rank
        knows r from replicated numbers)."""
        if rows.shape[0] == 0:
            return rows.new_zeros(0, self.n)
        return self.comm.allgather_cols(rows, self.n, "the next block")

    def cgs2(self, V: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """Orthogonalise the shard rows ``W [k, nl]`` in place against the shard basis
        ``V [m, nl]``: classical Gram-Schmidt, one all-reduce of ``[m + 1, k]`` per pass, a
        second pass for the rows the DGKS test picks (module docstring). Returns the total
        coefficients ``C [m, k]`` (replicated)."""
        m = V.shape[0]
        C = ops.basis_dot(V, W, acc_dtype=self.acc)
        sq = torch.linalg.vector_norm(W.to(C.dtype), dim=1) ** 2
        buf = self.comm.allreduce_sum_(torch.cat([C, sq[None]], 0), "basis coefficients")
        C, before = buf[:m], buf[m]
        ops.basis_update(V, C, W)
        redo = ((C**2).sum(0) > (1.0 - ops.DGKS_ETA**2) * before).nonzero().flatten()
        if m and redo.numel():
            Wr = W[redo]
            C2 = self.comm.allreduce_sum_(ops.basis_dot(V, Wr, acc_dtype=self.acc),
                                          "basis coefficients (second pass)")
            ops.basis_update(V, C2, Wr)
            W[redo] = Wr
            C[:, redo] += C2
        return C

    # -- the steps that touch basis columns ------------------------------------------------

    def _coefficients(self, W: torch.Tensor, s: int, bb: int) -> torch.Tensor:
        return self.cgs2(self.basis.rows(), W)

    def orthonormal(self, W: torch.Tensor, tiny: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The shard of ``W [1, nl]`` (orthogonal to the basis) split as ``L Qn``:
        ``Qn [b', nl]``, ``L [1, b']`` float64 (CPU), as :func:`.basis.orthonormal_block` for
        one row: a norm <= ``tiny`` is replaced by a random direction with zero coupling."""
        n, m = self.n, self.basis.m
        S = self.sq_norms(W).sqrt()
        if float(S[0]) > tiny:
            Qn = W / S.to(device=W.device, dtype=W.dtype).clamp_min(torch.finfo(W.dtype).tiny)
            L = S.reshape(1, 1).clone()
        else:
            Qn, L = W[:0], torch.zeros(1, 0, dtype=torch.float64)
            if m < n:
                fresh = sample_probes(self.gen, 1, n, "gaussian", dtype=W.dtype,
                                      device=W.device)[:, self.lo : self.hi].clone()
                self.cgs2(self.basis.rows(), fresh)
                nrm = float(self.sq_norms(fresh)[0]) ** 0.5
                if nrm > 1e-8:  # else numerically no room left
                    Qn, L = fresh / nrm, torch.zeros(1, 1, dtype=torch.float64)
        return Qn[: n - m], L[:, : n - m]

    def step(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`~.run.Run.step` on shards: the full block ``[1, n]`` is multiplied, its
        product sliced to this rank's columns; returns the full next block ``[b', n]`` and
        its coupling ``L [1, b']``, or None when the product is not finite."""
        basis, A, bb = self.basis, self.A, block.shape[0]
        if bb != 1:
            raise ConfigurationError(f"a sharded basis supports block size 1, got {bb}")
        s = basis.m
        basis.Q[s : s + bb] = block[:, self.lo : self.hi].to(self.bdtype)
        basis.m = s + bb
        W = A.matmat(block.to(A.dtype)).to(device=self.bdev, dtype=self.wdtype)
        if not all_finite(W):  # W is the same on every rank: all agree
            basis.m = s
            return None
        self.norm_est = max(self.norm_est, float(W.norm(dim=1).max()))
        W = W[:, self.lo : self.hi].clone()  # v1: the full product, sliced
        tiny = self.rayleigh_ritz(self._coefficients(W, s, bb).double().cpu(), s, bb)
        Qn, L = self.orthonormal(W, tiny)
        self.residuals(L, s, bb)
        return self.gather(Qn), L

    def fresh_block(self, b: int) -> torch.Tensor:
        """Full ``[b', n]`` random rows orthonormal to the basis (drawn whole, like the
        unsharded run, and orthogonalised on the shards)."""
        Z = self.random_rows(b)[:, self.lo : self.hi].clone()
        self.cgs2(self.basis.rows(), Z)
        tiny = math.sqrt(self.n) * 100 * torch.finfo(self.acc).eps
        return self.gather(self.orthonormal(Z, tiny)[0])


def sharded_lanczos(A: LinearOperator, k: int, which: str, *, comm: distributed.Comm,
                    **kwargs: Any) -> LanczosState:
    """:func:`~.restart.block_lanczos` with a sharded basis over ``comm``; the returned
    eigenvectors ``[k, n]`` are gathered on every rank and their orthogonality measured on
    the full vectors (an all-reduced Gram matrix)."""
    st = block_lanczos(A, k, which, make_run=functools.partial(ShardedRun, comm=comm),
                       **kwargs)
    X = st.vectors  # [k', hi - lo]: this rank's columns of the Ritz vectors
    gram = comm.allreduce_sum_(X.double() @ X.double().T, "the eigenvectors' Gram matrix")
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    ortho = float((gram - eye).abs().max()) if gram.numel() else 0.0
    vectors = comm.allgather_cols(X, A.shape[0], "the eigenvectors")
    return dataclasses.replace(st, vectors=vectors, orthogonality=ortho)
