"""The fused cross-entropy loss head (hessfast/curvature/cehead.py) inside ``hf.hessian`` and
``hf.ggn``: against float64 dense references (plain double backward, explicit Jacobians),
every product path, the cases that must fall back to autograd, and (under the Triton
interpreter, in a subprocess) the Triton kernel wired through the operators."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import hessfast as hf
from hessfast.curvature.cehead import CEHead, ce_spec, fused_cross_entropy
from hessfast.errors import BackendUnavailableError, ConfigurationError
from hessfast.kernels.ce_curvature import ce_backend
from hessfast.testing.dense import dense_ggn_reference, dense_hessian_reference

MODES = ("double_backward", "reuse_graph", "fwd_rev")


def _mlp_problem(seed: int = 0, classes: int = 6):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, classes)).double()
    x = torch.randn(14, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (14,), generator=g)
    y[2] = -100
    y[9] = -100
    return model, [(x[:8], y[:8]), (x[8:], y[8:])]


class _Seg(nn.Module):
    """Per-pixel classes: outputs ``[N, C, H, W]``, targets ``[N, H, W]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))


LOSSES = {
    "module-mean": nn.CrossEntropyLoss(),
    "module-sum-smoothing": nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.2),
    "functional": F.cross_entropy,
    "partial-sum": functools.partial(F.cross_entropy, reduction="sum"),
}


def _as_mean(loss):
    """The batch-mean form of a loss for the dense references, which weight batch losses by
    their sizes (hessfast divides a sum-reduced batch loss by its number of samples)."""
    if getattr(loss, "reduction", None) == "sum" or (
            isinstance(loss, functools.partial) and loss.keywords.get("reduction") == "sum"):
        return lambda out, y: loss(out, y) / len(y)
    return loss


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_spec_recognised_and_fused(name):
    model, data = _mlp_problem()
    H = hf.hessian(model, LOSSES[name], data)
    G = hf.ggn(model, LOSSES[name], data)
    assert ce_spec(LOSSES[name]) is not None
    assert H.loss_head.startswith("fused cross-entropy") and G.loss_head == H.loss_head


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_hessian_equals_dense_reference(name):
    model, data = _mlp_problem(1)
    ref = dense_hessian_reference(model, _as_mean(LOSSES[name]), data, loss_form="criterion")
    for mode in MODES:
        H = hf.hessian(model, LOSSES[name], data, hvp_mode=mode)
        dense = H.matmat(torch.eye(H.shape[0], dtype=torch.float64))
        assert torch.allclose(dense, ref, rtol=1e-10, atol=1e-12), mode
    # one vector at a time: the Triton-capable (unbatched) branch of the fused backward
    H = hf.hessian(model, LOSSES[name], data, hvp_mode="double_backward")
    e = torch.zeros(1, H.shape[0], dtype=torch.float64)
    e[0, 3] = 1.0
    assert torch.allclose(H.matmat(e)[0], ref[3], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_ggn_equals_dense_reference(name):
    model, data = _mlp_problem(2)
    ref = dense_ggn_reference(model, _as_mean(LOSSES[name]), data)
    for mode in MODES:
        G = hf.ggn(model, LOSSES[name], data, hvp_mode=mode)
        dense = G.matmat(torch.eye(G.shape[0], dtype=torch.float64))
        assert torch.allclose(dense, ref, rtol=1e-10, atol=1e-12), mode
    assert torch.linalg.eigvalsh(ref).min() > -1e-12  # PSD


def test_spatial_outputs_class_dim_one():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = _Seg().double()
    x = torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 4, 5), generator=g)
    y[0, 1, 2] = -100
    data = [(x, y)]
    loss = nn.CrossEntropyLoss()
    for kind, ref_fn in ((hf.hessian, dense_hessian_reference), (hf.ggn, dense_ggn_reference)):
        A = kind(model, loss, data)
        assert A.loss_head.startswith("fused")
        dense = A.matmat(torch.eye(A.shape[0], dtype=torch.float64))
        assert torch.allclose(dense, ref_fn(model, loss, data), rtol=1e-10, atol=1e-12)


