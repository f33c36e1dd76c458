"""``hessfast analyze`` as a subprocess: the report files it writes, checked against hessfast's
own eigensolver on the same model, and every kind of bad argument or failing user code, with
its exit status (2 bad argument, 3 user code raised, 1 hessfast error) and message."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import hessfast as hf
from hessfast._cli_load import (
    UsageError,
    expand_checkpoints,
    load_checkpoint,
    strip_wrapper_prefixes,
)
from hessfast.cli import _parser, info, main
from hessfast.density.result import MIN_STEPS

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

    def interrupting_model():
        raise KeyboardInterrupt  # what Ctrl-C raises wherever the run is

    def long_names_model():
        from collections import OrderedDict

        torch.manual_seed(0)  # the CLI's process: the global RNG is the user's to draw
        return nn.Sequential(OrderedDict([
            ("input_projection_of_the_encoder_block", nn.Linear(4, 6)),
            ("activation", nn.Tanh()),
            ("classification_head_of_the_decoder", nn.Linear(6, 3)),
        ]))

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
    (["--lr", "0"], "argument --lr: lr (the training learning rate) must be a positive finite"),
    (["--lr", "nan"], "lr (the training learning rate) must be a positive finite number"),
    (["--lr=-inf"], "lr (the training learning rate) must be a positive finite number"),
    (["--workers", "0"], "argument --workers: workers must be a positive integer"),
    (["--workers", "2"], "argument --workers: --workers spreads several checkpoints over"),
    (["--checkpoint", "ckpts/*.pt"], "argument --checkpoint: 'ckpts/*.pt' matches no file"),
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


# ---------------------------------------------------------------------------------------------
# issue 19: --k above n, --lr, provenance, wrapped checkpoints, globs, Ctrl-C, a closed pipe,
# the summary's width, too few density steps
# ---------------------------------------------------------------------------------------------


def _in_process(work: Path, argv: list[str], monkeypatch) -> int:
    """main(argv) in this process, from ``work`` (usermod importable), as a user runs it."""
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [str(work), *sys.path])
    try:
        return main(argv)
    finally:
        sys.modules.pop("usermod", None)


FAST = ["--k", "1", "--num-probes", "2", "--num-steps", "24", "--no-per-layer", "--quiet"]


def test_k_above_n_is_a_usage_error_naming_k_and_n(work: Path, capsys, monkeypatch) -> None:
    """--k more than the parameters (all, or those --params selects) exits 2 before any
    product, naming --k, k and n (it used to exit 1 from analyze's ConfigurationError)."""
    model = _model_and_data(work).make_model()
    n = sum(p.numel() for p in model.parameters())
    last = sum(p.numel() for name, p in model.named_parameters() if name.startswith("2."))
    for extra, count, what in (([], n, "the model's"), (["--params", r"^2\."], last,
                                                        "the")):
        with pytest.raises(SystemExit) as exc:
            _in_process(work, _args(["--k", str(count + 1), *extra]), monkeypatch)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert (f"argument --k: k={count + 1} is more than {what} {count} parameters"
                in err), err
        assert f"(n); use --k <= {count}" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:  # the demo's model too
        main(["demo", "--k", "100000"])
    assert exc.value.code == 2 and "argument --k: k=100000 is more than the demo model's" in (
        capsys.readouterr().err)


def test_lr_and_provenance_reach_report_json(work: Path, capsys, monkeypatch) -> None:
    """--lr reaches report.lr (the summary compares 2/lr); report.json's provenance says
    which command, specs, parameters, device and checkpoint (path, SHA-256) made it, so the
    reports of two checkpoints differ there."""
    usermod = _model_and_data(work)
    reports = []
    for seed in (5, 6):
        torch.save(usermod.make_model(seed=seed).state_dict(), work / f"ck{seed}.pt")
        argv = _args(["--checkpoint", f"ck{seed}.pt", "--lr", "0.25", "--params", r"^2\.",
                      "--out", f"rep{seed}", *FAST])
        assert _in_process(work, argv, monkeypatch) == 0
        out = capsys.readouterr().out
        assert "lr (given); 2/lr" in out and "0.25; 8" in out
        reports.append(json.loads((work / f"rep{seed}" / "report.json").read_text()))
        prov = reports[-1]["provenance"]
        assert reports[-1]["lr"] == 0.25
        assert prov["command"] == shlex.join(["hessfast", *argv])
        assert (prov["model_spec"], prov["data_spec"], prov["loss_spec"]) == (
            "usermod:make_model", "usermod:make_data", "ce")
        assert prov["params"] == r"^2\." and prov["device"] == "cpu"
        digest = hashlib.sha256((work / f"ck{seed}.pt").read_bytes()).hexdigest()
        assert prov["checkpoint"] == {"path": str((work / f"ck{seed}.pt").resolve()),
                                      "sha256": digest, "stripped_prefixes": []}
    a, b = (r["provenance"] for r in reports)
    assert a["checkpoint"]["sha256"] != b["checkpoint"]["sha256"] and a != b
    assert reports[0]["lambda_max"] != reports[1]["lambda_max"]


def test_wrapped_checkpoints_load_as_the_plain_one(work: Path, capsys, monkeypatch) -> None:
    """DDP's module., torch.compile's _orig_mod. (both, either order) on every key: removed,
    the weights loaded as the plain checkpoint's; the command says so in one note line and
    its report equals the plain checkpoint's."""
    usermod = _model_and_data(work)
    state = usermod.make_model(seed=5).state_dict()
    for prefix in ("", "module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        torch.save({"state_dict": {prefix + k: v for k, v in state.items()}}, work / "w.pt")
        model = usermod.make_model(seed=0)
        removed = load_checkpoint(model, str(work / "w.pt"), "cpu")
        assert "".join(removed) == prefix
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    lam = {}
    for prefix in ("", "module._orig_mod."):
        torch.save({"state_dict": {prefix + k: v for k, v in state.items()}}, work / "w.pt")
        argv = _args(["--checkpoint", "w.pt", "--json", "--out", "rep", *FAST])
        assert _in_process(work, argv, monkeypatch) == 0
        captured = capsys.readouterr()
        report = json.loads(captured.out)
        lam[prefix] = report["lambda_max"]
        removed = report["provenance"]["checkpoint"]["stripped_prefixes"]
        assert "".join(removed) == prefix
        notes = [line for line in captured.err.splitlines() if "note:" in line]
        assert len(notes) == (1 if prefix else 0)
        if prefix:
            assert repr(prefix) in notes[0] and "w.pt" in notes[0]
    assert lam[""] == lam["module._orig_mod."]


def test_strip_wrapper_prefixes_only_when_the_keys_then_match() -> None:
    own = ["fc.weight", "fc.bias"]
    t = torch.zeros(1)
    plain = {"fc.weight": t, "fc.bias": t}
    assert strip_wrapper_prefixes(plain, own) == (plain, [])
    got, removed = strip_wrapper_prefixes({"model.fc.weight": t, "model.fc.bias": t}, own)
    assert list(got) == own and removed == ["model."]  # Lightning's attribute: the same rule
    partial = {"module.fc.weight": t, "module.fc.bias": t, "module.extra": t}
    assert strip_wrapper_prefixes(partial, own) == (partial, [])  # no match: unchanged
    mixed = {"module.fc.weight": t, "fc.bias": t}  # not shared by every key
    assert strip_wrapper_prefixes(mixed, own) == (mixed, [])
    assert strip_wrapper_prefixes({}, own) == ({}, [])


def test_checkpoint_mismatch_is_short_with_a_hint(work: Path) -> None:
    """Another architecture's checkpoint (60 keys): the counts, at most 5 keys of each kind,
    and what the keys suggest; a DDP prefix that does not help is named."""
    keys = {f"encoder.layers.{i}.weight": torch.zeros(2) for i in range(60)}
    torch.save({f"module.{k}": v for k, v in keys.items()}, work / "other.pt")
    res = _run(["analyze", "--model", "usermod:make_model", "--data", "usermod:make_data",
                "--checkpoint", "other.pt"], work)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    err = res.stderr.split("error: ", 1)[1]
    assert "60 tensors in the checkpoint, 4 in the model, 0 names in common" in err
    assert "(60 in all)" in err and len(re.findall(r"encoder\.layers\.\d+\.weight", err)) == 5
    assert "the checkpoint's keys start with 'module.', the model's with '0.', '2.'" in err
    assert "does the model of --model build the architecture the checkpoint was saved from?" in err
    assert "shared prefix 'module.encoder.layers.' was not removed" in err
    assert len(err) < 700


def test_checkpoint_globs_expand_sorted_and_several_go_to_the_batch_runner(
        work: Path, capsys, monkeypatch) -> None:
    """--checkpoint takes files and globs (sorted, a file named twice kept once); one file
    runs the single analysis, several (or --workers > 1) are handed to _cli_batch.run_batch
    with the parsed arguments."""
    usermod = _model_and_data(work)
    (work / "ckpts").mkdir()
    for step in (30, 10, 20):
        torch.save(usermod.make_model(seed=step).state_dict(), work / "ckpts" / f"s{step}.pt")
    monkeypatch.chdir(work)
    got = expand_checkpoints(["ckpts/s*.pt", "ckpts/s10.pt", "ckpts/s3?.pt"])
    assert got == [f"ckpts/s{s}.pt" for s in (10, 20, 30)]
    assert expand_checkpoints(["missing.pt"]) == ["missing.pt"]  # refused when loaded
    with pytest.raises(UsageError, match="'ckpts/\\*.bin' matches no file"):
        expand_checkpoints(["ckpts/s1*.pt", "ckpts/*.bin"])
    calls = []
    fake = types.ModuleType("hessfast._cli_batch")
    fake.run_batch = lambda args, paths: calls.append((args, paths)) or 0
    monkeypatch.setitem(sys.modules, "hessfast._cli_batch", fake)
    argv = _args(["--checkpoint", "ckpts/s1*.pt", "--out", "one", *FAST])
    assert _in_process(work, argv, monkeypatch) == 0 and calls == []  # one file: the single run
    report = json.loads((work / "one" / "report.json").read_text())
    assert report["provenance"]["checkpoint"]["path"] == str(work / "ckpts" / "s10.pt")
    capsys.readouterr()
    argv = _args(["--checkpoint", "ckpts/*.pt", "--workers", "2", "--lr", "0.1", *FAST])
    assert _in_process(work, argv, monkeypatch) == 0
    argv = _args(["--checkpoint", "ckpts/s20.pt", "--workers", "3", *FAST])
    assert _in_process(work, argv, monkeypatch) == 0
    (args, paths), (args1, paths1) = calls
    assert paths == [f"ckpts/s{s}.pt" for s in (10, 20, 30)] and paths1 == ["ckpts/s20.pt"]
    assert (args.workers, args.lr, args.k, args1.workers) == (2, 0.1, 1, 3)
    for name in ("model", "data", "loss", "params", "curvature", "steps", "no_per_layer", "tol",
                 "seed", "k", "probes", "out", "json", "quiet", "debug", "device", "lr",
                 "workers", "command_line"):
        assert hasattr(args, name), name


def test_ctrl_c_is_one_line_and_exit_130(work: Path, capsys, monkeypatch) -> None:
    res = _run(_args(["--model", "usermod:interrupting_model"]), work)
    assert res.returncode == 130
    assert res.stderr == "hessfast analyze: interrupted\n"
    assert _in_process(work, _args(["--model", "usermod:interrupting_model", "--debug"]),
                       monkeypatch) == 130
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyboardInterrupt" in err
    assert err.endswith("hessfast analyze: interrupted\n")


@pytest.mark.parametrize("argv", [["info"], ["analyze", "--json", *FAST]])
def test_a_closed_stdout_exits_quietly(work: Path, argv: list[str]) -> None:
    """`hessfast ... | head` once head has gone: exit 141, nothing on stderr (it was a
    BrokenPipeError traceback). The pipe's reader is closed before the command starts."""
    if argv[0] == "analyze":
        argv = _args(argv[1:])
    read, write = os.pipe()
    os.close(read)
    env = dict(os.environ, HESSFAST_PROGRESS="0", MPLBACKEND="Agg")
    try:
        res = subprocess.run([sys.executable, "-m", "hessfast", *argv], cwd=work, env=env,
                             stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert res.returncode == 141, res.stderr
    assert res.stderr == ""


def test_summary_lines_fit_100_columns(work: Path, capsys, monkeypatch) -> None:
    """A real report's summary (long group names, a top-12 list, the parts' sources): every
    line at most 100 characters, the sources' words all there, report.json's whole."""
    argv = _args(["--model", "usermod:long_names_model", "--k", "12", "--num-probes", "3",
                  "--num-steps", "24", "--quiet", "--lr", "0.5", "--out", "wide"])
    assert _in_process(work, argv, monkeypatch) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    report = json.loads((work / "wide" / "report.json").read_text())
    sources = [p["source"] for p in report["parts"]]
    assert max(len(s) for s in sources) > 100  # so the test wraps something
    flat = "".join(out.split())  # a source continues alone on its next lines
    for text in [*sources, report["condition_note"]]:
        assert "".join(text.split()) in flat, text
    lines = out.splitlines()
    names = [g["name"] for g in report["per_layer"]]
    assert names[0] == "input_projection_of_the_encoder_block"
    for name in names:  # the group column: a long name continues after an underscore
        i = next(i for i, line in enumerate(lines) if line.startswith("  " + name[:12]))
        first, rest = lines[i].split()[0], lines[i + 1].split()[0]
        assert first + rest == name and first.endswith("_"), (first, rest)


def test_too_few_density_steps_warn_in_one_line_naming_the_option(work: Path) -> None:
    res = _run(_args(["--k", "1", "--num-probes", "2", "--num-steps", "1", "--no-per-layer",
                      "--json", "--out", "few"]), work)
    assert res.returncode == 0, res.stderr
    warned = [line for line in res.stderr.splitlines() if "Lanczos step" in line]
    assert len(warned) == 1
    assert warned[0].startswith("hessfast analyze: warning: spectral_density: 1 Lanczos step")
    assert f"--num-steps {MIN_STEPS}" in warned[0] and "Traceback" not in res.stderr
