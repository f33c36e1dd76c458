"""The smaller bad-input cases of issue 16: each is refused with a specific hessfast error
that names the cause and the fix (or, for MemoryPlan, has the to_dict/to_json every result
has). Every test here failed on the code before its fix."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import hessfast as hf
from hessfast.errors import ArgumentTypeError, ConfigurationError
from hessfast.memory import MemoryPlan
from hessfast.testing import spectra


def _matrix_op(n: int = 7) -> hf.LinearOperator:
    M, _ = spectra.wishart(n)
    return hf.LinearOperator.from_matrix(M)


def _small_hessian() -> hf.LinearOperator:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(8, 1, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    return hf.hessian(model, nn.MSELoss(), [(X, y)])


# -- LinearOperator.from_function: what the function returns --------------------------------
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_from_function_complex_products_refused(dtype):
    """Complex products used to be cast to real with only torch's warning (the imaginary
    part dropped): now refused, naming the dtype that came back and the fix."""
    op = hf.LinearOperator.from_function(lambda V: (V * (1 + 1j)).to(dtype), 5,
                                         dtype=torch.float64, check=False)
    V = torch.ones(2, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "casting complex to real" on the way
        with pytest.raises(ArgumentTypeError, match=rf"returned dtype {dtype}.*real.*out\.real"):
            op.matmat(V)
    assert op.num_matvecs == 0


def test_from_function_complex_products_refused_by_an_algorithm():
    """The same through an algorithm: the operator's probe meets it first."""
    op = hf.LinearOperator.from_function(lambda V: V.to(torch.complex64), 30)
    with pytest.raises(ArgumentTypeError, match="complex64"):
        hf.eigsh(op, k=1)


def test_from_function_integer_products_refused():
    """An integer result (a truncated product) used to be cast to float silently."""
    op = hf.LinearOperator.from_function(lambda V: (3 * V).to(torch.int64), 4, check=False)
    with pytest.raises(ArgumentTypeError, match=r"returned dtype torch\.int64.*floating"):
        op.matmat(torch.full((1, 4), 0.4))


@pytest.mark.parametrize("fn", [lambda V: V[:, :3], lambda V: V.sum(0), lambda V: V.T])
def test_from_function_wrong_shape_refused(fn):
    """A product of the wrong shape is a hessfast ConfigurationError (it was a bare
    RuntimeError) that says how to return one product per row."""
    op = hf.LinearOperator.from_function(fn, 5, check=False)
    with pytest.raises(ConfigurationError, match=r"returned shape .* \[2, 5\].*one product per"):
        op.matmat(torch.ones(2, 5))


def test_from_function_float_products_of_another_dtype_accepted():
    """Real floating-point products in another precision are cast, as documented."""
    op = hf.LinearOperator.from_function(lambda V: 2 * V.double(), 3, check=False)
    out = op.matmat(torch.ones(2, 3))
    assert out.dtype == torch.float32 and torch.equal(out, torch.full((2, 3), 2.0))


# -- matmat: where the block lives ---------------------------------------------------------
@pytest.mark.parametrize("make", [_matrix_op, _small_hessian], ids=["matrix", "hessian"])
def test_matmat_of_a_meta_block_refused(make):
    """A meta-device block (shapes without data) raised torch's raw NotImplementedError
    ("Cannot copy out of meta tensor"); now a ConfigurationError naming the operator's
    device and how to create the vectors there. Nothing is counted."""
    op = make()
    n = op.shape[0]
    with pytest.raises(ConfigurationError, match=r"meta device.*lives on cpu.*device='cpu'"):
        op.matmat(torch.empty(2, n, device="meta", dtype=op.dtype))
    with pytest.raises(ConfigurationError, match="meta device"):
        op @ torch.empty(n, device="meta")
    assert op.num_matvecs == 0 and op.num_passes == 0


def test_matmat_argument_errors_are_hessfast_errors():
    """The block's other checks raise hessfast errors (still ValueError/TypeError)."""
    op = _matrix_op(4)
    with pytest.raises(ConfigurationError, match=r"\[k, 4\]"):
        op.matmat(torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ArgumentTypeError, match="floating-point"):
        op.matmat(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ArgumentTypeError, match="list"):
        op.matmat([[1.0] * 4])


