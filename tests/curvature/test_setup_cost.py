"""What building a curvature operator costs, as properties that cannot silently regress:
batch 0's graph is built once (shared by the pre-flight, the graph-size probe and the reuse
cache), the pre-flight adds one forward, torch.func is touched only when forward-over-reverse
is used, and the checks moved out of the construction (symmetry, path failures) still fire
on the first products."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch
from models import make_mlp, rel_err, seeded
from torch import nn

import hessfast as hf
from hessfast import errors

pytestmark = pytest.mark.usefixtures("single_thread", "no_leaking_global_state")


class _ForwardCounter:
    """Counts the model's forward calls per batch (batches told apart by their inputs)."""

    def __init__(self, model: nn.Module, batches: list) -> None:
        self._ids = {b[0].data_ptr(): i for i, b in enumerate(batches)}
        self.counts: Counter[int] = Counter()
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.counts[self._ids[args[0].data_ptr()]] += 1

    def close(self) -> None:
        self._handle.remove()


def _ones(k: int, n: int) -> torch.Tensor:
    return torch.ones(k, n, dtype=torch.float64)


@pytest.mark.parametrize(
    "check,deterministic,at_build",
    [(True, True, {0: 2}), (True, False, {0: 1}), (False, True, {})],
)
def test_each_graph_built_once(check, deterministic, at_build):
    """Auto mode, three batches: batch 0's graph is built once for the pre-flight, the
    graph-size probe and the reuse cache; the pre-flight's determinism probe is one more
    forward of batch 0; later products, and the timing of a larger block, run no forward."""
    model, loss_fn, batches = make_mlp()
    counter = _ForwardCounter(model, batches)
    try:
        H = hf.hessian(model, loss_fn, batches, check=check, check_deterministic=deterministic)
        assert dict(counter.counts) == at_build
        H.matmat(_ones(1, H.shape[0]))
        assert H.hvp_mode == "reuse_graph"
        after_first = {0: max(at_build.get(0, 0), 1), 1: 1, 2: 1}
        assert dict(counter.counts) == after_first
        H.matmat(_ones(3, H.shape[0]))
        H.matmat(_ones(8, H.shape[0]))  # k > 4: auto times graph-reuse chunks on batch 0
        assert dict(counter.counts) == after_first
    finally:
        counter.close()


def test_single_batch_graph_built_once():
    model, loss_fn, batches = make_mlp()
    counter = _ForwardCounter(model, batches)
    try:
        H = hf.hessian(model, loss_fn, batches[1])
        assert dict(counter.counts) == {1: 2}
        for k in (1, 2, 1):
            H.matmat(_ones(k, H.shape[0]))
        assert dict(counter.counts) == {1: 2}
    finally:
        counter.close()


_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    import hessfast as hf

    def seen():
        return {"torch_func": "torch._dynamo" in sys.modules, "sympy": "sympy" in sys.modules}

    out = {"import": seen()}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    crit = nn.CrossEntropyLoss()

    def loss(model, batch):
        return crit(model(batch[0]), batch[1])

    n = sum(p.numel() for p in model.parameters())
    for op in (hf.hessian(model, crit, batches), hf.hessian(model, loss, batches[0]),
               hf.ggn(model, crit, batches)):
        op.matmat(torch.ones(1, n, dtype=torch.float64))
        op.matmat(torch.ones(1, n, dtype=torch.float64))
    out["auto_k1"] = seen()
    hf.hessian(model, crit, batches).matmat(torch.ones(8, n, dtype=torch.float64))
    out["auto_k8"] = seen()
    hf.hessian(model, crit, batches, hvp_mode="fwd_rev")
    out["fwd_rev"] = seen()
    print(json.dumps(out))
    """
)


def test_torch_func_only_for_fwd_rev_and_no_sympy_for_single_vectors():
    """In a fresh process: graph reuse never touches torch.func (whose one-time
    initialisation imports torch._dynamo, 1-2.5 s), and single-vector products never import
    sympy (autograd does on its first call with a tensor grad_outputs, 0.5-1 s)."""
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["import"] == {"torch_func": False, "sympy": False}, out
    assert out["auto_k1"] == {"torch_func": False, "sympy": False}, out
    assert out["auto_k8"]["torch_func"] is False, out
    assert out["fwd_rev"]["torch_func"] is True, out  # the probe can see it


# ---------------------------------------------------------------------------------------
# checks completed on the first products
# ---------------------------------------------------------------------------------------
_M = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 3.0]], dtype=torch.float64)


class _SkewedGradient(torch.autograd.Function):
    """Forward 0.5 ||w||^2, backward ``M w``: not the gradient of the forward, and no
    gradient at all (its Jacobian ``M`` is not symmetric), so the "Hessian" that double
    backward computes is ``M^T``."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return 0.5 * (w * w).sum()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (w,) = ctx.saved_tensors
        return g * (_M @ w)


