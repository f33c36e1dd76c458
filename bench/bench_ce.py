"""The fused cross-entropy curvature product against what it replaces, and against the memory
floor. One JSON line per case (plus one for the copy bandwidth) to ``--out`` and stdout, a table
on stderr.

    python bench/bench_ce.py [--device cuda|cpu] [--shapes N,V,k,dtype;...] [--repeats R]
                             [--out FILE] [--save]

(flags, records and results files: bench/_harness.py, bench/README.md)

For logits ``[N, V]`` (10% of rows ``ignore_index``, mean reduction) and k directions
``U [k, N, V]`` it times (median of R after one warm-up, the device synchronised):

- ``triton``: :func:`ce_hessian_product_triton` (CUDA; the CPU only under TRITON_INTERPRET=1);
- ``eager``: :func:`ce_hessian_product_reference`, the torch composition (float32 compute);
- ``autograd``: what hessfast does without the kernel: ``F.cross_entropy`` forward, its
  gradient with ``create_graph=True``, then one double backward per direction (k of them).

Floors, in bytes, divided by the bandwidth of a large device-to-device copy measured in the
same run (``copy_GBps`` = (bytes read + bytes written) / time):

- ``floor2``: what the two-pass kernel must move: logits and U read twice, the output written
  once (the kernel's floor): ``2 N V s_l + 2 k N V s_u + k N V s_o``;
- ``floor1``: the minimum of any implementation: everything read once, the output written once:
  ``N V s_l + k N V s_u + k N V s_o``.

Reported per method: seconds, ``x_floor2`` / ``x_floor1`` (time / floor time, >= 1), the speedup
of Triton over eager and over autograd, ``extra_bytes`` = peak allocated during one call minus
the memory held before it minus the output (CUDA only), and the max error against the eager
reference (float32 compute) on the first 64 rows. A method that runs out of memory is reported
as such (the eager composition needs several float32 copies of U). On the CPU the sizes are
tiny and the times mean nothing: it checks that the script runs.
"""

from __future__ import annotations

import os
import platform
import sys

import _harness as harness
import torch
import torch.nn.functional as F

from hessfast.kernels.ce_curvature import (
    ce_hessian_product_reference,
    ce_hessian_product_triton,
    triton_available,
)
from hessfast.testing import timeit

IGNORE = -100
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CUDA_SHAPES = ("8192,128256,4,bfloat16;8192,128256,1,bfloat16;8192,128256,8,bfloat16;"
               "2048,128256,4,bfloat16;8192,32000,4,bfloat16;8192,32000,4,float32;"
               "8192,128256,4,float32")
CPU_SHAPES = "4,50,2,float32;3,1000,4,bfloat16"


