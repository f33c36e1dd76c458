"""Issue 8, part A: the user's model is never touched, and parameter changes are caught.

* a module reused at two places keeps its nn.Parameters through every public call;
* a forward that writes buffers (counters, running averages, FakeQuantize observers) leaves
  the user's buffers bit-identical, and the operator is a fixed function;
* DistributedDataParallel is refused without a process group, DataParallel unwrapped;
* flatten/unflatten refuse wrong sizes and missing names;
* an operator is a snapshot: a product after the parameters changed raises;
* meta models, bare-string ``params`` and fp16 models get clear answers.
"""

from __future__ import annotations

import copy
import socket
import warnings

import pytest
import torch
from models import (
    HVP_MODES,
    assert_same_state,
    dense_ggn_reference,
    dense_hessian_reference,
    rel_err,
    seeded,
    shared_module_mlp,
    snapshot,
)
from torch import nn

import hessfast as hf
from hessfast import errors
from hessfast.curvature.guard import SlotGuard

pytestmark = pytest.mark.usefixtures("single_thread", "no_leaking_global_state")


def _V(n: int, k: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randn(k, n, generator=g, dtype=torch.float64)


def _sq(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def _sgd_step_changes_shared_weight(model: nn.Module, loss_fn, batch) -> None:
    """The user's own optimizer, built on the model's Parameters, still trains them."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w0 = model[0].weight.detach().clone()
    opt.zero_grad()
    loss_fn(model(batch[0]), batch[1]).backward()
    opt.step()
    assert not torch.equal(model[0].weight.detach(), w0), "SGD step left the shared layer"


# ---------------------------------------------------------------------------------------
# 1. a module reused at two places
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("hvp_mode", HVP_MODES)
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_shared_module_keeps_parameters(kind, hvp_mode):
    model, loss_fn, batch = shared_module_mlp()
    before = snapshot(model)
    build = hf.hessian if kind == "hessian" else hf.ggn
    if kind == "ggn" and hvp_mode == "fwd_rev":
        loss_fn = nn.MSELoss()  # the GGN keeps the criterion out of torch.func
    op = build(model, loss_fn, batch, hvp_mode=hvp_mode)
    assert_same_state(model, before)
    D = op.to_dense()
    assert_same_state(model, before)
    ref = (dense_hessian_reference if kind == "hessian" else dense_ggn_reference)(
        model, loss_fn, batch
    )
    assert rel_err(D, ref) < 1e-12
    _sgd_step_changes_shared_weight(model, loss_fn, batch)


def test_shared_module_every_public_call():
    """Every public entry point, then the user's optimizer still trains the shared layer."""
    model, loss_fn, batch = shared_module_mlp()
    model[4].weight.grad = torch.ones_like(model[4].weight)
    model.train()
    before = snapshot(model)
    H = hf.hessian(model, loss_fn, batch)
    n = H.shape[0]
    calls = [
        lambda: H.matmat(_V(n)),
        lambda: H.matvec(_V(n, 1)[0]),
        lambda: H @ _V(n, 1)[0],
        lambda: hf.eigsh(H, k=2, dense_below=0),
        lambda: hf.eigsh(H, k=2),
        lambda: hf.lambda_max(H, dense_below=0),
        lambda: hf.power_iteration(H, max_matvecs=20),
        lambda: hf.condition_number(H, num_probes=2, num_steps=5),
        lambda: hf.trace(H, 12),
        lambda: hf.diagonal(H, 12),
        lambda: hf.spectral_density(H, 2, 5, method="slq"),
        lambda: hf.spectral_density(H, 2, 5, method="kpm"),
        lambda: hf.ggn(model, loss_fn, batch).matmat(_V(n)),
    ]
    for i, call in enumerate(calls):
        call()
        assert_same_state(model, before), i
    _sgd_step_changes_shared_weight(model, loss_fn, batch)


def test_slot_guard_restores_swapped_parameters():
    """The second line of defence: whatever replaces a module's entries inside a guarded
    computation (torch's own weight tying on a shared module, pytorch#164759, or a forward
    that rebinds them) is put back by identity."""
    model, _, (x, _) = shared_module_mlp()
    before = snapshot(model)
    leaves = {n: p.detach().clone() for n, p in model.named_parameters()}
    with SlotGuard(model).hold():
        torch.func.functional_call(model, leaves, (x,))  # tie_weights=True, unguarded bug
        model[0]._parameters["weight"] = torch.zeros(3, 3, dtype=torch.float64)
        model[4]._parameters["extra"] = nn.Parameter(torch.zeros(1))
        model[4]._buffers["stray"] = torch.zeros(1)
    assert_same_state(model, before)
    assert "extra" not in model[4]._parameters and "stray" not in model[4]._buffers


# ---------------------------------------------------------------------------------------
# 2. forwards that write buffers
# ---------------------------------------------------------------------------------------


class CounterEMA(nn.Module):
    """Counts its calls and keeps an EMA of its inputs, both written in every forward; the
    output uses the EMA's value before the write."""

    def __init__(self) -> None:
        super().__init__()
        with seeded(1):
            self.lin = nn.Linear(3, 2).double()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.full((3,), 0.2, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(self.lin(x - self.ema))
        self.calls += 1
        self.ema.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return out


def _batches(sizes=(8, 5), d_in=3, d_out=2):
    with seeded(2):
        return [(torch.randn(s, d_in, dtype=torch.float64),
                 torch.randn(s, d_out, dtype=torch.float64)) for s in sizes]


def _fresh_buffer_reference(model, loss_fn, batches) -> torch.Tensor:
    """Dense float64 Hessian with every batch evaluated on a copy of the model holding the
    buffers' original values."""
    N = sum(b[0].shape[0] for b in batches)
    return sum(
        dense_hessian_reference(copy.deepcopy(model), loss_fn, [b]) * (b[0].shape[0] / N)
        for b in batches
    )


def _written_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "writes the buffer" in str(w.message)]


@pytest.mark.parametrize("hvp_mode", ["auto", "reuse_graph", "double_backward"])
def test_counter_ema_buffers_untouched(hvp_mode):
    model = CounterEMA()
    batches = _batches()
    before = snapshot(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        H = hf.hessian(model, _sq, batches, hvp_mode=hvp_mode)
        D1 = H.to_dense()
        D2 = H.to_dense()
    assert_same_state(model, before)
    assert int(model.calls) == 0
    msgs = _written_warnings(record)
    assert len(msgs) == 1 and "'calls'" in msgs[0] and "'ema'" in msgs[0], msgs
    assert "untouched" in msgs[0]
    assert torch.equal(D1, D2), "the operator is not a fixed function"
    assert rel_err(D1, _fresh_buffer_reference(model, _sq, batches)) < 1e-12


def test_fakequantize_observer_buffers_untouched():
    fq_mod = pytest.importorskip("torch.ao.quantization")

    class QAT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            with seeded(3):
                self.lin = nn.Linear(3, 4).double()
                self.out = nn.Linear(4, 2).double()
            self.fq = fq_mod.FakeQuantize()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.fq(self.lin(x))))

    model = QAT().eval()
    batches = _batches(sizes=(8,))
    before = snapshot(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        H = hf.hessian(model, _sq, batches)  # no NonDeterministicError blaming dropout
        D1 = H.to_dense()
        D2 = H.to_dense()
    assert_same_state(model, before)
    msgs = _written_warnings(record)
    assert len(msgs) == 1 and "fq.scale" in msgs[0], msgs
    assert torch.equal(D1, D2)
    assert rel_err(D1, _fresh_buffer_reference(model, _sq, batches)) < 1e-12


# ---------------------------------------------------------------------------------------
# 3. DistributedDataParallel refused without a group, DataParallel unwrapped
# ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_refused_without_group_unwrapped_with_one():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo not available")
    model, loss_fn, batch = shared_module_mlp()
    dist.init_process_group(
        "gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}"
    )
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        before = snapshot(model)
        with pytest.raises(errors.DistributedError, match=r"model\.module.*one process"):
            hf.hessian(ddp, loss_fn, batch, process_group=None)
        assert_same_state(model, before)
        # its own group (one rank here): unwrapped, the curvature of model.module
        H = hf.hessian(ddp, loss_fn, batch)
        assert H.model is model
        assert rel_err(H.to_dense(), dense_hessian_reference(model, loss_fn, batch)) < 1e-12
        assert_same_state(model, before)
    finally:
        dist.destroy_process_group()


def test_data_parallel_unwrapped():
    model, loss_fn, batch = shared_module_mlp()
    H = hf.hessian(nn.DataParallel(model), loss_fn, batch)
    assert rel_err(H.to_dense(), dense_hessian_reference(model, loss_fn, batch)) < 1e-12


# ---------------------------------------------------------------------------------------
# 4. flatten / unflatten
# ---------------------------------------------------------------------------------------


def test_unflatten_flatten_refuse_wrong_sizes():
    model, loss_fn, batch = shared_module_mlp()
    H = hf.hessian(model, loss_fn, batch, check=False)
    n = H.shape[0]
    for shape in [(n + 3,), (2, n + 1), (n - 1,), ()]:
        with pytest.raises(errors.ConfigurationError, match=rf"\[{n}\].*got shape"):
            H.unflatten(torch.zeros(shape, dtype=torch.float64))
    pieces = H.unflatten(_V(n, 1)[0])
    assert torch.equal(H.flatten(pieces), _V(n, 1)[0])
    assert torch.equal(H.unflatten(_V(n, 2))["0.weight"], _V(n, 2)[:, :9].reshape(2, 3, 3))
    missing = dict(pieces)
    del missing["4.bias"]
    with pytest.raises(errors.ConfigurationError, match=r"missing \['4\.bias'\]"):
        H.flatten(missing)
    with pytest.raises(errors.ConfigurationError, match="needs 4 tensors"):
        H.flatten(list(pieces.values())[:3])
    bad = dict(pieces, **{"0.bias": torch.zeros(4)})
    with pytest.raises(errors.ConfigurationError, match=r"0\.bias must have shape \(3,\)"):
        H.flatten(bad)


# ---------------------------------------------------------------------------------------
# 5. an operator is a snapshot: parameter changes are caught
# ---------------------------------------------------------------------------------------


def _changed(match: str):
    return pytest.raises(errors.ParametersChangedError, match=match)


@pytest.mark.parametrize("hvp_mode", HVP_MODES)
def test_optimizer_step_caught(hvp_mode):
    model, loss_fn, batch = shared_module_mlp()
    H = hf.hessian(model, loss_fn, batch, hvp_mode=hvp_mode)
    H.matmat(_V(H.shape[0]))
    _sgd_step_changes_shared_weight(model, loss_fn, batch)
    with _changed(r"0\.weight \(version\).*build a new operator: hf\.hessian\(model"):
        H.matmat(_V(H.shape[0]))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.float(), r"0\.weight \(dtype torch\.float64 -> torch\.float32"),
        (lambda m: m.to(torch.float32), r"dtype torch\.float64 -> torch\.float32"),
        (lambda m: setattr(m[4].bias, "data", m[4].bias.data * 2), r"4\.bias \(storage\)"),
        (lambda m: m[4].bias.data.add_(1e-12), r"4\.bias \(values changed in place\)"),
        (lambda m: m[4].weight.requires_grad_(False), r"requires_grad True -> False"),
        (lambda m: setattr(m[4], "bias", nn.Parameter(m[4].bias.detach().clone())),
         r"4\.bias \(replaced by another Parameter object\)"),
    ],
)
def test_parameter_changes_caught(change, match):
    model, loss_fn, batch = shared_module_mlp()
    G = hf.ggn(model, loss_fn, batch)
    G.matmat(_V(G.shape[0]))
    change(model)
    with _changed(match + r".*hf\.ggn\(model"):
        G.matmat(_V(G.shape[0]))


