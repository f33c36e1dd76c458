"""Data-parallel block products on gloo: 1 vs R processes on the same global data.

Each world size runs in fresh processes (one per rank, ``OMP_NUM_THREADS`` threads each,
a gloo group on 127.0.0.1). The global data (``--batches`` batches of ``--batch`` samples)
is split over the ranks; each rank builds ``hf.hessian`` on its shard (float32) and times
``H.matmat(V)`` for ``V: [k, n]`` (median of ``--repeats`` after one warm-up). Reported per
world size, by rank 0 as one JSON line:

* ``product_s``: the block product (local pass + the one all-reduce), median over repeats;
* ``allreduce_s``: the all-reduce alone on a ``[k, n]`` buffer of the operator's dtype
  (median), and ``allreduce_bytes = k * n * itemsize`` (the bus moves ``2 (R-1)/R`` of it);
* ``build_s``: the operator's construction; ``n``: parameters.

Models: ``mlp`` (a tanh MLP) or ``lm`` (:class:`hessfast.testing.models.TinyLM`, a
GPT-2-like block with plain-matmul attention).

    python bench/bench_distributed.py [--model mlp|lm] [--worlds 1,2] [--k 4]
                                      [--batches 8] [--batch 64] [--repeats 5]
                                      [--out FILE] [--save]

Speed is measured here only, never in tests; results go to bench/RESULTS.md with the
machine, date and commit (flags, records and results files: bench/_harness.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import subprocess
import sys

import _harness as harness
import torch
from torch import nn


def build(model_kind: str, batches: int, batch: int) -> tuple[nn.Module, object, list]:
    """The model, its loss_fn and the global batches (the same in every process)."""
    from hessfast.testing.models import TinyLM, lm_loss

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if model_kind == "lm":
        vocab, seq = 64, 32
        model = TinyLM(vocab=vocab, d=64, seq=seq, hidden=256, heads=4)
        data = [
            {"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen),
             "labels": torch.randint(0, vocab, (batch, seq), generator=gen)}
            for _ in range(batches)
        ]
        return model, lm_loss, data
    model = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                          nn.Linear(128, 10))
    data = [(torch.randn(batch, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(batches)]
    return model, nn.CrossEntropyLoss(), data


def rank_main(args: argparse.Namespace) -> None:
    """One rank: build on its shard, time products and the bare all-reduce."""
    import torch.distributed as dist

    import hessfast as hf
    from hessfast.distributed import Comm
    from hessfast.testing import timeit

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    world, rank = args.world, args.rank
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=300))
    model, loss_fn, data = build(args.model, args.batches, args.batch)
    mine = data[rank::world]
    built = timeit(lambda: hf.hessian(model, loss_fn, mine), repeats=1, warmup=0, device="cpu")
    H, build_s = built.result, built.seconds
    V = torch.randn(args.k, H.shape[0], generator=torch.Generator().manual_seed(1))
    # one warm-up product (plans the path), then the median of --repeats; every rank makes
    # the same calls in the same order, so the collectives inside them pair up
    product = timeit(lambda: H.matmat(V), repeats=args.repeats, warmup=1, device="cpu").median
    reduce = None
    if world > 1:
        buf = torch.zeros(args.k, H.shape[0], dtype=H.dtype)
        # the sum of zeros stays zeros: one buffer serves every repeat
        reduce = timeit(lambda: Comm().allreduce_sum_(buf), repeats=args.repeats, warmup=0,
                        device="cpu").median
    if rank == 0:
        out = harness.Records("bench_distributed", args, tag="cpu")
        out.emit({
            "model": args.model, "world": world, "k": args.k, "n": H.shape[0],
            "global_batches": args.batches, "batch": args.batch,
            "build_s": round(build_s, 4),
            "product_s": round(product, 5),
            "allreduce_s": round(reduce, 5) if reduce is not None else 0.0,
            "allreduce_bytes": args.k * H.shape[0] * H.dtype.itemsize if world > 1 else 0,
            "hvp_mode": H.hvp_mode,
        })
        out.close()
    if world > 1:
        dist.destroy_process_group()


def launch(args: argparse.Namespace, world: int) -> None:
    """Start ``world`` rank processes of this script and wait for them (10 min limit)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    common = ["--model", args.model, "--k", str(args.k), "--batches", str(args.batches),
              "--batch", str(args.batch), "--repeats", str(args.repeats),
              *(["--out", args.out] if args.out else []), *(["--save"] if args.save else [])]
    procs = [
        subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", str(world),
                          "--port", str(port), *common], env=env)
        for r in range(world)
    ]
    codes = [p.wait(timeout=600) for p in procs]
    if any(codes):
        raise SystemExit(f"world {world}: exit codes {codes}")


def main() -> None:
    parser = harness.parser(__doc__, "repeats", repeats=5)
    parser.add_argument("--model", choices=["mlp", "lm"], default="mlp")
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args)
        return
    for world in (int(w) for w in args.worlds.split(",")):
        launch(args, world)


if __name__ == "__main__":
    main()
