"""The peer comparison's rules (hessfast.testing.comparison, which bench/compare.py runs):
references, errors, verdicts, the ranking and the report; and its cells (bench/peers), run as
compare.py runs them: ``python -m peers.cell SPEC`` in a fresh process in bench/.

Runs without the peers installed; the tests that need one use ``pytest.importorskip``. The
suite imports nothing from bench/ (it is not on the import path).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hessfast.testing import comparison as compare

# the repository's bench/ (this file may sit in a subfolder of tests/)
BENCH = str(next(p / "bench" for p in Path(__file__).resolve().parents
                 if (p / "bench" / "peers").is_dir()))

CFG = dict(compare.QUICK)
REF = {"top": [10.0, 5.0, 4.0, 3.0, 2.0], "lambda_min": -1.0, "trace": 100.0,
       "trace_stderr": 0.0, "hv_norm": 2.0,
       "density_nodes": [[-1.0, 0.0, 0.0, 2.0, 10.0]], "density_weights": [[0.2] * 5]}


def _cell(tool, status, seconds, task="lambda_max", case="mlp", error=0.0, variant=""):
    return {"case": case, "task": task, "tool": tool, "variant": variant, "status": status,
            "error": error, "setup_seconds": 0.0, "solve_seconds": seconds, "num_matvecs": 10}


# ------------------------------------------------------------------------------- eigenvalues
def test_eig_error_is_order_free_and_relative():
    assert compare.eig_error([4.0, 10.0, 5.0], [10.0, 5.0, 4.0]) == 0.0
    assert compare.eig_error([10.01], [10.0]) == pytest.approx(1e-3)
    assert compare.eig_error([10.0], [10.0, 5.0]) == math.inf          # too few values
    assert compare.eig_error([float("nan")], [10.0]) == math.inf


def test_wrong_eigenvalue_is_wrong():
    # power iteration's answer on an indefinite spectrum: the largest |eigenvalue|, negative
    v = compare.verdict("lambda_max", {"eigenvalues": [-12.0]}, REF, CFG)
    assert v["status"] == "wrong" and v["error"] > 1
    v = compare.verdict("lambda_max", {"eigenvalues": [10.005]}, REF, CFG)
    assert v["status"] == "correct"
    v = compare.verdict("lambda_max", {"eigenvalues": [10.02]}, REF, CFG)
    assert v["status"] == "wrong"


def test_top5_converged_flags_are_reported():
    res = {"eigenvalues": [10.0, 5.0, 4.0, 3.0, 1.0], "converged": [True] * 3 + [False] * 2}
    v = compare.verdict("top5", res, REF, CFG)
    assert v["status"] == "wrong" and "3/5 flagged converged" in v["detail"]


def test_failures_keep_their_kind():
    for res, status in (({"error": "RuntimeError: boom"}, "failed"),
                        ({"timeout": 90.0}, "timeout"),
                        ({"unsupported": "no such API"}, "unsupported"),
                        ({"missing": "No module named x"}, "not installed")):
        v = compare.verdict("trace", res, REF, CFG)
        assert v["status"] == status and v["error"] is None


# ------------------------------------------------------------------------------------ trace
def test_trace_verdict_and_error_bar():
    ok = compare.verdict("trace", {"trace": 100.5, "stderr": 0.4}, REF, CFG)
    assert ok["status"] == "correct" and "within" in ok["detail"]
    bad = compare.verdict("trace", {"trace": 105.0, "stderr": 0.5}, REF, CFG)
    assert bad["status"] == "wrong" and "OUTSIDE" in bad["detail"]
    # the reference's own uncertainty widens the band
    ref = dict(REF, trace_stderr=2.0)
    assert compare.verdict("trace", {"trace": 104.0}, ref, CFG)["status"] == "correct"


# ---------------------------------------------------------------------------------- density
def test_density_distance_zero_for_identical_and_grows_with_shift():
    nodes, weights = [[-1.0, 0.0, 3.0]], [[0.2, 0.5, 0.3]]
    assert compare.density_distance(nodes, weights, nodes, weights, 0.3) < 1e-9
    dists = [compare.density_distance(nodes, weights, [[x + s for x in nodes[0]]], weights,
                                      0.3) for s in (0.05, 0.2, 0.5, 50.0)]
    assert all(a < b for a, b in zip(dists, dists[1:], strict=False))
    assert dists[-1] == pytest.approx(2.0, abs=1e-3)                # disjoint: total mass 2


def test_smoothed_density_integrates_to_one_and_ignores_nan_padding():
    import numpy as np

    grid = np.linspace(-10, 20, 6001)
    p = compare.smoothed_density([[0.0, 1.0, float("nan")], [2.0]], [[0.5, 0.5, 0.0], [3.0]],
                                 grid, 0.5)
    assert np.trapezoid(p, grid) == pytest.approx(1.0, abs=1e-6)


def test_density_verdict_uses_the_reference_range():
    res = {"nodes": REF["density_nodes"], "weights": REF["density_weights"]}
    v = compare.verdict("density", res, REF, CFG)
    assert v["status"] == "correct" and v["error"] < 1e-9
    shifted = {"nodes": [[x + 3.0 for x in REF["density_nodes"][0]]],
               "weights": REF["density_weights"]}
    assert compare.verdict("density", shifted, REF, CFG)["status"] == "wrong"


# ---------------------------------------------------------------------------------- summary
def test_wrong_peer_is_never_the_fastest():
    cells = [_cell("hessfast", "correct", 1.0),
             _cell("pyhessian", "wrong", 0.1, error=0.5),      # fast but wrong
             _cell("curvlinops", "correct", 3.0),
             _cell("eigenthings", "timeout", None)]
    (row,) = compare.summarize(cells)
    assert row["peer"]["tool"] == "curvlinops"
    assert row["speedup"] == pytest.approx(3.0)
    assert row["met"] is True                                    # target 2x for lambda_max
    assert row["peers_wrong"] == ["PyHessian"]


def test_wrong_hessfast_never_meets_a_target():
    cells = [_cell("hessfast", "wrong", 0.01, error=0.1), _cell("curvlinops", "correct", 3.0)]
    (row,) = compare.summarize(cells)
    assert row["met"] is False and row["speedup"] is None


def test_no_correct_peer_gives_no_ratio():
    cells = [_cell("hessfast", "correct", 1.0), _cell("pyhessian", "wrong", 0.1)]
    (row,) = compare.summarize(cells)
    assert row["met"] is None and row["speedup"] is None


def test_fastest_correct_hessfast_variant_and_gpu_targets():
    cells = [_cell("hessfast", "correct", 2.0, task="density"),
             _cell("hessfast", "correct", 1.0, task="density", variant="x"),
             _cell("pyhessian", "correct", 5.0, task="density")]
    (cpu,) = compare.summarize(cells, "cpu")
    (gpu,) = compare.summarize(cells, "cuda")
    assert cpu["hessfast"]["variant"] == "x" and cpu["speedup"] == pytest.approx(5.0)
    assert cpu["met"] is True and gpu["met"] is False            # 2x on CPU, 10x on a GPU


def test_hvp_is_ranked_per_product():
    c = _cell("hessfast", "correct", 2.0, task="hvp")
    assert compare.cell_seconds(c) == pytest.approx(0.2)


def test_cells_are_ranked_by_the_time_from_first_call_to_answer():
    c = dict(_cell("hessfast", "correct", 2.0), setup_seconds=0.5)
    assert compare.cell_seconds(c) == pytest.approx(2.5)               # set-up + solve
    assert compare.cell_seconds(dict(c, total_seconds=2.6)) == pytest.approx(2.6)


def test_products_beside_arpacks():
    cells = [_cell("hessfast", "correct", 1.0, task="top5"),
             dict(_cell("curvlinops", "correct", 3.0, task="top5"), num_matvecs=46)]
    (row,) = compare.summarize(cells)
    assert row["hessfast"]["num_matvecs"] == 10 and row["arpack_matvecs"] == 46


def test_markdown_lists_every_cell_with_its_set_up():
    cells = [dict(_cell("hessfast", "correct", 1.0), setup_seconds=0.25),
             _cell("pyhessian", "wrong", 0.1, error=0.5)]
    meta = {"device": "cpu", "machine": "test", "date": "d", "commit": "c", "torch": "t",
            "tools": {"hessfast": "dev", "pyhessian": "0.1"}, "cfg": CFG, "n": {"mlp": 10},
            "notes": ["torch.eig shim (eigh-based) installed for pyhessian 0.1"]}
    summary = compare.summarize(cells)
    assert summary[0]["hessfast"]["setup_seconds"] == 0.25
    assert "arpack_matvecs" not in summary[0]                    # no curvlinops+scipy cell
    md = compare.markdown(meta, cells, summary)
    assert "| PyHessian | wrong |" in md.replace("| mlp | lambda_max ", "")
    assert "shim" in md and "none correct" in md
    assert "| seconds | set-up |" in md and "its set-up" in md
    assert "| 1.25 s | 250.0 ms |" in md                  # the hessfast cell: total, set-up


# ---------------------------------------------------------------------------------- adapters
def test_pyhessian_eig_shim_matches_eigh():
    # in its own process, as a cell installs it: the shim patches torch
    code = textwrap.dedent("""
        import torch
        from peers import pyhessian_peer

        pyhessian_peer.install_eig_shim()
        assert pyhessian_peer.install_eig_shim() is False      # a working eig is left alone
        T = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]])
        vals, vecs = torch.eig(T, eigenvectors=True)
        assert vals.shape == (3, 2) and torch.all(vals[:, 1] == 0)
        assert torch.allclose(T @ vecs, vecs * vals[:, 0], atol=1e-5)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=BENCH, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _handle(spec: dict) -> dict:
    """One cell of bench/peers in a fresh process, as compare.py runs it."""
    return compare.run_spec(sys.executable, spec, 600, BENCH)


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory):
    pytest.importorskip("sklearn")
    path = str(tmp_path_factory.mktemp("cmp") / "mlp.pt")
    prep = _handle({"kind": "prepare", "case": "mlp", "path": path})
    assert "error" not in prep, prep
    return path


