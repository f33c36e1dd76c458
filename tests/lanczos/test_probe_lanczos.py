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


@pytest.mark.parametrize("reorth", ["full", "none"])
def test_one_probe_breaking_down_leaves_the_others_exact(reorth: str) -> None:
    """A probe that is an eigenvector stops after one step while the block goes on (the
    masked branch): every other probe's coefficients are those of its own run."""
    M, _ = spectra.wishart(40, seed=5, shift=0.5)
    Z = draw_probes(40, 3, seed=6, probe="gaussian")
    Z[1] = torch.linalg.eigh(M).eigenvectors[:, 7]
    tri, _ = _run(M, Z, 8, reorth=reorth)
    assert tri.steps.tolist() == [8, 1, 8]
    for p in (0, 2):
        one, _ = _run(M, Z[p : p + 1], 8, reorth=reorth)
        torch.testing.assert_close(tri.alpha[p], one.alpha[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(tri.beta[p], one.beta[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("reorth", ["full", "none"])
def test_probes_handed_over_in_a_list_are_freed(reorth: str) -> None:
    """``Z`` in a list is taken out of it: the result is that of the tensor, and without a
    basis nothing references the probes once the recurrence is two steps past them."""
    import weakref

    M, _ = spectra.wishart(50, seed=7, shift=0.5)
    Z = draw_probes(50, 2, seed=8, probe="gaussian")
    ref, _ = _run(M, Z.clone(), 6, reorth=reorth)
    alive: list[bool] = []
    held = [Z]
    gone = weakref.ref(Z)
    del Z
    A = hf.LinearOperator.from_matrix(M)
    products = Products(A, F64, "test")

    def watched(V: torch.Tensor) -> torch.Tensor:
        alive.append(gone() is not None)
        return products(V)

    tri = probe_lanczos(watched, held, 6, reorth=reorth)
    assert held == []
    torch.testing.assert_close(tri.alpha, ref.alpha, rtol=0, atol=0)
    torch.testing.assert_close(tri.beta, ref.beta, rtol=0, atol=0)
    # steps 0 and 1 multiply/keep Z (as q, then q_prev); from step 2 on it is gone unless the
    # full basis holds a copy (its first row is a copy: Z itself is still dropped)
    assert alive[:2] == [True, True] and not any(alive[2:])


@pytest.mark.parametrize("basis_dtype", [torch.float32, torch.bfloat16])
def test_low_precision_basis(basis_dtype: torch.dtype) -> None:
    M, _ = spectra.wishart(50, seed=4)
    Z = draw_probes(50, 2, seed=3)
    ref, _ = _run(M, Z, 10, reorth="full")
    low, _ = _run(M, Z, 10, reorth="full", basis_dtype=basis_dtype)
    tol = math.sqrt(torch.finfo(basis_dtype).eps) * float(M.abs().max()) * 10
    torch.testing.assert_close(low.alpha, ref.alpha, rtol=0, atol=tol)
