"""Spectrum algorithms on model operators against the dense float64 Hessian / GGN of the
foundation test models (built from plain double backward, see tests/models.py)."""

from __future__ import annotations

import pytest
import torch

import hessfast as hf
from hessfast.lanczos import select


@pytest.fixture(scope="module")
def lm_case():
    import models

    model, loss_fn, batches = models.make_lm()
    H = hf.hessian(model, loss_fn, batches)
    ref = models.dense_hessian_reference(model, loss_fn, batches)
    return model, loss_fn, batches, H, ref


def test_lm_extreme_eigenpairs(lm_case) -> None:
    *_, H, ref = lm_case
    lam = torch.linalg.eigvalsh(ref)
    for which in ("LA", "SA", "LM"):
        r = hf.eigsh(H, k=3, which=which, tol=1e-9)
        assert r.status == "CONVERGED"
        expect = lam[select(lam, 3, which)]
        assert torch.allclose(r.eigenvalues, expect, atol=1e-8 * float(lam.abs().max()))


def test_lm_trace_exact_budget_and_estimates(lm_case) -> None:
    *_, H, ref = lm_case
    n = H.shape[0]
    exact = float(torch.trace(ref))
    t = hf.trace(H, n, method="hutch++")  # budget >= n: exact
    assert t.value == pytest.approx(exact, rel=1e-10, abs=1e-12)
    for method in ("hutchinson", "hutch++", "xtrace"):
        t = hf.trace(H, 60, method=method, seed=3)
        assert abs(t.value - exact) <= 4 * t.stderr + 1e-12, (method, t.value, exact, t.stderr)


def test_lm_slq_moments_are_quadratic_forms(lm_case) -> None:
    *_, H, ref = lm_case
    n = H.shape[0]
    d = hf.spectral_density(H, num_probes=4, num_steps=n, seed=5)  # m = n: the rule is exact
    lam = torch.linalg.eigvalsh(ref)
    assert d.nodes.min() >= lam.min() - 1e-8 * lam.abs().max()
    assert d.nodes.max() <= lam.max() + 1e-8 * lam.abs().max()
    from hessfast.density import draw_probes

    Z = draw_probes(n, 4, seed=5, probe="rademacher", dtype=torch.float64, device="cpu")
    quad = torch.einsum("pi,ij,pj->p", Z, ref, Z)
    assert torch.allclose(d.moments(1, per_probe=True), quad, rtol=1e-8, atol=1e-12)


def test_cnn_ggn_condition_number_against_dense() -> None:
    import models

    model, loss_fn, batches = models.make_cnn()
    G = hf.ggn(model, loss_fn, batches)
    ref = models.dense_ggn_reference(model, loss_fn, batches)
    lam = torch.linalg.eigvalsh(ref)
    c = hf.condition_number(G, tol=1e-8)
    assert c.lambda_max == pytest.approx(float(lam.max()), rel=1e-8)
    assert c.lambda_min == pytest.approx(float(lam.min()), abs=1e-7 * float(lam.max()))
    assert c.definiteness in ("positive definite", "singular")  # a GGN is PSD
    if lam.min() > 1e-8 * lam.max():
        assert c.kappa == pytest.approx(float(lam.max() / lam.min()), rel=1e-4)
    assert c.stable_lr == pytest.approx(2 / float(lam.max()), rel=1e-8)
