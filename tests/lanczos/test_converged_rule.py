"""The one convergence rule (hessfast.lanczos.verify.converged) and its four callers."""

from __future__ import annotations

import contextlib
import math
import random

import pytest
import torch

import hessfast as hf
from hessfast.lanczos.verify import ZERO_SCALE, converge_threshold, converged, residual_floor


def _written_out(theta: float, res: float, tol: float, norm: float, dtype: torch.dtype) -> bool:
    """The rule as power.py and blocks.py wrote it inline before it had one home."""
    floor = residual_floor(norm, dtype)
    return res <= max(tol * max(abs(theta), ZERO_SCALE * norm), floor)


def test_scalar_and_tensor_forms_decide_like_the_formula():
    rnd = random.Random(0)
    cases = [(0.0, 0.0, 1e-4, 0.0), (0.0, 1e-300, 1e-4, 0.0), (-3.0, 3e-4, 1e-4, 3.0),
             (-3.0, 3.0000001e-4, 1e-4, 3.0), (1e-9, 2e-7, 1e-4, 2.0), (5.0, math.nan, 1e-4, 5.0)]
    for _ in range(300):  # around the threshold, where a rounding difference would show
        theta, norm = rnd.uniform(-10, 10), rnd.uniform(0, 20)
        tol = 10 ** rnd.uniform(-12, -1)
        thr = max(tol * max(abs(theta), ZERO_SCALE * norm), residual_floor(norm, torch.float64))
        cases.append((theta, thr * (1 + rnd.choice([-1e-16, 0.0, 1e-16, 1e-3])), tol, norm))
    for dtype in (torch.float64, torch.float32):
        for theta, res, tol, norm in cases:
            want = _written_out(theta, res, tol, norm, dtype)
            assert converged(theta, res, tol, norm, dtype) is want
        thetas = torch.tensor([c[0] for c in cases], dtype=torch.float64)
        res = torch.tensor([c[1] for c in cases], dtype=torch.float64)
        got = converged(thetas, res, 1e-4, 7.0, dtype)
        floor = residual_floor(7.0, dtype)
        assert got.dtype == torch.bool and got.shape == thetas.shape
        assert torch.equal(got, res <= converge_threshold(thetas, 1e-4, 7.0, floor))


def test_the_floor_is_never_asked_below():
    # a residual at the float32 floor converges however small tol is
    norm = 4.0
    floor = residual_floor(norm, torch.float32)
    assert converged(2.0, floor, 1e-300, norm, torch.float32)
    assert not converged(2.0, floor * (1 + 1e-6), 1e-300, norm, torch.float32)
    # a zero eigenvalue converges at tol * 1e-3 ||A||
    assert converged(0.0, 0.9e-3 * 1e-4 * norm, 1e-4, norm, torch.float64)
    assert not converged(0.0, 1.1e-3 * 1e-4 * norm, 1e-4, norm, torch.float64)


@pytest.mark.parametrize("route", ["lanczos", "power", "dense"])
def test_every_eigsh_route_reports_what_the_rule_says(route):
    g = torch.Generator().manual_seed(3)
    n = 20 if route == "dense" else 90
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    M = (Q * torch.linspace(-1.0, 4.0, n, dtype=torch.float64)) @ Q.T
    A = hf.LinearOperator.from_matrix(M)
    kw = dict(method="power") if route == "power" else {}
    with pytest.warns(UserWarning) if route == "dense" else contextlib.nullcontext():
        r = hf.eigsh(A, k=1, tol=1e-5, max_matvecs=3000, **kw)
    assert r.method == route
    want = converged(r.eigenvalues, r.residuals, 1e-5, r.norm_estimate, A.dtype)
    assert torch.equal(r.converged, want) and bool(want.all())
