"""Spectral density (SLQ and KPM): structural invariants, Gauss-rule exactness against
Hutchinson on the same probes, accuracy against the smoothed true spectrum, block feeding,
breakdown, determinism and errors (docs/architecture.md, "How results are proven right")."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from hessfast.density import SpectralDensity, draw_probes, spectral_density
from hessfast.errors import ConfigurationError, NonFiniteError
from hessfast.linop import LinearOperator
from hessfast.testing import spectra

F64 = torch.float64


def op(M: torch.Tensor) -> LinearOperator:
    return LinearOperator.from_matrix(M)


def smoothed_truth(lam: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The true density broadened by the same Gaussian: (1/n) sum_i N(x; lambda_i, sigma^2)."""
    z = (x[:, None] - lam[None, :]) / sigma
    return torch.exp(-0.5 * z * z).sum(1) / (lam.numel() * sigma * math.sqrt(2 * math.pi))


def l1(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.trapezoid((a - b).abs(), x))


def quad_forms(M: torch.Tensor, U: torch.Tensor, p: int) -> torch.Tensor:
    """u^T M^p u per row of U."""
    V = U.clone()
    for _ in range(p):
        V = V @ M
    return (V * U).sum(1)


FAMILIES = {
    "wishart": lambda: spectra.wishart(120, seed=1),
    "indefinite": lambda: spectra.wishart(100, seed=2, shift=0.5),
    "even_signs": lambda: spectra.evenly_spaced(90, signs=True),
    "geometric": lambda: spectra.geometric(80),
    "negative_dominant": lambda: spectra.negative_dominant(70),
}


# ---------------------------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", ["slq", "kpm"])
def test_weights_nodes_and_normalisation(family: str, method: str) -> None:
    M, lam = FAMILIES[family]()
    r = spectral_density(op(M), num_probes=6, num_steps=20, method=method, seed=1)
    assert isinstance(r, SpectralDensity)
    P, N = r.nodes.shape
    assert P == 6 and r.weights.shape == (P, N) and r.nodes.dtype == F64
    assert bool((r.weights >= 0).all())
    torch.testing.assert_close(r.weights.sum(1), torch.ones(P, dtype=F64), rtol=0, atol=1e-12)
    scale = float(lam.abs().max())
    if method == "slq":
        assert N == 20
        tol = 1e-10 * scale  # Ritz values interlace: inside [lambda_min, lambda_max]
        assert float(r.nodes.min()) >= float(lam[0]) - tol
        assert float(r.nodes.max()) <= float(lam[-1]) + tol
        sigma = r.default_sigma
        assert sigma == pytest.approx((r.bounds[1] - r.bounds[0]) / 20)
        x = torch.linspace(float(lam[0]) - 8 * sigma, float(lam[-1]) + 8 * sigma, 6001, dtype=F64)
    else:
        lo, hi = r.bounds
        assert lo <= float(lam[0]) and hi >= float(lam[-1])  # KPM bounds enclose the spectrum
        assert float(r.nodes.min()) > lo and float(r.nodes.max()) < hi
        x = torch.linspace(lo, hi, 20001, dtype=F64)
    rho = r.density(x)
    assert bool(torch.isfinite(rho).all()) and bool((rho >= 0).all())
    assert float(torch.trapezoid(rho, x)) == pytest.approx(1.0, abs=2e-3)
    # a Gaussian-smoothed density integrates to 1 for both methods
    s = (float(lam[-1]) - float(lam[0])) / 15
    xs = torch.linspace(float(lam[0]) - 10 * s, float(lam[-1]) + 10 * s, 4001, dtype=F64)
    assert float(torch.trapezoid(r.density(xs, sigma=s), xs)) == pytest.approx(1.0, abs=1e-9)
    assert r.moments(0) == pytest.approx(1.0, abs=1e-12)


def test_slq_bounds_enclose_extreme_ritz_values() -> None:
    M, lam = spectra.wishart(150, seed=3)
    r = spectral_density(op(M), num_probes=4, num_steps=40)
    lo, hi = r.bounds
    assert lo <= float(r.nodes.min()) and hi >= float(r.nodes.max())
    # converged extremes: within a small fraction of the width of the true ones
    width = float(lam[-1] - lam[0])
    assert abs(lo - float(lam[0])) < 0.05 * width and abs(hi - float(lam[-1])) < 0.05 * width


