"""The lean Krylov paths on an operator whose vectors are SHARDED over ranks
(``LinearOperator.shards``, the contract an FSDP operator keeps): 2 gloo processes
(tests/distributed/lean_workers.py) each hold a slice of a diagonal matrix's vectors; lean
lambda_max / eigsh k=1 SA, SLQ from the slices of the same global probes, power iteration
and Hutchinson must equal the single-process whole-vector answers, every rank the same;
what needs whole vectors is refused naming what runs instead."""

from __future__ import annotations

from pathlib import Path

import _spawn
import lean_workers
import pytest
import torch

import hessfast as hf

WORKER = Path(__file__).with_name("lean_workers.py")


@pytest.mark.distributed
def test_sharded_lean_equals_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(_spawn, "WORKER", WORKER)
    codes, logs, _ = _spawn.spawn("lean", 2, tmp_path)
    assert codes == [0, 0], logs
    out = _spawn.results("lean", 2, tmp_path)
    d = lean_workers.diagonal()
    A = hf.LinearOperator.from_matrix(torch.diag(d))
    for r in out:  # the exact answers
        assert float(r["lambda_max"]) == pytest.approx(3.0, abs=1e-8)
        assert float(r["lambda_min"][0]) == pytest.approx(-1.0, abs=1e-8)
        assert r["krylov"] == "lean" and r["slq_krylov"] == "lean"
        assert float(r["power"][0]) == pytest.approx(3.0, abs=1e-6)
    # the ranks agree exactly (same all-reduced numbers, same decisions)
    for key in ("lambda_max", "lambda_min", "slq_nodes", "slq_weights", "rnd_nodes", "power",
                "trace"):
        assert torch.equal(out[0][key], out[1][key]), key
    # the eigenvector's slices make the global unit eigenvector of -1
    vec = torch.cat([r["vector_shard"] for r in out])
    assert abs(float(vec[int(d.argmin())])) == pytest.approx(1.0, abs=1e-6)
    # SLQ from the slices of the same global probes equals the whole-vector lean SLQ
    whole = hf.spectral_density(A, num_steps=20, v0=lean_workers.probes(3), krylov="lean")
    assert torch.allclose(out[0]["slq_nodes"], whole.nodes, atol=1e-10)
    assert torch.allclose(out[0]["slq_weights"], whole.weights, atol=1e-10)
    # Hutchinson: an unbiased estimate of tr = sum(d) within a few standard errors
    value, stderr, samples = out[0]["trace"].tolist()
    assert samples == 40 and abs(value - float(d.sum())) <= 5 * stderr
    for r in out:  # the operator probe on shards, and the ranks' agreement on arguments
        assert float(r["probed_lambda_max"]) == pytest.approx(3.0, abs=1e-8)
        assert r["probed_mark"] is True
        assert r["disagree"].startswith("DistributedError") and "tol" in r["disagree"]
        assert r["disagree_products"] == 0
    assert torch.equal(out[0]["probed_lambda_max"], out[1]["probed_lambda_max"])
    for name, msg in out[0]["refusals"].items():
        assert msg.startswith("ConfigurationError") and "sharded" in msg, (name, msg)
