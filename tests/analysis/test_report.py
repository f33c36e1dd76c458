"""hessfast.analysis.report.Report: JSON round trip, summary table, figure."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from hessfast.analysis.analyze import analyze
from hessfast.analysis.report import Report
from hessfast.errors import ConfigurationError
from hessfast.results import Status
from hessfast.testing.models import make_mlp

pytestmark = pytest.mark.usefixtures("single_thread", "no_leaking_global_state")

LR = 0.9


@pytest.fixture(scope="module")
def report() -> Report:
    model, loss_fn, batches = make_mlp(sizes=(20, 20), d_in=6, hidden=6, n_out=3,
                                       dtype=torch.float64)
    return analyze(model, loss_fn, batches, k=3, num_probes=6, num_steps=30, lr=LR)


@pytest.fixture(scope="module")
def plt():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def test_json_round_trip_exact(report: Report, tmp_path) -> None:
    text = json.dumps(report.to_dict(), allow_nan=False)  # strict JSON: no tensors, no NaN
    assert Report.from_dict(json.loads(text)) == report
    assert Report.from_json(report.to_json()) == report
    path = tmp_path / "r.json"
    assert report.to_json(path) == path.read_text().strip()
    back = Report.from_json(path)
    assert back == report and Report.from_json(str(path)) == report
    assert back.top_eigenvalues == report.top_eigenvalues  # floats exactly, not rounded
    assert back.density["nodes"] == report.density["nodes"]


def test_fields_are_made_json_safe() -> None:
    r = Report(curvature="operator", n=3, lambda_max=torch.tensor(2.5, dtype=torch.float64),
               top_eigenvalues=torch.tensor([2.5, 1.0]), trace=math.nan, stable_lr=math.inf,
               parts=[dict(name="x", source=Status.CONVERGED, bounds=(1.0, 2.0))])
    assert r.lambda_max == 2.5 and type(r.lambda_max) is float
    assert r.top_eigenvalues == [2.5, 1.0]
    assert r.trace is None and r.stable_lr is None  # non-finite -> None (strict JSON)
    assert type(r.parts[0]["source"]) is str and r.parts[0]["bounds"] == [1.0, 2.0]
    assert Report.from_json(r.to_json()) == r
    json.dumps(r.to_dict(), allow_nan=False)


def test_bad_json_input() -> None:
    with pytest.raises(ConfigurationError, match="unknown keys"):
        Report.from_dict({"curvature": "GGN", "n": 3, "lambda_maximum": 1.0})
    with pytest.raises(ConfigurationError, match="missing keys"):
        Report.from_dict({"curvature": "GGN"})
    with pytest.raises(ConfigurationError, match="not valid JSON"):
        Report.from_json("{not json")
    with pytest.raises(ConfigurationError, match="neither JSON text nor an existing file"):
        Report.from_json("/nonexistent/report.json")


def test_summary_has_the_key_rows(report: Report) -> None:
    s = report.summary()
    for row in ("lambda_max", "top-3 eigenvalues", "lambda_min", "trace", "definiteness",
                "condition number", "negative mass", "stable lr 2/lambda_max",
                "effective rank", "per layer", "cost:", "total"):
        assert row in s, row
    assert f"{report.lambda_max:.6g}" in s and f"{report.stable_lr:.6g}" in s
    assert report.definiteness in s and f"{2 / LR:.4g}" in s
    for p in report.parts:
        assert p["name"] in s
    for g in report.per_layer:
        assert str(g["name"]) in s
    assert str(report) == s


def test_large_relative_stderr_is_flagged() -> None:
    """Issue 16: a trace of 1.11396 +/- 0.674 (60%) is marked in the summary and the JSON."""
    from hessfast.analysis.report import REL_STDERR_FLAG

    groups = [dict(name="conv1", size=10, trace=2.0, trace_stderr=0.01),
              dict(name="fc", size=5, trace=0.0, trace_stderr=0.3)]
    r = Report(curvature="operator", n=15, trace=1.11396, trace_stderr=0.674, per_layer=groups)
    rel = 0.674 / 1.11396
    assert rel > REL_STDERR_FLAG
    assert r.uncertain == {"trace": rel, "per_layer.fc.trace": None}  # None: infinite
    s = r.summary()
    assert f"(!) rel. stderr {100 * rel:.0f}%" in s and "(!) rel. stderr inf" in s
    assert s.count("(!) rel. stderr") == 2 and f"{REL_STDERR_FLAG:.0%}" in s
    assert Report.from_json(r.to_json()) == r
    ok = Report(curvature="operator", n=15, trace=1.11396, trace_stderr=0.05)
    assert ok.uncertain == {} and "(!)" not in ok.summary()


def test_plot_writes_png(report: Report, tmp_path, plt) -> None:
    from matplotlib.figure import Figure

    path = tmp_path / "fig" / "report.png"
    fig = report.plot(path)
    assert isinstance(fig, Figure) and len(fig.axes) == 2  # every plot() returns the Figure
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert plt.get_fignums() == []  # outside pyplot: no figure left open
    replace(report, per_layer=None).plot(tmp_path / "one.png")
    assert (tmp_path / "one.png").stat().st_size > 10_000
    assert len(report.plot().axes) == 2  # no path: the figure only
    # re-plotted from JSON alone
    Report.from_json(report.to_json()).plot(tmp_path / "again.pdf")
    assert (tmp_path / "again.pdf").stat().st_size > 0
    with pytest.raises(ConfigurationError, match="no suffix"):
        report.plot(tmp_path / "noext")


def test_density_panel_marks_eigenvalues_and_lr(report: Report, plt) -> None:
    from hessfast.analysis.plot import FLOOR, plot_density_panel, plot_layers_panel

    fig, (ax, bx) = plt.subplots(1, 2)
    try:
        plot_density_panel(report, ax)
        assert ax.get_yscale() == "log"
        assert "eigenvalue λ" in ax.get_xlabel() and "density" in ax.get_ylabel()
        xs = {round(float(line.get_xdata()[0]), 12) for line in ax.lines[4:]}
        for v in [*report.top_eigenvalues, report.lambda_min, 2 / LR]:
            assert round(v, 12) in xs
        texts = " ".join(t.get_text() for t in ax.get_legend().get_texts())
        assert f"σ = {report.density['sigma']:.3g}" in texts and "2/lr" in texts
        peak = float(max(y for y in ax.lines[0].get_ydata() if y == y))
        assert ax.get_ylim()[0] == pytest.approx(FLOOR * peak)  # relative floor
        plot_layers_panel(report, bx)
        labels = [t.get_text() for t in bx.get_xticklabels()]
        assert labels == [str(g["name"]) for g in report.per_layer]
        assert bx.get_yscale() in ("log", "symlog")
    finally:
        plt.close(fig)


def test_a_report_of_0_1_reads_back() -> None:
    """Reports written before the vocabulary pass said data_passes in parts and had no kind."""
    old = {"curvature": "operator", "n": 3, "top_converged": True, "lambda_min_converged": True,
           "parts": [{"name": "top_k", "num_matvecs": 4, "data_passes": 2, "seconds": 0.1,
                      "source": "eigsh"}]}
    r = Report.from_dict(old)
    assert r.parts[0]["num_passes"] == 2 and "data_passes" not in r.parts[0]
    assert (r.num_matvecs, r.num_passes, r.status) == (4, 2, "CONVERGED")
    d = r.to_dict()
    assert d["kind"] == "Report" and Report.from_dict(d) == r
    assert "cost:" in r.summary() and len(repr(r)) < 400
