"""Trace and diagonal estimators (hessfast.estimators) against exact answers.

Statistical checks use fixed seeds, rotated spectra (never diagonal matrices: Rademacher
probes are exact on them) and 4-sigma z-tests; exactness checks are seed-independent.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from models import dense_hessian_reference, make_mlp, reorder_reference, trainable_names

import hessfast as hf
from hessfast.errors import ConfigurationError, NonFiniteError
from hessfast.estimators import DiagonalResult, TraceResult, diagonal, trace
from hessfast.testing import spectra

pytestmark = pytest.mark.usefixtures("no_leaking_global_state")

METHODS = ("hutchinson", "hutch++", "xtrace")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small dense factorizations: one thread avoids OpenMP spin contention on a shared CPU
    (a 150 x 30 QR took 0.5 s with 2 threads under load, 0.2 ms with one)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _op(M: torch.Tensor) -> hf.LinearOperator:
    return hf.LinearOperator.from_matrix(M)


def _exact(M: torch.Tensor) -> float:
    return float(torch.diagonal(M).sum())


def _rademacher_var(M: torch.Tensor) -> float:
    """Variance of one Rademacher sample z^T M z: 2 (||M||_F^2 - sum m_ii^2)."""
    return 2.0 * float((M**2).sum() - (torch.diagonal(M) ** 2).sum())


def _sq_decay(n: int, seed: int = 0):
    i = torch.arange(n, dtype=torch.float64)
    return spectra.with_spectrum(1.0 / (i + 1.0) ** 2, seed)


# ---------------------------------------------------------------------------------------
# unbiasedness and honest error bars
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hutchinson_z_test_closed_form(seed, probe):
    M, _ = spectra.wishart(120, seed=3, shift=0.5)  # indefinite
    m = 60
    r = trace(_op(M), m, method="hutchinson", seed=seed, probe=probe)
    var = _rademacher_var(M) if probe == "rademacher" else 2.0 * float((M**2).sum())
    se = math.sqrt(var / m)
    assert abs(r.value - _exact(M)) <= 4.0 * se
    assert r.num_samples == m and r.method == "hutchinson" and r.seed == seed


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("family", ["harmonic", "wishart_indef"])
def test_z_test_reported_stderr(method, seed, family):
    if family == "harmonic":
        M, _ = spectra.decaying(150, seed=5)
    else:
        M, _ = spectra.wishart(150, seed=5, shift=0.5)
    r = trace(_op(M), 60, method=method, seed=seed)
    assert 0.0 < r.stderr < math.inf
    assert abs(r.value - _exact(M)) <= 4.0 * r.stderr


def test_hutchinson_stderr_matches_closed_form_over_seeds():
    M, _ = spectra.wishart(100, seed=7, shift=0.5)
    m = 40
    closed = math.sqrt(_rademacher_var(M) / m)
    se = [trace(_op(M), m, method="hutchinson", seed=s).stderr for s in range(50)]
    ratio = sum(se) / len(se) / closed
    assert 0.7 <= ratio <= 1.3, ratio


def test_hutchinson_gaussian_stderr_matches_closed_form():
    M, _ = spectra.decaying(100, seed=8)
    m = 40
    closed = math.sqrt(2.0 * float((M**2).sum()) / m)
    se = [trace(_op(M), m, method="hutchinson", seed=s, probe="gaussian").stderr
          for s in range(50)]
    assert 0.7 <= sum(se) / len(se) / closed <= 1.3


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_reported_stderr_is_calibrated(method):
    """Over many seeds the normalized errors (est - tr)/stderr have RMS about 1: the error bar
    is neither a gross under- nor over-statement."""
    M, _ = spectra.wishart(100, seed=9, shift=0.5)
    tr = _exact(M)
    zs = []
    for s in range(40):
        r = trace(_op(M), 45, method=method, seed=s)
        zs.append((r.value - tr) / r.stderr)
    rms = math.sqrt(sum(z * z for z in zs) / len(zs))
    assert 0.5 <= rms <= 1.8, rms


def test_confidence_interval():
    M, _ = spectra.decaying(80, seed=1)
    r = trace(_op(M), 30, method="hutchinson", seed=0)
    lo, hi = r.confidence_interval(0.95)
    assert lo < r.value < hi
    stats = pytest.importorskip("scipy.stats")
    assert r.dof == r.num_samples - 1 == 29 and r.status == "FIXED_BUDGET"
    assert hi - r.value == pytest.approx(stats.t.ppf(0.975, 29) * r.stderr, rel=1e-9)
    lo99, hi99 = r.confidence_interval(0.99)
    assert lo99 < lo and hi99 > hi
    with pytest.raises(ConfigurationError):
        r.confidence_interval(1.0)
    assert isinstance(r, TraceResult)


# ---------------------------------------------------------------------------------------
# exactness
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method,budget", [("hutch++", 3 * 6 + 3), ("xtrace", 2 * 6 + 4)])
def test_exact_when_sketch_covers_rank(method, budget, seed):
    M, lam = spectra.low_rank_psd(120, 6, seed=4)
    r = trace(_op(M), budget, method=method, seed=seed)
    assert r.value == pytest.approx(float(lam.sum()), rel=1e-10)
    assert r.stderr <= 1e-10 * float(lam.sum())
    assert not r.exact  # it was the sketch, not the unit-vector path


def test_exact_rank_deficient_indefinite():
    lam = torch.zeros(90, dtype=torch.float64)
    lam[:4] = torch.tensor([3.0, -2.0, 1.0, -0.5], dtype=torch.float64)
    M, _ = spectra.with_spectrum(lam, seed=2)
    for method, budget in (("hutch++", 15), ("xtrace", 12)):
        r = trace(_op(M), budget, method=method, seed=1)
        assert abs(r.value - 1.5) <= 1e-10 * 6.5


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_budget_above_n_is_exact_with_n_products(method):
    M, _ = spectra.wishart(40, seed=1, shift=0.5)
    A = _op(M)
    r = trace(A, 99, method=method, seed=0)
    assert r.exact and r.stderr == 0.0 and r.converged
    assert r.num_matvecs == 40 == A.num_matvecs
    assert r.value == pytest.approx(_exact(M), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_tiny_sizes(n, method):
    M, _ = spectra.wishart(n, seed=n, shift=0.5)
    budget = {"hutchinson": 5, "hutch++": 3, "xtrace": 3}[method]
    r = trace(_op(M), budget, method=method, seed=0)
    assert math.isfinite(r.value)
    if method != "hutchinson" or n == 1:  # Rademacher on n = 1 is exact too
        assert r.value == pytest.approx(_exact(M), rel=1e-12, abs=1e-14)
    d = diagonal(_op(M), 4, method="xdiag", seed=0)
    assert torch.allclose(d.values, torch.diagonal(M), rtol=1e-12, atol=1e-14)
    d = diagonal(_op(M), 4, method="hutchinson", seed=0)
    assert d.values.shape == (n,) and bool(torch.isfinite(d.values).all())


def test_xtrace_two_probes_on_n3_is_hutchinson_like():
    """n = 3, budget 2: one probe, leave-one-out basis empty, so it is z^T A z."""
    M, _ = spectra.wishart(3, seed=0)
    r = trace(_op(M), 2, method="xtrace", seed=4)
    assert math.isfinite(r.value) and r.stderr == math.inf and r.num_samples == 1


# ---------------------------------------------------------------------------------------
# efficiency at equal budget
# ---------------------------------------------------------------------------------------


def _mean_rel_err(M: torch.Tensor, method: str, budget: int, seeds: int) -> float:
    tr = _exact(M)
    return sum(abs(trace(_op(M), budget, method=method, seed=s).value - tr)
               for s in range(seeds)) / (seeds * abs(tr))


def test_hutchpp_beats_hutchinson_on_decaying_spectrum():
    M, _ = spectra.decaying(200, seed=1)
    e_h = _mean_rel_err(M, "hutchinson", 100, 20)
    e_pp = _mean_rel_err(M, "hutch++", 100, 20)
    assert e_pp < 0.5 * e_h, (e_pp, e_h)


def test_xtrace_beats_hutchpp_on_decaying_spectrum():
    M, _ = _sq_decay(200, seed=2)
    e_pp = _mean_rel_err(M, "hutch++", 100, 20)
    e_x = _mean_rel_err(M, "xtrace", 100, 20)
    assert e_x < 0.7 * e_pp, (e_x, e_pp)
    M, _ = spectra.decaying(200, seed=2, kind="geometric")
    assert _mean_rel_err(M, "xtrace", 60, 10) < 0.1 * _mean_rel_err(M, "hutch++", 60, 10)


def test_hutchpp_error_falls_faster_than_hutchinson():
    """Error-vs-budget slope: about -1/2 for Hutchinson, steeper for Hutch++."""
    M, _ = spectra.decaying(300, seed=3)
    h = [_mean_rel_err(M, "hutchinson", b, 40) for b in (30, 120)]
    pp = [_mean_rel_err(M, "hutch++", b, 40) for b in (30, 120)]
    slope_h = math.log(h[1] / h[0]) / math.log(4)
    slope_pp = math.log(pp[1] / pp[0]) / math.log(4)
    assert -0.9 < slope_h < -0.25, slope_h
    assert slope_pp < -0.9 and slope_pp < slope_h - 0.3, (slope_pp, slope_h)


# ---------------------------------------------------------------------------------------
# adaptive mode
# ---------------------------------------------------------------------------------------


def _check_stop(r: TraceResult, rtol: float, min_samples: int, budget: int) -> None:
    assert r.converged and r.status == "CONVERGED"
    assert r.num_samples >= min_samples and r.dof == r.num_samples - 1
    lo, hi = r.confidence_interval(0.95)  # the t interval the rule stopped on
    assert hi - r.value <= rtol * abs(r.value) * (1 + 1e-12)
    assert r.num_matvecs <= budget


@pytest.mark.parametrize("method", METHODS)
def test_adaptive_stops_on_interval(method):
    M, _ = spectra.wishart(150, seed=2)
    # XTrace's jackknife interval is conservative and each fresh block is a new basis
    rtol, budget = (0.08 if method == "xtrace" else 0.02), 149
    A = _op(M)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = trace(A, budget, method=method, seed=1, rtol=rtol)
    _check_stop(r, rtol, 10, budget)
    assert abs(r.value - _exact(M)) <= 4.0 * r.stderr
    assert A.num_matvecs == r.num_matvecs and A.num_passes == r.num_passes
    assert r.num_passes <= 12  # blocks, not one product per probe


@pytest.mark.parametrize("method", METHODS)
def test_adaptive_negative_trace(method):
    """A running-mean rule without abs() exits at once on a negative trace; the interval rule
    runs until the interval is narrow enough and never before min_samples."""
    M, lam = spectra.negative_dominant(300, seed=3)
    tr = float(lam.sum())
    assert tr < 0
    r = trace(_op(M), 299, method=method, seed=2, rtol=0.05, min_samples=15)
    _check_stop(r, 0.05, 15, 299)
    assert abs(r.value - tr) <= 4.0 * r.stderr


def test_adaptive_respects_min_samples_on_easy_operator():
    M, _ = spectra.scaled_identity(60, 1.0)  # Rademacher is exact: stderr 0 at once
    M = M + 1e-3 * spectra.wishart(60, seed=1)[0]
    r = trace(_op(M), 500, method="hutchinson", seed=0, rtol=0.1, min_samples=25)
    assert r.converged and r.num_samples >= 25


def test_adaptive_zero_operator_converges():
    r = trace(_op(torch.zeros(30, 30, dtype=torch.float64)), 25, method="hutchinson", rtol=0.01)
    assert r.converged and r.value == 0.0 and r.num_samples >= 10


@pytest.mark.parametrize("method", METHODS)
def test_adaptive_budget_too_small_warns(method):
    M, _ = spectra.wishart(150, seed=2, shift=0.5)
    A = _op(M)
    with pytest.warns(UserWarning, match="budget"):
        r = trace(A, 30, method=method, seed=0, rtol=1e-6)
    assert not r.converged
    assert r.num_matvecs <= 30 and r.num_matvecs == A.num_matvecs
    assert r.num_matvecs >= 28  # the budget was spent


def test_adaptive_hutchpp_spends_sketch_then_deflated_blocks():
    M, _ = spectra.decaying(300, seed=4)
    r = trace(_op(M), 299, method="hutch++", seed=0, rtol=0.01)
    assert r.converged
    # sketch 299 // 3, A Q, a pilot of min_samples = 10 (and a block that missed the target,
    # if any: it sizes the next), then the fresh block behind the value
    assert r.num_matvecs >= 2 * 99 + 10 + r.num_samples
    assert r.num_samples >= 10


# ---------------------------------------------------------------------------------------
# counting, blocks, determinism, RNG
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,chunk_size,matvecs,passes",
    [
        ("hutchinson", None, 100, 1),
        ("hutch++", None, 100, 3),
        ("xtrace", None, 100, 2),
        ("hutchinson", 16, 100, 7),
        ("hutch++", 16, 100, 3 + 3 + 3),  # 33, 33, 34 rows in blocks of <= 16
        ("xtrace", 16, 100, 4 + 4),
    ],
)
def test_counts_and_blocks(method, chunk_size, matvecs, passes):
    M, _ = spectra.decaying(150, seed=0)
    A = _op(M)
    r = trace(A, 100, method=method, seed=0, chunk_size=chunk_size)
    assert r.num_matvecs == A.num_matvecs == matvecs
    assert r.num_passes == A.num_passes == passes
    assert r.seconds >= 0.0


def test_chunk_size_does_not_change_hutchpp_sketch_math():
    M, _ = spectra.low_rank_psd(100, 5, seed=0)
    r = trace(_op(M), 30, method="hutch++", seed=0, chunk_size=4)
    assert r.value == pytest.approx(_exact(M), rel=1e-10)


def test_block_size_is_the_deprecated_name_of_chunk_size():
    M, _ = spectra.decaying(150, seed=0)
    new = trace(_op(M), 100, method="hutch++", seed=0, chunk_size=16)
    with pytest.warns(DeprecationWarning, match="use chunk_size="):
        old = trace(_op(M), 100, method="hutch++", seed=0, block_size=16)
    assert (old.value, old.stderr, old.num_passes) == (new.value, new.stderr, new.num_passes)
    with pytest.raises(ConfigurationError, match="pass chunk_size once"):
        trace(_op(M), 100, chunk_size=8, block_size=16)


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_diagonal_counts(method):
    M, _ = spectra.decaying(100, seed=0)
    A = _op(M)
    d = diagonal(A, 50, method=method, seed=0)
    assert d.num_matvecs == A.num_matvecs == 50
    assert d.num_passes == A.num_passes == (1 if method == "hutchinson" else 2)


def test_global_rng_untouched_and_deterministic():
    M, _ = spectra.decaying(80, seed=0)
    state = torch.get_rng_state()
    for method in METHODS:
        for probe in ("rademacher", "gaussian"):
            a = trace(_op(M), 40, method=method, seed=11, probe=probe)
            b = trace(_op(M), 40, method=method, seed=11, probe=probe)
            c = trace(_op(M), 40, method=method, seed=12, probe=probe)
            assert a.value == b.value and a.stderr == b.stderr
            assert a.value != c.value
        trace(_op(M), 400, method=method, seed=3, rtol=0.05)
    for method in ("hutchinson", "xdiag"):
        a = diagonal(_op(M), 40, method=method, seed=5)
        b = diagonal(_op(M), 40, method=method, seed=5)
        assert torch.equal(a.values, b.values) and torch.equal(a.stderr, b.stderr)
    assert torch.equal(torch.get_rng_state(), state)


def test_float32_operator():
    M, _ = spectra.decaying(100, seed=0)
    A = _op(M.float())
    for method in METHODS:
        r = trace(A, 60, method=method, seed=0)
        assert abs(r.value - _exact(M)) <= 4.0 * r.stderr + 1e-4 * abs(_exact(M))
    d = diagonal(A, 40, method="xdiag", seed=0)
    assert d.values.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# diagonal
# ---------------------------------------------------------------------------------------


def _diag_err(M: torch.Tensor, method: str, budget: int, seeds: int = 4) -> float:
    d = torch.diagonal(M)
    return sum(float((diagonal(_op(M), budget, method=method, seed=s).values - d).norm())
               for s in range(seeds)) / (seeds * float(d.norm()))


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_diagonal_error_decreases_with_budget(method):
    M, _ = spectra.decaying(200, seed=6)
    errs = [_diag_err(M, method, b) for b in (20, 80, 190)]
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.6 * errs[0]


def test_xdiag_beats_hutchinson_diagonal_on_decaying_spectrum():
    M, _ = _sq_decay(200, seed=1)
    assert _diag_err(M, "xdiag", 80) < 0.5 * _diag_err(M, "hutchinson", 80)


def test_xdiag_exact_when_budget_covers_rank():
    M, _ = spectra.low_rank_psd(150, 6, seed=3)
    d = diagonal(_op(M), 2 * (6 + 2), method="xdiag", seed=0)
    assert not d.exact
    assert float((d.values - torch.diagonal(M)).abs().max()) <= 1e-10 * float(M.abs().max())
    assert float(d.stderr.max()) <= 1e-10 * float(M.abs().max())


def test_diagonal_hutchinson_stderr_matches_closed_form():
    """Per entry, Var(z_j (A z)_j) = sum_{l != j} a_jl^2 for Rademacher probes."""
    M, _ = spectra.wishart(100, seed=4, shift=0.5)
    m = 60
    d = diagonal(_op(M), m, method="hutchinson", seed=0)
    closed = (((M**2).sum(1) - torch.diagonal(M) ** 2) / m).sqrt()
    assert 0.8 <= float((d.stderr / closed).mean()) <= 1.2
    zs = ((d.values - torch.diagonal(M)) / closed).abs()
    assert float(zs.max()) <= 4.5
    assert float((zs <= 2.0).double().mean()) >= 0.85


def test_xdiag_stderr_sane():
    M, _ = spectra.decaying(150, seed=2)
    d = diagonal(_op(M), 80, method="xdiag", seed=1)
    zs = ((d.values - torch.diagonal(M)) / d.stderr).abs()
    assert bool(torch.isfinite(zs).all())
    assert float((zs <= 3.0).double().mean()) >= 0.85
    assert float(zs.max()) <= 8.0
    assert isinstance(d, DiagonalResult) and d.by_param is None


def test_diagonal_by_param_on_model_hessian(float64_default):
    model, loss_fn, batches = make_mlp(layernorm=False, task="regression", seed=1)
    op = hf.hessian(model, loss_fn, batches)
    n = op.shape[0]
    ref = dense_hessian_reference(model, loss_fn, batches)
    ref = reorder_reference(ref, model, trainable_names(model), op.param_names)
    true = torch.diagonal(ref)
    params = dict(model.named_parameters())

    before = (op.num_matvecs, op.num_passes)
    d = diagonal(op, n - 1, method="hutchinson", seed=0)  # below n: sampled, not exact
    assert (op.num_matvecs - before[0], op.num_passes - before[1]) == (n - 1, 1)
    assert d.by_param is not None and set(d.by_param) == set(op.param_names)
    for name, t in d.by_param.items():
        assert t.shape == params[name].shape
    flat = torch.cat([d.by_param[nm].reshape(-1) for nm in op.param_names])
    assert torch.equal(flat, d.values)
    scale = float(d.stderr.max()) + 1e-12
    assert float(((d.values - true).abs() - 5.0 * d.stderr).max()) <= 1e-3 * scale
    # Entries whose Hessian row is zero off the diagonal are exact (stderr 0) and must match.
    assert torch.allclose(d.values[d.stderr == 0], true[d.stderr == 0], atol=1e-12)

    dx = diagonal(op, n, method="xdiag", seed=0)  # budget covers n: exact
    assert dx.exact and torch.allclose(dx.values, true, rtol=1e-9, atol=1e-12)
    for name, t in dx.by_param.items():
        assert t.shape == params[name].shape

    dx = diagonal(op, 40, method="xdiag", seed=0)
    err = (dx.values - true).abs()
    assert float(err.norm()) <= 3.0 * float(dx.stderr.norm()) + 1e-12


# ---------------------------------------------------------------------------------------
# validation and failures
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_matvecs": 0}, "max_matvecs.*0"),
        ({"max_matvecs": -3}, "max_matvecs.*-3"),
        ({"max_matvecs": 2.5}, "max_matvecs.*2.5"),
        ({"max_matvecs": True}, "max_matvecs.*True"),
        ({"max_matvecs": 2, "method": "hutch++"}, "max_matvecs >= 3.*2"),
        ({"max_matvecs": 1, "method": "xtrace"}, "max_matvecs >= 2.*1"),
        ({"method": "hutch+"}, "method.*hutch\\+"),
        ({"probe": "sphere"}, "probe.*sphere"),
        ({"rtol": 0.0}, "rtol.*0.0"),
        ({"rtol": -0.1}, "rtol.*-0.1"),
        ({"rtol": float("nan")}, "rtol.*nan"),
        ({"confidence": 0.0}, "confidence.*0.0"),
        ({"confidence": 1.0}, "confidence.*1.0"),
        ({"confidence": 1.5}, "confidence.*1.5"),
        ({"min_samples": 0}, "min_samples.*0"),
        ({"chunk_size": 0}, "chunk_size.*0"),
    ],
)
def test_trace_bad_arguments(kwargs, match):
    M, _ = spectra.decaying(50, seed=0)
    A = _op(M)
    with pytest.raises(ConfigurationError, match=match):
        trace(A, **kwargs)
    assert A.num_matvecs == 0  # validated before any product
    assert issubclass(ConfigurationError, ValueError)


def test_diagonal_bad_arguments():
    M, _ = spectra.decaying(50, seed=0)
    with pytest.raises(ConfigurationError, match="method.*'bekas'"):
        diagonal(_op(M), method="bekas")
    with pytest.raises(ConfigurationError, match="max_matvecs.*0"):
        diagonal(_op(M), 0)
    with pytest.raises(ConfigurationError, match="max_matvecs >= 2.*1"):
        diagonal(_op(M), 1, method="xdiag")


def test_non_square_rejected():
    with pytest.raises(ConfigurationError, match="square"):
        trace(torch.zeros(3, 4, dtype=torch.float64))

    class Rect:
        shape = (3, 4)
        dtype = torch.float64
        device = torch.device("cpu")

        def matmat(self, V):
            return V

    with pytest.raises(ConfigurationError, match="square.*\\(3, 4\\)"):
        trace(Rect())
    with pytest.raises(ConfigurationError, match="square"):
        diagonal(Rect())


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_products_raise(method):
    def fn(V):
        out = V.clone()
        out[:, 0] = float("nan")
        return out

    A = hf.LinearOperator.from_function(fn, 20, dtype=torch.float64)
    with pytest.raises(NonFiniteError):
        trace(A, 9, method=method)
    with pytest.raises(NonFiniteError):
        diagonal(A, 9, method="xdiag")


@pytest.mark.parametrize("n", [50, 64])
def test_exactly_rank_one_and_zero_operators(n):
    """All-ones (rank 1, integer products: the sketch R has exactly zero singular values) and
    the zero operator: finite, exact results, no division by zero."""
    M = torch.ones(n, n, dtype=torch.float64)
    for seed in range(3):
        for method, budget in (("hutch++", 9), ("xtrace", 10)):
            r = trace(_op(M), budget, method=method, seed=seed)
            assert r.value == pytest.approx(float(n), rel=1e-12)
        d = diagonal(_op(M), 10, method="xdiag", seed=seed)
        assert torch.allclose(d.values, torch.ones(n, dtype=torch.float64), atol=1e-12)
        assert bool(torch.isfinite(d.stderr).all())
    Z = torch.zeros(n, n, dtype=torch.float64)
    for method in METHODS:
        r = trace(_op(Z), 12, method=method, seed=0)
        assert r.value == 0.0 and r.stderr == 0.0
    for method in ("hutchinson", "xdiag"):
        d = diagonal(_op(Z), 12, method=method, seed=0)
        assert torch.equal(d.values, torch.zeros(n, dtype=torch.float64))


# ---------------------------------------------------------------------------------------
# the interval machinery of issue 16 (coverage itself: tests/estimators/test_coverage.py)
# ---------------------------------------------------------------------------------------


def test_t_value_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    from hessfast.results import t_value, z_value

    for dof in (1, 2, 3, 4, 9, 29, 99, 1000, 10**6):
        for level in (0.5, 0.9, 0.95, 0.99, 0.999999):
            want = stats.t.ppf(0.5 + 0.5 * level, dof)
            assert t_value(level, dof) == pytest.approx(want, rel=1e-8), (dof, level)
    assert t_value(0.95, None) == t_value(0.95, math.inf) == z_value(0.95)


def _brute_leave_out(M: torch.Tensor, Om: torch.Tensor) -> tuple[float, torch.Tensor]:
    """XTrace and XDiag of the probes ``Om [k, n]`` from scratch: one QR per left-out probe."""
    n, k = M.shape[0], Om.shape[0]
    Y = Om @ M
    ts, ds = [], []
    for j in range(k):
        Qj, _ = torch.linalg.qr(Y[[i for i in range(k) if i != j]].T)
        P = Qj @ Qj.T
        R = torch.eye(n, dtype=M.dtype) - P
        w = Om[j]
        ts.append(float(torch.trace(P @ M) + w @ R @ M @ R @ w))
        ds.append(torch.diagonal(P @ M) + w * (R @ M @ w))
    return sum(ts) / k, torch.stack(ds).mean(0)


@pytest.mark.parametrize("k", [3, 4, 7])
def test_xtrace_xdiag_jackknife_matches_brute_force(k):
    """The Efron-Stein jackknife from k x k algebra equals the one from k XTrace/XDiag runs
    on the k - 1 probes left after removing each one (each from its own QRs)."""
    from hessfast.estimators.exchangeable import (
        Exchangeable,
        xdiag_jackknife_stderr,
        xtrace_jackknife_stderr,
    )
    from hessfast.estimators.session import Session

    M, _ = spectra.with_spectrum(torch.linspace(-1.0, 2.0, 30, dtype=torch.float64), seed=3)
    st = Exchangeable(Session(_op(M), "test", seed=5))
    st.grow(k)
    reps = [_brute_leave_out(M, st.Om[[i for i in range(k) if i != j]]) for j in range(k)]
    T = torch.tensor([t for t, _ in reps], dtype=torch.float64)
    D = torch.stack([d for _, d in reps])
    want_t = float(((T - T.mean()) ** 2).sum().sqrt())
    want_d = ((D - D.mean(0)) ** 2).sum(0).sqrt()
    assert xtrace_jackknife_stderr(st) == pytest.approx(want_t, rel=1e-9)
    torch.testing.assert_close(xdiag_jackknife_stderr(st), want_d, rtol=1e-9, atol=1e-12)


def test_xtrace_jackknife_needs_three_probes():
    M, _ = spectra.wishart(20, seed=0)
    r = trace(_op(M), 4, method="xtrace", seed=0)  # k = 2: no pair to leave out twice
    assert r.num_samples == 2 and math.isinf(r.stderr) and r.dof == 1
    d = diagonal(_op(M), 4, method="xdiag", seed=0)
    assert bool(torch.isinf(d.stderr).all()) and d.dof is None


def test_hutchinson_closed_form_variance_plug_in_is_unbiased():
    """``2 (mean ||Az||^2 - est. sum a_jj^2)`` averages to the exact Rademacher variance."""
    from hessfast.estimators.session import Session
    from hessfast.estimators.stochastic_trace import _QuadForms

    M, _ = _sq_decay(60, seed=2)
    want = _rademacher_var(M)
    got = []
    for s in range(300):
        q = _QuadForms(Session(_op(M), "test", seed=s), None).draw(8)
        diag2 = (float((q.dsum**2).sum()) - q.dsq) / (8 * 7)
        got.append(2.0 * (float(q.fro.mean()) - diag2))
    assert sum(got) / len(got) == pytest.approx(want, rel=0.1)


def test_fixed_budgets_report_fixed_budget_and_t_dof():
    M, _ = spectra.wishart(80, seed=1)
    for method, dof in (("hutchinson", 29), ("hutch++", 9), ("xtrace", 14)):
        r = trace(_op(M), 30, method=method, seed=0)
        assert r.status == hf.Status.FIXED_BUDGET and r.converged and r.dof == dof
    for method, dof in (("hutchinson", 29), ("xdiag", 14)):
        d = diagonal(_op(M), 30, method=method, seed=0)
        assert d.status == "FIXED_BUDGET" and d.dof == dof
        lo, hi = d.confidence_interval(0.95)
        stats = pytest.importorskip("scipy.stats")
        torch.testing.assert_close(hi - d.values, stats.t.ppf(0.975, dof) * d.stderr)
        assert bool((lo <= hi).all())
    ex = trace(_op(M), 80, method="hutch++")
    assert ex.status == "EXACT" and ex.dof is None and ex.confidence_interval() == (ex.value,) * 2


def test_adaptive_interval_comes_from_a_fresh_block():
    """The pilot (min_samples) sizes the block behind the value: num_matvecs counts both, and
    the reported interval meets the target with the block's own t quantile."""
    M, _ = spectra.wishart(120, seed=4, shift=0.2)
    A = _op(M)
    r = trace(A, 2000, method="hutchinson", seed=3, rtol=0.02, min_samples=12)
    assert r.status == "CONVERGED" and r.num_matvecs >= 12 + r.num_samples
    assert r.dof == r.num_samples - 1 and r.num_samples >= 12
    lo, hi = r.confidence_interval(0.95)
    assert hi - r.value <= 0.02 * abs(r.value)