def parse_shapes(text: str) -> list[tuple[int, int, int, torch.dtype]]:
    """``"N,V,k,dtype;..."`` -> ``[(N, V, k, dtype), ...]``."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        n, v, k, dt = item.split(",")
        if dt not in DTYPES:
            raise SystemExit(f"--shapes: dtype {dt!r} not in {sorted(DTYPES)}")
        out.append((int(n), int(v), int(k), DTYPES[dt]))
    return out


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """(read + write) bytes / s of ``dst.copy_(src)`` over 4 GiB (CUDA) or 256 MiB (CPU)."""
    numel = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), repeats=repeats, device=device).median
    return 2 * numel * 4 / t


def autograd_hvps(logits: torch.Tensor, target: torch.Tensor, U: torch.Tensor) -> list:
    """k Hessian-vector products of mean ``F.cross_entropy`` w.r.t. ``logits [N, V]`` by
    double backward, one per direction of ``U [k, N, V]``: a list of k ``[N, V]``."""
    x = logits.detach().requires_grad_(True)
    loss = F.cross_entropy(x, target, ignore_index=IGNORE)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    return [torch.autograd.grad(g, x, grad_outputs=u, retain_graph=j < len(U) - 1)[0]
            for j, u in enumerate(U)]


def measure(fn, device: torch.device, repeats: int) -> dict:
    """Median seconds of ``fn()`` and (CUDA) the peak bytes allocated beyond the output."""
    try:
        timing = timeit(fn, repeats=repeats, warmup=1, device=device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "out of memory"}
    res = {"s": timing.median}
    del timing  # frees the last call's result before the memory is measured
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        outs = out if isinstance(out, list) else [out]
        out_bytes = sum(o.numel() * o.element_size() for o in outs)
        res["extra_bytes"] = torch.cuda.max_memory_allocated() - base - out_bytes
        del out, outs
        torch.cuda.empty_cache()
    return res


def bench_case(n: int, v: int, k: int, dt: torch.dtype, device: torch.device, repeats: int,
               bw: float, use_triton: bool) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, v, device=device, dtype=dt, generator=g).mul_(3)
    U = torch.randn(k, n, v, device=device, dtype=dt, generator=g)
    target = torch.randint(0, v, (n,), device=device, generator=g)
    target[torch.rand(n, device=device, generator=g) < 0.1] = IGNORE
    target[0] = 0
    mask = target != IGNORE
    scale = 1.0 / mask.sum().to(torch.float32)  # 0-d device tensor: no host sync in the call

    size = torch.empty((), dtype=dt).element_size()
    nv = n * v
    floor2 = 2 * nv * size + 2 * k * nv * size + k * nv * size
    floor1 = nv * size + k * nv * size + k * nv * size
    row = {"N": n, "V": v, "k": k, "dtype": str(dt).replace("torch.", ""),
           "floor2_bytes": floor2, "floor1_bytes": floor1,
           "floor2_s": floor2 / bw, "floor1_s": floor1 / bw}

    # errors on the first rows only (the product is row-separable): no full-size reference
    rows = slice(0, min(n, 64))
    ref = ce_hessian_product_reference(logits[rows], U[:, rows], mask=mask[rows], scale=scale)
    methods = {
        "eager": lambda: ce_hessian_product_reference(logits, U, mask=mask, scale=scale),
        "autograd": lambda: autograd_hvps(logits, target, U),
    }
    if use_triton:
        methods = {"triton": lambda: ce_hessian_product_triton(logits, U, mask=mask,
                                                               scale=scale), **methods}
    for name, fn in methods.items():
        res = measure(fn, device, repeats)
        if "s" in res:
            res["x_floor2"] = res["s"] / row["floor2_s"]
            res["x_floor1"] = res["s"] / row["floor1_s"]
            out = fn()
            out = torch.stack(out) if isinstance(out, list) else out
            res["max_err_vs_eager"] = float((out[:, rows].float() - ref.float()).abs().max())
            del out
        row.update({f"{name}_{key}": val for key, val in res.items()})
    for other in ("eager", "autograd"):
        if "triton_s" in row and f"{other}_s" in row:
            row[f"triton_speedup_vs_{other}"] = row[f"{other}_s"] / row["triton_s"]
    return row


def _formatter(row: dict):
    def f(key: str, scale: float = 1.0, fmt: str = ".2f") -> str:
        val = row.get(key)
        return "-" if val is None else format(val * scale, fmt)
    return f


def main() -> None:
    ap = harness.parser(__doc__, "device", "repeats", repeats=5,
                        device="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=None, help="N,V,k,dtype;... (default: per device)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    shapes = parse_shapes(args.shapes or (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES))
    use_triton = triton_available() and (
        device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    why = "" if use_triton else (
        "Triton does not import" if not triton_available()
        else "the Triton kernel runs on CUDA (or under TRITON_INTERPRET=1)")

    sink = harness.Records("bench_ce", args, tag=device.type)
    emit = sink.emit
    bw = copy_bandwidth(device, args.repeats)
    emit({"kind": "copy_bandwidth", "device": str(device), "copy_GBps": bw / 1e9,
          "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
          "host": platform.node(), "torch": torch.__version__, "triton_used": use_triton,
          "triton_skipped_why": why, "timing_meaningful": device.type == "cuda"})
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s on {device}; triton: {use_triton} {why}",
          file=sys.stderr)
    print(f"{'N':>6} {'V':>7} {'k':>2} {'dtype':>9} | {'triton ms':>9} {'x floor2':>8} "
          f"{'x floor1':>8} {'eager ms':>9} {'autograd ms':>11} {'vs eager':>8} "
          f"{'vs autog':>8} | extra MB (tri/eager/autog)", file=sys.stderr)
    for n, v, k, dt in shapes:
        row = bench_case(n, v, k, dt, device, args.repeats, bw, use_triton)
        row.update(kind="ce_hessian_product", device=str(device))
        emit(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        f = _formatter(row)
        extra = "/".join(f(f"{m}_extra_bytes", 1e-6, ".0f")
                         for m in ("triton", "eager", "autograd"))
        print(f"{n:>6} {v:>7} {k:>2} {row['dtype']:>9} | {f('triton_s', 1e3):>9} "
              f"{f('triton_x_floor2'):>8} {f('triton_x_floor1'):>8} {f('eager_s', 1e3):>9} "
              f"{f('autograd_s', 1e3):>11} {f('triton_speedup_vs_eager'):>8} "
              f"{f('triton_speedup_vs_autograd'):>8} | {extra}", file=sys.stderr)
    if sink:
        sink.close()


if __name__ == "__main__":
    main()
