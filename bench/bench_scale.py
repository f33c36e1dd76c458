"""How hessfast scales on a real transformer (issue 18 part 4): a transformers GPT-2 ladder up
to GPT-2 large, one batch of ``--batch x --seq`` tokens (float32), EACH (size, task) IN A
FRESH PYTHON PROCESS (its set-up is what a user pays, its peak memory is its own).

Sizes are ``LAYERSxEMBDxHEADS`` or a name: ``small`` (12x768x12, 124M), ``medium``
(24x1024x16, 355M), ``large`` (36x1280x20, 774M); vocabulary ``--vocab`` (50257), 1024
positions, random weights from the config (no download). Tasks:

* ``lambda_max``: ``hf.eigsh(H, k=1, tol=--tol)``;
* ``top5``: ``hf.eigsh(H, k=5, tol=--tol)``;
* ``trace``: ``hf.trace(H, max_matvecs=--trace-budget, method=--trace-method)`` (30
  products; Hutchinson by default: Hutch++ keeps a ``[budget/3, n]`` sketch, 5 GB at 124M);
* ``density``: ``hf.spectral_density(H, --density-probes, --density-steps)`` (4 x 32);
* ``combo124``: lambda_max, a ``--combo-probes x --combo-steps`` density (4 x 16) and the
  trace in ONE process, at the sizes of ``--combo-sizes`` only (default ``small``; issue
  18's target: under 6 GB peak RSS at 124M);
* ``products``: the per-size product fields alone (no solver).

Every task's process builds the model, builds ``H = hf.hessian(model, loss_fn, batch,
hvp_mode=--hvp-mode)`` (``build_s``) and runs the task, once, cold, as a user waits:
seconds, products (``num_matvecs``), passes, status, the value(s), the Krylov mode that ran
(``krylov``, when hessfast reports it) and ``peak_rss_bytes`` (``resource.getrusage`` after
the task: imports, model, operator and task; also ``peak_rss_start_bytes`` and
``peak_rss_built_bytes``, after start-up and after building the model). The record also
has the operator's ``hvp_mode``, ``hvp_mode_reason``, ``fd_step`` and ``fd_error`` (None
where hessfast has no such attribute) and the attention implementation. THEN one
``loss.backward()`` is timed (``gradient_s``, median of 3 after 2 warm-ups: the unit of
"gradients"; after the task, so that its ``.grad`` buffers stay out of the task's peak),
giving ``grads_per_product`` (seconds / products / gradient_s, the solver's own work
included). Then, unless ``--no-product-timing``, one product of ``[1, n]`` is timed (median
of 3): ``product_k1_s``, ``product_k1_grads`` (and ``[4, n]`` with ``--k4``), with
``peak_rss_products_bytes`` after it.

    python bench/bench_scale.py [--sizes small,medium,large]
        [--tasks lambda_max,top5,trace,density,combo124] [--combo-sizes small]
        [--hvp-mode auto|finite_difference|...] [--krylov auto|full|lean]
        [--basis-dtype float32|bfloat16] [--basis-device cpu] [--attn sdpa|eager]
        [--vocab 50257] [--batch 2] [--seq 64] [--tol 1e-3] [--trace-budget 30]
        [--trace-method hutchinson] [--density-probes 4] [--density-steps 32]
        [--combo-probes 4] [--combo-steps 16] [--threads 2] [--device cpu]
        [--timeout 0] [--no-check] [--no-product-timing] [--k4] [--dry-run] [--out FILE]

``--dry-run`` lists each (size, task) with its parameter count (the model built on the meta
device, nothing allocated) and the child's command line, and runs nothing. ``--one`` runs the
single size and task given in this process (for ``/usr/bin/time -v`` or a profiler). One
JSON line per (size, task), appended to ``--out`` (default: the naming rule's
``bench/results/scale_<device>-<date>-<commit7>.jsonl``; bench/_harness.py, bench/README.md).
Speed is measured here only, never in tests. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import sys
import time
import warnings
from typing import Any

import _harness as harness

NAMED = {"small": "12x768x12", "medium": "24x1024x16", "large": "36x1280x20"}
LADDER = "small,medium,large"
TASKS = ("lambda_max", "top5", "trace", "density", "combo124", "products")
DEFAULT_TASKS = "lambda_max,top5,trace,density,combo124"
HVP_MODES = ("auto", "finite_difference", "reuse_graph", "double_backward", "fwd_rev")
COMBO_TARGET_BYTES = 6 * 10**9  # issue 18: 124M lambda_max + density + trace under 6 GB


def _peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _jsonable(x: Any) -> Any:
    """A float, int, str, bool or None for the record (tensors and numbers as floats)."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return v if math.isfinite(v) else str(v)