def test_fallbacks_to_autograd():
    model, data = _mlp_problem(4)
    weighted = nn.CrossEntropyLoss(weight=torch.rand(6, dtype=torch.float64) + 0.5)

    class MyCE(nn.CrossEntropyLoss):
        def forward(self, x, y):
            return super().forward(x, y) * 2.0

    for loss in (weighted, MyCE(), nn.MSELoss()):
        assert ce_spec(loss) is None
    H = hf.hessian(model, weighted, data)
    assert H.loss_head == "autograd" and "not a cross-entropy" in H.loss_head_reason
    ref = dense_hessian_reference(model, weighted, data)
    assert torch.allclose(H.matmat(torch.eye(H.shape[0], dtype=torch.float64)), ref,
                          rtol=1e-10, atol=1e-12)
    off = hf.ggn(model, nn.CrossEntropyLoss(), data, fused_loss=False)
    assert off.loss_head == "autograd" and off.loss_head_reason == "fused_loss=False"
    with pytest.raises(ConfigurationError, match="fused_loss"):
        hf.hessian(model, nn.CrossEntropyLoss(), data, fused_loss="yes")


def test_probability_targets_use_autograd():
    model, data = _mlp_problem(5)
    soft = [(x, torch.softmax(torch.randn(len(x), 6, dtype=torch.float64), -1))
            for x, _ in data]
    loss = nn.CrossEntropyLoss()
    assert CEHead.build(ce_spec(loss), torch.zeros(3, 6), torch.rand(3, 6)) is None
    for kind, ref_fn in ((hf.hessian, dense_hessian_reference), (hf.ggn, dense_ggn_reference)):
        A = kind(model, loss, soft)
        dense = A.matmat(torch.eye(A.shape[0], dtype=torch.float64))
        assert torch.allclose(dense, ref_fn(model, loss, soft), rtol=1e-10, atol=1e-12)


def test_fused_function_first_and_second_derivatives():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -100, 6, 0, 3])
    spec = ce_spec(nn.CrossEntropyLoss(label_smoothing=0.1))
    ref = F.cross_entropy(logits, y, label_smoothing=0.1)
    got = fused_cross_entropy(spec, logits, y)
    assert torch.equal(got, ref)
    (g_ref,) = torch.autograd.grad(ref, logits, create_graph=True)
    (g_got,) = torch.autograd.grad(got, logits, create_graph=True)
    assert torch.allclose(g_got, g_ref, rtol=1e-12, atol=1e-15)
    v = torch.randn(5, 7, generator=g, dtype=torch.float64)
    (h_ref,) = torch.autograd.grad(g_ref, logits, v)
    (h_got,) = torch.autograd.grad(g_got, logits, v)
    assert torch.allclose(h_got, h_ref, rtol=1e-12, atol=1e-15)
    assert torch.all(h_got[1] == 0)


def test_bf16_logits_close_to_float64():
    model, data = _mlp_problem(7)
    ref = dense_ggn_reference(model, nn.CrossEntropyLoss(), data)
    low = hf.ggn(model.bfloat16(), nn.CrossEntropyLoss(),
                 [(x.bfloat16(), y) for x, y in data], check=False)
    dense = low.matmat(torch.eye(low.shape[0], dtype=torch.float32)).double()
    assert (dense - ref).abs().max() <= 0.05 * ref.abs().max()


def test_triton_forced_on_cpu_is_refused(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("HESSFAST_CE_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        ce_backend(torch.device("cpu"))
    monkeypatch.setenv("HESSFAST_CE_BACKEND", "fast")
    with pytest.raises(ConfigurationError, match="HESSFAST_CE_BACKEND"):
        ce_backend(torch.device("cpu"))


INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from torch import nn
    import hessfast as hf
    import hessfast.kernels.ce_curvature as cc
    from hessfast.testing.dense import dense_ggn_reference, dense_hessian_reference
    calls = []
    real = cc.ce_hessian_product_triton
    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)
    cc.ce_hessian_product_triton = counted
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 4, -100, 2, 1, 3])
    data = [(x, y)]
    out = {}
    for kind, ref_fn in (("hessian", dense_hessian_reference), ("ggn", dense_ggn_reference)):
        ref = ref_fn(model, nn.CrossEntropyLoss(), data)
        for mode in ("double_backward", "fwd_rev"):
            A = getattr(hf, kind)(model, nn.CrossEntropyLoss(), data, hvp_mode=mode)
            before = len(calls)
            I = torch.eye(A.shape[0], dtype=torch.float64)
            cols = torch.cat([A.matmat(I[i:i + 1]) for i in range(A.shape[0])])
            block = A.matmat(I[:3])
            err = max((cols - ref).abs().max().item(), (block - ref[:3]).abs().max().item())
            out[f"{kind}-{mode}"] = [A.loss_head, err, len(calls) - before]
    print(json.dumps(out))
    """
)


def test_operators_with_the_triton_kernel_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", HESSFAST_CE_BACKEND="triton")
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (head, err, calls) in res.items():
        assert head == "fused cross-entropy (triton)", name
        assert err < 1e-12, (name, err)
        if name != "hessian-fwd_rev":  # torch.func keeps the plain loss
            assert calls > 0, name
