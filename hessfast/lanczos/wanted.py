"""The pairs a block Lanczos run returns (:func:`wanted_pairs`), split from :mod:`.restart`."""

from __future__ import annotations

import warnings

import torch

from ..errors import NonFiniteError
from .basis import select
from .checkpoint import _user_stacklevel
from .run import Run

__all__ = ["wanted_pairs"]


def wanted_pairs(run: Run, k: int, which: str, status: str,
            answer: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str, float]:
    """The returned pairs ``(theta [k], vectors [k, n], residuals [k], converged [k], status,
    orthogonality)``: the verified candidates ``answer`` (values, basis-dtype vectors,
    residuals, as they were when verification started: a verification changes nothing, it
    only certifies), or else the wanted pairs of the last Rayleigh-Ritz (which matches the
    basis in place)."""
    m = run.basis.m
    if m == 0 or run.theta.numel() == 0:
        raise NonFiniteError(
            "the first operator product is not finite (NaN/Inf): check the operator"
        )
    if answer is not None:
        theta, V, res = answer
        ok = torch.ones(theta.numel(), dtype=torch.bool)
        want = torch.arange(theta.numel())
    else:
        theta, res, ok = run.theta, run.res, run.ok
        want = select(theta, k, which)[: min(k, m)]
        V = run.ritz_vectors(want)
    vecs = V.to(run.acc).to(run.A.dtype).to(run.A.device)
    gram = vecs.double() @ vecs.double().T
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    ortho = float((gram - eye).abs().max()) if gram.numel() else 0.0
    if status == "INVARIANT_SUBSPACE" and not bool(ok[want].all()):
        status = "MAX_MATVECS"
    if status == "INVARIANT_SUBSPACE" and want.numel() < k:
        warnings.warn(
            f"hessfast: the Krylov space became invariant at dimension {m} < k={k}",
            stacklevel=_user_stacklevel(),  # the user's call, however deep the route
        )
    return theta[want].clone(), vecs, res[want].clone(), ok[want].clone(), status, ortho
