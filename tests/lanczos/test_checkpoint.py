"""Checkpoint/resume of eigsh and SLQ (hessfast/lanczos/checkpoint.py): a run interrupted
after some products and resumed from its file gives the uninterrupted result bitwise
(float64, same seed), with the same total num_matvecs, a warning and resumed_from_step; a
KeyboardInterrupt or SIGTERM saves at once (a real SIGINT during a restart waits for the next
step); a file made by another run (arguments, a model's parameters or data, a matrix) is
refused naming the difference; a corrupt file gets our message; the file is written
atomically."""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
from torch import nn

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
    with pytest.warns(UserWarning, match=f"resumed from step {state['passes']} of"):
        out = hf.eigsh(A, checkpoint=path, checkpoint_every=3, **kw)
    assert out.resumed_from_step == state["passes"]
    assert A.num_matvecs == ref.num_matvecs - state["used"]  # resumed, not restarted
    _same_eigsh(out, ref)
    exact = torch.linalg.eigvalsh(matrix).flip(0)[:3]
    assert torch.allclose(out.eigenvalues, exact, rtol=1e-9)


def test_eigsh_resume_twice_and_budget_not_fingerprinted(matrix, tmp_path):
    kw = dict(k=3, tol=1e-10, max_basis=10, seed=1)
    ref = hf.eigsh(_operator(matrix), **kw)
    path = tmp_path / "e.ckpt"
    for cut in (ref.num_matvecs // 3, 2 * ref.num_matvecs // 3):
        with pytest.raises(Interrupted), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the second resumes the first
            hf.eigsh(_operator(matrix, fail_after=cut - (cut // 3)), checkpoint=path,
                     checkpoint_every=1, **kw)
    with pytest.warns(UserWarning, match="resumed from step"):
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
    with pytest.warns(UserWarning, match="resumed from step"), pytest.raises(Interrupted):
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
    with pytest.warns(UserWarning, match="resumed from step 16 of"):
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
    with pytest.warns(UserWarning, match=f"resumed from step {state['passes']} of"):
        out = hf.spectral_density(A, checkpoint=path, checkpoint_every=1, **kw)
    assert A.num_matvecs == ref.num_matvecs - state["used"] < ref.num_matvecs - 3 * 12
    assert torch.equal(out.nodes, ref.nodes) and torch.equal(out.weights, ref.weights)
    assert out.num_matvecs == ref.num_matvecs and out.status == ref.status
    assert os.path.exists(path)


# -- the file binds to the operator (parameters, data), interrupts save, resumes say so -------

class Stopping(hf.LinearOperator):
    """``inner`` that raises ``exc`` (or sends itself ``signal``) during its ``at``-th product:
    a run interrupted at step ``at`` (a Ctrl-C or SIGTERM while the data pass runs). Its
    state is ``inner``'s, so the resumed run may use ``inner`` itself."""

    def __init__(self, inner: hf.LinearOperator, at: int, exc: type = KeyboardInterrupt,
                 send: int | None = None) -> None:
        super().__init__(inner.shape[0], inner.dtype, inner.device)
        self.inner, self.at, self.exc, self.send = inner, at, exc, send
        self.checked = True  # inner is checked (a matrix) or checks itself (a model)
        self.calls = 0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            if self.send is not None:
                os.kill(os.getpid(), self.send)  # delivered at the next bytecode
                for _ in range(1000):  # pragma: no branch - the handler raises here
                    time.sleep(0.001)
            raise self.exc
        return self.inner.matmat(V)

    def state_fingerprint(self) -> dict[str, str] | None:
        return self.inner.state_fingerprint()


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()


def _batches(seed: int = 1, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(8 * count, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (8 * count,), generator=g)
    return [(X[i : i + 8], y[i : i + 8]) for i in range(0, 8 * count, 8)]


def _hessian(model: nn.Module, data: list) -> hf.LinearOperator:
    return hf.hessian(model, nn.CrossEntropyLoss(), data)


MLP_KW = dict(k=2, which="LA", tol=1e-8, max_basis=10, seed=5)


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    """A finished MLP Hessian run's file (saved every step: it holds the last step)."""
    path = tmp_path_factory.mktemp("mlp") / "mlp.ckpt"
    ref = hf.eigsh(_hessian(_mlp(), _batches()), checkpoint=path, checkpoint_every=1, **MLP_KW)
    return path, ref


def _scaled(model: nn.Module, name: str, factor: float) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        dict(out.named_parameters())[name].mul_(factor)
    return out


def _changed_batch(data: list, index: int) -> list:
    out = list(data)
    X, y = out[index]
    X = X.clone()
    X[3, 2] += 1e-6
    out[index] = (X, y)
    return out


@pytest.mark.parametrize("change, expected", [
    ("one weight", r"parameter '2\.weight' \(values changed\)"),
    ("one entry of one weight", r"parameter '0\.bias' \(values changed\)"),
    ("one batch", r"the data \(batch 2 changed\)"),
    ("fewer batches", r"the data \(4 batches in the file's run, 3 now\)"),
    ("dtype", r"parameter '0\.weight' \(\(10, 6\) float64 -> \(10, 6\) float32\)"),
    ("k", r"k: file 2, now 3"),
    ("GGN for Hessian", r"operator: file 'HessianOperator', now 'GGNOperator'"),
])
def test_model_checkpoint_refuses_every_change(mlp_file, change, expected):
    """A file of an MLP Hessian run is refused after any change of what the operator is a
    function of, naming it; the file is left as it was."""
    path, _ = mlp_file
    before = path.read_bytes()
    model, data, kw = _mlp(), _batches(), dict(MLP_KW)
    if change == "one weight":
        model = _scaled(model, "2.weight", 2.0)
    elif change == "one entry of one weight":
        with torch.no_grad():
            model[0].bias[4] = torch.nextafter(model[0].bias[4], torch.tensor(1.0).double())
    elif change == "one batch":
        data = _changed_batch(data, 2)
    elif change == "fewer batches":
        data = data[:3]
    elif change == "dtype":
        model = model.float()
        data = [(X.float(), y) for X, y in data]
    elif change == "k":
        kw["k"] = 3
    if change == "GGN for Hessian":
        A = hf.ggn(model, nn.CrossEntropyLoss(), data)
    else:
        A = _hessian(model, data)
    with pytest.raises(ConfigurationError, match=expected) as err:
        hf.eigsh(A, checkpoint=path, **kw)
    msg = str(err.value)
    assert "Delete the file to start afresh, or pass another path" in msg
    if change.startswith("one"):  # only what changed is named
        assert msg.count("parameter '") + msg.count("the data (") == 1, msg
    assert path.read_bytes() == before


def test_model_checkpoint_unchanged_operator_resumes(mlp_file):
    path, ref = mlp_file
    A = _hessian(_mlp(), _batches())  # a new operator of the same model and data
    with pytest.warns(UserWarning, match="resumed from step"):
        out = hf.eigsh(A, checkpoint=path, **MLP_KW)
    assert out.resumed_from_step == ref.num_passes - 1  # the last step's top
    assert ref.resumed_from_step is None
    _same_eigsh(out, ref)


def test_matrix_checkpoint_refuses_a_changed_entry(matrix, tmp_path):
    path = tmp_path / "m.ckpt"
    hf.eigsh(hf.LinearOperator.from_matrix(matrix), k=3, checkpoint=path, checkpoint_every=1)
    M2 = matrix.clone()
    M2[5, 7] = M2[7, 5] = M2[5, 7] * 2
    with pytest.raises(ConfigurationError, match="matrix: file "):
        hf.eigsh(hf.LinearOperator.from_matrix(M2), k=3, checkpoint=path)


@pytest.mark.parametrize("block_size", [1, 2])
@pytest.mark.parametrize("where", [0.0, 0.3, 0.6, 0.99])
def test_interrupt_saves_and_resumes_bitwise(matrix, tmp_path, block_size, where):
    """A KeyboardInterrupt during the product of step s, with the default checkpoint_every
    (60 s: no periodic save), writes the state at the top of step s; the resumed run equals
    the uninterrupted one bitwise and says where it resumed."""
    kw = dict(k=3, which="LA", tol=1e-10, max_basis=10, block_size=block_size, seed=7)
    A = hf.LinearOperator.from_matrix(matrix)
    ref = hf.eigsh(A, **kw)
    at = 1 + int(where * (ref.num_passes - 1))  # the product of step `at` raises
    path = tmp_path / "i.ckpt"
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    with pytest.warns(UserWarning, match="was saved"), pytest.raises(KeyboardInterrupt):
        hf.eigsh(Stopping(A, at), checkpoint=path, **kw)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert torch.load(path, weights_only=True)["step"] == at - 1
    B = hf.LinearOperator.from_matrix(matrix)
    with pytest.warns(UserWarning, match=f"resumed from step {at - 1} of"):
        out = hf.eigsh(B, checkpoint=path, **kw)
    assert out.resumed_from_step == at - 1
    assert B.num_passes == ref.num_passes - (at - 1)  # not repeated
    assert out.to_dict(vectors=False)["resumed_from_step"] == at - 1
    assert json.loads(out.to_json(vectors=False))["resumed_from_step"] == at - 1
    _same_eigsh(out, ref)


@pytest.mark.parametrize("where", [0.4, 0.7, 0.9])
def test_interrupt_during_verification_rounds_resumes_bitwise(tmp_path, where):
    """An eigenvalue of multiplicity 19 among the wanted at block size 1 takes many
    verification rounds, whose dropped rows (kept for exact residuals) are part of the saved
    state: a run resumed mid-rounds equals the uninterrupted one bitwise, residuals
    included (without them it falls back to the looser bound and takes another path)."""
    lam = torch.cat([torch.full((20,), -9.5, dtype=torch.float64),
                     torch.tensor([-11.5], dtype=torch.float64),
                     torch.linspace(-8.0, 8.0, 99, dtype=torch.float64)])
    M, _ = spectra.with_spectrum(lam, seed=40)
    kw = dict(k=20, which="SA", tol=1e-8, block_size=1, seed=27, max_matvecs=6000)
    ref = hf.eigsh(hf.LinearOperator.from_matrix(M), **kw)
    assert ref.status == "CONVERGED"
    at = 1 + int(where * (ref.num_passes - 1))
    path = tmp_path / "v.ckpt"
    with pytest.warns(UserWarning, match="was saved"), pytest.raises(KeyboardInterrupt):
        hf.eigsh(Stopping(hf.LinearOperator.from_matrix(M), at), checkpoint=path, **kw)
    assert torch.load(path, weights_only=True)["state"]["D"].shape[0] > 0  # mid-rounds
    with pytest.warns(UserWarning, match="resumed from step"):
        out = hf.eigsh(hf.LinearOperator.from_matrix(M), checkpoint=path, **kw)
    _same_eigsh(out, ref)


def test_interrupt_of_a_model_run_resumes_bitwise(tmp_path):
    kw = dict(MLP_KW, tol=1e-10)
    ref = hf.eigsh(_hessian(_mlp(), _batches()), **kw)
    path = tmp_path / "mi.ckpt"
    at = ref.num_passes // 2
    with pytest.warns(UserWarning, match="was saved"), pytest.raises(KeyboardInterrupt):
        hf.eigsh(Stopping(_hessian(_mlp(), _batches()), at), checkpoint=path, **kw)
    with pytest.warns(UserWarning, match="resumed from step"):
        out = hf.eigsh(_hessian(_mlp(), _batches()), checkpoint=path, **kw)
    assert out.resumed_from_step == at - 1
    _same_eigsh(out, ref)


@pytest.mark.parametrize("at", [1, 7, 23, 38])
def test_slq_interrupt_saves_and_resumes_bitwise(matrix, tmp_path, at):
    kw = dict(num_probes=3, num_steps=40, seed=4)
    ref = hf.spectral_density(hf.LinearOperator.from_matrix(matrix), **kw)
    path = tmp_path / "s.ckpt"
    with pytest.warns(UserWarning, match="was saved"), pytest.raises(KeyboardInterrupt):
        hf.spectral_density(Stopping(hf.LinearOperator.from_matrix(matrix), at),
                            checkpoint=path, **kw)
    with pytest.warns(UserWarning, match=f"resumed from step {at - 1} of"):
        out = hf.spectral_density(hf.LinearOperator.from_matrix(matrix), checkpoint=path, **kw)
    assert out.resumed_from_step == at - 1 and ref.resumed_from_step is None
    assert json.loads(out.to_json())["resumed_from_step"] == at - 1
    assert hf.SpectralDensity.from_dict(out.to_dict()).resumed_from_step == at - 1
    assert torch.equal(out.nodes, ref.nodes) and torch.equal(out.weights, ref.weights)
    assert out.num_matvecs == ref.num_matvecs and out.num_passes == ref.num_passes


def test_sigint_during_a_restart_waits_for_the_next_step(matrix, tmp_path, monkeypatch):
    """A real SIGINT that arrives while a thick restart rewrites the basis in place is held
    until the next step begins; the state saved then resumes bitwise."""
    from hessfast.lanczos import restart

    kw = dict(k=3, which="LA", tol=1e-10, max_basis=10, seed=7)
    ref = hf.eigsh(hf.LinearOperator.from_matrix(matrix), **kw)
    original = restart.Run.restart
    calls = []

    def interrupted_restart(self, idx, *args, **kwargs):
        calls.append(self.A.num_passes)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode
            for _ in range(100):
                time.sleep(0.001)
        return original(self, idx, *args, **kwargs)

    monkeypatch.setattr(restart.Run, "restart", interrupted_restart)
    # Python's own SIGINT handler, whatever an earlier test in this process left installed
    # (torch.distributed's in-process groups of other tests may replace it)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    path = tmp_path / "r.ckpt"
    try:
        with pytest.warns(UserWarning, match="was saved"), pytest.raises(KeyboardInterrupt):
            hf.eigsh(hf.LinearOperator.from_matrix(matrix), checkpoint=path, **kw)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(restart.Run, "restart", original)
    step = torch.load(path, weights_only=True)["step"]
    assert step == calls[1]  # the top of the step after the restart
    with pytest.warns(UserWarning, match=f"resumed from step {step} of"):
        out = hf.eigsh(hf.LinearOperator.from_matrix(matrix), checkpoint=path, **kw)
    _same_eigsh(out, ref)


SIGTERM_SCRIPT = """
import sys, signal, torch, hessfast as hf
sys.path.insert(0, {tests!r})
from test_checkpoint import Stopping
from hessfast.testing import spectra
torch.set_num_threads(1)
M, _ = spectra.evenly_spaced(120, seed=3)
A = Stopping(hf.LinearOperator.from_matrix(M), {at}, send=signal.SIGTERM)
hf.eigsh(A, checkpoint={path!r}, **{kw!r})
print("not terminated")
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_sigterm_saves_then_terminates(matrix, tmp_path):
    """SIGTERM during a product: the state is saved, then the process ends by SIGTERM as it
    would have (the default handler restored and the signal delivered again)."""
    kw = dict(k=3, which="LA", tol=1e-10, max_basis=10, seed=7)
    ref = hf.eigsh(hf.LinearOperator.from_matrix(matrix), **kw)
    at = ref.num_passes // 2
    path = tmp_path / "t.ckpt"
    script = SIGTERM_SCRIPT.format(tests=os.path.dirname(__file__), at=at, path=str(path),
                                   kw=kw)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "not terminated" not in proc.stdout
    assert torch.load(path, weights_only=True)["step"] == at - 1
    with pytest.warns(UserWarning, match=f"resumed from step {at - 1}"):
        out = hf.eigsh(hf.LinearOperator.from_matrix(matrix), checkpoint=path, **kw)
    assert out.resumed_from_step == at - 1
    # the first half ran in another process: its BLAS may round differently there (MKL's
    # kernels depend on the buffers' alignment; seen with torch 2.14.1's wheel), so the
    # answer is compared to rounding; bitwise resume is asserted in-process above
    assert out.num_matvecs == ref.num_matvecs and out.status == ref.status
    assert torch.allclose(out.eigenvalues, ref.eigenvalues, rtol=0, atol=1e-12)
    assert torch.allclose(out.residuals, ref.residuals, rtol=1e-3, atol=1e-13)


def test_interrupt_in_a_thread_saves_and_own_sigterm_handler_kept(matrix, tmp_path):
    """In another thread no handler is installed (signal.signal would raise there) and a
    KeyboardInterrupt still saves; a SIGTERM handler of the user's own stays in place during
    the run, and a KeyboardInterrupt then saves too."""
    errors = []

    def run():
        try:
            hf.eigsh(Stopping(hf.LinearOperator.from_matrix(matrix), 6), k=3,
                     checkpoint=tmp_path / "t1")
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    t = threading.Thread(target=run)
    with warnings.catch_warnings(record=True):
        t.start()
        t.join()
    assert [type(e) for e in errors] == [KeyboardInterrupt]
    assert torch.load(tmp_path / "t1", weights_only=True)["step"] == 5

    seen = []

    def mine(signum, frame):
        pass

    class Watching(Stopping):
        def _matmat(self, V):
            seen.append(signal.getsignal(signal.SIGTERM))
            return super()._matmat(V)

    old = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.warns(UserWarning, match="was saved"), pytest.raises(KeyboardInterrupt):
            hf.eigsh(Watching(hf.LinearOperator.from_matrix(matrix), 4), k=3,
                     checkpoint=tmp_path / "t2")
    finally:
        signal.signal(signal.SIGTERM, old)
    assert seen and all(h is mine for h in seen)
    assert torch.load(tmp_path / "t2", weights_only=True)["step"] == 3


@pytest.mark.parametrize("content", ["garbage", "pickle"])
def test_corrupt_checkpoint_message_is_ours(matrix, tmp_path, content):
    path = tmp_path / "c.ckpt"
    if content == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    else:  # a pickle torch refuses with weights_only=True, advising weights_only=False
        torch.save({"format": 2, "state": argparse.Namespace(a=1)}, path)
    with pytest.raises(ConfigurationError, match="corrupt or not a hessfast checkpoint") as err:
        hf.eigsh(hf.LinearOperator.from_matrix(matrix), k=3, checkpoint=path)
    assert "weights_only" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert "Delete the file" in str(err.value)


def test_state_fingerprint_of_each_operator(matrix):
    """from_function: None (arguments only); from_matrix: the matrix's bits; a model
    operator: every parameter and buffer by name, the data per batch; the global RNG
    untouched by a DataLoader's pass."""
    f = hf.LinearOperator.from_function(lambda V: V @ matrix, 120, dtype=matrix.dtype)
    assert f.state_fingerprint() is None
    assert set(hf.LinearOperator.from_matrix(matrix).state_fingerprint()) == {"matrix"}
    model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Linear(10, 3)).double()
    data = _batches()
    X = torch.cat([x for x, _ in data])
    y = torch.cat([t for _, t in data])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8)
    H = _hessian(model, loader)
    rng = torch.get_rng_state()
    fp = H.state_fingerprint()
    assert torch.equal(torch.get_rng_state(), rng)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert {k.partition(":")[2] for k in fp if k.startswith(("parameter:", "buffer:"))} == \
        set(names)
    assert fp["data.batches"] == "4" and fp["data.samples"] == "32"
    assert len(fp["data.contents"].split(",")) == 4
    assert H.state_fingerprint() == fp  # deterministic
    assert _hessian(model, data).state_fingerprint()["data.contents"] == fp["data.contents"]


def test_gpt2_run_refuses_a_scaled_weight_and_fewer_batches_then_resumes(tmp_path):
    """The reported case on a tiny GPT-2: interrupted, then one weight matrix scaled by 2
    (the old code returned the file's eigenvalues in 0.0 s) or one batch fewer (the old code
    resumed the old basis): both refused, naming the parameter / the data; the unchanged
    model resumes bitwise."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=31, n_positions=8, n_embd=8, n_layer=1,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": (ids := torch.randint(0, 31, (2, 8), generator=g)),
                "labels": ids} for _ in range(4)]

    def loss(m, b):
        return m(**b).loss

    kw = dict(k=1, which="LA", tol=1e-6, max_basis=8, seed=3)
    ref = hf.eigsh(hf.hessian(model, loss, batches), **kw)
    path = tmp_path / "gpt2.ckpt"
    with pytest.warns(UserWarning, match="was saved"), pytest.raises(KeyboardInterrupt):
        hf.eigsh(Stopping(hf.hessian(model, loss, batches), 5), checkpoint=path, **kw)
    name = "transformer.h.0.mlp.c_fc.weight"
    scaled = _scaled(model, name, 2.0)
    with pytest.raises(ConfigurationError, match=rf"parameter '{re.escape(name)}' \(values"):
        hf.eigsh(hf.hessian(scaled, loss, batches), checkpoint=path, **kw)
    with pytest.raises(ConfigurationError, match=r"the data \(4 batches in the file's run, 3"):
        hf.eigsh(hf.hessian(model, loss, batches[:3]), checkpoint=path, **kw)
    with pytest.warns(UserWarning, match="resumed from step 4 of"):
        out = hf.eigsh(hf.hessian(model, loss, batches), checkpoint=path, **kw)
    assert out.resumed_from_step == 4
    _same_eigsh(out, ref)


def test_preconditioned_operator_binds_its_diagonal_and_h():
    from hessfast.analysis.precond import PreconditionedOperator
    from hessfast.lanczos.checkpoint import state_changes

    H = _hessian(_mlp(), _batches())
    d = torch.linspace(1.0, 2.0, H.shape[0], dtype=torch.float64)
    fp = PreconditionedOperator(H, d).state_fingerprint()
    assert {k: v for k, v in fp.items() if k != "preconditioner"} == H.state_fingerprint()
    d2 = d.clone()
    d2[7] *= 1.5
    assert state_changes(fp, PreconditionedOperator(H, d2).state_fingerprint()) == [
        f"preconditioner: file {fp['preconditioner']!r}, now "
        f"{PreconditionedOperator(H, d2).state_fingerprint()['preconditioner']!r}"]


DP_WORKER = """
import json, os, sys, warnings
import torch, torch.distributed as dist
from torch import nn
import hessfast as hf
rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=world)
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
g = torch.Generator().manual_seed(10 + rank)
X = torch.randn(16, 6, dtype=torch.float64, generator=g)
y = torch.randint(0, 3, (16,), generator=g)
kw = dict(k=2, tol=1e-8, max_basis=10, seed=5, checkpoint=os.path.join(out, "dp.ckpt"),
          checkpoint_every=1)
seen = {}
for case in ("fresh", "again", "rank 1's data changed"):
    if case.startswith("rank 1") and rank == 1:
        X[0, 0] += 1e-3
    H = hf.hessian(model, nn.CrossEntropyLoss(), [(X[:8], y[:8]), (X[8:], y[8:])])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = hf.eigsh(H, **kw)
        seen[case] = [r.eigenvalues.tolist(), r.resumed_from_step]
    except hf.errors.ConfigurationError as exc:
        seen[case] = str(exc)
with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
    json.dump(seen, fh)
dist.destroy_process_group()
"""


@pytest.mark.distributed
@pytest.mark.slow  # two rank processes: ~15 s on 2 cores
def test_data_parallel_ranks_bind_and_refuse_together(tmp_path):
    """Two gloo ranks, each with its own batches: the file binds to every rank's data; an
    unchanged rerun resumes on both, one rank's changed batch is refused on BOTH ranks
    (never one rank resuming while the other starts afresh)."""
    import socket

    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "worker.py"
    script.write_text(DP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", port, str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen[0] == seen[1]
    (vals, fresh), (again, step) = seen[0]["fresh"], seen[0]["again"]
    assert fresh is None and step is not None and again == vals
    assert "the data (rank 1 changed)" in seen[0]["rank 1's data changed"]


def test_interrupt_goes_on_when_the_save_fails(matrix, tmp_path, monkeypatch):
    """A full disk during the interrupt's save is reported; the KeyboardInterrupt still
    propagates (never replaced by the write's error)."""
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.warns(UserWarning, match="could not be saved"), pytest.raises(KeyboardInterrupt):
        hf.eigsh(Stopping(hf.LinearOperator.from_matrix(matrix), 4), k=3,
                 checkpoint=tmp_path / "f.ckpt")
    assert not (tmp_path / "f.ckpt").exists()
