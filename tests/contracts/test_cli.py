"""The command line: ``hessfast info`` reports honestly, ``hessfast demo`` writes a checked
report of a CNN trained on scikit-learn's digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import hessfast as hf
from hessfast import _native
from hessfast._cli_demo import train_demo_model
from hessfast.cli import demo, info, main
from hessfast.kernels import _triton


def test_info_reports_native_module_and_backends(capsys) -> None:
    data = info()
    assert data["native_loaded"] == _native.available()
    assert data["native_error"] == _native.IMPORT_ERROR
    assert set(data["ops"]) >= {"basis_dot", "basis_update", "reorthogonalize"}
    assert main(["info", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["hessfast"] == hf.__version__


def test_info_cuda_rows_do_not_contradict_themselves(capsys) -> None:
    """Without a CUDA device, each op's cuda entry says nothing runs there, and why (it used
    to say 'selected reference' beside 'no CUDA device visible')."""
    data = info()
    for op in ("basis_dot", "basis_update", "reorthogonalize"):
        cuda = data["ops"][op]["cuda"]
        if torch.cuda.is_available():
            assert cuda["selected"] in ("native", "reference", "triton")
        else:
            assert cuda["selected"] == "none" and "no CUDA device visible" in cuda["why"]
            assert data["ops"][op]["cpu"]["selected"] in ("native", "reference")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    cuda_rows = [line for line in out.splitlines()
                 if line.split()[:2] in (["basis_dot", "cuda"], ["basis_update", "cuda"],
                                         ["reorthogonalize", "cuda"])]
    assert len(cuda_rows) == 3
    if not torch.cuda.is_available():
        assert all("reference" not in row and "none" in row for row in cuda_rows)


def test_demo_writes_the_report_checked_against_eigsh(tmp_path) -> None:
    """`hessfast demo` as a subprocess: report.json (also printed with --json) and a PNG with
    lambda_max, top-5, trace, density, condition and per-layer results; lambda_max agrees
    with hf.eigsh on the same CNN trained here with the same seed and steps."""
    out = tmp_path / "demo"
    env = dict(os.environ, HESSFAST_PROGRESS="0", MPLBACKEND="Agg")
    argv = ["demo", "--steps", "40", "--seed", "3", "--num-probes", "2", "--density-steps", "12",
            "--json", "--out", str(out)]
    res = subprocess.run([sys.executable, "-m", "hessfast", *argv], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert json.loads(res.stdout) == report
    assert (out / "spectrum.png").read_bytes()[:4] == b"\x89PNG"
    assert len(report["top_eigenvalues"]) == 5 and report["top_converged"]
    assert report["trace"] is not None and report["density"] is not None
    assert "condition" in report and report["definiteness"] != "unknown"
    assert [g["name"] for g in report["per_layer"]] == ["conv1", "conv2", "fc"]
    model, batches, figures = train_demo_model(seed=3, steps=40)
    assert report["n"] == figures["num_params"] == sum(p.numel() for p in model.parameters())
    H = hf.hessian(model, torch.nn.CrossEntropyLoss(), batches)
    lam = hf.eigsh(H, k=1, which="LA", tol=1e-6).eigenvalues[0].item()
    assert report["lambda_max"] == pytest.approx(lam, rel=1e-3)
    assert report["stable_lr"] == pytest.approx(2 / report["lambda_max"])


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--steps", "-5"], "steps (training steps) must be a non-negative integer"),
        (["--tol", "0"], "tol must be a number in (0, 1)"),
        (["--tol", "nan"], "tol must be a number in (0, 1)"),
        (["--seed", "-1"], "seed must be an integer"),
        (["--k", "0"], "k must be a positive integer"),
        (["--density-steps", "0"], "density-steps (Lanczos steps per probe) must be a positive"),
        (["--num-probes", "-2"], "argument --num-probes: num-probes must be a positive integer"),
        (["--probes", "-2"], "num-probes must be a positive integer"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"],
         "is not available here"),
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
    monkeypatch.setattr(_triton, "_failure", ImportError("simulated"))
    assert ce.backend_report()["cuda"]["selected"] == "torch"
    assert "pip install triton" in ce.backend_report()["cuda"]["why"]
    monkeypatch.setattr(_triton, "_failure", None)
    assert ce.backend_report()["cuda"]["selected"] == "triton"
    monkeypatch.setenv("HESSFAST_CE_BACKEND", "torch")
    assert ce.backend_report()["cuda"] == {"selected": "torch", "why": "HESSFAST_CE_BACKEND=torch"}


def test_info_and_both_dispatchers_ask_one_triton_rule(monkeypatch) -> None:
    """hessfast info, ops (HESSFAST_BACKEND) and ce_backend (HESSFAST_CE_BACKEND) all answer
    "is Triton here?" from kernels/_triton.py's cached import_error()."""
    import hessfast.kernels.ce_curvature as ce
    from hessfast import ops

    monkeypatch.setattr(_triton, "_failure", ImportError("simulated"))
    data = info()
    assert data["triton"] is None and data["triton_error"] == "ImportError: simulated"
    assert not _triton.available()
    reasons = ops.backend_report()["_triton"]["not_supported_reasons"]
    assert all("simulated" in reasons[op]["cuda"][0] for op in ops.OPS)
    monkeypatch.setenv("HESSFAST_CE_BACKEND", "triton")
    with pytest.raises(hf.errors.BackendUnavailableError, match="does not import"):
        ce.ce_backend(torch.device("cuda"))
    monkeypatch.setattr(_triton, "_failure", _triton._UNTRIED)  # asked afresh: tried once
    first = _triton.import_error()
    assert _triton._failure is not _triton._UNTRIED and _triton.import_error() == first
    assert (info()["triton"] is None) == (first is not None)
