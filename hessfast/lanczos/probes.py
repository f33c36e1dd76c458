"""Lanczos from many independent start vectors at once: the probes of stochastic Lanczos
quadrature (and KPM's spectral bounds).

Each probe ``z_p`` (a unit row of ``Z: [P, n]``) runs its own recurrence with its own basis;
what they share is the product: every step multiplies the ``[a, n]`` block of the ``a``
still-active probes in ONE call, so a model operator makes one data pass per step whatever
the number of probes.

Step j, for the active rows ``q_j``: ``w = A q_j``; ``alpha_j = q_j^T w``;
``w -= alpha_j q_j + beta_{j-1} q_{j-1}``; with ``reorth="full"`` ``w`` is then
orthogonalised against its own probe's basis ``Q_p[:j+1]`` (classical Gram-Schmidt with the
DGKS second pass, see below); ``beta_j = ||w||``. A probe with
``beta_j <= max(16, sqrt(n)) eps ||A||_est`` has found an invariant subspace: its recurrence
ends (its Gauss rule is exact) and the block shrinks.

Full reorthogonalisation runs probe by probe: ``ops.reorthogonalize`` of the probe's new
vector against its own basis ``Q[p, :j+1]`` (CGS with the DGKS second pass), P calls per
step. That reads every basis row once per pass, the least any method can. The alternative
through ``ops``, one ``basis_dot`` + ``basis_update`` pair per step on all probes' rows with
the cross-probe coefficients zeroed (2 calls instead of 2P, but P times the arithmetic), was
slower: 8 probes x 32 steps at n = 1e5 on the 2-core dev VM (shared with other jobs, best of
5; 2 threads with OMP_WAIT_POLICY=passive) took 1.86 s against 3.39 s in float64 and
0.97 s against 1.40 s in float32 (one thread: 1.68 vs 2.96 s, 0.88 vs 1.46 s).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import ops

__all__ = ["BREAKDOWN_EPS", "REORTHS", "ProbeTridiagonals", "probe_lanczos"]

REORTHS = ("full", "none")
#: Breakdown threshold relative to the running estimate of ||A|| (max ||A q|| seen), in units
#: of the working precision's eps: ``beta <= max(BREAKDOWN_EPS, sqrt(n)) eps ||A||_est`` ends a
#: probe's recurrence (nodes then move by at most that much: far below any plot resolution).
BREAKDOWN_EPS = 16.0


@dataclass(frozen=True)
class ProbeTridiagonals:
    """The Lanczos tridiagonals of P probes (float64, CPU).

    Attributes:
        alpha: ``[P, m]`` diagonals; probe p uses ``alpha[p, :steps[p]]``.
        beta: ``[P, m]`` off-diagonals: ``beta[p, j]`` couples steps j and j + 1.
        steps: ``[P]`` int64 steps each probe took (``< m`` after a breakdown).
        last_beta: ``[P]`` residual norm after the last step (0 after a breakdown).
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    steps: torch.Tensor
    last_beta: torch.Tensor

    def gauss(self, p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Probe p's Gauss rule: Ritz values ``theta [k]`` (ascending), weights ``[k]``
        (``S[0, j]^2``, summing to 1) and Ritz residuals ``|beta_last S[k-1, j]|`` ``[k]``."""
        k = int(self.steps[p])
        T = torch.diag(self.alpha[p, :k])
        if k > 1:
            off = self.beta[p, : k - 1]
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        w = S[0] ** 2
        w = w / w.sum()
        resid = (self.last_beta[p] * S[-1]).abs()
        return theta, w, resid


def probe_lanczos(
    products: Callable[[torch.Tensor], torch.Tensor],
    Z: torch.Tensor | list[torch.Tensor],
    num_steps: int,
    *,
    reorth: str = "full",
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | None = None,
    pin_memory: bool = False,
    save: Callable[[dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
    dots: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> ProbeTridiagonals:
    """``num_steps`` Lanczos steps from each row of ``Z`` (see the module docstring).

    Args:
        products: ``V [a, n] -> A V [a, n]``, one data pass, returning a fresh tensor in
            ``Z``'s dtype (e.g. :class:`hessfast._checks.Products`).
        Z: ``[P, n]`` unit rows in the working dtype (float32 or float64), or a list holding
            that one tensor, which is taken out of it: the caller then keeps no reference,
            and without a basis the probes' memory is freed once the recurrence has moved
            past them (one parameter-sized row fewer per probe for the rest of the run).
        num_steps: m >= 1 steps per probe (at most n).
        reorth: ``"full"`` (each probe against its whole basis; memory ``P m n`` in
            ``basis_dtype``) or ``"none"`` (the plain three-term recurrence).
        basis_dtype: storage of the bases (default: ``Z.dtype``).
        basis_device: where the bases live (default: ``Z``'s device).
        pin_memory: allocate the bases in pinned host memory (host bases of a CUDA
            operator, for faster copies to the device).
        save: called with the state at the top of each step (a checkpoint decides whether
            to write it).
        resume: such a state (a dict ``save`` was given) to continue from; the other
            arguments must be the same as in the run that saved it.
        dots: ``(X [a, n], Y [a, n]) -> [a]`` float64 CPU row dot products, e.g.
            ``functools.partial(row_dots, A)`` for vectors sharded over ranks (every rank gets
            the same numbers, so the same breakdown decisions); default: local dot products.
            Only with ``reorth="none"`` (a stored basis is reorthogonalised locally).

    Returns:
        :class:`ProbeTridiagonals` with ``[P, num_steps]`` coefficients.
    """
    if isinstance(Z, list):
        Z = Z.pop()
    P, n = Z.shape
    m = num_steps
    work, dev = Z.dtype, Z.device
    alpha = torch.zeros((P, m), dtype=torch.float64)
    beta = torch.zeros((P, m), dtype=torch.float64)
    steps = torch.zeros(P, dtype=torch.int64)
    last_beta = torch.zeros(P, dtype=torch.float64)
    Q = None
    bdev = basis_device or dev
    if reorth == "full":
        Q = torch.empty((P, m, n), dtype=basis_dtype or work, device=bdev, pin_memory=pin_memory)
        Q[:, 0] = Z
    active = torch.arange(P)
    q = Z  # q is replaced, never written in place
    del Z
    q_prev: torch.Tensor | None = None
    b_prev: torch.Tensor | None = None
    anorm = 0.0
    j0 = 0
    if resume is not None:
        j0, anorm, active = resume["j"], resume["anorm"], resume["active"]
        for t, name in ((alpha, "alpha"), (beta, "beta"), (steps, "steps"), (last_beta, "last")):
            t.copy_(resume[name])
        q, q_prev, b_prev = (None if resume[x] is None else resume[x].to(dev)
                             for x in ("q", "q_prev", "b_prev"))
        if Q is not None:
            Q[:, : j0 + 1] = resume["Q"].to(device=bdev, dtype=Q.dtype)
    # roundoff of a product is ~ sqrt(n) eps ||A||: a residual below it is an invariant subspace
    tol = max(BREAKDOWN_EPS, math.sqrt(n)) * torch.finfo(work).eps
    for j in range(j0, m):
        if save is not None:
            # kept until the next step (an interrupt writes it): the coefficients change in
            # place ([P, m] float64: copied); q, q_prev, b_prev are replaced, and Q[:, :j + 1]
            # is not written again
            save(dict(j=j, anorm=anorm, active=active, alpha=alpha.clone(), beta=beta.clone(),
                      steps=steps.clone(), last=last_beta.clone(), q=q, q_prev=q_prev,
                      b_prev=b_prev,
                      Q=None if Q is None else Q[:, : j + 1]))
        W = products(q)
        if dots is None:
            anorm = max(anorm, float(torch.linalg.vector_norm(W, dim=1).max()))
            a = torch.linalg.vecdot(q, W)
        else:
            anorm = max(anorm, math.sqrt(float(dots(W, W).max())))
            a = dots(q, W).to(device=dev, dtype=work)
        W.addcmul_(q, a[:, None], value=-1.0)
        if q_prev is not None and b_prev is not None:
            W.addcmul_(q_prev, b_prev[:, None], value=-1.0)
        if Q is not None:
            for i, p in enumerate(active.tolist()):
                if Q.device == W.device:
                    ops.reorthogonalize(Q[p, : j + 1], W[i : i + 1])
                else:  # a host basis: the row travels (pinned: asynchronously fast)
                    w = W[i : i + 1].to(Q.device)
                    ops.reorthogonalize(Q[p, : j + 1], w)
                    W[i : i + 1] = w.to(W.device)
        if dots is None:
            b = torch.linalg.vector_norm(W, dim=1)
        else:
            b = dots(W, W).clamp(min=0.0).sqrt().to(device=dev, dtype=work)
        a_c, b_c = a.double().cpu(), b.double().cpu()
        alpha[active, j] = a_c
        steps[active] = j + 1
        if j == m - 1:
            last_beta[active] = b_c
            break
        keep = ~(b_c <= tol * anorm)  # `<=`: the zero operator breaks down at once
        if not bool(keep.any()):
            break
        beta[active[keep], j] = b_c[keep]
        if bool(keep.all()):  # no probe broke down: no masked copies of parameter-sized rows
            q_new = W.div_(b[:, None])
            q_prev, b_prev = q, b
        else:
            keep_dev = keep.to(dev)
            q_new = W[keep_dev] / b[keep_dev][:, None]
            q_prev, b_prev = q[keep_dev], b[keep_dev]
        del W
        q = q_new
        active = active[keep]
        if Q is not None:
            Q[active.to(bdev), j + 1] = q_new.to(device=bdev, dtype=Q.dtype)
    return ProbeTridiagonals(alpha, beta, steps, last_beta)

