"""The ladder on paper (issue 18 part 5): does lambda_max plus a 16 x 64 SLQ density of a
LLaMA fit in GPU memory, per Krylov mode, on 1 x 80 GB, on 8 x 80 GB with FSDP, and on
8 x 80 GB with FSDP and host memory for the basis? A plan, not a measurement: nothing is
computed and nothing is allocated (the models are built on the meta device).

The models: transformers ``LlamaForCausalLM`` with the published LLaMA-2 shapes (7B: 32 x
4096, MLP 11008, 32 heads; 13B: 40 x 5120, 13824, 40 heads; 70B: 80 x 8192, 28672, 64 heads
and 8 key-value heads; vocabulary 32000, untied head), parameters in ``--dtype`` (bf16).

Per rank, each run's bytes are ``hessfast.estimate_memory(model, ..., krylov=...)`` (the
parameters, the Krylov basis, the working vectors, the block and product rows, the scratch,
the float64 projection) plus three items estimate_memory does not plan for a model on the
meta device, each an ASSUMPTION stated in the output:

* activations of one gradient (``estimate_memory`` of a module measures none), for
  ``--tokens`` tokens per rank: activation checkpointing per decoder layer (each layer's
  input kept, ``2 h`` bytes per token per layer in bf16), one layer recomputed at a time
  (``34 h`` bytes per token: Korthikanti et al. 2022 without the ``5 a s / h`` score term,
  flash attention), and the logits and their gradient in fp32 (``8 V`` bytes per token);
* the finite-difference product (``hvp_mode="finite_difference"``, the mode that runs
  FSDP and fused attention, assumed in every configuration), read from the operators'
  code. FSDP (hessfast/curvature/fsdp.py): the parameter copy it restores from and the
  model's gradient shards (2 rows in the parameter dtype); beside the product's own row,
  at most 3 working rows (the error estimate's second product while ``g(+)`` and ``g(-)``
  of the next are summed, once) or, during the second product, ``g(+)``, ``g(-)`` and the
  symmetry check's first vector and product (4 rows; 2 without the check). One process
  (curvature/hessian.py, products.py): ``g(+)``, ``g(-)``, their difference and mean (4
  working rows; the perturbed parameter copy and its gradient, in the parameter dtype, are
  freed before the last two), and the symmetry probe's first vector and product (2 rows);
* with FSDP, the unsharded buffers of two layers' parameters (the gathered layer and the
  prefetched one) and two layers' unsharded gradients, in the parameter dtype.

With FSDP every vector, the parameters and any basis are sharded like the parameters
(``1/R`` per rank: the plan at ``ceil(n / R)``). hessfast runs only the lean modes on
sharded vectors today (a stored basis on shards is refused: ``linop.refuse_sharded``): the
full-basis FSDP rows are what such a run WOULD need, marked ``(planned only)``.

Capacities: ``--gpu-gb`` (80 x 10^9 bytes) per GPU and ``--host-tb`` (2 x 10^12 bytes)
of host memory per 8-GPU node, split evenly over its ranks (250 GB per rank); only the
host-basis configuration puts anything but the projection on the host.

"Largest n" bisects the number of parameters with the per-rank bytes that grow with n
(``plan.at``) and the fixed items of the 70B shape held fixed (conservative for smaller
models). One JSON line per (model, configuration, mode) and per (configuration, mode)'s
largest n, through the harness (``--out``, ``--save``: bench/README.md), and a markdown
table on stdout (``--md FILE`` writes it too).

    python bench/bench_paper_ladder.py [--models 7b,13b,70b] [--dtype bfloat16]
        [--tokens 4096] [--gpu-gb 80] [--host-tb 2] [--probes 16] [--steps 64]
        [--md FILE] [--out FILE] [--save]
"""

from __future__ import annotations

import argparse
import inspect
import math
from dataclasses import dataclass
from typing import Any

import _harness as harness

# LLaMA-2 shapes: (layers, hidden, intermediate, heads, kv heads)
LLAMA = {
    "7b": (32, 4096, 11008, 32, 32),
    "13b": (40, 5120, 13824, 40, 40),
    "70b": (80, 8192, 28672, 64, 8),
}
VOCAB = 32000
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Config:
    """A machine configuration: ranks, FSDP, where the basis lives."""

    name: str
    world_size: int
    fsdp: bool
    host_basis: bool


CONFIGS = (
    Config("1 x 80 GB", 1, False, False),
    Config("8 x 80 GB, FSDP", 8, True, False),
    Config("8 x 80 GB, FSDP, basis on host", 8, True, True),
)
# (label, krylov, basis dtype name or None)
MODES = (
    ("full, fp32 basis", "full", "float32"),
    ("full, bf16 basis", "full", "bfloat16"),
    ("lean", "lean", None),
)


