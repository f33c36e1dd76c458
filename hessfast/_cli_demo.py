"""``hessfast demo``: a small CNN trained on scikit-learn's digits in a few seconds, then the
analysis report (:func:`hessfast.analysis.analyze.analyze`) of its Hessian."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from ._cli_load import check_device, check_numbers

__all__ = ["DEMO_MODEL", "demo", "demo_with_training", "digits_batches", "train_demo_model"]

DEMO_MODEL = "CNN conv(1->16) pool conv(16->32) pool linear(128->10), ReLU, on digits (1797 8x8)"


def digits_tensors(device: str = "cpu") -> tuple[Any, Any]:
    """scikit-learn's digits as ``X [1797, 1, 8, 8]`` (float32, standardised over the whole
    set) and ``y [1797]`` (int64)."""
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32)
    X = (X - X.mean()) / X.std()
    return X.reshape(-1, 1, 8, 8).to(device), torch.tensor(d.target).to(device)


def digits_batches(X: Any, y: Any, batch_size: int = 600) -> list[tuple[Any, Any]]:
    """Fixed, unshuffled batches (the operator re-reads them on every pass)."""
    return [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(X), batch_size)]


def demo_cnn(seed: int) -> Any:
    """The demo's CNN (6,090 parameters), initialised from ``seed`` without touching the global
    RNG."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(1, 16, 3, padding=1)), ("relu1", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2)),  # 16 x 4 x 4
            ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("relu2", nn.ReLU()),
            ("pool2", nn.MaxPool2d(2)),  # 32 x 2 x 2
            ("flatten", nn.Flatten()), ("fc", nn.Linear(128, 10)),
        ]))


def train_demo_model(
    *,
    seed: int = 0,
    steps: int = 200,
    device: str = "cpu",
    batch_size: int = 64,
    analysis_samples: int = 512,
) -> tuple[Any, list[tuple[Any, Any]], dict[str, Any]]:
    """Trains the demo CNN with Adam for ``steps`` minibatch steps of ``batch_size`` drawn from
    all 1797 images. Returns the model, the batches to analyze (the first
    ``analysis_samples`` images, one batch: the Hessian of the mean loss over them, which keeps
    the demo's products cheap) and the training figures."""
    import torch
    from torch import nn

    X, y = digits_tensors(device)
    model = demo_cnn(seed).to(device)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (batch_size,), generator=gen).to(device)
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        out = model(X)
        figures = {
            "model": DEMO_MODEL,
            "num_params": sum(p.numel() for p in model.parameters()),
            "train_steps": steps,
            "train_seconds": round(train_s, 3),
            "train_loss": round(loss_fn(out, y).item(), 4),
            "train_accuracy": round((out.argmax(1) == y).float().mean().item(), 4),
        }
    figures["analysis_samples"] = min(analysis_samples, len(X))
    return model, digits_batches(X[:analysis_samples], y[:analysis_samples], 512), figures


def demo_with_training(
    *,
    seed: int = 0,
    steps: int = 200,
    tol: float = 1e-3,
    device: str = "cpu",
    k: int = 5,
    probes: int = 4,
    lanczos_steps: int = 24,
    progress: bool | None = None,
) -> tuple[Any, dict[str, Any]]:
    """:func:`demo`, also returning the training figures (model, parameters, steps, seconds,
    loss, accuracy)."""
    from torch import nn

    from ._cli_load import UsageError
    from .analysis.analyze import analyze
    from .errors import ConfigurationError

    try:
        check_numbers(seed=seed, steps=steps, tol=tol, k=k, probes=probes,
                      slq_steps=lanczos_steps)
        check_device(device)
    except UsageError as exc:
        raise ConfigurationError(str(exc)) from None
    model, batches, figures = train_demo_model(seed=seed, steps=steps, device=device)
    report = analyze(model, nn.CrossEntropyLoss(), batches, curvature="hessian", k=k,
                     num_probes=probes, num_steps=lanczos_steps, tol=tol, seed=seed,
                     progress=progress)
    return report, figures


def demo(
    *,
    seed: int = 0,
    steps: int = 200,
    tol: float = 1e-3,
    device: str = "cpu",
    k: int = 5,
    probes: int = 4,
    lanczos_steps: int = 24,
    progress: bool | None = None,
) -> Any:
    """Trains the demo CNN on digits (Adam, ``steps`` minibatch steps) and returns the
    :class:`~hessfast.analysis.report.Report` of its Hessian: lambda_max, top-k, trace,
    spectral density, condition and per-layer results.

    Raises :class:`~hessfast.errors.ConfigurationError` naming a bad argument.
    """
    report, _ = demo_with_training(seed=seed, steps=steps, tol=tol, device=device, k=k,
                                   probes=probes, lanczos_steps=lanczos_steps,
                                   progress=progress)
    return report
