"""How hessfast scales on a real transformer: a transformers GPT-2 of growing size, up to the
124M-parameter GPT-2 small config, on one batch of ``--batch x --seq`` tokens (float32).

Each size runs in a FRESH Python process (its set-up is what a user pays, its peak memory is
its own). In that process the model is built from a config (random weights, no download),
runs two warm-up gradients, and then:

* ``gradient_s``: one ``loss.backward()`` of the model's own causal-LM loss (median of 3);
* ``build_s``, ``first_product_s``: ``hf.hessian(model, loss_fn, batch)`` and its first
  ``matmat`` of one vector; ``setup_grads``: both, in gradients;
* ``product_k1_grads``, ``product_k4_grads_per_vector``: one product of ``[1, n]``, and of
  ``[4, n]`` per vector, in gradients (median of 3, after the pre-flight's symmetry probe
  has seen two vectors, as in a solver's run);
* ``lambda_max``: ``hf.eigsh(H, k=1, tol=--tol)``: value, products, seconds, status;
* ``slq``: ``hf.spectral_density(H, --slq-probes, --slq-steps)``: products, seconds (sizes
  up to ``--slq-max-params`` only; 0: every size);
* ``peak_rss_bytes`` (``resource.getrusage``, after each phase) and, on a GPU,
  ``cuda_peak_bytes`` and the card.

    python bench/bench_scale.py [--sizes 2x128x2,4x256x4,6x512x8,12x768x12]
        [--vocab 50257] [--batch 2] [--seq 64] [--tol 1e-3] [--slq-probes 16]
        [--slq-steps 32] [--slq-max-params 0] [--basis-dtype float32] [--device cpu]
        [--threads 2] [--out FILE]

A size is ``LAYERSxEMBDxHEADS`` (``12x768x12`` with the default vocabulary and 1024
positions is GPT-2 small). One JSON line per size on stdout, appended to ``--out`` (default:
the naming rule's ``bench/results/scale_<device>-<date>-<commit7>.jsonl``; flags, records
and results files: bench/_harness.py, bench/README.md). Speed is measured here only, never
in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import _harness as harness

LADDER = "2x128x2,4x256x4,6x512x8,12x768x12"


def _peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _block_seconds(H, k: int, gen) -> float:
    """Median seconds of ``H.matmat`` of a ``[k, n]`` block, after one planning call (the
    block is freed on return: at 124M parameters, 2 GB for k=4)."""
    import torch

    from hessfast.testing import timeit

    V = torch.randn(k, H.shape[0], generator=gen, dtype=H.dtype).to(H.device)
    return timeit(lambda: H.matmat(V), repeats=3, warmup=1, device=H.device).median


def child(spec: dict) -> dict:
    """Measure one size in this (fresh) process."""
    import torch

    torch.set_num_threads(spec["threads"])
    transformers = harness.import_transformers()
    import hessfast as hf
    from hessfast.testing import timeit

    device = torch.device(spec["device"])

    layers, embd, heads = (int(x) for x in spec["size"].split("x"))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=spec["vocab"], n_positions=max(1024, spec["seq"]), n_embd=embd,
        n_layer=layers, n_head=heads, bos_token_id=0, eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(cfg).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=gen)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
             "labels": ids.to(device)}

    def loss_fn(model, batch):
        return model(**batch).loss

    def gradient() -> None:
        loss_fn(model, batch).backward()
        model.zero_grad(set_to_none=True)

    rec: dict = {"size": spec["size"], "layers": layers, "embd": embd, "heads": heads,
                 "vocab": spec["vocab"], "tokens": spec["batch"] * spec["seq"]}
    grad_s = timeit(gradient, repeats=3, warmup=2, device=device).median
    rec["gradient_s"] = round(grad_s, 5)
    rec["peak_rss_model_bytes"] = _peak_rss()

    # one cold call each (no warm-up): what the user waits for the first time
    built = timeit(lambda: hf.hessian(model, loss_fn, batch), repeats=1, warmup=0,
                   device=device)
    H = built.result
    gen_v = torch.Generator().manual_seed(0)
    V1 = torch.randn(1, H.shape[0], generator=gen_v, dtype=H.dtype).to(device)
    first = timeit(lambda: H.matmat(V1), repeats=1, warmup=0, device=device).seconds
    rec.update({
        "n": H.shape[0], "hvp_mode": H.hvp_mode,
        "compute_dtype": str(H.compute_dtype).replace("torch.", ""),
        "build_s": round(built.seconds, 4), "first_product_s": round(first, 4),
        "setup_grads": round((built.seconds + first) / grad_s, 2),
    })
    # a second, independent vector completes the pre-flight's symmetry probe (as a solver's
    # second step does); until then every product of the parallel V1 waits for one (copies)
    H.matmat(torch.randn(1, H.shape[0], generator=gen_v, dtype=H.dtype).to(device))
    k1 = timeit(lambda: H.matmat(V1), repeats=3, warmup=0, device=device).median
    k4 = _block_seconds(H, 4, gen_v)
    rec.update({
        "product_k1_s": round(k1, 5), "product_k1_grads": round(k1 / grad_s, 2),
        "product_k4_s": round(k4, 5),
        "product_k4_grads_per_vector": round(k4 / 4 / grad_s, 2),
        "peak_rss_products_bytes": _peak_rss(),
    })

    basis_dtype = getattr(torch, spec["basis_dtype"]) if spec["basis_dtype"] else None
    solved = timeit(lambda: hf.eigsh(H, k=1, tol=spec["tol"], seed=0, basis_dtype=basis_dtype),
                    repeats=1, warmup=0, device=device)
    top = solved.result
    rec["lambda_max"] = {
        "value": float(top.eigenvalues[0]), "products": int(top.num_matvecs),
        "seconds": round(solved.seconds, 3), "status": str(top.status),
        "tol": spec["tol"],
    }
    rec["peak_rss_lambda_max_bytes"] = _peak_rss()
    del top, solved

    if spec["slq_max_params"] <= 0 or H.shape[0] <= spec["slq_max_params"]:
        slq = timeit(lambda: hf.spectral_density(H, num_probes=spec["slq_probes"],
                                                 num_steps=spec["slq_steps"], seed=0,
                                                 basis_dtype=basis_dtype),
                     repeats=1, warmup=0, device=device)
        density = slq.result
        rec["slq"] = {
            "probes": spec["slq_probes"], "steps": spec["slq_steps"],
            "products": spec["slq_probes"] * spec["slq_steps"],
            "seconds": round(slq.seconds, 3),
            "node_range": [float(density.nodes.min()), float(density.nodes.max())],
        }
        rec["peak_rss_slq_bytes"] = _peak_rss()
    rec["peak_rss_bytes"] = _peak_rss()
    if device.type == "cuda":
        rec["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        rec["card"] = torch.cuda.get_device_name(device)
    rec.update({
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "machine": platform.machine(),
        "cpus": os.cpu_count(),
    })
    return rec


def main() -> None:
    ap = harness.parser(__doc__, "device", "threads", threads=2,
                        threads_help="torch threads in each size's process (default 2)",
                        out_help="append the JSON lines here (default: the naming rule's "
                        "bench/results/scale_<device>-<date>-<commit7>.jsonl)")
    ap.add_argument("--sizes", default=LADDER, help="comma-separated LAYERSxEMBDxHEADS")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--tol", type=float, default=1e-3, help="lambda_max tolerance")
    ap.add_argument("--slq-probes", type=int, default=16)
    ap.add_argument("--slq-steps", type=int, default=32)
    ap.add_argument("--slq-max-params", type=int, default=0,
                    help="run the SLQ density only up to this many parameters (0: always)")
    ap.add_argument("--basis-dtype", default="",
                    help="Lanczos basis storage (float32, bfloat16; default: hessfast's plan)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    for size in args.sizes.split(","):
        parts = size.split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            ap.error(f"--sizes: {size!r} is not LAYERSxEMBDxHEADS (e.g. 12x768x12)")
        if int(parts[1]) % int(parts[2]):
            ap.error(f"--sizes: {size!r}: the embedding width must divide by the heads")
    if not args.out:
        args.save = True  # the default file: the naming rule's
    commit = harness.commit()
    out = harness.Records("bench_scale", args, tag=args.device.split(":")[0])
    for size in args.sizes.split(","):
        spec = {"size": size, "vocab": args.vocab, "batch": args.batch, "seq": args.seq,
                "tol": args.tol, "slq_probes": args.slq_probes, "slq_steps": args.slq_steps,
                "slq_max_params": args.slq_max_params, "basis_dtype": args.basis_dtype,
                "device": args.device, "threads": args.threads}
        t0 = time.perf_counter()  # the child's whole life (a watchdog's figure, not a timing)
        rec, err = harness.run_child(__file__, spec)
        if rec is None:
            rec = {"size": size, "error": err.strip()[-2000:]}
        rec.update({"wall_s": round(time.perf_counter() - t0, 1), "commit": commit,
                    "date": time.strftime("%Y-%m-%d")})
        out.emit(rec)
    out.close()


if __name__ == "__main__":
    main()
