"""Command line: ``hessfast info`` and ``hessfast demo`` (also ``python -m hessfast ...``)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

from .errors import ConfigurationError

__all__ = ["demo", "info", "main"]


def info() -> dict[str, Any]:
    """Versions, native module status, CUDA/Triton availability and the backend of each op."""
    import numpy
    import torch

    from . import __version__

    out: dict[str, Any] = {
        "hessfast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "torch_cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name()
    try:
        from . import _native

        out["native_loaded"] = _native.available()
        out["native_error"] = _native.IMPORT_ERROR
        out["native_cuda_compiled"] = _native.cuda_compiled()
        out["native_build"] = _native.build_info()
    except Exception as exc:  # noqa: BLE001 - info must report, never fail
        out["native_loaded"] = False
        out["native_error"] = f"{type(exc).__name__}: {exc}"
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        out["triton"] = None
        out["triton_error"] = f"{type(exc).__name__}: {exc}"
    try:
        from . import ops

        out["ops"] = ops.backend_report()
    except Exception as exc:  # noqa: BLE001
        out["ops"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        from .kernels import ce_curvature

        out["ce_curvature"] = ce_curvature.backend_report()
    except Exception as exc:  # noqa: BLE001
        out["ce_curvature"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _print_info(data: dict[str, Any]) -> None:
    width = max(len(k) for k in data)
    for key, value in data.items():
        if key == "ops" and isinstance(value, dict):
            print("ops:")
            for op, detail in value.items():
                print(f"  {op}: {json.dumps(detail, default=str)}")
        elif isinstance(value, dict):
            print(f"{key:<{width}}  {json.dumps(value, default=str)}")
        else:
            print(f"{key:<{width}}  {value}")


def _demo_data(seed: int, device: str) -> tuple[Any, Any]:
    """A synthetic 10-class problem shaped like scikit-learn's digits (1797 x 64), made with
    torch alone so that the demo needs nothing beyond hessfast's own dependencies.

    Each class is a Gaussian blob around a random centre in an 8-dimensional latent space,
    mapped to 64 features by a fixed random tanh layer plus noise; the blobs overlap, so a
    small MLP reaches ~93% accuracy, not 100%, and its Hessian is not degenerate.
    """
    import torch

    n, features, classes, latent = 1797, 64, 10, 8
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    centres = torch.randn(classes, latent, generator=gen)
    z = centres[y] + torch.randn(n, latent, generator=gen)
    mix = torch.randn(latent, features, generator=gen) / latent**0.5
    X = torch.tanh(z @ mix) + 0.1 * torch.randn(n, features, generator=gen)
    return X.to(device), y.to(device)


def _check_demo_args(seed: int, steps: int, tol: float, device: str) -> None:
    """The demo's arguments, each refused with a ConfigurationError naming it."""
    import torch


    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigurationError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigurationError(
            f"steps (training steps) must be a non-negative integer, got {steps!r}"
        )
    if not (isinstance(tol, (int, float)) and 0.0 < tol < 1.0):
        raise ConfigurationError(f"tol must be a number in (0, 1), got {tol!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigurationError(
            f"device {device!r} is not a torch device name (cpu, cuda, cuda:1): {exc}"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if dev.index is not None and dev.index >= count or count == 0:
            raise ConfigurationError(
                f"device {device!r} is not available here ({count} CUDA device(s) visible, "
                f"torch {torch.__version__}); run the demo with --device cpu"
            )
    elif dev.type != "cpu":
        raise ConfigurationError(f"the demo runs on cpu or cuda, got device {device!r}")


def demo(
    *, seed: int = 0, steps: int = 300, tol: float = 1e-4, device: str = "cpu"
) -> dict[str, Any]:
    """Train a small tanh MLP on a synthetic 10-class data set and measure its lambda_max.

    Returns a dict with the figures (also printed by the CLI): lambda_max, its residual,
    products, data passes and seconds, and 2 / lambda_max.
    """
    import torch
    from torch import nn

    from . import hessian
    from .power import power_iteration
    from .spectrum import eigsh

    _check_demo_args(seed, steps, tol, device)
    X, y = _demo_data(seed, device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)
        ).to(device)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (256,), generator=gen).to(device)
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        acc = (model(X).argmax(1) == y).float().mean().item()
        loss = loss_fn(model(X), y).item()
    batches = [(X[i : i + 512], y[i : i + 512]) for i in range(0, X.shape[0], 512)]
    t0 = time.perf_counter()
    H = hessian(model, loss_fn, batches)
    build_s = time.perf_counter() - t0
    r = power_iteration(H, which="LA", tol=tol, seed=seed)
    power_passes = H.num_passes
    lz = eigsh(H, k=1, which="LA", tol=tol, seed=seed, block_size=1)
    return {
        "model": "MLP 64-32-32-10 (tanh), synthetic 10-class data (1797 x 64)",
        "num_params": H.shape[0],
        "num_samples": H.num_samples,
        "num_batches": H.num_batches,
        "train_seconds": round(train_s, 3),
        "train_loss": round(loss, 4),
        "train_accuracy": round(acc, 4),
        "method": "power iteration (which='LA')",
        "lambda_max": r.eigenvalue,
        "residual": r.residual,
        "relative_residual": r.residual / abs(r.eigenvalue) if r.eigenvalue else float("inf"),
        "converged": r.converged,
        "num_matvecs": r.num_matvecs,
        "data_passes": power_passes,
        "hvp_mode": H.hvp_mode,
        "operator_build_seconds": round(build_s, 3),
        "lambda_max_seconds": round(r.seconds, 3),
        "stable_lr_bound": 2.0 / r.eigenvalue if r.eigenvalue > 0 else float("inf"),
        "lanczos_lambda_max": float(lz.eigenvalues[0]),
        "lanczos_num_matvecs": lz.num_matvecs,
        "lanczos_seconds": round(lz.seconds, 3),
        "lanczos_converged": bool(lz.converged.all()),
        "device": device,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hessfast`` command."""
    parser = argparse.ArgumentParser(prog="hessfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, native kernels, backends")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_demo = sub.add_parser("demo", help="lambda_max of an MLP trained on synthetic data")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--steps", type=int, default=300, help="training steps")
    p_demo.add_argument("--tol", type=float, default=1e-4, help="relative residual tolerance")
    p_demo.add_argument("--device", default="cpu")
    p_demo.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)

    if args.command == "info":
        data = info()
        print(json.dumps(data, indent=2, default=str)) if args.json else _print_info(data)
        return 0
    if args.command == "demo":
        try:
            res = demo(seed=args.seed, steps=args.steps, tol=args.tol, device=args.device)
        except ConfigurationError as exc:
            p_demo.error(str(exc))  # usage + message, exit status 2, no traceback
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            print(f"{res['model']}: {res['num_params']} parameters, {res['num_samples']} "
                  f"samples in {res['num_batches']} batches")
            print(f"trained {args.steps} steps in {res['train_seconds']} s: loss "
                  f"{res['train_loss']}, accuracy {res['train_accuracy']}")
            print(f"lambda_max = {res['lambda_max']:.6g}  (relative residual "
                  f"{res['relative_residual']:.2g}, converged={res['converged']})")
            print(f"  {res['num_matvecs']} Hessian-vector products, {res['data_passes']} data "
                  f"passes, {res['lambda_max_seconds']} s (+{res['operator_build_seconds']} s "
                  f"operator set-up and pre-flight), path {res['hvp_mode']}, {res['device']}")
            print(f"  stable gradient-descent learning rate < 2/lambda_max = "
                  f"{res['stable_lr_bound']:.4g}")
            print(f"block Lanczos (hf.eigsh): lambda_max = {res['lanczos_lambda_max']:.6g} in "
                  f"{res['lanczos_num_matvecs']} products, {res['lanczos_seconds']} s")
        return 0 if res["converged"] and res["lanczos_converged"] else 1
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
