"""One cell of the comparison, run in a fresh process: ``python -m peers.cell SPEC`` from
``bench/`` (what ``bench/compare.py`` starts).

SPEC is a JSON object: ``{"kind": "prepare"|"reference"|"crosscheck"|"cell"|"version", ...}``.
The result is printed as one line ``@@RESULT {json}``; a failure prints the same line with
``{"error": ...}`` (and the traceback on stderr).

A ``cell`` is timed as a user waits: the adapter and its tool are imported and the workload
is loaded (untimed: the same for every tool; every adapter imports hessfast.testing for the
timer), then the clock runs from the tool's first call to its answer. Nothing is warmed up
before it: one-time costs a tool triggers (torch.func's lazy initialisation, a path planner's
timing) are the tool's, as they are the user's.
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
        adapter = _adapter(spec["tool"])
        torch.manual_seed(spec["cfg"]["seed"])
        model, crit, batch = load()
        return adapter.run(spec["task"], model, crit, batch, spec["cfg"], device)
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
