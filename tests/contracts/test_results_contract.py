"""The result contract (issue 17): every public result type has ``num_matvecs``,
``num_passes``, ``status``, ``to_dict`` and ``to_json`` with ONE signature, round-trips through
JSON, leaves the ``[n]`` vectors out unless ``vectors=True``, has a short ``repr`` that never
dumps a tensor, and a ``summary()`` string. Each type is built by a small real run."""

from __future__ import annotations

import inspect
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import hessfast as hf
from hessfast.results import Status
from hessfast.testing import spectra

N = 120  # larger than any list a result keeps besides its [n] vectors


def _op() -> hf.LinearOperator:
    M, _ = spectra.wishart(N, shift=0.2)
    return hf.LinearOperator.from_matrix(M)


def _groups() -> dict[str, list[int]]:
    return {"first": list(range(N // 2)), "second": list(range(N // 2, N))}


BUILDERS: dict[str, Callable[[], Any]] = {
    "EigshResult": lambda: hf.eigsh(_op(), k=3),
    "PowerResult": lambda: hf.power_iteration(_op()),
    "ConditionResult": lambda: hf.condition_number(_op(), density=True, num_steps=12),
    "TraceResult": lambda: hf.trace(_op(), 30),
    "DiagonalResult": lambda: hf.diagonal(_op(), 20),
    "SpectralDensity": lambda: hf.spectral_density(_op(), num_probes=2, num_steps=12),
    "BlockSpectra": lambda: hf.block_spectra(_op(), _groups(), num_probes=2, progress=False),
    "Report": lambda: hf.analyze(_op(), k=2, num_probes=2, num_steps=12, per_layer=False,
                                 progress=False),
    "MemoryPlan": lambda: hf.estimate_memory(_op(), "eigsh", k=3),
}
#: the types whose JSON holds [n] arrays when asked (vectors=True)
WITH_VECTORS = {"EigshResult", "PowerResult", "DiagonalResult"}

_cache: dict[str, Any] = {}


def _result(name: str) -> Any:
    """The result of ``BUILDERS[name]``, built once; the runs' warnings (singular, budget,
    deprecations) are silenced: the contract is about the result."""
    if name not in _cache:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _cache[name] = BUILDERS[name]()
    return _cache[name]


def _longest_list(obj: Any) -> int:
    """The length of the longest list anywhere in a JSON-safe value."""
    if isinstance(obj, dict):
        return max((_longest_list(v) for v in obj.values()), default=0)
    if isinstance(obj, list):
        return max([len(obj), *(_longest_list(v) for v in obj)])
    return 0


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values (NaN equal to NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_result_contract(name: str, tmp_path: Path) -> None:
    r = _result(name)
    assert type(r).__name__ == name
    # the three members every result reports
    assert isinstance(r.num_matvecs, int) and not isinstance(r.num_matvecs, bool)
    assert isinstance(r.num_passes, int) and not isinstance(r.num_passes, bool)
    assert r.num_matvecs >= 0 and r.num_passes >= 0
    assert isinstance(r.status, str) and Status(r.status) in Status
    # one signature for every result
    sig = inspect.signature(type(r).to_json)
    assert list(sig.parameters) == ["self", "path", "indent", "vectors"], sig
    assert sig.parameters["path"].default is None
    assert sig.parameters["indent"].kind is inspect.Parameter.KEYWORD_ONLY
    assert sig.parameters["vectors"].kind is inspect.Parameter.KEYWORD_ONLY
    assert sig.parameters["vectors"].default is False
    dsig = inspect.signature(type(r).to_dict)
    assert list(dsig.parameters) == ["self", "vectors"], dsig
    assert dsig.parameters["vectors"].kind is inspect.Parameter.KEYWORD_ONLY
    # JSON round trip, to a string and to a file
    d = r.to_dict()
    text = r.to_json()
    assert isinstance(text, str) and _same_json(json.loads(text), json.loads(json.dumps(d)))
    assert d["kind"] == name
    path = tmp_path / f"{name}.json"
    written = r.to_json(path, indent=1)
    assert path.read_text(encoding="utf-8") == written
    assert _same_json(json.loads(written), json.loads(text))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    # the [n] vectors only when asked
    assert _longest_list(d) < N, f"{name}.to_dict() holds an [n] list without vectors=True"
    full = r.to_dict(vectors=True)
    json.dumps(full)
    if name in WITH_VECTORS:
        assert _longest_list(full) >= N
        assert len(r.to_json(vectors=True)) > len(text)
    with pytest.raises(TypeError):
        r.to_dict(True)  # vectors is keyword-only
    # a short repr without tensor dumps, and a readable summary
    text_repr = repr(r)
    assert len(text_repr) < 400, text_repr
    assert "tensor(" not in text_repr and "\n" not in text_repr
    assert text_repr.startswith(name + "(")
    s = r.summary()
    assert isinstance(s, str) and s.strip()


def test_repr_names_tensors_by_shape() -> None:
    r = _result("EigshResult")
    assert f"eigenvectors=<tensor [3, {N}]>" in repr(r)


def test_a_non_finite_number_survives_json() -> None:
    r = _result("ConditionResult")
    assert math.isinf(json.loads(r.to_json())["kappa"]) == math.isinf(r.kappa)
