"""The lockstep Lanczos of many small blocks (hessfast.lanczos.lockstep) on its own."""

from __future__ import annotations

import pytest
import torch

from hessfast.lanczos.lockstep import Lockstep


def _blocks(sizes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in sizes:
        Q = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
        ev = torch.linspace(-1.0, 2.0 + m / 10, m, dtype=torch.float64)
        out.append((Q * ev) @ Q.T)
    return out, g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_groups_in_lockstep_match_dense_eigenvalues(dtype):
    mats, g = _blocks([30, 7, 18], dtype)
    lz = Lockstep(3, 40, 1e-8 if dtype == torch.float64 else 1e-4)
    for i, M in enumerate(mats):
        q = torch.randn(M.shape[0], generator=g, dtype=torch.float64)
        q = (q / q.norm()).to(dtype)
        lz.start(i, q, M.to(dtype) @ q)
    rounds = 0
    while nxt := lz.advance():
        rounds += 1
        assert [i for i, _ in nxt] == sorted(i for i, _ in nxt)  # start order
        for i, q in nxt:
            lz.receive(i, mats[i].to(dtype) @ q)
    for i, M in enumerate(mats):
        ev = torch.linalg.eigvalsh(M)
        r = lz.ritz(i)
        scale = float(ev.abs().max())
        assert r.converged and 1 <= r.steps <= M.shape[0]
        rel = 1e-6 if dtype == torch.float64 else 1e-3
        assert abs(r.lambda_max - float(ev[-1])) <= rel * scale
        assert r.lambda_max_residual >= r.residual_floor > 0
        # a Ritz value lies within its residual of an eigenvalue (up to the dtype's rounding)
        slack = 1e-12 if dtype == torch.float64 else 1e-4 * scale
        assert float((ev - r.lambda_min).abs().min()) <= r.lambda_min_residual + slack
    assert rounds + 1 == max(lz.ritz(i).steps for i in range(3))


def test_a_block_of_size_m_stops_after_m_steps():
    (M,), g = _blocks([5], torch.float64, seed=1)
    lz = Lockstep(1, 50, 1e-300)  # no tolerance is met: only the space can end it
    q = torch.zeros(5, dtype=torch.float64)
    q[0] = 1.0
    lz.start(0, q, M @ q)
    while nxt := lz.advance():
        for i, v in nxt:
            lz.receive(i, M @ v)
    r = lz.ritz(0)
    assert r.converged and r.steps <= 5
    assert r.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(M)[-1]), rel=1e-12)


def test_max_steps_caps_an_unconverged_group():
    (M,), g = _blocks([40], torch.float64, seed=2)
    lz = Lockstep(1, 4, 1e-14)
    q = torch.randn(40, generator=g, dtype=torch.float64)
    q = q / q.norm()
    lz.start(0, q, M @ q)
    while nxt := lz.advance():
        for i, v in nxt:
            lz.receive(i, M @ v)
    r = lz.ritz(0)
    assert r.steps == 4 and not r.converged and r.lambda_max_residual > 1e-10
