"""Residuals never claim more than the arithmetic shows (issue 16, item 4).

Every reported residual is ``max(computed, residual_floor)`` with ``residual_floor = 64 eps
||A||_est`` (:func:`hessfast.lanczos.verify.residual_floor`), and every convergence decision
uses the same floor. The reference is the residual of the returned pair recomputed in more
precision than the run had: float64 for a float32 operator, numpy's long double (64-bit
mantissa on x86) for a float64 one, so the recomputation's own rounding is far below the
floor and "reported >= recomputed / 2" is a real check.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import hessfast as hf
from hessfast.analysis.blocks import block_spectra
from hessfast.condition import zero_threshold
from hessfast.lanczos.verify import RESIDUAL_FLOOR_C, residual_floor
from hessfast.testing import spectra

FAMILIES = {
    "clustered": lambda n: spectra.clustered(n),  # Krylov space invariant at once: relation 0
    "low_rank": lambda n: spectra.low_rank_psd(n, 3),
    "evenly": lambda n: spectra.evenly_spaced(n, signs=True),
    "decaying": lambda n: spectra.decaying(n),
    "wishart": lambda n: spectra.wishart(n, shift=0.5),
}
TIGHT = {torch.float64: 1e-12, torch.float32: 1e-6}


def _exact_residuals(M: torch.Tensor, dtype: torch.dtype, theta: torch.Tensor,
                     V: torch.Tensor) -> torch.Tensor:
    """``||A v - theta v||`` of the returned pairs for the operator as stored (``M`` cast to
    ``dtype``), in more precision than ``dtype``."""
    Md = M.to(dtype)
    if dtype == torch.float32:
        Vd = V.double()
        return (Vd @ Md.double() - theta[:, None] * Vd).norm(dim=1)
    ld = np.longdouble
    Ml, Vl = Md.numpy().astype(ld), V.double().numpy().astype(ld)
    R = Vl @ Ml - theta.numpy().astype(ld)[:, None] * Vl
    return torch.from_numpy(np.sqrt((R * R).sum(axis=1)).astype(np.float64))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_eigsh_residuals_bound_the_recomputed_ones(family: str, dtype: torch.dtype) -> None:
    n = 120
    M, lam = FAMILIES[family](n)
    A = hf.LinearOperator.from_matrix(M.to(dtype))
    eps = torch.finfo(dtype).eps
    for which in ("LA", "SA"):
        r = _quiet(hf.eigsh, A, k=3, which=which, tol=TIGHT[dtype], dense_below=0, seed=1,
                   max_matvecs=400)
        floor = r.residual_floor
        assert floor == pytest.approx(RESIDUAL_FLOOR_C * eps * r.norm_estimate, rel=1e-12)
        assert 0 < r.norm_estimate <= float(lam.abs().max()) * (1 + 1e-5)
        exact = _exact_residuals(M, dtype, r.eigenvalues, r.eigenvectors)
        assert torch.all(r.residuals >= floor), (r.residuals, floor)
        # never below the truth by more than a factor 2 (the recomputation's rounding is
        # orders of magnitude below the floor)
        assert torch.all(r.residuals >= 0.5 * exact), (family, which, r.residuals, exact)


def test_issue_reproducer_relation_residual_below_rounding() -> None:
    """A float64 operator with ||A|| = 1 whose Krylov space is invariant after two steps: the
    Lanczos relation says ~0; the recomputed residual is ~1e-15."""
    M, lam = spectra.clustered(200)
    A = hf.LinearOperator.from_matrix(M)
    r = _quiet(hf.eigsh, A, k=2, which="LA", dense_below=0)
    exact = _exact_residuals(M, torch.float64, r.eigenvalues, r.eigenvectors)
    assert float(exact.max()) > 1e-17  # what the arithmetic shows
    assert torch.all(r.residuals >= exact / 2)
    assert float(r.residuals.min()) >= residual_floor(1.0, torch.float64) * (1 - 1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tolerance_below_the_floor_converges_at_the_floor(dtype: torch.dtype) -> None:
    """tol = 1e-30 asks for less than the arithmetic can show: the convergence test uses the
    floor, so the run converges (at the floor) instead of spending its whole budget."""
    M, lam = spectra.decaying(150)
    A = hf.LinearOperator.from_matrix(M.to(dtype))
    r = hf.eigsh(A, k=2, which="LA", tol=1e-30, dense_below=0, max_matvecs=300)
    assert r.status == "CONVERGED" and bool(r.converged.all())
    assert torch.allclose(r.residuals, torch.full_like(r.residuals, r.residual_floor))
    exact = _exact_residuals(M, dtype, r.eigenvalues, r.eigenvectors)
    assert torch.all(r.residuals >= exact / 2)


def test_dense_path_and_power_iteration_report_the_floor() -> None:
    M, lam = spectra.clustered(20)
    A = hf.LinearOperator.from_matrix(M.float())
    r = _quiet(hf.eigsh, A, k=2)  # n <= dense_below: float64 eigh, vectors cast to float32
    assert r.method == "dense" and r.residual_floor > 0
    exact = _exact_residuals(M, torch.float32, r.eigenvalues, r.eigenvectors)
    assert torch.all(r.residuals >= r.residual_floor) and torch.all(r.residuals >= exact / 2)
    for dtype in (torch.float64, torch.float32):
        M, lam = spectra.clustered(150)
        p = hf.power_iteration(hf.LinearOperator.from_matrix(M.to(dtype)), tol=1e-30,
                               max_matvecs=50)
        exact = _exact_residuals(M, dtype, torch.tensor([p.eigenvalue]),
                                 p.eigenvector[None])
        assert p.converged and p.residual == p.residual_floor > 0
        assert p.residual_floor == pytest.approx(
            RESIDUAL_FLOOR_C * torch.finfo(dtype).eps * p.norm_estimate, rel=1e-12)
        assert p.residual >= float(exact[0]) / 2
        e = hf.eigsh(hf.LinearOperator.from_matrix(M.to(dtype)), k=1, method="power",
                     tol=1e-30, max_matvecs=50, dense_below=0)
        assert e.residual_floor == p.residual_floor and float(e.residuals[0]) == p.residual


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_spectra_residuals_are_floored(dtype: torch.dtype) -> None:
    M, lam = spectra.clustered(90)
    A = hf.LinearOperator.from_matrix(M.to(dtype))
    idx = [list(range(0, 60)), list(range(60, 90)), [0, 1, 2]]  # two Lanczos, one exact
    bs = block_spectra(A, idx, tol=1e-12, num_probes=4)
    for g, cols in zip(bs.groups, idx, strict=True):
        B = M[cols][:, cols]
        evals, evecs = torch.linalg.eigh(B)
        assert g.residual_floor > 0
        assert g.lambda_max_residual >= g.residual_floor
        assert g.lambda_min_residual >= g.residual_floor
        # the block's exact eigenvalue nearest to lambda_max lies within its residual
        near = float((evals - g.lambda_max).abs().min())
        assert near <= g.lambda_max_residual * (1 + 1e-9)


def test_zero_threshold_is_never_below_the_floor() -> None:
    assert zero_threshold(1e-30, 2.0, torch.float32) == residual_floor(2.0, torch.float32)
    assert zero_threshold(1e-3, 2.0, torch.float64) == 2e-3
    M, _ = spectra.low_rank_psd(80, 3)  # singular: zero eigenvalues
    c = _quiet(hf.condition_number, hf.LinearOperator.from_matrix(M.float()), tol=1e-30)
    assert c.zero_threshold >= residual_floor(c.lambda_max, torch.float32)
    assert c.definiteness == "singular"
