"""The chunked linear-head cross-entropy GGN block against the plain autograd GGN product of the
head: time and (on CUDA) peak extra memory. One JSON line per (case, method) on stdout and, with
``--out``, appended to a file.

    python bench/bench_linear_ce.py [--device cpu|cuda] [--quick] [--dtype bfloat16|float32]
                                    [--n 2048 8192] [--vocab 32768 131072] [--d 2048] [--k 1 4]
                                    [--repeats R] [--out results.jsonl] [--save]

(hessfast must be importable: installed, or the repository root on PYTHONPATH. Flags, records
and results files: bench/_harness.py, bench/README.md.)

Methods, for ``logits = h W^T + b``, mean cross-entropy with some ``ignore_index`` targets and k
directions ``(dh, dW, db)``:
  fused     ``linear_ce_ggn_product``: chunks of tokens, no ``[N, V]`` tensor.
  autograd  per direction: ``u = J v`` by the double-vjp trick through ``F.linear``, ``q = H u``
            by double backward of ``F.cross_entropy``, ``J^T q`` by ``autograd.grad``; holds the
            ``[N, V]`` logits, their graph and per-direction ``[N, V]`` buffers.
``peak_extra_bytes`` (CUDA only): ``max_memory_allocated`` during the call minus what was
allocated before it (inputs). ``rel_err``: ``|fused - autograd| / |autograd|`` over all outputs,
in float64. The issue's targets: the fused extra memory does not grow with N, and the fused
product is >= 3x faster than autograd at V >= 128k on a GPU. This script makes no claim itself.
"""

from __future__ import annotations

import functools
import sys

import _harness as harness
import torch
import torch.nn.functional as F

from hessfast.kernels.linear_ce import linear_ce_ggn_product
from hessfast.testing import timeit

IGN = -100
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def make_case(n: int, v: int, d: int, k: int, dtype: torch.dtype, device: torch.device):
    """Random h [N, d], W [V, d], b [V], targets [N] (1/8 ignored), dh, dW, db."""
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape: int, s: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * s).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    targets[::8] = IGN
    return (rnd(n, d), rnd(v, d, s=d ** -0.5), rnd(v), targets,
            rnd(k, n, d), rnd(k, v, d, s=d ** -0.5), rnd(k, v))


def autograd_ggn(h, W, b, targets, dh, dW, db):
    """The head's GGN product by plain autograd, one direction at a time."""
    params = [t.detach().requires_grad_() for t in (h, W, b)]
    z = F.linear(*params)                                               # [N, V]
    zr = z.detach().requires_grad_()
    gz = torch.autograd.grad(F.cross_entropy(zr.float(), targets, ignore_index=IGN), zr,
                             create_graph=True)[0]
    w = torch.zeros_like(z, requires_grad=True)
    jt = torch.autograd.grad(z, params, w, create_graph=True)          # J^T w, linear in w
    outs = []
    for j in range(dh.shape[0]):
        u = torch.autograd.grad(jt, w, (dh[j], dW[j], db[j]), retain_graph=True)[0]
        q = torch.autograd.grad(gz, zr, u, retain_graph=True)[0]
        outs.append(torch.autograd.grad(z, params, q, retain_graph=True))
    return tuple(torch.stack([o[i] for o in outs]) for i in range(3))


def fused_ggn(h, W, b, targets, dh, dW, db, chunk_tokens=None, chunk_bytes=None):
    kw = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    return linear_ce_ggn_product(h, W, b, targets, dh, dW, db, ignore_index=IGN,
                                 chunk_tokens=chunk_tokens, **kw)


def rel_err(got, ref) -> float:
    num = sum(float((a.double() - r.double()).norm() ** 2) for a, r in zip(got, ref, strict=True))
    den = sum(float(r.double().norm() ** 2) for r in ref)
    return (num / max(den, 1e-300)) ** 0.5


def measure(fn, args, device: torch.device, repeats: int) -> tuple[dict, tuple]:
    """Peak extra memory of one call (CUDA), then the timing."""
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn(*args)
        torch.cuda.synchronize(device)
        out["peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - before
    else:
        result = fn(*args)
    t = timeit(lambda: fn(*args), repeats=repeats, warmup=1, device=device)
    out.update(median_s=t.median, best_s=t.best)
    return out, result


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser(__doc__.splitlines()[0], "device", "quick", "repeats",
                        device_choices=["cpu", "cuda"], quick_help="tiny sizes (a smoke run)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    ap.add_argument("--n", type=int, nargs="+", default=None, help="token counts N")
    ap.add_argument("--vocab", type=int, nargs="+", default=None, help="vocabulary sizes V")
    ap.add_argument("--d", type=int, default=None, help="hidden size d")
    ap.add_argument("--k", type=int, nargs="+", default=None, help="direction counts k")
    ap.add_argument("--chunk-tokens", type=int, default=None, help="fused: rows per chunk")
    ap.add_argument("--chunk-bytes", type=int, default=None,
                    help="fused: budget of one [k, c, V] buffer (default 256 MiB)")
    ap.add_argument("--no-autograd", action="store_true", help="time only the fused product")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible; run with --device cpu", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    if a.quick:
        ns, vs, d, ks, reps = [16, 64], [100], 8, [1, 2], 1
    elif gpu:
        ns, vs, d, ks, reps = [2048, 8192], [32768, 131072], 2048, [1, 4], 5
    else:
        ns, vs, d, ks, reps = [256, 1024], [2048, 8192], 64, [1, 2], 3
    ns, vs, ks = a.n or ns, a.vocab or vs, a.k or ks
    d, reps = a.d or d, a.repeats or reps
    dtype = DTYPES[a.dtype or ("bfloat16" if gpu else "float32")]
    sink = harness.Records("bench_linear_ce", a, tag=device.type)
    try:
        for v in vs:
            for n in ns:
                for k in ks:
                    args = make_case(n, v, d, k, dtype, device)
                    common = dict(device=str(device), gpu=torch.cuda.get_device_name(device)
                                  if gpu else None, dtype=str(dtype).split(".")[-1],
                                  N=n, V=v, d=d, k=k)
                    fn = functools.partial(fused_ggn, chunk_tokens=a.chunk_tokens,
                                           chunk_bytes=a.chunk_bytes)
                    fused, got = measure(fn, args, device, reps)
                    rows = [dict(common, method="fused", chunk_tokens=a.chunk_tokens,
                                 chunk_bytes=a.chunk_bytes, **fused)]
                    if not a.no_autograd:
                        base, ref = measure(autograd_ggn, args, device, reps)
                        rows[0]["rel_err"] = rel_err(got, ref)
                        del ref
                        rows[0]["speedup"] = base["median_s"] / fused["median_s"]
                        rows.append(dict(common, method="autograd", **base))
                    del got
                    for row in rows:
                        sink.emit(row)
                    del args
                    if gpu:
                        torch.cuda.empty_cache()
    finally:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
