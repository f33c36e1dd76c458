"""GB/s of the native (or Triton) basis ops against torch's own matmul path and the machine's
streaming read and copy bandwidth, measured in the same run. One JSON line per case on stdout.

    python bench/bench_ops.py [--quick] [--device cpu|cuda] [--repeats R] [--out FILE] [--save]
    python bench/bench_ops.py --device cuda --backend triton [--modes fma,dot] [--target]
    TRITON_INTERPRET=1 python bench/bench_ops.py --backend triton --shapes 1000:8:2 --repeats 1

``--backend triton`` times hessfast/kernels/basis_triton.py once per ``--modes`` entry (a row's
"mode"); ``--target`` adds the issue-10 shape (reorthogonalize, bf16 basis, n = 1e8, m = 64,
k = 8: 12.8 GB of basis, ~30 GB in all with torch's path; CUDA only). "frac_of_copy" is the
kernel's GB/s over a device-to-device copy's (bytes read + written) in the same run; the issue
asks >= 0.8 of it and >= 1.5x torch for the target shape. Rows where the Triton kernel beats
torch name the ops for hessfast.ops._CUDA_AUTO_TRITON. CPU runs (interpreter) check the script
only: no timing claims. The "native_*" columns hold the backend under test (column "backend").

(hessfast must be importable: installed, or the repository root on PYTHONPATH with a built _C.
Flags, records and results files: bench/_harness.py, bench/README.md.)

Bytes counted are what each op must move at minimum (V is read once per pass over n):
  basis_dot       m n s + k n 4           (s = bytes per basis element, W float32)
  basis_update    m n s + 2 k n 4
  reorthogonalize 2 m n s + 3 k n 4       (one CGS pass; random W never triggers a second one)
torch's path: C = V @ W.T (fp32), then W.sub_(C.T @ V); a bf16 basis multiplies in bf16
(torch's mixed-precision route: W cast to bf16, result cast back).
"""

from __future__ import annotations

import os
import sys

import _harness as harness
import torch

from hessfast import _native, ops
from hessfast.testing import timeit

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGET = (100_000_000, 64, 8)  # issue 10: reorthogonalize, bf16 basis, n, m, k


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """Device-to-device copy GB/s (bytes read + written) of 1 GiB (CPU) / 4 GiB (GPU)."""
    numel = (1 << 28) if device.type == "cpu" else (1 << 30)
    x = torch.ones(numel, device=device)
    y = torch.empty_like(x)
    t = timeit(lambda: y.copy_(x), repeats=repeats, device=device).median
    return 2 * numel * 4 / t / 1e9


def backend_fns(backend: str, mode: str):
    """(basis_dot, basis_update, reorthogonalize) of the backend under test."""
    if backend == "native":
        return ops.basis_dot, ops.basis_update, ops.reorthogonalize
    from hessfast.kernels import basis_triton as bt

    return (lambda V, W: bt.basis_dot_triton(V, W, mode=mode),
            lambda V, C, W: bt.basis_update_triton(V, C, W, mode=mode),
            lambda V, W: bt.reorthogonalize_triton(V, W, mode=mode))


