"""``hf.analyze_checkpoints`` over a training run: warm against cold top-k starts, and workers.

The demo's CNN (6,090 parameters, ``hessfast._cli_demo``) trains with Adam (lr 3e-3,
minibatches of 64 of scikit-learn's digits) for ``--steps`` steps, a checkpoint saved every
``--save-every`` steps (step 0 included). The run's checkpoints are then analyzed on the first
512 images (one batch: the demo's analysis) with ``k=5``, 4 probes x 32 Lanczos steps,
``tol=1e-3``, per-layer spectra off:

* ``warm``: one worker, each checkpoint's top-k started from the previous checkpoint's
  eigenvectors (``analyze(v0=)``, the default);
* ``cold``: one worker, ``warm_start=False``;
* ``workers=2``: two spawned processes, warm starts within each (``--workers-case``).

Reported per case: the top-k products per checkpoint and in all, the lambda_max per
checkpoint, the wall time of the call; the warm case also gives the ratio of its top-k
products to the cold case's, and the largest relative difference of its lambda_max from the
cold one (both must meet ``tol``).

    python bench/bench_batch.py [--steps 400] [--save-every 40] [--workers-case] [--quick]
                                [--out FILE] [--save]

One JSON line per case (flags, records and results files: bench/_harness.py). Products are
counts and hold on a busy machine; the wall times only on an idle one.
"""

from __future__ import annotations

import os
import tempfile
import time

import _harness as harness


def make_model():
    """The demo CNN, untrained (each checkpoint's weights are loaded into it)."""
    from hessfast._cli_demo import demo_cnn

    return demo_cnn(0)


def batches():
    """The demo's analysis batch: the first 512 digits."""
    from hessfast._cli_demo import digits_batches, digits_tensors

    X, y = digits_tensors()
    return digits_batches(X[:512], y[:512], 512)


def _train(folder: str, steps: int, every: int) -> list[str]:
    import torch
    from torch import nn

    from hessfast._cli_demo import digits_tensors

    X, y = digits_tensors()
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    paths = []
    for step in range(steps + 1):
        if step % every == 0:
            paths.append(os.path.join(folder, f"ckpt_{step:06d}.pt"))
            torch.save({"step": step, "model": model.state_dict()}, paths[-1])
        if step == steps:
            break
        idx = torch.randint(0, X.shape[0], (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    return paths


def main() -> None:
    ap = harness.parser(__doc__, "quick")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--save-every", type=int, default=40)
    ap.add_argument("--workers-case", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HESSFAST_PROGRESS", "0")
    import torch

    import hessfast as hf

    steps, every = (40, 20) if args.quick else (args.steps, args.save_every)
    kw = dict(k=5, num_probes=4, num_steps=32, tol=1e-3, per_layer=False, seed=0)
    out = harness.Records("bench_batch", args)
    loss = torch.nn.CrossEntropyLoss()
    with tempfile.TemporaryDirectory() as tmp:
        paths = _train(tmp, steps, every)
        cases = [("warm", 1, True), ("cold", 1, False)]
        if args.workers_case:
            cases.append(("workers=2", 2, True))
        got = {}
        for name, workers, warm in cases:
            t0 = time.perf_counter()
            lines = hf.analyze_checkpoints(make_model, loss, batches(), paths,
                                           out=os.path.join(tmp, name), workers=workers,
                                           warm_start=warm, progress=False, **kw)
            seconds = time.perf_counter() - t0
            assert all(ln["status"] == "ok" for ln in lines), [ln.get("error") for ln in lines]
            got[name] = lines
            rec = {"case": name, "checkpoints": len(lines), "steps": [ln["step"] for ln in lines],
                   "top_k_matvecs": [ln["top_k_matvecs"] for ln in lines],
                   "top_k_matvecs_total": sum(ln["top_k_matvecs"] for ln in lines),
                   "warm": [ln["warm"] for ln in lines],
                   "lambda_max": [ln["lambda_max"] for ln in lines], "seconds": seconds,
                   "threads": torch.get_num_threads(), **kw}
            if name != "cold" and "cold" in got:
                cold = got["cold"]
                rec["matvecs_vs_cold"] = rec["top_k_matvecs_total"] / sum(
                    ln["top_k_matvecs"] for ln in cold)
                rec["lambda_max_rel_diff_vs_cold"] = max(
                    abs(a["lambda_max"] - b["lambda_max"]) / abs(b["lambda_max"])
                    for a, b in zip(lines, cold, strict=True))
            out.emit(rec)
        if "cold" in got:  # the warm case ran first: its comparison, once cold is known
            w, c = got["warm"], got["cold"]
            out.emit({"case": "warm_vs_cold",
                      "matvecs_ratio": sum(ln["top_k_matvecs"] for ln in w)
                      / sum(ln["top_k_matvecs"] for ln in c),
                      "per_checkpoint_ratio": [a["top_k_matvecs"] / b["top_k_matvecs"]
                                               for a, b in zip(w, c, strict=True)],
                      "lambda_max_rel_diff": max(
                          abs(a["lambda_max"] - b["lambda_max"]) / abs(b["lambda_max"])
                          for a, b in zip(w, c, strict=True))})
    out.close()


if __name__ == "__main__":
    main()
