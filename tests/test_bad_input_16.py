"""The smaller bad-input cases of issue 16: each is refused with a specific hessfast error
that names the cause and the fix (or, for MemoryPlan, has the to_dict/to_json every result
has). Every test here failed on the code before its fix."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import hessfast as hf
from hessfast.errors import ArgumentTypeError, ConfigurationError
from hessfast.memory import MemoryPlan
from hessfast.testing import spectra


def _matrix_op(n: int = 7) -> hf.LinearOperator:
    M, _ = spectra.wishart(n)
    return hf.LinearOperator.from_matrix(M)


def _small_hessian() -> hf.LinearOperator:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(8, 1, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    return hf.hessian(model, nn.MSELoss(), [(X, y)])


# -- LinearOperator.from_function: what the function returns --------------------------------
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_from_function_complex_products_refused(dtype):
    """Complex products used to be cast to real with only torch's warning (the imaginary
    part dropped): now refused, naming the dtype that came back and the fix."""
    op = hf.LinearOperator.from_function(lambda V: (V * (1 + 1j)).to(dtype), 5,
                                         dtype=torch.float64, check=False)
    V = torch.ones(2, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "casting complex to real" on the way
        with pytest.raises(ArgumentTypeError, match=rf"returned dtype {dtype}.*real.*out\.real"):
            op.matmat(V)
    assert op.num_matvecs == 0


def test_from_function_complex_products_refused_by_an_algorithm():
    """The same through an algorithm: the operator's probe meets it first."""
    op = hf.LinearOperator.from_function(lambda V: V.to(torch.complex64), 30)
    with pytest.raises(ArgumentTypeError, match="complex64"):
        hf.eigsh(op, k=1)


def test_from_function_integer_products_refused():
    """An integer result (a truncated product) used to be cast to float silently."""
    op = hf.LinearOperator.from_function(lambda V: (3 * V).to(torch.int64), 4, check=False)
    with pytest.raises(ArgumentTypeError, match=r"returned dtype torch\.int64.*floating"):
        op.matmat(torch.full((1, 4), 0.4))


@pytest.mark.parametrize("fn", [lambda V: V[:, :3], lambda V: V.sum(0), lambda V: V.T])
def test_from_function_wrong_shape_refused(fn):
    """A product of the wrong shape is a hessfast ConfigurationError (it was a bare
    RuntimeError) that says how to return one product per row."""
    op = hf.LinearOperator.from_function(fn, 5, check=False)
    with pytest.raises(ConfigurationError, match=r"returned shape .* \[2, 5\].*one product per"):
        op.matmat(torch.ones(2, 5))


def test_from_function_float_products_of_another_dtype_accepted():
    """Real floating-point products in another precision are cast, as documented."""
    op = hf.LinearOperator.from_function(lambda V: 2 * V.double(), 3, check=False)
    out = op.matmat(torch.ones(2, 3))
    assert out.dtype == torch.float32 and torch.equal(out, torch.full((2, 3), 2.0))


# -- matmat: where the block lives ---------------------------------------------------------
@pytest.mark.parametrize("make", [_matrix_op, _small_hessian], ids=["matrix", "hessian"])
def test_matmat_of_a_meta_block_refused(make):
    """A meta-device block (shapes without data) raised torch's raw NotImplementedError
    ("Cannot copy out of meta tensor"); now a ConfigurationError naming the operator's
    device and how to create the vectors there. Nothing is counted."""
    op = make()
    n = op.shape[0]
    with pytest.raises(ConfigurationError, match=r"meta device.*lives on cpu.*device='cpu'"):
        op.matmat(torch.empty(2, n, device="meta", dtype=op.dtype))
    with pytest.raises(ConfigurationError, match="meta device"):
        op @ torch.empty(n, device="meta")
    assert op.num_matvecs == 0 and op.num_passes == 0


def test_matmat_argument_errors_are_hessfast_errors():
    """The block's other checks raise hessfast errors (still ValueError/TypeError)."""
    op = _matrix_op(4)
    with pytest.raises(ConfigurationError, match=r"\[k, 4\]"):
        op.matmat(torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ArgumentTypeError, match="floating-point"):
        op.matmat(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ArgumentTypeError, match="list"):
        op.matmat([[1.0] * 4])


# -- MemoryPlan: to_dict / to_json like every result ----------------------------------------
def _assert_plan_roundtrip(plan: MemoryPlan, tmp_path: Path) -> dict:
    text = plan.to_json()
    d = json.loads(text)
    assert d == json.loads(json.dumps(plan.to_dict()))
    assert d["kind"] == "MemoryPlan" and "_rebuild" not in d
    assert d["algorithm"] == plan.algorithm and d["n"] == plan.n
    assert d["basis_dtype"] == str(plan.basis_dtype) and d["device"] == str(plan.device)
    assert [tuple(i.values()) for i in d["items"]] == [
        (i.name, i.bytes, i.where, i.note) for i in plan.items
    ]
    assert d["totals"]["device"] == plan.total("device") and d["fits"] == plan.fits
    assert d["capacity"] == plan.capacity and d["settings"] == json.loads(
        json.dumps(plan.settings))
    path = tmp_path / "plan.json"
    assert plan.to_json(path, indent=1) == path.read_text(encoding="utf-8")
    assert json.loads(path.read_text(encoding="utf-8")) == d
    assert plan.to_dict(vectors=False) == plan.to_dict()
    return d


@pytest.mark.parametrize("algorithm", ["eigsh", "slq", "trace"])
def test_memory_plan_json_roundtrip(algorithm, tmp_path):
    plan = hf.estimate_memory(_matrix_op(30), algorithm)
    d = _assert_plan_roundtrip(plan, tmp_path)
    assert d["items"][1]["name"] == "basis"


def test_memory_plan_json_of_a_model(tmp_path):
    """A plan from an nn.Module (activations not measured)."""
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    plan = hf.estimate_memory(model, "slq", basis_device="cpu", available=10**9)
    d = _assert_plan_roundtrip(plan, tmp_path)
    assert d["activations_measured"] is False and d["n"] == 41
    with pytest.raises(ArgumentTypeError, match="vectors"):
        plan.to_dict(vectors="no")