def stream_bandwidth(device: torch.device, repeats: int) -> float:
    """Streaming read GB/s: a float32 sum over 1 GiB (CPU) / 4 GiB (GPU), far beyond any cache."""
    numel = (1 << 28) if device.type == "cpu" else (1 << 30)
    x = torch.ones(numel, device=device)
    t = timeit(x.sum, repeats=repeats, device=device).median
    return numel * 4 / t / 1e9


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def bench_case(device, storage, m, k, n, repeats, stream, copy, backend="native", mode="fma",
               ops_=("basis_dot", "basis_update", "reorthogonalize")):
    dot, update, reorth = backend_fns(backend, mode)
    s = torch.empty((), dtype=storage).element_size()
    g = torch.Generator(device=device).manual_seed(0)
    V = torch.empty(m, n, device=device, dtype=storage)
    for i in range(m):  # row by row: no float32 copy of a large basis
        V[i] = torch.randn(n, device=device, generator=g)
    W0 = torch.randn(k, n, device=device, generator=g)
    W = W0.clone()
    low = storage != torch.float32

    def torch_dot():
        return (V @ W.to(storage).T).float() if low else V @ W.T

    def torch_update(C):
        if low:
            W.sub_((C.to(storage).T @ V).float())
        else:
            W.sub_(C.T @ V)

    def torch_reorth():
        torch_update(torch_dot())

    def restore():
        W.copy_(W0)

    # correctness first, against the float64 product of the stored values (sampled columns)
    C = dot(V, W)
    cols = torch.arange(0, n, max(1, n // 50_000), device=device)
    C_ref = V[:, cols].double() @ W[:, cols].double().T * (n / cols.numel())
    C_sub = dot(V[:, cols].contiguous(), W[:, cols].contiguous())
    err = rel_err(C_sub * (n / cols.numel()), C_ref)
    assert err < 1e-5, f"basis_dot wrong: rel err {err}"
    restore()
    Cn, _ = reorth(V, W)
    Wn = W.clone()
    restore()
    torch_reorth()
    err_reorth = rel_err(Wn, W)
    tol = 2e-2 if low else 1e-4  # torch's bf16 route itself is only bf16-accurate
    assert err_reorth < tol, f"reorthogonalize disagrees with torch: {err_reorth}"

    cases = {
        "basis_dot": (lambda: dot(V, W), torch_dot, m * n * s + k * n * 4, None),
        "basis_update": (
            lambda: update(V, C, W), lambda: torch_update(C), m * n * s + 2 * k * n * 4, restore,
        ),
        "reorthogonalize": (
            lambda: reorth(V, W), torch_reorth, 2 * m * n * s + 3 * k * n * 4, restore,
        ),
    }
    out = []
    for op, (native_fn, torch_fn, nbytes, setup) in cases.items():
        if op not in ops_:
            continue
        # median of `repeats` runs after one warm-up; setup() restores W, untimed
        t_nat = timeit(native_fn, repeats=repeats, setup=setup, device=device).median
        t_tor = timeit(torch_fn, repeats=repeats, setup=setup, device=device).median
        out.append({
            "op": op, "device": device.type, "storage": str(storage).removeprefix("torch."),
            "m": m, "k": k, "n": n, "native_ms": round(t_nat * 1e3, 3),
            "torch_ms": round(t_tor * 1e3, 3), "native_GBps": round(nbytes / t_nat / 1e9, 2),
            "torch_GBps": round(nbytes / t_tor / 1e9, 2), "stream_GBps": round(stream, 2),
            "frac_of_stream": round(nbytes / t_nat / 1e9 / stream, 3),
            "speedup_vs_torch": round(t_tor / t_nat, 2), "repeats": repeats,
            "backend": backend, "mode": mode if backend == "triton" else None,
            "copy_GBps": round(copy, 2), "frac_of_copy": round(nbytes / t_nat / 1e9 / copy, 3),
        })
    return out


def main() -> None:
    p = harness.parser(__doc__, "device", "quick", "repeats", raw=True,
                       device_choices=["cpu", "cuda"], quick_help="n=2e6, m in {16, 64}, k=4 only",
                       repeats_help="timed runs per case (median)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--backend", default="native", choices=["native", "triton"],
                   help="native: hessfast.ops as dispatched; triton: kernels/basis_triton.py")
    p.add_argument("--modes", default="fma,dot", help="Triton modes to time (--backend triton)")
    p.add_argument("--shapes", default=None, help="n:m:k,... instead of the built-in grid")
    p.add_argument("--target", action="store_true",
                   help="also the issue-10 target: reorthogonalize, bf16, n=1e8, m=64, k=8")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.backend == "native" and device.type == "cuda" and not (
            torch.cuda.is_available() and _native.cuda_compiled()):
        sys.exit("--device cuda needs a CUDA device and hessfast._C built with CUDA kernels")
    if args.backend == "triton":
        from hessfast.kernels.basis_triton import triton_import_error

        if triton_import_error() is not None:
            sys.exit(f"--backend triton needs Triton: {triton_import_error()}")
        if device.type == "cuda" and not torch.cuda.is_available():
            sys.exit("--device cuda needs a CUDA device")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--backend triton on the CPU runs only under TRITON_INTERPRET=1 (tiny "
                     "--shapes; checks the script, times nothing meaningful)")
    if args.target and device.type != "cuda":
        sys.exit("--target (n = 1e8) is for --device cuda only")
    os.environ.setdefault("HESSFAST_BACKEND", "auto")
    report = ops.backend_report()["basis_dot"][device.type]
    selected = "triton" if args.backend == "triton" else report["selected"]
    info = {"info": "bench_ops", "device": device.type, "backend": selected,
            "native": _native.build_info(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with harness.Records("bench_ops", args, tag=device.type) as out:
        run(args, device, info, out)


def run(args, device: torch.device, info: dict, out: harness.Records) -> None:
    """The measurements of :func:`main`, each record through ``out``."""
    out.emit(info)
    stream = stream_bandwidth(device, 5)
    out.emit({"op": "stream_read", "device": device.type, "GBps": round(stream, 2)})
    copy = copy_bandwidth(device, 5)
    out.emit({"op": "copy_d2d", "device": device.type, "GBps": round(copy, 2)})
    modes = args.modes.split(",") if args.backend == "triton" else ["fma"]
    if args.shapes:
        grid = [tuple(int(float(x)) for x in sh.split(":")) for sh in args.shapes.split(",")]
    elif args.quick:
        grid = [(2_000_000, m, 4) for m in (16, 64)]
    else:
        grid = [(n, m, k) for n in (100_000, 2_000_000, 20_000_000) for m in (16, 64, 128)
                for k in (1, 4, 8)]
    for name in args.dtypes.split(","):
        storage = DTYPES[name]
        s = torch.empty((), dtype=storage).element_size()
        for n, m, k in grid:
            need = m * n * s * (1 if storage == torch.float32 else 3) + 4 * k * n * 4
            if need > 0.7 * free_bytes(device):
                why = f"needs {need / 1e9:.1f} GB"
                out.emit({"skipped": [name, m, k, n], "reason": why})
                continue
            reps = args.repeats or (3 if m * n * s > 2e9 else 7 if m * n * s > 2e8 else 15)
            for mode in modes:
                for row in bench_case(device, storage, m, k, n, reps, stream, copy,
                                      args.backend, mode):
                    out.emit(row)
    if args.target:
        n, m, k = TARGET
        need = m * n * 2 + 6 * k * n * 4  # basis, W, W0, clone, torch's temporaries
        if need > 0.9 * free_bytes(device):
            out.emit({"skipped": "target", "reason": f"needs {need / 1e9:.1f} GB"})
            return
        for mode in modes:
            for row in bench_case(device, torch.bfloat16, m, k, n, args.repeats or 5, stream,
                                  copy, args.backend, mode, ops_=("reorthogonalize",)):
                row["target"] = True
                row["meets_issue_target"] = bool(row["frac_of_copy"] >= 0.8
                                                 and row["speedup_vs_torch"] >= 1.5)
                out.emit(row)


if __name__ == "__main__":
    main()
