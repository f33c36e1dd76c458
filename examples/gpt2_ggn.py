"""The Gauss-Newton (GGN) report of a tiny GPT-2 language model (transformers, built from a
config: nothing is downloaded) trained briefly on structured token sequences: lambda_max, top-k,
trace, spectral density and per-block results of the GGN of the shifted causal-LM loss.

    python examples/gpt2_ggn.py [--quick] [--out DIR]

Writes DIR/report.json and DIR/spectrum.png and prints the summary. Needs ``transformers``.
"""

from __future__ import annotations

import sys
import time

import torch
from _common import parser, write_report

import hessfast as hf


def import_transformers():
    """transformers' GPT-2 classes. A torchvision built for another torch fails at import
    ("operator torchvision::nms does not exist") and takes transformers' model classes down
    with it; transformers treats an absent torchvision as optional, so a broken one is hidden
    from it (None in sys.modules reads as absent)."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - any failure: the package is unusable
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # type: ignore[assignment]
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2Config, GPT2LMHeadModel


def token_batches(num: int, batch: int, seq: int, vocab: int, seed: int) -> list[torch.Tensor]:
    """Learnable sequences: each starts at a random token and counts up by a random stride
    (mod vocab), so the next token is predictable from the previous two."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        start = torch.randint(0, vocab, (batch, 1), generator=gen)
        stride = torch.randint(1, 8, (batch, 1), generator=gen)
        out.append((start + stride * torch.arange(seq)) % vocab)
    return out


def main() -> None:
    args = parser(__doc__.split("\n\n")[0], "gpt2-ggn").parse_args()
    GPT2Config, GPT2LMHeadModel = import_transformers()
    vocab, seq = 256, 32
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=vocab, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    steps = 40 if args.quick else 150
    train = token_batches(steps, 16, seq, vocab, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    model.train()
    for ids in train:
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"GPT-2 (2 layers, 2 heads, width 32, vocab {vocab}), {n_params} parameters: "
          f"{steps} Adam steps in {time.perf_counter() - t0:.1f} s, last loss "
          f"{model(input_ids=train[-1], labels=train[-1]).loss.item():.3f}")
    # dict batches as transformers takes them; causal_lm=True: the logits are shifted against
    # the labels, the GGN is J^T H_CE J of the next-token cross-entropy (tied embeddings
    # counted once)
    batches = [{"input_ids": ids, "labels": ids}
               for ids in token_batches(2 if args.quick else 4, 8, seq, vocab, seed=2)]
    blocks = {"embeddings": r"^transformer\.w[tp]e\.", "layer0": r"^transformer\.h\.0\.",
              "layer1": r"^transformer\.h\.1\.", "final_ln": r"^transformer\.ln_f\."}
    report = hf.analyze(model, None, batches, curvature="ggn", causal_lm=True,
                        k=3 if args.quick else 5, num_probes=2 if args.quick else 4,
                        num_steps=10 if args.quick else 24, groups=blocks)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
