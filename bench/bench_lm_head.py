"""``hf.ggn(..., causal_lm=True, lm_head=model.lm_head)`` (the GGN split at the head, its block
chunked over tokens) against the unsplit GGN, on a small-width GPT-2 with a large vocabulary:
time of ``matmat`` with ``[k, n]`` and peak memory, each case in a fresh process (peak RSS on
the CPU, ``torch.cuda.max_memory_allocated`` on CUDA). One JSON line per case.

    python bench/bench_lm_head.py [--device cuda] [--vocab 50257] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASE = r"""
import json, resource, sys, time, warnings
try:
    import torchvision  # noqa: F401
except Exception:
    sys.modules["torchvision"] = None
import torch, transformers
import hessfast as hf
split, k, vocab, tokens, dev = sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), sys.argv[5]
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
G.matmat(V)
sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
if dev.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
best = float("inf")
for _ in range(3):
    sync(); t = time.perf_counter(); out = G.matmat(V); sync()
    best = min(best, time.perf_counter() - t)
peak = (torch.cuda.max_memory_allocated() if dev.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(json.dumps(dict(split=split, k=k, vocab=vocab, tokens=4 * (tokens - 1), n=G.shape[0],
                      device=dev, ms=round(best * 1e3, 1), peak_MiB=round(peak / 2**20, 1),
                      head=G.loss_head, norm=float(out.norm()))))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per sequence (4 sequences)")
    ap.add_argument("--ks", default="1,8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for k in (int(x) for x in args.ks.split(",")):
        for split in (0, 1):
            proc = subprocess.run(
                [sys.executable, "-c", CASE, str(split), str(k), str(args.vocab),
                 str(args.tokens), args.device], capture_output=True, text=True)
            if proc.returncode != 0:
                row = dict(split=bool(split), k=k, error=proc.stderr.strip().splitlines()[-1])
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
