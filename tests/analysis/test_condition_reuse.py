"""condition_number reuses what the caller knows (lambda_max=, lambda_min=, density=) and
says "singular" early on a GGN whose smallest eigenvalue is exactly zero; checked against
float64 dense references (torch.linalg.eigvalsh)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import hessfast as hf
from hessfast.condition import SINGULAR_STAGE
from hessfast.errors import ConfigurationError
from hessfast.testing import spectra
from hessfast.testing.dense import dense_ggn_reference


def _singular_mlp(dtype: torch.dtype = torch.float32):
    """Linear(10, 16)-Tanh-Linear(16, 3), CE on 60 samples: n = 227 parameters, rank of the
    GGN <= 60 * (3 - 1) = 120, so about half the spectrum is exactly zero."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    X = torch.randn(60, 10, generator=g, dtype=dtype)
    Y = torch.randint(0, 3, (60,), generator=g)
    return model, nn.CrossEntropyLoss(), (X, Y)


def test_reuse_spends_fewer_products_same_answer() -> None:
    M, lam = spectra.wishart(150, shift=0.5)  # indefinite
    lam = torch.linalg.eigvalsh(M.double())
    A = hf.LinearOperator.from_matrix(M)
    full = hf.condition_number(A, tol=1e-6, density=True)
    top = hf.eigsh(A, k=2, which="LA", tol=1e-6)
    dens = hf.spectral_density(A, num_probes=8, num_steps=64)
    reused = hf.condition_number(A, tol=1e-6, lambda_max=top, density=dens)
    assert reused.num_matvecs < full.num_matvecs - dens.num_matvecs
    for r in (full, reused):
        assert r.definiteness == "indefinite" and math.isinf(r.kappa) and r.converged
        assert r.lambda_max == pytest.approx(float(lam.max()), rel=1e-8)
        assert r.lambda_min == pytest.approx(float(lam.min()), rel=1e-6)
    assert reused.negative_mass == full.negative_mass  # the same density (same seed)
    assert abs(reused.negative_mass - float((lam < 0).double().mean())) < 0.1
    both = hf.condition_number(A, lambda_max=top, lambda_min=float(lam.min()))
    assert both.num_matvecs == 0 and both.negative_mass is None  # density off by default
    assert both.negative_ratio == pytest.approx(float(-lam.min() / lam.max()), rel=1e-6)


def test_positive_definite_unchanged() -> None:
    M, lam = spectra.wishart(120)
    lam = torch.linalg.eigvalsh(M.double())
    A = hf.LinearOperator.from_matrix(M)
    r = hf.condition_number(A, tol=1e-8)
    assert r.definiteness == "positive definite" and r.converged and not r.singular_early
    assert r.kappa == pytest.approx(float(lam.max() / lam.min()), rel=1e-6)
    be = hf.eigsh(A, k=2, which="BE", tol=1e-8)  # one run holds both ends
    s = hf.condition_number(A, tol=1e-8, lambda_max=be, lambda_min=be)
    assert s.num_matvecs == 0 and s.kappa == pytest.approx(r.kappa, rel=1e-6)


def test_singular_ggn_reported_early() -> None:
    model, loss_fn, batch = _singular_mlp()
    G = hf.ggn(model, loss_fn, batch)
    ref = dense_ggn_reference(copy.deepcopy(model).double(), loss_fn,
                              [(batch[0].double(), batch[1])])
    lam = torch.linalg.eigvalsh(ref)
    assert float(lam.min()) < 1e-12 * float(lam.max())  # singular indeed
    budget = 150
    with pytest.warns(UserWarning, match="0 of 1 pairs converged"):  # the plain SA run stalls
        plain = hf.eigsh(G, k=1, which="SA", max_matvecs=budget)
    assert plain.status == "MAX_MATVECS" and plain.num_matvecs == budget
    top = hf.eigsh(G, k=1, which="LA").num_matvecs  # what the LA part costs
    for psd, stages in ((None, 1), (False, 2)):  # a GGN is PSD; False: the residual test
        mv0 = G.num_matvecs
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c = hf.condition_number(G, max_matvecs=budget, psd=psd)
        assert [str(w.message) for w in caught if "singular" in str(w.message)] != []
        assert len(caught) == 1  # one warning, not eigsh's MAX_MATVECS one
        assert c.definiteness == "singular" and c.singular_early and c.converged
        assert math.isinf(c.kappa) and abs(c.lambda_min) <= c.zero_threshold
        assert c.lambda_max == pytest.approx(float(lam.max()), rel=1e-4)
        assert G.num_matvecs - mv0 == c.num_matvecs
        sa_cost = c.num_matvecs - top
        print(f"psd={psd}: {c.num_matvecs} products ({sa_cost} for the smallest end)")
        assert 0 < sa_cost <= SINGULAR_STAGE * (2**stages - 1) < budget


def test_bad_reuse_arguments_named() -> None:
    A = hf.LinearOperator.from_matrix(spectra.wishart(60)[0])
    sa = hf.eigsh(A, k=1, which="SA")
    other = hf.spectral_density(hf.LinearOperator.from_matrix(spectra.wishart(50)[0]), 2, 5)
    mv0 = A.num_matvecs
    with pytest.raises(ConfigurationError, match="lambda_max from an eigsh result needs"):
        hf.condition_number(A, lambda_max=sa)
    with pytest.raises(ConfigurationError, match="lambda_min must be a finite float"):
        hf.condition_number(A, lambda_min=float("nan"))
    with pytest.raises(ConfigurationError, match="size 50, A has n=60"):
        hf.condition_number(A, density=other)
    with pytest.raises(ConfigurationError, match="density must be True or False"):
        hf.condition_number(A, density="yes")
    with pytest.raises(TypeError, match="psd must be"):
        hf.condition_number(A, psd=1)
    assert A.num_matvecs == mv0