def test_parameter_change_mid_eigsh_caught():
    """An in-place change between two products inside eigsh stops it (it used to run out
    of budget with a MAX_MATVECS advising a larger budget)."""
    model, loss_fn, batch = shared_module_mlp()
    H = hf.hessian(model, loss_fn, batch, hvp_mode="double_backward")
    weight, seen = model[4].weight, []

    def step(module, args):
        seen.append(1)
        if len(seen) == 6:
            with torch.no_grad():
                weight.mul_(1.5)

    model.register_forward_pre_hook(step)
    with _changed(r"4\.weight"):
        hf.eigsh(H, k=3, tol=1e-10, block_size=1, dense_below=0)
    assert len(seen) == 6  # no forward ran after the change: the next product refused


def test_unchanged_parameters_never_raise():
    """Many products, mixed blocks: the fingerprint only fires on a change."""
    model, loss_fn, batch = shared_module_mlp()
    H = hf.hessian(model, loss_fn, batch)
    for k in (1, 3, 1, 5):
        H.matmat(_V(H.shape[0], k))


# ---------------------------------------------------------------------------------------
# 6. meta models, params as a bare string
# ---------------------------------------------------------------------------------------


def test_meta_model_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    batch = (torch.randn(4, 3), torch.randn(4, 1))
    with pytest.raises(errors.ConfigurationError, match=r"meta device.*to_empty\(device="):
        hf.hessian(model, _sq, batch)