class _Vector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64))


def _skewed_loss(model, batch):
    return _SkewedGradient.apply(model.w) + 0.0 * batch.sum()


def _skewed():
    return _Vector(), _skewed_loss, torch.zeros(2, 1, dtype=torch.float64)


@pytest.mark.parametrize("blocks", [(2,), (1, 1)])
def test_asymmetric_operator_raises_on_the_first_products(blocks):
    model, loss_fn, data = _skewed()
    H = hf.hessian(model, loss_fn, data)  # the construction cannot see it
    eye = torch.eye(3, dtype=torch.float64)
    with pytest.raises(errors.AsymmetricOperatorError, match=r"(?i)not symmetric"):
        row = 0
        for k in blocks:
            H.matmat(eye[row : row + k])
            row += k


def test_asymmetry_accepted_without_the_checks():
    model, loss_fn, data = _skewed()
    for kwargs in ({"check": False}, {"check_deterministic": False}):
        H = hf.hessian(model, loss_fn, data, **kwargs)
        assert rel_err(H.to_dense(), _M.T) <= 1e-15  # column i is H e_i = M^T e_i


class _CubeGrad(torch.autograd.Function):
    """``3 x^2 g`` with a forward-mode rule but no reverse-mode derivative."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return 3 * x**2 * g

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, gg: torch.Tensor):
        raise RuntimeError("_CubeGrad has no second derivative")

    @staticmethod
    def jvp(ctx, tx: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:
        x, g = ctx.saved_tensors
        return 6 * x * g * tx + 3 * x**2 * tg


class _Cube(torch.autograd.Function):
    """``x^3``: double backward fails (in ``_CubeGrad``), forward-over-reverse works."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _CubeGrad.apply(x, g)

    @staticmethod
    def jvp(ctx, t: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * t


def _cube_loss(model, batch):
    return _Cube.apply(model.w).sum() + 0.0 * batch.sum()


@pytest.mark.parametrize("k", [1, 3])
def test_auto_falls_back_to_fwd_rev_when_double_backward_fails(k):
    with seeded(0):
        model = _Vector()
    data = torch.zeros(2, 1, dtype=torch.float64)
    H = hf.hessian(model, _cube_loss, data)
    out = H.matmat(torch.eye(3, dtype=torch.float64)[:k])
    assert H.hvp_mode == "fwd_rev"
    assert "unavailable" in H.hvp_mode_reason and "second derivative" in H.hvp_mode_reason
    expected = torch.diag(6 * model.w.detach())[:k]
    assert rel_err(out, expected) <= 1e-15
    assert H.num_passes == 1


@pytest.mark.parametrize("hvp_mode", ["reuse_graph", "double_backward"])
def test_explicit_graph_path_that_fails_names_the_alternative(hvp_mode):
    model = _Vector()
    H = hf.hessian(model, _cube_loss, torch.zeros(2, 1, dtype=torch.float64), hvp_mode=hvp_mode)
    with pytest.raises(errors.UnsupportedModelError, match="hvp_mode='fwd_rev' or 'auto'"):
        H.matmat(torch.ones(1, 3, dtype=torch.float64))
