"""The user's model and the process are untouched by curvature operators: training flags,
parameters, buffers (BN running stats, num_batches_tracked), .grad and the global RNG are
bit-identical after construction and after every product, also after an error."""

from __future__ import annotations

import pytest
import torch
from models import HVP_MODES, assert_same_state, make_cnn, make_lm, make_mlp, snapshot

import hessfast as hf
from hessfast import errors

pytestmark = pytest.mark.usefixtures("single_thread", "no_leaking_global_state")


def _V(n: int, k: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randn(k, n, generator=g, dtype=torch.float64)


def _set_start_mode(model, start: str) -> None:
    model.train(start == "train")


@pytest.mark.parametrize("hvp_mode", HVP_MODES)
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
@pytest.mark.parametrize("start", ["train", "eval"])
def test_cnn_state_untouched(start, bn_mode, hvp_mode):
    model, loss_fn, batches = make_cnn()
    _set_start_mode(model, start)
    before = snapshot(model)
    H = hf.hessian(model, loss_fn, batches, bn_mode=bn_mode, hvp_mode=hvp_mode)
    assert_same_state(model, before)
    H.matmat(_V(H.shape[0]))
    assert_same_state(model, before)
    H.matvec(_V(H.shape[0], 1)[0])
    assert_same_state(model, before)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
@pytest.mark.parametrize("start", ["train", "eval"])
def test_cnn_state_untouched_ggn(start, bn_mode):
    model, loss_fn, batches = make_cnn()
    _set_start_mode(model, start)
    before = snapshot(model)
    G = hf.ggn(model, loss_fn, batches, bn_mode=bn_mode)
    assert_same_state(model, before)
    G.matmat(_V(G.shape[0]))
    assert_same_state(model, before)


@pytest.mark.parametrize("hvp_mode", HVP_MODES)
def test_existing_grads_unchanged(hvp_mode):
    """An existing .grad keeps its object and value; a None .grad stays None."""
    model, loss_fn, batches = make_cnn()
    g = torch.Generator().manual_seed(7)
    model.conv.weight.grad = torch.randn(model.conv.weight.shape, generator=g, dtype=torch.float64)
    model.fc.bias.grad = torch.zeros_like(model.fc.bias)
    before = snapshot(model)
    H = hf.hessian(model, loss_fn, batches, hvp_mode=hvp_mode)
    H.matmat(_V(H.shape[0]))
    assert_same_state(model, before)


def test_state_untouched_lm_and_mlp():
    for build in (make_lm, make_mlp):
        model, loss_fn, batches = build()
        before = snapshot(model)
        H = hf.hessian(model, loss_fn, batches)
        H.to_dense()
        assert_same_state(model, before)


def test_bn_train_mode_does_not_update_running_stats_across_many_products():
    model, loss_fn, batches = make_cnn()
    model.train()
    before = snapshot(model)
    H = hf.hessian(model, loss_fn, batches, bn_mode="train")
    for _ in range(3):
        H.matmat(_V(H.shape[0], 2))
    assert_same_state(model, before)
    assert int(model.bn.num_batches_tracked) == 7


def test_as_is_state_untouched():
    model, loss_fn, batches = make_cnn()
    model.eval()
    before = snapshot(model)
    H = hf.hessian(model, loss_fn, batches, bn_mode="as_is")
    H.matmat(_V(H.shape[0]))
    assert_same_state(model, before)


def test_state_restored_after_error():
    """A NonDeterministicError from the pre-flight (as_is + train-mode dropout) leaves the
    model and RNG exactly as they were."""
    model, loss_fn, batches = make_cnn(p_drop=0.5)
    model.train()
    before = snapshot(model)
    with pytest.raises(errors.NonDeterministicError):
        hf.hessian(model, loss_fn, batches, bn_mode="as_is")
    assert_same_state(model, before)


def test_state_restored_after_nonfinite_error():
    model, loss_fn, batches = make_cnn()
    x, y = batches[2]
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    batches[2] = (x, y)
    model.train()
    before = snapshot(model)
    with pytest.raises(errors.NonFiniteError):
        H = hf.hessian(model, loss_fn, batches, bn_mode="train", check=False)
        H.matmat(_V(H.shape[0]))
    assert_same_state(model, before)


def test_rng_untouched_by_shuffled_loader_with_check_false():
    """A shuffle=True loader draws its seed from the global RNG on every pass; the operator
    must restore the RNG (and may still refuse the changed batches at product time)."""
    model, loss_fn, batches = make_mlp()
    X = torch.cat([b[0] for b in batches])
    Y = torch.cat([b[1] for b in batches])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, Y), batch_size=8, shuffle=True
    )
    before = snapshot(model)
    H = hf.hessian(model, loss_fn, loader, check=False)
    assert_same_state(model, before)
    try:
        H.matmat(_V(H.shape[0]))
    except errors.DataChangedError:
        pass
    assert_same_state(model, before)


def test_requires_grad_flags_untouched_with_subset():
    model, loss_fn, batches = make_cnn()
    model.conv.bias.requires_grad_(False)
    before = snapshot(model)
    H = hf.hessian(model, loss_fn, batches, params=["fc.weight"])
    H.matmat(_V(H.shape[0]))
    assert_same_state(model, before)
    assert model.conv.bias.requires_grad is False
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "conv.bias")


def test_rng_untouched_by_plain_dataloader():
    """Iterating any DataLoader (even shuffle=False) draws a base seed from the global RNG;
    the operator iterates the user's loader on every pass, so it must fork the RNG there."""
    model, loss_fn, batches = make_mlp()
    X = torch.cat([b[0] for b in batches])
    Y = torch.cat([b[1] for b in batches])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, Y), batch_size=8, shuffle=False
    )
    before = snapshot(model)
    H = hf.hessian(model, loss_fn, loader)
    assert_same_state(model, before)
    H.matmat(_V(H.shape[0]))
    assert_same_state(model, before)


def test_operator_keeps_buffer_values_of_construction():
    """Buffers are copied at construction (an operator is a snapshot): BN running statistics
    the user changes afterwards (a train-mode forward) neither reach the operator nor are
    reached by it."""
    model, loss_fn, batches = make_cnn()
    model.eval()
    H = hf.hessian(model, loss_fn, batches)
    V = _V(H.shape[0], 2)
    first = H.matmat(V)
    with torch.no_grad():
        model.bn.running_mean.add_(0.5)
        model.bn.running_var.mul_(2.0)
    before = snapshot(model)
    assert torch.equal(H.matmat(V), first)
    assert_same_state(model, before)
