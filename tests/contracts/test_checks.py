"""The shared validation (hessfast._checks), the one probe sampler, the Status type and the
result contract every entry point keeps: num_matvecs, num_passes, a Status, a bool converged."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import hessfast as hf
from hessfast import _checks
from hessfast.errors import (
    ArgumentTypeError,
    ConfigurationError,
    HessfastError,
    NonFiniteError,
)
from hessfast.results import Status
from hessfast.testing import spectra

F64 = torch.float64


def _op(M: torch.Tensor) -> hf.LinearOperator:
    return hf.LinearOperator.from_matrix(M)


# ---------------------------------------------------------------------------------------------
# sampler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("probe", _checks.PROBES)
def test_probes_are_float64_cpu_draws_cast(probe: str) -> None:
    state = torch.get_rng_state()
    Z64 = _checks.sample_probes(_checks.probe_generator(3), 5, 40, probe)
    Z32 = _checks.sample_probes(_checks.probe_generator(3), 5, 40, probe, dtype=torch.float32)
    assert torch.equal(torch.get_rng_state(), state)
    assert Z64.dtype == F64 and Z64.device.type == "cpu" and Z64.shape == (5, 40)
    assert torch.equal(Z32, Z64.float())  # the same draws, cast: no dependence on the dtype
    if probe == "rademacher":
        assert bool((Z64.abs() == 1).all())
    again = _checks.sample_probes(_checks.probe_generator(3), 5, 40, probe)
    other = _checks.sample_probes(_checks.probe_generator(4), 5, 40, probe)
    assert torch.equal(Z64, again) and not torch.equal(Z64, other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rademacher_probes_drawn_in_a_narrow_dtype_are_the_float64_draws(dtype) -> None:
    # sample_probes draws Rademacher probes directly in the target dtype (no float64 copy of
    # a parameter-sized row): that must give the float64 draw's values, also at sizes where
    # the kernel splits the draw over threads
    for k, n in ((5, 40), (3, 700_001)):
        Z64 = _checks.sample_probes(_checks.probe_generator(9), k, n, "rademacher")
        Z = _checks.sample_probes(_checks.probe_generator(9), k, n, "rademacher", dtype=dtype)
        assert Z.dtype == dtype and torch.equal(Z.double(), Z64)


def test_density_probes_come_from_the_shared_sampler() -> None:
    U = hf.density.draw_probes(50, 3, seed=7, probe="gaussian")
    Z = _checks.sample_probes(_checks.probe_generator(7), 3, 50, "gaussian")
    torch.testing.assert_close(U, Z / Z.norm(dim=1, keepdim=True), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_probes_do_not_depend_on_the_device() -> None:
    gen_cpu, gen_gpu = _checks.probe_generator(1), _checks.probe_generator(1)
    a = _checks.sample_probes(gen_cpu, 3, 100, "gaussian")
    b = _checks.sample_probes(gen_gpu, 3, 100, "gaussian", device="cuda")
    assert torch.equal(a, b.cpu())


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: _checks.check_int("k", 0, 1), "k must be an integer >= 1, got 0"),
        (lambda: _checks.check_int("k", True, 0), "got True"),
        (lambda: _checks.check_int("k", 2.0, 0), "got 2.0"),
        (lambda: _checks.check_seed(2**64), "seed must be < 2"),
        (lambda: _checks.check_positive("tol", math.inf), "tol must be a finite number > 0"),
        (lambda: _checks.check_positive("tol", 0), "got 0"),
        (lambda: _checks.check_level("confidence", 1.0), r"confidence must be in \(0, 1\)"),
        (lambda: _checks.check_choice("probe", "sphere", _checks.PROBES), "probe must be one"),
        (lambda: _checks.check_basis_dtype(torch.int8, F64), "basis_dtype must be None or"),
        (lambda: _checks.check_budget("max_matvecs", 2, 3, what="x"), "max_matvecs >= 3, got 2"),
    ],
)
def test_scalar_checks_raise_configuration_errors(call, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as info:
        call()
    assert isinstance(info.value, (HessfastError, ValueError))


def test_work_and_basis_dtypes() -> None:
    assert _checks.work_dtype(F64) == F64
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert _checks.work_dtype(dt) == torch.float32
    assert _checks.check_basis_dtype(None, torch.float32) == torch.float32
    assert _checks.check_basis_dtype(torch.bfloat16, F64) == torch.bfloat16


def test_as_operator() -> None:
    M = torch.eye(3, dtype=F64)
    A = _checks.as_operator(M, "f")
    assert isinstance(A, hf.LinearOperator) and A.shape == (3, 3)
    assert _checks.as_operator(A, "f") is A
    with pytest.raises(ConfigurationError, match=r"f: A must be a square \[n, n\] operator"):
        _checks.as_operator(torch.zeros(2, 3), "f")
    with pytest.raises(ArgumentTypeError, match="list without 'matmat'.*from_matrix"):
        _checks.as_operator([[1.0]], "f")
    with pytest.raises(ConfigurationError, match="real floating dtype.*complex64"):
        _checks.as_operator(torch.eye(2, dtype=torch.complex64), "f")
    with pytest.raises(ConfigurationError, match="real floating dtype.*int64"):
        _checks.as_operator(torch.eye(2, dtype=torch.int64), "f")
    with pytest.raises(ConfigurationError, match="n = 0"):
        _checks.as_operator(_op(torch.zeros(0, 0)), "f", allow_empty=False)


def test_products_count_copy_and_check() -> None:
    A = hf.LinearOperator.from_function(lambda V: V, 4, dtype=torch.float32)
    P = _checks.Products(A, F64, "who")
    V = torch.ones(3, 4, dtype=torch.float32)
    out = P(V)
    assert out.dtype == F64 and out.data_ptr() != V.data_ptr()
    assert (P.num_matvecs, P.num_passes) == (3, 1) == (A.num_matvecs, A.num_passes)
    # same dtype: an operator that may return its input (or its own state) is still copied
    same = _checks.Products(A, torch.float32, "who")(V)
    assert same.data_ptr() != V.data_ptr()
    same.add_(1.0)
    assert bool((V == 1.0).all())

    class Fresh(hf.LinearOperator):  # declares a new tensor per product: handed on as is
        fresh_products = True
        made: list[torch.Tensor] = []

        def _matmat(self, V: torch.Tensor) -> torch.Tensor:
            self.made.append(2.0 * V)
            return self.made[-1]

    F = Fresh(4, torch.float32, "cpu")
    out = _checks.Products(F, torch.float32, "who")(V)
    assert out.data_ptr() == Fresh.made[-1].data_ptr() and bool((out == 2.0).all())
    out64 = _checks.Products(F, F64, "who")(V)  # another dtype: a new tensor regardless
    assert out64.dtype == F64 and out64.data_ptr() != Fresh.made[-1].data_ptr()
    bad = hf.LinearOperator.from_function(lambda V: V * math.nan, 4, dtype=F64)
    with pytest.raises(NonFiniteError, match="who: the operator returned NaN"):
        _checks.Products(bad, F64, "who")(torch.ones(1, 4, dtype=F64))


def test_unit_rows() -> None:
    Z = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=F64)
    torch.testing.assert_close(_checks.unit_rows(Z, "v0", who="f").norm(dim=1),
                               torch.ones(2, dtype=F64))
    with pytest.raises(ConfigurationError, match="f: v0 has a zero row"):
        _checks.unit_rows(torch.zeros(1, 2), "v0", who="f")
    with pytest.raises(NonFiniteError, match="v0 contains NaN"):
        _checks.unit_rows(torch.full((1, 2), math.nan), "v0", who="f")


# ---------------------------------------------------------------------------------------------
# Status and the result contract
# ---------------------------------------------------------------------------------------------


def test_status_is_a_string() -> None:
    assert hf.Status is Status
    s = Status.MAX_MATVECS
    assert isinstance(s, str) and s == "MAX_MATVECS" and s != "CONVERGED"
    assert str(s) == f"{s}" == "MAX_MATVECS" and f"{s:>12}" == " MAX_MATVECS"
    assert Status("EXACT") is Status.EXACT


def _results(A: hf.LinearOperator) -> list:
    return [
        hf.trace(A, 30, method=m, seed=0) for m in ("hutchinson", "hutch++", "xtrace")
    ] + [
        hf.diagonal(A, 30, method=m, seed=0) for m in ("hutchinson", "xdiag")
    ] + [
        hf.spectral_density(A, num_probes=3, num_steps=8, method=m) for m in ("slq", "kpm")
    ]


def test_every_result_has_counts_status_and_bool_converged() -> None:
    M, _ = spectra.wishart(60, seed=0)
    for r in _results(_op(M)):
        # fixed budgets, steps and moments: no stopping test, so not CONVERGED (issue 16)
        assert isinstance(r.status, Status) and r.status == "FIXED_BUDGET"
        assert type(r.converged) is bool and r.converged
        assert r.num_matvecs > 0 and 0 < r.num_passes <= r.num_matvecs


def test_exact_and_exhausted_statuses() -> None:
    M, _ = spectra.wishart(20, seed=0)
    t = hf.trace(_op(M), 40, method="xtrace")
    d = hf.diagonal(_op(M), 40, method="xdiag")
    assert t.status is Status.EXACT and t.exact and t.converged
    assert d.status is Status.EXACT and d.exact and d.converged
    with pytest.warns(UserWarning, match="raise max_matvecs"):
        r = hf.trace(_op(spectra.wishart(200, seed=0, shift=0.5)[0]), 12, method="hutchinson",
                     rtol=1e-6)
    assert r.status is Status.MAX_MATVECS and r.converged is False and not r.exact


def test_kpm_out_of_bounds_is_a_status() -> None:
    n = 40
    M = torch.diag(torch.full((n - 1,), 10.0, dtype=F64), 1)  # non-normal: not symmetric
    A = hf.LinearOperator.from_matrix(M, check_symmetric=False)
    with pytest.warns(RuntimeWarning, match="still grow"):
        r = hf.spectral_density(A, num_probes=2, num_steps=20, method="kpm")
    assert r.status is Status.OUT_OF_BOUNDS and r.converged is False


# ---------------------------------------------------------------------------------------------
# renamed arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [hf.trace, hf.diagonal])
def test_num_matvecs_is_a_deprecated_alias_of_max_matvecs(fn) -> None:
    M, _ = spectra.wishart(50, seed=0)
    new = fn(_op(M), max_matvecs=20, seed=1)
    with pytest.warns(DeprecationWarning, match="max_matvecs"):
        old = fn(_op(M), num_matvecs=20, seed=1)
    assert old.num_matvecs == new.num_matvecs == 20
    with pytest.raises(ConfigurationError, match="pass the budget once"):
        fn(_op(M), max_matvecs=10, num_matvecs=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(_op(M), 20)  # positional: no warning


def test_spectral_density_v0_rows_and_vector() -> None:
    M, _ = spectra.wishart(30, seed=0)
    u = torch.ones(30, dtype=F64)
    one = hf.spectral_density(_op(M), num_steps=6, v0=u)
    row = hf.spectral_density(_op(M), num_steps=6, v0=u[None] * 3)
    assert one.probe == "given" and one.num_probes == 1
    torch.testing.assert_close(one.nodes, row.nodes)
