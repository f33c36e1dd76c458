"""Shared fixtures for the curvature tests (tiny float64 models and cached dense references).

``tests`` is on the import path through ``pythonpath`` in pyproject's pytest configuration:
``import models`` is tests/models.py. Nothing in bench/ is importable from the tests.
"""

from __future__ import annotations

import pytest
import torch

import hessfast
from hessfast import _native
from hessfast.testing import dense_ggn_reference, dense_hessian_reference
from hessfast.testing.models import BUILDERS


def pytest_report_header(config) -> list[str]:
    """Which hessfast the tests import, and whether its native module loaded: a run against a
    source tree without the built module would test the reference fallback only."""
    native = (f"native module loaded, CUDA kernels {_native.cuda_compiled()}"
              if _native.available() else f"native module NOT loaded ({_native.IMPORT_ERROR})")
    return [f"hessfast {hessfast.__version__} from {hessfast.__file__}: {native}"]


@pytest.fixture
def float64_default():
    """Set torch's default dtype to float64 for one test only."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture
def no_leaking_global_state():
    """The test must leave the default dtype and grad mode as it found them (opt-in per
    module with ``pytestmark = pytest.mark.usefixtures("no_leaking_global_state")``)."""
    dtype = torch.get_default_dtype()
    grad = torch.is_grad_enabled()
    yield
    assert torch.get_default_dtype() == dtype, "test leaked a default dtype change"
    assert torch.is_grad_enabled() == grad, "test leaked a grad-mode change"


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny-model tests: they gain nothing from
    parallelism, and OpenMP spin-waiting on a loaded 2-core machine slows them 10-30x.
    The caller's thread count is restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class RefCache:
    """Dense references, computed once per session per (kind, curvature, bn_mode, data)."""

    def __init__(self) -> None:
        self._cache: dict = {}

    def hessian(self, kind: str, bn_mode: str = "eval", single: bool = False) -> torch.Tensor:
        key = ("H", kind, bn_mode, single)
        if key not in self._cache:
            model, loss_fn, batches = BUILDERS[kind]()
            data = batches[0] if single else batches
            self._cache[key] = dense_hessian_reference(model, loss_fn, data, bn_mode=bn_mode)
        return self._cache[key]

    def ggn(self, kind: str, task: str | None = None) -> torch.Tensor:
        key = ("G", kind, task)
        if key not in self._cache:
            kwargs = {"task": task} if task else {}
            model, loss_fn, batches = BUILDERS[kind](**kwargs)
            self._cache[key] = dense_ggn_reference(model, loss_fn, batches)
        return self._cache[key]


@pytest.fixture(scope="session")
def refs() -> RefCache:
    return RefCache()
