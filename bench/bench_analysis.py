"""The analysis product's costs (issue 11), as counts of products and data passes (and the
demo's wall time), one JSON line per measurement:

* ``blocks``: per-layer lambda_max + trace of a 10-layer MLP by ``hf.block_spectra`` (shared
  passes) against the naive way (one operator per layer, ``hf.lambda_max`` + ``hf.trace``);
* ``warm``: ``SharpnessTracker``'s warm starts against cold ``eigsh`` runs at the same
  tolerance on the same parameters, along an SGD run on scikit-learn's digits (k = 1 and 3);
* ``condition``: ``condition_number`` on a singular GGN (more parameters than outputs x
  samples) and on a positive definite matrix;
* ``demo``: ``hessfast demo``'s wall time in a fresh process (includes ``import``).

    python bench/bench_analysis.py [--only blocks,warm,condition,demo] [--out FILE] [--save]

Flags, records and results files: bench/_harness.py (bench/README.md).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import warnings

import _harness as harness
import torch
from torch import nn

import hessfast as hf
from hessfast.testing import timeit


def _digits(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X[:n], dtype=dtype) / 16.0
    return X, torch.tensor(y[:n])


def bench_blocks() -> list[dict]:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, 12), nn.Tanh()]
    for _ in range(8):
        layers += [nn.Linear(12, 12), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(12, 10))
    X, y = _digits(128, torch.float32)
    data, loss = [(X, y)], nn.CrossEntropyLoss()
    H = hf.hessian(model, loss, data)
    p0, m0 = H.num_passes, H.num_matvecs
    res = hf.block_spectra(H, "modules", tol=1e-3, num_probes=16, seed=0)
    shared = dict(passes=H.num_passes - p0, products=H.num_matvecs - m0)
    naive = dict(passes=0, products=0, operators=0)
    for g in res.groups:
        names = [n for n in H.param_names if n.rsplit(".", 1)[0] == g.name]
        Hg = hf.hessian(model, loss, data, params=names)
        p0, m0 = Hg.num_passes, Hg.num_matvecs
        hf.lambda_max(Hg, tol=1e-3)
        hf.trace(Hg, method="hutchinson", max_matvecs=16, seed=0)
        naive["passes"] += Hg.num_passes - p0
        naive["products"] += Hg.num_matvecs - m0
        naive["operators"] += 1
    return [dict(bench="blocks", groups=len(res.groups), n=H.shape[0], shared=shared,
                 naive=naive)]


def bench_warm(k: int, steps: int = 30, every: int = 1) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    X, y = _digits(128, torch.float32)
    data, loss = [(X, y)], nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = hf.SharpnessTracker(model, loss, data, every=every, k=k, optimizer=opt, tol=1e-3)
    warm, cold = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss(model(X), y).backward()
        opt.step()
        point = tracker.step()
        if point is None or not point.warm:
            continue
        c = hf.eigsh(hf.hessian(model, loss, data), k, tol=1e-3, block_size=1, seed=0)
        warm.append(point.num_matvecs)
        cold.append(c.num_matvecs)
    return dict(bench="warm", k=k, every=every, points=len(warm), warm_products=sum(warm),
                cold_products=sum(cold), ratio=round(sum(warm) / sum(cold), 3))


def bench_condition() -> list[dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10))  # 910 params
    X, y = _digits(30, torch.float32)  # GGN rank <= 30 x 9 = 270 < 910: singular
    G = hf.ggn(model, nn.CrossEntropyLoss(), [(X, y)])
    rows = []
    for psd in (None, False):
        m0 = G.num_matvecs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = hf.condition_number(G, psd=psd)
        rows.append(dict(bench="condition", case=f"singular GGN n={G.shape[0]}, psd={psd}",
                         products=G.num_matvecs - m0, definiteness=str(r.definiteness),
                         singular_early=bool(r.singular_early)))
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64, generator=g))
    M = (Q * torch.logspace(0, 3, 300, dtype=torch.float64)) @ Q.T
    A = hf.LinearOperator.from_matrix(M)
    m0 = A.num_matvecs
    r = hf.condition_number(A)
    rows.append(dict(bench="condition", case="PD matrix n=300, kappa 1e3",
                     products=A.num_matvecs - m0, kappa=float(r.kappa),
                     definiteness=str(r.definiteness)))
    return rows


def bench_demo() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        t = timeit(lambda: subprocess.run([sys.executable, "-m", "hessfast", "demo", "--quiet"],
                                          cwd=tmp, capture_output=True, text=True),
                   repeats=1, warmup=0, device="cpu")
    return [dict(bench="demo", seconds=round(t.seconds, 2), rc=t.result.returncode)]


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--only", default="blocks,warm,condition,demo")
    args = ap.parse_args()
    only = set(args.only.split(","))
    rows: list[dict] = []
    if "blocks" in only:
        rows += bench_blocks()
    if "warm" in only:
        rows += [bench_warm(1), bench_warm(3), bench_warm(1, every=4, steps=60)]
    if "condition" in only:
        rows += bench_condition()
    if "demo" in only:
        rows += bench_demo()
    with harness.Records("bench_analysis", args, tag="cpu") as out:
        for r in rows:
            out.emit(r)


if __name__ == "__main__":
    main()
