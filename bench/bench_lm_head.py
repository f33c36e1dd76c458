"""``hf.ggn(..., causal_lm=True, lm_head=model.lm_head)`` (the GGN split at the head, its block
chunked over tokens) against the unsplit GGN, on a small-width GPT-2 with a large vocabulary:
time of ``matmat`` with ``[k, n]`` and peak memory, each case in a fresh process (peak RSS on
the CPU, ``torch.cuda.max_memory_allocated`` on CUDA). One JSON line per case.

    python bench/bench_lm_head.py [--device cuda] [--vocab 50257] [--out FILE] [--save]

Flags, records and results files: bench/_harness.py (bench/README.md).
"""

from __future__ import annotations

import argparse
import json

import _harness as harness


def child(spec: dict) -> dict:
    """One case in this (fresh) process: the peak memory is the case's own."""
    import resource
    import warnings

    transformers = harness.import_transformers()
    import torch

    import hessfast as hf
    from hessfast.testing import timeit

    split, k, vocab, tokens, dev = (spec["split"], spec["k"], spec["vocab"], spec["tokens"],
                                    spec["device"])
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=vocab,
                                  n_positions=tokens, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).to(dev).eval()
    ids = torch.randint(0, vocab, (4, tokens), device=dev)
    batches = [{"input_ids": ids, "labels": ids}]
    kw = dict(lm_head=model.lm_head) if split else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        G = hf.ggn(model, None, batches, causal_lm=True, hvp_mode="double_backward", **kw)
    V = torch.randn(k, G.shape[0], device=dev)
    G.matmat(V)  # warm-up, before the peak memory is reset
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = timeit(lambda: G.matmat(V), repeats=3, warmup=0, device=dev)
    peak = (torch.cuda.max_memory_allocated() if dev.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return dict(split=split, k=k, vocab=vocab, tokens=4 * (tokens - 1), n=G.shape[0],
                device=dev, ms=round(t.best * 1e3, 1), peak_MiB=round(peak / 2**20, 1),
                head=G.loss_head, norm=float(t.result.norm()))


def main() -> None:
    ap = harness.parser(__doc__, "device")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per sequence (4 sequences)")
    ap.add_argument("--ks", default="1,8")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    with harness.Records("bench_lm_head", args, tag=args.device.split(":")[0]) as out:
        for k in (int(x) for x in args.ks.split(",")):
            for split in (False, True):
                spec = dict(split=split, k=k, vocab=args.vocab, tokens=args.tokens,
                            device=args.device)
                row, err = harness.run_child(__file__, spec)
                if row is None:
                    lines = err.strip().splitlines()
                    row = dict(split=split, k=k, error=lines[-1] if lines else "no output")
                out.emit(row)


if __name__ == "__main__":
    main()
