"""hessfast through its public API (``hf.hessian`` on the one batch, defaults otherwise)."""

from __future__ import annotations

import torch

import hessfast as hf

from .common import HVP_REPEATS, caught_warnings, probe_vector, seconds, timed

TASKS = ("lambda_max", "top5", "trace", "density", "hvp")


def version() -> str:
    return getattr(hf, "__version__", "dev")


def run(task: str, model, criterion, batch, cfg: dict, device: str) -> dict:
    if task not in TASKS:
        return {"unsupported": f"unknown task {task}"}
    notes, out = [], {}
    with caught_warnings(notes):
        # the first library call: construction and pre-flight, torch.func's lazy
        # initialisation included wherever hessfast triggers it
        setup = timed(lambda: hf.hessian(model, criterion, batch,
                                         hvp_mode=cfg.get("hvp_mode", "auto")), device)
        H = setup.result
        warmup = None
        if task == "hvp":       # one warm-up product (auto's plan for k=1), not timed
            warmup = timed(lambda: H @ probe_vector(H.shape[0], device, H.dtype), device)
        mv0, p0 = H.num_matvecs, H.num_passes

        def solve() -> None:
            if task in ("lambda_max", "top5"):
                k = 1 if task == "lambda_max" else cfg["k"]
                r = hf.eigsh(H, k=k, which="LA", tol=cfg["tol"], seed=cfg["seed"],
                             block_size=cfg.get("block_size"))
                out["eigenvalues"] = [float(v) for v in r.eigenvalues]
                out["converged"] = [bool(c) for c in r.converged]
            elif task == "trace":
                r = hf.trace(H, cfg["budget"], method=cfg.get("method", "xtrace"),
                             seed=cfg["seed"], rtol=cfg.get("rtol"))
                out.update(trace=r.value, stderr=r.stderr, converged=[bool(r.converged)])
            elif task == "density":
                s = hf.spectral_density(H, num_probes=cfg["probes"], num_steps=cfg["steps"],
                                        seed=cfg["seed"])
                out.update(nodes=s.nodes.tolist(), weights=s.weights.tolist())
            else:  # hvp
                v = probe_vector(H.shape[0], device, H.dtype)
                for _ in range(HVP_REPEATS):
                    hv = H @ v
                out["hv_norm"] = float(hv.double().norm())

        solved = timed(solve, device)
    out["hvp_mode"] = f"{H.hvp_mode}: {H.hvp_mode_reason}"[:200]
    out.update(seconds(setup, solved, warmup), num_matvecs=H.num_matvecs - mv0,
               num_passes=H.num_passes - p0, notes=notes)
    return out


def reference(load, cfg: dict, device: str) -> dict:
    """Tight references: dense float64 for small n, else eigsh at tol 1e-8 in float64.

    ``load(dtype)`` gives a fresh (model, criterion, batch) of the workload in that dtype.
    """
    out: dict = {}
    model, crit, batch = load(torch.float64)
    H64 = hf.hessian(model, crit, batch)
    n = H64.shape[0]
    out["n"] = n
    v = probe_vector(n, device, torch.float64)
    out["hv_norm"] = float((H64 @ v).norm())
    if n <= cfg.get("dense_max", 4000):
        D = H64.to_dense()
        ev = torch.linalg.eigvalsh(0.5 * (D + D.T)).cpu()
        out["kind"] = "dense float64 eigh"
        out["top"] = ev.flip(0)[: cfg["k"]].tolist()
        out["lambda_min"] = float(ev[0])
        out["trace"], out["trace_stderr"], out["trace_kind"] = float(ev.sum()), 0.0, "exact"
        out["density_nodes"] = [ev.tolist()]
        out["density_weights"] = [[1.0 / n] * n]
        out["density_kind"] = "exact eigenvalues"
        return out
    r = hf.eigsh(H64, k=cfg["k"], which="LA", tol=1e-8, max_matvecs=20000)
    rs = hf.eigsh(H64, k=1, which="SA", tol=1e-4, max_matvecs=20000)
    out["kind"] = "hessfast eigsh float64, tol 1e-8"
    out["top"] = r.eigenvalues.tolist()
    out["top_converged"] = bool(r.converged.all())
    out["lambda_min"] = float(rs.eigenvalues[0])
    del H64, model
    # the stochastic references in float32: their error bars dominate the rounding
    model, crit, batch = load(torch.float32)
    H = hf.hessian(model, crit, batch)
    t = hf.trace(H, cfg["trace_ref_budget"], method="xtrace", seed=987)
    out["trace"], out["trace_stderr"] = t.value, t.stderr
    out["trace_kind"] = f"xtrace, {t.num_matvecs} products"
    s = hf.spectral_density(H, num_probes=cfg["density_ref_probes"],
                            num_steps=cfg["density_ref_steps"], seed=987)
    out["density_nodes"], out["density_weights"] = s.nodes.tolist(), s.weights.tolist()
    out["density_kind"] = (f"SLQ {cfg['density_ref_probes']} probes x "
                           f"{cfg['density_ref_steps']} steps")
    return out
