"""The pairs a block Lanczos run returns (:func:`wanted_pairs`), split from :mod:`.restart`."""

from __future__ import annotations

import warnings

import torch

from ..errors import NonFiniteError
from .basis import select
from .checkpoint import _user_stacklevel
from .run import Run, column_chunks

__all__ = ["wanted_pairs"]


def _converted(V: torch.Tensor, acc: torch.dtype, dtype: torch.dtype,
               device: torch.device | str) -> torch.Tensor:
    """``V [k, n]`` (basis rows or their copy) as new rows in the operator's ``dtype`` and
    ``device``, through the working precision ``acc``, in column chunks (no whole-block
    intermediate copies)."""
    out = torch.empty(V.shape, dtype=dtype, device=device)
    for cols in column_chunks(V):
        out[:, cols] = V[:, cols].to(acc).to(dtype)
    return out


def _orthogonality(V: torch.Tensor) -> float:
    """``max |V V^T - I|`` of ``V [k, n]``, in float64 accumulated over column chunks."""
    if not V.numel():
        return 0.0
    gram = torch.zeros(V.shape[0], V.shape[0], dtype=torch.float64, device=V.device)
    for cols in column_chunks(V):
        Vc = V[:, cols].double()
        gram += Vc @ Vc.T
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return float((gram - eye).abs().max())


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
    # the run's working rows are done with; the basis goes as soon as the vectors leave it
    run.block, run.D = run.block.new_empty(0, run.block.shape[-1]), None
    if answer is not None:
        theta, V, res = answer
        ok = torch.ones(theta.numel(), dtype=torch.bool)
        want = torch.arange(theta.numel())
    else:
        theta, res, ok = run.theta, run.res, run.ok
        want = select(theta, k, which)[: min(k, m)]
        V = run.ritz_vectors(want)
    if V.data_ptr() != run.basis.Q.data_ptr():  # a copy: the basis is no longer needed
        run.release_basis()
    vecs = _converted(V, run.acc, run.A.dtype, run.A.device)
    del V
    run.release_basis()
    ortho = _orthogonality(vecs)
    if status == "INVARIANT_SUBSPACE" and not bool(ok[want].all()):
        status = "MAX_MATVECS"
    if status == "INVARIANT_SUBSPACE" and want.numel() < k:
        warnings.warn(
            f"hessfast: the Krylov space became invariant at dimension {m} < k={k}",
            stacklevel=_user_stacklevel(),  # the user's call, however deep the route
        )
    return theta[want].clone(), vecs, res[want].clone(), ok[want].clone(), status, ortho
