"""hessfast.lanczos.probes: many independent Lanczos recurrences sharing one product per step."""

from __future__ import annotations

import math

import pytest
import torch

import hessfast as hf
from hessfast._checks import Products
from hessfast.density import draw_probes
from hessfast.lanczos.probes import probe_lanczos
from hessfast.testing import spectra

F64 = torch.float64


def _run(M: torch.Tensor, Z: torch.Tensor, m: int, **kw):
    A = hf.LinearOperator.from_matrix(M)
    products = Products(A, Z.dtype, "test")
    return probe_lanczos(products, Z, m, **kw), products


@pytest.mark.parametrize("reorth", ["full", "none"])
def test_block_equals_each_probe_alone(reorth: str) -> None:
    M, _ = spectra.wishart(80, seed=3, shift=0.5)
    Z = draw_probes(80, 4, seed=2, probe="gaussian")
    tri, products = _run(M, Z, 12, reorth=reorth)
    assert products.num_passes == 12 and products.num_matvecs == 4 * 12
    for p in range(4):
        one, _ = _run(M, Z[p : p + 1], 12, reorth=reorth)
        torch.testing.assert_close(tri.alpha[p], one.alpha[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(tri.beta[p], one.beta[0], rtol=0, atol=1e-12)


def test_tridiagonal_is_the_projection_and_exact_at_n() -> None:
    """Full reorthogonalisation: T = Q^T A Q for the Krylov basis, and at m = n the Ritz
    values are the eigenvalues."""
    n = 30
    M, lam = spectra.wishart(n, seed=1)
    Z = draw_probes(n, 2, seed=0)
    tri, _ = _run(M, Z, n, reorth="full")
    for p in range(2):
        theta, w, resid = tri.gauss(p)
        k = theta.numel()
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-12) and bool((w >= 0).all())
        if k == n:
            torch.testing.assert_close(theta, torch.sort(lam).values, rtol=0,
                                       atol=1e-10 * float(lam.abs().max()))
        # Gauss rule reproduces u^T A^j u for j <= 2k - 1
        for j in (1, 2, 5):
            quad = float((w * theta**j).sum())
            exact = float(Z[p] @ torch.linalg.matrix_power(M, j) @ Z[p])
            assert quad == pytest.approx(exact, rel=1e-9, abs=1e-12)


def test_breakdown_shrinks_the_block() -> None:
    n, rank = 60, 2
    M, _ = spectra.low_rank_psd(n, rank)
    Z = draw_probes(n, 3, seed=1)
    tri, products = _run(M, Z, 10, reorth="full")
    assert int(tri.steps.max()) < 10
    assert products.num_matvecs == int(tri.steps.sum())
    assert bool((tri.last_beta == 0).all())


@pytest.mark.parametrize("basis_dtype", [torch.float32, torch.bfloat16])
def test_low_precision_basis(basis_dtype: torch.dtype) -> None:
    M, _ = spectra.wishart(50, seed=4)
    Z = draw_probes(50, 2, seed=3)
    ref, _ = _run(M, Z, 10, reorth="full")
    low, _ = _run(M, Z, 10, reorth="full", basis_dtype=basis_dtype)
    tol = math.sqrt(torch.finfo(basis_dtype).eps) * float(M.abs().max()) * 10
    torch.testing.assert_close(low.alpha, ref.alpha, rtol=0, atol=tol)