# -- MemoryPlan: to_dict / to_json like every result ----------------------------------------
def _assert_plan_roundtrip(plan: MemoryPlan, tmp_path: Path) -> dict:
    text = plan.to_json()
    d = json.loads(text)
    assert d == json.loads(json.dumps(plan.to_dict()))
    assert d["kind"] == "MemoryPlan" and "_rebuild" not in d
    assert d["algorithm"] == plan.algorithm and d["n"] == plan.n
    assert d["basis_dtype"] == str(plan.basis_dtype) and d["device"] == str(plan.device)
    assert [tuple(i.values()) for i in d["items"]] == [
        (i.name, i.bytes, i.where, i.note) for i in plan.items
    ]
    assert d["totals"]["device"] == plan.total("device") and d["fits"] == plan.fits
    assert d["capacity"] == plan.capacity and d["settings"] == json.loads(
        json.dumps(plan.settings))
    path = tmp_path / "plan.json"
    assert plan.to_json(path, indent=1) == path.read_text(encoding="utf-8")
    assert json.loads(path.read_text(encoding="utf-8")) == d
    assert plan.to_dict(vectors=False) == plan.to_dict()
    return d


@pytest.mark.parametrize("algorithm", ["eigsh", "slq", "trace"])
def test_memory_plan_json_roundtrip(algorithm, tmp_path):
    plan = hf.estimate_memory(_matrix_op(30), algorithm)
    d = _assert_plan_roundtrip(plan, tmp_path)
    assert d["items"][1]["name"] == "basis"


def test_memory_plan_json_of_a_model(tmp_path):
    """A plan from an nn.Module (activations not measured)."""
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    plan = hf.estimate_memory(model, "slq", basis_device="cpu", available=10**9)
    d = _assert_plan_roundtrip(plan, tmp_path)
    assert d["activations_measured"] is False and d["n"] == 41
    with pytest.raises(ArgumentTypeError, match="vectors"):
        plan.to_dict(vectors="no")


