"""FSDP-sharded models are refused with the cause and the fix (no exact second derivative
exists under FSDP), and a model of the user's that merely has FSDP loaded is not."""

from __future__ import annotations

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
    with pytest.raises(errors.UnsupportedModelError, match=r"sharded by FSDP.*full state dict"):
        hf.hessian(wrapped, loss_fn, batches)
    assert_same_state(wrapped, before)
    hf.hessian(model, loss_fn, batches)  # FSDP loaded, the model not sharded: fine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fully_shard_model_refused() -> None:
    """A real FSDP2 model (fully_shard on a 1-process gloo group) is refused."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo not available")
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group(
        "gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}"
    )
    try:
        model, loss_fn, batches = make_mlp(dtype=torch.float32)
        try:
            fully_shard(model)
        except Exception as exc:  # noqa: BLE001 - FSDP2 on CPU depends on the torch build
            pytest.skip(f"fully_shard unavailable on this CPU build: {exc}")
        with pytest.raises(errors.UnsupportedModelError, match="sharded by FSDP"):
            hf.hessian(model, loss_fn, batches, process_group=None)
    finally:
        dist.destroy_process_group()