# ---------------------------------------------------------------------------------------------
# exactness: Gauss rule vs Hutchinson on the same probes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize("steps", [2, 5, 200])
def test_slq_traces_equal_hutchinson_on_same_probes(probe: str, steps: int) -> None:
    M, _ = spectra.wishart(60, seed=4, shift=0.5)
    n = 60
    r = spectral_density(op(M), num_probes=7, num_steps=steps, seed=11, probe=probe)
    assert r.num_steps == min(steps, n)
    Z = math.sqrt(n) * draw_probes(n, 7, seed=11, probe=probe, dtype=F64)  # Hutchinson's z
    h1 = quad_forms(M, Z, 1)  # z^T A z
    h2 = quad_forms(M, Z, 2)  # z^T A^2 z
    scale1, scale2 = float(h1.abs().max()), float(h2.abs().max())
    assert r.moments(1) * n == pytest.approx(float(h1.mean()), abs=1e-12 * scale1)
    assert r.moments(2) * n == pytest.approx(float(h2.mean()), abs=1e-12 * scale2)
    per1 = r.moments(1, per_probe=True) * n
    per2 = r.trace(lambda x: x**2, per_probe=True)
    torch.testing.assert_close(per1, h1, rtol=0, atol=1e-12 * scale1)
    torch.testing.assert_close(per2, h2, rtol=0, atol=1e-12 * scale2)


def test_slq_moments_exact_up_to_degree_2m_minus_1() -> None:
    M, _ = spectra.evenly_spaced(150, signs=True)
    m = 12
    r = spectral_density(op(M), num_probes=5, num_steps=m, seed=2)
    U = draw_probes(150, 5, seed=2, dtype=F64)
    for p in range(2 * m):
        exact = quad_forms(M, U, p)
        got = r.moments(p, per_probe=True)
        torch.testing.assert_close(got, exact, rtol=1e-11, atol=0)
    # degree 2m is NOT reproduced in general: the test above can tell the difference
    exact = quad_forms(M, U, 2 * m)
    got = r.moments(2 * m, per_probe=True)
    assert float(((got - exact) / exact).abs().max()) > 1e-8


def test_full_order_rule_exact_for_any_function() -> None:
    M, lam = spectra.wishart(50, seed=6)  # SPD
    r = spectral_density(op(M), num_probes=4, num_steps=50, seed=3)
    evals, evecs = torch.linalg.eigh(M)
    logM = (evecs * torch.log(evals)) @ evecs.T
    U = draw_probes(50, 4, seed=3, dtype=F64)
    exact = 50 * (U @ logM * U).sum(1)
    torch.testing.assert_close(r.trace(torch.log, per_probe=True), exact, rtol=1e-10, atol=1e-10)
    se = r.trace_stderr(torch.log)
    assert math.isfinite(se) and se > 0
    # log-determinant estimate within 4 standard errors of the truth
    assert abs(r.trace(torch.log) - float(torch.log(lam).sum())) < 4 * se + 1e-9


def test_kpm_moments_exact_below_num_moments() -> None:
    M, _ = spectra.wishart(120, seed=7, shift=0.5)
    r = spectral_density(op(M), num_probes=4, method="kpm", num_moments=15, seed=4)
    assert r.chebyshev_moments is not None and r.chebyshev_moments.shape == (4, 15)
    U = draw_probes(120, 4, seed=4, dtype=F64)
    for p in range(15):
        exact = quad_forms(M, U, p)
        torch.testing.assert_close(r.moments(p, per_probe=True), exact, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# accuracy against the true spectrum
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["slq", "kpm"])
def test_smoothed_density_close_to_truth_and_improves_with_probes(method: str) -> None:
    M, lam = spectra.wishart(300, seed=1)
    A = op(M)
    width = float(lam[-1] - lam[0])
    sigma = width / 20
    x = torch.linspace(float(lam[0]) - 0.3 * width, float(lam[-1]) + 0.3 * width, 3001, dtype=F64)
    truth = smoothed_truth(lam, x, sigma)
    errs = {}
    for P in (2, 32):
        r = spectral_density(A, num_probes=P, num_steps=40, method=method, seed=3)
        errs[P] = l1(r.density(x, sigma), truth, x)
    assert errs[32] < 0.05, errs
    assert errs[32] < 0.6 * errs[2], errs


