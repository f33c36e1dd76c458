"""hessfast.analysis.precond: the adaptive optimizers' preconditioned curvature against a dense
float64 reference built from torch's own update (the denominator recovered from a real step)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hessfast as hf
from hessfast.analysis.precond import preconditioned, preconditioner_diagonal
from hessfast.errors import ArgumentTypeError, ConfigurationError
from hessfast.testing.dense import dense_hessian_reference


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    return model, nn.CrossEntropyLoss(), (X, y)


def _train(model, loss_fn, data, opt, steps: int = 4) -> dict:
    """Take ``steps`` optimizer steps; return what the last one saw and did."""
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(data[0]), data[1]).backward()
        params = list(model.parameters())
        before = [p.detach().clone() for p in params]
        bufs = [opt.state[p].get("momentum_buffer") for p in params]
        bufs = [None if b is None else b.clone() for b in bufs]
        opt.step()
    return {"before": before, "grads": [p.grad.clone() for p in params], "bufs": bufs}


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95), eps=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-4, weight_decay=0.1),
    "adamw_amsgrad": lambda ps: torch.optim.AdamW(ps, lr=3e-2, amsgrad=True, eps=1e-5),
    "adam_foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True, eps=1e-3),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, alpha=0.9, eps=1e-3),
    "rmsprop_centered": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, centered=True,
                                                       momentum=0.5, eps=1e-3),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, eps=1e-3),
}


def _hand_diagonal(opt, params) -> torch.Tensor:
    """D from the state by torch 2.13's single-tensor formulas, written out by hand."""
    ds = []
    for p in params:
        s = opt.state[p]
        grp = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        eps = grp["eps"]
        if isinstance(opt, torch.optim.Adam):
            v = s["max_exp_avg_sq"] if grp["amsgrad"] else s["exp_avg_sq"]
            ds.append(v.sqrt() / (1 - grp["betas"][1] ** float(s["step"])) ** 0.5 + eps)
        elif isinstance(opt, torch.optim.RMSprop):
            v = s["square_avg"] - (s["grad_avg"] ** 2 if grp["centered"] else 0.0)
            ds.append(v.sqrt() + eps)
        else:
            ds.append(s["sum"].sqrt() + eps)
    return torch.cat([d.reshape(-1) for d in ds])


def _diagonal_from_update(opt, params, last) -> torch.Tensor:
    """D recovered from what torch's last update really did (one group, no coupled decay)."""
    grp, ds = opt.param_groups[0], []
    for p, p0, g, buf0 in zip(params, last["before"], last["grads"], last["bufs"], strict=True):
        s, lr = opt.state[p], grp["lr"]
        if isinstance(opt, torch.optim.Adam):  # p = p0 (1 - lr wd) - lr m_hat / D
            m_hat = s["exp_avg"] / (1 - grp["betas"][0] ** float(s["step"]))
            decay = grp["weight_decay"] if isinstance(opt, torch.optim.AdamW) else 0.0
            ds.append(-lr * m_hat / (p.detach() - p0 * (1 - lr * decay)))
        elif isinstance(opt, torch.optim.RMSprop) and grp["momentum"] > 0:
            ds.append(g / (s["momentum_buffer"] - grp["momentum"] * buf0))  # buf = m buf + g/D
        else:  # RMSprop, Adagrad: p = p0 - lr g / D
            ds.append(-lr * g / (p.detach() - p0))
    return torch.cat([d.reshape(-1) for d in ds])


def _state_copy(opt) -> list[dict]:
    return [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
            for s in opt.state.values()]


def _assert_state_equal(opt, before) -> None:
    after = list(opt.state.values())
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_equals_dense(name):
    model, loss_fn, data = _setup()
    opt = OPTIMIZERS[name](model.parameters())
    last = _train(model, loss_fn, data, opt)
    before = _state_copy(opt)
    H = hf.hessian(model, loss_fn, data)
    P = preconditioned(H, opt)
    with pytest.warns(DeprecationWarning, match="use A="):  # the old keyword name, one release
        assert torch.equal(preconditioned(H=H, optimizer=opt).diagonal, P.diagonal)
    params = list(model.parameters())
    D = _hand_diagonal(opt, params)
    assert torch.allclose(preconditioner_diagonal(H, opt), D, rtol=1e-13, atol=0)
    assert torch.allclose(P.diagonal, D, rtol=1e-13, atol=0)
    # the formulas are torch's: the same D comes out of the update the optimizer made
    assert torch.allclose(_diagonal_from_update(opt, params, last), D, rtol=1e-7, atol=0)
    Hd = dense_hessian_reference(model, loss_fn, data)
    s = D.rsqrt()
    ref = s[:, None] * Hd * s[None, :]
    n = Hd.shape[0]
    got = P.matmat(torch.eye(n, dtype=torch.float64)).T
    assert (got - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert P.checked  # symmetric by construction: no probe products
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n is small: eigsh may warn about the dense path
        r = hf.eigsh(P, 1, tol=1e-8)
    top = torch.linalg.eigvalsh(ref)[-1]
    assert abs(float(r.eigenvalues[0]) - float(top)) <= 1e-7 * abs(float(top))
    _assert_state_equal(opt, before)


def test_per_group_hyperparameters():
    model, loss_fn, data = _setup(1)
    first, second = model[0], model[2]
    opt = torch.optim.Adam([
        {"params": first.parameters(), "eps": 1e-2, "betas": (0.9, 0.99)},
        {"params": second.parameters(), "eps": 1e-6, "betas": (0.5, 0.9)},
    ], lr=1e-2)
    _train(model, loss_fn, data, opt, steps=3)
    H = hf.hessian(model, loss_fn, data)
    D = preconditioner_diagonal(H, opt)
    pieces = []
    for grp in opt.param_groups:
        b2, eps = grp["betas"][1], grp["eps"]
        for p in grp["params"]:
            s = opt.state[p]
            pieces.append(s["exp_avg_sq"].sqrt() / (1 - b2 ** float(s["step"])) ** 0.5 + eps)
    assert torch.allclose(D, torch.cat([t.reshape(-1) for t in pieces]), rtol=1e-13, atol=0)


def test_subset_of_parameters_in_operator_order():
    model, loss_fn, data = _setup(2)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    _train(model, loss_fn, data, opt, steps=2)
    H = hf.hessian(model, loss_fn, data, params=["2.weight", "0.bias"])
    D = preconditioner_diagonal(H, opt)
    exp = torch.cat([opt.state[model[2].weight]["square_avg"].reshape(-1),
                     opt.state[model[0].bias]["square_avg"]]).sqrt() + 1e-8
    assert torch.allclose(D, exp, rtol=1e-13, atol=0)


def test_errors():
    model, loss_fn, data = _setup(3)
    H = hf.hessian(model, loss_fn, data)
    with pytest.raises(ConfigurationError, match="SGD has no preconditioner"):
        preconditioned(H, torch.optim.SGD(model.parameters(), lr=0.1))
    adam = torch.optim.Adam(model.parameters())
    with pytest.raises(ConfigurationError, match="has not stepped yet"):
        preconditioned(H, adam)
    with pytest.raises(ConfigurationError, match="not supported"):
        preconditioned(H, torch.optim.Adamax(model.parameters()))
    partial = torch.optim.Adam(model[2].parameters())
    with pytest.raises(ConfigurationError, match="'0.weight' of H is not in the optimizer"):
        preconditioned(H, partial)
    with pytest.raises(ArgumentTypeError):
        preconditioned(hf.LinearOperator.from_matrix(torch.eye(3)), adam)
    with pytest.raises(ArgumentTypeError):
        preconditioned(H, "adam")
