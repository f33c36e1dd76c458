"""One cell of the comparison, run in a fresh process: ``python -m peers.cell SPEC`` from
``bench/`` (what ``bench/compare.py`` starts).

SPEC is a JSON object: ``{"kind": "prepare"|"reference"|"crosscheck"|"cell"|"version", ...}``.
The result is printed as one line ``@@RESULT {json}``; a failure prints the same line with
``{"error": ...}`` (and the traceback on stderr).
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback

MARK = "@@RESULT "

ADAPTERS = {
    "hessfast": "hessfast_peer",
    "pyhessian": "pyhessian_peer",
    "curvlinops": "curvlinops_peer",
    "eigenthings": "eigenthings_peer",
}

IMPORTS = {
    "hessfast": "hessfast",
    "pyhessian": "pyhessian",
    "curvlinops": "curvlinops",
    "eigenthings": "hessian_eigenthings",
}


def warm_up_torch_func() -> float:
    """Pay torch.func's one-time lazy initialisation (~1.3 s on 2 cores) before any clock.

    The first ``vmap(grad(...))`` and ``jvp`` in a process load torch's functorch machinery;
    hessfast (auto plan, pre-flight) and curvlinops (jvp of jacrev) would otherwise be
    charged for it in every fresh cell, PyHessian and hessian-eigenthings not. Done for every
    tool alike, like the imports, and reported as ``torch_func_warmup_seconds``.
    """
    import time

    import torch

    t0 = time.perf_counter()
    x = torch.ones(2, 3)
    torch.func.vmap(torch.func.grad(lambda a: (a * a).sum()))(x)
    torch.func.jvp(lambda a: (a * a).sum(), (x[0],), (x[0],))
    return time.perf_counter() - t0


def _adapter(tool: str):
    return importlib.import_module(f".{ADAPTERS[tool]}", __package__)


def handle(spec: dict) -> dict:
    import torch

    from . import workloads

    kind = spec["kind"]
    device = spec.get("device", "cpu")
    if kind == "version":
        out = {"python": sys.version.split()[0], "torch": torch.__version__, "tools": {}}
        for tool, mod in IMPORTS.items():
            try:
                importlib.import_module(mod)
                out["tools"][tool] = _adapter(tool).version()
            except Exception as e:  # noqa: BLE001
                out["tools"][tool] = None
                out.setdefault("missing", {})[tool] = f"{type(e).__name__}: {e}"[:200]
        out["threads"] = torch.get_num_threads()
        if str(device).startswith("cuda") and torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
        return out
    if kind == "prepare":
        return workloads.prepare(spec["case"], spec["path"])

    def load(dtype=torch.float32):
        return workloads.load(spec["case"], spec["path"], device, dtype)

    if kind == "reference":
        return _adapter("hessfast").reference(load, spec["cfg"], device)
    if kind == "crosscheck":
        cfg = spec["cfg"]
        return {"top": _adapter("curvlinops").crosscheck_top(load, cfg["k"], cfg["tol"], device)}
    if kind == "cell":
        warm = warm_up_torch_func()
        torch.manual_seed(spec["cfg"]["seed"])
        model, crit, batch = load()
        out = _adapter(spec["tool"]).run(spec["task"], model, crit, batch, spec["cfg"], device)
        out["torch_func_warmup_seconds"] = warm
        return out
    raise ValueError(f"unknown kind {kind!r}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    try:
        out = handle(spec)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {e}"[:500]}
    print(MARK + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
