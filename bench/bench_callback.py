"""What ``hessfast.integrations.HessianCallback`` adds to a transformers ``Trainer`` run.

A small GPT-2 (built from a config: 2 layers, 2 heads, width 64, vocabulary 256, dropout
0.1) trains with AdamW on random token sequences (32 tokens, batches of 8) for ``--steps``
optimizer steps, through ``Trainer.train()``, once without the callback and once with
``HessianCallback(every=E, k=1)`` for each ``E`` of ``--every``. Each run trains a fresh
model from the same seed; the runs alternate (without, with E1, with E2, ..., without again)
and the run without the callback is the median of its repeats. Reported per case: the wall
time of ``train()``, the slowdown (with / without), the measurements made, their seconds and
products (``TrackPoint.num_matvecs``: the plain top-1 eigsh and, for AdamW, the
preconditioned one), and whether the trained weights equal those of the run without the
callback bitwise (they must).

    python bench/bench_callback.py [--steps 200] [--every 10,100] [--repeats 2] [--quick]
                                   [--out FILE] [--save]

One JSON line per case (flags, records and results files: bench/_harness.py). Timings are
valid only on an otherwise idle machine.
"""

from __future__ import annotations

import os
import tempfile
import time

import _harness as harness


def _train(steps: int, every: int | None, seed: int) -> dict:
    import torch

    transformers = harness.import_transformers()
    from hessfast.integrations import HessianCallback

    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=256,
                                  n_positions=32, resid_pdrop=0.1, embd_pdrop=0.1,
                                  attn_pdrop=0.1)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 256, (1024, 32), generator=g)

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ids)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": ids[i], "labels": ids[i]}

    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3,
            report_to=[], save_strategy="no", logging_steps=10, use_cpu=True, seed=seed,
            dataloader_num_workers=0, disable_tqdm=True)
        cbs = [] if every is None else [HessianCallback(every=every, k=1)]
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                       callbacks=cbs)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "state": {k: v.clone() for k, v in model.state_dict().items()},
           "n": sum(p.numel() for p in model.parameters())}
    if cbs:
        h = cbs[0].history
        out.update(points=len(h), point_seconds=[p.seconds for p in h],
                   matvecs=[p.num_matvecs for p in h],
                   lambda_max=[p.lambda_max for p in h])
    return out


def main() -> None:
    ap = harness.parser(__doc__, "quick", "repeats", "threads", repeats=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", default="10,100")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HESSFAST_PROGRESS", "0")
    steps = 20 if args.quick else args.steps
    everies = [2] if args.quick else [int(e) for e in args.every.split(",")]
    out = harness.Records("bench_callback", args)
    _train(min(steps, 10), None, 1)  # warm-up: torch's and transformers' first-call costs
    base, cases = [], {e: [] for e in everies}
    for _ in range(args.repeats):
        base.append(_train(steps, None, 0))
        for e in everies:
            cases[e].append(_train(steps, e, 0))
    base_s = sorted(r["seconds"] for r in base)[len(base) // 2]
    ref = base[0]["state"]
    out.emit({"case": "without", "steps": steps, "n": base[0]["n"],
              "seconds": [r["seconds"] for r in base], "median_s": base_s,
              "threads": torch.get_num_threads()})
    for e, runs in cases.items():
        med = sorted(r["seconds"] for r in runs)[len(runs) // 2]
        r = runs[0]
        out.emit({
            "case": f"every={e}", "steps": steps, "n": r["n"],
            "seconds": [x["seconds"] for x in runs], "median_s": med,
            "slowdown": med / base_s, "points": r["points"],
            "point_seconds_median": sorted(r["point_seconds"])[len(r["point_seconds"]) // 2],
            "matvecs": r["matvecs"], "lambda_max": r["lambda_max"],
            "weights_bitwise_equal": all(
                all(torch.equal(x["state"][k], ref[k]) for k in ref) for x in runs),
        })
    out.close()


if __name__ == "__main__":
    main()
