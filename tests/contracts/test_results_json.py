"""to_dict()/to_json() on every result kind: json.dumps accepts them and the key numbers
round-trip; hessfast.results.jsonable converts what results hold."""

from __future__ import annotations

import json
import math
from enum import Enum
from pathlib import Path

import numpy as np
import pytest
import torch

import hessfast as hf
from hessfast.errors import ArgumentTypeError
from hessfast.results import Status, jsonable
from hessfast.testing import spectra
from hessfast.testing.models import make_mlp


def _op(shift: float = 0.0) -> hf.LinearOperator:
    M, _ = spectra.wishart(60, shift=shift)
    return hf.LinearOperator.from_matrix(M)


def _roundtrip(r, **kw) -> dict:
    text = r.to_json(**kw)
    d = json.loads(text)
    assert d == json.loads(json.dumps(r.to_dict(**kw)))
    assert d["kind"] == type(r).__name__
    return d


def test_eigsh_result() -> None:
    r = hf.eigsh(_op(), k=3)
    d = _roundtrip(r, vectors=True)
    assert d["eigenvalues"] == r.eigenvalues.tolist()
    assert d["residuals"] == r.residuals.tolist()
    assert d["converged"] == [True, True, True]
    assert d["status"] == "CONVERGED" and d["num_matvecs"] == r.num_matvecs
    assert torch.equal(torch.tensor(d["eigenvectors"], dtype=r.eigenvectors.dtype),
                       r.eigenvectors.cpu())
    small = _roundtrip(r)  # the vectors are left out unless asked
    assert small["eigenvectors"] is None and small["eigenvalues"] == d["eigenvalues"]
    assert small == _roundtrip(r, vectors=False)


def test_power_result() -> None:
    r = hf.power_iteration(_op())
    d = _roundtrip(r, vectors=True)
    assert d["eigenvalue"] == r.eigenvalue and d["residual"] == r.residual
    assert len(d["eigenvector"]) == 60
    assert _roundtrip(r)["eigenvector"] is None


def test_trace_result() -> None:
    with pytest.warns(UserWarning, match="spent its budget"):
        r = hf.trace(_op(), 30, rtol=1e-6)  # not converged: a MAX_MATVECS status
    d = _roundtrip(r)
    assert d["value"] == r.value and d["stderr"] == r.stderr
    assert d["status"] == str(r.status) == "MAX_MATVECS" and d["converged"] is False


def test_diagonal_result_with_by_param() -> None:
    model, loss_fn, batches = make_mlp(dtype=torch.float64)
    H = hf.hessian(model, loss_fn, batches)
    r = hf.diagonal(H, 12)
    d = _roundtrip(r, vectors=True)
    assert d["values"] == r.values.tolist() and d["status"] == "FIXED_BUDGET"
    assert set(d["by_param"]) == set(r.by_param)
    name = next(iter(r.by_param))
    assert d["by_param"][name] == r.by_param[name].tolist()
    small = _roundtrip(r)
    assert small["values"] is None and small["by_param"] is None


def test_condition_result_inf_and_file(tmp_path: Path) -> None:
    r = hf.condition_number(_op(shift=0.4), density=True)
    assert r.definiteness == "indefinite" and math.isinf(r.kappa)
    path = tmp_path / "cond.json"
    text = r.to_json(path)
    assert path.read_text(encoding="utf-8") == text
    d = json.loads(text)
    assert math.isinf(d["kappa"]) and d["lambda_min"] == r.lambda_min
    assert d["negative_mass"] == r.negative_mass and d["definiteness"] == "indefinite"


class _Color(Enum):
    RED = "red"


def test_jsonable_types() -> None:
    obj = {
        1: torch.tensor([[1.5, 2.0]]), "s": Status.EXACT, "t": (1, 2.5), "e": _Color.RED,
        "np": np.arange(3), "dt": torch.float32, "dev": torch.device("cpu"), "b": True,
        "none": None, "f": float("inf"), "p": Path("a/b"),
    }
    out = jsonable(obj)
    assert out == {
        "1": [[1.5, 2.0]], "s": "EXACT", "t": [1, 2.5], "e": "red", "np": [0, 1, 2],
        "dt": "torch.float32", "dev": "cpu", "b": True, "none": None, "f": float("inf"),
        "p": str(Path("a/b")),
    }
    json.dumps(out)


def test_jsonable_refuses_unknown_and_bad_flag() -> None:
    with pytest.raises(ArgumentTypeError, match="cannot convert object"):
        jsonable(object())
    with pytest.raises(ArgumentTypeError, match="vectors must be True or False"):
        hf.power_iteration(_op()).to_dict(vectors="no")