def _gb(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def _fmt_n(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def build_model(transformers: Any, torch: Any, size: str, dtype: Any) -> Any:
    """A LLaMA-2 of ``size`` on the meta device (nothing allocated)."""
    layers, h, inter, heads, kv = LLAMA[size]
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
        tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype)


def shape_items(size: str, tokens: int, param_bytes: int, fsdp: bool) -> dict[str, int]:
    """The fixed (n-independent) per-rank allowances of a LLaMA shape (ASSUMPTIONS, see the
    module docstring): activations of one gradient, FSDP's unsharded layer buffers."""
    layers, h, inter, heads, kv = LLAMA[size]
    act = tokens * (2 * h * layers + 34 * h + 8 * VOCAB)
    head_dim = h // heads
    layer = 2 * h * h + 2 * h * kv * head_dim + 3 * h * inter + 2 * h
    biggest = max(layer, VOCAB * h)
    out = {"activations": act}
    if fsdp:
        out["fsdp unsharded layers"] = 4 * biggest * param_bytes
    return out


def fd_rows(param_bytes: int, work_bytes: int, fsdp: bool, check: bool = True) -> float:
    """Bytes per (local) parameter of the finite-difference product (see the docstring):
    without the pre-flight check (``hessian(..., check=False)``) its rows go."""
    if fsdp:
        return 2 * param_bytes + (3 + check) * work_bytes
    return max(4 * work_bytes, 2 * work_bytes + 2 * param_bytes) + 2 * check * work_bytes


class Ladder:
    """Plans of one model for every configuration and mode."""

    def __init__(self, hf: Any, torch: Any, model: Any, size: str, args: argparse.Namespace):
        self.hf, self.torch, self.size, self.args = hf, torch, size, args
        self.model = model
        self.n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.param_bytes = next(model.parameters()).element_size()
        self.work_bytes = 4 if self.param_bytes <= 4 else 8
        self.has_krylov = "krylov" in inspect.signature(hf.estimate_memory).parameters
        self.fd_bytes = {f: fd_rows(self.param_bytes, self.work_bytes, f, not args.no_check)
                         for f in (False, True)}

    def plans(self, cfg: Config, krylov: str, basis_dtype: str | None) -> dict[str, Any]:
        """The two runs' plans for the whole model on one device (n = all parameters)."""
        torch = self.torch
        kw: dict[str, Any] = {"available": int(self.args.gpu_gb * 1e9), "measure": False}
        if self.has_krylov:
            kw["krylov"] = krylov
        elif krylov == "lean":
            raise SystemExit("hessfast.estimate_memory has no krylov= keyword in this "
                             "checkout: the lean rows need it (issue 18 part 1)")
        if basis_dtype:
            kw["basis_dtype"] = getattr(torch, basis_dtype)
        if cfg.host_basis:
            kw["basis_device"] = "cpu"
        return {
            "lambda_max": self.hf.estimate_memory(self.model, "eigsh", k=1, **kw),
            "density": self.hf.estimate_memory(self.model, "slq", num_probes=self.args.probes,
                                               num_steps=self.args.steps, **kw),
        }

    def per_rank(self, plan: Any, cfg: Config, n: int, fixed: dict[str, int]
                 ) -> dict[str, int]:
        """Device and host bytes of one rank for a model of ``n`` parameters."""
        local = math.ceil(n / cfg.world_size) if cfg.fsdp else n
        p = plan.at(local)
        device = p.total("device") + int(self.fd_bytes[cfg.fsdp] * local)
        device += sum(fixed.values())
        return {"device": device, "host": p.total("host"), "local_n": local}

    def capacity(self, cfg: Config) -> dict[str, float]:
        per_node = min(cfg.world_size, GPUS_PER_NODE)
        return {"device": self.args.gpu_gb * 1e9, "host": self.args.host_tb * 1e12 / per_node}

    def fits(self, need: dict[str, int], cfg: Config) -> bool:
        cap = self.capacity(cfg)
        return need["device"] <= cap["device"] and need["host"] <= cap["host"]

    def largest_n(self, plans: dict[str, Any], cfg: Config, fixed: dict[str, int]) -> int:
        """The most parameters for which both runs fit (the fixed items held fixed)."""
        def ok(n: int) -> bool:
            return all(self.fits(self.per_rank(p, cfg, n, fixed), cfg) for p in plans.values())

        if not ok(1):
            return 0
        lo, hi = 1, 2
        while ok(hi) and hi < 2**50:
            lo, hi = hi, hi * 2
        while hi - lo > max(1, lo // 10**4):
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        return lo

    def bytes_per_param(self, plans: dict[str, Any], cfg: Config) -> dict[str, float]:
        """Bytes per parameter of the whole model, summed over the ranks (the worse of the
        two runs), device and host: what grows with n."""
        out = {"device": 0.0, "host": 0.0}
        N = 10**12
        for p in plans.values():
            a, b = self.per_rank(p, cfg, N, {}), self.per_rank(p, cfg, 2 * N, {})
            for w in out:
                out[w] = max(out[w], (b[w] - a[w]) * cfg.world_size / N)
        return out


def main() -> None:
    ap = harness.parser(__doc__, raw=True)
    ap.add_argument("--models", default="7b,13b,70b",
                    help=f"comma-separated, from {', '.join(LLAMA)} (default all)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="the parameters' dtype (default bfloat16)")
    ap.add_argument("--tokens", type=int, default=4096,
                    help="tokens per rank of one gradient (the activation allowance)")
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory, 10^9 bytes")
    ap.add_argument("--host-tb", type=float, default=2.0,
                    help="host memory per 8-GPU node, 10^12 bytes (split over its ranks)")
    ap.add_argument("--probes", type=int, default=16, help="SLQ probes")
    ap.add_argument("--steps", type=int, default=64, help="SLQ steps per probe")
    ap.add_argument("--no-check", action="store_true",
                    help="plan hessian(..., check=False): no symmetry-check rows")
    ap.add_argument("--md", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    sizes = [s.strip().lower() for s in args.models.split(",") if s.strip()]
    for s in sizes:
        if s not in LLAMA:
            ap.error(f"--models: {s!r} is not one of {', '.join(LLAMA)}")

    import torch

    transformers = harness.import_transformers()
    import hessfast as hf

    dtype = getattr(torch, args.dtype)
    out = harness.Records("bench_paper_ladder", args)
    ladders = {s: Ladder(hf, torch, build_model(transformers, torch, s, dtype), s, args)
               for s in sizes}
    largest_shape = max(sizes, key=lambda s: ladders[s].n)
    rows = []
    for cfg in CONFIGS:
        for label, krylov, bdtype in MODES:
            runnable = not (cfg.fsdp and krylov == "full")
            cells = []
            any_ladder = ladders[largest_shape]
            for s in sizes:
                lad = ladders[s]
                fixed = shape_items(s, args.tokens, lad.param_bytes, cfg.fsdp)
                plans = lad.plans(cfg, krylov, bdtype)
                need = {run: lad.per_rank(p, cfg, lad.n, fixed) for run, p in plans.items()}
                worst = {w: max(v[w] for v in need.values()) for w in ("device", "host")}
                fit = all(lad.fits(v, cfg) for v in need.values())
                cells.append((s, worst, fit))
                out.emit({
                    "kind": "plan", "model": s, "n": lad.n, "dtype": args.dtype,
                    "configuration": cfg.name, "world_size": cfg.world_size, "fsdp": cfg.fsdp,
                    "basis_device": "cpu" if cfg.host_basis else "gpu", "mode": label,
                    "krylov": krylov, "basis_dtype": bdtype, "runnable_today": runnable,
                    "planned_krylov": {r: p.settings.get("krylov", "full")
                                       for r, p in plans.items()},
                    "per_rank": need, "fixed_items": fixed,
                    "fd_bytes_per_local_param": lad.fd_bytes[cfg.fsdp],
                    "check": not args.no_check,
                    "capacity_per_rank": lad.capacity(cfg), "fits": fit,
                    "plan_items": {r: [{"name": i.name, "bytes": i.bytes, "where": i.where}
                                       for i in p.at(need[r]["local_n"]).items]
                                   for r, p in plans.items()},
                    "assumptions": {"tokens_per_rank": args.tokens, "gpu_bytes": args.gpu_gb * 1e9,
                                    "host_bytes_per_node": args.host_tb * 1e12,
                                    "hvp_mode": "finite_difference"},
                })
            fixed = shape_items(largest_shape, args.tokens, any_ladder.param_bytes, cfg.fsdp)
            plans = any_ladder.plans(cfg, krylov, bdtype)
            big = any_ladder.largest_n(plans, cfg, fixed)
            bpp = any_ladder.bytes_per_param(plans, cfg)
            out.emit({"kind": "largest", "configuration": cfg.name, "mode": label,
                      "dtype": args.dtype, "runnable_today": runnable, "largest_n": big,
                      "fixed_items_of": largest_shape, "fixed_items": fixed,
                      "bytes_per_param": bpp})
            rows.append((cfg, label, runnable, bpp, cells, big))
    # how many 80 GB GPUs (whole nodes) the lean FSDP run of each model needs
    gpus = {}
    for s in sizes:
        lad = ladders[s]
        for R in range(GPUS_PER_NODE, 4097, GPUS_PER_NODE):
            cfg = Config(f"{R} x {args.gpu_gb:g} GB, FSDP", R, True, False)
            fixed = shape_items(s, args.tokens, lad.param_bytes, True)
            if all(lad.fits(lad.per_rank(p, cfg, lad.n, fixed), cfg)
                   for p in lad.plans(cfg, "lean", None).values()):
                gpus[s] = R
                break
    out.emit({"kind": "gpus_needed", "mode": "lean", "fsdp": True, "dtype": args.dtype,
              "gpus": gpus, "check": not args.no_check})
    out.close()
    md = table(rows, sizes, ladders, args, largest_shape)
    md += "\nLean FSDP needs, per model, " + ", ".join(
        f"{s.upper()}: {r} GPUs" for s, r in gpus.items()) + \
        f" of {args.gpu_gb:g} GB (whole nodes of {GPUS_PER_NODE})."
    print(md)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(md + "\n")


def targets(rows: list, sizes: list[str]) -> list[str]:
    """Issue 18's targets: 7B on 8 x 80 GB (FSDP), 70B on one node with host memory, met
    by a runnable mode or not (with the best runnable figure)."""
    out = [""]
    for size, want in (("7b", "8 x 80 GB, FSDP"), ("70b", "8 x 80 GB, FSDP, basis on host")):
        if size not in sizes:
            continue
        i = sizes.index(size)
        best = min(((r[4][i][1]["device"], r[1], r[4][i][2]) for r in rows
                    if r[0].name == want and r[2]), default=None)
        if best is None:
            continue
        need, label, fit = best
        out.append(f"Target {size.upper()} on {want}: {'met' if fit else '**missed**'} "
                   f"({label}: {_gb(need)} GB per rank on the GPU).")
    return out


def table(rows: list, sizes: list[str], ladders: dict[str, Ladder], args: argparse.Namespace,
          largest_shape: str) -> str:
    """The markdown table of the ladder and its assumptions."""
    head = ["configuration", "mode", "B/param device (host)"]
    head += [f"{s.upper()} ({_fmt_n(ladders[s].n)}) GB/rank" for s in sizes]
    head += ["largest n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cfg, label, runnable, bpp, cells, big in rows:
        mode = label + ("" if runnable else " (planned only)")
        b = f"{bpp['device']:.0f}" + (f" ({bpp['host']:.0f})" if bpp["host"] >= 1 else "")
        parts = []
        for _, worst, fit in cells:
            host = f" + {_gb(worst['host'])} host" if worst["host"] >= 1e9 else ""
            parts.append(f"{_gb(worst['device'])}{host} {'fits' if fit else '**no**'}")
        lines.append("| " + " | ".join([cfg.name, mode, b, *parts, _fmt_n(big)]) + " |")
    lad = ladders[largest_shape]
    notes = [*targets(rows, sizes),
        "",
        f"Parameters in {args.dtype}, working vectors fp32; lambda_max (k = 1, tol as asked, "
        f"32-row basis in the full mode) and a {args.probes} x {args.steps} SLQ density; "
        "per rank the worse of the two runs. Capacity "
        f"{args.gpu_gb:g} x 10^9 B per GPU, host {args.host_tb:g} x 10^12 B per node "
        f"({args.host_tb * 1e12 / GPUS_PER_NODE / 1e9:.0f} GB per rank on 8 GPUs).",
        "B/param: bytes per model parameter that grow with n, summed over the ranks "
        "(device, and host in parentheses).",
        f"Assumed, not planned by estimate_memory: activations of one gradient at "
        f"{args.tokens} tokens per rank with per-layer checkpointing (2h B per token per "
        "layer + one layer's 34h B per token + fp32 logits and gradient 8V B per token); "
        f"the finite-difference product's rows, {lad.fd_bytes[False]:.0f} B per parameter "
        "in one process (g+, g-, their difference and mean"
        + ("" if args.no_check else "; the symmetry probe's 2 rows")
        + f") and {lad.fd_bytes[True]:.0f} B per local parameter with FSDP (parameter copy "
        "and gradient shards in the parameter dtype; 3 working rows at the error "
        "estimate's peak"
        + ("" if args.no_check else ", or g+, g- and the symmetry check's 2 rows")
        + "); with FSDP, 2 gathered layers and 2 unsharded layer gradients.",
        f"Largest n: the fixed items of the {largest_shape.upper()} shape held fixed.",
        "(planned only): hessfast refuses a stored basis on sharded (FSDP) vectors today; "
        "the row is what it would need.",
    ]
    return "\n".join(lines + notes)


if __name__ == "__main__":
    main()
