"""How fast and how right are hessfast's spectrum algorithms, against scipy's ARPACK?

Same process, same machine, same hessfast operator for both solvers. Cases are the HVP
benchmark's models (float32, untrained): the tanh MLP on digits, the CNN with BatchNorm,
the tiny causal LM.

Questions (one JSON line per measurement on stdout, a table on stderr):

* ``lambda_max``: matvecs, data passes and seconds to a relative residual of 1e-3 and 1e-6,
  hessfast (block size 1 and 4) vs ``scipy.sparse.linalg.eigsh(which="LA")`` (ARPACK) on the
  same operator; error against a tight reference (hessfast at 1e-8, cross-checked by ARPACK).
* ``top10``: the same for the 10 largest eigenvalues at 1e-3.
* ``trace``: mean relative error over seeds against the exact trace at budgets of 30, 99,
  300 matvecs, for Hutchinson, Hutch++ and XTrace, on the small test CNN of hessfast.testing.models
  (float64, exact dense Hessian).
* ``slq``: spectral density with P probes x m steps: all probes as one block per step vs
  one probe at a time (P separate runs), seconds and data passes.

    python bench/bench_spectrum.py [--quick] [--cases mlp_digits_1x512,lm_tiny]
                                   [--only eigen,trace,slq] [--device cuda] [--out FILE] [--save]

Flags, records and results files: bench/_harness.py (bench/README.md).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import warnings

import _harness as harness
import numpy as np
import torch
from bench_hvp import CASES, move  # bench/bench_hvp.py, next to this script

import hessfast as hf
from hessfast.density import spectral_density
from hessfast.estimators import trace
from hessfast.testing import dense_hessian_reference, timeit
from hessfast.testing.models import make_cnn


def _machine(rec: dict) -> dict:
    """The record's own ``machine`` field (kept beside the harness's stamp)."""
    if not rec.get("machine"):
        rec["machine"] = f"{platform.node()} {os.cpu_count()} cpu, torch {torch.__version__}"
    return rec


def _scipy_eigsh(H, k: int, tol: float, seed: int = 0) -> dict:
    from scipy.sparse.linalg import LinearOperator, eigsh

    n = H.shape[0]
    dtype = np.float32 if H.dtype == torch.float32 else np.float64

    def mv(x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=dtype).reshape(-1))
        return H.matvec(v).numpy()

    op = LinearOperator((n, n), matvec=mv, dtype=dtype)
    v0 = np.random.default_rng(seed).standard_normal(n).astype(dtype)
    mv0, p0 = H.num_matvecs, H.num_passes
    t = timeit(lambda: eigsh(op, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False,
                             maxiter=100000), repeats=1, warmup=0)
    vals = np.sort(t.result)[::-1]
    return {"eigenvalues": vals.astype(float).tolist(), "seconds": t.seconds,
            "matvecs": H.num_matvecs - mv0, "passes": H.num_passes - p0}


def _hessfast_eigsh(H, k: int, tol: float, block_size: int) -> dict:
    mv0 = H.num_matvecs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = timeit(lambda: hf.eigsh(H, k=k, which="LA", tol=tol, block_size=block_size),
                   repeats=1, warmup=0)
    r = t.result
    return {"eigenvalues": r.eigenvalues.tolist(), "seconds": t.seconds,
            "matvecs": H.num_matvecs - mv0, "passes": r.num_passes, "status": r.status,
            "max_residual_rel": float((r.residuals / r.eigenvalues.abs()).max())}


def _rel_err(vals: list[float], ref: list[float]) -> float:
    a, b = np.asarray(vals), np.asarray(ref)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def bench_eigen(name: str, quick: bool) -> list[dict]:
    model, loss_fn, batches = CASES[name]()
    H = hf.hessian(model, loss_fn, batches)
    H.matvec(torch.randn(H.shape[0]))  # decide the product path once, outside the timings
    out = []
    ref10 = _hessfast_eigsh(H, 10, 1e-8, 4)["eigenvalues"]
    ref1 = ref10[:1]
    tasks = [("lambda_max", 1, 1e-3), ("lambda_max", 1, 1e-6), ("top10", 10, 1e-3)]
    if quick:
        tasks = tasks[:1] + tasks[2:]
    for task, k, tol in tasks:
        ref = ref1 if k == 1 else ref10
        base = _scipy_eigsh(H, k, tol)
        rec = {"bench": "spectrum", "case": name, "task": task, "tol": tol, "n": H.shape[0],
               "hvp_mode": H.hvp_mode, "commit": harness.commit(),
               "scipy_arpack": {**base, "rel_err": _rel_err(base["eigenvalues"], ref)}}
        for b in sorted({1, min(k, 4), 4}):
            hfr = _hessfast_eigsh(H, k, tol, b)
            hfr["rel_err"] = _rel_err(hfr["eigenvalues"], ref)
            hfr["time_ratio_vs_arpack"] = hfr["seconds"] / base["seconds"]
            hfr["matvec_ratio_vs_arpack"] = hfr["matvecs"] / base["matvecs"]
            rec[f"hessfast_b{b}"] = hfr
        out.append(_machine(rec))
    return out


def bench_trace(quick: bool) -> list[dict]:
    model, loss_fn, batches = make_cnn()
    H = hf.hessian(model, loss_fn, batches)
    exact = float(torch.trace(dense_hessian_reference(model, loss_fn, batches)))
    seeds = range(10 if quick else 30)
    out = []
    for budget in (30, 99, 300):
        rec = {"bench": "trace", "case": "test_cnn", "n": H.shape[0], "budget": budget,
               "exact": exact, "seeds": len(seeds), "commit": harness.commit()}
        for method in ("hutchinson", "hutch++", "xtrace"):
            errs, secs = [], []
            for s in seeds:
                t = timeit(lambda s=s, m=method, b=budget: trace(H, b, method=m, seed=s),
                           repeats=1, warmup=0)
                secs.append(t.seconds)
                errs.append(abs(t.result.value - exact) / abs(exact))
            rec[method] = {"mean_rel_err": statistics.fmean(errs),
                           "median_seconds": statistics.median(secs)}
        rec["hutchpp_over_hutchinson"] = (rec["hutch++"]["mean_rel_err"]
                                          / rec["hutchinson"]["mean_rel_err"])
        out.append(_machine(rec))
    return out


def bench_slq(name: str, probes: int, steps: int, device: str = "cpu") -> dict:
    model, loss_fn, batches = CASES[name]()
    H = hf.hessian(model.to(device), loss_fn, move(batches, device))
    H.matmat(torch.randn(probes, H.shape[0]))  # path decided for k = P and k = 1
    H.matvec(torch.randn(H.shape[0]))
    p0 = H.num_passes
    block = timeit(lambda: spectral_density(H, num_probes=probes, num_steps=steps, seed=0),
                   repeats=1, warmup=0, device=device)
    d = block.result
    passes_block = H.num_passes - p0
    p0 = H.num_passes

    def one_at_a_time() -> None:
        for s in range(probes):
            spectral_density(H, num_probes=1, num_steps=steps, seed=100 + s)

    one = timeit(one_at_a_time, repeats=1, warmup=0, device=device)
    t_block, t_one = block.seconds, one.seconds
    rec = {"bench": "slq", "case": name, "probes": probes, "steps": steps,
           "block_seconds": t_block, "block_passes": passes_block,
           "one_at_a_time_seconds": t_one, "one_at_a_time_passes": H.num_passes - p0,
           "speedup": t_one / t_block, "hvp_mode_block": H.plans.get(probes).mode,
           "mean_eig_estimate": float(d.moments(1)), "device": device,
           "machine": torch.cuda.get_device_name() if device.startswith("cuda") else None,
           "commit": harness.commit()}
    return _machine(rec)


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser(__doc__, "quick", "device", device_help="device of the SLQ comparison")
    ap.add_argument("--cases", default="mlp_digits_1x512,cnn_bn_digits16,lm_tiny")
    ap.add_argument("--only", default="eigen,trace,slq")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    torch.manual_seed(0)
    out = harness.Records("bench_spectrum", args, tag=args.device.split(":")[0])
    for name in args.cases.split(","):
        if "eigen" in only:
            for rec in bench_eigen(name, args.quick):
                out.emit(rec)
                for key in [k for k in rec if k.startswith(("hessfast", "scipy"))]:
                    r = rec[key]
                    print(f"{name:18s} {rec['task']:10s} tol={rec['tol']:.0e} {key:14s} "
                          f"{r['seconds']:7.3f}s mv={r['matvecs']:4d} passes={r['passes']:4d} "
                          f"err={r['rel_err']:.1e}", file=sys.stderr)
        if "slq" in only:
            r = bench_slq(name, 8, 16 if args.quick else 32, args.device)
            out.emit(r)
            print(f"{name:18s} slq block {r['block_seconds']:.3f}s ({r['block_passes']} passes)"
                  f" vs one-at-a-time {r['one_at_a_time_seconds']:.3f}s "
                  f"({r['one_at_a_time_passes']} passes): {r['speedup']:.2f}x", file=sys.stderr)
    if "trace" in only:
        for r in bench_trace(args.quick):
            out.emit(r)
            print(f"trace budget={r['budget']:3d}: hutchinson {r['hutchinson']['mean_rel_err']:.2e}"
                  f" hutch++ {r['hutch++']['mean_rel_err']:.2e} xtrace "
                  f"{r['xtrace']['mean_rel_err']:.2e} (ratio {r['hutchpp_over_hutchinson']:.2f})",
                  file=sys.stderr)
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