def _size(spec: str) -> str:
    """``small`` -> ``12x768x12``; a ``LAYERSxEMBDxHEADS`` string as it is."""
    return NAMED.get(spec, spec)


def _config(transformers: Any, size: str, spec: dict[str, Any]) -> Any:
    layers, embd, heads = (int(x) for x in size.split("x"))
    kw: dict[str, Any] = {}
    if spec.get("attn"):
        kw["attn_implementation"] = spec["attn"]
    return transformers.GPT2Config(
        vocab_size=spec["vocab"], n_positions=max(1024, spec["seq"]), n_embd=embd,
        n_layer=layers, n_head=heads, bos_token_id=0, eos_token_id=0, **kw,
    )


def _count_params(size: str, spec: dict[str, Any]) -> int:
    """Trainable parameters of the size's model (built on the meta device: nothing
    allocated; tied embeddings counted once)."""
    import torch

    transformers = harness.import_transformers()
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(_config(transformers, size, spec))
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# the child: one (size, task) in this process
# ---------------------------------------------------------------------------------------------
def _product_path(H: Any, rec: dict[str, Any]) -> None:
    """The product path the operator settled on (decided on its first product): its
    ``hvp_mode`` and ``hvp_mode_reason``, and the finite-difference ``fd_step`` and
    ``fd_error`` (None where hessfast has no such attribute or another mode ran)."""
    for name in ("hvp_mode", "hvp_mode_reason", "fd_step", "fd_error"):
        rec[name] = _jsonable(getattr(H, name, None))


def _solve_record(res: Any, seconds: float, extra: dict[str, Any]) -> dict[str, Any]:
    """What every task records of a hessfast result (``grads_per_product`` is filled in by
    :func:`_in_gradients` once the gradient is timed)."""
    mv = int(getattr(res, "num_matvecs", 0) or 0)
    rec = {
        "seconds": round(seconds, 3), "products": mv,
        "passes": int(getattr(res, "num_passes", 0) or 0),
        "status": str(getattr(res, "status", "")),
        "grads_per_product": None,
        "krylov": getattr(res, "krylov", None),
    }
    rec.update(extra)
    rec["peak_rss_bytes"] = _peak_rss()
    return rec


def _in_gradients(result: dict[str, Any], grad_s: float) -> None:
    """Fill in ``grads_per_product`` (seconds / products / gradient_s) of a task's record
    and of its phases."""
    for rec in [result, *result.get("phases", {}).values()]:
        if rec.get("products"):
            rec["grads_per_product"] = round(rec["seconds"] / rec["products"] / grad_s, 2)


