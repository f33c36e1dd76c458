"""hessfast.analysis.tracking: SharpnessTracker along real short training runs, against dense
float64 Hessians (double backward) and cold eigsh runs (product counts, never timings)."""

from __future__ import annotations

import json
import math
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


# -- issue 19: the loss, the governing pair, warm-up, divergence, optimizer steps ----------------
def _legend(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() is not None
            for t in ax.get_legend().get_texts()]


def test_loss_is_recorded_and_plotted(tmp_path):
    model, loss_fn, data = _digits(32, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = SharpnessTracker(model, loss_fn, data, optimizer=opt)
    losses = []
    for t in range(3):
        opt.zero_grad()
        loss = loss_fn(model(data[0]), data[1])
        loss.backward()
        opt.step()
        losses.append(loss.item())
        tracker.step(loss if t != 1 else loss.item())  # a tensor or a float
    assert [p.loss for p in tracker.history] == losses
    fig = tracker.plot(tmp_path / "loss.png")
    assert len(fig.axes) == 2 and fig.axes[-1].get_ylabel() == "loss"
    assert "training loss" in _legend(fig)
    no_loss = SharpnessTracker(model, loss_fn, data, lr=0.1)
    no_loss.step()
    assert no_loss.history[0].loss is None and len(no_loss.plot().axes) == 1
    with pytest.raises(ConfigurationError, match="scalar"):
        tracker.step(torch.ones(3))
    with pytest.raises(ArgumentTypeError, match="loss"):
        tracker.step("0.5")


def test_one_governing_pair_for_every_optimizer():
    model, loss_fn, data = _digits(40, 3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    for opt in (sgd, adam, None):
        tracker = SharpnessTracker(model, loss_fn, data, optimizer=opt, lr=0.1 if opt is None
                                   else None)
        for _ in range(2):
            if opt is not None:
                _train_step(model, loss_fn, data, opt)
            p = tracker.step()
        if isinstance(opt, torch.optim.Adam):
            assert p.sharpness == p.preconditioned_lambda_max is not None
            assert p.governing_threshold == p.preconditioned_threshold == pytest.approx(3800)
        else:
            assert p.sharpness == p.lambda_max and p.governing_threshold == p.threshold
        assert p.ratio == pytest.approx(p.sharpness / p.governing_threshold, rel=1e-12)
    # a record written before these fields: the pair comes from the old fields
    for opt, key in ((adam, "preconditioned_"), (sgd, "")):
        tracker = SharpnessTracker(model, loss_fn, data, optimizer=opt)
        _train_step(model, loss_fn, data, opt)
        tracker.step()
        d = tracker.to_dict()
        new = ("loss", "sharpness", "governing_threshold", "warmup", "diverged", "reason", "call")
        d["history"] = [{k: v for k, v in p.items() if k not in new} for p in d["history"]]
        d.pop("warmup")
        old = SharpnessTracker.from_json(json.dumps(d)).history[0]
        assert old.sharpness == getattr(tracker.history[0], f"{key}lambda_max")
        assert old.governing_threshold == getattr(tracker.history[0], f"{key}threshold")
        assert old.loss is None and not old.warmup and not old.diverged


def test_threshold_legend_carries_its_value():
    model, loss_fn, data = _digits(32, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = SharpnessTracker(model, loss_fn, data, optimizer=opt)
    for _ in range(2):
        _train_step(model, loss_fn, data, opt)
        tracker.step()
    assert any("2/lr = 20 " in t for t in _legend(tracker.plot()))
    assert not any("varies" in t for t in _legend(tracker.plot()))
    opt.param_groups[0]["lr"] = 0.05  # a schedule: the line steps, the label says so
    tracker.step()
    label = next(t for t in _legend(tracker.plot()) if "/lr" in t)
    assert "2/lr = 40" in label and "varies" in label
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    _train_step(model, loss_fn, data, adam)
    tr = SharpnessTracker(model, loss_fn, data, optimizer=adam)
    tr.step()
    assert any("38/lr = 380 " in t for t in _legend(tr.plot()))


def test_adaptive_warmup_points_are_never_at_the_edge():
    from hessfast.analysis.tracking import WARMUP_CAP, default_warmup

    w = [nn.Parameter(torch.zeros(2))]
    assert default_warmup(torch.optim.Adam(w)) == WARMUP_CAP  # beta2 0.999: capped
    assert default_warmup(torch.optim.AdamW(w, betas=(0.9, 0.5))) == 2  # memory of 2 steps
    assert default_warmup(torch.optim.RMSprop(w)) == WARMUP_CAP
    assert default_warmup(torch.optim.Adagrad(w)) == WARMUP_CAP
    assert default_warmup(torch.optim.SGD(w, lr=0.1)) == default_warmup(None) == 0
    flags = {}
    for warmup in (None, 0, 2):
        model, loss_fn, data = _digits(48, 4)
        # lr 1: the first steps' one-sample preconditioner puts the sharpness far above 38/lr
        opt = torch.optim.Adam(model.parameters(), lr=1.0)
        tracker = SharpnessTracker(model, loss_fn, data, optimizer=opt, warmup=warmup)
        for _ in range(3):
            _train_step(model, loss_fn, data, opt)
            tracker.step()
        h = tracker.history
        assert [p.step for p in h] == [1, 2, 3]
        assert h[0].ratio > 1  # the artefact the rule is for
        assert all(p.at_edge == (p.ratio >= 0.9 and not p.warmup) for p in h)
        flags[warmup] = [p.warmup for p in h]
    assert flags == {None: [True] * 3, 0: [False] * 3, 2: [True, False, False]}
    assert any("warm-up" in t for t in _legend(tracker.plot()))
    with pytest.raises(ConfigurationError, match="warmup"):
        SharpnessTracker(model, loss_fn, data, warmup=-1)


def test_divergence_is_recorded_not_raised(tmp_path):
    model, loss_fn, data = _digits(32, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = SharpnessTracker(model, loss_fn, data, optimizer=opt)
    tracker.step()
    with torch.no_grad():
        saved = model[0].weight[0, 0].clone()
        model[0].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"step 1\b.*diverged") as rec:
        p = tracker.step()
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    assert p.diverged and p.lambda_max is None and p.sharpness is None and p.eigenvalues == []
    assert "NonFiniteError" in p.reason and not p.at_edge and p.ratio is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later diverged points are quiet
        q = tracker.step(float("inf"))
        assert q.diverged and q.num_matvecs == 0 and "loss given" in q.reason
        r = tracker.step(2.5)
        assert r.diverged and r.loss == 2.5
    with torch.no_grad():
        model[0].weight[0, 0] = saved
    ok = tracker.step()
    top = torch.linalg.eigvalsh(dense_hessian_reference(model, loss_fn, data))[-1]
    assert not ok.diverged and ok.lambda_max == pytest.approx(float(top), rel=1e-3)
    back = SharpnessTracker.from_json(tracker.to_json())
    assert [p.diverged for p in back.history] == [False, True, True, True, False]
    assert back.history[1] == tracker.history[1] and back.history[2].loss is None  # inf: null
    fig = back.plot(tmp_path / "d.png")
    assert "diverged" in _legend(fig)


def test_step_counts_optimizer_steps():
    model, loss_fn, data = _digits(32, 3)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = SharpnessTracker(model, loss_fn, data, optimizer=adam, every=2)
    for _ in range(5):
        _train_step(model, loss_fn, data, adam)
        tracker.step()
    assert [(p.call, p.step) for p in tracker.history] == [(0, 1), (2, 3), (4, 5)]
    explicit = SharpnessTracker(model, loss_fn, data, optimizer=adam)
    explicit.step(step=100)
    assert explicit.history[0].step == 100 and explicit.history[0].call == 0
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    counted = SharpnessTracker(model, loss_fn, data, optimizer=sgd)
    for _ in range(2):
        counted.step()
    assert [p.step for p in counted.history] == [0, 1]  # SGD keeps no count: the calls
    with pytest.raises(ConfigurationError, match="step"):
        counted.step(step=-1)
    with pytest.raises(ArgumentTypeError, match="step"):
        counted.step(step=1.5)


# -- issue 19: the cost of a warm start and of a repeated measurement ----------------------------
def _prescribed(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    lam = torch.cat([torch.tensor([3.0, 2.0], dtype=torch.float64),
                     torch.linspace(-1.0, 1.0, n - 2, dtype=torch.float64)])
    return (Q * lam) @ Q.T, lam, Q


def test_eigsh_from_the_exact_top_vector_stops_at_its_first_block():
    M, lam, Q = _prescribed()
    A = hf.LinearOperator.from_matrix(M)
    for b in (1, 2):
        r = hf.eigsh(A, 1, tol=1e-3, v0=Q[:, 0], block_size=b)
        # one block multiplies the start, one block verifies it (k = 1: one step): b + 1
        # products at b = 1 (the CPU default), 2 b in general
        assert r.num_matvecs == 2 * b and r.status == "CONVERGED" and r.verified
        assert float(r.eigenvalues[0]) == pytest.approx(float(lam[0]), rel=1e-12)
        assert float(r.residuals[0]) <= 1e-10
    cold = hf.eigsh(A, 1, tol=1e-3, block_size=1)
    assert cold.num_matvecs > 2


def test_eigsh_from_a_perturbed_vector_reports_its_true_residual():
    M, lam, Q = _prescribed()
    A = hf.LinearOperator.from_matrix(M)
    g = torch.Generator().manual_seed(1)
    for eps, tol in ((1e-5, 1e-3), (1e-2, 1e-3), (1e-2, 1e-8)):
        v0 = Q[:, 0] + eps * torch.randn(M.shape[0], dtype=torch.float64, generator=g)
        r = hf.eigsh(A, 1, tol=tol, v0=v0, block_size=1)
        v, theta = r.eigenvectors[0], float(r.eigenvalues[0])
        true = float((M @ v - theta * v).norm())
        reported = float(r.residuals[0])
        # the reported residual is the returned pair's, to rounding (never a smaller claim)
        assert true <= reported * (1 + 1e-6) + r.residual_floor
        assert reported <= true * (1 + 1e-6) + r.residual_floor
        assert r.status == "CONVERGED" and true <= tol * abs(theta) + r.residual_floor
        assert theta == pytest.approx(float(lam[0]), rel=tol)


def test_starts_extrapolate_a_drift_and_keep_an_oscillation():
    from hessfast.analysis.tracking import _Starts

    e = torch.eye(4, dtype=torch.float64)
    drift = _Starts()
    for t in range(4):
        a = 0.05 * t
        drift.update((math.cos(a) * e[0] + math.sin(a) * e[1])[None])
    assert drift.extrapolate
    a = 0.05 * 4
    want = math.cos(a) * e[0] + math.sin(a) * e[1]
    assert abs(float(drift.predict(4)[0] @ want)) > 1 - 1e-4
    flip = _Starts()
    for t in range(4):
        flip.update((e[0] + (0.2 if t % 2 else -0.2) * e[1])[None])
    assert not flip.extrapolate  # a period-two swing: the last vectors predict better
    assert torch.equal(flip.predict(4), flip.last)
    assert flip.predict(5) is None  # another operator size: a cold start


def test_steady_state_tracking_costs_at_most_three_products_per_point():
    """every = 1 after a settled stretch of training: the warm start (the better of the last
    vector and its extrapolation) converges at its first or second product, then the k = 1
    verification step; each point's value against a cold eigsh on the same parameters."""
    model, loss_fn, data = _digits(128, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(200):
        _train_step(model, loss_fn, data, opt)
    tracker = SharpnessTracker(model, loss_fn, data, optimizer=opt)
    for _ in range(12):
        _train_step(model, loss_fn, data, opt)
        point = tracker.step()
        cold = hf.eigsh(hf.hessian(model, loss_fn, data), 1, tol=1e-3, block_size=1)
        assert point.lambda_max == pytest.approx(float(cold.eigenvalues[0]), rel=1e-3)
    products = [p.num_matvecs for p in tracker.history]
    assert products[0] > 3 and not tracker.history[0].warm  # the first point is cold
    assert max(products[2:]) <= 3, products
    assert all(p.converged for p in tracker.history)


def test_extrapolated_starts_save_products_while_the_vectors_drift():
    """Early training (the eigenvector turns fast): against the previous vector as the start
    (what the tracker did before), a chain of eigsh calls on the same parameters."""
    model, loss_fn, data = _digits(128, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(50):
        _train_step(model, loss_fn, data, opt)
    tracker = SharpnessTracker(model, loss_fn, data, optimizer=opt)
    previous, prev = [], None
    for t in range(12):
        _train_step(model, loss_fn, data, opt)
        tracker.step()
        r = hf.eigsh(hf.hessian(model, loss_fn, data), 1, tol=1e-3, v0=prev, block_size=1,
                     seed=t)
        prev = r.eigenvectors
        previous.append(r.num_matvecs)
    new = [p.num_matvecs for p in tracker.history]
    assert sum(new[2:]) < 0.75 * sum(previous[2:]), (new, previous)


class _Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_later_points_refresh_the_operator_without_its_preflight():
    inner, loss_fn, data = _digits(48, 4)
    model = _Counting(inner)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = SharpnessTracker(model, loss_fn, data, optimizer=opt, tol=1e-8)
    forwards = []
    for _ in range(4):
        _train_step(model, loss_fn, data, opt)
        before = model.calls
        point = tracker.step()
        forwards.append(model.calls - before)
        top = torch.linalg.eigvalsh(dense_hessian_reference(inner, loss_fn, data))[-1]
        assert point.lambda_max == pytest.approx(float(top), rel=1e-7)
    # the first point's pre-flight evaluates the loss more than once (its repeatability);
    # later points build batch 0's graph, one forward, and nothing else
    assert forwards[0] > 1 and forwards[1:] == [1, 1, 1]
    # a structural change (a frozen layer) and data changed in place: full builds again
    inner[0].weight.requires_grad_(False)
    p = tracker.step()
    H = hf.hessian(model, loss_fn, data)
    assert H.shape[0] < 64 * 4 + 4 + 4 * 10 + 10 and not p.warm
    assert p.lambda_max == pytest.approx(hf.lambda_max(H, tol=1e-10), rel=1e-7)
    data[0].mul_(0.5)
    p = tracker.step()
    assert p.lambda_max == pytest.approx(hf.lambda_max(hf.hessian(model, loss_fn, data),
                                                       tol=1e-10), rel=1e-7)


def test_refreshed_operator_is_a_new_snapshot():
    model, loss_fn, data = _digits(48, 4)
    H = hf.hessian(model, loss_fn, data)
    V = torch.randn(3, H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _train_step(model, loss_fn, data, opt)
    with pytest.raises(hf.errors.ParametersChangedError):
        H.matmat(V)
    R = H.refreshed()
    assert R.num_matvecs == 0 and type(R) is type(H) and R.shape == H.shape
    dense = dense_hessian_reference(model, loss_fn, data)
    assert torch.allclose(R.matmat(V), V @ dense, rtol=1e-10, atol=1e-12)
    model[2].register_buffer("extra", torch.zeros(1))
    with pytest.raises(ConfigurationError, match="refreshed.*buffers"):
        R.refreshed()
