"""Checkpoint/resume of eigsh and SLQ (hessfast/lanczos/checkpoint.py): a run interrupted
after some products and resumed from its file gives the uninterrupted result bitwise
(float64, same seed), with the same total num_matvecs; a file made by another run is refused
naming the mismatch; the file is written atomically."""

from __future__ import annotations

import os

import pytest
import torch

import hessfast as hf
from hessfast.errors import ConfigurationError
from hessfast.testing import spectra

pytestmark = pytest.mark.usefixtures("single_thread", "no_leaking_global_state")


class Interrupted(Exception):
    """Raised by the operator after a set number of products (a killed run)."""


def _operator(M: torch.Tensor, fail_after: int | None = None) -> hf.LinearOperator:
    """M as a function operator that raises after ``fail_after`` rows multiplied (the
    one-time probe's products excluded)."""
    count = {"rows": 0}

    def fn(V: torch.Tensor) -> torch.Tensor:
        count["rows"] += V.shape[0]
        if fail_after is not None and count["rows"] > fail_after:
            raise Interrupted(f"killed after {fail_after} products")
        return V @ M

    return hf.LinearOperator.from_function(fn, M.shape[0], dtype=M.dtype, check=False)


@pytest.fixture(scope="module")
def matrix() -> torch.Tensor:
    M, _ = spectra.evenly_spaced(120, seed=3)
    return M


def _same_eigsh(a: hf.EigshResult, b: hf.EigshResult) -> None:
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert torch.equal(a.eigenvectors, b.eigenvectors)
    assert torch.equal(a.residuals, b.residuals)
    assert a.num_matvecs == b.num_matvecs and a.num_passes == b.num_passes
    assert a.num_restarts == b.num_restarts and a.status == b.status


@pytest.mark.parametrize("block_size", [1, 2])
def test_eigsh_resume_equals_uninterrupted(matrix, tmp_path, block_size):
    kw = dict(k=3, which="LA", tol=1e-10, max_basis=10, block_size=block_size, seed=7)
    ref = hf.eigsh(_operator(matrix), **kw)
    assert ref.num_restarts >= 4  # restarts before and after the interruption
    path = tmp_path / "eigsh.ckpt"
    cut = ref.num_matvecs // 2
    with pytest.raises(Interrupted):
        hf.eigsh(_operator(matrix, fail_after=cut), checkpoint=path, checkpoint_every=3, **kw)
    assert path.exists()
    state = torch.load(path, weights_only=True)["state"]
    assert 0 < state["restarts"] < ref.num_restarts  # saved between restarts
    assert 0 < state["used"] <= cut
    A = _operator(matrix)
    out = hf.eigsh(A, checkpoint=path, checkpoint_every=3, **kw)
    assert A.num_matvecs == ref.num_matvecs - state["used"]  # resumed, not restarted
    _same_eigsh(out, ref)
    exact = torch.linalg.eigvalsh(matrix).flip(0)[:3]
    assert torch.allclose(out.eigenvalues, exact, rtol=1e-9)


