"""The figure of a :class:`~hessfast.analysis.report.Report`: (a) the spectral density on a log
axis with the top eigenvalues, lambda_min and ``2 / lr`` marked; (b) lambda_max and the trace
of every parameter group. matplotlib is imported inside the functions only (a
:class:`matplotlib.figure.Figure` outside pyplot: no window, no global figure list), so
``import hessfast`` stays light and works without it."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..density.result import SpectralDensity
from ..errors import ConfigurationError

if TYPE_CHECKING:  # pragma: no cover
    from .report import Report

__all__ = ["new_figure", "plot_density_panel", "plot_layers_panel", "plot_report"]

#: The density's log axis starts at this fraction of its peak.
FLOOR = 1e-6


def new_figure(who: str, **kwargs: Any) -> Any:
    """A :class:`matplotlib.figure.Figure` with an Agg canvas, outside pyplot (no window, no
    global figure to close): what the ``plot()`` methods of hessfast draw on and return.

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{who} needs matplotlib, which is not installed: pip install matplotlib "
            "(the rest of hessfast works without it)"
        ) from exc
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def plot_report(report: Report, path: str | os.PathLike | None = None, *, dpi: int = 150
                ) -> Any:
    """Draw the report's figure and return it (a :class:`matplotlib.figure.Figure`); with
    ``path``, also save it there (format from the suffix: .png, .pdf, .svg). Panel (b) is
    drawn when the report has per-layer results."""
    if path is not None:
        path = Path(path)
        if not path.suffix:
            raise ConfigurationError(
                f"Report.plot: {str(path)!r} has no suffix; name the file e.g. 'report.png' "
                "or 'report.pdf' (the suffix picks the format)"
            )
    if report.density is None:
        raise ConfigurationError(
            "Report.plot: the report has no density to draw; build it with analyze(...)"
        )
    layers = report.per_layer or []
    if layers:
        width = 13 + 0.25 * max(0, len(layers) - 10)
        fig = new_figure("Report.plot", figsize=(min(width, 30), 5.2))
        ax, bx = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[1.5, 1]))
    else:
        fig = new_figure("Report.plot", figsize=(8, 5.2))
        ax, bx = fig.subplots(), None
    plot_density_panel(report, ax)
    if bx is not None:
        plot_layers_panel(report, bx)
    op = report.operator
    what = f"{report.curvature} of {op['model']}" if op.get("model") else report.curvature
    fig.suptitle(f"Curvature of the loss: {what}, {report.n:,} parameters", fontsize=12)
    fig.tight_layout()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


def plot_density_panel(report: Report, ax: Any) -> Any:
    """Panel (a) on ``ax``: log-scale density, Ritz values, top-k, lambda_min, ``2 / lr``."""

    d = SpectralDensity.from_dict({k: v for k, v in report.density.items() if k != "sigma"})
    sigma = report.density.get("sigma") or d.default_sigma
    marks = [v for v in (*report.top_eigenvalues, report.lambda_min) if v is not None]
    lo = min([d.bounds[0], *marks]) - 5 * sigma  # the tails reach the floor (e^-12.5)
    hi = max([d.bounds[1], *marks]) + 5 * sigma
    # 2/lr in the operator's units: the optimizer sees lr_curvature_scale x its eigenvalues
    edge = 2.0 / (report.lr * report.lr_curvature_scale) if report.lr else None
    two = "2/lr" if report.lr_curvature_scale == 1 else f"2/({report.lr_curvature_scale:g} lr)"
    span = hi - lo
    show_edge = edge is not None and lo - span <= edge <= hi + 2 * span
    if show_edge:
        lo, hi = min(lo, edge - 0.03 * span), max(hi, edge + 0.03 * span)
    grid = torch.linspace(lo, hi, 1500, dtype=torch.float64)
    d.plot(ax=ax, grid=grid, log=True, sigma=sigma, floor=FLOOR, color="k", lw=1.4)
    for i, v in enumerate(report.top_eigenvalues):
        ax.axvline(v, color="C3", ls="--", lw=1.0, alpha=0.8,
                   label=f"top-{len(report.top_eigenvalues)} eigenvalues (Lanczos)"
                   if i == 0 else None)
    if report.lambda_min is not None:
        ax.axvline(report.lambda_min, color="C0", ls=":", lw=1.4,
                   label=f"λ_min = {report.lambda_min:.3g}")
    if edge is not None and show_edge:
        ax.axvline(edge, color="C2", ls="-.", lw=1.4,
                   label=f"{two} = {edge:.3g} (gradient descent stable below)")
    elif edge is not None:
        ax.annotate(f"{two} = {edge:.3g} →" if edge > hi else f"← {two} = {edge:.3g}",
                    xy=(0.98 if edge > hi else 0.02, 0.5), xycoords="axes fraction",
                    ha="right" if edge > hi else "left", color="C2", fontsize=9)
    lmax = report.lambda_max
    ax.set_xlim(lo, hi)
    unit = "loss / parameter²"
    ax.set_xlabel(f"eigenvalue λ ({unit})")
    ax.set_ylabel("spectral density (fraction of eigenvalues per unit λ)", fontsize=9)
    title = "(a) Distribution of curvature eigenvalues"
    if lmax is not None:
        title += f": λ_max = {lmax:.4g}"
        if report.stable_lr is not None:
            title += f", stable lr = {report.stable_lr:.3g}"
    ax.set_title(title, fontsize=10)
    bottom, top = ax.get_ylim()  # room above the peak for the legend (log axis)
    ax.set_ylim(bottom, top * (top / bottom) ** 0.3)
    ax.legend(fontsize=8, loc="upper center", framealpha=0.9, ncol=2)
    return ax


def plot_layers_panel(report: Report, ax: Any) -> Any:
    """Panel (b) on ``ax``: lambda_max and trace of each group's diagonal block."""
    layers = report.per_layer or []
    names = [_short(str(g.get("name"))) for g in layers]
    lmax = [_val(g.get("lambda_max")) for g in layers]
    trace = [_val(g.get("trace")) for g in layers]
    x = range(len(layers))
    w = 0.4
    ax.bar([i - w / 2 for i in x], lmax, w, color="C3", label="λ_max of the block")
    err = [abs(_val(g.get("trace_stderr"))) if not g.get("trace_exact") else 0.0
           for g in layers]
    ax.bar([i + w / 2 for i in x], trace, w, color="C0", yerr=err, capsize=2,
           label="trace of the block (± stderr)")
    values = [abs(v) for v in lmax + trace if v != 0 and math.isfinite(v)]
    if any(v < 0 for v in lmax + trace):
        ax.set_yscale("symlog", linthresh=max(values, default=1.0) * 1e-3)
        ax.axhline(0, color="0.3", lw=0.6)
    else:
        ax.set_yscale("log")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_xlabel("parameter group (diagonal block of the operator)")
    ax.set_ylabel("eigenvalue / trace (loss / parameter²)", fontsize=9)
    ax.set_title("(b) Curvature per layer", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="major", alpha=0.3)
    return ax


def _val(v: Any) -> float:
    return float(v) if v is not None else math.nan


def _short(name: str, width: int = 24) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]
