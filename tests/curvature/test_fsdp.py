"""FSDP: FSDP1 models are refused with the cause and the fix (no exact second derivative,
and the finite-difference operator runs on FSDP2 only), and a model of the user's that merely
has FSDP loaded is not; an FSDP2 (``fully_shard``) model on a 1-process gloo group gets the
finite-difference operator (hessfast.curvature.fsdp), equal to the dense float64 Hessian
within its recorded error, and refused by ggn() and exact products. The multi-process runs
are tests/distributed/test_fsdp_fd.py."""

from __future__ import annotations

import inspect
import socket
import sys
import types

import pytest
import torch
from models import assert_same_state, make_mlp, snapshot
from torch import nn

import hessfast as hf
from hessfast import errors


def test_fsdp_wrapped_module_refused(monkeypatch) -> None:
    """The check looks for FSDP's classes in the loaded torch.distributed.fsdp module."""

    class FullyShardedDataParallel(nn.Module):  # stands in for FSDP1's wrapper class
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    fake = types.SimpleNamespace(FullyShardedDataParallel=FullyShardedDataParallel)
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", fake)
    model, loss_fn, batches = make_mlp()
    wrapped = nn.Sequential(FullyShardedDataParallel(model))
    before = snapshot(wrapped)
    with pytest.raises(errors.UnsupportedModelError,
                       match=r"sharded by FSDP1.*fully_shard.*full state dict"):
        hf.hessian(wrapped, loss_fn, batches)
    assert_same_state(wrapped, before)
    hf.hessian(model, loss_fn, batches)  # FSDP loaded, the model not sharded: fine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fully_shard_model_finite_differences() -> None:
    """A real FSDP2 model (fully_shard on a 1-process gloo group) gets the finite-difference
    operator: products equal the dense float64 Hessian times v within the recorded error,
    the parameters are restored bit for bit and ``.grad`` is left alone; ggn() is refused."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo not available")
    from torch.distributed.fsdp import fully_shard

    from hessfast.curvature.fsdp import FSDPHessian
    from hessfast.testing.dense import dense_hessian_reference

    dist.init_process_group(
        "gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}"
    )
    try:
        model, loss_fn, batches = make_mlp(dtype=torch.float64)
        dense = dense_hessian_reference(model, loss_fn, batches)
        try:
            fully_shard(model)
        except Exception as exc:  # noqa: BLE001 - FSDP2 on CPU depends on the torch build
            pytest.skip(f"fully_shard unavailable on this CPU build: {exc}")
        before = [p.to_local().clone() for p in model.parameters()]
        with pytest.warns(UserWarning, match="hessfast: the model is sharded by FSDP"):
            H = hf.hessian(model, loss_fn, batches)
        assert isinstance(H, FSDPHessian) and H.hvp_mode == "finite_difference"
        assert "cannot differentiate it twice" in H.hvp_mode_reason
        assert H.shards is not None and H.shards.size == 1 and H.shape[0] == dense.shape[0]
        V = torch.randn(2, H.shape[0], dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
        HV = H.matmat(V)
        want = V @ dense
        err = ((HV - want).norm(dim=1) / want.norm(dim=1)).max().item()
        assert H.fd_error is not None and 0 < H.fd_error < 1e-6
        assert err <= H.fd_error, (err, H.fd_error)
        assert H.fd_kinks == []  # Tanh: no kinked function, no warning
        assert (H.num_matvecs, H.num_passes) == (2, 1)
        # 2 rows x 2, 1 at construction, and the one-time step search (pairs of gradients)
        assert H.num_gradients >= 13 and (H.num_gradients - 5) % 2 == 0, H.num_gradients
        assert all(p.to_local().view(torch.uint8).equal(b.view(torch.uint8))
                   for p, b in zip(model.parameters(), before, strict=True))
        assert all(p.grad is None for p in model.parameters())
        with pytest.raises(errors.UnsupportedModelError, match=r"fully_shard.*hf.hessian"):
            hf.ggn(model, loss_fn, batches)
        with pytest.raises(errors.ConfigurationError, match="finite differences"):
            hf.hessian(model, loss_fn, batches, hvp_mode="double_backward")
        if "exact" in inspect.signature(hf.hessian).parameters:
            with pytest.raises(errors.ConfigurationError, match="exact=True.*FSDP"):
                hf.hessian(model, loss_fn, batches, exact=True)
        # active dropout (bn_mode="as_is" keeps the model's train mode): refused, not noise
        noisy = nn.Sequential(make_mlp(dtype=torch.float64)[0], nn.Dropout(0.5))
        fully_shard(noisy)
        noisy.train()
        kept = [p.to_local().clone() for p in noisy.parameters()]
        with pytest.raises(errors.NonDeterministicError, match=r"Dropout.*bn_mode='eval'"):
            hf.hessian(noisy, loss_fn, batches, bn_mode="as_is")
        assert all(p.to_local().view(torch.uint8).equal(b.view(torch.uint8))
                   for p, b in zip(noisy.parameters(), kept, strict=True))
        assert all(p.grad is None for p in noisy.parameters()) and noisy.training
        # a ReLU on the logits: the first product names it and warns (a bias fd_error
        # cannot see)
        kinked = nn.Sequential(make_mlp(dtype=torch.float64)[0], nn.ReLU())
        fully_shard(kinked)
        with pytest.warns(UserWarning, match="FSDP"):
            Hk = hf.hessian(kinked, loss_fn, batches)
        assert Hk.fd_kinks is None  # known from the first product on
        with pytest.warns(UserWarning, match=r"loss runs relu.*H.fd_kinks"):
            Hk.matvec(torch.ones(Hk.shape[0], dtype=torch.float64))
        assert Hk.fd_kinks == ["relu"]
    finally:
        dist.destroy_process_group()
