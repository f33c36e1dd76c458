"""analyze_checkpoints and `hessfast analyze --checkpoint A B C --workers N` (issue 19): one
line per checkpoint in runs.jsonl with numbers checked against a dense Hessian, real spawned
worker processes, resume without a single model built, a killed worker that loses only its
checkpoint, warm starts, torchrun-style rank shares and the evolution figure."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import batch_models as bm
import pytest
import torch

from hessfast.analysis.batch import (
    Loader,
    analyze_checkpoints,
    checkpoint_step,
    find_checkpoints,
)
from hessfast.analysis.evolution import append_line, plot_evolution, read_runs
from hessfast.cli import main
from hessfast.errors import ArgumentTypeError, ConfigurationError
from hessfast.testing import dense_hessian_reference

pytestmark = pytest.mark.usefixtures("single_thread")

HELPER = str(Path(bm.__file__).resolve())
STEPS = (0, 5, 10)
# small and fast: the density's 24 steps are above the few-steps warning at n = 75
FAST = dict(k=2, num_probes=2, num_steps=24, per_layer=False)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> list[Path]:
    """Three checkpoints of a short SGD run, saved three ways, named so that the name order
    (ckpt_000000, ckpt_000010, run_b) is not the step order (0, 5, 10)."""
    folder = tmp_path_factory.mktemp("ckpts")
    model, (batch,) = bm.make_model(), bm.make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    done, paths = 0, []
    for i, step in enumerate(STEPS):
        while done < step:
            opt.zero_grad()
            bm.loss(model, batch).backward()
            opt.step()
            done += 1
        model.tag.fill_(i)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if step == 5:  # the step only in the contents: the name has no integer
            path, obj = folder / "run_b.pt", {"state_dict": state, "global_step": step}
        elif step == 10:
            path, obj = folder / f"ckpt_{step:06d}.pt", {"model": state}
        else:
            path, obj = folder / f"ckpt_{step:06d}.pt", state
        torch.save(obj, path)
        paths.append(path)
    return paths


@pytest.fixture
def env(tmp_path, monkeypatch) -> dict[str, Path]:
    """The counter and marker files of batch_models, in the environment the workers inherit."""
    files = {"counter": tmp_path / "made.txt", "marker": tmp_path / "marker.txt"}
    monkeypatch.setenv("HF_BATCH_COUNTER", str(files["counter"]))
    monkeypatch.setenv("HF_BATCH_MARKER", str(files["marker"]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    return files


def _dense_lambda_max(path: Path) -> float:
    model = bm.make_model()
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state.get("state_dict") or state.get("model") or state)
    H = dense_hessian_reference(model, bm.loss, bm.make_data())
    return float(torch.linalg.eigvalsh(H)[-1])


def _check_line(line: dict, path: Path) -> None:
    """An ok line whose lambda_max is the dense Hessian's within its own residual and whose
    trace is finite."""
    assert line["status"] == "ok", line["error"]
    ref = _dense_lambda_max(path)
    assert abs(line["lambda_max"] - ref) <= line["report"]["lambda_max_residual"] + 1e-9 * ref
    assert math.isfinite(line["trace"])
    assert line["report"]["provenance"]["checkpoint"] == {"path": str(path),
                                                          "sha256": line["sha256"]}
    assert line["report"]["provenance"]["step"] == line["step"]


def _bytes(out: Path) -> tuple[bytes, bytes]:
    return (out / "runs.jsonl").read_bytes(), (out / "evolution.png").read_bytes()


# -- the two Done-when items ------------------------------------------------------------------
def test_three_checkpoints_two_workers_then_a_resume_that_computes_nothing(ckpts, env,
                                                                          tmp_path):
    out = tmp_path / "out"
    lines = analyze_checkpoints(bm.make_model, bm.loss, bm.make_data(), [str(p) for p in ckpts],
                                out=out, workers=2, progress=False, **FAST)
    assert [ln["step"] for ln in lines] == list(STEPS)
    assert len(read_runs(out / "runs.jsonl")) == 3
    for line, path in zip(lines, ckpts, strict=True):
        _check_line(line, path)
    built = bm.count(env["counter"])
    assert built >= 1  # the workers built their models (in their own processes)
    before = _bytes(out)
    again = analyze_checkpoints(bm.make_model, bm.loss, bm.make_data(),
                                [str(p) for p in ckpts], out=out, workers=2, progress=False,
                                **FAST)
    assert bm.count(env["counter"]) == built  # no model built, so no product made
    assert _bytes(out) == before
    assert again == lines


def test_cli_three_checkpoints_two_workers_then_a_resume(ckpts, env, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["analyze", "--model", f"{HELPER}:make_model", "--data", f"{HELPER}:make_data",
            "--loss", f"{HELPER}:loss", "--checkpoint", *map(str, ckpts), "--workers", "2",
            "--k", "2", "--num-probes", "2", "--num-steps", "24", "--no-per-layer", "--quiet",
            "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}/runs.jsonl and {out}/evolution.png" in printed
    lines = read_runs(out)
    assert sorted(ln["step"] for ln in lines) == list(STEPS)
    for line in lines:
        _check_line(line, Path(line["path"]))
        assert line["report"]["provenance"]["model_spec"] == f"{HELPER}:make_model"
        assert f"step {line['step']:>2}" in printed
    built, before = bm.count(env["counter"]), _bytes(out)
    assert main(argv) == 0
    assert bm.count(env["counter"]) == built
    assert _bytes(out) == before


@pytest.mark.slow  # three worker processes start, on a busy 2-core machine 15-20 s
def test_a_killed_worker_loses_only_its_checkpoint_and_a_rerun_completes(ckpts, env,
                                                                         tmp_path):
    out = tmp_path / "out"
    env["marker"].write_text("kill 1")  # the worker that takes the step-5 checkpoint dies
    paths = [str(p) for p in ckpts]
    lines = analyze_checkpoints(bm.make_model, bm.loss, bm.make_data(), paths, out=out,
                                workers=2, progress=False, **FAST)
    assert [ln["status"] for ln in lines] == ["ok", "error", "ok"]
    assert "died (killed by SIGKILL) while analyzing" in lines[1]["error"]
    assert lines[1]["path"] == paths[1]
    env["marker"].unlink()
    again = analyze_checkpoints(bm.make_model, bm.loss, bm.make_data(), paths, out=out,
                                workers=1, progress=False, **FAST)
    record = read_runs(out)
    assert len(record) == 4 and record[-1]["status"] == "ok" and record[-1]["step"] == 5
    assert [ln["status"] for ln in again] == ["ok"] * 3
    _check_line(again[1], ckpts[1])


# -- failures inside a worker -----------------------------------------------------------------
def test_an_exception_is_recorded_on_its_line_and_the_others_complete(ckpts, env, tmp_path):
    env["marker"].write_text("raise 2")
    out = tmp_path / "out"
    lines = analyze_checkpoints(bm.make_model, bm.loss, bm.make_data(), ckpts, out=out,
                                progress=False, lr=0.5, **{**FAST, "per_layer": True})
    assert [ln["status"] for ln in lines] == ["ok", "ok", "error"]
    assert "the marked checkpoint (tag 2)" in lines[2]["error"]
    assert "ValueError" in lines[2]["traceback"]
    assert lines[2]["report"] is None and lines[2]["lambda_max"] is None
    # the figure: 2/lr drawn at its value, one per-layer line per group
    fig = plot_evolution(out / "runs.jsonl")
    ax, _, cx = fig.axes[:3]
    edge = [ln for ln in ax.get_lines() if (ln.get_label() or "").startswith("2/lr")]
    assert len(edge) == 1 and edge[0].get_ydata()[0] == pytest.approx(4.0)
    assert sorted(ln.get_label() for ln in cx.get_lines()) == ["fc1", "fc2"]
    assert list(cx.get_lines()[0].get_xdata()) == [0.0, 5.0]
    heat = fig.axes[3].collections[0].get_array()  # [eigenvalue grid, checkpoints]
    assert heat.shape == (300, 2) and float(heat.min()) > 0


def test_cli_names_a_failed_checkpoint_and_exits_1(ckpts, env, tmp_path, capsys):
    env["marker"].write_text("raise 0")
    out = tmp_path / "cli"
    argv = ["analyze", "--model", f"{HELPER}:make_model", "--data", f"{HELPER}:make_data",
            "--loss", f"{HELPER}:loss", "--checkpoint", str(ckpts[1]), str(ckpts[0]),
            "--k", "2", "--num-probes", "2", "--num-steps", "24", "--no-per-layer", "--quiet",
            "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"1 of 2 checkpoints failed:\n  {ckpts[0]}: LossCallError" in err
    assert "raised ValueError: the marked checkpoint (tag 0)" in err
    assert "rerun the same command to retry them" in err
    env["marker"].unlink()
    assert main(argv) == 0
    assert [ln["status"] for ln in read_runs(out)] == ["error", "ok", "ok"]


# -- warm starts, resume rules, ranks ---------------------------------------------------------
def test_warm_starts_agree_with_cold_starts(ckpts, env, tmp_path):
    warm = analyze_checkpoints(bm.make_model, bm.loss, bm.make_data(), ckpts,
                               out=tmp_path / "warm", progress=False, **FAST)
    cold = analyze_checkpoints(bm.make_model, bm.loss, bm.make_data(), ckpts,
                               out=tmp_path / "cold", warm_start=False, progress=False, **FAST)
    assert [ln["warm"] for ln in warm] == [False, True, True]
    assert [ln["warm"] for ln in cold] == [False, False, False]
    for w, c in zip(warm, cold, strict=True):
        bound = w["report"]["lambda_max_residual"] + c["report"]["lambda_max_residual"]
        assert abs(w["lambda_max"] - c["lambda_max"]) <= bound + 1e-12
        assert w["report"]["parts"][1]["warm"] is w["warm"]
    products = ([ln["top_k_matvecs"] for ln in warm], [ln["top_k_matvecs"] for ln in cold])
    print("top_k products warm", products[0], "cold", products[1])
    assert products[0][0] == products[1][0]  # the first checkpoint starts cold in both


def test_other_settings_are_not_done_and_error_lines_are_retried(ckpts, env, tmp_path):
    one = [str(ckpts[0])]
    analyze_checkpoints(bm.make_model, bm.loss, bm.make_data(), one, out=tmp_path,
                        progress=False, **FAST)
    built = bm.count(env["counter"])
    analyze_checkpoints(bm.make_model, bm.loss, bm.make_data(), one, out=tmp_path,
                        progress=False, **{**FAST, "k": 1})
    assert bm.count(env["counter"]) == built + 1
    record = read_runs(tmp_path)
    assert [ln["settings"]["analyze"]["k"] for ln in record] == [2, 1]


def test_torchrun_ranks_take_disjoint_shares_that_cover_every_checkpoint(ckpts, env, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    shares = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        before = len(read_runs(tmp_path))
        lines = analyze_checkpoints(bm.make_model, bm.loss, bm.make_data(), ckpts,
                                    out=tmp_path, progress=False, **FAST)
        shares.append([(ln["step"], ln["rank"]) for ln in read_runs(tmp_path)[before:]])
    assert shares == [[(0, 0), (10, 0)], [(5, 1)]]
    assert [ln["step"] for ln in lines] == list(STEPS)  # rank 1 reads rank 0's lines back
    with pytest.raises(ConfigurationError, match="workers=1"):
        analyze_checkpoints(bm.make_model, bm.loss, bm.make_data(), ckpts, out=tmp_path,
                            workers=2, progress=False, **FAST)


# -- checkpoints: steps, order, globs, refusals -----------------------------------------------
def test_steps_from_contents_and_names_and_the_order(ckpts, tmp_path):
    found = find_checkpoints([str(ckpts[2]), str(ckpts[0]), str(ckpts[1])])
    assert [(c.step, c.path) for c in found] == [(s, str(p)) for s, p in zip(STEPS, ckpts,
                                                                               strict=True)]
    assert find_checkpoints(str(ckpts[0].parent / "*.pt")) == found
    assert len({c.sha256 for c in found}) == 3
    state = torch.load(ckpts[0], weights_only=True)
    cases = {"checkpoint-50/model.pt": state, "epoch=3-step=1200.ckpt": state,
             "final.pt": state, "ckpt_000007.pt": {"state_dict": state, "step": 3},
             "last.pt": {"model": state, "epoch": 4, "iteration": 9}}
    for name, obj in cases.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        torch.save(obj, tmp_path / name)
    steps = {name: checkpoint_step(str(tmp_path / name)) for name in cases}
    assert steps == {"checkpoint-50/model.pt": 50, "epoch=3-step=1200.ckpt": 1200,
                     "final.pt": None, "ckpt_000007.pt": 3, "last.pt": 9}
    order = [Path(c.path).name for c in find_checkpoints(str(tmp_path / "**/*.*"))]
    assert order == ["ckpt_000007.pt", "last.pt", "model.pt", "epoch=3-step=1200.ckpt",
                     "final.pt"]


def test_bad_paths_and_arguments_are_refused_by_name(ckpts, env, tmp_path):
    run = dict(out=tmp_path, progress=False, **FAST)
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(ConfigurationError, match="nope.pt.*no such file"):
        analyze_checkpoints(bm.make_model, bm.loss, bm.make_data(), [str(ckpts[0]), missing],
                            **run)
    with pytest.raises(ConfigurationError, match="no checkpoints given"):
        analyze_checkpoints(bm.make_model, bm.loss, bm.make_data(), [], **run)
    with pytest.raises(ConfigurationError, match="no file matches"):
        analyze_checkpoints(bm.make_model, bm.loss, bm.make_data(), str(tmp_path / "*.bin"),
                            **run)
    with pytest.raises(ConfigurationError, match="is a folder"):
        analyze_checkpoints(bm.make_model, bm.loss, bm.make_data(), str(tmp_path), **run)
    with pytest.raises(ConfigurationError, match="make_model cannot be pickled.*module-level"):
        analyze_checkpoints(lambda: bm.make_model(), bm.loss, bm.make_data(), ckpts,
                            workers=2, **run)
    with pytest.raises(ArgumentTypeError, match="set by the batch"):
        analyze_checkpoints(bm.make_model, bm.loss, bm.make_data(), ckpts, v0=None, **run)
    with pytest.raises(ArgumentTypeError, match="unknown keyword"):
        analyze_checkpoints(bm.make_model, bm.loss, bm.make_data(), ckpts, num_prob=2, **run)
    with pytest.raises(ConfigurationError, match="returning a new nn.Module"):
        analyze_checkpoints(bm.make_model(), bm.loss, bm.make_data(), ckpts, **run)
    assert bm.count(env["counter"]) == 1  # only the call above built one: nothing ran
    assert not (tmp_path / "runs.jsonl").exists()


def test_a_loader_builds_the_problem_in_the_worker(ckpts, env, tmp_path):
    lines = analyze_checkpoints(_Doubled(), None, None, ckpts[:1], out=tmp_path,
                                progress=False, **FAST)
    assert lines[0]["settings"]["problem"] == {"loss": "doubled"}
    assert lines[0]["lambda_max"] == pytest.approx(2 * _dense_lambda_max(ckpts[0]), rel=1e-3)
    assert json.loads((tmp_path / "runs.jsonl").read_text())["report"]["provenance"][
        "loader"] == "doubled"


class _Doubled(Loader):
    """Twice the loss: the Loader's objects are the ones analyzed."""

    def model(self, device):
        return bm.make_model().to(device)

    def loss(self):
        return _twice

    def data(self):
        return bm.make_data()

    def describe(self):
        return {"loss": "doubled"}

    def provenance(self):
        return {"loader": "doubled"}