# -- a forward that writes in place into a tensor autograd saved ----------------------------
class _InPlace(nn.Module):
    """``h = sigmoid(l1(x)); h.mul_(2)``: sigmoid saved h for its backward (``inplace``),
    or the same computed out of place."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.l1, self.l2, self.inplace = nn.Linear(3, 4), nn.Linear(4, 1), inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.l1(x))
        if self.inplace:
            h.mul_(2)
        else:
            h = h * 2
        return self.l2(h)


def _inplace_problem(inplace: bool) -> tuple[nn.Module, list]:
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(6, 3, generator=gen, dtype=torch.float64),
             torch.randn(6, 1, generator=gen, dtype=torch.float64)) for _ in range(2)]
    torch.manual_seed(0)
    return _InPlace(inplace).double(), data


_INPLACE_MSG = r"writes in place into a tensor that autograd saved.*Sigmoid.*h = h \* 2"


@pytest.mark.parametrize(
    "hvp_mode,check",
    [(m, c) for m in ("auto", "reuse_graph", "double_backward", "fwd_rev") for c in (True, False)
     if (m, c) != ("fwd_rev", False)],
)
def test_inplace_write_into_a_saved_tensor_refused_on_every_path(hvp_mode, check):
    """Torch refuses the first backward of this forward (sigmoid's saved output is at
    version 1). Every hvp_mode now raises the same error naming the op and the fix (auto
    used to report "neither path can differentiate this model", fwd_rev blamed torch.func):
    at construction, or at the first product with check=False. (fwd_rev with check=False
    builds no first-order graph: torch.func's own error, "ZeroTensors are immutable", says
    to use double_backward, which then gives this one.)"""
    model, data = _inplace_problem(True)
    with pytest.raises(hf.errors.UnsupportedModelError, match=_INPLACE_MSG):
        H = hf.hessian(model, nn.MSELoss(), data, hvp_mode=hvp_mode, check=check)
        H.matmat(torch.ones(1, H.shape[0], dtype=torch.float64))


def test_inplace_write_not_accepted_through_a_working_fwd_rev(monkeypatch):
    """Auto mode must not fall back to forward-over-reverse for such a forward, even where
    torch.func computes something (the audit's torch did; on torch 2.13 it raises too):
    simulated by a forward-over-reverse product that returns the Hessian of the out-of-place
    forward. Before the fix auto mode accepted the model through it."""
    ref_model, data = _inplace_problem(False)
    # (jvp of grad of F.mse_loss raises "ZeroTensors are immutable" in torch 2.13: the same
    # loss written out)
    H_ref = hf.hessian(ref_model, _mse, data, hvp_mode="fwd_rev")

    plain_fwd_rev = hf.HessianOperator._fwd_rev_product

    def working_fwd_rev(self, batch, V):
        return plain_fwd_rev(H_ref, batch, V)

    monkeypatch.setattr(hf.HessianOperator, "_fwd_rev_product", working_fwd_rev)
    model, data = _inplace_problem(True)
    with pytest.raises(hf.errors.UnsupportedModelError, match=_INPLACE_MSG):
        H = hf.hessian(model, _mse, data)
        H.matmat(torch.ones(1, H.shape[0], dtype=torch.float64))


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def _dense_double_backward(model: nn.Module, data: list) -> torch.Tensor:
    """float64 Hessian of the sample-mean MSE by plain double backward of unit vectors."""
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    N = sum(len(x) for x, _ in data)
    loss = sum(nn.functional.mse_loss(model(x), y) * len(x) for x, y in data) / N
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)])
    rows = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(g[i], params,
                                                                  retain_graph=True)])
            for i in range(n)]
    H = torch.stack(rows)
    assert torch.allclose(H, H.T, atol=1e-12)
    return H


class _InPlaceAllowed(nn.Module):
    """In-place writes autograd accepts (nothing it saved is overwritten): sigmoid_ of a
    matmul's output (the matmul saved its inputs, not its output), and mul_ of a sigmoid of
    the data (no graph)."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.l1, self.l2, self.inplace = nn.Linear(3, 4), nn.Linear(4, 1), inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(x)
        z = self.l1(s.mul_(2) if self.inplace else s * 2)
        h = z.sigmoid_() if self.inplace else torch.sigmoid(z)
        return self.l2(h * h)


@pytest.mark.parametrize("hvp_mode", ["auto", "reuse_graph", "double_backward"])
def test_inplace_writes_autograd_accepts_give_the_hessian(hvp_mode):
    """Where torch accepts the in-place writes, the graph paths (auto's choice) equal the
    float64 dense Hessian of the out-of-place forward built by plain double backward.
    (torch.func's forward-over-reverse refuses this forward: "ZeroTensors are immutable",
    reported as an UnsupportedModelError naming double_backward.)"""
    gen = torch.Generator().manual_seed(5)
    data = [(torch.randn(5, 3, generator=gen, dtype=torch.float64),
             torch.randn(5, 1, generator=gen, dtype=torch.float64)) for _ in range(2)]
    torch.manual_seed(1)
    model = _InPlaceAllowed(True).double()
    ref = _InPlaceAllowed(False).double()
    ref.load_state_dict(model.state_dict())
    H_ref = _dense_double_backward(ref, data)
    H = hf.hessian(model, nn.MSELoss(), data, hvp_mode=hvp_mode)
    D = H.to_dense()
    assert torch.allclose(D, H_ref, rtol=1e-10, atol=1e-12 * H_ref.abs().max().item())


# -- a loss whose second derivative is not finite at the parameters -------------------------
class _Singular(nn.Module):
    """``out = f(w) . x`` with ``f(w) = sqrt(w**2)`` (|w|: its gradient is 0/0 at w = 0) or
    ``|w|**1.5`` (gradient 0 at w = 0, second derivative infinite)."""

    def __init__(self, f: str, w: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fw = torch.sqrt(self.w**2) if self.f == "sqrt" else self.w.abs() ** 1.5
        return x @ fw[:, None] + self.b


def _singular_data() -> list:
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 3, generator=gen, dtype=torch.float64),
             torch.randn(8, 1, generator=gen, dtype=torch.float64))]


