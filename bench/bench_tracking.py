"""The cost of tracking (issue 19, item 5): ``SharpnessTracker`` at ``every = 1``, in products
per point and in fixed time per point beyond its products. One JSON line per record:

* ``products`` (per case and phase): along ``--steps`` SGD steps, each step's tracker point
  (k = 1, tol 1e-3, block 1: the CPU default) against two eigsh runs at the same parameters
  and tolerance: a cold start (random vector) and the start the tracker used before issue 19
  (the previous point's vector, ``prev_products``). Correctness first: every point's
  ``lambda_max`` must agree within the tolerance with a reference (the top of ``eigsh(k=3,
  block 3, tol 1e-6)``: ``correct``); ``cold_misses`` counts the cold k = 1 runs that missed
  it (a random start nearly orthogonal to the top eigenvector). Phases:
  ``transient`` starts at the initialisation (the loss falls fast, the top eigenvector turns
  by a relative residual of 1-2e-2 per step), ``steady`` after ``--pre`` steps of training.
  ``steady_products`` is the mean over the phase's points after the first two (the first is
  cold, the second has one vector to start from); the target is <= 3.
* ``overhead`` (per case): the fixed cost of a repeated measurement. ``point_s``: one tracker
  point at fixed parameters (``tracker.step()`` called again without a training step: a warm
  start from the converged vector: ``point_products``, 2 at k = 1); ``product_s``: one product
  ``H.matmat(V [1, n])`` of a built operator; ``fixed_s = point_s - point_products x
  product_s`` (target <= 5 ms on the digits MLP). ``old_point_s`` / ``old_fixed_s``: the same
  measurement as the tracker made it before issue 19 (``hf.hessian`` with its pre-flight,
  then eigsh from the same vector), in the same process. ``run_fixed_s``: the median of
  ``seconds - num_matvecs x product_s`` over the steady phase's warm points.

Cases: ``mlp``, the digits MLP of bench/RESULTS.md's peer comparison (tanh 64-32-10 on all 1797
standardised scikit-learn digits, one batch, n = 2410, SGD lr 0.1); ``cnn``, a small CNN on
512 digits (8x8: conv 1->8 3x3, tanh, max-pool 2, conv 8->16 3x3, tanh, linear 256->10;
n = 3818, SGD lr 0.5). float32, seeds fixed. ``--quick``: 256 samples, 4 steps, 20 steps of
pre-training, 3 repeats (a smoke run, not figures).

    python bench/bench_tracking.py [--cases mlp,cnn] [--steps 30] [--pre 300] [--repeats 20]
                                   [--threads N] [--quick] [--out FILE] [--save]

Products are counted (load-independent); times use :func:`hessfast.testing.timeit` (median),
so run it alone on a quiet machine. Flags, records and results files: bench/_harness.py.
"""

from __future__ import annotations

import statistics
import warnings

import _harness as harness
import torch
from torch import nn

import hessfast as hf
from hessfast.testing import timeit

TOL = 1e-3


