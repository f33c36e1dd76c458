"""Coverage of the 95% intervals of ``hf.trace`` and ``hf.diagonal`` (issue 16, item 3).

Each cell runs the library over ``--seeds`` probe seeds on one fixed matrix
``Q diag(lambda) Q^T`` (``hessfast.testing.spectra.with_spectrum``, float64, n = ``--n``) whose
trace and diagonal are known, and counts how often ``confidence_interval(0.95)`` contains the
truth. Spectra: PSD decaying like 1/i^a (a = 0.5, 1.2, 2), flat, uniform indefinite, five
outliers over a small bulk, and a trace near zero. Modes: fixed budgets (``--budgets``) and the
adaptive stop (``rtol=0.05``; ``atol`` for the trace near zero, where no relative target can
be met). The diagonal's cells count (seed, entry) pairs; "worst entry" is the lowest coverage
of any single entry over the seeds.

Prints one JSON line per cell, then a markdown table (coverage, its binomial standard error,
mean relative half-width, mean products, fraction that met the adaptive target); with
``--json FILE``, the rows as one JSON array; ``--out``/``--save`` append the JSON lines
(bench/_harness.py, bench/README.md).

    python bench/bench_coverage.py [--seeds 200] [--n 400] [--budgets 30,100]
        [--only trace,diagonal] [--methods hutchinson,hutch++,xtrace]
        [--modes fixed,adaptive] [--spectra SUBSTR,...] [--json FILE] [--out FILE] [--save]
"""

from __future__ import annotations

import json
import math
import time
import warnings

import _harness as harness
import torch

import hessfast as hf
from hessfast.testing.spectra import with_spectrum

RTOL = 0.05
#: budget caps of the adaptive runs: below n for Hutch++/XTrace (a budget >= n is the exact
#: path), generous for Hutchinson (its slow cells need ~1500 samples at rtol 0.05).
ADAPTIVE_BUDGET = {"hutchinson": 2000, "hutch++": 399, "xtrace": 399}


def spectra(n: int) -> dict[str, torch.Tensor]:
    """The eigenvalue family ``name -> [n]`` float64 (seeded; see the module docstring)."""
    i = torch.arange(1, n + 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(12345)
    out = {f"PSD 1/i^{a:g}": i ** -a for a in (0.5, 1.2, 2.0)}
    out["flat U[0.5,1.5]"] = torch.linspace(0.5, 1.5, n, dtype=torch.float64)
    out["indefinite U[-0.5,1]"] = torch.linspace(-0.5, 1.0, n, dtype=torch.float64)
    bulk = 0.1 * torch.rand(n - 5, generator=g, dtype=torch.float64)
    out["5 outliers + bulk"] = torch.cat(
        [torch.tensor([50.0, 30.0, 20.0, 10.0, 5.0], dtype=torch.float64), bulk])
    out["trace ~ 0"] = torch.linspace(-1.0, 1.0, n, dtype=torch.float64) + 0.01
    return out


def _adaptive_args(name: str, M: torch.Tensor) -> dict[str, float]:
    if name == "trace ~ 0":  # |trace| = 0.01 n: a relative target is out of reach
        return {"atol": 0.2 * float(torch.linalg.matrix_norm(M))}
    return {"rtol": RTOL}


def trace_cell(M: torch.Tensor, truth: float, method: str, mode: str, seeds: int,
               extra: dict[str, float]) -> dict:
    A = hf.LinearOperator.from_matrix(M)
    hits, width, mv, met = 0, 0.0, 0, 0
    for s in range(seeds):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == "adaptive":
                r = hf.trace(A, ADAPTIVE_BUDGET[method], method=method, seed=s, **extra)
            else:
                r = hf.trace(A, int(mode), method=method, seed=s)
        lo, hi = r.confidence_interval(0.95)
        hits += lo <= truth <= hi
        width += 0.5 * (hi - lo) / abs(truth)
        mv += r.num_matvecs
        met += r.status != "MAX_MATVECS"
    return dict(coverage=hits / seeds, rel_halfwidth=width / seeds, matvecs=mv / seeds,
                met=met / seeds)


def diagonal_cell(M: torch.Tensor, method: str, budget: int, seeds: int) -> dict:
    A = hf.LinearOperator.from_matrix(M)
    d = M.diagonal()
    hits = torch.zeros_like(d)
    width = 0.0
    for s in range(seeds):
        r = hf.diagonal(A, budget, method=method, seed=s)
        lo, hi = r.confidence_interval(0.95)
        hits += ((lo <= d) & (d <= hi)).double()
        width += float(((hi - lo) / 2 / d.abs().clamp(min=1e-300)).median())
    cov = hits / seeds
    return dict(coverage=float(cov.mean()), worst_entry=float(cov.min()),
                rel_halfwidth=width / seeds, matvecs=float(budget), met=1.0)


def main() -> None:
    ap = harness.parser(__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--budgets", default="30,100")
    ap.add_argument("--only", default="trace,diagonal")
    ap.add_argument("--methods", default="hutchinson,hutch++,xtrace")
    ap.add_argument("--spectra", default="", help="comma-separated substrings of names")
    ap.add_argument("--modes", default="fixed,adaptive")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    budgets = [b for b in args.budgets.split(",") if b]
    rows = []
    out = harness.Records("bench_coverage", args, tag="cpu")
    t0 = time.perf_counter()  # the run's wall time, printed: not a measurement
    for name, lam in spectra(args.n).items():
        if args.spectra and not any(p in name for p in args.spectra.split(",")):
            continue
        M, _ = with_spectrum(lam, seed=7)
        truth = float(lam.sum())
        if "trace" in args.only:
            for method in args.methods.split(","):
                modes = (budgets if "fixed" in args.modes else []) + (
                    ["adaptive"] if "adaptive" in args.modes else [])
                for mode in modes:
                    extra = _adaptive_args(name, M) if mode == "adaptive" else {}
                    row = dict(kind="trace", spectrum=name, method=method, mode=mode, **extra)
                    row.update(trace_cell(M, truth, method, mode, args.seeds, extra))
                    rows.append(row)
                    out.emit(row)
        if "diagonal" in args.only and "fixed" in args.modes:
            for method in ("hutchinson", "xdiag"):
                for b in budgets:
                    row = dict(kind="diagonal", spectrum=name, method=method, mode=b)
                    row.update(diagonal_cell(M, method, int(b), args.seeds))
                    rows.append(row)
                    out.emit(row)
    out.close()
    print(f"\n{args.seeds} seeds per cell, n = {args.n}, {time.perf_counter() - t0:.0f} s\n")
    print("| quantity | spectrum | method | budget | coverage (95%) | rel. half-width "
          "| products | target met |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        se = math.sqrt(r["coverage"] * (1 - r["coverage"]) / args.seeds)
        cov = f"{100 * r['coverage']:.1f} ± {100 * se:.1f}"
        if r["kind"] == "diagonal":
            cov += f" (worst entry {100 * r['worst_entry']:.0f})"
        mode = r["mode"]
        if mode == "adaptive":
            mode = (f"rtol={r['rtol']:g}" if "rtol" in r else f"atol={r['atol']:.3g}") + \
                f" (cap {ADAPTIVE_BUDGET[r['method']]})"
        met = f"{100 * r['met']:.0f}%" if r["mode"] == "adaptive" else ""
        print(f"| {r['kind']} | {r['spectrum']} | {r['method']} | {mode} | {cov} | "
              f"{r['rel_halfwidth']:.3g} | {r['matvecs']:.0f} | {met} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