@pytest.mark.parametrize("hvp_mode", ["auto", "double_backward", "fwd_rev"])
def test_nonfinite_gradient_refused_at_construction(hvp_mode):
    """``sqrt(w**2)`` with a parameter exactly 0: the loss is finite, its gradient is 0/0.
    It used to be accepted at construction (NaN only at the first product); now a
    NonFiniteError at construction names the parameter (the gradient is in the graph the
    pre-flight builds anyway: no extra cost)."""
    with pytest.raises(hf.errors.NonFiniteError,
                       match=r"loss on batch 0 is finite .* gradient is NaN/Inf in \['w'\]"):
        hf.hessian(_Singular("sqrt", [0.0, 1.0, -2.0]), nn.MSELoss(), _singular_data(),
                   hvp_mode=hvp_mode)


@pytest.mark.parametrize("kind,f,w", [
    ("hessian", "pow", [1.0, 0.0, 0.5]),  # |w|**1.5 at 0: gradient 0, curvature infinite
    ("ggn", "sqrt", [0.0, 1.0, -2.0]),    # the GGN's graph holds no gradient to check
])
def test_nonfinite_curvature_named_at_the_first_product(kind, f, w):
    """Where the gradient is finite (or not in the graph), the first product raises
    NonFiniteError naming the parameters whose rows hold the NaN/Inf (it used to name
    none), before any algorithm runs on it."""
    op = getattr(hf, kind)(_Singular(f, w), nn.MSELoss(), _singular_data())
    with pytest.raises(hf.errors.NonFiniteError,
                       match=r"contains NaN/Inf in the rows of \['w'.*second derivative"):
        hf.lambda_max(op)


def test_regular_point_of_the_same_loss_accepted():
    """Away from 0 the same losses build and multiply (the check has no false alarm)."""
    for f in ("sqrt", "pow"):
        H = hf.hessian(_Singular(f, [0.3, 1.0, -2.0]), nn.MSELoss(), _singular_data())
        assert torch.isfinite(H.to_dense()).all()


# -- spectral_density: a budget of products far past what the question needs ----------------
def test_spectral_density_huge_budget_warns_before_any_product():
    """10**7 probes on n = 183 used to run for hours without a word: now a warning, before
    the first product, gives the planned count (probes x steps), the dense alternative and
    how to lower it. (Turned into an error here so the run stops at the warning.)"""
    A = _matrix_op(183)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=(
                r"plans 640,000,000 products .*10,000,000 probes x 64 steps.*"
                r"max_products=100,000.*eigvalsh\(A\.to_dense\(\)\).*Lower num_probes")):
            hf.spectral_density(A, num_probes=10**7)
    assert A.num_matvecs == 0


@pytest.mark.parametrize("method,kw", [("slq", {"num_steps": 30}), ("kpm", {"num_moments": 41})])
def test_spectral_density_planned_products_are_the_products_spent(method, kw):
    """The count in the warning is what the run then spends; max_products= at (or above)
    it runs without the warning."""
    A = _matrix_op(30)
    with pytest.warns(UserWarning, match=r"plans ([\d,]+) products") as rec:
        r = hf.spectral_density(A, num_probes=40, method=method, max_products=100, **kw)
    planned = [w for w in rec if "plans" in str(w.message)]
    assert len(planned) == 1
    count = int(str(planned[0].message).split("plans ")[1].split(" ")[0].replace(",", ""))
    assert count == r.num_matvecs > 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = hf.spectral_density(A, num_probes=40, method=method, max_products=count, **kw)
        hf.spectral_density(A, num_probes=8, method=method, **kw)  # the default bound
    assert again.num_matvecs == count


def test_spectral_density_max_products_checked():
    with pytest.raises(ConfigurationError, match="max_products"):
        hf.spectral_density(_matrix_op(10), max_products=0)
