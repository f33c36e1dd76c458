"""Data-parallel weak scaling of hessfast's curvature products on paper (issue 9), calibrated
with the measured single-device figures that exist, and the memory ceiling of a 100-step
full-reorthogonalisation Lanczos with a bf16 basis. A MODEL, NOT A MEASUREMENT: no multi-GPU
run is behind any number here.

    python bench/scaling_model.py [--ranks 8] [--bw-bus 360e9] [--latency 10e-6] [--k 1]
        [--t-hvp-124m S] [--t-hvp-1b S] [--out FILE]

Step time of one block product of k vectors on R ranks at a fixed number of tokens per rank:

    t_step(R) = t_HVP(tokens per rank, k) + 2 (R - 1)/R * k * P * 4 B / BW_bus
                + c * log2(R) + t_orth

(one flat fp32 all-reduce per block product, the ring's bus-bandwidth cost, plus a latency
term c per tree level), and the weak-scaling efficiency is ``t_step(1) / t_step(R)``. Three
variants of ``t_orth`` are reported: none (the product alone: the issue's definition), a
replicated basis (every rank re-orthogonalises the whole basis: the same time at R = 1 and
R; at 1B its 200 GB do not fit one 80 GB GPU, so that column is arithmetic only), and a
sharded basis (``t_orth / R`` plus one small all-reduce per CGS pass: a step time, since
the basis work then scales strongly and an "efficiency" would exceed 100%).

Inputs (each one is tagged ``measured`` or ``assumed`` in the JSON and the table):

* t_HVP: 16 FLOP per parameter per token (forward-over-reverse exact HVP) at 445 TFLOP/s
  (45% of the bf16 matmul ceiling), the figures of ../shared/research/scale-and-gpu.md
  section 5 (124M at 4k tokens/GPU: 18 ms; 1B at 8k: 0.29 s): ASSUMED, no GPU measurement at
  these sizes exists. ``--t-hvp-124m`` / ``--t-hvp-1b`` replace them with measured seconds.
  Sensitivity: the HVP/gradient ratio MEASURED on the H200 for the tiny causal LM
  (``results/hvp_h200_2026-11-26.jsonl``, k = 1) in place of 16/6, and the ratio
  ``bench/bench_scale.py`` MEASURED for its largest GPT-2 on cpu2 (``--scale-results``,
  when the file exists).
* BW_bus = 360 GB/s (NVLink-4 bus bandwidth) and c = 10 us per tree level: ASSUMED.
* t_orth: one CGS pass over on average 50 of 100 bf16 basis rows, ``2 j P 2 B + 3 k P 4 B``
  at the bandwidth MEASURED for ``reorthogonalize`` (bf16 basis, m = 64, torch path) on the
  H200 (``results/ops_h200_2026-11-26.jsonl``).
* Memory: :func:`hessfast.estimate_memory` (eigsh, k = 1, block 1, max_basis 100, bf16 basis,
  ``available=``, ``world_size`` / ``basis_sharding``) on a parameter-only stand-in module on
  the meta device (bytes per parameter do not depend on the architecture; activations are
  not in that plan): ASSUMED 10 GB reserved for activations, as in section 5.

Prints a table and writes one JSON document to ``--out`` (default: the naming rule's
``bench/results/scaling_model-<date>-<commit7>.json``, bench/_harness.py; the figures in
bench/RESULTS.md are in ``results/scaling_model.json``). Speed is never measured here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

import _harness as harness

ROOT = harness.ROOT
RESULTS = harness.RESULTS
OPS_H200 = os.path.join(RESULTS, "ops_h200_2026-11-26.jsonl")
HVP_H200 = os.path.join(RESULTS, "hvp_h200_2026-11-26.jsonl")
SCALE_CPU = os.path.join(RESULTS, "scale_cpu2_issue9.jsonl")

FLOP_PER_PARAM_TOKEN = 16.0  # exact HVP, forward-over-reverse (section 5)
GRAD_FLOP_PER_PARAM_TOKEN = 6.0  # one forward + backward
SUSTAINED_FLOPS = 445e12  # 45% of the bf16 matmul ceiling (section 5)
MODELS = ((124e6, 4096), (1e9, 8192))  # (parameters, tokens per GPU): section 5's rows
STEPS = 100  # Lanczos steps: basis rows
BASIS_BYTES = 2  # bf16
ACT_RESERVE = 10e9  # bytes kept for activations (section 5)


def _input(name: str, value: float, unit: str, kind: str, source: str) -> dict[str, Any]:
    return {"name": name, "value": value, "unit": unit, "kind": kind, "source": source}


def measured_basis_bandwidth() -> tuple[float, float]:
    """(bytes/s of one bf16 CGS pass, streaming read bytes/s) measured on the H200."""
    cgs = stream = float("nan")
    with open(OPS_H200) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("op") == "stream_read":
                stream = rec["GBps"] * 1e9
            if (rec.get("op"), rec.get("storage"), rec.get("m")) == (
                    "reorthogonalize", "bfloat16", 64):
                cgs = rec["torch_GBps"] * 1e9
    return cgs, stream


def measured_hvp_ratio(case: str = "lm_tiny") -> float:
    """HVP cost in gradients (k = 1, the auto path) measured on the H200 for ``case``."""
    with open(HVP_H200) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("case") == case:
                return float(rec["ratio_per_vector_to_grad"]["auto"]["1"])
    raise LookupError(f"{case} not in {HVP_H200}")


def measured_scale_ratio(path: str) -> tuple[float, int] | None:
    """(HVP cost in gradients at k = 1, parameters) of the largest transformers GPT-2 that
    ``bench/bench_scale.py`` measured in ``path`` (None when the file or field is absent)."""
    if not os.path.exists(path):
        return None
    best = None
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("product_k1_grads") and (best is None or rec["n"] > best[1]):
                best = (float(rec["product_k1_grads"]), int(rec["n"]))
    return best


def step_times(P: float, t_hvp: float, R: int, k: int, bw_bus: float, c: float,
               t_orth: float) -> dict[str, float]:
    """Seconds of one block product step on R ranks, by term, and the efficiencies
    ``t_step(1) / t_step(R)`` of the product alone and of the step with a replicated basis.
    A sharded basis divides ``t_orth`` by R (strong scaling of the basis work, so no
    efficiency is quoted for it: ``t_step_sharded_s`` is the step time)."""
    comm = 2 * (R - 1) / R * k * P * 4 / bw_bus
    lat = c * math.log2(R) if R > 1 else 0.0
    sharded_orth = t_orth / R + lat  # one scalar all-reduce per CGS pass
    base = t_hvp + comm + lat
    return {
        "t_hvp_s": t_hvp, "t_allreduce_s": comm, "t_latency_s": lat, "t_orth_s": t_orth,
        "t_step_1_s": t_hvp + t_orth, "t_step_replicated_s": base + t_orth,
        "t_step_sharded_s": base + sharded_orth,
        "eff_product": t_hvp / base,
        "eff_replicated_basis": (t_hvp + t_orth) / (base + t_orth),
        "replicated_basis_bytes": STEPS * P * BASIS_BYTES,
    }


def t_orth_of(P: float, k: int, bw: float, rows: float = STEPS / 2) -> float:
    """One CGS pass of k vectors against ``rows`` bf16 basis rows: ``2 j P 2 + 3 k P 4``
    bytes (bench_ops' count) at ``bw`` bytes/s."""
    return (2 * rows * P * BASIS_BYTES + 3 * k * P * 4) / bw


def weak_scaling(args: argparse.Namespace, inputs: list[dict[str, Any]]) -> list[dict]:
    cgs_bw, _ = measured_basis_bandwidth()
    ratio = measured_hvp_ratio()
    scale = measured_scale_ratio(args.scale_results)
    given = {124e6: args.t_hvp_124m, 1e9: args.t_hvp_1b}
    rows = []
    for P, tokens in MODELS:
        flop_t = FLOP_PER_PARAM_TOKEN * P * tokens / SUSTAINED_FLOPS * args.k
        t_hvp = given[P] * args.k if given[P] else flop_t
        variants = [("base", t_hvp, args.bw_bus),
                    ("hvp/grad measured on H200 (tiny LM)",
                     ratio * GRAD_FLOP_PER_PARAM_TOKEN * P * tokens / SUSTAINED_FLOPS * args.k,
                     args.bw_bus),
                    ("BW_bus halved", t_hvp, args.bw_bus / 2)]
        kinds = ["measured" if given[P] else "assumed", "assumed FLOP rate x measured ratio",
                 "measured" if given[P] else "assumed"]
        if scale is not None:
            variants.append((f"hvp/grad measured on cpu2 (GPT-2, {scale[1] / 1e6:.0f}M)",
                             scale[0] * GRAD_FLOP_PER_PARAM_TOKEN * P * tokens
                             / SUSTAINED_FLOPS * args.k, args.bw_bus))
            kinds.append("assumed FLOP rate x measured ratio")
        for (label, th, bw), kind in zip(variants, kinds, strict=True):
            rec = {"params": P, "tokens_per_gpu": tokens, "ranks": args.ranks, "k": args.k,
                   "variant": label, "bw_bus": bw, "t_hvp_kind": kind}
            rec.update(step_times(P, th, args.ranks, args.k, bw, args.latency,
                                  t_orth_of(P, args.k, cgs_bw)))
            rows.append(rec)
    inputs += [
        _input("t_HVP model", FLOP_PER_PARAM_TOKEN, "FLOP/param/token at 445 TFLOP/s",
               "measured" if args.t_hvp_124m or args.t_hvp_1b else "assumed",
               "scale-and-gpu.md section 5 (124M/4k: 18 ms, 1B/8k: 0.29 s)"),
        _input("HVP/gradient ratio (sensitivity)", ratio, "gradients per vector, k=1",
               "measured", "H200, lm_tiny (85k params), results/hvp_h200_2026-11-26.jsonl"),
        *([] if scale is None else [_input(
            "HVP/gradient ratio (sensitivity)", scale[0], "gradients per vector, k=1",
            "measured", f"cpu2, transformers GPT-2 of {scale[1]:,} params, "
            f"{os.path.relpath(args.scale_results, ROOT)}")]),
        _input("BW_bus", args.bw_bus, "bytes/s", "assumed", "NVLink-4 bus bandwidth"),
        _input("c", args.latency, "s per log2(R) level", "assumed", "NCCL small-message"),
        _input("CGS pass bandwidth", cgs_bw, "bytes/s", "measured",
               "H200 reorthogonalize bf16 m=64 n=2e6 torch path, "
               "results/ops_h200_2026-11-26.jsonl"),
    ]
    return rows


def mesh_slq(args: argparse.Namespace) -> list[dict]:
    """One step of a 16-probe SLQ on 8 ranks over ALL the data (fixed total tokens =
    8 x tokens per GPU): data=8 vs probe=2 x data=4 vs probe=8 (each rank then holds all
    the data). Compute per rank is the same (k/Pp vectors over T/D tokens, compute-bound);
    the all-reduce shrinks with the data dimension; the final all-gather is ignored."""
    out = []
    for P, tokens in MODELS:
        per_vec = FLOP_PER_PARAM_TOKEN * P * tokens / SUSTAINED_FLOPS  # T/8 tokens, 1 vector
        for pp in (1, 2, 8):
            d = args.ranks // pp
            k = 16 // pp
            t_hvp = per_vec * k * (args.ranks / d)
            comm = 2 * (d - 1) / d * k * P * 4 / args.bw_bus if d > 1 else 0.0
            lat = args.latency * math.log2(d) if d > 1 else 0.0
            out.append({"params": P, "probe": pp, "data": d, "t_hvp_s": t_hvp,
                        "t_allreduce_s": comm, "t_step_s": t_hvp + comm + lat})
    return out


def memory(inputs: list[dict[str, Any]]) -> list[dict]:
    """Largest model for the 100-step bf16-basis Lanczos, from hessfast.estimate_memory."""
    import torch
    from torch import nn

    import hessfast as hf

    rows = []
    configs = [("1 x 80 GB", 80e9, 1, False), ("1 x H200 141 GB", 141e9, 1, False),
               ("8 x 80 GB, replicated basis", 80e9, 8, False),
               ("8 x 80 GB, sharded basis", 80e9, 8, True)]
    for dtype in (torch.float32, torch.bfloat16):
        stand_in = nn.Linear(1024, 1024, bias=False, device="meta", dtype=dtype)
        for label, cap, R, sharded in configs:
            rec: dict[str, Any] = {"config": label, "model_dtype": str(dtype).split(".")[1],
                                   "world_size": R, "basis_sharding": sharded}
            for key, avail in (("largest_params", cap - ACT_RESERVE),
                               ("largest_params_no_activations", cap)):
                plan = hf.estimate_memory(stand_in, "eigsh", k=1, block_size=1,
                                          max_basis=STEPS, basis_dtype=torch.bfloat16,
                                          world_size=R, basis_sharding=sharded,
                                          available=int(avail), measure=False)
                rec[key] = plan.largest_n
            at = plan.at(10**9)
            rec["bytes_per_param"] = {i.name: i.bytes / 1e9 for i in at.items
                                      if i.where == "device" and i.bytes}
            rec["bytes_per_param_total"] = at.total() / 1e9
            rows.append(rec)
    inputs.append(_input("activation reserve", ACT_RESERVE, "bytes per GPU", "assumed",
                         "scale-and-gpu.md section 5 (10 GB kept for activations)"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--bw-bus", type=float, default=360e9, help="bus bandwidth, bytes/s")
    ap.add_argument("--latency", type=float, default=10e-6, help="c: seconds per level")
    ap.add_argument("--k", type=int, default=1, help="vectors per block product")
    ap.add_argument("--t-hvp-124m", type=float, default=None,
                    help="measured seconds of one HVP (1 vector, 4k tokens) at 124M")
    ap.add_argument("--t-hvp-1b", type=float, default=None,
                    help="measured seconds of one HVP (1 vector, 8k tokens) at 1B")
    ap.add_argument("--scale-results", default=SCALE_CPU,
                    help="bench_scale JSON lines: the largest GPT-2's HVP/gradient ratio")
    ap.add_argument("--out", default=None,
                    help="the JSON document (default: bench/results/scaling_model-<date>-"
                    "<commit7>.json, the naming rule)")
    args = ap.parse_args()
    inputs: list[dict[str, Any]] = []
    scaling = weak_scaling(args, inputs)
    mesh = mesh_slq(args)
    mem = memory(inputs)
    print(f"weak scaling, {args.ranks} ranks, k={args.k} (MODEL, not measurement)")
    print(f"{'params':>7} {'variant':<38} {'t_HVP ms':>9} {'allred ms':>9} {'orth ms':>8} "
          f"{'E prod':>7} {'E repl':>7} {'shard ms':>9}")
    for r in scaling:
        print(f"{r['params'] / 1e6:>6.0f}M {r['variant']:<38} {r['t_hvp_s'] * 1e3:>9.2f} "
              f"{r['t_allreduce_s'] * 1e3:>9.2f} {r['t_orth_s'] * 1e3:>8.2f} "
              f"{r['eff_product']:>7.1%} {r['eff_replicated_basis']:>7.1%} "
              f"{r['t_step_sharded_s'] * 1e3:>9.2f}")
    print("\n16-probe SLQ step on 8 ranks, all data (ms): probe x data")
    for r in mesh:
        print(f"{r['params'] / 1e6:>6.0f}M {r['probe']}x{r['data']}: t_HVP "
              f"{r['t_hvp_s'] * 1e3:.1f} + all-reduce {r['t_allreduce_s'] * 1e3:.1f} = "
              f"{r['t_step_s'] * 1e3:.1f}")
    print("\nlargest model, 100-step Lanczos, bf16 basis (estimate_memory)")
    for r in mem:
        print(f"{r['config']:<30} {r['model_dtype']:<9} {r['bytes_per_param_total']:>6.1f} B/param"
              f"  {r['largest_params'] / 1e6:>7.0f}M (10 GB activations)"
              f"  {r['largest_params_no_activations'] / 1e6:>7.0f}M (none)")
    print("\ninputs:")
    for i in inputs:
        print(f"  {i['kind']:<9} {i['name']}: {i['value']:.4g} {i['unit']} ({i['source']})")
    out = args.out or harness.results_path("scaling_model", ext="json")
    doc = {"what": "model, not measurement", "date": time.strftime("%Y-%m-%d"),
           "commit": harness.commit(), "args": vars(args), "inputs": inputs,
           "weak_scaling": scaling, "mesh_slq": mesh, "memory": mem,
           "stamp": harness.stamp("scaling_model")}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
