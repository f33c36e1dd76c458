"""hessfast/_C.pyi describes the native module as built: the same functions, with the same
parameter names in the same order, as the signatures pybind11 reports at run time."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import hessfast
from hessfast import _native

STUB = Path(hessfast.__file__).with_name("_C.pyi")
pytestmark = pytest.mark.skipif(not _native.available(), reason="hessfast._C did not load")


def _stub_functions() -> dict[str, dict[str, list[str]]]:
    """{namespace: {function: [parameter names]}}; namespace "" is the module itself."""
    tree = ast.parse(STUB.read_text())
    out: dict[str, dict[str, list[str]]] = {"": {}, "cpu": {}, "cuda": {}}
    classes = {"_CpuKernels": "cpu", "_CudaKernels": "cuda"}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[""][node.name] = [a.arg for a in node.args.args]
        elif isinstance(node, ast.ClassDef) and node.name in classes:
            for f in node.body:
                if isinstance(f, ast.FunctionDef):
                    out[classes[node.name]][f.name] = [a.arg for a in f.args.args[1:]]  # - self
    return out


def _runtime_parameters(fn) -> list[str]:
    """Parameter names from pybind11's signature line ``name(a: T, b: T) -> R``."""
    first = fn.__doc__.splitlines()[0]
    inside = first[first.index("(") + 1 : first.rindex(")")]
    return re.findall(r"(\w+):", inside)


def _public(module) -> set[str]:
    return {n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))}


def test_stub_matches_the_built_module() -> None:
    C = _native._C
    stub = _stub_functions()
    assert set(stub[""]) == _public(C) - {"cpu", "cuda"}
    assert set(stub["cpu"]) == _public(C.cpu)
    for name, params in stub[""].items():
        assert _runtime_parameters(getattr(C, name)) == params, name
    for name, params in stub["cpu"].items():
        assert _runtime_parameters(getattr(C.cpu, name)) == params, name
    # the CUDA kernels: the CPU ones plus (device, stream), and compiled only sometimes
    for name, params in stub["cuda"].items():
        assert params == stub["cpu"][name] + ["device", "stream"], name
        if _native.cuda_compiled():
            assert _runtime_parameters(getattr(C.cuda, name)) == params, name
    if not _native.cuda_compiled():
        assert _public(C.cuda) == set()


def test_build_info_keys_match_the_stub() -> None:
    tree = ast.parse(STUB.read_text())
    (info,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "_BuildInfo"]
    keys = {s.target.id for s in info.body if isinstance(s, ast.AnnAssign)}
    assert set(_native._C.build_info()) == keys
