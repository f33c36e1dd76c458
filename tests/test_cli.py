"""The command line: ``hessfast info`` reports honestly, ``hessfast demo`` gives a checked
lambda_max."""

from __future__ import annotations

import json
import sys

import pytest

import hessfast as hf
from hessfast import _native
from hessfast.cli import demo, info, main


def test_info_reports_native_module_and_backends(capsys) -> None:
    data = info()
    assert data["native_loaded"] == _native.available()
    assert data["native_error"] == _native.IMPORT_ERROR
    assert set(data["ops"]) >= {"basis_dot", "basis_update", "reorthogonalize"}
    assert main(["info", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["hessfast"] == hf.__version__


def test_demo_lambda_max_matches_lanczos(capsys, monkeypatch) -> None:
    # the quickstart's first command runs in an environment with hessfast's dependencies only
    monkeypatch.setitem(sys.modules, "sklearn", None)  # any import of sklearn now fails
    res = demo(steps=30, tol=1e-6)
    assert res["converged"] and res["relative_residual"] <= 1e-6
    assert res["num_matvecs"] == res["data_passes"]  # power iteration: one vector per pass
    assert res["stable_lr_bound"] == pytest.approx(2 / res["lambda_max"])
    # the same operator through block Lanczos: the same top eigenvalue, fewer products
    assert res["lanczos_converged"]
    assert res["lanczos_lambda_max"] == pytest.approx(res["lambda_max"], rel=1e-5)
    assert res["lanczos_num_matvecs"] < res["num_matvecs"]
    assert res["num_samples"] == 1797 and res["num_batches"] == 4
    assert main(["demo", "--steps", "30", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lambda_max"] == pytest.approx(res["lambda_max"], rel=1e-4)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--steps", "-5"], "steps (training steps) must be a non-negative integer"),
        (["--tol", "0"], "tol must be a number in (0, 1)"),
        (["--tol", "nan"], "tol must be a number in (0, 1)"),
        (["--seed", "-1"], "seed must be an integer"),
        (["--device", "cuda:7"], "is not available here"),
        (["--device", "gpu"], "is not a torch device name"),
    ],
)
def test_demo_bad_arguments_are_usage_errors(argv, fragment, capsys) -> None:
    """A bad demo argument is a usage error naming it (exit status 2), not a traceback."""
    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "usage: hessfast demo" in err and "Traceback" not in err


def test_demo_function_refuses_bad_arguments() -> None:
    with pytest.raises(hf.errors.ConfigurationError, match="steps"):
        demo(steps=-1)
    with pytest.raises(hf.errors.ConfigurationError, match="device"):
        demo(device="meta")


def test_info_reports_the_ce_curvature_backend(monkeypatch) -> None:
    """hessfast info says which implementation the CE curvature product uses, and why."""
    import hessfast.kernels.ce_curvature as ce

    data = info()
    assert data["ce_curvature"]["cpu"]["selected"] == "torch"
    if not ce.torch.cuda.is_available():
        assert data["ce_curvature"]["cuda"] == {"selected": "none", "why": "no CUDA device visible"}
    monkeypatch.setattr(ce.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ce, "triton_available", lambda: False)
    assert ce.backend_report()["cuda"]["selected"] == "torch"
    assert "pip install triton" in ce.backend_report()["cuda"]["why"]
    monkeypatch.setattr(ce, "triton_available", lambda: True)
    assert ce.backend_report()["cuda"]["selected"] == "triton"
    monkeypatch.setenv("HESSFAST_CE_BACKEND", "torch")
    assert ce.backend_report()["cuda"] == {"selected": "torch", "why": "HESSFAST_CE_BACKEND=torch"}
