"""The 95% intervals of ``trace`` and ``diagonal`` cover the truth >= 93% of the time (issue 16).

Deterministic: 200 fixed probe seeds per cell on fixed matrices ``Q diag(lambda) Q^T`` at
n = 100, the cells that failed before (XTrace's correlated leave-one-out spread, 85% at a
fixed budget; the adaptive stop that was optional stopping, 77-88%), plus the Hutchinson and
diagonal cells that must stay honest. The full table (n = 400, seven spectra, every method
and mode) is ``bench/bench_coverage.py``'s, in ``bench/RESULTS.md``.

With 200 seeds the binomial standard error at 95% is 1.5%, so 93% is a floor that a
nominal-95% interval clears with these seeds; the old intervals measured 70-87% here.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hessfast as hf
from hessfast.testing.spectra import with_spectrum

N = 100
SEEDS = 200
FLOOR = 0.93


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _spectrum(name: str) -> torch.Tensor:
    i = torch.arange(1, N + 1, dtype=torch.float64)
    if name == "decay1.2":
        return i**-1.2
    if name == "indefinite":
        return torch.linspace(-0.5, 1.0, N, dtype=torch.float64)
    raise KeyError(name)


def _trace_coverage(name: str, method: str, budget: int, **kw: float) -> tuple[float, int]:
    lam = _spectrum(name)
    M, _ = with_spectrum(lam, seed=7)
    A = hf.LinearOperator.from_matrix(M)
    truth = float(lam.sum())
    hits = met = 0
    for s in range(SEEDS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a run that misses rtol still has an interval
            r = hf.trace(A, budget, method=method, seed=s, **kw)
        lo, hi = r.confidence_interval(0.95)
        hits += lo <= truth <= hi
        met += r.converged
    return hits / SEEDS, met


@pytest.mark.parametrize(
    "name,method,budget,kw",
    [
        ("decay1.2", "xtrace", 30, {}),  # was 82%: the leave-one-out spread
        ("decay1.2", "xtrace", 99, {"rtol": 0.05}),  # was 70%: spread + optional stopping
        ("decay1.2", "hutch++", 99, {"rtol": 0.05}),  # was 87%: optional stopping
        ("indefinite", "hutch++", 99, {"rtol": 0.1}),
        ("decay1.2", "hutchinson", 30, {}),
        ("decay1.2", "hutchinson", 600, {"rtol": 0.1}),
    ],
    ids=lambda x: str(x) if not isinstance(x, dict) else ",".join(f"{k}={v}" for k, v in x.items()),
)
def test_trace_interval_covers(name: str, method: str, budget: int, kw: dict) -> None:
    cov, met = _trace_coverage(name, method, budget, **kw)
    assert cov >= FLOOR, f"{method} on {name}, budget {budget} {kw}: coverage {cov:.3f}"
    if kw:  # the adaptive target is reachable here: the rule must not simply run out
        assert met >= 0.9 * SEEDS, met


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_diagonal_intervals_cover_per_entry(method: str) -> None:
    lam = _spectrum("decay1.2")
    M, _ = with_spectrum(lam, seed=7)
    A = hf.LinearOperator.from_matrix(M)
    d = M.diagonal()
    hits = torch.zeros_like(d)
    for s in range(SEEDS):
        r = hf.diagonal(A, 30, method=method, seed=s)
        lo, hi = r.confidence_interval(0.95)
        hits += ((lo <= d) & (d <= hi)).double()
    cov = hits / SEEDS
    assert float(cov.mean()) >= FLOOR, float(cov.mean())
    # single entries: 200 seeds give each a binomial sd of 1.5%; the lowest of 100 entries of
    # an honest 95% interval sits near 95 - 3 sd
    assert float(cov.min()) >= 0.88, float(cov.min())
