"""Each example in examples/ runs in --quick mode as a subprocess and writes what it says:
the CNN and GPT-2 reports (JSON and PNG), and the SGD and Adam sharpness histories, which reach
the edge of stability (sharpness rising to the optimizer's threshold) within the run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PNG = b"\x89PNG\r\n\x1a\n"


def _run(name: str, out: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HESSFAST_PROGRESS="0", MPLBACKEND="Agg")
    res = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick", "--out", str(out)],
                         cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _check_report(out: Path, groups: list[str], k: int, curvature: str) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert (out / "spectrum.png").read_bytes()[:8] == PNG
    assert report["curvature"] == curvature
    assert len(report["top_eigenvalues"]) == k
    assert report["top_eigenvalues"] == sorted(report["top_eigenvalues"], reverse=True)
    assert report["lambda_max"] == report["top_eigenvalues"][0] > 0
    assert [g["name"] for g in report["per_layer"]] == groups
    assert sum(g["size"] for g in report["per_layer"]) == report["n"]
    # a diagonal block's top eigenvalue is at most the whole operator's (Cauchy interlacing)
    for g in report["per_layer"]:
        assert g["lambda_max"] <= report["lambda_max"] * (1 + 1e-2)
    assert report["trace"] is not None and report["density"] is not None
    return report


def test_cnn_report(tmp_path: Path) -> None:
    out = tmp_path / "cnn"
    res = _run("cnn_report.py", out)
    _check_report(out, ["stem", "block1", "block2", "head"], 3, "Hessian")
    assert "lambda_max" in res.stdout and "per layer" in res.stdout


@pytest.mark.parametrize(("name", "adaptive"), [("sharpness_sgd.py", False),
                                               ("sharpness_adam.py", True)])
def test_sharpness_reaches_the_edge_of_stability(tmp_path: Path, name: str,
                                                 adaptive: bool) -> None:
    out = tmp_path / "sharp"
    res = _run(name, out)
    assert (out / "sharpness.png").read_bytes()[:8] == PNG
    record = json.loads((out / "history.json").read_text())
    history = record["history"]
    assert len(history) >= 20
    key = "preconditioned_lambda_max" if adaptive else "lambda_max"
    thr = "preconditioned_threshold" if adaptive else "threshold"
    after = history[1:]  # after the first step (an adaptive optimizer's moments need a step)
    # progressive sharpening: the sharpness grows from its early value to the threshold
    assert max(p[key] for p in after) > 1.15 * after[0][key]
    assert any(p["at_edge"] for p in after)
    for p in history:
        assert p["ratio"] == pytest.approx(p[key] / p[thr])
        # a warm-up point (an adaptive optimizer's first steps) is never flagged
        assert p["at_edge"] == (p["ratio"] >= 0.9 and not p["warmup"])
        assert p["warmup"] == (adaptive and p["step"] < record["warmup"])
    assert "edge of stability: " in res.stdout and "not reached" not in res.stdout


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not installed")
def test_gpt2_ggn(tmp_path: Path) -> None:
    out = tmp_path / "gpt2"
    _run("gpt2_ggn.py", out)
    report = _check_report(out, ["embeddings", "layer0", "layer1", "final_ln"], 3, "GGN")
    assert report["negative_mass"] == 0  # a GGN is positive semi-definite
    assert report["lambda_min"] > -report["zero_threshold"] - report["lambda_min_residual"]
