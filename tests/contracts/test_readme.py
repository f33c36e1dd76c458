"""The README's ```python examples run as written.

Each block is read from README.md by the heading it sits under and executed VERBATIM (the
text is compiled with README.md's own line numbers, so a traceback points at the README
line). The namespace supplies what the README leaves to the reader, as small real objects: a
tanh MLP with a cross-entropy loss and two uneven batches, vectors of the right size, an
operator ``H`` and a GGN ``G`` for the Spectrum block, token batches for the transformers
block (skipped without transformers). The values of the blocks' bare expression statements
(``H @ v``, ``H.shape`` ...) are recorded as they run, and the outputs are checked for sane
types, shapes and statuses. The torch.distributed block runs in 2 gloo processes with
torchrun's environment variables, and both ranks must equal one process on all the data.
Every block runs in a temporary folder (they write report.json, spectrum.png, run.pt).
A README edit that breaks an example, or a new ```python block without a test here, fails.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import hessfast as hf

README = Path(__file__).resolve().parents[2] / "README.md"

USE = "Use"
ANALYZE = "The whole picture in one call: `hf.analyze`"
LARGE = "Large models: transformers, memory, long runs"
DISTRIBUTED = "Several processes (torch.distributed)"
SPECTRUM = "Spectrum"
FSDP = "FSDP models (`fully_shard`)"
TESTED = {USE, ANALYZE, LARGE, DISTRIBUTED, SPECTRUM, FSDP}


def readme_blocks() -> dict[str, list[tuple[int, str]]]:
    """``{heading: [(first line number, code), ...]}`` of the README's ```python blocks,
    keyed by the nearest heading above each (text after the #'s)."""
    blocks: dict[str, list[tuple[int, str]]] = {}
    heading, lines = None, README.read_text(encoding="utf-8").splitlines()
    fence: str | None = None  # the language of the fenced block we are in
    start = 0
    for i, line in enumerate(lines, start=1):
        if fence is None:
            if line.startswith("```"):
                fence, start = line.strip()[3:].strip(), i + 1
            elif line.startswith("#"):  # a heading (a comment inside a fence is not one)
                heading = line.lstrip("#").strip()
        elif line.strip() == "```":
            if fence == "python":
                blocks.setdefault(str(heading), []).append(
                    (start, "\n".join(lines[start - 1:i - 1])))
            fence = None
    assert fence is None, f"README.md: the ```{fence} block at line {start - 1} is never closed"
    return blocks


class Recorded(dict):
    """The values of a block's bare expression statements, keyed by their source text."""


def run_block(heading: str, ns: dict[str, Any]) -> Recorded:
    """Executes the README block(s) under ``heading`` in ``ns``, verbatim; returns the values
    of its top-level expression statements (``"H @ v"`` -> the tensor)."""
    found = readme_blocks().get(heading)
    assert found, f"README.md has no ```python block under the heading {heading!r}"
    values = Recorded()
    ns["__readme_record__"] = values.__setitem__
    for first_line, code in found:
        tree = ast.parse("\n" * (first_line - 1) + code, filename=str(README))
        for i, stmt in enumerate(tree.body):
            if isinstance(stmt, ast.Expr):  # record the value; the expression itself unchanged
                key = ast.get_source_segment("\n" * (first_line - 1) + code, stmt)
                call = ast.Call(ast.Name("__readme_record__", ast.Load()),
                                [ast.Constant(key), stmt.value], [])
                tree.body[i] = ast.copy_location(ast.Expr(call), stmt)
        ast.fix_missing_locations(tree)
        exec(compile(tree, str(README), "exec"), ns)
    return values


# ---------------------------------------------------------------------------------------------
# small real objects for the names the README leaves to the reader
# ---------------------------------------------------------------------------------------------


def tiny_model() -> nn.Module:
    """A tanh MLP 8-16-4 (212 parameters), initialised from a fixed seed without touching the
    global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def tiny_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two fixed (inputs, targets) batches, 16 and 10 samples (an uneven last batch)."""
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(26, 8, generator=g), torch.randint(0, 4, (26,), generator=g)
    return [(X[:16], y[:16]), (X[16:], y[16:])]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Blocks run in a temporary folder, with progress bars off and a file-only plot backend;
    every figure they open is closed afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HESSFAST_PROGRESS", "0")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    yield tmp_path
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads (and spin-waiting slows a loaded machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def base_namespace() -> dict[str, Any]:
    return {"__name__": "readme", "torch": torch, "hf": hf}


# ---------------------------------------------------------------------------------------------
# the blocks
# ---------------------------------------------------------------------------------------------


def test_every_python_block_is_tested() -> None:
    headings = set(readme_blocks())
    assert headings == TESTED, (
        f"README.md's ```python blocks sit under {sorted(headings)}; this file tests "
        f"{sorted(TESTED)}: give a new or renamed block its test here"
    )


def test_cited_files_exist() -> None:
    """Every repository path the README cites in backticks (``bench/RESULTS.md``,
    ``hessfast/lanczos/restart.py``; a bare ``name.py`` is an example) exists."""
    root = README.parent
    cited = set(re.findall(r"`([\w./-]+(?:\.(?:py|md|log|sh|jsonl)|/))`", README.read_text()))
    tops = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    checked = 0
    for path in sorted(cited):
        if "/" not in path.rstrip("/"):
            where = root / "examples" / path if path.endswith(".py") else root / path
        elif path.split("/")[0] in tops:
            where = root / path
        else:
            continue  # an output path (hessfast-demo/report.json) or a placeholder
        assert where.exists(), f"README.md cites {path!r}, which is not at {where}"
        checked += 1
    assert checked >= 10, sorted(cited)


def test_use(in_tmp: Path) -> None:
    model, batches = tiny_model(), tiny_batches()
    n = n_params(model)
    g = torch.Generator().manual_seed(2)
    v, V = torch.randn(n, generator=g), torch.randn(3, n, generator=g)
    before = [p.detach().clone() for p in model.parameters()]
    ns = base_namespace() | {"model": model, "loader": batches, "v": v, "V": V}
    out = run_block(USE, ns)

    H = ns["H"]
    assert isinstance(H, hf.HessianOperator)
    assert out["H.shape"] == (n, n)
    Hv, HV = out["H @ v"], out["H.matmat(V)"]
    assert Hv.shape == (n,) and HV.shape == (3, n)
    assert torch.allclose(HV[0], H @ V[0], rtol=1e-4, atol=1e-6)
    parts = out["H.unflatten(v)"]
    assert list(parts) == [name for name, _ in model.named_parameters()]
    assert all(parts[name].shape == p.shape for name, p in model.named_parameters())
    mode, reason = out["H.hvp_mode, H.hvp_mode_reason"]
    assert mode in ("reuse_graph", "double_backward", "fwd_rev") and reason
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_analyze(in_tmp: Path) -> None:
    model, batches = tiny_model(), tiny_batches()
    ns = base_namespace() | {"model": model, "loss_fn": nn.CrossEntropyLoss(),
                             "data": batches}
    out = run_block(ANALYZE, ns)

    report = ns["report"]
    assert isinstance(report, hf.Report) and report.n == n_params(model)
    k = len(report.top_eigenvalues)
    assert k >= 1 and report.top_eigenvalues == sorted(report.top_eigenvalues, reverse=True)
    assert report.lambda_max == report.top_eigenvalues[0] > 0
    assert report.lambda_min is not None and report.lambda_min <= report.lambda_max
    assert report.trace is not None and report.density is not None
    assert [g["name"] for g in report.per_layer] == ["0", "2"]  # the two Linear layers
    assert (in_tmp / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((in_tmp / "report.json").read_text())["n"] == report.n
    again = out['hf.Report.from_json("report.json")']
    assert isinstance(again, hf.Report) and again.to_dict() == report.to_dict()


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not installed")
def test_large_models(in_tmp: Path) -> None:
    g = torch.Generator().manual_seed(3)

    def batch(lengths: list[int], seq: int = 8) -> dict[str, torch.Tensor]:
        """Token ids, right padding (attention_mask 0) and labels -100 at the padding."""
        ids = torch.randint(0, 1000, (len(lengths), seq), generator=g)
        mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask,
                "labels": ids.masked_fill(mask == 0, -100)}

    ns = base_namespace() | {"batches": [batch([8, 5]), batch([6, 8])]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the block initialises the GPT-2 from the global RNG
        run_block(LARGE, ns)

    model, H, G, plan, r = ns["model"], ns["H"], ns["G"], ns["plan"], ns["r"]
    n = n_params(model)  # tied embeddings: counted once by parameters()
    assert H.shape == G.shape == (n, n)
    assert isinstance(plan, hf.MemoryPlan) and plan.fits and plan.n == n
    assert isinstance(r, hf.EigshResult) and r.status == hf.Status.CONVERGED
    k = r.eigenvalues.numel()
    assert k >= 1 and r.eigenvectors.shape == (k, n) and bool(r.converged.all())
    assert bool((r.eigenvalues[:-1] >= r.eigenvalues[1:]).all())


def test_spectrum(in_tmp: Path) -> None:
    model, batches = tiny_model(), tiny_batches()
    n = n_params(model)
    H = hf.hessian(model, nn.CrossEntropyLoss(), batches)
    G = hf.ggn(model, nn.CrossEntropyLoss(), batches)
    ns = base_namespace() | {"H": H, "G": G}
    out = run_block(SPECTRUM, ns)

    r = ns["r"]
    assert isinstance(r, hf.EigshResult) and r.status == hf.Status.CONVERGED and r.verified
    k = r.eigenvalues.numel()
    assert r.eigenvectors.shape == (k, n) and r.residuals.shape == (k,)
    lmax = out['hf.lambda_max(H, tol=1e-4)']
    assert isinstance(lmax, float) and abs(lmax - float(r.eigenvalues[0])) <= 1e-3 * abs(lmax)
    t = ns["t"]
    assert isinstance(t, hf.TraceResult) and torch.isfinite(torch.tensor(t.value))
    lo, hi = t.confidence_interval()
    assert lo <= t.value <= hi
    d = ns["d"]
    assert isinstance(d, hf.DiagonalResult) and d.values.shape == (n,)
    assert {name: x.shape for name, x in out["d.by_param"].items()} == {
        name: p.shape for name, p in model.named_parameters()}
    s = ns["s"]
    assert isinstance(s, hf.SpectralDensity)
    (expr,) = [key for key in out if key.startswith("s.density(")]
    dens, m2, trf, ax = out[expr]
    assert dens.dim() == 1 and bool(torch.isfinite(dens).all()) and bool((dens >= 0).all())
    assert m2 > 0 and math.isfinite(trf)  # tr(H^2)/n > 0; tr f(H) is a number (not log of < 0)
    assert hasattr(ax, "savefig") and ax.axes  # the matplotlib Figure (every plot() returns it)
    c = ns["c"]
    assert isinstance(c, hf.ConditionResult) and c.lambda_max > 0


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------

MYMODELS = textwrap.dedent("""
    from collections import OrderedDict
    from torch import nn

    def make_model():
        return nn.Sequential(OrderedDict([("layer3", nn.Linear(8, 16)), ("act", nn.Tanh()),
                                          ("layer4", nn.Linear(16, 4))]))
""")
MYDATA = textwrap.dedent("""
    import torch

    _g = torch.Generator().manual_seed(1)
    _X, _y = torch.randn(26, 8, generator=_g), torch.randint(0, 4, (26,), generator=_g)
    batches = [(_X[:16], _y[:16]), (_X[16:], _y[16:])]
""")


def readme_analyze_command() -> list[str]:
    """The README's ``hessfast analyze ...`` synopsis as an argument list: its backslash lines
    joined, each ``[--option value]`` taken with its value (the first of ``a|b``
    alternatives)."""
    text = README.read_text(encoding="utf-8").split("## Command line", 1)[1]
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    start = block.index("hessfast analyze")
    lines = []
    for line in block[start:].splitlines():
        lines.append(line.rstrip().removesuffix("\\"))
        if not line.rstrip().endswith("\\"):
            break
    words = shlex.split(" ".join(lines))
    assert words[:2] == ["hessfast", "analyze"], words
    return ["analyze"] + [w.strip("[]").split("|")[0] for w in words[2:]]


def test_command_line(in_tmp: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    """The synopsis runs as shown, every option at its shown value, on a model whose
    ``layer4`` the ``--params`` regex selects, with a checkpoint file of its weights."""
    from hessfast import cli

    argv = readme_analyze_command()
    (in_tmp / "mymodels.py").write_text(MYMODELS)
    (in_tmp / "mydata.py").write_text(MYDATA)
    ckpt = argv[argv.index("--checkpoint") + 1]
    spec = importlib.util.spec_from_file_location("readme_mymodels", in_tmp / "mymodels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(mod.make_model().state_dict(), in_tmp / ckpt)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI adds the current folder
    for name in ("mymodels", "mydata"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        with torch.random.fork_rng(devices=[]):  # make_model draws from the global RNG
            torch.manual_seed(0)
            assert cli.main(argv) == 0
    finally:
        for name in ("mymodels", "mydata"):
            sys.modules.pop(name, None)
    report = json.loads(capsys.readouterr().out)  # --json: the report on stdout
    out = in_tmp / argv[argv.index("--out") + 1]
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["n"] == 16 * 4 + 4  # --params 'layer4\.': the last layer only
    assert len(report["top_eigenvalues"]) == int(argv[argv.index("--k") + 1])


# ---------------------------------------------------------------------------------------------
# torch.distributed: 2 gloo ranks
# ---------------------------------------------------------------------------------------------

RANK_SCRIPT = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, {tests!r})
    import test_readme as T
    torch.set_num_threads(1)
    import hessfast as hf
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    model = T.tiny_model().double()
    batches = [(x.double(), y) for x, y in T.tiny_batches()]
    ns = T.base_namespace() | {{"model": model, "loss_fn": torch.nn.CrossEntropyLoss(),
                               "my_rank_batches": batches[rank::world]}}
    T.run_block(T.DISTRIBUTED, ns)
    torch.save({{"eigenvalues": ns["r"].eigenvalues, "status": str(ns["r"].status),
                "num_samples": ns["H"].num_samples}}, f"rank{{rank}}.pt")
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(template: str, script: Path, world: int, cwd: Path, timeout: int,
               what: str, saved: str) -> list[dict]:
    """Run ``template`` (formatted with this folder) as ``world`` gloo ranks set up as
    torchrun would on a CPU (skipped where torch has no gloo); fail on a hang or a non-zero
    exit, with the rank's log. Returns what each rank saved to ``saved.format(rank)``."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script.write_text(template.format(tests=str(Path(__file__).resolve().parent)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank of {what} did not finish (hang)")
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{log[-3000:]}"
    return [torch.load(cwd / saved.format(r)) for r in range(world)]


def _one_process_problem() -> tuple[nn.Module, list]:
    """The ranks' problem in one process: the tiny MLP and all its batches, in float64."""
    return tiny_model().double(), [(x.double(), y) for x, y in tiny_batches()]


@pytest.mark.distributed
def test_distributed(in_tmp: Path) -> None:
    ranks = _run_ranks(RANK_SCRIPT, in_tmp / "rank.py", 2, in_tmp, timeout=120,
                       what="the README's torch.distributed example", saved="rank{}.pt")

    # one process on all the data, the same call
    model, batches = _one_process_problem()
    k = ranks[0]["eigenvalues"].numel()
    ref = hf.eigsh(hf.hessian(model, nn.CrossEntropyLoss(), batches, process_group=None), k=k)
    for got in ranks:
        assert got["status"] == "CONVERGED"
        assert got["num_samples"] == sum(len(y) for _, y in batches)
        assert torch.allclose(got["eigenvalues"], ref.eigenvalues, rtol=1e-8, atol=0)


FSDP_SCRIPT = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, {tests!r})
    import test_readme as T
    torch.set_num_threads(1)
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    batches = [(x.double(), y) for x, y in T.tiny_batches()]  # one batch per rank: 16 and 10
    ns = T.base_namespace() | {{"build_model": lambda: T.tiny_model().double(),
                               "loss_fn": torch.nn.CrossEntropyLoss(),
                               "my_rank_batches": [batches[rank]]}}
    T.run_block(T.FSDP, ns)
    H = ns["H"]
    torch.save({{"top": ns["top"], "fd_error": H.fd_error, "global_size": H.global_size,
                "local_n": H.shape[0], "krylov": ns["dens"].krylov,
                "nodes": ns["dens"].nodes}}, f"fsdp{{rank}}.pt")
''')


@pytest.mark.distributed
def test_fsdp(in_tmp: Path) -> None:
    """The README's FSDP block, verbatim, on 2 gloo ranks (each one batch of the tiny MLP's
    data): lambda_max equals one process's exact one within the recorded error, every rank
    the same, no rank holding a whole vector."""
    ranks = _run_ranks(FSDP_SCRIPT, in_tmp / "fsdp_rank.py", 2, in_tmp, timeout=180,
                       what="the README's FSDP example", saved="fsdp{}.pt")
    model, batches = _one_process_problem()
    exact = hf.lambda_max(hf.hessian(model, nn.CrossEntropyLoss(), batches), tol=1e-10)
    n = n_params(model)
    for got in ranks:
        assert got["global_size"] == n and got["local_n"] < n
        assert got["krylov"] == "lean"
        assert abs(got["top"] - exact) <= 1e-4 * abs(exact) + 4 * got["fd_error"] * abs(exact)
        assert got["top"] == ranks[0]["top"] and torch.equal(got["nodes"], ranks[0]["nodes"])
