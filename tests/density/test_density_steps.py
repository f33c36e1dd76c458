"""A density from too few Lanczos steps is flagged: SLQ with m steps integrates polynomials of
degree 2m - 1 exactly, and |x| (the effective rank's tr|H|) or a step (the negative mass) are
not polynomials. ``spectral_density`` warns below ``MIN_STEPS`` (naming the fix), sets
``SpectralDensity.resolved``, and stays quiet where the rule is exact (``m = n``, or every
probe's Krylov space exhausted)."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from torch import nn

import hessfast as hf
from hessfast.density import draw_probes
from hessfast.density.result import MIN_STEPS, few_steps_message
from hessfast.linop import LinearOperator
from hessfast.testing import spectra

F64 = torch.float64
FIX = re.escape(f"num_steps >= {MIN_STEPS} (hessfast analyze --num-steps {MIN_STEPS})")


def _hessian_like(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A few large outliers, a bulk near 0 and a small negative tail: the shape of a trained
    network's Hessian, where the negative curvature is small next to the top."""
    g = torch.Generator().manual_seed(seed)
    out = 5 + 5 * torch.rand(6, generator=g, dtype=F64)
    bulk = 1e-2 * torch.rand(n - 6 - n // 5, generator=g, dtype=F64)
    neg = -0.05 * torch.rand(n // 5, generator=g, dtype=F64)
    return spectra.with_spectrum(torch.cat([out, bulk, neg]), seed)


def test_one_step_warns_naming_the_fix_and_the_default_does_not() -> None:
    M, _ = _hessian_like()
    A = LinearOperator.from_matrix(M)
    with pytest.warns(UserWarning, match=FIX) as rec:
        d = hf.spectral_density(A, num_probes=4, num_steps=1)
    assert not d.resolved
    msgs = [str(w.message) for w in rec if "Lanczos step" in str(w.message)]
    assert msgs == [few_steps_message(1, A.shape[0])]
    assert "degree <= 1" in msgs[0] and "effective rank" in msgs[0]
    with pytest.warns(UserWarning, match=FIX):
        assert not hf.spectral_density(A, num_probes=2, num_steps=MIN_STEPS - 1).resolved
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hf.spectral_density(A, num_probes=4).resolved  # the default, 64 steps
        assert hf.spectral_density(A, num_probes=2, num_steps=MIN_STEPS).resolved


def test_one_step_cannot_see_the_negative_curvature() -> None:
    """Why it warns: one step's node is each probe's Rayleigh quotient u^T H u (positive
    here), so the quadrature's tr|H| collapses to tr(H) and its negative mass to 0, while
    MIN_STEPS steps give both as the same probes' exact quadratic forms
    n u^T |H| u and u^T P_neg u (from the known eigendecomposition)."""
    M, _ = _hessian_like()
    A = LinearOperator.from_matrix(M)
    n = A.shape[0]
    lam, Q = torch.linalg.eigh(M)
    U = draw_probes(n, 8, seed=3)  # the probes spectral_density draws with seed=3
    exact_abs = n * ((U @ (Q * lam.abs()) @ Q.T) * U).sum(1)
    exact_neg = ((U @ (Q * (lam < -1e-3).to(F64)) @ Q.T) * U).sum(1)

    def read(d: hf.SpectralDensity) -> tuple[float, float]:
        """Largest per-probe relative error of tr|H|, largest error of the negative mass."""
        tr_abs = d.trace(torch.abs, per_probe=True)
        neg = (d.weights * (d.nodes < -1e-3)).sum(1)
        return (float((tr_abs / exact_abs - 1).abs().max()),
                float((neg - exact_neg).abs().max()))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = hf.spectral_density(A, num_probes=8, num_steps=1, seed=3)
    enough = hf.spectral_density(A, num_probes=8, num_steps=MIN_STEPS, seed=3)
    assert bool((one.nodes > 0).all()) and float(one.weights[one.nodes < 0].sum()) == 0.0
    assert one.trace(torch.abs) == pytest.approx(one.trace(lambda x: x), rel=1e-12)
    err_abs, err_neg = read(one)
    assert err_abs > 0.2 and err_neg == pytest.approx(float(exact_neg.max()))
    assert float(exact_neg.min()) > 0.1  # a fifth of the spectrum is negative
    err_abs, err_neg = read(enough)
    assert err_abs < 0.01 and err_neg < 0.05


def test_exact_rules_do_not_warn() -> None:
    """m = n (clipped), and probes whose Krylov space runs out before num_steps (an
    operator with 3 distinct eigenvalues): the Gauss rule is then exact."""
    M, _ = spectra.evenly_spaced(10)
    three = torch.diag(torch.tensor([1.0, 2.0, 3.0] * 40, dtype=F64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = hf.spectral_density(LinearOperator.from_matrix(M), num_probes=3, num_steps=12)
        assert d.num_steps == 10 and d.resolved
        e = hf.spectral_density(LinearOperator.from_matrix(three), num_probes=3, num_steps=8)
        assert bool((e.steps_taken < 8).all()) and e.resolved
    with pytest.warns(UserWarning, match=re.escape("num_steps >= 10 (hessfast analyze")):
        assert not hf.spectral_density(LinearOperator.from_matrix(M), num_steps=5).resolved


def test_resolved_survives_json_and_kpm_is_not_flagged() -> None:
    M, _ = _hessian_like(120)
    A = LinearOperator.from_matrix(M)
    with pytest.warns(UserWarning, match=FIX):
        d = hf.spectral_density(A, num_probes=2, num_steps=3)
    assert not hf.SpectralDensity.from_dict(json.loads(d.to_json())).resolved
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # KPM: its resolution is the Jackson kernel's
        assert hf.spectral_density(A, num_probes=2, num_steps=3, method="kpm").resolved


def test_analyze_with_one_step_warns() -> None:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    X, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    with pytest.warns(UserWarning, match=FIX):
        r = hf.analyze(model, nn.CrossEntropyLoss(), [(X, y)], k=1, num_probes=2,
                       num_steps=1, per_layer=False)
    assert r.settings["num_steps"] == 1
    # the report carries it: the three quantities marked, the fix named, through JSON
    assert set(r.unresolved) == {"density", "effective_rank", "negative_mass"}
    assert all("num_steps >= 24" in why for why in r.unresolved.values())
    summary = r.summary()
    assert summary.count("(!) unresolved") >= 2 and "--num-steps 24" in summary
    assert hf.Report.from_json(r.to_json()).unresolved == r.unresolved
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = hf.analyze(model, nn.CrossEntropyLoss(), [(X, y)], k=1, num_probes=2,
                        num_steps=24, per_layer=False)
    assert ok.unresolved == {} and "unresolved" not in ok.summary()
