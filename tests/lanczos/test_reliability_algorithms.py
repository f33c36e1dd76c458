"""Reliability of the algorithms and kernels (issue 8, part C): nothing silently wrong, no
crash, every error names its cause. Each test reproduces a case of the reliability audit and
asserts the specific error type and a message fragment, or the correct number."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import hessfast as hf
from hessfast import _checks, _probe, ops
from hessfast.density import slq as slq_mod
from hessfast.errors import (
    ArgumentTypeError,
    AsymmetricOperatorError,
    ConfigurationError,
    NonDeterministicError,
    NonFiniteError,
)
from hessfast.estimators import session as session_mod

F64 = torch.float64
N = 100


def _sym(n: int = N, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    lam = torch.linspace(0.0, 10.0, n, dtype=F64)
    return ((Q * lam) @ Q.T).to(dtype)


def _fn_op(M: torch.Tensor, **kw: Any) -> hf.LinearOperator:
    return hf.LinearOperator.from_function(lambda V: V @ M.T, M.shape[0], dtype=M.dtype, **kw)


def _asymmetric() -> hf.LinearOperator:
    g = torch.Generator().manual_seed(1)
    return _fn_op(_sym() + 1e-2 * torch.randn(N, N, dtype=F64, generator=g))


def _noisy() -> hf.LinearOperator:
    S, g = _sym(), torch.Generator().manual_seed(2)

    def fn(V: torch.Tensor) -> torch.Tensor:
        return (V @ S) * (1 + 1e-3 * torch.randn(V.shape, dtype=F64, generator=g))

    return hf.LinearOperator.from_function(fn, N, dtype=F64)


def _quiet(f: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return f(*args, **kw)


ALGORITHMS: dict[str, Callable[[Any], Any]] = {
    "eigsh": lambda A: hf.eigsh(A, k=3),
    "lambda_max": lambda A: hf.lambda_max(A),
    "power": lambda A: hf.power_iteration(A),
    "condition_number": lambda A: hf.condition_number(A),
    "trace": lambda A: hf.trace(A, 30),
    "diagonal": lambda A: hf.diagonal(A, 30),
    "slq": lambda A: hf.spectral_density(A, num_probes=2, num_steps=8),
    "kpm": lambda A: hf.spectral_density(A, num_probes=2, num_steps=8, method="kpm"),
}


# ---------------------------------------------------------------------------------------------
# 1. generic operators are probed once: symmetry and determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_asymmetric_function_operator_is_refused_by_every_algorithm(name: str) -> None:
    with pytest.raises(AsymmetricOperatorError, match=r"not symmetric: \|u.\(Av\) - v.\(Au\)\|"):
        ALGORITHMS[name](_asymmetric())


@pytest.mark.parametrize("name", ["eigsh", "trace", "slq"])
def test_noisy_operator_is_refused_naming_the_noise(name: str) -> None:
    with pytest.raises(NonDeterministicError, match=r"not deterministic.*differ by 0\.00\d"):
        ALGORITHMS[name](_noisy())


def test_probe_runs_once_counts_its_products_and_keeps_the_global_rng() -> None:
    A = _fn_op(_sym())
    state = torch.get_rng_state()
    r = hf.eigsh(A, k=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert A.checked and A.num_matvecs == r.num_matvecs + _probe.PROBE_MATVECS
    before = A.num_matvecs
    t = hf.trace(A, 20, method="hutchinson")
    assert A.num_matvecs - before == t.num_matvecs == 20  # no second probe
    torch.testing.assert_close(r.eigenvalues, torch.tensor([10.0, 10.0 - 10 / 99], dtype=F64))


def test_probe_opt_outs_and_operators_that_are_not_probed() -> None:
    assert hf.eigsh(_fn_op(_sym() + 1e-2 * torch.ones(N, N, dtype=F64).triu(), check=False),
                    k=1).num_matvecs > 0  # check=False: the user's call
    A = _asymmetric()
    A.checked = True
    _quiet(hf.trace, A, 10)
    assert A.num_matvecs == 10
    M = hf.LinearOperator.from_matrix(_sym())
    hf.trace(M, 10, method="hutchinson")
    assert M.num_matvecs == 10  # a checked matrix is not probed

    class SelfChecked(hf.LinearOperator):
        checks_itself = True

        def _matmat(self, V: torch.Tensor) -> torch.Tensor:
            return 2 * V

    S = SelfChecked(20, F64, "cpu")
    hf.trace(S, 5, method="hutchinson")
    assert S.num_matvecs == 5
    model = nn.Linear(3, 1).double()
    H = hf.hessian(model, nn.MSELoss(), (torch.randn(8, 3, dtype=F64), torch.randn(8, 1,
                                                                                  dtype=F64)))
    used = H.num_matvecs
    hf.trace(H, 2, method="hutchinson")
    assert H.num_matvecs - used == 2  # model operators have their own pre-flight
    with pytest.raises(ConfigurationError, match="check must be True or False"):
        hf.LinearOperator.from_function(lambda V: V, 3, check="yes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probe_never_flags_symmetric_operators_of_any_size_or_scale(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    for n in (1, 2, 17, 100):
        B = torch.randn(n, n, dtype=F64, generator=g)
        for scale in (1e-18, 1.0, 1e18):
            for M in ((B + B.T) / 2, B @ B.T / n - 3.9 * torch.eye(n, dtype=F64)):
                Ms = (M * scale).to(dtype)
                Bs = (B * math.sqrt(scale)).to(dtype)
                for A in (_fn_op(Ms), hf.LinearOperator.from_function(
                        lambda V, Bs=Bs: (V @ Bs) @ Bs.T, n, dtype=dtype)):
                    _probe.probe_operator(A, "test")
                    assert A.checked
    zero = hf.LinearOperator.from_function(torch.zeros_like, 10, dtype=dtype)
    _probe.probe_operator(zero, "test")
    assert zero.checked


def test_probe_names_nonfinite_products() -> None:
    A = hf.LinearOperator.from_function(lambda V: V * math.inf, 10, dtype=F64)
    with pytest.raises(NonFiniteError, match="NaN or Inf for random vectors"):
        hf.power_iteration(A)


# ---------------------------------------------------------------------------------------------
# 2. complex blocks
# ---------------------------------------------------------------------------------------------


def test_complex_blocks_are_refused() -> None:
    A = hf.LinearOperator.from_matrix(_sym())
    X = torch.randn(2, N, dtype=torch.complex128)
    with pytest.raises(ArgumentTypeError, match=r"real vectors.*A @ X.real, A @ X.imag"):
        A.matmat(X)
    with pytest.raises(ArgumentTypeError, match="real vectors"):
        A @ X.T


# ---------------------------------------------------------------------------------------------
# 3. and 4. the kernels: self-overlapping outputs, precision of a float64 block
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_self_overlapping_W_is_refused(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "native" and not hf._native.available():
        pytest.skip("hessfast._C unavailable")
    monkeypatch.setenv("HESSFAST_BACKEND", backend)
    n = 50
    V = torch.linalg.qr(torch.randn(n, 3, dtype=F64))[0].T.contiguous()
    W = torch.as_strided(torch.zeros(n + 4, dtype=F64), (4, n), (1, 1))
    with pytest.raises(ValueError, match=r"W has overlapping elements.*stride \(1, 1\)"):
        ops.reorthogonalize(V, W)
    with pytest.raises(ValueError, match="W has overlapping elements"):
        ops.basis_update(V, torch.zeros(3, 4, dtype=F64), W)
    ok = torch.zeros(4, 2 * n, dtype=F64)[:, ::2]  # strided but not overlapping
    ops.basis_update(V, torch.ones(3, 4, dtype=F64), ok)
    torch.testing.assert_close(ok, -V.sum(0).expand(4, n))


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_float64_block_keeps_its_precision_against_a_low_precision_basis(
    backend: str, storage: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend == "native" and not hf._native.available():
        pytest.skip("hessfast._C unavailable")
    monkeypatch.setenv("HESSFAST_BACKEND", backend)
    g = torch.Generator().manual_seed(0)
    n = 2000
    V = torch.linalg.qr(torch.randn(n, 8, dtype=F64, generator=g))[0].T.to(storage)
    W = torch.randn(3, n, dtype=F64, generator=g)
    Vd = V.double()
    ref = W.clone()
    C = Vd @ ref.T
    ref -= C.T @ Vd
    C2 = Vd @ ref.T
    ref -= C2.T @ Vd
    Wt = W.clone()
    Ct, _ = ops.reorthogonalize(V, Wt, eta=math.inf)
    assert Ct.dtype == F64 and ops.basis_dot(V, W).dtype == F64
    assert float((Wt - ref).norm() / ref.norm()) < 1e-14
    assert float((Ct - (C + C2)).norm() / (C + C2).norm()) < 1e-14
    Wu = W.clone()
    ops.basis_update(V, C.float(), Wu)  # float32 coefficients: W is still not rounded
    exact = W - C.float().double().T @ Vd
    assert float((Wu - exact).norm() / exact.norm()) < 1e-14


def test_density_of_a_float64_operator_with_a_float32_basis_keeps_float64_traces() -> None:
    M = _sym(60)
    exact = float((M * M).sum())
    for bd in (torch.float32, torch.bfloat16):
        d = hf.spectral_density(hf.LinearOperator.from_matrix(M), num_probes=2, num_steps=10,
                                basis_dtype=bd)
        ref = hf.spectral_density(hf.LinearOperator.from_matrix(M), num_probes=2,
                                  num_steps=10)
        assert abs(d.trace(lambda x: x**2) - ref.trace(lambda x: x**2)) <= 1e-12 * exact


# ---------------------------------------------------------------------------------------------
# 5. huge budgets stream through bounded blocks
# ---------------------------------------------------------------------------------------------


class _Widths(hf.LinearOperator):
    """A matrix operator that records the rows of every block it is given."""

    def __init__(self, M: torch.Tensor) -> None:
        super().__init__(M.shape[0], M.dtype, M.device)
        self.M, self.widths, self.checked = M, [], True

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.widths.append(V.shape[0])
        return V @ self.M


def test_huge_budgets_are_exact_or_stream_in_bounded_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    M = _sym(50)
    A = _Widths(M)
    t = hf.trace(A, 10**9, method="hutchinson")
    d = hf.diagonal(A, 10**9)
    assert t.status == d.status == "EXACT" and t.num_matvecs == d.num_matvecs == 50
    assert t.value == pytest.approx(float(torch.trace(M)), rel=1e-13)
    torch.testing.assert_close(d.values, torch.diagonal(M), rtol=1e-13, atol=1e-13)
    r = hf.trace(A, 10**9, method="hutchinson", rtol=0.05)  # adaptive: stops on its own
    assert r.converged and r.num_matvecs < 10**4
    # memory: blocks never exceed BLOCK_BYTES whatever the budget
    monkeypatch.setattr(session_mod, "BLOCK_BYTES", 7 * 50 * 8)
    A.widths.clear()
    r = hf.trace(A, 40, method="hutchinson", seed=3)
    d = hf.diagonal(A, 45, seed=3)
    x = _quiet(hf.trace, A, 40, method="xtrace", seed=3, rtol=1e-3)
    assert max(A.widths) <= 7 and r.num_matvecs == 40 and d.num_matvecs == 45
    assert math.isfinite(x.value)


def test_ordinary_budgets_give_the_same_numbers_as_one_block() -> None:
    M = _sym(80)
    Z = _checks.sample_probes(_checks.probe_generator(4), 30, 80, "rademacher")
    one_block = float(((Z @ M) * Z).sum(1).mean())
    r = hf.trace(hf.LinearOperator.from_matrix(M), 30, method="hutchinson", seed=4)
    assert r.value == pytest.approx(one_block, rel=1e-15) and r.num_passes == 1


def test_many_slq_probes_run_in_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    assert slq_mod.slq_group_size(100, 64, "full", F64, F64) * 100 * (4 * 8 + 64 * 8) <= max(
        slq_mod.GROUP_BYTES, slq_mod.MIN_GROUP * 100 * (4 * 8 + 64 * 8))
    M = _sym(40)
    A = _Widths(M)
    one = hf.spectral_density(A, num_probes=10, num_steps=6, seed=1)
    assert one.num_passes == 6 and max(A.widths) == 10
    monkeypatch.setattr(slq_mod, "MIN_GROUP", 1)
    monkeypatch.setattr(slq_mod, "GROUP_BYTES", 4 * 40 * (4 * 8 + 6 * 8))
    A.widths.clear()
    many = hf.spectral_density(A, num_probes=10, num_steps=6, seed=1)
    assert max(A.widths) <= 4 and many.nodes.shape == (10, 6) and many.num_passes == 18
    torch.testing.assert_close(many.weights.sum(1), torch.ones(10, dtype=F64))
    assert many.moments(1) == pytest.approx(float(torch.trace(M)) / 40, rel=0.2)


# ---------------------------------------------------------------------------------------------
# 6. argument errors name the argument
# ---------------------------------------------------------------------------------------------


def test_budget_below_one_block_or_k_names_max_matvecs() -> None:
    A = hf.LinearOperator.from_matrix(_sym())
    with pytest.raises(ConfigurationError, match=r"max_matvecs=3 .*k=5"):
        hf.eigsh(A, k=5, max_matvecs=3)
    with pytest.raises(ConfigurationError, match=r"max_matvecs=1 .*block_size=4"):
        hf.eigsh(A, k=4, max_matvecs=1, block_size=4)
    assert A.num_matvecs == 0


@pytest.mark.parametrize(
    "v0,error,fragment",
    [
        (torch.full((N,), math.nan, dtype=F64), NonFiniteError, "v0 contains NaN"),
        (torch.ones(N + 1), ConfigurationError, r"v0 must have shape \[100\].*\(101,\)"),
        (torch.ones(3, N - 1), ConfigurationError, r"v0 must have shape.*\(3, 99\)"),
        (torch.ones(2 * N), ConfigurationError, r"v0 must have shape.*\(200,\)"),
        (np.ones(N), ArgumentTypeError, "v0 must be a torch.Tensor.*torch.as_tensor"),
        (torch.ones(N, dtype=torch.complex64), ArgumentTypeError, "real floating"),
    ],
)
def test_bad_v0_is_named(v0: Any, error: type, fragment: str) -> None:
    A = hf.LinearOperator.from_matrix(_sym())
    with pytest.raises(error, match=fragment):
        hf.eigsh(A, k=2, v0=v0)
    with pytest.raises(error, match=fragment):
        hf.spectral_density(A, v0=v0)
    assert A.num_matvecs == 0


@pytest.mark.parametrize(
    "kw,fragment",
    [
        ({"basis_dtype": torch.int8}, "basis_dtype must be None or one of"),
        ({"basis_dtype": "bf16"}, "basis_dtype must be None or one of"),
        ({"basis_dtype": torch.complex64}, "basis_dtype must be None or one of"),
        ({"basis_device": "meta"}, "basis_device='meta'"),
        ({"basis_device": "cuda:7"}, "basis_device='cuda:7' is not available"),
        ({"basis_device": "nonsense"}, "basis_device 'nonsense' is not a device"),
        ({"seed": 2**70}, "seed must be < 2"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"seed": True}, "seed must be an integer"),
        ({"k": True}, "k must be an integer"),
        ({"block_size": True}, "block_size must be an integer"),
        ({"max_matvecs": True}, "max_matvecs must be an integer"),
    ],
)
def test_bad_eigsh_arguments_are_named(kw: dict[str, Any], fragment: str) -> None:
    if kw.get("basis_device") == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    A = hf.LinearOperator.from_matrix(_sym())
    with pytest.raises(ConfigurationError, match=fragment):
        hf.eigsh(A, **{"k": 2, **kw})
    assert A.num_matvecs == 0


@pytest.mark.parametrize(
    "call,fragment",
    [
        (lambda A: hf.spectral_density(A, basis_dtype="bf16"), "basis_dtype"),
        (lambda A: hf.spectral_density(A, seed=2**70), "seed"),
        (lambda A: hf.spectral_density(A, num_probes=True), "num_probes"),
        (lambda A: hf.trace(A, True), "max_matvecs"),
        (lambda A: hf.trace(A, 30, seed=2**70), "seed"),
        (lambda A: hf.diagonal(A, 30, seed="0"), "seed"),
        (lambda A: hf.power_iteration(A, seed=2**70), "seed"),
        (lambda A: hf.condition_number(A, num_probes=True), "num_probes"),
        (lambda A: hf.condition_number(A, seed=1.0), "condition_number: seed"),
        (lambda A: hf.condition_number(A, density="yes"), "density must be True or False"),
    ],
)
def test_every_algorithm_names_its_bad_argument(call: Callable[[Any], Any], fragment: str) -> None:
    A = hf.LinearOperator.from_matrix(_sym())
    with pytest.raises(ConfigurationError, match=fragment):
        call(A)
    assert A.num_matvecs == 0


# ---------------------------------------------------------------------------------------------
# 7. a missing native module is said once
# ---------------------------------------------------------------------------------------------

_FALLBACK = textwrap.dedent(
    """
    import os, sys, warnings
    sys.modules["hessfast._C"] = None  # the import of the native module now fails
    import torch
    from hessfast import ops
    V = torch.linalg.qr(torch.randn(50, 3, dtype=torch.float64))[0].T.contiguous()
    W = torch.randn(2, 50, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        os.environ["HESSFAST_BACKEND"] = "reference"
        ops.basis_dot(V, W)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        os.environ["HESSFAST_BACKEND"] = "auto"
        ops.basis_dot(V, W)
        ops.reorthogonalize(V, W.clone())
    print(len(quiet), len(said))
    print(said[0].category.__name__, str(said[0].message))
    """
)


def test_missing_native_module_warns_once_unless_reference_was_asked_for() -> None:
    proc = subprocess.run([sys.executable, "-c", _FALLBACK], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts, message = proc.stdout.strip().splitlines()[-2:]
    assert counts == "0 1"
    assert message.startswith("UserWarning hessfast: native kernels unavailable (")
    assert "hessfast._C halted" in message  # the import error itself
    assert "HESSFAST_BACKEND=reference to silence" in message


# ---------------------------------------------------------------------------------------------
# 8. a zero trace converges with atol
# ---------------------------------------------------------------------------------------------


def test_zero_trace_converges_with_atol_and_not_with_rtol() -> None:
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, dtype=F64, generator=g))
    M = (Q * torch.linspace(-1.0, 1.0, 60, dtype=F64)) @ Q.T  # trace 0
    A = hf.LinearOperator.from_matrix(M)
    with pytest.warns(UserWarning, match="rtol=0.01"):
        r = hf.trace(A, 50, method="hutchinson", rtol=0.01)
    assert not r.converged
    r = hf.trace(A, 50, method="hutchinson", atol=3.0)  # one sample's sd is ~6.3
    assert r.converged and r.num_samples < 50 and abs(r.value) <= 6.0
    assert 1.96 * r.stderr <= 3.0
    # XTrace's jackknife interval is conservative (issue 16): +-2 is out of reach in 50 products
    x = hf.trace(A, 50, method="xtrace", rtol=1e-6, atol=6.0)
    assert x.converged
    with pytest.raises(ConfigurationError, match="atol must be a finite number > 0"):
        hf.trace(A, 50, atol=-1.0)
