"""Probe-parallel SLQ and Hutchinson over a ``probe x data`` mesh (issue 9 section 3), on gloo.

Two spawned runs (tests/distributed/probe_workers.py through the harness in _spawn.py):
4 ranks as a 2 x 2 mesh (data-parallel operators over 2-rank data groups) and 2 ranks as a
2 x 1 mesh. Every rank must return exactly the same result, equal to this process's run on
all the data with ``mesh=Mesh()`` (1 x 1, the same keyed probes) to 1e-10 in float64.
In-process checks cover the keyed probe draw and the refusals.
"""

from __future__ import annotations

from pathlib import Path

import _spawn
import dist_workers
import probe_workers
import pytest
import torch
from torch import nn

import hessfast as hf
from hessfast import errors
from hessfast._checks import keyed_probes, probe_key
from hessfast.distributed.mesh import _share

WORKER = Path(__file__).with_name("probe_workers.py")


def reference() -> dict:
    """One process, all 8 batches, all probes (``mesh=Mesh()``)."""
    model, batches = dist_workers.problem()
    H = hf.hessian(model, nn.CrossEntropyLoss(), batches, process_group=None)
    return probe_workers.measure(H, hf.distributed.Mesh())


@pytest.mark.distributed
@pytest.mark.parametrize("world", [4, 2], ids=["2x2", "2x1"])
def test_mesh_equals_one_process_on_all_probes(world, tmp_path, monkeypatch):
    """SLQ (Rademacher, Gaussian, v0) and Hutchinson over the mesh: every rank holds the
    same result, equal to one process with all probes and all data (1e-10); an operator
    over the whole world is refused; a raising probe group stops every rank."""
    monkeypatch.setattr(_spawn, "WORKER", WORKER)
    codes, logs, _ = _spawn.spawn("mesh", world, tmp_path)
    assert codes == [0] * world, logs
    ranks = _spawn.results("mesh", world, tmp_path)
    data = world // probe_workers.PROBE_GROUPS
    assert [r.pop("coords") for r in ranks] == [(r // data, r % data, 35) for r in range(world)]
    failing = [r for r in range(world) if r // data == 1]
    for r, out in enumerate(ranks):
        name, msg = out.pop("wrong_group")
        assert name == "ConfigurationError" and "mesh.data_group" in msg, msg
        name, msg = out.pop("group_fails")
        if r in failing:
            assert name == "NonFiniteError", (r, name, msg)
        else:
            assert name == "DistributedError" and f"rank(s) {failing}" in msg, (r, msg)
    want = reference()
    assert want["trace"][2:].tolist() == [7, 7] and want["slq_matvecs"] == 5 * 12
    for key, value in want.items():
        got = ranks[0][key]
        assert got.shape == value.shape, key
        assert _spawn.rel(got, value) < 1e-10, (key, got, value)
        for other in ranks[1:]:
            assert torch.equal(other[key], got), key


def test_keyed_probes_reproduce_any_subset():
    """Probe i depends on (seed, i) only: a range of indices gives the rows of the full
    draw; keys of nearby seeds and indices differ; negative seeds are valid."""
    full = keyed_probes(11, range(7), 40, "rademacher")
    assert torch.equal(keyed_probes(11, range(3, 6), 40, "rademacher"), full[3:6])
    assert set(full.unique().tolist()) == {-1.0, 1.0}
    assert len({tuple(r) for r in full.tolist()}) == 7
    gauss = keyed_probes(-5, [4, 0], 30, "gaussian", dtype=torch.float32)
    assert torch.equal(gauss, keyed_probes(-5, range(5), 30, "gaussian")[[4, 0]].float())
    keys = {probe_key(s, i) for s in (-1, 0, 1, 2**63) for i in range(4)}
    assert len(keys) == 16 and all(0 <= k < 2**64 for k in keys)
    assert [len(_share(7, 3, i)) for i in range(3)] == [3, 2, 2]
    assert [_share(7, 3, i).start for i in range(3)] == [0, 3, 5]


def test_trivial_mesh_uses_the_keyed_probes():
    """``mesh=Mesh()`` on one process is SLQ / Hutchinson on the keyed probes."""
    A = torch.diag(torch.linspace(-1.0, 3.0, 30, dtype=torch.float64))
    mesh = hf.distributed.Mesh()
    assert (mesh.probe, mesh.data, mesh.data_group, mesh.probe_group) == (1, 1, None, None)
    Z = keyed_probes(4, range(3), 30, "rademacher")
    dens = hf.spectral_density(A, 3, 5, seed=4, mesh=mesh)
    same = hf.spectral_density(A, num_steps=5, v0=Z)
    assert torch.allclose(dens.nodes, same.nodes, rtol=0, atol=1e-12)
    assert torch.allclose(dens.weights, same.weights, rtol=0, atol=1e-12)
    assert dens.num_matvecs == 15
    tr = hf.trace(A, 6, method="hutchinson", seed=9, mesh=mesh)
    Z = keyed_probes(9, range(6), 30, "rademacher")
    samples = ((Z @ A) * Z).sum(1)
    assert tr.value == pytest.approx(float(samples.mean()), rel=1e-13)
    assert tr.num_matvecs == 6


def test_mesh_refusals():
    A = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    mesh = hf.distributed.Mesh()
    for method in ("hutch++", "xtrace"):
        with pytest.raises(errors.ConfigurationError, match="global QR"):
            hf.trace(A, 9, method=method, mesh=mesh)
    with pytest.raises(errors.ConfigurationError, match="fixed budget"):
        hf.trace(A, 9, method="hutchinson", rtol=0.1, mesh=mesh)
    with pytest.raises(errors.ConfigurationError, match="method='slq' without checkpoint"):
        hf.spectral_density(A, 2, 4, method="kpm", mesh=mesh)
    with pytest.raises(errors.ArgumentTypeError, match="Mesh"):
        hf.spectral_density(A, 2, 4, mesh=(2, 1))
    with pytest.raises(errors.ConfigurationError, match="probe \\* data must equal"):
        hf.distributed.Mesh(probe=2)
    with pytest.raises(errors.ConfigurationError, match="integer >= 1"):
        hf.distributed.Mesh(probe=0)


def test_mesh_checks_the_operator_group_through_its_public_ranks():
    """Mesh.check_operator reads the operator's public ``ranks`` (no private attribute): an
    operator reducing over more ranks than a probe group's ``data`` is refused; a one-process
    curvature operator and a plain matrix pass."""
    from types import SimpleNamespace

    mesh = hf.distributed.Mesh()
    wide = SimpleNamespace(ranks=SimpleNamespace(world_size=4))
    with pytest.raises(errors.ConfigurationError, match="over 4 process"):
        mesh.check_operator(wide, "hessfast.trace")
    model = torch.nn.Linear(3, 2)
    H = hf.hessian(model, torch.nn.MSELoss(), [(torch.randn(4, 3), torch.randn(4, 2))])
    assert H.ranks.world_size == 1
    mesh.check_operator(H, "hessfast.trace")
    mesh.check_operator(torch.eye(3), "hessfast.trace")
