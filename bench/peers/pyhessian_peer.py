"""PyHessian 0.1 (``pyhessian.hessian``) in its single-batch mode, defaults otherwise.

PyHessian 0.1's ``density()`` calls ``torch.eig``, removed in torch 2: :func:`install_eig_shim`
puts back an eigh-based replacement (the tridiagonal is symmetric, so eigh is exact) and the
cell reports that it did.
"""

from __future__ import annotations

import numpy as np
import torch

from .common import HVP_REPEATS, caught_warnings, probe_vector, seconds, timed

TASKS = ("lambda_max", "top5", "trace", "density", "hvp")


def version() -> str:
    from importlib.metadata import version as v

    return v("pyhessian")


def install_eig_shim() -> bool:
    """Give torch a ``torch.eig`` (removed in torch 2) built on ``torch.linalg.eigh``.

    torch 2 keeps a ``torch.eig`` stub that raises; the shim replaces it. True if installed.
    """
    try:
        torch.eig(torch.eye(2), eigenvectors=True)
        return False
    except (AttributeError, RuntimeError):
        pass

    def eig(A: torch.Tensor, eigenvectors: bool = False):
        w, V = torch.linalg.eigh(A)
        vals = torch.stack([w, torch.zeros_like(w)], dim=1)   # old API: [n, 2] (re, im)
        return vals, (V if eigenvectors else torch.empty(0, dtype=A.dtype, device=A.device))

    torch.eig = eig
    return True


def run(task: str, model, criterion, batch, cfg: dict, device: str) -> dict:
    import sys

    import pyhessian.hessian  # noqa: F401  (the package re-exports the class under this name)

    if task not in TASKS:
        return {"unsupported": f"unknown task {task}"}
    ph = sys.modules["pyhessian.hessian"]
    notes, out = [], {}
    counts = {"mv": 0, "passes": 0}
    hvp = ph.hessian_vector_product

    def counted_hvp(gradsH, params, v):
        counts["mv"] += 1
        counts["passes"] += 1        # one backward through the kept gradient graph
        return hvp(gradsH, params, v)

    def as_params(flat, params):
        sizes = [p.numel() for p in params]
        return [t.view_as(p) for t, p in zip(flat.split(sizes), params, strict=True)]

    ph.hessian_vector_product = counted_hvp
    torch.manual_seed(cfg["seed"])
    with caught_warnings(notes):
        setup = timed(lambda: ph.hessian(model, criterion, data=batch,
                                         cuda=str(device).startswith("cuda")), device)
        h = setup.result
        n = sum(p.numel() for p in h.params)
        warmup = None
        if task == "hvp":       # one warm-up product, not timed or counted
            w = as_params(probe_vector(n, device), h.params)
            warmup = timed(lambda: hvp(h.gradsH, h.params, w), device)

        def solve() -> None:
            if task in ("lambda_max", "top5"):
                k = 1 if task == "lambda_max" else cfg["k"]
                vals, _ = h.eigenvalues(top_n=k, tol=cfg["tol"])      # maxIter=100 default
                out["eigenvalues"] = [float(v) for v in vals]
                notes.append("power iteration: largest |eigenvalue|; stop on relative change")
            elif task == "trace":
                samples = h.trace(maxIter=cfg["budget"])              # tol=1e-3 default
                s = np.asarray(samples, dtype=np.float64)
                out["trace"] = float(s.mean())
                out["stderr"] = float(s.std(ddof=1) / np.sqrt(len(s))) if len(s) > 1 else None
                notes.append(f"Hutchinson stopped after {len(s)} of {cfg['budget']} probes")
            elif task == "density":
                if install_eig_shim():
                    out["shim"] = "torch.eig shim (eigh-based) installed for pyhessian 0.1"
                    notes.append(out["shim"])
                nodes, weights = h.density(iter=cfg["steps"], n_v=cfg["probes"])
                out.update(nodes=[[float(a) for a in r] for r in nodes],
                           weights=[[float(a) for a in r] for r in weights])
            else:  # hvp
                v = as_params(probe_vector(n, device), h.params)
                for _ in range(HVP_REPEATS):
                    hv = counted_hvp(h.gradsH, h.params, v)
                out["hv_norm"] = float(torch.cat([t.reshape(-1) for t in hv]).double().norm())

        solved = timed(solve, device)
    ph.hessian_vector_product = hvp
    out.update(seconds(setup, solved, warmup), num_matvecs=counts["mv"],
               num_passes=counts["passes"], notes=notes)
    return out
