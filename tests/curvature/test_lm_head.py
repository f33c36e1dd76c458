"""``hf.ggn(..., lm_head=...)``: the GGN split at the output head, its block computed by the
chunked linear-cross-entropy kernel (hessfast/curvature/lmhead.py), against the float64
dense GGN (explicit Jacobians) and the unsplit operator (itself checked against dense
references in test_transformers.py), with tied embeddings, parameter subsets and refusals."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import hessfast as hf
from hessfast.errors import ConfigurationError
from hessfast.testing.dense import dense_ggn_reference


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (10,), generator=g)
    y[1] = -100
    return model, [(x[:6], y[:6]), (x[6:], y[6:])]


@pytest.mark.parametrize("mode", ["double_backward", "reuse_graph"])
def test_mlp_head_split_equals_dense_ggn(mode):
    model, data = _mlp()
    G = hf.ggn(model, nn.CrossEntropyLoss(), data, lm_head=model[2], hvp_mode=mode)
    assert G.loss_head.startswith("fused linear cross-entropy")
    dense = G.matmat(torch.eye(G.shape[0], dtype=torch.float64))
    ref = dense_ggn_reference(model, nn.CrossEntropyLoss(), data)
    assert torch.allclose(dense, ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("params", [["2.weight"], ["2.bias"], ["0.weight", "2.bias"]])
def test_parameter_subsets(params):
    model, data = _mlp()
    A = hf.ggn(model, nn.CrossEntropyLoss(), data, params=params)
    B = hf.ggn(model, nn.CrossEntropyLoss(), data, params=params, lm_head=model[2])
    V = torch.randn(3, A.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(B.matmat(V), A.matmat(V), rtol=1e-11, atol=1e-14)


def _gpt2():
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a torchvision built for another torch breaks the import
        sys.modules["torchvision"] = None
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=40, n_positions=16,
                                  attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 40, (2, 6), generator=g)
    labels = ids.clone()
    labels[0, 2] = -100
    return model, [{"input_ids": ids, "labels": labels}]


@pytest.mark.parametrize("params", [None, ["transformer.wte.weight"],
                                    ["transformer.h.0.mlp.c_fc.weight"]])
def test_gpt2_tied_head_equals_unsplit_ggn(params):
    model, batches = _gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    A = hf.ggn(model, None, batches, causal_lm=True, params=params)
    B = hf.ggn(model, None, batches, causal_lm=True, params=params, lm_head=model.lm_head)
    V = torch.randn(3, A.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref = A.matmat(V)
    assert (B.matmat(V) - ref).norm() <= 1e-12 * ref.norm()
    assert (B.matmat(V[:1]) - ref[:1]).norm() <= 1e-12 * ref[:1].norm()
    # PSD and symmetric
    G = V @ B.matmat(V).T
    assert torch.allclose(G, G.T, rtol=1e-10, atol=1e-14)
    assert torch.linalg.eigvalsh(G).min() > -1e-12 * G.abs().max()


def test_refusals():
    model, data = _mlp()
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ConfigurationError, match="nn.Linear"):
        hf.ggn(model, loss, data, lm_head=model[1])
    with pytest.raises(ConfigurationError, match="not a submodule"):
        hf.ggn(model, loss, data, lm_head=nn.Linear(7, 4).double())
    with pytest.raises(ConfigurationError, match="cross-entropy"):
        hf.ggn(model, loss, data, lm_head=model[2], fused_loss=False)
    with pytest.raises(ConfigurationError, match="fwd_rev"):
        hf.ggn(model, loss, data, lm_head=model[2], hvp_mode="fwd_rev")
    squashed = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.Tanh()).double()
    with pytest.raises(ConfigurationError, match="not the head"):
        hf.ggn(squashed, loss, data, lm_head=squashed[2])
    wrapped = _WithSpare(model)
    with pytest.raises(ConfigurationError, match="not called"):
        hf.ggn(wrapped, loss, data, lm_head=wrapped.spare, params=["m.0.weight"])


class _WithSpare(nn.Module):
    """A model with a head-shaped submodule its forward never calls."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m, self.spare = m, nn.Linear(7, 4).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)
