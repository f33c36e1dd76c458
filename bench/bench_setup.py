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
The process's pending garbage is collected just before the clock (``gc.collect()``, timed
apart as ``gc_s``): a full collection of what torch and the model allocated costs about 70 ms
on the peer LM and falls wherever the allocation count sends it. ``torch_func_initialised``
says whether torch.func's one-time initialisation ran (it imports
``torch._dynamo``); ``sympy_imported`` whether autograd's first ``grad_outputs`` call did.

Cases: the tiny float64 test models of :mod:`hessfast.testing.models` (3 uneven batches) and
the peer comparison's workloads of ``bench/peers/workloads.py`` (one batch, float32).

    python bench/bench_setup.py [--cases tiny/mlp,peers/lm] [--modes auto,fwd_rev]
                                [--start warm,cold] [--threads 2] [--out FILE] [--save]

One JSON line per case on stdout (flags, records and results files: bench/_harness.py).
``import hessfast`` is timed with ``perf_counter`` (the timer lives in hessfast, so it cannot
time hessfast's own import); everything else with :func:`hessfast.testing.timeit`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time

import _harness as harness

TINY = ("tiny/mlp", "tiny/cnn", "tiny/lm")
PEERS = ("peers/mlp", "peers/cnn", "peers/lm")
SMALL = (*TINY, "peers/mlp")


def _load(case: str, workdir: str):
    """(model, loss_fn, data) of a case: built from fixed seeds, identical in every process."""
    family, name = case.split("/")
    if family == "tiny":
        from hessfast.testing import models

        return models.BUILDERS[name]()
    from peers import workloads  # bench/peers, next to this script

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

    # the process's pending garbage first, timed apart: a full collection (about 70 ms on
    # the peer LM) lands wherever the allocation count sends it, so one commit's build would
    # pay it where another's does not (bench/RESULTS.md, issue 18's set-up figures)
    t0 = time.perf_counter()
    gc.collect()
    gc_s = time.perf_counter() - t0
    # one cold call each (no warm-up): what the user waits for the first time
    built = timeit(lambda: hf.hessian(model, loss_fn, data, hvp_mode=spec["mode"]),
                   repeats=1, warmup=0, device="cpu")
    H = built.result
    V = torch.randn(1, H.shape[0], generator=torch.Generator().manual_seed(0), dtype=H.dtype)
    first = timeit(lambda: H.matmat(V), repeats=1, warmup=0, device="cpu").seconds
    func_init = "torch._dynamo" in sys.modules
    sympy = "sympy" in sys.modules
    product = timeit(lambda: H.matmat(V), repeats=5, warmup=0).median
    grad = timeit(lambda: _gradient(model, loss_fn, data, H.loss_form), repeats=5, warmup=2).median
    build = built.seconds
    return {
        "case": spec["case"],
        "mode": spec["mode"],
        "start": spec["start"],
        "n": H.shape[0],
        "batches": H.num_batches,
        "dtype": str(H.dtype).replace("torch.", ""),
        "hvp_mode": H.hvp_mode,
        "import_hessfast_s": round(import_s, 4),
        "gc_s": round(gc_s, 4),
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


def main() -> None:
    ap = harness.parser(__doc__, "threads", threads=2,
                        threads_help="torch threads in each case's process (default 2)")
    ap.add_argument("--cases", default=",".join(SMALL),
                    help=f"comma-separated, from {', '.join(TINY + PEERS)} (default: the small)")
    ap.add_argument("--modes", default="auto", help="hvp_mode per case, comma-separated")
    ap.add_argument("--start", default="warm", help="warm and/or cold, comma-separated")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(TINY + PEERS))
    if unknown:
        ap.error(f"unknown cases {unknown}; choose from {TINY + PEERS}")
    commit = harness.commit()
    with tempfile.TemporaryDirectory() as workdir, \
            harness.Records("bench_setup", args, tag="cpu") as out:
        peers = sorted({c.split("/")[1] for c in cases if c.startswith("peers/")})
        if peers:
            from peers import workloads

            for name in peers:
                workloads.prepare(name, os.path.join(workdir, f"{name}.pt"))
        runs = [(case, mode, start) for case in cases for mode in args.modes.split(",")
                for start in args.start.split(",")]
        for case, mode, start in runs:
            spec = {"case": case, "mode": mode, "start": start, "threads": args.threads,
                    "workdir": workdir}
            rec, err = harness.run_child(__file__, spec)
            if rec is None:
                rec = {"case": case, "mode": mode, "start": start, "error": err.strip()[-2000:]}
            rec["commit"] = commit
            out.emit(rec)


if __name__ == "__main__":
    main()
