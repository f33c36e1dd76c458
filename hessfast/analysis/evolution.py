"""The record of a batch run (``OUT/runs.jsonl``: one JSON line per checkpoint, appended
atomically by every process of :func:`hessfast.analysis.batch.analyze_checkpoints`) and its
figure over training steps (:func:`plot_evolution`): lambda_max against ``2/lr``, the trace
with its standard error, the per-layer lambda_max and the spectral density as a heatmap.
matplotlib is imported inside the drawing functions only."""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: O_APPEND alone
    fcntl = None  # type: ignore[assignment]

from ..density.result import SpectralDensity
from ..errors import ArgumentTypeError, ConfigurationError
from ..results import jsonable, write_atomically
from .plot import new_figure

__all__ = ["RUNS", "append_line", "best_lines", "draw_atomically", "plot_evolution", "read_runs",
           "settings_key"]

RUNS = "runs.jsonl"
#: The heatmap's colors start at this fraction of its largest density.
FLOOR = 1e-6
#: Points of the heatmap's eigenvalue grid.
GRID = 300


def append_line(path: str | os.PathLike, line: dict[str, Any]) -> dict[str, Any]:
    """Append ``line`` to ``path`` as one strict-JSON line: a single ``os.write`` on an
    ``O_APPEND`` descriptor under an exclusive ``fcntl.flock``, so lines of concurrent
    processes never interleave or tear.

    Args:
        path: the ``runs.jsonl`` file (created if missing).
        line: a JSON-safe dict (non-finite floats are written as null).

    Returns:
        ``line`` itself.
    """
    data = (json.dumps(jsonable(line, strict=True), allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(data)
        while view:  # a regular file takes it in one write; a short one goes on under lock
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)  # closing releases the lock
    return line


def read_runs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of a ``runs.jsonl`` (empty when the file does not exist); a line that is not
    a JSON object is skipped with a warning naming it.

    Args:
        path: the file ``OUT/runs.jsonl``, or the folder ``OUT``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RUNS
    if not path.is_file():
        return []
    out, bad = [], []
    for i, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        if isinstance(line, dict):
            out.append(line)
        else:
            bad.append(i)
    if bad:
        warnings.warn(f"{path}: lines {bad[:10]} are not JSON objects and were skipped",
                      RuntimeWarning, stacklevel=2)
    return out


def settings_key(settings: Any) -> str:
    """The canonical text of a line's ``settings`` (lines compare equal by it).

    Args:
        settings: a line's ``settings`` dict.
    """
    return json.dumps(settings, sort_keys=True)


def best_lines(lines: list[dict[str, Any]], settings: Any
               ) -> dict[tuple[Any, Any], dict[str, Any]]:
    """``(path, sha256) -> line`` among the lines of ``settings``: the latest ``"ok"`` line,
    else the latest error line.

    Args:
        lines: the lines of a ``runs.jsonl`` (:func:`read_runs`).
        settings: the settings the lines must have.
    """
    key = settings_key(settings)
    best: dict[tuple[Any, Any], dict[str, Any]] = {}
    for line in lines:
        if settings_key(line.get("settings")) != key:
            continue
        k = (line.get("path"), line.get("sha256"))
        if line.get("status") == "ok" or best.get(k, {}).get("status") != "ok":
            best[k] = line
    return best


def draw_atomically(path: Path, lines: list[dict[str, Any]], lr: float | None, who: str
                    ) -> None:
    """Redraw the figure of the ok ``lines`` at ``path``: written to a temporary file and
    moved into place (``os.replace``), and only when its bytes change, so a call that
    computed nothing changes nothing. No ok line: nothing drawn; no matplotlib: a warning.

    Args:
        path: the figure's file (PNG).
        lines: the ok lines to draw.
        lr: the learning rate for ``2/lr`` (None: the reports').
        who: the caller, named in the warning.
    """
    if not lines:
        return
    try:
        fig = plot_evolution(lines, lr=lr)
    except ImportError as exc:  # matplotlib is optional: the record is written anyway
        warnings.warn(f"{who}: no {path.name}: {exc}", RuntimeWarning, stacklevel=3)
        return
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    if path.is_file() and path.read_bytes() == buf.getvalue():
        return
    write_atomically(path, buf.getvalue(), suffix=".png.tmp")


def plot_evolution(runs: Any, path: str | os.PathLike | None = None, lr: float | None = None,
                   *, dpi: int = 120) -> Any:
    """The curvature over training of a batch run, as a :class:`matplotlib.figure.Figure`:
    (a) lambda_max (and the other top eigenvalues, fainter) with ``2/lr`` when the learning
    rate is known; (b) the trace with a ±stderr band; (c) each parameter group's lambda_max;
    (d) the spectral density as a heatmap (x: step, y: eigenvalue, color: density, log
    scale), each checkpoint's SLQ quadrature broadened by its own ``sigma`` on one grid.

    The x axis is the step when every checkpoint has a step of its own, else the
    checkpoint's place in the order. From a file holding lines of several settings, the
    settings of its last ok line are drawn; of several lines of one checkpoint, the last.

    Args:
        runs: the ``runs.jsonl`` path (or its folder), or a list of its line dicts.
        path: also save the figure there (the suffix picks the format), if given.
        lr: the learning rate for ``2/lr``; None: the reports' ``lr``, if they have one.
        dpi: resolution of the saved file.

    Returns:
        The figure.

    Raises:
        ConfigurationError: no finished checkpoint to draw, or a ``path`` without a suffix.
        ImportError: matplotlib is not installed.
    """
    recs = _records(runs)
    if path is not None and not Path(path).suffix:
        raise ConfigurationError(f"plot_evolution: {str(path)!r} has no suffix; name the file "
                                 "e.g. 'evolution.png' (the suffix picks the format)")
    reps = [r["report"] for r in recs]
    steps = [r.get("step") for r in recs]
    # the heatmap's columns need distinct positions: two files of one step take their order
    stepped = None not in steps and len(set(steps)) == len(steps)
    x = [float(r["step"]) if stepped else float(i) for i, r in enumerate(recs)]
    xlabel = "training step" if stepped else "checkpoint (in step order)"
    fig = new_figure("plot_evolution", figsize=(12, 8.5))
    (ax, bx), (cx, dx) = fig.subplots(2, 2)
    _lambda_panel(ax, x, reps, lr)
    _trace_panel(bx, x, reps)
    _layer_panel(cx, x, reps)
    _density_panel(fig, dx, x, reps)
    for a in (ax, bx, cx, dx):
        a.set_xlabel(xlabel)
    first = reps[0]
    model = (first.get("operator") or {}).get("model")
    fig.suptitle(f"Curvature over training: {first.get('curvature')}"
                 f"{' of ' + model if model else ''}, {first.get('n', 0):,} parameters, "
                 f"{len(recs)} checkpoint{'s' if len(recs) != 1 else ''}", fontsize=12)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


def _records(runs: Any) -> list[dict[str, Any]]:
    """The ok lines with a report, one per checkpoint, in step order."""
    if isinstance(runs, (str, os.PathLike)):
        lines = read_runs(runs)
        where = str(runs)
    elif isinstance(runs, (list, tuple)) and all(isinstance(r, dict) for r in runs):
        lines, where = list(runs), "the lines given"
    else:
        raise ArgumentTypeError("plot_evolution: runs must be the path of a runs.jsonl or a "
                                f"list of its line dicts, got {type(runs).__name__}")
    ok = [r for r in lines if r.get("status") == "ok" and isinstance(r.get("report"), dict)]
    if not ok:
        raise ConfigurationError(f"plot_evolution: no finished checkpoint (an 'ok' line with "
                                 f"a report) in {where}; run hessfast.analyze_checkpoints "
                                 "first")
    key = settings_key(ok[-1].get("settings"))
    last = {(r.get("path"), r.get("sha256")): r for r in ok
            if settings_key(r.get("settings")) == key}
    return sorted(last.values(), key=lambda r: (r.get("step") is None, r.get("step") or 0,
                                                str(r.get("path"))))


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _lambda_panel(ax: Any, x: list[float], reps: list[dict[str, Any]], lr: float | None
                  ) -> None:
    k = max(len(r.get("top_eigenvalues") or []) for r in reps)
    for j in range(1, k):
        ax.plot(x, [_num((r.get("top_eigenvalues") or [])[j])
                    if j < len(r.get("top_eigenvalues") or []) else math.nan for r in reps],
                color="C3", lw=0.8, alpha=0.35, label="other top eigenvalues" if j == 1 else None)
    ax.plot(x, [_num(r.get("lambda_max")) for r in reps], "o-", color="C3", lw=1.6, ms=4,
            label="λ_max")
    lr = lr if lr is not None else next((r["lr"] for r in reps if r.get("lr")), None)
    if lr:
        # 2/lr in the operator's units: the optimizer sees lr_curvature_scale x its eigenvalues
        scale = _num(reps[-1].get("lr_curvature_scale"))
        scale = scale if math.isfinite(scale) and scale > 0 else 1.0
        two = "2/lr" if scale == 1 else f"2/({scale:g} lr)"
        ax.axhline(2.0 / (lr * scale), color="C2", ls="-.", lw=1.4,
                   label=f"{two} = {2.0 / (lr * scale):.4g} (lr = {lr:g})")
    ax.set_ylabel("eigenvalue (loss / parameter²)", fontsize=9)
    ax.set_title("(a) Sharpness λ_max", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _trace_panel(ax: Any, x: list[float], reps: list[dict[str, Any]]) -> None:
    tr = torch.tensor([_num(r.get("trace")) for r in reps], dtype=torch.float64)
    err = torch.tensor([_num(r.get("trace_stderr")) for r in reps], dtype=torch.float64)
    err = torch.nan_to_num(err, nan=0.0)
    ax.plot(x, tr.tolist(), "o-", color="C0", lw=1.6, ms=4, label="trace")
    ax.fill_between(x, (tr - err).tolist(), (tr + err).tolist(), color="C0", alpha=0.2,
                    label="± stderr")
    ax.set_ylabel("tr(H)", fontsize=9)
    ax.set_title("(b) Trace", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _layer_panel(ax: Any, x: list[float], reps: list[dict[str, Any]]) -> None:
    names: list[str] = []
    for r in reps:
        for g in r.get("per_layer") or []:
            if g.get("name") not in names:
                names.append(g.get("name"))
    ax.set_title("(c) λ_max per parameter group", fontsize=10)
    if not names:
        ax.text(0.5, 0.5, "no per-layer results\n(analyzed with per_layer=False)",
                ha="center", va="center", transform=ax.transAxes, color="0.4")
        return
    values = []
    for j, name in enumerate(names):
        y = [next((_num(g.get("lambda_max")) for g in r.get("per_layer") or []
                   if g.get("name") == name), math.nan) for r in reps]
        values += [v for v in y if math.isfinite(v)]
        ax.plot(x, y, "o-", ms=3, lw=1.2, color=f"C{j % 10}", label=_short(str(name)))
    if values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_ylabel("λ_max of the block", fontsize=9)
    ax.legend(fontsize=7, ncol=2 if len(names) > 6 else 1)
    ax.grid(alpha=0.3)


def _density_panel(fig: Any, ax: Any, x: list[float], reps: list[dict[str, Any]]) -> None:
    from matplotlib.colors import LogNorm

    dens, sig = [], []
    for r in reps:
        d = r.get("density") or {}
        dens.append(SpectralDensity.from_dict({k: v for k, v in d.items() if k != "sigma"}))
        sig.append(float(d.get("sigma") or dens[-1].default_sigma))
    pairs = list(zip(dens, sig, strict=True))
    lo = min(d.bounds[0] - 3 * s for d, s in pairs)
    hi = max(d.bounds[1] + 3 * s for d, s in pairs)
    grid = torch.linspace(lo, hi, GRID, dtype=torch.float64)
    z = torch.stack([d.density(grid, s) for d, s in pairs], dim=1)  # [GRID, m]
    top = float(z.max()) if z.numel() and float(z.max()) > 0 else 1.0
    z = z.clamp_min(top * FLOOR)
    mesh = ax.pcolormesh(x, grid.tolist(), z.tolist(), shading="nearest", cmap="magma",
                         norm=LogNorm(vmin=top * FLOOR, vmax=top))
    ax.plot(x, [_num(r.get("lambda_max")) for r in reps], "o", color="c", ms=3,
            label="λ_max")
    fig.colorbar(mesh, ax=ax, label="spectral density (log scale)")
    ax.set_ylabel("eigenvalue λ", fontsize=9)
    ax.set_title("(d) Spectral density", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]
