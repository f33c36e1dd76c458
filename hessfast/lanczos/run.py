"""The state of one thick-restart block Lanczos run (:class:`Run`: basis, projection, locks,
the last Rayleigh-Ritz, the verification round) and what a run returns
(:class:`LanczosState`). The loop that drives a run is :func:`.restart.block_lanczos`; the
returned pairs are picked by :func:`.wanted.wanted_pairs`, a sharded basis is
:class:`.sharded.ShardedRun` (a subclass) and a checkpoint saves and restores a run's fields
(:mod:`.checkpoint`): all of them import this module, and it imports none of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .. import ops
from .._checks import all_finite, probe_generator, sample_probes, work_dtype
from ..linop import LinearOperator, refuse_sharded
from .basis import Basis, orthonormal_block
from .verify import converge_threshold, converged, operator_floor

__all__ = ["CHUNK_BYTES", "LanczosState", "Run", "column_chunks"]

#: Ritz vectors are formed in column chunks of about this many bytes (no full-basis copy).
CHUNK_BYTES = 2**26


def column_chunks(V: torch.Tensor) -> Iterator[slice]:
    """Column slices of ``V [r, n]`` holding about :data:`CHUNK_BYTES` in float64: what a
    float64 (or working-precision) temporary of the rows' slice costs, whatever n."""
    step = max(1, CHUNK_BYTES // (8 * max(V.shape[0], 1)))
    for c in range(0, V.shape[1], step):
        yield slice(c, c + step)


@dataclass
class LanczosState:
    """Everything a run produced; :func:`block_lanczos` returns it."""

    theta: torch.Tensor  # [k] float64 Ritz values of the wanted pairs, most wanted first
    vectors: torch.Tensor  # [k, n] Ritz vectors in the operator's dtype
    residuals: torch.Tensor  # [k] float64
    converged: torch.Tensor  # [k] bool
    status: str
    num_matvecs: int = 0
    num_passes: int = 0
    num_restarts: int = 0
    norm_estimate: float = 0.0
    orthogonality: float = 0.0  # max |X X^T - I| of the returned vectors
    verified: bool = False  # a verification of the wanted set found nothing missing
    num_verifications: int = 0  # verification rounds started
    num_misses: int = 0  # rounds that found a better eigenvalue than a candidate
    verify_matvecs: int = 0  # products spent in verification rounds
    residual_floor: float = 0.0  # every residual is >= it (.verify.residual_floor)


class Run:
    """The state of one thick-restart run (basis, projection, locks, last Rayleigh-Ritz)."""

    def __init__(self, A: LinearOperator, k: int, which: str, tol: float, cap: int, seed: int,
                 reorth: str, basis_dtype: torch.dtype | None,
                 basis_device: torch.device | str | None, pin: bool = False) -> None:
        refuse_sharded(A, "hessfast.eigsh (a stored Krylov basis)",
                       "On sharded vectors eigsh runs k=1 with krylov='lean' (the default "
                       "'auto' picks it), or method='power'.")
        self.A, self.k, self.which, self.tol, self.reorth = A, k, which, tol, reorth
        self.n = A.shape[0]
        # vectors and accumulation in the working precision (float64 or float32)
        self.wdtype = self.acc = work_dtype(A.dtype)
        self.bdtype = basis_dtype or self.wdtype
        self.bdev = torch.device(basis_device) if basis_device is not None else A.device
        self.gen = probe_generator(seed)
        self.basis = self.make_basis(cap, pin)
        # dropped coupling of each verification round: A Q^T = ... + sum_r Q_r^T G_r
        self.G: list[torch.Tensor] = []  # each [b_r, m] float64
        # the dropped blocks' rows, kept orthogonal to the basis: [sum b_r, n] in the working
        # dtype (the residual of a Ritz pair is then exact); None where the basis holds only
        # some columns of each row (a sharded run keeps the bound)
        self.D: torch.Tensor | None = (
            torch.zeros(0, self.n, dtype=self.wdtype, device=self.bdev)
            if self.basis.Q.shape[1] == self.n else None)
        self.coupling = torch.zeros(0, 0, dtype=torch.float64)  # L^T Y[last]: [b', m]
        self.norm_est = 0.0
        self.theta = torch.zeros(0, dtype=torch.float64)
        self.Y = torch.zeros(0, 0, dtype=torch.float64)
        self.res = torch.zeros(0, dtype=torch.float64)
        self.ok = torch.zeros(0, dtype=torch.bool)
        # the loop's progress (saved by a checkpoint with the above): the next block, restarts,
        # (max, min) Ritz values per step, the verification round
        self.block, self.restarts = torch.zeros(0), 0
        self.extremes: list[tuple[float, float]] = []
        self.ref: torch.Tensor | None = None  # the candidates being verified
        self.ref_res = torch.zeros(0)
        # the candidates' vectors: None while they are still the basis' first rows (a
        # verification round that needs no thick restart never copies them: k rows saved)
        self.ref_vecs: torch.Tensor | None = None
        self.ref_slack = torch.zeros(0, dtype=torch.float64)
        self.verify_left = self.n_verify = self.n_miss = self.verify_mv = self.verify_mv0 = 0

    def make_basis(self, cap: int, pin: bool) -> Basis:
        """The basis storage: ``cap`` rows of n (a sharded run stores its columns only)."""
        return Basis(cap, self.n, self.bdtype, self.bdev, pin)

    def random_rows(self, count: int) -> torch.Tensor:
        """``[count, n]`` Gaussian rows from the run's private generator."""
        return sample_probes(self.gen, count, self.n, "gaussian", dtype=self.wdtype,
                             device=self.bdev)

    def start_block(self, b: int, v0: torch.Tensor | None) -> torch.Tensor:
        """The first block: ``min(b, n)`` orthonormal rows ``[b', n]`` in the working dtype,
        spanning the user's start vectors ``v0`` (``[n]`` or ``[j, n]``, the first ``b``
        rows used; None: none) completed by random rows; start vectors that are duplicate
        or zero are perturbed by random ones instead of dividing by zero."""
        n, acc = self.n, self.acc
        v = None if v0 is None else v0.reshape(-1, n).to(device=self.bdev,
                                                          dtype=self.wdtype)[:b]  # [j, n]
        if v is not None and b == 1:
            # a warm start's one row: its norm is its QR (no random row drawn to be replaced)
            norm = float(torch.linalg.vector_norm(v.to(acc)))
            if math.isfinite(norm) and norm > 0.0:
                return (v.to(acc) / norm).to(self.wdtype)
        X0 = self.random_rows(b)
        if v is not None:
            X0[: v.shape[0]] = v
        Qh, R = torch.linalg.qr(X0.T.to(acc))
        diag = torch.diagonal(R).abs()
        if bool((diag <= 1e-10 * max(float(diag.max()), 1e-300)).any()):
            # duplicate / zero start vectors: perturb with random ones (never divide by zero)
            X0 = X0 + 1e-3 * X0.norm(dim=1, keepdim=True).clamp_min(1.0) * self.random_rows(b)
            Qh, R = torch.linalg.qr(X0.T.to(acc))
        return Qh.T.to(self.wdtype)[: min(b, n)]

    def _coefficients(self, W: torch.Tensor, s: int, bb: int) -> torch.Tensor:
        """Orthogonalise ``W [bb, n]`` in place against the basis; its coefficients ``[m, bb]``."""
        acc, Qall = self.acc, self.basis.rows()
        if self.reorth == "full":
            return ops.reorthogonalize(Qall, W, acc_dtype=acc)[0]
        lo = max(0, s - bb)
        C = torch.zeros(self.basis.m, bb, dtype=acc, device=self.bdev)
        if self.reorth == "partial":
            Cfull = ops.basis_dot(Qall, W, acc_dtype=acc)
            wn = W.norm(dim=1).to(acc).clamp_min(torch.finfo(acc).tiny)
            eps = torch.finfo(self.bdtype).eps
            if lo > 0 and float((Cfull[:lo] / wn).abs().max()) > math.sqrt(eps):
                return ops.reorthogonalize(Qall, W, acc_dtype=acc)[0]
        C[lo:] = ops.reorthogonalize(Qall[lo:], W, acc_dtype=acc)[0]
        return C

    def step(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Multiply the block, extend T, Rayleigh-Ritz; the next block and its coupling
        ``(Qn [b', n], L [bb, b'])``, or None when the product is not finite."""
        basis, A, bb = self.basis, self.A, block.shape[0]
        s = basis.m
        basis.Q[s : s + bb] = block.to(self.bdtype)
        basis.m = s + bb
        product = A.matmat(block.to(A.dtype))
        W = product.to(device=self.bdev, dtype=self.wdtype)
        # a fresh product, or a converted copy of any product, is ours: the next block is
        # made in it
        fresh = A.fresh_products or W is not product
        del product
        if not all_finite(W):
            basis.m = s
            return None
        self.norm_est = max(self.norm_est, float(W.norm(dim=1).max()))
        tiny = self.rayleigh_ritz(self._coefficients(W, s, bb).double().cpu(), s, bb)
        Qn, L = orthonormal_block(W, basis.rows(), tiny, self.gen, self.acc, inplace=fresh)
        del W
        if self.D is not None and self.D.shape[0]:
            # the dropped rows stay orthogonal to the basis: what the new block holds of them
            # is now in T (its product's coefficients), the rest stays in D^T G
            ops.reorthogonalize(basis.Q[s : s + bb], self.D, acc_dtype=self.acc)
        self.residuals(L, s, bb, Qn)
        return Qn, L

    def rayleigh_ritz(self, Cd: torch.Tensor, s: int, bb: int) -> float:
        """Store the new block's coefficients ``Cd [m, bb]`` as T's column block ``s``, solve
        the Ritz problem of T; the rank-deficiency threshold of the next block."""
        basis = self.basis
        basis.T[: basis.m, s : s + bb] = Cd
        basis.T[s : s + bb, : basis.m] = Cd.T
        Tjj = basis.T[s : s + bb, s : s + bb]  # average the two rounding errors
        basis.T[s : s + bb, s : s + bb] = 0.5 * (Tjj + Tjj.T)
        T = basis.T[: basis.m, : basis.m]
        self.theta, self.Y = torch.linalg.eigh(0.5 * (T + T.T))
        self.norm_est = max(self.norm_est, float(self.theta.abs().max()))
        return max(self.norm_est, torch.finfo(self.acc).tiny) * 64 * torch.finfo(self.acc).eps

    def residuals(self, L: torch.Tensor, s: int, bb: int, Qn: torch.Tensor | None = None
                  ) -> None:
        """Residuals and convergence flags of the Ritz pairs from the next block's coupling
        ``L [bb, b']`` (and the next block ``Qn [b', n]``, for the exact residual)."""
        # residual of Ritz pair i: ||L^T y_i[last block]||, plus the dropped couplings of
        # verification rounds (triangle inequality: an upper bound) ...
        Y, m = self.Y, self.basis.m
        self.coupling = L.T @ Y[s : s + bb] if L.numel() else torch.zeros(0, m, dtype=torch.float64)
        self.G = [torch.cat([g, g.new_zeros(g.shape[0], m - g.shape[1])], 1) for g in self.G]
        res = self.coupling.norm(dim=0) if L.numel() else torch.zeros_like(self.theta)
        for g in self.G:
            res = res + (g @ Y).norm(dim=0)
        exact = self.dropped_residuals(Qn) if self.G else None
        if exact is not None:  # ... or its exact value where the dropped rows are kept
            res = torch.minimum(res, exact)
        floor = self.floor()
        self.res = torch.clamp(res, min=floor)
        self.ok = converged(self.theta, self.res, self.tol, self.norm_est, self.A.dtype,
                            floor=floor)

    def dropped_residuals(self, Qn: torch.Tensor | None) -> torch.Tensor | None:
        """The exact residual norms ``[m]`` of all Ritz pairs while dropped couplings exist:
        ``r_i = Qn^T c_i + D^T g_i`` (``c = coupling``, ``g = G y_i``, D orthogonal to the
        basis, Qn too but not to D), so ``||r_i||^2 = |c_i|^2 + g_i^T (D D^T) g_i + 2 c_i^T
        (Qn D^T) g_i``; None where D is not kept (the bound is used)."""
        D, G = self.D, torch.cat(self.G)
        if D is None or Qn is None or D.shape[0] != G.shape[0]:
            self.D = None  # e.g. resumed from a checkpoint without D: the bound from now on
            return None
        acc = self.acc
        DD = (D.to(acc) @ D.to(acc).T).double().cpu()
        DN = (D.to(acc) @ Qn.to(device=D.device, dtype=acc).T).double().cpu()  # [d, b']
        Gy = G @ self.Y  # [d, m]
        c = self.coupling if self.coupling.numel() else torch.zeros(DN.shape[1], Gy.shape[1],
                                                                    dtype=torch.float64)
        sq = (c * c).sum(0) + (Gy * (DD @ Gy)).sum(0) + 2.0 * (c * (DN.T @ Gy)).sum(0)
        return sq.clamp_min(0.0).sqrt()

    def floor(self) -> float:
        """The residual floor at the current ``||A||_est`` (:func:`.verify.operator_floor`:
        the working precision's, or the products' own error for a finite-difference
        operator)."""
        return operator_floor(self.A, self.norm_est)

    def slack(self, vals: torch.Tensor) -> torch.Tensor:
        """The convergence tolerance of each value: max(tol * max(|theta|, 1e-3 ||A||_est),
        floor)."""
        return converge_threshold(vals, self.tol, self.norm_est, self.floor())

    def ritz_vectors(self, idx: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """Ritz vectors ``[len(idx), n]`` of the last Rayleigh-Ritz in the basis dtype, formed
        in column chunks of ~CHUNK_BYTES; ``into`` may be the basis' own first rows (each
        column chunk is read whole before it is written)."""
        Yi = self.Y[:, idx].T.to(self.acc).to(self.bdev)
        Q = self.basis.rows()
        out = torch.empty(len(idx), Q.shape[1], dtype=self.bdtype, device=self.bdev) \
            if into is None else into
        for cols in column_chunks(Q):  # Q.shape[1]: n, or a sharded run's columns
            out[:, cols] = (Yi @ Q[:, cols].to(self.acc)).to(self.bdtype)
        return out

    def release_basis(self) -> None:
        """Free the basis rows (the run has ended: its vectors are formed); T stays."""
        self.basis.Q = self.basis.Q.new_empty(0, self.basis.Q.shape[1])

    def candidates(self) -> torch.Tensor:
        """The vectors ``[len(ref), n]`` (basis dtype) of the candidates being verified: the
        basis' first rows until a thick restart rewrites them, a copy after that."""
        if self.ref_vecs is not None:
            return self.ref_vecs
        return self.basis.rows(0, 0 if self.ref is None else self.ref.numel())

    def keep_candidates(self) -> None:
        """Copy the candidates' vectors out of the basis before a thick restart rewrites
        its first rows (nothing to do outside a verification round, or when copied)."""
        if self.ref is not None and self.ref_vecs is None:
            self.ref_vecs = self.candidates().clone()

    def restart(self, idx: torch.Tensor, drop_residual_block: bool = False,
                dropped: torch.Tensor | None = None) -> None:
        """Keep the Ritz vectors ``idx`` (T becomes their diagonal).

        When the next block is the residual block, its product's coefficients against the
        kept vectors restore their coupling and (*) holds as before; when it is dropped
        (a verification round: ``dropped [b', n]``, the residual block), its coupling becomes
        a new G and its rows join D.
        """
        p, basis = idx.numel(), self.basis
        self.ritz_vectors(idx, into=basis.Q[:p])
        basis.m = p
        basis.T.zero_()
        basis.T[:p, :p] = torch.diag(self.theta[idx])
        Yi = self.Y[:, idx]
        self.G = [g @ Yi for g in self.G]
        if drop_residual_block and self.coupling.numel():
            self.G.append(self.coupling[:, idx].clone())
            if self.D is not None and dropped is not None \
                    and dropped.shape[0] == self.coupling.shape[0]:
                self.D = torch.cat([self.D, dropped.to(device=self.bdev, dtype=self.wdtype)])
            else:
                self.D = None
        self.theta, self.res, self.ok = self.theta[idx], self.res[idx], self.ok[idx]
        self.Y = torch.eye(p, dtype=torch.float64)

    def fresh_block(self, b: int) -> torch.Tensor:
        """``[b', n]`` random orthonormal rows orthogonal to the basis (b' < b near n)."""
        Z = self.random_rows(b)
        ops.reorthogonalize(self.basis.rows(), Z, acc_dtype=self.acc)
        tiny = math.sqrt(self.n) * 100 * torch.finfo(self.acc).eps  # Z's rows have norm ~sqrt(n)
        return orthonormal_block(Z, self.basis.rows(), tiny, self.gen, self.acc)[0]