def test_eigsh_resume_twice_and_budget_not_fingerprinted(matrix, tmp_path):
    kw = dict(k=3, tol=1e-10, max_basis=10, seed=1)
    ref = hf.eigsh(_operator(matrix), **kw)
    path = tmp_path / "e.ckpt"
    for cut in (ref.num_matvecs // 3, 2 * ref.num_matvecs // 3):
        with pytest.raises(Interrupted):
            hf.eigsh(_operator(matrix, fail_after=cut - (cut // 3)), checkpoint=path,
                     checkpoint_every=1, **kw)
    out = hf.eigsh(_operator(matrix), checkpoint=path, checkpoint_every=1,
                   max_matvecs=5000, **kw)
    _same_eigsh(out, ref)


def test_eigsh_checkpoint_mismatch_names_the_argument(matrix, tmp_path):
    path = tmp_path / "m.ckpt"
    with pytest.raises(Interrupted):
        hf.eigsh(_operator(matrix, fail_after=20), k=3, max_basis=10, checkpoint=path,
                 checkpoint_every=1)
    with pytest.raises(ConfigurationError, match="k: file 3, now 4"):
        hf.eigsh(_operator(matrix), k=4, max_basis=10, checkpoint=path)
    M2, _ = spectra.evenly_spaced(100, seed=3)
    with pytest.raises(ConfigurationError, match="n: file 120, now 100"):
        hf.eigsh(_operator(M2), k=3, max_basis=10, checkpoint=path)
    with pytest.raises(ConfigurationError, match="kind"):
        hf.spectral_density(_operator(matrix), 4, 10, checkpoint=path)
    with pytest.raises(ConfigurationError, match="checkpoint_every"):
        hf.eigsh(_operator(matrix), k=3, checkpoint=tmp_path / "x", checkpoint_every=0)
    with pytest.raises(ConfigurationError, match="does not exist"):
        hf.eigsh(_operator(matrix), k=3, checkpoint=tmp_path / "no" / "x")


def test_checkpoint_written_atomically(matrix, tmp_path, monkeypatch):
    """A save interrupted while writing leaves the previous file intact and no partial one."""
    path = tmp_path / "a.ckpt"
    with pytest.raises(Interrupted):
        hf.eigsh(_operator(matrix, fail_after=15), k=3, max_basis=10, checkpoint=path,
                 checkpoint_every=1)
    before = path.read_bytes()

    def torn(*args, **kwargs):
        raise Interrupted("killed while writing")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(Interrupted):
        hf.eigsh(_operator(matrix), k=3, max_basis=10, checkpoint=path, checkpoint_every=1)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] != [] and all(
        not p.name.startswith("a.ckpt.tmp") or p.stat().st_size == 0 for p in tmp_path.iterdir()
    )


def test_only_rank0_writes(matrix, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    path = tmp_path / "r.ckpt"
    hf.eigsh(_operator(matrix), k=3, max_basis=10, checkpoint=path, checkpoint_every=1)
    assert not path.exists()


@pytest.mark.parametrize("reorth", ["full", "none"])
def test_slq_resume_equals_uninterrupted(matrix, tmp_path, reorth):
    kw = dict(num_probes=5, num_steps=30, seed=4, reorth=reorth)
    ref = hf.spectral_density(_operator(matrix), **kw)
    path = tmp_path / "slq.ckpt"
    with pytest.raises(Interrupted):
        hf.spectral_density(_operator(matrix, fail_after=5 * 17), checkpoint=path,
                            checkpoint_every=4, **kw)
    state = torch.load(path, weights_only=True)["state"]
    assert state["probe"]["j"] == 16  # the last save before the interruption
    A = _operator(matrix)
    out = hf.spectral_density(A, checkpoint=path, checkpoint_every=4, **kw)
    assert A.num_matvecs == 5 * (30 - 16)
    assert torch.equal(out.nodes, ref.nodes) and torch.equal(out.weights, ref.weights)
    assert out.num_matvecs == ref.num_matvecs == 5 * 30
    assert out.num_passes == ref.num_passes


def test_slq_resume_across_groups(matrix, tmp_path, monkeypatch):
    """Probes streamed in groups: finished groups and the generator state are saved too."""
    import hessfast.density.api as api

    monkeypatch.setattr(api, "slq_group_size", lambda *a: 3)
    kw = dict(num_probes=7, num_steps=12, seed=2)
    ref = hf.spectral_density(_operator(matrix), **kw)
    assert ref.num_passes == 3 * 12
    path = tmp_path / "g.ckpt"
    with pytest.raises(Interrupted):
        hf.spectral_density(_operator(matrix, fail_after=3 * 12 + 3 * 5), checkpoint=path,
                            checkpoint_every=1, **kw)
    state = torch.load(path, weights_only=True)["state"]
    assert state["start"] == 3 and len(state["parts"]) == 1
    A = _operator(matrix)
    out = hf.spectral_density(A, checkpoint=path, checkpoint_every=1, **kw)
    assert A.num_matvecs == ref.num_matvecs - state["used"] < ref.num_matvecs - 3 * 12
    assert torch.equal(out.nodes, ref.nodes) and torch.equal(out.weights, ref.weights)
    assert out.num_matvecs == ref.num_matvecs and out.status == ref.status
    assert os.path.exists(path)