def test_kpm_expansion_close_to_exact_moment_expansion() -> None:
    """KPM's stochastic error alone: its damped expansion vs the same expansion built from the
    exact moments (1/n) sum_i T_k(t_i) over the same bounds."""
    M, lam = spectra.evenly_spaced(300, signs=True)
    r = spectral_density(op(M), num_probes=32, num_steps=40, method="kpm", seed=5)
    lo, hi = r.bounds
    c, h = 0.5 * (hi + lo), 0.5 * (hi - lo)
    K = r.num_steps
    k = torch.arange(K, dtype=F64)
    mu = torch.cos(k[None, :] * torch.arccos((lam - c) / h)[:, None]).mean(0)
    a = math.pi / (K + 1)
    g = ((K - k + 1) * torch.cos(a * k) + torch.sin(a * k) / math.tan(a)) / (K + 1)
    x = torch.linspace(lo + 1e-3 * h, hi - 1e-3 * h, 4001, dtype=F64)
    t = (x - c) / h
    coef = g * mu
    coef[1:] *= 2
    exact = (torch.cos(k[None, :] * torch.arccos(t)[:, None]) @ coef) / (
        math.pi * h * torch.sqrt(1 - t * t)
    )
    assert l1(r.density(x), exact.clamp_min(0), x) < 0.08


@pytest.mark.parametrize("method", ["slq", "kpm"])
def test_clustered_spectrum_mass_at_zero(method: str) -> None:
    n = 200
    M, _ = spectra.clustered(n)  # one 1, n-1 at 1e-8
    r = spectral_density(op(M), num_probes=16, num_steps=30, method=method, seed=0)
    near0 = float((r.weights * (r.nodes.abs() < 0.5)).sum(1).mean())
    assert near0 == pytest.approx((n - 1) / n, abs=2.0 / n)
    x = torch.linspace(-0.5, 0.5, 20001, dtype=F64)
    mass = float(torch.trapezoid(r.density(x, sigma=0.02), x))
    assert mass == pytest.approx((n - 1) / n, abs=2.0 / n)
    # log density: finite next to the spike and far in the Gaussian tails (log-sum-exp)
    lg = r.log_density(torch.tensor([0.0, 0.3, 0.7, 5.0], dtype=F64), sigma=0.02)
    assert bool(torch.isfinite(lg).all())
    assert float(lg[0]) > float(lg[1]) > float(lg[3])
    if method == "slq":
        # 2-dimensional Krylov space: breakdown after 2 steps (3 when roundoff in the
        # 1e-8 cluster sits just above the threshold; the third node then has weight ~ 0)
        assert int(r.steps_taken.max()) <= 3 and r.num_passes <= 3
        assert int((r.steps_taken == 2).sum()) >= 12


# ---------------------------------------------------------------------------------------------
# block feeding and counters
# ---------------------------------------------------------------------------------------------


def test_slq_one_pass_per_step_for_all_probes() -> None:
    M, _ = spectra.wishart(100, seed=8)
    A = op(M)
    A.matmat(torch.ones(1, 100, dtype=F64))  # counters need not start at 0
    p0, v0 = A.num_passes, A.num_matvecs
    r = spectral_density(A, num_probes=8, num_steps=25)
    assert r.num_passes == 25 == A.num_passes - p0
    assert r.num_matvecs == 8 * 25 == A.num_matvecs - v0
    p0 = A.num_passes
    k = spectral_density(A, num_probes=8, num_steps=25, method="kpm")
    assert k.num_passes == A.num_passes - p0
    assert k.num_passes <= 10 + 25  # bounds + ceil((M - 1)/2) with M = 50 moments


