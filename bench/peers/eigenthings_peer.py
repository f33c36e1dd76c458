"""hessian-eigenthings 1.0 (``HessianOperator`` + its algorithms), defaults otherwise.

lambda_max: ``power_iteration_one`` (its one-eigenvalue routine, max_iter=100). Top-k:
``lanczos(which="LA")`` whose default ``max_iter = 2k`` runs without restarts: the converged
flags it returns are recorded. Trace: ``trace`` (Hutch++ default). Density:
``spectral_density`` (SLQ, one run per probe).
"""

from __future__ import annotations

from .common import HVP_REPEATS, caught_warnings, probe_vector, seconds, timed

TASKS = ("lambda_max", "top5", "trace", "density", "hvp")


def version() -> str:
    from importlib.metadata import version as v

    return v("hessian-eigenthings")


def run(task: str, model, criterion, batch, cfg: dict, device: str) -> dict:
    import hessian_eigenthings as he

    if task not in TASKS:
        return {"unsupported": f"unknown task {task}"}
    notes, out = [], {}
    counts = {"mv": 0}
    with caught_warnings(notes):
        setup = timed(lambda: he.HessianOperator(model, [batch], he.supervised_loss(criterion)),
                      device)
        op = setup.result
        inner = op.matvec

        def counted(v):
            counts["mv"] += 1
            return inner(v)

        warmup = None
        if task == "hvp":       # one warm-up product, not timed or counted
            warmup = timed(lambda: inner(probe_vector(op.size, device, op.dtype)), device)
        op.matvec = counted

        def solve() -> None:
            if task == "lambda_max":
                lam, _, res, iters, conv = he.power_iteration_one(op, tol=cfg["tol"],
                                                                  seed=cfg["seed"])
                out["eigenvalues"], out["converged"] = [float(lam)], [bool(conv)]
                notes.append(f"power_iteration_one: {iters} iterations, residual {res:.3g}")
            elif task == "top5":
                r = he.lanczos(op, k=cfg["k"], which="LA", tol=cfg["tol"], seed=cfg["seed"])
                out["eigenvalues"] = [float(v) for v in r.eigenvalues]
                out["converged"] = [bool(c) for c in r.converged]
                notes.append(f"lanczos: {r.iterations} steps (default 2k, no restart), "
                             f"{int(r.converged.sum())}/{cfg['k']} flagged converged")
            elif task == "trace":
                r = he.trace(op, num_matvecs=cfg["budget"], seed=cfg["seed"])
                out.update(trace=float(r.estimate), stderr=float(r.stderr))
                notes.append("hutch++ (default)")
            elif task == "density":
                r = he.spectral_density(op, num_runs=cfg["probes"], lanczos_steps=cfg["steps"],
                                        seed=cfg["seed"])
                nodes, weights = [], []
                for nrow, wrow in zip(r.raw_eigenvalues.tolist(), r.raw_weights.tolist(),
                                      strict=True):
                    keep = [i for i, a in enumerate(nrow) if a == a]       # drop NaN padding
                    nodes.append([nrow[i] for i in keep])
                    weights.append([wrow[i] for i in keep])
                out.update(nodes=nodes, weights=weights)
            else:  # hvp
                v = probe_vector(op.size, device, op.dtype)
                for _ in range(HVP_REPEATS):
                    hv = counted(v)
                out["hv_norm"] = float(hv.double().norm())

        solved = timed(solve, device)
    out.update(seconds(setup, solved, warmup), num_matvecs=counts["mv"],
               num_passes=counts["mv"], notes=notes)
    return out
