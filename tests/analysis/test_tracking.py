"""hessfast.analysis.tracking: SharpnessTracker along real short training runs, against dense
float64 Hessians (double backward) and cold eigsh runs (product counts, never timings)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import hessfast as hf
from hessfast.analysis.precond import preconditioner_diagonal
from hessfast.analysis.tracking import SharpnessTracker, stability_thresholds
from hessfast.errors import ArgumentTypeError, ConfigurationError
from hessfast.testing.dense import dense_hessian_reference

_DIGITS = load_digits(return_X_y=True)


def _digits(samples: int, hidden: int, dtype=torch.float64, seed: int = 0):
    X, y = _DIGITS
    X = torch.tensor(X[:samples] / 16.0, dtype=dtype)
    y = torch.tensor(y[:samples])
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) / p.shape[-1] ** 0.5)
    return model, nn.CrossEntropyLoss(), (X, y)


def _train_step(model, loss_fn, data, opt) -> None:
    opt.zero_grad()
    loss_fn(model(data[0]), data[1]).backward()
    opt.step()


def _snapshot(model, opt) -> dict:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "state": [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                  for s in opt.state.values()],
        "rng": torch.get_rng_state(),
    }


def _assert_same(a: dict, b: dict) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"], strict=True))
    for x, y in zip(a["grads"], b["grads"], strict=True):
        assert (x is None and y is None) or torch.equal(x, y)
    assert a["training"] == b["training"]
    assert len(a["state"]) == len(b["state"])
    for s, t in zip(a["state"], b["state"], strict=True):
        assert s.keys() == t.keys()
        assert all(torch.equal(s[k], t[k]) if isinstance(s[k], torch.Tensor) else s[k] == t[k]
                   for k in s)
    assert torch.equal(a["rng"], b["rng"])


def test_sgd_history_thresholds_and_dense():
    model, loss_fn, data = _digits(48, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    tracker = SharpnessTracker(model, loss_fn, data, every=2, k=2, optimizer=opt, tol=1e-8)
    points = []
    for t in range(5):
        _train_step(model, loss_fn, data, opt)
        before = _snapshot(model, opt)
        point = tracker.step()
        _assert_same(before, _snapshot(model, opt))
        assert (point is None) == (t % 2 == 1)
        if point is not None:
            points.append(point)
            top = torch.linalg.eigvalsh(dense_hessian_reference(model, loss_fn, data))
            assert point.eigenvalues == pytest.approx(top.flip(0)[:2].tolist(), rel=1e-7)
    assert [p.step for p in tracker.history] == [0, 2, 4]
    assert tracker.history == points
    assert [p.warm for p in points] == [False, True, True]
    for p in points:
        assert p.lambda_max == p.eigenvalues[0]
        assert p.lr == 0.5
        assert p.threshold == pytest.approx((2 + 2 * 0.9) / 0.5, rel=1e-15)
        assert p.ratio == pytest.approx(p.lambda_max / p.threshold, rel=1e-15)
        assert p.at_edge == (p.ratio >= 0.9)
        assert p.preconditioned_lambda_max is None and p.preconditioned_threshold is None
        assert p.converged and p.num_matvecs > 0


def test_warm_start_uses_fewer_products_than_cold():
    """Along an SGD run on digits, every measurement's warm eigsh against a cold eigsh at the
    same tolerance, block size and seed on a fresh operator at the same parameters."""
    model, loss_fn, data = _digits(128, 16, torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = SharpnessTracker(model, loss_fn, data, k=1, optimizer=opt, tol=1e-3)
    warm_mv, cold_mv = [], []
    for t in range(10):
        _train_step(model, loss_fn, data, opt)
        point = tracker.step()
        if point.warm:
            cold = hf.eigsh(hf.hessian(model, loss_fn, data), 1, tol=1e-3, block_size=1,
                            seed=tracker.seed + t)
            assert point.lambda_max == pytest.approx(float(cold.eigenvalues[0]), rel=1e-3)
            warm_mv.append(point.num_matvecs)
            cold_mv.append(cold.num_matvecs)
    assert len(warm_mv) == 9
    assert sum(warm_mv) < sum(cold_mv), (warm_mv, cold_mv)
    assert sum(w < c for w, c in zip(warm_mv, cold_mv, strict=True)) >= 7, (warm_mv, cold_mv)


def test_adam_preconditioned_equals_dense_and_json_plot(tmp_path):
    model, loss_fn, data = _digits(40, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-4)
    tracker = SharpnessTracker(model, loss_fn, data, every=1, k=1, optimizer=opt, tol=1e-8)
    with pytest.warns(UserWarning, match="no state yet"):
        first = tracker.step()  # before any optimizer step: H only
    assert first.preconditioned_lambda_max is None and first.ratio is None
    for _ in range(3):
        _train_step(model, loss_fn, data, opt)
        before = _snapshot(model, opt)
        point = tracker.step()
        _assert_same(before, _snapshot(model, opt))
        Hd = dense_hessian_reference(model, loss_fn, data)
        s = preconditioner_diagonal(hf.hessian(model, loss_fn, data), opt).rsqrt()
        top = float(torch.linalg.eigvalsh(s[:, None] * Hd * s[None, :])[-1])
        assert point.preconditioned_lambda_max == pytest.approx(top, rel=1e-7)
        assert point.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(Hd)[-1]), rel=1e-7)
        assert point.threshold is None
        assert point.preconditioned_threshold == pytest.approx(38 / 1e-2, rel=1e-12)
        assert point.ratio == pytest.approx(top / (38 / 1e-2), rel=1e-7)
    assert [p.warm for p in tracker.history] == [False, False, True, True]

    text = tracker.to_json(tmp_path / "track.json")
    assert json.loads(text)["history"][1]["preconditioned_threshold"] == pytest.approx(3800)
    for source in (text, tmp_path / "track.json", str(tmp_path / "track.json")):
        loaded = SharpnessTracker.from_json(source)
        assert loaded.history == tracker.history
        assert loaded.to_dict() == tracker.to_dict()
    with pytest.raises(ConfigurationError, match="no model"):
        loaded.step()
    with pytest.raises(ConfigurationError, match="not a tracker record"):
        SharpnessTracker.from_json('{"history": []}')
    for t, obj in (("adam", tracker), ("loaded", loaded)):
        path = tmp_path / f"{t}.png"
        obj.plot(path)
        head = path.read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_sgd_plot_and_no_optimizer(tmp_path):
    model, loss_fn, data = _digits(32, 3)
    tracker = SharpnessTracker(model, loss_fn, data, lr=0.1)
    p = tracker.step()
    assert p.threshold == pytest.approx(20.0) and p.ratio == pytest.approx(p.lambda_max / 20)
    assert SharpnessTracker(model, loss_fn, data).step().threshold is None
    with pytest.raises(ConfigurationError, match="no measurements"):
        SharpnessTracker(model, loss_fn, data).plot(tmp_path / "x.png")
    fig = tracker.plot(tmp_path / "sgd.png")
    assert (tmp_path / "sgd.png").read_bytes()[:4] == b"\x89PNG"
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure) and len(fig.axes) == 1  # every plot() returns the Figure
    assert isinstance(tracker.plot(), Figure)  # no path: the figure only
    # the one writer of every result: the same signature, the text returned and written
    text = tracker.to_json(tmp_path / "t.json", indent=2)
    assert (tmp_path / "t.json").read_text(encoding="utf-8") == text
    assert json.loads(text) == json.loads(tracker.to_json()) == tracker.to_dict(vectors=True)


def test_thresholds():
    w = [nn.Parameter(torch.zeros(2))]
    sgd = torch.optim.SGD
    assert stability_thresholds(sgd(w, lr=0.1))[1] == pytest.approx(20.0)
    assert stability_thresholds(sgd(w, lr=0.1, momentum=0.5))[1] == pytest.approx(30.0)
    assert stability_thresholds(sgd(w, lr=0.1, momentum=0.5, dampening=0.5))[1] == \
        pytest.approx(60.0)
    assert stability_thresholds(sgd(w, lr=0.1, momentum=0.5, nesterov=True))[1] == \
        pytest.approx(3.0 / (2.0 * 0.1))
    assert stability_thresholds(sgd(w, lr=0.1), lr=0.2)[1] == pytest.approx(10.0)
    assert stability_thresholds(torch.optim.RMSprop(w, lr=0.1, momentum=0.5))[2] == \
        pytest.approx(30.0)
    assert stability_thresholds(torch.optim.AdamW(w, lr=0.1, betas=(0.5, 0.9)))[2] == \
        pytest.approx(3.0 / (0.5 * 0.1))
    assert stability_thresholds(None) == (None, None, None)


def test_nesterov_threshold_is_where_the_iteration_diverges():
    """The Nesterov threshold against the optimizer itself on f(x) = lam x^2 / 2."""
    lr, beta = 0.1, 0.5
    thr = stability_thresholds(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr,
                                               momentum=beta, nesterov=True))[1]
    for lam, grows in ((0.97 * thr, False), (1.03 * thr, True)):
        x = nn.Parameter(torch.ones(1, dtype=torch.float64))
        opt = torch.optim.SGD([x], lr=lr, momentum=beta, nesterov=True)
        for _ in range(600):
            opt.zero_grad()
            (0.5 * lam * x**2).sum().backward()
            opt.step()
        assert (abs(float(x.detach())) > 1.0) == grows


def test_errors():
    model, loss_fn, data = _digits(16, 2)
    with pytest.raises(ConfigurationError, match="every"):
        SharpnessTracker(model, loss_fn, data, every=0)
    with pytest.raises(ConfigurationError, match="curvature"):
        SharpnessTracker(model, loss_fn, data, curvature="fisher")
    with pytest.raises(ConfigurationError, match="lr"):
        SharpnessTracker(model, loss_fn, data, lr=-1.0)
    with pytest.raises(ConfigurationError, match="Adamax"):
        SharpnessTracker(model, loss_fn, data, optimizer=torch.optim.Adamax(model.parameters()))
    with pytest.raises(ArgumentTypeError):
        SharpnessTracker(model, loss_fn, data, optimizer="sgd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SharpnessTracker(model, loss_fn, data, every=3)  # construction measures nothing