def test_block_equals_each_probe_alone() -> None:
    M, _ = spectra.wishart(120, seed=9, shift=0.5)
    A = op(M)
    Z = draw_probes(120, 5, seed=7, probe="gaussian", dtype=F64)
    r = spectral_density(A, num_steps=30, v0=Z)
    for p in range(5):
        one = spectral_density(A, num_steps=30, v0=Z[p : p + 1])
        torch.testing.assert_close(one.nodes[0], r.nodes[p], rtol=0, atol=1e-12)
        torch.testing.assert_close(one.weights[0], r.weights[p], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# degenerate operators and breakdown
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [0.0, 1.0, 0.01, -3.0])
@pytest.mark.parametrize("method", ["slq", "kpm"])
def test_point_spectrum(c: float, method: str) -> None:
    M, _ = spectra.scaled_identity(40, c) if c != 0 else spectra.zero(40)
    r = spectral_density(op(M), num_probes=3, num_steps=10, method=method)
    for t in (r.nodes, r.weights):
        assert bool(torch.isfinite(t).all())
    if method == "slq":
        assert r.steps_taken.tolist() == [1, 1, 1] and r.num_passes == 1
        torch.testing.assert_close(r.nodes, torch.full((3, 10), c, dtype=F64), rtol=0, atol=1e-15)
        assert r.weights[:, 0].tolist() == [1.0] * 3 and float(r.weights[:, 1:].abs().sum()) == 0
    assert r.moments(1) == pytest.approx(c, abs=1e-13)
    assert r.moments(2) == pytest.approx(c * c, abs=1e-13)
    s = r.default_sigma if method == "slq" else 0.05 * (r.bounds[1] - r.bounds[0])
    lo, hi = (c, c) if method == "slq" else r.bounds
    x = torch.linspace(lo - 12 * s, hi + 12 * s, 4001, dtype=F64)
    rho = r.density(x, None if method == "slq" else s)
    assert bool(torch.isfinite(rho).all())
    assert float(torch.trapezoid(rho, x)) == pytest.approx(1.0, abs=1e-6)
    assert float(x[rho.argmax()]) == pytest.approx(c, abs=2 * (x[1] - x[0]).item())


def test_low_rank_breakdown_is_exact_and_padded() -> None:
    n, rank = 100, 3
    M, lam = spectra.low_rank_psd(n, rank)
    r = spectral_density(op(M), num_probes=4, num_steps=20, seed=1)
    assert r.nodes.shape == (4, 20)
    # Krylov space: 3 eigenvectors + null-space part; one step more where a small beta
    # amplified the rounding above the breakdown threshold (a null-space direction, weight ~0)
    assert int(r.steps_taken.max()) <= rank + 2
    assert r.num_passes == int(r.steps_taken.max())
    for p in range(4):
        k = int(r.steps_taken[p])
        assert float(r.weights[p, k:].abs().sum()) == 0.0
    U = draw_probes(n, 4, seed=1, dtype=F64)
    for p in (1, 2, 7, 15):  # every moment is exact after a breakdown
        torch.testing.assert_close(r.moments(p, per_probe=True), quad_forms(M, U, p), rtol=1e-10,
                                   atol=1e-13)
    assert bool(torch.isfinite(r.density(torch.linspace(-1, 11, 101, dtype=F64))).all())


