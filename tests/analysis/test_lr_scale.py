"""Learning rates meet the curvature the optimizer sees (issue 16, item 5).

The operator is the Hessian of the MEAN loss; gradient descent on a sum-reduced loss over N
samples sees N times it. On least squares ``L(w) = sum_i (x_i w - y_i)^2`` the Hessian of the
summed loss is ``2 X^T X`` and gradient descent diverges iff ``lr > 2 / lambda_max(2 X^T X)``
(checked here by running the steps in float64 on each side of the threshold). analyze's
stable lr and lr verdict, condition_number's stable lr and SharpnessTracker's ratio must all
agree with it, and say which scale they used; a mean-reduced loss is unchanged.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import hessfast as hf
from hessfast.condition import lr_curvature_scale
from hessfast.errors import ConfigurationError

N, D = 64, 5


def _problem(reduction: str):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    X[:, 0] *= 3.0  # a clear top eigenvalue
    y = torch.randn(N, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(D, 1, bias=False).double()
    lam = float(torch.linalg.eigvalsh(2 * X.T @ X)[-1])  # Hessian of the SUMMED loss
    threshold = 2.0 / lam if reduction == "sum" else 2.0 * N / lam
    return model, nn.MSELoss(reduction=reduction), X, y, threshold


def _diverges(model: nn.Module, loss_fn, batches, lr: float, steps: int = 200) -> bool:
    """Full-batch gradient descent (the loss summed over ``batches``) with torch's SGD."""
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    with torch.no_grad():
        first = sum(float(loss_fn(m(x), y)) for x, y in batches)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(loss_fn(m(x), y) for x, y in batches)
        loss.backward()
        opt.step()
    last = float(loss.detach())
    return not last < 1e6 * first


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_stability_verdicts_match_gradient_descent(reduction: str) -> None:
    model, loss_fn, X, y, lr_star = _problem(reduction)
    batch = (X, y)
    stable, unstable = 0.95 * lr_star, 1.05 * lr_star
    assert not _diverges(model, loss_fn, [batch], stable)
    assert _diverges(model, loss_fn, [batch], unstable)

    scale = N if reduction == "sum" else 1
    for lr, bad in ((stable, False), (unstable, True)):
        rep = _quiet(hf.analyze, model, loss_fn, batch, k=1, num_probes=2, num_steps=5,
                     per_layer=False, tol=1e-8, lr=lr)
        assert rep.lr_curvature_scale == scale
        assert rep.stable_lr == pytest.approx(lr_star, rel=1e-6)
        assert (scale * rep.lambda_max >= 2 / lr) == bad
        text = rep.summary()
        assert ("lambda_max >= 2/lr" in text) == bad and ("lambda_max < 2/lr" in text) != bad
        # the note wraps at 100 columns: compared with its line breaks and indents removed
        assert "learning rates: " + rep.lr_curvature_scale_reason in " ".join(text.split())
        assert hf.Report.from_json(rep.to_json()) == rep

        opt = torch.optim.SGD(model.parameters(), lr=lr)
        tracker = hf.SharpnessTracker(model, loss_fn, batch, optimizer=opt, tol=1e-8)
        p = _quiet(tracker.step)
        assert p.lr_curvature_scale == scale
        assert p.ratio == pytest.approx(lr / lr_star, rel=1e-6)
        assert (p.ratio > 1) == bad
        d = tracker.to_dict()
        assert d["lr_curvature_scale"] == scale and d["lr_curvature_scale_reason"]

    H = hf.hessian(model, loss_fn, batch)
    c = _quiet(hf.condition_number, H, tol=1e-8)
    assert c.lr_curvature_scale == scale
    assert c.stable_lr == pytest.approx(lr_star, rel=1e-6)
    # the operator keeps the mean loss's scale whatever the reduction
    assert H.loss_reduction == reduction
    dense = H.to_dense()
    assert torch.allclose(dense, 2 * X.T @ X / N, rtol=1e-12, atol=1e-12)


def test_several_batches_step_per_batch_or_full_batch() -> None:
    """Four batches of 16 with a sum loss: analyze takes one step per batch (16 x), the
    tracker full batch (64 x); lr_scale= overrides both. Full-batch gradient descent on the
    sum over the four batches diverges exactly past the 64 x threshold."""
    model, loss_fn, X, y, lr_star = _problem("sum")
    batches = [(X[i:i + 16], y[i:i + 16]) for i in range(0, N, 16)]
    assert not _diverges(model, loss_fn, batches, 0.95 * lr_star)
    assert _diverges(model, loss_fn, batches, 1.05 * lr_star)
    kw = dict(k=1, num_probes=2, num_steps=5, per_layer=False, tol=1e-8)
    rep = _quiet(hf.analyze, model, loss_fn, batches, **kw)
    assert rep.lr_curvature_scale == 16 and "16 samples" in rep.lr_curvature_scale_reason
    assert rep.stable_lr == pytest.approx(4 * lr_star, rel=1e-6)
    rep = _quiet(hf.analyze, model, loss_fn, batches, lr_scale=N, **kw)
    assert rep.lr_curvature_scale == N and rep.stable_lr == pytest.approx(lr_star, rel=1e-6)
    assert "lr_scale=64 given" in rep.summary()
    for lr_scale, expect in ((None, 1.05), (16, 1.05 / 4)):
        opt = torch.optim.SGD(model.parameters(), lr=1.05 * lr_star)
        tracker = hf.SharpnessTracker(model, loss_fn, batches, optimizer=opt, tol=1e-8,
                                      lr_scale=lr_scale)
        assert _quiet(tracker.step).ratio == pytest.approx(expect, rel=1e-6)


def test_uneven_batches_use_the_largest_and_say_so() -> None:
    model, loss_fn, X, y, _ = _problem("sum")
    batches = [(X[:20], y[:20]), (X[20:40], y[20:40]), (X[40:], y[40:])]  # 20, 20, 24
    H = hf.hessian(model, loss_fn, batches)
    s = lr_curvature_scale(H)
    assert s.scale == 24 and s.samples == 24 and "uneven (20 to 24)" in s.reason
    assert lr_curvature_scale(H, full_batch=True).scale == N
    assert lr_curvature_scale(H, 7.5).scale == 7.5
    M = hf.LinearOperator.from_matrix(torch.eye(3, dtype=torch.float64))
    assert lr_curvature_scale(M).scale == 1.0  # a plain operator records no reduction


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "64", True])
def test_bad_lr_scale_is_refused(bad) -> None:
    model, loss_fn, X, y, _ = _problem("sum")
    with pytest.raises((ConfigurationError, TypeError)):
        _quiet(hf.analyze, model, loss_fn, (X, y), k=1, num_probes=2, num_steps=5, per_layer=False,
               lr_scale=bad)
    with pytest.raises(ConfigurationError, match="lr_scale"):
        hf.SharpnessTracker(model, loss_fn, (X, y), lr_scale=bad)


def test_tracker_record_round_trips_the_scale(tmp_path) -> None:
    model, loss_fn, X, y, lr_star = _problem("sum")
    opt = torch.optim.SGD(model.parameters(), lr=lr_star)
    tracker = hf.SharpnessTracker(model, loss_fn, (X, y), optimizer=opt, tol=1e-8)
    _quiet(tracker.step)
    back = hf.SharpnessTracker.from_json(tracker.to_json())
    assert back.history[0].lr_curvature_scale == N
    assert back.lr_curvature_scale == N
    pytest.importorskip("matplotlib")
    back.plot(tmp_path / "t.png")
