"""``hessfast analyze`` as a subprocess: the report files it writes, checked against hessfast's
own eigensolver on the same model, and every kind of bad argument or failing user code, with
its exit status (2 bad argument, 3 user code raised, 1 hessfast error) and message."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import hessfast as hf
from hessfast.cli import _parser, info, main

USER_MODULE = textwrap.dedent(
    '''
    import torch
    from torch import nn

    def make_model(seed=0):
        g = torch.Generator().manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)
        return model

    MODEL = make_model(1)

    def _xy():
        g = torch.Generator().manual_seed(0)
        return torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)

    def make_data():
        X, y = _xy()
        return [(X[:24], y[:24]), (X[24:], y[24:])]

    def make_xy():
        return _xy()

    def broken_model():
        raise RuntimeError("factory exploded")

    def not_a_model():
        return 42

    def bad_loss(outputs, targets):
        raise ValueError("loss exploded")

    def bad_forward_model():
        class Bad(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 3)

            def forward(self, x):
                raise KeyError("forward exploded")

        return Bad()
    '''
)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HESSFAST_PROGRESS="0", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "hessfast", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    (tmp_path / "boom.py").write_text("raise ImportError('needs the package xyz')\n")
    return tmp_path


def _model_and_data(work: Path):
    sys.path.insert(0, str(work))
    try:
        import usermod
    finally:
        sys.path.remove(str(work))
        sys.modules.pop("usermod", None)
    return usermod


def test_analyze_writes_report_and_plot_that_match_eigsh(work: Path) -> None:
    """A checkpoint (under "model") is loaded: the report's lambda_max is that of the
    checkpoint's weights, computed independently here with hf.eigsh."""
    usermod = _model_and_data(work)
    weights = usermod.make_model(seed=5)
    torch.save({"model": weights.state_dict(), "epoch": 3}, work / "ck.pt")
    res = _run(["analyze", "--model", "usermod:make_model", "--data", "usermod:make_data",
                "--checkpoint", "ck.pt", "--k", "3", "--num-probes", "4", "--num-steps", "20",
                "--tol", "1e-6", "--out", "rep"], work)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    report = json.loads((work / "rep" / "report.json").read_text())
    png = (work / "rep" / "spectrum.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "report.json" in res.stdout
    H = hf.hessian(weights, nn.CrossEntropyLoss(), usermod.make_data())
    top = hf.eigsh(H, k=3, which="LA", tol=1e-8).eigenvalues
    assert report["n"] == sum(p.numel() for p in weights.parameters())
    assert report["top_eigenvalues"] == pytest.approx(top.tolist(), rel=1e-4)
    assert report["lambda_max"] == pytest.approx(float(top[0]), rel=1e-5)
    assert report["settings"]["k"] == 3 and report["per_layer"]  # per-layer on by default
    assert "lambda_max" in res.stdout and "per layer" in res.stdout  # the summary


def test_analyze_json_ggn_params_file_path_and_xy_data(work: Path) -> None:
    """A .py path, a module-level Module, an (X, y) tuple as one batch, --params, --json."""
    res = _run(["analyze", "--model", str(work / "usermod.py") + ":MODEL",
                "--data", "usermod:make_xy", "--curvature", "ggn", "--params", r"^2\.",
                "--k", "2", "--num-probes", "2", "--num-steps", "10", "--no-per-layer", "--json",
                "--quiet", "--out", str(work / "out2")], work)
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    assert printed == json.loads((work / "out2" / "report.json").read_text())
    assert printed["n"] == 6 * 3 + 3  # the last layer only
    assert printed["curvature"] == "GGN" and printed["per_layer"] is None


BAD_VALUES = [
    (["--model", "usermod"], "argument --model: expected MODULE:NAME"),
    (["--num-steps", "-5"],
     "argument --num-steps: num-steps (Lanczos steps per probe) must be a positive integer"),
    (["--steps", "-5"], "num-steps (Lanczos steps per probe) must be a positive integer"),
    (["--model", "nosuchmod:f"], "no module named 'nosuchmod'"),
    (["--model", "usermod:nothing"], "usermod has no attribute 'nothing'"),
    (["--model", "usermod:not_a_model"], "must be (or return) a torch.nn.Module, got int"),
    (["--model", "missing.py:f"], "'missing.py': no such file"),
    (["--loss", "hinge"], "argument --loss: expected ce, mse or MODULE:FN"),
    (["--tol", "0"], "tol must be a number in (0, 1)"),
    (["--tol", "nan"], "tol must be a number in (0, 1)"),
    (["--k", "0"], "k must be a positive integer"),
    (["--num-probes", "0"], "argument --num-probes: num-probes must be a positive integer"),
    (["--probes", "0"], "num-probes must be a positive integer"),
    (["--seed", "-1"], "seed must be an integer"),
    (["--device", "cuda:7"], "is not available here"),
    (["--device", "gpu"], "is not a torch device name"),
    (["--params", "nomatch"], "'nomatch' matches no trainable parameter (the model has: ['0."),
    (["--params", "("], "is not a regular expression"),
    (["--checkpoint", "nofile.pt"], "'nofile.pt': no such file"),
    (["--data", "usermod:not_a_model"], "must return batches"),
    (["--curvature", "fisher"], "invalid choice: 'fisher'"),
]


def _args(argv: list[str]) -> list[str]:
    args = ["analyze"]
    for key, value in (("--model", "usermod:make_model"), ("--data", "usermod:make_data")):
        if key not in argv:
            args += [key, value]
    return args + argv


@pytest.mark.parametrize(("argv", "fragment"), BAD_VALUES[:2])
def test_bad_arguments_exit_2_naming_them(work: Path, argv: list[str], fragment: str) -> None:
    res = _run(_args(argv), work)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert fragment in res.stderr and "usage: hessfast analyze" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(("argv", "fragment"), BAD_VALUES)
def test_bad_values_in_process(work: Path, argv, fragment, capsys, monkeypatch) -> None:
    """Every bad value, through main() in this process (the subprocess path is the same)."""
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [str(work), *sys.path])
    try:
        with pytest.raises(SystemExit) as exc:
            main(_args(argv))
    finally:
        sys.modules.pop("usermod", None)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "usage: hessfast analyze" in err and "Traceback" not in err


