"""Lean SLQ (``spectral_density(krylov="lean")``: the plain three-term recurrence, probes one
at a time) against the exact spectrum and against full-reorthogonalisation SLQ from the same
probes, in the Wasserstein-1 distance of the quadrature measures (relative to the spectral
width), on prescribed spectra (hessfast.testing.spectra) and a small MLP's dense float64
Hessian (hessfast.testing.dense, plain double backward). The figures are in
hessfast/density/slq.py's docstring."""

from __future__ import annotations

import warnings

import pytest
import torch

import hessfast as hf
from hessfast import memory
from hessfast.testing import dense, models, spectra


def w1(x1: torch.Tensor, p1: torch.Tensor, x2: torch.Tensor, p2: torch.Tensor) -> float:
    """Wasserstein-1 distance of two discrete measures on the line: int |F1 - F2| dx."""
    x = torch.cat([x1, x2])
    p = torch.cat([p1, -p2])
    order = torch.argsort(x)
    x, p = x[order], p[order]
    F = torch.cumsum(p, 0)[:-1]
    return float((F.abs() * (x[1:] - x[:-1])).sum())


def measure(d: hf.SpectralDensity) -> tuple[torch.Tensor, torch.Tensor]:
    P = d.nodes.shape[0]
    return d.nodes.reshape(-1), (d.weights / P).reshape(-1)


def distances(M: torch.Tensor, P: int = 8, m: int = 50) -> tuple[float, float, float]:
    """(lean-exact, full-exact, lean-full) W1 / spectral width, the same Gaussian probes."""
    lam = torch.linalg.eigvalsh(M.double())
    A = hf.LinearOperator.from_matrix(M)
    Z = torch.randn(P, M.shape[0], dtype=M.dtype, generator=torch.Generator().manual_seed(1))
    full = hf.spectral_density(A, v0=Z, num_steps=m, krylov="full")
    lean = hf.spectral_density(A, v0=Z, num_steps=m, krylov="lean")
    assert full.krylov == "full" and lean.krylov == "lean"
    # probes one at a time: a pass per probe step (fewer after a breakdown)
    assert lean.num_passes == int(lean.steps_taken.sum()) and full.num_passes <= m
    assert lean.num_passes > full.num_passes or P == 1
    n = M.shape[0]
    exact = (lam, torch.full((n,), 1.0 / n, dtype=torch.float64))
    width = float(lam.max() - lam.min())
    a, b = measure(full), measure(lean)
    return w1(*b, *exact) / width, w1(*a, *exact) / width, w1(*a, *b) / width


SPECTRA = {
    "even": lambda: spectra.evenly_spaced(300)[0],
    "clustered": lambda: spectra.clustered(300)[0],
    "wide": lambda: spectra.geometric(300)[0],
    "negative": lambda: spectra.negative_dominant(300)[0],
    "repeated": lambda: spectra.two_values(300)[0],
}


@pytest.mark.parametrize("case", sorted(SPECTRA))
@pytest.mark.parametrize("m", [50, 150])  # 150 steps: ghosts appear without reorth
def test_lean_slq_w1_on_prescribed_spectra(case, m):
    lean_exact, full_exact, lean_full = distances(SPECTRA[case](), m=m)
    # the probe error dominates both; ghosts move nodes, hardly the measure
    assert lean_full <= 2e-3, (case, m, lean_full)
    assert lean_exact <= full_exact + 2e-3, (case, m, lean_exact, full_exact)


@pytest.fixture(scope="module")
def mlp_hessian() -> torch.Tensor:
    model, loss_fn, batches = models.make_mlp(d_in=8, hidden=14, sizes=(32, 32), seed=0)
    return dense.dense_hessian_reference(model, loss_fn, batches)


def test_lean_slq_w1_on_a_model_hessian(mlp_hessian):
    for m in (50, 120):
        lean_exact, full_exact, lean_full = distances(mlp_hessian, P=8, m=m)
        assert lean_full <= 5e-3, (m, lean_full)
        assert lean_exact <= full_exact + 3e-3, (m, lean_exact, full_exact)


def test_auto_goes_lean_when_the_bases_do_not_fit(monkeypatch):
    M, _ = spectra.evenly_spaced(400)
    A = hf.LinearOperator.from_matrix(M)
    kw = dict(num_probes=6, num_steps=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fits = hf.spectral_density(A, **kw)
    assert fits.krylov == "full"
    assert torch.equal(fits.nodes, hf.spectral_density(A, krylov="full", **kw).nodes)
    full = hf.estimate_memory(A, "slq", krylov="full", available=1, **kw).total()
    lean = hf.estimate_memory(A, "slq", krylov="lean", available=1, **kw).total()
    assert lean < full
    resident = M.numel() * M.element_size()
    monkeypatch.setattr(memory, "available_memory", lambda d: (full + lean) // 2 - resident)
    with pytest.warns(UserWarning, match="hessfast: spectral_density: .*krylov='lean'"):
        out = hf.spectral_density(A, **kw)
    assert out.krylov == "lean" and out.nodes.shape == (6, 40)
    assert out.num_passes == 6 * 40
    # the same probes, lean on request: the same numbers
    assert torch.equal(out.nodes, hf.spectral_density(A, krylov="lean", **kw).nodes)
    d = out.to_dict()
    assert d["krylov"] == "lean" and hf.SpectralDensity.from_dict(d).krylov == "lean"


def test_lean_slq_float32_and_kpm_records():
    M, lam = spectra.evenly_spaced(300)
    A = hf.LinearOperator.from_matrix(M.float())
    d = hf.spectral_density(A, num_probes=4, num_steps=30, krylov="lean")
    assert d.krylov == "lean" and torch.isfinite(d.nodes).all()
    assert abs(d.weights.sum(1) - 1).max() < 1e-6
    assert d.bounds[0] <= float(lam.min()) + 1e-3 and d.bounds[1] >= float(lam.max()) - 1e-3
    assert hf.spectral_density(A, num_probes=2, num_steps=10, method="kpm").krylov == "lean"


def test_lean_slq_with_a_checkpoint_equals_without(tmp_path):
    M, _ = spectra.evenly_spaced(200)
    A = hf.LinearOperator.from_matrix(M)
    a = hf.spectral_density(A, 4, 20, krylov="lean", checkpoint=tmp_path / "c.pt",
                            checkpoint_every=1)
    b = hf.spectral_density(A, 4, 20, krylov="lean")
    assert a.krylov == "lean" and torch.equal(a.nodes, b.nodes)
    assert torch.equal(a.weights, b.weights)
