"""The fused cross-entropy loss head (``fused_loss=True``) against autograd's double backward
(``fused_loss=False``) inside ``hf.ggn`` / ``hf.hessian`` products, on one model per shape.

Prints one JSON line per (curvature, shape): best-of-``--repeats`` time of ``matmat`` with
``[k, n]`` for both, their ratio, and the relative difference of the two products (same
model, same vectors: rounding only). The models are an MLP ``d -> d -> V`` on N samples.

    python bench/bench_fused_loss.py [--device cuda] [--repeats 5] [--out FILE] [--save]

Flags, records and results files: bench/_harness.py (bench/README.md).
"""

from __future__ import annotations

import _harness as harness
import torch
from torch import nn

import hessfast as hf
from hessfast.testing import timeit

SHAPES_CPU = ((1000, 512, 64, 1), (1000, 512, 64, 8), (10000, 256, 32, 1), (10000, 256, 32, 8),
              (50257, 128, 16, 4))
SHAPES_CUDA = ((32000, 2048, 256, 1), (32000, 2048, 256, 4), (128256, 1024, 128, 4))


def _time(A: hf.LinearOperator, X: torch.Tensor, repeats: int,
          device: torch.device) -> tuple[float, torch.Tensor]:
    """Best of ``repeats`` products after one warm-up (graph cache, planner), and the last."""
    t = timeit(lambda: A.matmat(X), repeats=repeats, warmup=1, device=device)
    return t.best, t.result


def main() -> None:
    ap = harness.parser(__doc__, "device", "repeats", repeats=5,
                        repeats_help="timed products per case (the best is reported)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    records = harness.Records("bench_fused_loss", args, tag=dev.type)
    shapes = SHAPES_CUDA if dev.type == "cuda" else SHAPES_CPU
    for kind in ("ggn", "hessian"):
        for V, N, d, k in shapes:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, V)).to(dev)
            data = [(torch.randn(N, d, device=dev), torch.randint(0, V, (N,), device=dev))]
            times, outs = {}, {}
            X = None
            for fused in (False, True):
                A = getattr(hf, kind)(model, nn.CrossEntropyLoss(), data, fused_loss=fused,
                                      hvp_mode="reuse_graph")
                if X is None:
                    X = torch.randn(k, A.shape[0], device=dev,
                                    generator=torch.Generator(dev).manual_seed(1))
                times[fused], outs[fused] = _time(A, X, args.repeats, dev)
                head = A.loss_head
            rel = ((outs[True] - outs[False]).norm() / outs[False].norm()).item()
            row = dict(curvature=kind, V=V, N=N, d=d, k=k, device=str(dev), head=head,
                       autograd_ms=round(times[False] * 1e3, 2),
                       fused_ms=round(times[True] * 1e3, 2),
                       speedup=round(times[False] / times[True], 2), rel_diff=f"{rel:.1e}")
            records.emit(row)
    records.close()


if __name__ == "__main__":
    main()