def _run_task(task: str, H: Any, hf: Any, spec: dict[str, Any], device: Any
              ) -> dict[str, Any]:
    """Run one task on ``H`` (cold, once) and return its record; ``combo124`` returns the
    three phases under ``phases`` and the process's peak."""
    import torch

    from hessfast.testing import timeit

    common: dict[str, Any] = {}
    if spec["krylov"]:
        common["krylov"] = spec["krylov"]
    basis: dict[str, Any] = {}
    if spec["basis_dtype"]:
        basis["basis_dtype"] = getattr(torch, spec["basis_dtype"])
    if spec["basis_device"]:
        basis["basis_device"] = spec["basis_device"]

    def eig(k: int) -> dict[str, Any]:
        # lambda_max as hf.lambda_max runs it: no eigenvector (the lean k = 1 mode would
        # spend a second pass on one); top-5 returns its vectors. Its warnings are kept (the
        # child's stderr is not): the mode and basis storage the plan chose, inexactness
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            t = timeit(lambda: hf.eigsh(H, k=k, tol=spec["tol"], seed=0, vectors=k > 1,
                                        **common, **basis),
                       repeats=1, warmup=0, device=device)
        res = t.result
        vals = [float(v) for v in res.eigenvalues]
        out = _solve_record(res, t.seconds, {
            "k": k, "tol": spec["tol"], "eigenvalues": vals,
            "converged": [bool(c) for c in res.converged],
            "restarts": int(getattr(res, "num_restarts", 0)),
            "verified": bool(getattr(res, "verified", False)),
            "residuals": [float(x) for x in res.residuals],
            "residual_floor": float(getattr(res, "residual_floor", 0.0) or 0.0),
            "product_error": getattr(H, "product_error", None),
            "warnings": [str(w.message)[:400] for w in said],
        })
        del res, t
        return out

    def trace() -> dict[str, Any]:
        t = timeit(lambda: hf.trace(H, spec["trace_budget"], method=spec["trace_method"],
                                    seed=0), repeats=1, warmup=0, device=device)
        res = t.result
        return _solve_record(res, t.seconds, {
            "budget": spec["trace_budget"], "method": spec["trace_method"],
            "value": _jsonable(res.value), "stderr": _jsonable(res.stderr),
        })

    def density(probes: int, steps: int) -> dict[str, Any]:
        t = timeit(lambda: hf.spectral_density(H, num_probes=probes, num_steps=steps, seed=0,
                                               **common, **basis),
                   repeats=1, warmup=0, device=device)
        res = t.result
        out = _solve_record(res, t.seconds, {
            "probes": probes, "steps": steps,
            "node_range": [float(res.nodes.min()), float(res.nodes.max())],
        })
        del res, t
        return out

    if task == "lambda_max":
        return eig(1)
    if task == "top5":
        return eig(5)
    if task == "trace":
        return trace()
    if task == "density":
        return density(spec["density_probes"], spec["density_steps"])
    if task == "combo124":
        phases = {"lambda_max": eig(1),
                  "density": density(spec["combo_probes"], spec["combo_steps"]),
                  "trace": trace()}
        seconds = sum(p["seconds"] for p in phases.values())
        products = sum(p["products"] for p in phases.values())
        peak = _peak_rss()
        return {"seconds": round(seconds, 3), "products": products,
                "passes": sum(p["passes"] for p in phases.values()),
                "grads_per_product": None,
                "phases": phases, "peak_rss_bytes": peak,
                "target_peak_bytes": COMBO_TARGET_BYTES, "target_met": peak < COMBO_TARGET_BYTES}
    if task == "products":
        return {"peak_rss_bytes": _peak_rss()}
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one (size, task) in this (fresh) process."""
    import torch

    rss_start = _peak_rss()
    torch.set_num_threads(spec["threads"])
    transformers = harness.import_transformers()
    import hessfast as hf
    from hessfast.testing import timeit

    if spec["krylov"]:
        import inspect

        for fn in (hf.eigsh, hf.spectral_density):
            if "krylov" not in inspect.signature(fn).parameters:
                raise SystemExit(f"--krylov {spec['krylov']}: hessfast.{fn.__name__} has no "
                                 "krylov= keyword in this checkout (issue 18 part 1)")

    device = torch.device(spec["device"])
    size = spec["size"]
    layers, embd, heads = (int(x) for x in size.split("x"))
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_config(transformers, size, spec)).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=gen)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
             "labels": ids.to(device)}
    rss_built = _peak_rss()

    def loss_fn(model, batch):
        return model(**batch).loss

    def gradient() -> None:
        loss_fn(model, batch).backward()
        model.zero_grad(set_to_none=True)

    rec: dict[str, Any] = {
        "size": size, "task": spec["task"], "layers": layers, "embd": embd, "heads": heads,
        "vocab": spec["vocab"], "tokens": spec["batch"] * spec["seq"],
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "hvp_mode_asked": spec["hvp_mode"], "krylov_asked": spec["krylov"] or None,
        "check": spec["check"],
        "peak_rss_start_bytes": rss_start, "peak_rss_built_bytes": rss_built,
    }
    built = timeit(lambda: hf.hessian(model, loss_fn, batch, hvp_mode=spec["hvp_mode"],
                                      check=spec["check"]),
                   repeats=1, warmup=0, device=device)
    H = built.result
    rec.update({
        "n": H.shape[0],
        "compute_dtype": str(getattr(H, "compute_dtype", "")).replace("torch.", ""),
        "build_s": round(built.seconds, 4),
    })
    del built

    rec["result"] = _run_task(spec["task"], H, hf, spec, device)
    rec["peak_rss_bytes"] = _peak_rss()  # the task's peak: imports, model, operator, task
    _product_path(H, rec)

    # the unit, timed AFTER the task so that its .grad buffers are not in the task's peak
    grad_s = timeit(gradient, repeats=3, warmup=2, device=device).median
    rec["gradient_s"] = round(grad_s, 5)
    rec["peak_rss_gradient_bytes"] = _peak_rss()
    _in_gradients(rec["result"], grad_s)

    if spec["product_timing"]:
        gen_v = torch.Generator().manual_seed(0)
        n = H.shape[0]
        V1 = torch.randn(1, n, generator=gen_v, dtype=H.dtype).to(device)
        # a second independent vector completes the pre-flight's symmetry probe when the
        # task ran no product (``products``), as a solver's second step does
        H.matmat(torch.randn(1, n, generator=gen_v, dtype=H.dtype).to(device))
        k1 = timeit(lambda: H.matmat(V1), repeats=3, warmup=1, device=device).median
        rec.update({"product_k1_s": round(k1, 5), "product_k1_grads": round(k1 / grad_s, 2)})
        del V1
        if spec["k4"]:
            V4 = torch.randn(4, n, generator=gen_v, dtype=H.dtype).to(device)
            k4 = timeit(lambda: H.matmat(V4), repeats=3, warmup=1, device=device).median
            rec.update({"product_k4_s": round(k4, 5),
                        "product_k4_grads_per_vector": round(k4 / 4 / grad_s, 2)})
            del V4
        rec["peak_rss_products_bytes"] = _peak_rss()
        _product_path(H, rec)
    if device.type == "cuda":
        rec["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        rec["card"] = torch.cuda.get_device_name(device)
    rec.update({
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "machine": platform.machine(),
        "cpus": os.cpu_count(),
    })
    return rec


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------
def _spec(args: argparse.Namespace, size: str, task: str) -> dict[str, Any]:
    return {
        "size": size, "task": task, "vocab": args.vocab, "batch": args.batch, "seq": args.seq,
        "tol": args.tol, "hvp_mode": args.hvp_mode, "krylov": args.krylov,
        "basis_dtype": args.basis_dtype, "basis_device": args.basis_device, "attn": args.attn,
        "trace_budget": args.trace_budget, "trace_method": args.trace_method,
        "density_probes": args.density_probes, "density_steps": args.density_steps,
        "combo_probes": args.combo_probes, "combo_steps": args.combo_steps,
        "product_timing": not args.no_product_timing, "k4": args.k4,
        "check": not args.no_check,
        "device": args.device, "threads": args.threads,
    }


def _cases(args: argparse.Namespace, ap: argparse.ArgumentParser) -> list[tuple[str, str]]:
    sizes = [_size(s.strip()) for s in args.sizes.split(",") if s.strip()]
    for size in sizes:
        parts = size.split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            ap.error(f"--sizes: {size!r} is not LAYERSxEMBDxHEADS (e.g. 12x768x12) nor one of "
                     f"{sorted(NAMED)}")
        if int(parts[1]) % int(parts[2]):
            ap.error(f"--sizes: {size!r}: the embedding width must divide by the heads")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            ap.error(f"--tasks: {t!r} is not one of {', '.join(TASKS)}")
    combo = None if args.combo_sizes == "all" else \
        {_size(s.strip()) for s in args.combo_sizes.split(",")}
    return [(s, t) for s in sizes for t in tasks
            if t != "combo124" or combo is None or s in combo]


def main() -> None:
    ap = harness.parser(__doc__, "device", "threads", threads=2,
                        threads_help="torch threads in each task's process (default 2)",
                        out_help="append the JSON lines here (default: the naming rule's "
                        "bench/results/scale_<device>-<date>-<commit7>.jsonl)")
    ap.add_argument("--sizes", default=LADDER,
                    help=f"comma-separated LAYERSxEMBDxHEADS or {'/'.join(NAMED)} "
                    f"(default {LADDER})")
    ap.add_argument("--tasks", default=DEFAULT_TASKS,
                    help=f"comma-separated, from {', '.join(TASKS)} (default {DEFAULT_TASKS})")
    ap.add_argument("--combo-sizes", default="small",
                    help="the sizes combo124 runs at ('all': every size; default small)")
    ap.add_argument("--hvp-mode", default="auto", choices=HVP_MODES,
                    help="hf.hessian(hvp_mode=...): auto (exact where possible) or "
                    "finite_difference (two gradients, fused SDPA)")
    ap.add_argument("--krylov", default="", choices=("", "auto", "full", "lean"),
                    help="krylov= of eigsh and spectral_density (default: not passed)")
    ap.add_argument("--basis-dtype", default="",
                    help="Lanczos basis storage (float32, bfloat16; default: hessfast's plan)")
    ap.add_argument("--basis-device", default="", help="Lanczos basis device (default: plan)")
    ap.add_argument("--attn", default="",
                    help="transformers attn_implementation (sdpa, eager; default: its own)")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--tol", type=float, default=1e-3, help="eigsh tolerance")
    ap.add_argument("--trace-budget", type=int, default=30, help="trace's max_matvecs")
    ap.add_argument("--trace-method", default="hutchinson",
                    choices=("hutchinson", "hutch++", "xtrace"))
    ap.add_argument("--density-probes", type=int, default=4)
    ap.add_argument("--density-steps", type=int, default=32)
    ap.add_argument("--combo-probes", type=int, default=4)
    ap.add_argument("--combo-steps", type=int, default=16)
    ap.add_argument("--no-check", action="store_true",
                    help="hf.hessian(check=False): no pre-flight (its symmetry probe keeps "
                    "a vector and its product, 2 rows of n, until the second product)")
    ap.add_argument("--no-product-timing", action="store_true",
                    help="skip the [1, n] product timing after the task")
    ap.add_argument("--k4", action="store_true", help="also time a [4, n] product")
    ap.add_argument("--timeout", type=float, default=0,
                    help="seconds per child process (0: none)")
    ap.add_argument("--dry-run", action="store_true",
                    help="list the cases, their n and the child commands; run nothing")
    ap.add_argument("--one", action="store_true",
                    help="run the one size and task given in this process")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    cases = _cases(args, ap)
    if args.dry_run:
        for size, task in cases:
            spec = _spec(args, size, task)
            cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
            print(f"{size} {task}: n = {_count_params(size, spec):,}\n  "
                  f"{' '.join(shlex.quote(c) for c in cmd)}")
        return
    if args.one and len(cases) != 1:
        ap.error(f"--one runs one (size, task); these flags give {len(cases)}")
    if not args.out:
        args.save = True  # the default file: the naming rule's
    commit = harness.commit()
    out = harness.Records("bench_scale", args, tag=args.device.split(":")[0])
    for size, task in cases:
        spec = _spec(args, size, task)
        t0 = time.perf_counter()  # the child's whole life (a watchdog's figure, not a timing)
        if args.one:
            rec: dict[str, Any] | None = child(spec)
            err = ""
        else:
            try:
                rec, err = harness.run_child(__file__, spec, timeout=args.timeout or None)
            except Exception as exc:  # noqa: BLE001 - subprocess.TimeoutExpired and kin
                rec, err = None, f"{type(exc).__name__}: {exc}"
        if rec is None:
            rec = {"size": size, "task": task, "error": err.strip()[-2000:]}
        rec.update({"wall_s": round(time.perf_counter() - t0, 1), "commit": commit,
                    "date": time.strftime("%Y-%m-%d")})
        out.emit(rec)
    out.close()


if __name__ == "__main__":
    main()