def test_num_probes_and_num_steps_with_their_deprecated_spellings(capsys) -> None:
    """--num-probes/--num-steps are the documented names; --probes/--steps still work for one
    release (hidden from --help), each use saying on stderr which name replaces it."""
    parser, subs = _parser()
    base = ["analyze", "--model", "m:f", "--data", "m:d"]
    args = parser.parse_args(base)
    assert (args.probes, args.steps) == (8, 64)
    assert capsys.readouterr().err == ""
    args = parser.parse_args([*base, "--num-probes", "3", "--num-steps", "7"])
    assert (args.probes, args.steps) == (3, 7) and capsys.readouterr().err == ""
    args = parser.parse_args([*base, "--probes", "3", "--steps", "7"])
    assert (args.probes, args.steps) == (3, 7)
    err = capsys.readouterr().err
    assert "--probes is deprecated and will be removed; use --num-probes" in err
    assert "--steps is deprecated and will be removed; use --num-steps" in err
    shown = subs["analyze"].format_help()
    assert "--num-probes N" in shown and "--num-steps N" in shown
    assert "--probes" not in shown and "--steps" not in shown
    demo = parser.parse_args(["demo", "--steps", "9", "--probes", "2"])  # --steps: training
    assert (demo.steps, demo.probes) == (9, 2)
    assert "use --num-steps" not in capsys.readouterr().err


def test_checkpoint_mismatch_lists_the_keys(work: Path) -> None:
    torch.save({"state_dict": {"0.weight": torch.zeros(6, 4), "extra.bias": torch.zeros(2)}},
               work / "bad.pt")
    res = _run(["analyze", "--model", "usermod:make_model", "--data", "usermod:make_data",
                "--checkpoint", "bad.pt"], work)
    assert res.returncode == 2
    assert "missing keys: 0.bias, 2.bias, 2.weight" in res.stderr
    assert "unexpected keys: extra.bias" in res.stderr and "Traceback" not in res.stderr


USER_FAILURES = [
    (["--model", "usermod:broken_model"],
     "usermod:broken_model() raised RuntimeError: factory exploded"),
    (["--model", "boom:f"], "importing boom raised ImportError: needs the package xyz"),
    (["--loss", "usermod:bad_loss"], "ValueError: loss exploded"),
    (["--model", "usermod:bad_forward_model"], "KeyError: 'forward exploded'"),
]


@pytest.mark.parametrize(("argv", "fragment"), USER_FAILURES[:3])
def test_user_code_failures_exit_3(work: Path, argv: list[str], fragment: str) -> None:
    res = _run(_args(argv), work)
    assert res.returncode == 3, res.stderr
    assert fragment in res.stderr and "Traceback" not in res.stderr
    if argv[0] == "--model":  # raised by the user's factory or module: one line
        assert len(res.stderr.strip().splitlines()) == 1 and "--debug" in res.stderr


@pytest.mark.parametrize(("argv", "fragment"), USER_FAILURES[3:])
def test_user_code_failures_in_process(work, argv, fragment, capsys, monkeypatch) -> None:
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [str(work), *sys.path])
    try:
        assert main(_args(argv)) == 3
    finally:
        sys.modules.pop("usermod", None)
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_debug_shows_the_traceback(work: Path) -> None:
    res = _run(["analyze", "--model", "usermod:broken_model", "--data", "usermod:make_data",
                "--debug"], work)
    assert res.returncode == 3
    assert "Traceback" in res.stderr and "factory exploded" in res.stderr


def test_version_and_no_command(tmp_path: Path, capsys, monkeypatch) -> None:
    """--version names the torch that hessfast runs with, as torch.__version__ says (build tag
    included: a CUDA wheel's pip metadata drops it), the same string as `hessfast info`."""
    want = (f"hessfast {hf.__version__} (torch {torch.__version__}, "
            f"python {platform.python_version()})")
    res = _run(["--version"], tmp_path)  # the installed hessfast, as a user runs it
    assert res.returncode == 0, res.stderr
    assert res.stdout == want + "\n"
    assert info()["torch"] == torch.__version__
    # read from the running torch, not from pip's metadata or a constant: a torch whose
    # version differs from the installed distribution's is named as it runs
    monkeypatch.setattr(torch, "__version__", "0.0.1+hessfast.test")
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == (
        f"hessfast {hf.__version__} (torch 0.0.1+hessfast.test, "
        f"python {platform.python_version()})\n")
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
