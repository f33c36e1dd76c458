"""Lanczos on many small symmetric operators in lockstep: the diagonal blocks ``A_gg`` of the
per-layer spectra (:func:`hessfast.analysis.block_spectra`), one group per block.

Each group g runs its own single-vector Lanczos recurrence in its own local coordinates
(``[m_g]`` vectors, a basis ``Q_g: [cap_g, m_g]``); what the groups share is the product: the
caller multiplies the next vectors of all still-active groups in ONE product of the full
operator (a stack of block-masked rows), so one data pass advances every group by one step.
The caller owns that product; :class:`Lockstep` owns the recurrences:

* step j of group g absorbs ``w = A_gg q_j``: ``ops.reorthogonalize`` against the group's
  whole basis ``Q_g[:j]`` with the second pass always taken (``eta = inf``, classical
  Gram-Schmidt twice: full reorthogonalisation of a basis of at most ``max_steps`` rows, so
  the recurrence's ``q_{j-1}`` and ``q_j`` terms are part of it), ``alpha_j`` its coefficient
  on ``q_j``, ``beta_j = ||w||``;
* the coefficients fill the rows of a :class:`~.probes.ProbeTridiagonals` (one row per
  group), whose Gauss rule gives the Ritz values and the residuals ``|beta_j s_j|``;
* a group stops when its top Ritz pair meets :func:`.verify.converged` (residuals floored at
  :func:`.verify.residual_floor` of ``||A_gg||_est = max |Ritz|``), when its Krylov space is
  the whole block (``j = m_g``), at an invariant subspace (``beta_j <= BREAKDOWN_EPS eps
  ||A_gg||_est``: below the residual floor, so such a step is converged by the rule anyway)
  or at ``max_steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops
from .probes import BREAKDOWN_EPS, ProbeTridiagonals
from .verify import converged, residual_floor

__all__ = ["Lockstep", "LockstepRitz"]


@dataclass(frozen=True)
class LockstepRitz:
    """One group's extreme Ritz pairs after its last step.

    Attributes:
        lambda_max, lambda_max_residual: the largest Ritz value and its residual.
        lambda_min, lambda_min_residual: the smallest (not watched by the stopping rule).
        converged: the stopping rule was met (module docstring).
        steps: Lanczos vectors of the group.
        residual_floor: both residuals are reported as at least this.
    """

    lambda_max: float
    lambda_max_residual: float
    lambda_min: float
    lambda_min_residual: float
    converged: bool
    steps: int
    residual_floor: float


class _Group:
    """One group's recurrence: its basis ``Q [cap, m]`` and the pending product ``w``."""

    def __init__(self, q0: torch.Tensor, w0: torch.Tensor, cap: int) -> None:
        self.m, self.cap, self.j, self.w = q0.numel(), cap, 1, w0
        self.Q = q0.new_zeros((cap, self.m))
        self.Q[0] = q0
        self.ritz = LockstepRitz(math.nan, math.nan, math.nan, math.nan, False, 1, 0.0)


class Lockstep:
    """Lanczos recurrences of up to ``num_groups`` blocks advanced together (module
    docstring). Start a group with :meth:`start`, then alternate :meth:`advance` (the next
    vectors of the active groups) and :meth:`receive` (their products) until
    :meth:`advance` returns nothing; :meth:`ritz` reads a group's result."""

    def __init__(self, num_groups: int, max_steps: int, tol: float) -> None:
        self.max_steps, self.tol = max_steps, tol
        # the tridiagonals of all groups (float64, CPU), in the layout of the probes' rule
        self.tri = ProbeTridiagonals(
            alpha=torch.zeros((num_groups, max_steps), dtype=torch.float64),
            beta=torch.zeros((num_groups, max_steps), dtype=torch.float64),
            steps=torch.zeros(num_groups, dtype=torch.int64),
            last_beta=torch.zeros(num_groups, dtype=torch.float64),
        )
        self.groups: dict[int, _Group] = {}
        self.active: list[int] = []

    def start(self, g: int, q0: torch.Tensor, w0: torch.Tensor) -> None:
        """Group g starts from the unit vector ``q0 [m]`` with its product ``w0 = A_gg q0``."""
        self.groups[g] = _Group(q0, w0, min(self.max_steps, q0.numel()))
        self.active.append(g)

    def receive(self, g: int, w: torch.Tensor) -> None:
        """The product ``A_gg q [m]`` of the vector :meth:`advance` returned for group g."""
        self.groups[g].w = w

    def advance(self) -> list[tuple[int, torch.Tensor]]:
        """Absorb every active group's pending product; ``(g, next vector [m])`` of the
        groups that go on (in start order), empty when all have stopped."""
        out = []
        for g in self.active:
            q = self._step(g)
            if q is not None:
                out.append((g, q))
        self.active = [g for g, _ in out]
        return out

    def ritz(self, g: int) -> LockstepRitz:
        """Group g's extreme Ritz pairs and stopping state."""
        return self.groups[g].ritz

    def _step(self, g: int) -> torch.Tensor | None:
        grp, tri = self.groups[g], self.tri
        j, w = grp.j, grp.w[None]  # [1, m]
        C = ops.reorthogonalize(grp.Q[:j], w, eta=math.inf)[0]  # w -= Q^T (Q w), twice
        tri.alpha[g, j - 1] = float(C[j - 1, 0])
        beta = float(torch.linalg.vector_norm(w))
        tri.steps[g], tri.last_beta[g] = j, beta
        theta, _, res = tri.gauss(g)
        norm = float(theta.abs().max())
        floor = residual_floor(norm, grp.Q.dtype)  # the arithmetic's limit
        top = max(float(res[-1]), floor)
        eps = torch.finfo(grp.Q.dtype).eps
        breakdown = beta <= BREAKDOWN_EPS * eps * norm  # an invariant space
        done = (converged(float(theta[-1]), top, self.tol, norm, grp.Q.dtype)
                or j >= grp.m or breakdown)
        grp.ritz = LockstepRitz(float(theta[-1]), top, float(theta[0]),
                                max(float(res[0]), floor), done, j, floor)
        if done or j >= grp.cap:
            return None
        tri.beta[g, j - 1] = beta
        grp.Q[j] = w[0] / beta
        grp.j = j + 1
        return grp.Q[j]
