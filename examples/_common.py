"""Shared by the examples: scikit-learn's digits as tensors and the examples' argument parser.
(Imported by the example scripts from their own folder: ``python examples/<name>.py``.)"""

from __future__ import annotations

import argparse
import os

import torch


def digits(n: int | None = None, *, images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` (default all 1797) digits: ``X`` standardised float32, ``[n, 64]`` or
    ``[n, 1, 8, 8]`` with ``images=True``; ``y`` int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32)
    X = (X - X.mean()) / X.std()
    y = torch.tensor(d.target)
    if n is not None:
        X, y = X[:n], y[:n]
    return (X.reshape(-1, 1, 8, 8) if images else X), y


def parser(description: str, out_default: str) -> argparse.ArgumentParser:
    """``--quick`` (a smaller run, for the tests) and ``--out DIR``."""
    os.environ.setdefault("MPLBACKEND", "Agg")  # the figures are files, no window
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
    p.add_argument("--out", default=out_default, help=f"output folder (default {out_default})")
    return p


def write_report(report, out: str) -> None:
    """Print the report's summary, write ``out/report.json`` and ``out/spectrum.png``."""
    from pathlib import Path

    print(report.summary())
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    report.to_json(folder / "report.json")
    report.plot(folder / "spectrum.png")
    print(f"wrote {folder / 'report.json'} and {folder / 'spectrum.png'}")