def test_probe_in_invariant_subspace_stops_while_others_continue() -> None:
    n = 80
    M, lam = spectra.evenly_spaced(n, seed=3)
    evals, evecs = torch.linalg.eigh(M)
    special = (evecs[:, 10] + evecs[:, 50]) / math.sqrt(2)  # 2-dimensional invariant subspace
    Z = torch.stack([draw_probes(n, 1, seed=4, dtype=F64)[0], special, -special * 3])
    A = op(M)
    r = spectral_density(A, num_steps=15, v0=Z)
    assert r.steps_taken.tolist() == [15, 2, 2]
    assert r.num_matvecs == 15 + 2 + 2  # the block shrank after step 2
    for p in (1, 2):
        torch.testing.assert_close(r.nodes[p, :2], evals[[10, 50]], rtol=0, atol=1e-12)
        torch.testing.assert_close(r.weights[p, :2], torch.full((2,), 0.5, dtype=F64), rtol=0,
                                   atol=1e-12)
    alone = spectral_density(A, num_steps=15, v0=Z[:1])
    torch.testing.assert_close(alone.nodes[0], r.nodes[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(alone.weights[0], r.weights[0], rtol=0, atol=1e-12)


def test_full_reorthogonalization_prevents_ghosts() -> None:
    M, lam = spectra.strakos(200)  # loses orthogonality fast without reorthogonalization
    top = float(lam[-1])
    full = spectral_density(op(M), num_probes=2, num_steps=100, reorth="full")
    none = spectral_density(op(M), num_probes=2, num_steps=100, reorth="none")
    assert int(((full.nodes[0] - top).abs() < 1e-6 * top).sum()) == 1
    assert int(((none.nodes[0] - top).abs() < 1e-6 * top).sum()) > 1  # ghost copies
    for r in (full, none):
        torch.testing.assert_close(r.weights.sum(1), torch.ones(2, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("basis_dtype", [torch.bfloat16, torch.float32])
def test_low_precision_basis(basis_dtype: torch.dtype) -> None:
    M, lam = spectra.wishart(200, seed=1)
    A32 = op(M.float())
    ref = spectral_density(op(M), num_probes=8, num_steps=40, seed=2)
    r = spectral_density(A32, num_probes=8, num_steps=40, seed=2, basis_dtype=basis_dtype)
    torch.testing.assert_close(r.weights.sum(1), torch.ones(8, dtype=F64), rtol=0, atol=1e-12)
    sigma = float(lam[-1] - lam[0]) / 20
    x = torch.linspace(-1.0, 4.0, 2001, dtype=F64)
    assert l1(r.density(x, sigma), ref.density(x, sigma), x) < 0.01
    assert r.moments(1) == pytest.approx(ref.moments(1), rel=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("method", ["slq", "kpm"])
def test_tiny_sizes(n: int, method: str) -> None:
    M, lam = spectra.evenly_spaced(n, signs=True)
    r = spectral_density(op(M), num_probes=3, num_steps=10, method=method)
    if method == "slq":
        assert r.nodes.shape == (3, n)  # num_steps clipped to n: exact
    U = draw_probes(n, 3, dtype=F64)
    torch.testing.assert_close(r.moments(3, per_probe=True), quad_forms(M, U, 3), rtol=1e-10,
                               atol=1e-12)
    assert bool(torch.isfinite(r.density(torch.linspace(-2, 2, 50, dtype=F64), 0.1)).all())


# ---------------------------------------------------------------------------------------------
# determinism, RNG, errors, plotting
# ---------------------------------------------------------------------------------------------


def test_global_rng_untouched_and_seeded() -> None:
    M, _ = spectra.wishart(60, seed=1)
    A = op(M)
    state = torch.get_rng_state()
    a = spectral_density(A, num_probes=3, num_steps=10, seed=5, probe="gaussian")
    b = spectral_density(A, num_probes=3, num_steps=10, seed=5, probe="gaussian")
    k = spectral_density(A, num_probes=3, num_steps=10, seed=5, method="kpm")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.nodes, b.nodes) and torch.equal(a.weights, b.weights)
    c = spectral_density(A, num_probes=3, num_steps=10, seed=6, probe="gaussian")
    assert not torch.equal(a.weights, c.weights)
    assert a.seed == 5 and k.method == "kpm" and a.n == 60


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_probes": 0}, "num_probes"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 2.5}, "num_steps"),
        ({"method": "lanczos"}, "method"),
        ({"probe": "normal"}, "probe"),
        ({"reorth": "partial"}, "reorth"),
        ({"basis_dtype": torch.int32}, "basis_dtype"),
        ({"method": "kpm", "num_moments": 0}, "num_moments"),
        ({"num_moments": 10}, "num_moments"),
        ({"v0": torch.zeros(2, 30, dtype=F64)}, "v0"),
        ({"v0": torch.ones(2, 29, dtype=F64)}, "v0"),
    ],
)
def test_bad_arguments(kwargs: dict, name: str) -> None:
    M, _ = spectra.wishart(30, seed=1)
    with pytest.raises(ConfigurationError, match=name):
        spectral_density(op(M), **kwargs)


def test_bad_query_arguments() -> None:
    M, _ = spectra.wishart(30, seed=1)
    r = spectral_density(op(M), num_probes=2, num_steps=5)
    with pytest.raises(ConfigurationError, match="sigma"):
        r.density(torch.zeros(3), sigma=0.0)
    with pytest.raises(ConfigurationError, match="p must"):
        r.moments(-1)


def test_num_steps_above_n_is_clipped() -> None:
    M, _ = spectra.wishart(20, seed=1)
    r = spectral_density(op(M), num_probes=2, num_steps=500)
    assert r.num_steps == 20 and r.nodes.shape == (2, 20) and r.num_passes <= 20


def test_nonfinite_products_raise() -> None:
    def nan_after_first(V: torch.Tensor) -> torch.Tensor:
        out = 2.0 * V
        out[:, 0] = float("nan")
        return out

    A = LinearOperator.from_function(nan_after_first, 10, dtype=F64)
    for method in ("slq", "kpm"):
        with pytest.raises(NonFiniteError):
            spectral_density(A, num_probes=2, num_steps=5, method=method)


def test_plot_smoke_and_missing_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    M, _ = spectra.clustered(60)
    r = spectral_density(op(M), num_probes=2, num_steps=8)
    try:
        import matplotlib
    except ImportError:
        matplotlib = None
    if matplotlib is not None:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = r.plot()  # log scale by default: the outliers stay visible
        assert isinstance(fig, matplotlib.figure.Figure)  # every plot() returns the Figure
        (ax,) = fig.axes
        assert ax.get_yscale() == "log" and len(ax.lines) == 4  # curve, rug, max/min markers
        curve = ax.lines[0].get_ydata()
        peak = float(np.nanmax(curve))
        lo, hi = ax.get_ylim()
        assert lo == pytest.approx(1e-6 * peak)  # floor relative to the peak, not 1e-14
        assert np.nanmin(curve) >= lo
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(f"σ = {r.default_sigma:.3g}" in t for t in texts)
        rug = ax.lines[1].get_xdata()
        assert max(rug) == pytest.approx(float(r.nodes.max()))
        assert min(rug) == pytest.approx(float(r.nodes[r.weights > 0].min()))
        assert "eigenvalue" in ax.get_xlabel() and "density" in ax.get_ylabel()
        plt.close(ax.figure)
        fig = r.plot(log=False, ritz=False)
        ax = fig.axes[0]
        assert ax.get_yscale() == "linear" and len(ax.lines) == 1
        plt.close(fig)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        r.plot()


@pytest.mark.parametrize("method", ["slq", "kpm"])
def test_to_dict_json_round_trip(method: str, tmp_path) -> None:
    M, _ = spectra.clustered(50)
    r = spectral_density(op(M), num_probes=3, num_steps=7, method=method, seed=4)
    text = json.dumps(r.to_dict())  # JSON-safe: no tensors, no tuples of tensors
    back = SpectralDensity.from_dict(json.loads(text))
    assert back.to_dict() == r.to_dict()
    for name in ("nodes", "weights", "trace_weights", "steps_taken"):
        assert torch.equal(getattr(back, name), getattr(r, name))
    old = {("steps" if k == "steps_taken" else k): v for k, v in r.to_dict().items()}
    assert SpectralDensity.from_dict(old).to_dict() == r.to_dict()  # a dict from 0.1
    with pytest.warns(DeprecationWarning, match="steps_taken"):
        assert torch.equal(r.steps, r.steps_taken)  # the old name, for one release
    grid = torch.linspace(-1, 2, 17, dtype=torch.float64)
    assert torch.equal(back.density(grid), r.density(grid))
    assert back.trace(lambda x: x) == r.trace(lambda x: x)
    assert SpectralDensity.from_dict(json.loads(r.to_json())).to_dict() == r.to_dict()
    path = tmp_path / "density.json"
    assert r.to_json(path, indent=1) == path.read_text(encoding="utf-8")
    assert SpectralDensity.from_dict(json.loads(path.read_text())).to_dict() == r.to_dict()
    with pytest.raises(ConfigurationError, match="missing fields"):
        SpectralDensity.from_dict({"nodes": [[0.0]]})
