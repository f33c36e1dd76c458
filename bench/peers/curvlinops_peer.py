"""curvlinops 3.x: ``HessianLinearOperator`` on the one batch, as its docs use it.

Eigenvalues: ``scipy.sparse.linalg.eigsh(H.to_scipy(), which="LA")`` (curvlinops has no
eigensolver of its own; its eigenvalue example does exactly this: one vector per data pass).
Trace: ``curvlinops.xtrace`` (its most accurate estimator). Density:
``lanczos_approximate_spectrum`` (Papyan 2020, no reorthogonalization, boundaries by eigsh);
its nodes and weights are captured from ``fast_lanczos`` so the harness can smooth every
tool's density with the same kernel.
"""

from __future__ import annotations

import numpy as np
import torch

from .common import HVP_REPEATS, caught_warnings, flat_params, probe_vector, seconds, timed

TASKS = ("lambda_max", "top5", "trace", "density", "hvp")


def version() -> str:
    from importlib.metadata import version as v

    return v("curvlinops-for-pytorch")


def run(task: str, model, criterion, batch, cfg: dict, device: str) -> dict:
    import curvlinops
    import curvlinops.papyan2020traces.spectrum as spec
    from scipy.sparse.linalg import eigsh

    if task not in TASKS:
        return {"unsupported": f"unknown task {task}"}
    notes, out = [], {}
    counts = {"mv": 0, "passes": 0}
    np.random.seed(cfg["seed"])  # noqa: NPY002  (scipy eigsh draws v0 from it)
    torch.manual_seed(cfg["seed"])
    with caught_warnings(notes):
        setup = timed(lambda: curvlinops.HessianLinearOperator(model, criterion,
                                                               flat_params(model), [batch]),
                      device)
        H = setup.result
        inner = H._matmat

        def counted(M):
            counts["mv"] += int(M[0].shape[-1])
            counts["passes"] += 1
            return inner(M)

        warmup = None
        if task == "hvp":       # one warm-up product, not timed or counted
            warmup = timed(lambda: H @ probe_vector(H.shape[1], device), device)
        H._matmat = counted

        def solve() -> None:
            if task in ("lambda_max", "top5"):
                k = 1 if task == "lambda_max" else cfg["k"]
                vals = eigsh(H.to_scipy(), k=k, which="LA", tol=cfg["tol"],
                             return_eigenvectors=False)
                out["eigenvalues"] = sorted((float(v) for v in vals), reverse=True)
                notes.append("scipy eigsh (ARPACK) on H.to_scipy()")
            elif task == "trace":
                m = cfg["budget"] - cfg["budget"] % 2          # xtrace needs an even budget
                out["trace"] = float(curvlinops.xtrace(H, m))
                notes.append(f"xtrace({m}); no error bar")
            elif task == "density":
                runs: list = []
                fast = spec.fast_lanczos

                def capture(A, ncv, *a, **kw):
                    evals, evecs = fast(A, ncv, *a, **kw)
                    runs.append((evals.double().cpu(), (evecs[0, :] ** 2).double().cpu()))
                    return evals, evecs

                spec.fast_lanczos = capture
                try:
                    spec.lanczos_approximate_spectrum(H, ncv=cfg["steps"],
                                                      num_repeats=cfg["probes"])
                finally:
                    spec.fast_lanczos = fast
                out["nodes"] = [r[0].tolist() for r in runs]
                out["weights"] = [r[1].tolist() for r in runs]
                notes.append("lanczos_approximate_spectrum (+ eigsh BE boundaries at tol 1e-2)")
            else:  # hvp
                v = probe_vector(H.shape[1], device)
                for _ in range(HVP_REPEATS):
                    hv = H @ v
                out["hv_norm"] = float(hv.double().norm())

        solved = timed(solve, device)
    out.update(seconds(setup, solved, warmup), num_matvecs=counts["mv"],
               num_passes=counts["passes"], notes=notes)
    return out


def crosscheck_top(load, k: int, tol: float, device: str) -> list[float]:
    """scipy eigsh on curvlinops' float64 operator at a tight tolerance (reference check)."""
    import curvlinops
    from scipy.sparse.linalg import eigsh

    model, crit, batch = load(torch.float64)
    H = curvlinops.HessianLinearOperator(model, crit, flat_params(model), [batch])
    vals = eigsh(H.to_scipy(), k=k, which="LA", tol=tol, return_eigenvectors=False,
                 v0=np.random.default_rng(0).standard_normal(H.shape[1]))
    return sorted((float(v) for v in vals), reverse=True)
