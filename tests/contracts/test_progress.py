"""Progress bars of products (hessfast.progress): shown on request, silent otherwise, one bar
for nested calls, counting exactly the operator's products, never changing a result."""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch

import hessfast as hf
from hessfast.errors import ArgumentTypeError
from hessfast.progress import set_total, track
from hessfast.testing import spectra

_COUNT = re.compile(r"(\d+)/(\d+) \[")


def _op(n: int = 80, shift: float = 0.0) -> hf.LinearOperator:
    M, _ = spectra.wishart(n, shift=shift)
    return hf.LinearOperator.from_matrix(M)


def _final_count(err: str) -> tuple[int, int]:
    """The last ``done/total`` a tqdm bar wrote."""
    hits = _COUNT.findall(err)
    assert hits, f"no progress bar on stderr: {err!r}"
    done, total = hits[-1]
    return int(done), int(total)


CALLS: dict[str, Callable[..., Any]] = {
    "eigsh": lambda A, **kw: hf.eigsh(A, k=3, **kw),
    "lambda_max": lambda A, **kw: hf.lambda_max(A, **kw),
    "power_iteration": lambda A, **kw: hf.power_iteration(A, **kw),
    "spectral_density": lambda A, **kw: hf.spectral_density(A, 4, 12, **kw),
    "trace": lambda A, **kw: hf.trace(A, 30, **kw),
    "diagonal": lambda A, **kw: hf.diagonal(A, 30, **kw),
    "condition_number": lambda A, **kw: hf.condition_number(A, **kw),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_bar_counts_every_product_and_only_with_progress(name: str, capsys) -> None:
    A = _op(shift=0.3 if name == "condition_number" else 0.0)
    mv0 = A.num_matvecs
    CALLS[name](A, progress=True)
    spent = A.num_matvecs - mv0
    err = capsys.readouterr().err
    assert spent > 0
    assert err.count(f"{name}:") >= 1 and "products" in err
    done, total = _final_count(err)
    assert done == spent and total == spent  # finished: the count is shown as 100%
    CALLS[name](A, progress=False)
    assert capsys.readouterr().err == ""
    CALLS[name](A)  # auto: stderr is pytest's capture, not a terminal
    assert capsys.readouterr().err == ""


def test_nested_calls_show_one_bar(capsys) -> None:
    A = _op(shift=0.3)
    hf.condition_number(A, density=True, progress=True)  # eigsh x2 and SLQ inside
    err = capsys.readouterr().err
    assert "condition_number:" in err
    assert "eigsh:" not in err and "spectral_density:" not in err
    # a silent outer call silences the inner ones too, even when they would show
    with track(A, "outer", enabled=False):
        hf.eigsh(A, k=2, progress=True)
    assert capsys.readouterr().err == ""


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_follows_terminal_and_env(monkeypatch) -> None:
    A = _op()
    fake = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    monkeypatch.delenv("HESSFAST_PROGRESS", raising=False)
    hf.eigsh(A, k=2)
    assert "eigsh:" in fake.getvalue()  # auto on a terminal: a bar
    fake.seek(0)
    fake.truncate()
    monkeypatch.setenv("HESSFAST_PROGRESS", "0")
    hf.eigsh(A, k=2)
    assert fake.getvalue() == ""
    hf.eigsh(A, k=2, progress=True)  # an explicit True wins over the environment
    assert "eigsh:" in fake.getvalue()


def test_env_one_forces_bar_without_terminal(monkeypatch, capsys) -> None:
    monkeypatch.setenv("HESSFAST_PROGRESS", "1")
    hf.trace(_op(), 20)
    assert _final_count(capsys.readouterr().err)[0] == 20


@pytest.mark.parametrize("name", ["eigsh", "trace", "spectral_density", "power_iteration"])
def test_results_identical_with_and_without_bar(name: str, capsys) -> None:
    A = _op()
    a = CALLS[name](A, progress=True, seed=3)
    b = CALLS[name](A, progress=False, seed=3)
    for x, y in ((a, b),):
        for field in ("eigenvalues", "value", "nodes", "weights", "eigenvalue"):
            if hasattr(x, field):
                u, v = getattr(x, field), getattr(y, field)
                assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v
    assert a.num_matvecs == b.num_matvecs


def test_without_tqdm_runs_silently(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    A = _op()
    r = hf.eigsh(A, k=2, progress=True)
    assert capsys.readouterr().err == ""
    assert r.status == "CONVERGED"
    ref = torch.linalg.eigvalsh(A.to_dense().double())
    assert torch.allclose(r.eigenvalues, ref.flip(0)[:2], rtol=1e-6)


def test_bad_progress_named_and_free() -> None:
    A = _op()
    with pytest.raises(ArgumentTypeError, match="progress must be True, False or None"):
        hf.eigsh(A, k=2, progress="yes")
    with pytest.raises(ArgumentTypeError, match="progress"):
        hf.trace(A, 10, progress=1)
    assert A.num_matvecs == 0


def test_track_counts_products_of_operators_made_inside(capsys) -> None:
    """A dense tensor is wrapped inside the call; its products still reach the bar."""
    M, _ = spectra.wishart(40)
    r = hf.trace(M, 12, method="hutchinson", progress=True)
    assert _final_count(capsys.readouterr().err)[0] == r.num_matvecs == 12


def test_set_total_outer_plan_wins(capsys) -> None:
    A = _op()
    with track(A, "outer", total=None, enabled=True):
        set_total(50)
        set_total(999)  # an inner call's budget does not replace the plan
        A.matmat(torch.randn(3, A.shape[0], dtype=A.dtype))
    err = capsys.readouterr().err
    assert "/50 [" in err and "/999" not in err
    assert _final_count(err) == (3, 3)  # finished early: shown as 100%