def test_params_bare_string_refused_generator_accepted():
    model, loss_fn, batch = shared_module_mlp()
    with pytest.raises(errors.ArgumentTypeError, match=r"params=\['4\.weight'\]"):
        hf.hessian(model, loss_fn, batch, params="4.weight")
    with pytest.raises(errors.ArgumentTypeError, match="wrap it in a list"):
        hf.hessian(model, loss_fn, batch, params=model[4].weight)
    H = hf.hessian(model, loss_fn, batch, params=(p for p in model[4].parameters()))
    assert H.param_names == ["4.weight", "4.bias"]


# ---------------------------------------------------------------------------------------
# 7. fp16 / bf16 models
# ---------------------------------------------------------------------------------------


def _small_mlp(dtype: torch.dtype):
    with seeded(4):
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
        batch = (torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64))
    low = copy.deepcopy(model).to(dtype)
    return model, low, batch, tuple(t.to(dtype) for t in batch)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_models(dtype):
    model, low, batch, low_batch = _small_mlp(dtype)
    before = snapshot(low)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        H = hf.hessian(low, _sq, low_batch)
        D = H.to_dense()
        H.matmat(_V(H.shape[0]).float())
    fp16 = [str(w.message) for w in record if "float16 model" in str(w.message)]
    if dtype == torch.float16:
        assert len(fp16) == 1 and fp16[0].startswith("hessfast:") and "bfloat16" in fp16[0]
    else:
        assert fp16 == []
    assert D.dtype == torch.float32 and torch.isfinite(D).all()
    assert rel_err(D, dense_hessian_reference(model, _sq, batch)) < (
        1e-2 if dtype == torch.float16 else 3e-2
    )
    assert_same_state(low, before)
