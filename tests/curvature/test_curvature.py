"""Curvature operators (hf.hessian, hf.ggn, hf.LinearOperator) against exact float64
references: dense double-backward Hessians, explicit J^T H J, and closed forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import (
    BUILDERS,
    HVP_MODES,
    default_batch_size,
    dense_hessian_reference,
    lm_loss,
    make_cnn,
    make_lm,
    make_mlp,
    rel_err,
    reorder_reference,
    seeded,
    trainable_names,
)
from torch import nn

import hessfast as hf
from hessfast.errors import UnsupportedModelError

pytestmark = pytest.mark.usefixtures("single_thread", "no_leaking_global_state")

TOL = 1e-10
KINDS = ("mlp", "cnn", "lm")
PATHS = ("reuse_graph", "double_backward", "fwd_rev")


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _in_op_order(ref: torch.Tensor, model: nn.Module, op) -> torch.Tensor:
    return reorder_reference(ref, model, trainable_names(model), op.param_names)


def _check_mode(op, requested: str) -> None:
    """After a product: the path actually used (auto may decide lazily on first product)."""
    if requested == "auto":
        assert op.hvp_mode in PATHS, op.hvp_mode
    else:
        assert op.hvp_mode == requested
    assert isinstance(op.hvp_mode_reason, str) and op.hvp_mode_reason.strip()


# ---------------------------------------------------------------------------------------
# 1. Hessian of the three models, every HVP path
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("hvp_mode", HVP_MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_hessian_to_dense_matches_reference(kind, hvp_mode, refs):
    model, loss_fn, batches = BUILDERS[kind]()
    H = hf.hessian(model, loss_fn, batches, hvp_mode=hvp_mode)
    n = sum(p.numel() for p in model.parameters())
    assert H.shape == (n, n)
    assert H.dtype == torch.float64
    assert torch.device(H.device).type == "cpu"
    assert H.num_samples == sum(default_batch_size(b) for b in batches)
    assert H.num_batches == len(batches)
    D = H.to_dense()
    _check_mode(H, hvp_mode)
    assert D.shape == (n, n) and D.dtype == torch.float64
    ref = _in_op_order(refs.hessian(kind), model, H)
    err = rel_err(D, ref)
    assert err <= TOL, f"{kind}/{hvp_mode}: relative error {err:.3e}"


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("hvp_mode", HVP_MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_hessian_matmat_matches_reference(kind, hvp_mode, k, refs):
    model, loss_fn, batches = BUILDERS[kind]()
    H = hf.hessian(model, loss_fn, batches, hvp_mode=hvp_mode)
    n = H.shape[0]
    ref = _in_op_order(refs.hessian(kind), model, H)
    V = _randn(k, n, seed=k)
    m0, p0 = H.num_matvecs, H.num_passes
    out = H.matmat(V)
    assert out.shape == (k, n)
    assert H.num_matvecs - m0 == k, "num_matvecs must count the k vectors"
    assert H.num_passes - p0 == 1, "a block of k vectors must take one pass over the data"
    err = rel_err(out, V @ ref)
    assert err <= TOL, f"{kind}/{hvp_mode}/k={k}: relative error {err:.3e}"


@pytest.mark.parametrize("hvp_mode", HVP_MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_hessian_single_batch_passed_directly(kind, hvp_mode, refs):
    model, loss_fn, batches = BUILDERS[kind]()
    batch = batches[0]  # a tuple (inputs, targets) or a dict, not wrapped in a list
    H = hf.hessian(model, loss_fn, batch, hvp_mode=hvp_mode)
    assert H.num_batches == 1
    assert H.num_samples == default_batch_size(batch)
    ref = _in_op_order(refs.hessian(kind, single=True), model, H)
    V = _randn(3, H.shape[0], seed=5)
    err = rel_err(H.matmat(V), V @ ref)
    assert err <= TOL, f"{kind}/{hvp_mode}: relative error {err:.3e}"


@pytest.mark.parametrize("hvp_mode", HVP_MODES)
def test_cnn_bn_train_mode_matches_batch_statistics_reference(hvp_mode, refs):
    model, loss_fn, batches = make_cnn()
    H = hf.hessian(model, loss_fn, batches, bn_mode="train", hvp_mode=hvp_mode)
    D = H.to_dense()
    _check_mode(H, hvp_mode)
    ref_train = _in_op_order(refs.hessian("cnn", "train"), model, H)
    ref_eval = _in_op_order(refs.hessian("cnn", "eval"), model, H)
    assert rel_err(ref_train, ref_eval) > 1e-2, "test is vacuous: train == eval reference"
    err = rel_err(D, ref_train)
    assert err <= TOL, f"bn_mode=train/{hvp_mode}: relative error {err:.3e}"


def test_cnn_bn_train_mode_single_batch(refs):
    model, loss_fn, batches = make_cnn()
    ref = dense_hessian_reference(model, loss_fn, [batches[2]], bn_mode="train")
    H = hf.hessian(model, loss_fn, batches[2], bn_mode="train")
    assert rel_err(H.to_dense(), _in_op_order(ref, model, H)) <= TOL


def test_matvec_and_matmul_shapes(refs):
    model, loss_fn, batches = make_mlp()
    H = hf.hessian(model, loss_fn, batches)
    n = H.shape[0]
    ref = _in_op_order(refs.hessian("mlp"), model, H)
    v = _randn(n, seed=1)
    hv = H.matvec(v)
    assert hv.shape == (n,)
    assert rel_err(hv, ref @ v) <= TOL
    hv2 = H @ v
    assert hv2.shape == (n,)
    assert rel_err(hv2, ref @ v) <= TOL
    X = _randn(n, 4, seed=2)
    HX = H @ X
    assert HX.shape == (n, 4)
    assert rel_err(HX, ref @ X) <= TOL


def test_repeated_products_agree():
    model, loss_fn, batches = make_cnn()
    H = hf.hessian(model, loss_fn, batches)
    V = _randn(2, H.shape[0], seed=3)
    a = H.matmat(V)
    b = H.matmat(V)
    assert rel_err(a, b) <= 1e-14


def test_dataloader_equals_list_of_batches(refs):
    model, loss_fn, batches = make_mlp()
    X = torch.cat([b[0] for b in batches])
    Y = torch.cat([b[1] for b in batches])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, Y), batch_size=8, shuffle=False
    )
    H = hf.hessian(model, loss_fn, loader)
    assert H.num_samples == 21 and H.num_batches == 3
    assert rel_err(H.to_dense(), _in_op_order(refs.hessian("mlp"), model, H)) <= TOL


def test_uneven_batches_equal_one_full_batch():
    """Weighting by batch size: 8+8+5 batches give the Hessian of the full-batch mean loss."""
    model, loss_fn, batches = make_mlp()
    full = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    A = hf.hessian(model, loss_fn, batches).to_dense()
    B = hf.hessian(model, loss_fn, full).to_dense()
    assert rel_err(A, B) <= TOL
    # and equal weights per batch would be measurably different (the test can fail)
    eq = dense_hessian_reference(model, loss_fn, batches, batch_size_fn=lambda b: 1)
    assert rel_err(eq, B) > 1e-3


def test_batch_size_fn_sets_the_weights():
    model, loss_fn, batches = make_lm()
    fn = lambda b: 1  # noqa: E731 - every batch weighted equally
    ref = dense_hessian_reference(model, loss_fn, batches, batch_size_fn=fn)
    H = hf.hessian(model, loss_fn, batches, batch_size_fn=fn)
    V = _randn(2, H.shape[0], seed=4)
    assert rel_err(H.matmat(V), V @ _in_op_order(ref, model, H)) <= TOL


def test_loss_form_forced():
    """loss_form="model" for a callable whose first parameter is not named `model`;
    loss_form="criterion" for a criterion whose first parameter is named `model`."""
    model, _, batches = make_lm()

    def lm_loss_renamed(net, batch):
        logits = net(batch["input_ids"])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))

    A = hf.hessian(model, lm_loss_renamed, batches, loss_form="model")
    B = hf.hessian(model, lm_loss, batches)
    V = _randn(2, A.shape[0], seed=6)
    assert rel_err(A.matmat(V), B.matmat(V)) <= TOL

    mlp, ce, mbatches = make_mlp()

    def criterion(model, target):  # a criterion that happens to name its outputs `model`
        return ce(model, target)

    C = hf.hessian(mlp, criterion, mbatches, loss_form="criterion")
    D = hf.hessian(mlp, ce, mbatches)
    W = _randn(2, C.shape[0], seed=7)
    assert rel_err(C.matmat(W), D.matmat(W)) <= TOL


def test_paths_agree_with_each_other():
    model, loss_fn, batches = make_lm()
    V = _randn(3, sum(p.numel() for p in model.parameters()), seed=8)
    outs = {m: hf.hessian(model, loss_fn, batches, hvp_mode=m).matmat(V) for m in PATHS}
    for m in PATHS[1:]:
        assert rel_err(outs[m], outs[PATHS[0]]) <= TOL, m


# ---------------------------------------------------------------------------------------
# 2. closed forms
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("hvp_mode", HVP_MODES)
@pytest.mark.parametrize("c", [1.0, 0.01, -3.0])
def test_quadratic_loss_gives_c_identity(c, hvp_mode):
    model, _, batches = make_mlp()

    def loss_fn(model, batch):
        return 0.5 * c * sum(p.pow(2).sum() for p in model.parameters())

    H = hf.hessian(model, loss_fn, batches, hvp_mode=hvp_mode)
    n = H.shape[0]
    D = H.to_dense()
    assert rel_err(D, c * torch.eye(n, dtype=torch.float64)) <= 1e-13


@pytest.mark.parametrize("hvp_mode", HVP_MODES)
def test_loss_linear_in_parameters_gives_zero(hvp_mode):
    model, _, batches = make_mlp()
    with seeded(11):
        coeffs = [torch.randn_like(p) for p in model.parameters()]

    def loss_fn(model, batch):
        return sum((w * p).sum() for w, p in zip(coeffs, model.parameters(), strict=True))

    H = hf.hessian(model, loss_fn, batches, hvp_mode=hvp_mode)
    out = H.matmat(_randn(3, H.shape[0], seed=9))
    assert torch.count_nonzero(out) == 0, f"max |Hv| = {out.abs().max():.3e}"
    assert torch.count_nonzero(H.to_dense()) == 0


@pytest.mark.parametrize("hvp_mode", HVP_MODES)
def test_criterion_linear_in_parameters_gives_zero(hvp_mode):
    """A linear model with a loss linear in its outputs: the gradient has no graph."""
    with seeded(12):
        model = nn.Linear(4, 2).double()
        X = torch.randn(13, 4, dtype=torch.float64)
        T = torch.randn(13, 2, dtype=torch.float64)
    batches = [(X[:8], T[:8]), (X[8:], T[8:])]

    def loss_fn(outputs, targets):
        return (outputs * targets).mean()

    H = hf.hessian(model, loss_fn, batches, hvp_mode=hvp_mode)
    assert torch.count_nonzero(H.to_dense()) == 0


def _linreg(m: int = 1, seed: int = 13):
    with seeded(seed):
        model = nn.Linear(4, m, bias=False).double()
        X = torch.randn(21, 4, dtype=torch.float64)
        Y = torch.randn(21, m, dtype=torch.float64)
    batches = [(X[:8], Y[:8]), (X[8:16], Y[8:16]), (X[16:], Y[16:])]
    return model, X, batches


def _hessian_or_torch_func_bug(model, loss_fn, batches, hvp_mode):
    """torch 2.13's forward-over-reverse through mse_loss raises "ZeroTensors are
    immutable"; forcing fwd_rev there must give hessfast's clear UnsupportedModelError
    (auto falls back). Returns None in that case, the operator otherwise."""
    try:
        return hf.hessian(model, loss_fn, batches, hvp_mode=hvp_mode)
    except UnsupportedModelError as exc:
        assert hvp_mode == "fwd_rev" and "ZeroTensor" in str(exc), exc
        assert "hvp_mode='double_backward' or 'auto'" in str(exc)
        return None


@pytest.mark.parametrize("hvp_mode", HVP_MODES)
def test_linear_regression_mse_mean(hvp_mode):
    """MSELoss(mean) = mean((Xw - y)^2) over N samples -> Hessian 2 X^T X / N."""
    model, X, batches = _linreg(1)
    H = _hessian_or_torch_func_bug(model, nn.MSELoss(), batches, hvp_mode)
    if H is None:
        return
    expected = 2.0 * X.T @ X / X.shape[0]
    assert rel_err(H.to_dense(), expected) <= 1e-12


@pytest.mark.parametrize("hvp_mode", HVP_MODES)
def test_linear_regression_half_mse_callable(hvp_mode):
    """0.5 * MSE via the callable form -> X^T X / N."""
    model, X, batches = _linreg(1)

    def loss_fn(model, batch):
        x, y = batch
        return 0.5 * F.mse_loss(model(x), y)

    H = _hessian_or_torch_func_bug(model, loss_fn, batches, hvp_mode)
    if H is None:
        return
    assert rel_err(H.to_dense(), X.T @ X / X.shape[0]) <= 1e-12


def test_linear_regression_multi_output():
    """Output dim m: MSELoss(mean) averages over N*m entries -> 2/(N m) kron(I_m, X^T X)
    for the row-major flattened weight [m, d]."""
    m = 3
    model, X, batches = _linreg(m)
    H = hf.hessian(model, nn.MSELoss(), batches)
    N = X.shape[0]
    expected = 2.0 / (N * m) * torch.kron(torch.eye(m, dtype=torch.float64), X.T @ X)
    assert rel_err(H.to_dense(), expected) <= 1e-12


# ---------------------------------------------------------------------------------------
# 3. GGN
# ---------------------------------------------------------------------------------------

GGN_CASES = [("mlp", "classification"), ("mlp", "regression"), ("cnn", None)]


@pytest.mark.parametrize("hvp_mode", HVP_MODES)
@pytest.mark.parametrize("kind,task", GGN_CASES)
def test_ggn_matches_explicit_jacobian_reference(kind, task, hvp_mode, refs):
    kwargs = {"task": task} if task else {}
    model, loss_fn, batches = BUILDERS[kind](**kwargs)
    G = hf.ggn(model, loss_fn, batches, hvp_mode=hvp_mode)
    n = sum(p.numel() for p in model.parameters())
    assert G.shape == (n, n)
    ref = _in_op_order(refs.ggn(kind, task), model, G)
    D = G.to_dense()
    err = rel_err(D, ref)
    assert err <= TOL, f"GGN {kind}/{task}/{hvp_mode}: relative error {err:.3e}"
    V = _randn(3, n, seed=10)
    assert rel_err(G.matmat(V), V @ ref) <= TOL


@pytest.mark.parametrize("kind,task", GGN_CASES)
def test_ggn_is_psd_and_differs_from_hessian(kind, task, refs):
    kwargs = {"task": task} if task else {}
    model, loss_fn, batches = BUILDERS[kind](**kwargs)
    D = hf.ggn(model, loss_fn, batches).to_dense()
    assert rel_err(D, D.T) <= 1e-12
    ev = torch.linalg.eigvalsh(0.5 * (D + D.T))
    assert ev[0] >= -1e-12 * ev[-1].abs(), f"GGN has eigenvalue {ev[0]:.3e} < 0"
    H = hf.hessian(model, loss_fn, batches).to_dense()
    assert rel_err(D, H) > 1e-3, "GGN of a non-linear model should differ from the Hessian"
    assert torch.linalg.eigvalsh(H)[0] < -1e-6, "test is vacuous: Hessian already PSD"


def test_ggn_equals_hessian_for_linear_model_with_mse():
    with seeded(14):
        model = nn.Linear(4, 2).double()  # with bias
        X = torch.randn(21, 4, dtype=torch.float64)
        Y = torch.randn(21, 2, dtype=torch.float64)
    batches = [(X[:8], Y[:8]), (X[8:16], Y[8:16]), (X[16:], Y[16:])]
    G = hf.ggn(model, nn.MSELoss(), batches).to_dense()
    H = hf.hessian(model, nn.MSELoss(), batches).to_dense()
    assert rel_err(G, H) <= 1e-12
    # closed form: weight/bias block of 2/(N m) kron(I_m, Xa^T Xa) with Xa = [X, 1]
    assert torch.linalg.eigvalsh(G)[0] > 0


# ---------------------------------------------------------------------------------------
# 4. parameter selection, flatten / unflatten
# ---------------------------------------------------------------------------------------


def test_params_subset_by_names(refs):
    model, loss_fn, batches = make_mlp()
    names = ["0.weight", "3.bias"]
    H = hf.hessian(model, loss_fn, batches, params=names)
    assert H.param_names == names
    n = sum(dict(model.named_parameters())[k].numel() for k in names)
    assert H.shape == (n, n)
    sub = reorder_reference(refs.hessian("mlp"), model, trainable_names(model), names)
    assert rel_err(H.to_dense(), sub) <= TOL


def test_params_subset_by_tensors(refs):
    model, loss_fn, batches = make_mlp()
    chosen = [model[1].weight, model[3].weight]
    H = hf.hessian(model, loss_fn, batches, params=chosen)
    assert sorted(H.param_names) == ["1.weight", "3.weight"]
    assert H.shape[0] == 6 + 18
    sub = reorder_reference(refs.hessian("mlp"), model, trainable_names(model), H.param_names)
    assert rel_err(H.to_dense(), sub) <= TOL


def test_params_subset_out_of_model_order(refs):
    """Whatever order the operator flattens in, it is reported by param_names."""
    model, loss_fn, batches = make_cnn()
    names = ["fc.weight", "conv.bias", "bn.weight"]
    H = hf.hessian(model, loss_fn, batches, params=names)
    assert sorted(H.param_names) == sorted(names)
    sub = reorder_reference(refs.hessian("cnn"), model, trainable_names(model), H.param_names)
    assert rel_err(H.to_dense(), sub) <= TOL


def test_ggn_params_subset(refs):
    model, loss_fn, batches = make_cnn()
    names = ["conv.weight", "fc.bias"]
    G = hf.ggn(model, loss_fn, batches, params=names)
    sub = reorder_reference(refs.ggn("cnn", None), model, trainable_names(model), G.param_names)
    assert rel_err(G.to_dense(), sub) <= TOL


def test_frozen_params_excluded(refs):
    model, loss_fn, batches = make_mlp()
    model[0].weight.requires_grad_(False)
    H = hf.hessian(model, loss_fn, batches)
    assert "0.weight" not in H.param_names
    assert H.param_names == ["0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert H.shape[0] == 69 - 30
    assert model[0].weight.requires_grad is False
    all_names = [n for n, _ in model.named_parameters()]
    sub = reorder_reference(refs.hessian("mlp"), model, all_names, H.param_names)
    assert rel_err(H.to_dense(), sub) <= TOL


def test_param_shapes_flatten_unflatten_roundtrip():
    model, loss_fn, batches = make_lm()
    H = hf.hessian(model, loss_fn, batches)
    named = dict(model.named_parameters())
    assert H.param_names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(H.param_shapes) == len(H.param_names)
    for name, shape in zip(H.param_names, H.param_shapes, strict=True):
        assert torch.Size(shape) == named[name].shape
    n = H.shape[0]
    assert n == sum(named[k].numel() for k in H.param_names)

    v = _randn(n, seed=15)
    d = H.unflatten(v)
    assert list(d) == H.param_names
    for name in H.param_names:
        assert d[name].shape == named[name].shape
    assert torch.equal(H.flatten(d), v)

    theta = H.flatten({k: named[k].detach() for k in H.param_names})
    assert torch.equal(theta, torch.cat([named[k].detach().reshape(-1) for k in H.param_names]))
    # the i-th block of the flat vector is the i-th parameter, row-major
    off = 0
    for name in H.param_names:
        k = named[name].numel()
        assert torch.equal(d[name].reshape(-1), v[off : off + k])
        off += k


# ---------------------------------------------------------------------------------------
# 7. LinearOperator.from_matrix / from_function
# ---------------------------------------------------------------------------------------


def _sym(n: int, seed: int = 0) -> torch.Tensor:
    A = _randn(n, n, seed=seed)
    return A + A.T


def test_from_matrix_products():
    M = _sym(7)
    A = hf.LinearOperator.from_matrix(M)
    assert A.shape == (7, 7)
    assert A.dtype == torch.float64
    V = _randn(3, 7, seed=1)
    assert rel_err(A.matmat(V), V @ M) <= 1e-14
    v = _randn(7, seed=2)
    assert A.matvec(v).shape == (7,)
    assert rel_err(A.matvec(v), M @ v) <= 1e-14
    assert rel_err(A @ v, M @ v) <= 1e-14
    X = _randn(7, 2, seed=3)
    assert (A @ X).shape == (7, 2)
    assert rel_err(A @ X, M @ X) <= 1e-14
    assert rel_err(A.to_dense(), M) <= 1e-15


def test_from_matrix_rejects_non_symmetric():
    from hessfast.errors import AsymmetricOperatorError, HessfastError

    M = _randn(6, 6, seed=4)
    with pytest.raises(AsymmetricOperatorError) as ei:
        hf.LinearOperator.from_matrix(M)
    assert isinstance(ei.value, HessfastError) and isinstance(ei.value, RuntimeError)
    assert "symmetric" in str(ei.value).lower()


def test_from_matrix_accepts_rounding_asymmetry():
    B = _randn(30, 8, seed=5)
    M = B @ B.T  # symmetric up to rounding in the product
    hf.LinearOperator.from_matrix(M)


def test_from_function_products():
    M = _sym(5, seed=6)
    calls = []

    def fn(V):
        calls.append(tuple(V.shape))
        return V @ M

    A = hf.LinearOperator.from_function(fn, 5, dtype=torch.float64, device="cpu")
    assert A.shape == (5, 5)
    assert A.dtype == torch.float64
    V = _randn(4, 5, seed=7)
    assert rel_err(A.matmat(V), V @ M) <= 1e-15
    assert calls[-1] == (4, 5), "matmat must hand the whole block to fn in one call"
    v = _randn(5, seed=8)
    assert rel_err(A.matvec(v), M @ v) <= 1e-15
    assert rel_err(A @ v, M @ v) <= 1e-15
    X = _randn(5, 3, seed=9)
    assert rel_err(A @ X, M @ X) <= 1e-15