def _twice(model, batch):
    return 2 * bm.loss(model, batch)


def test_a_worker_that_cannot_rebuild_the_problem_is_explained(ckpts, env, tmp_path):
    with pytest.raises(ConfigurationError, match="could not start: worker 0: unpickling the "
                                                 "problem raised RuntimeError: not here.*"
                                                 "module level"):
        analyze_checkpoints(_Unpicklable(), None, None, ckpts[:1], out=tmp_path, workers=2,
                            progress=False, **FAST)
    assert bm.count(env["counter"]) == 0
    assert read_runs(tmp_path) == []


class _Unpicklable(_Doubled):
    """Pickles, but does not unpickle (as a function of an interactive session's __main__)."""

    def __reduce__(self):
        return _refuse, ()


def _refuse():
    raise RuntimeError("not here")


def test_concurrent_appends_never_interleave(tmp_path):
    path = tmp_path / "runs.jsonl"
    body = "x" * 65536  # larger than a pipe's atomic write

    def write(worker: int) -> None:
        for i in range(25):
            append_line(path, {"worker": worker, "i": i, "body": body})

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = read_runs(path)  # a torn line would be skipped with a warning
    assert sorted((ln["worker"], ln["i"]) for ln in lines) == [
        (w, i) for w in range(4) for i in range(25)]
    assert all(ln["body"] == body for ln in lines)