def _run_cell(tool, task, path, cfg=None):
    return _handle({"kind": "cell", "tool": tool, "task": task, "case": "mlp",
                    "path": path, "device": "cpu", "cfg": dict(cfg or CFG)})


def test_hessfast_cell_is_correct_on_the_mlp(mlp_path):
    ref = _handle({"kind": "reference", "case": "mlp", "path": mlp_path,
                   "device": "cpu", "cfg": dict(compare.REF_QUICK)})
    assert ref["kind"] == "dense float64 eigh" and ref["n"] == 2410
    res = _run_cell("hessfast", "lambda_max", mlp_path)
    v = compare.verdict("lambda_max", res, ref, CFG)
    assert v["status"] == "correct", (res, ref["top"][:1])
    assert res["num_matvecs"] > 0 and res["num_passes"] > 0
    assert 0 < res["setup_seconds"] < res["total_seconds"]
    assert res["total_seconds"] == pytest.approx(res["setup_seconds"] + res["solve_seconds"])


def test_cells_run_as_fresh_processes_in_bench():
    """compare.py starts ``python -m peers.cell`` in bench/: the cell finds its package and
    the installed hessfast from there."""
    info = compare.run_spec(sys.executable, {"kind": "version", "device": "cpu"}, 120, BENCH)
    assert "error" not in info, info
    assert info["tools"]["hessfast"] and info["wall_seconds"] > 0


@pytest.mark.parametrize("tool,module", [("pyhessian", "pyhessian"),
                                         ("curvlinops", "curvlinops"),
                                         ("eigenthings", "hessian_eigenthings")])
def test_peer_cell_runs(mlp_path, tool, module):
    pytest.importorskip(module)
    res = _run_cell(tool, "hvp", mlp_path)
    assert "error" not in res, res
    assert res["num_matvecs"] >= 20 and res["hv_norm"] > 0