def _case(name: str, samples: int | None) -> tuple[nn.Module, nn.Module, tuple, float]:
    """(model, loss_fn, data, lr) from fixed seeds."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    if name == "mlp":
        n = samples or len(d.target)
        x = torch.tensor(d.data[:n], dtype=torch.float32)
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        return model, nn.CrossEntropyLoss(), (x, torch.tensor(d.target[:n])), 0.1
    if name == "cnn":
        n = samples or 512
        x = torch.tensor(d.data[:n], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(256, 10))
        return model, nn.CrossEntropyLoss(), (x, torch.tensor(d.target[:n])), 0.5
    raise SystemExit(f"unknown case {name!r}: mlp or cnn")


def _train(model: nn.Module, loss_fn: nn.Module, data: tuple, opt: torch.optim.Optimizer
           ) -> torch.Tensor:
    opt.zero_grad()
    loss = loss_fn(model(data[0]), data[1])
    loss.backward()
    opt.step()
    return loss.detach()


def _phase(name: str, phase: str, steps: int, pre: int, samples: int | None
           ) -> tuple[dict, tuple]:
    model, loss_fn, data, lr = _case(name, samples)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(pre if phase == "steady" else 0):
        _train(model, loss_fn, data, opt)
    tracker = hf.SharpnessTracker(model, loss_fn, data, optimizer=opt, tol=TOL, block_size=1)
    cold, prev, prev_vec, worst, cold_misses = [], [], None, 0.0, 0
    for t in range(steps):
        loss = _train(model, loss_fn, data, opt)
        point = tracker.step(loss)
        H = hf.hessian(model, loss_fn, data)
        c = hf.eigsh(H, 1, tol=TOL, block_size=1, seed=t)
        p = hf.eigsh(H, 1, tol=TOL, block_size=1, seed=t, v0=prev_vec)
        # the reference: top 3 in a block of 3 to 1e-6, from its own seeds (a k = 1 cold start
        # can miss lambda_max when its random vector barely meets the top eigenvector: seen
        # once here, an overlap of 1e-5 converging to the second eigenvalue)
        ref = float(hf.eigsh(H, 3, tol=1e-6, block_size=3, seed=10_000 + t).eigenvalues[0])
        prev_vec = p.eigenvectors
        cold.append(c.num_matvecs)
        prev.append(p.num_matvecs)
        cold_misses += abs(float(c.eigenvalues[0]) - ref) > 2 * TOL * abs(ref)
        worst = max(worst, abs(point.lambda_max - ref) / abs(ref))
    mv = [p.num_matvecs for p in tracker.history]
    after = mv[2:] or mv
    return dict(
        bench="products", case=name, phase=phase, n=_n(model),
        steps=steps, pre=pre if phase == "steady" else 0, tol=TOL, products=mv,
        cold_products=cold, prev_products=prev,
        steady_products=round(statistics.mean(after), 3), max_products=max(after),
        cold_mean=round(statistics.mean(cold[2:] or cold), 3),
        prev_mean=round(statistics.mean(prev[2:] or prev), 3),
        warm_over_cold=round(sum(after) / sum(cold[2:] or cold), 3),
        correct=worst <= 2 * TOL, worst_rel_diff=worst, cold_misses=int(cold_misses),
        run_seconds=[round(p.seconds, 6) for p in tracker.history],
    ), (model, loss_fn, data, opt, tracker)


def _n(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _overhead(name: str, state: tuple, repeats: int, run_seconds: list[float],
              run_products: list[int]) -> dict:
    model, loss_fn, data, _, tracker = state
    H = hf.hessian(model, loss_fn, data)
    V = torch.randn(1, H.shape[0], generator=torch.Generator().manual_seed(0))
    prod = timeit(lambda: H.matmat(V), repeats=repeats, warmup=3).median
    point = timeit(tracker.step, repeats=repeats, warmup=2)
    # the timed points only (the warm-up's first one still extrapolates a step of training)
    timed = [p.num_matvecs for p in tracker.history[-repeats:]]
    v = hf.eigsh(hf.hessian(model, loss_fn, data), 1, tol=1e-6, block_size=1).eigenvectors
    old = timeit(lambda: hf.eigsh(hf.hessian(model, loss_fn, data), 1, tol=TOL, v0=v,
                                  block_size=1), repeats=repeats, warmup=2)
    k = statistics.mean(timed)
    run = [s - m * prod for s, m in zip(run_seconds[2:], run_products[2:], strict=True)]
    return dict(
        bench="overhead", case=name, n=H.shape[0], product_s=prod, point_s=point.median,
        point_products=sorted(set(timed)), fixed_s=point.median - k * prod,
        old_point_s=old.median, old_products=old.result.num_matvecs,
        old_fixed_s=old.median - old.result.num_matvecs * prod,
        run_fixed_s=statistics.median(run) if run else None, repeats=repeats,
        threads=torch.get_num_threads(),
    )


def main() -> None:
    ap = harness.parser(__doc__, "quick", "repeats", "threads", repeats=20)
    ap.add_argument("--cases", default="mlp,cnn")
    ap.add_argument("--steps", type=int, default=30, help="tracker points per phase")
    ap.add_argument("--pre", type=int, default=300, help="training steps before 'steady'")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    samples, steps, pre, repeats = None, args.steps, args.pre, args.repeats
    if args.quick:
        samples, steps, pre, repeats = 256, 4, 20, 3
    warnings.simplefilter("ignore")  # the records say what matters
    with harness.Records("bench_tracking", args, tag="cpu") as out:
        for name in args.cases.split(","):
            for phase in ("transient", "steady"):
                rec, state = _phase(name, phase, steps, pre, samples)
                out.emit({k: v for k, v in rec.items() if k != "run_seconds"})
            out.emit(_overhead(name, state, repeats, rec["run_seconds"], rec["products"]))


if __name__ == "__main__":
    main()
