"""Shared by sharpness_sgd.py and sharpness_adam.py: full-batch training of a tanh MLP on
digits (MSE on one-hot targets, which sharpens steadily) while a SharpnessTracker records the
top Hessian eigenvalue and the optimizer's edge-of-stability threshold."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import digits
from torch import nn

import hessfast as hf


def run(make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer], *, steps: int,
        every: int, samples: int, out: str, label: str) -> hf.SharpnessTracker:
    X, y = digits(samples)
    targets = nn.functional.one_hot(y, 10).float()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 10))
    loss_fn = nn.MSELoss()
    opt = make_optimizer(list(model.parameters()))
    batch = [(X, targets)]  # full batch: the edge of stability is a gradient-descent effect
    tracker = hf.SharpnessTracker(model, loss_fn, batch, every=every, k=1, optimizer=opt)
    print(f"{label}: {sum(p.numel() for p in model.parameters())} parameters, {len(X)} "
          f"samples, {steps} full-batch steps, lambda_max every {every}")
    print(f"{'step':>5} {'loss':>9} {'sharpness':>10} {'threshold':>10} {'ratio':>6}  edge")
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(X), targets)
        loss.backward()
        opt.step()
        point = tracker.step()
        if point is not None:
            pre = point.preconditioned_lambda_max
            sharp = point.lambda_max if pre is None else pre
            thr = point.threshold if point.threshold is not None else point.preconditioned_threshold
            print(f"{point.step:>5} {loss.item():>9.5f} {sharp:>10.4g} "
                  f"{thr if thr is not None else float('nan'):>10.4g} "
                  f"{point.ratio if point.ratio is not None else float('nan'):>6.2f}  "
                  f"{'AT EDGE' if point.at_edge else ''}")
    # the measurement after the very first step is left out of the verdict: an adaptive
    # optimizer's second-moment estimate is then a single squared gradient
    settled = [p for p in tracker.history if p.step > 0]
    edge = [p.step for p in settled if p.at_edge]
    kind = "preconditioned sharpness" if tracker.history[0].threshold is None else "lambda_max"
    if edge:
        print(f"edge of stability: {kind} reached 90% of the threshold at step {edge[0]} and "
              f"was there at {len(edge)} of the {len(settled)} measurements after step 0")
    else:
        print(f"edge of stability not reached in {steps} steps (try more steps or a larger lr)")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tracker.to_json(folder / "history.json")
    tracker.plot(folder / "sharpness.png")
    print(f"{time.perf_counter() - t0:.1f} s; wrote {folder / 'history.json'} and "
          f"{folder / 'sharpness.png'}")
    return tracker
