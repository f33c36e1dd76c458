"""What building a curvature operator costs a user, in gradients of the same model and data.

Each case runs in a FRESH Python process, so one-time initialisation (torch.func's, sympy's
import by autograd, allocator warm-up) is counted as a user pays it. In that process,
``import hessfast`` is timed apart, the model and data are built, and with ``--start warm``
(default) the model runs one plain gradient first, as it has after training or evaluation,
so that torch's own first-call costs (thread pools, kernel libraries) are not counted;
``--start cold`` runs nothing before the clock. The clock runs from the first hessfast call:

* ``build``: ``hf.hessian(model, loss_fn, data, hvp_mode=...)`` returns;
* ``first_matmat``: the first ``H.matmat(V)``, ``V: [1, n]`` (what ``lambda_max`` asks first);
* ``product``: a later ``H.matmat`` of the same size (median of 5): the steady cost.

A gradient is one ``loss.backward()`` over the same data (every batch), timed in the same
process after two warm-up calls (median of 5). Reported in gradients: ``build_grads``,
``first_matmat_grads``, ``setup_grads`` (build + first matmat) and ``setup_beyond_product``
(``setup_grads`` minus one steady product: what the set-up adds to the work itself).
``torch_func_initialised`` says whether torch.func's one-time initialisation ran (it imports
``torch._dynamo``); ``sympy_imported`` whether autograd's first ``grad_outputs`` call did.

Cases: the tiny float64 test models of :mod:`hessfast.testing.models` (3 uneven batches) and
the peer comparison's workloads of ``bench/peers/workloads.py`` (one batch, float32).

    python -m bench.bench_setup [--cases tiny/mlp,peers/lm] [--modes auto,fwd_rev]
                                [--start warm,cold] [--threads 2] [--out FILE]

One JSON line per case on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ("tiny/mlp", "tiny/cnn", "tiny/lm")
PEERS = ("peers/mlp", "peers/cnn", "peers/lm")
SMALL = (*TINY, "peers/mlp")


def _load(case: str, workdir: str):
    """(model, loss_fn, data) of a case: built from fixed seeds, identical in every process."""
    family, name = case.split("/")
    if family == "tiny":
        from hessfast.testing import models

        return models.BUILDERS[name]()
    from bench.peers import workloads

    path = os.path.join(workdir, f"{name}.pt")
    model, criterion, (x, y) = workloads.load(name, path)
    return model, criterion, (x, y)


def _gradient(model, loss_fn, data, loss_form: str) -> None:
    """One gradient over all the data, as a training step computes it."""
    from hessfast.testing.dense import compute_loss

    batches = [data] if isinstance(data, tuple) else list(data)
    for batch in batches:
        compute_loss(model, loss_fn, batch, loss_form).backward()
    model.zero_grad(set_to_none=True)


def child(spec: dict) -> dict:
    """Run one case in this (fresh) process."""
    import torch

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    import hessfast as hf

    import_s = time.perf_counter() - t0
    from hessfast.testing import timeit

    model, loss_fn, data = _load(spec["case"], spec["workdir"])
    if spec["start"] == "warm":
        _gradient(model, loss_fn, data, "auto")  # the references' rule fits these cases

    t0 = time.perf_counter()
    H = hf.hessian(model, loss_fn, data, hvp_mode=spec["mode"])
    t1 = time.perf_counter()
    V = torch.randn(1, H.shape[0], generator=torch.Generator().manual_seed(0), dtype=H.dtype)
    H.matmat(V)
    t2 = time.perf_counter()
    func_init = "torch._dynamo" in sys.modules
    sympy = "sympy" in sys.modules
    product = timeit(lambda: H.matmat(V), repeats=5, warmup=0).median
    grad = timeit(lambda: _gradient(model, loss_fn, data, H.loss_form), repeats=5, warmup=2).median
    build, first = t1 - t0, t2 - t1
    return {
        "case": spec["case"],
        "mode": spec["mode"],
        "start": spec["start"],
        "n": H.shape[0],
        "batches": H.num_batches,
        "dtype": str(H.dtype).replace("torch.", ""),
        "hvp_mode": H.hvp_mode,
        "import_hessfast_s": round(import_s, 4),
        "build_s": round(build, 4),
        "first_matmat_s": round(first, 4),
        "product_s": round(product, 5),
        "gradient_s": round(grad, 5),
        "build_grads": round(build / grad, 2),
        "first_matmat_grads": round(first / grad, 2),
        "setup_grads": round((build + first) / grad, 2),
        "product_grads": round(product / grad, 2),
        "setup_beyond_product": round((build + first - product) / grad, 2),
        "torch_func_initialised": func_init,
        "sympy_imported": sympy,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(SMALL),
                    help=f"comma-separated, from {', '.join(TINY + PEERS)} (default: the small)")
    ap.add_argument("--modes", default="auto", help="hvp_mode per case, comma-separated")
    ap.add_argument("--start", default="warm", help="warm and/or cold, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(TINY + PEERS))
    if unknown:
        ap.error(f"unknown cases {unknown}; choose from {TINY + PEERS}")
    commit = _commit()
    with tempfile.TemporaryDirectory() as workdir:
        peers = sorted({c.split("/")[1] for c in cases if c.startswith("peers/")})
        if peers:
            sys.path.insert(0, ROOT)
            from bench.peers import workloads

            for name in peers:
                workloads.prepare(name, os.path.join(workdir, f"{name}.pt"))
        runs = [(case, mode, start) for case in cases for mode in args.modes.split(",")
                for start in args.start.split(",")]
        for case, mode, start in runs:
            spec = {"case": case, "mode": mode, "start": start, "threads": args.threads,
                    "workdir": workdir}
            proc = subprocess.run(
                [sys.executable, "-m", "bench.bench_setup", "--child", json.dumps(spec)],
                cwd=ROOT, capture_output=True, text=True,
            )
            if proc.returncode != 0:
                rec = {"case": case, "mode": mode, "start": start,
                       "error": proc.stderr.strip()[-2000:]}
            else:
                rec = json.loads(proc.stdout.strip().splitlines()[-1])
            rec["commit"] = commit
            line = json.dumps(rec)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(line + "\n")


if __name__ == "__main__":
    main()
