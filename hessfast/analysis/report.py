"""The :class:`Report` of :func:`hessfast.analysis.analyze.analyze`: JSON-safe numbers, where each
came from, a readable table (:meth:`Report.summary`) and a figure (:meth:`Report.plot`)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ArgumentTypeError, ConfigurationError
from ..results import JsonResult, Status, check_vectors
from ..results import jsonable as _jsonable
from .plot import plot_report  # plot reads Report only for type checking: no import circle

__all__ = ["REL_STDERR_FLAG", "Report", "jsonable"]

#: An estimate whose standard error exceeds this fraction of its magnitude is flagged in the
#: summary ("(!) rel. stderr 60%") and listed in :attr:`Report.uncertain`.
REL_STDERR_FLAG = 0.10


def jsonable(x: Any) -> Any:
    """``x`` as strict JSON (non-finite floats as None): :func:`hessfast.results.jsonable`
    with ``strict=True``."""
    return _jsonable(x, strict=True)


@dataclass(repr=False, kw_only=True)
class Report(JsonResult):
    """The curvature of one model at one point, from :func:`analyze`.

    Every field is JSON-safe (float, int, str, bool, list, dict or None; non-finite values are
    stored as None), so ``json.dumps(report.to_dict())`` works and
    ``Report.from_json(report.to_json()) == report``. ``to_json`` is every result's
    (:class:`~hessfast.results.JsonResult`), strict JSON with an indent of 1 by default.
    ``num_matvecs``, ``num_passes`` (sums over ``parts``) and ``status`` are properties.

    Attributes:
        curvature: ``"Hessian"``, ``"GGN"`` or ``"operator"`` (a plain LinearOperator).
        n: number of parameters (the operator is ``[n, n]``).
        operator: description: model class, samples, batches, dtype, device, hvp_mode,
            loss_head, loss_form, parameter tensors (what the operator carries).
        lambda_max, lambda_max_residual: the largest eigenvalue and its residual
            ``||H v - λ v||``.
        top_eigenvalues, top_residuals: ``[k]`` largest eigenvalues (descending) and residuals.
        top_converged: every top pair met ``tol``.
        lambda_min, lambda_min_residual, lambda_min_converged: the smallest eigenvalue.
        trace, trace_stderr: ``tr(H)`` and its standard error (0 when exact).
        condition: ``lambda_max / lambda_min`` when the operator is positive definite beyond
            the residuals and the zero threshold, else None (see ``condition_note``).
        definiteness: ``"positive definite"``, ``"positive semi-definite (singular to
            tolerance)"``, ``"indefinite"`` or ``"negative semi-definite"``.
        condition_note: how ``definiteness`` was decided, in words.
        zero_threshold: ``tol * max(|lambda_max|, |lambda_min|)``: eigenvalues within it of 0
            count as zero.
        negative_mass: fraction of the spectrum below ``-zero_threshold`` (SLQ weights).
        stable_lr: ``2 / (lr_curvature_scale * lambda_max)``: the largest step size at which
            gradient descent on the quadratic model of the loss the optimizer differentiates
            does not diverge along the top eigenvector (None if lambda_max <= 0).
        effective_rank, effective_rank_definition: ``tr|H| / max|λ|`` (SLQ estimate of
            ``tr|H|``; equals ``tr(H) / lambda_max`` for a PSD operator).
        density: :meth:`hessfast.SpectralDensity.to_dict` of the SLQ run (re-plot with
            ``SpectralDensity.from_dict``), plus ``sigma`` (the smoothing width used).
        per_layer: ``BlockSpectra.to_dict()["groups"]`` (one dict per parameter group with
            name, size, lambda_max, lambda_max_residual, converged, trace, trace_stderr), or
            None.
        parts: one dict per part: name, quantities, num_matvecs, num_passes, seconds, source
            (where its numbers came from, in words). (Reports of 0.1 said ``data_passes``;
            :meth:`from_dict` renames it.)
        settings: the arguments of :func:`analyze` (k, num_probes, num_steps, tol, seed,
            groups, ...).
        lr: the training learning rate, if given (the plot marks ``2 / lr``).
        lr_curvature_scale, lr_curvature_scale_reason: the curvature the optimizer sees over
            the operator's (the eigenvalues are the MEAN loss's; a sum-reduced loss's optimizer
            sees N or batch-size times it, :func:`hessfast.condition.lr_curvature_scale`),
            used by ``stable_lr`` and the ``lr`` comparison, and how it was decided.
        residual_floor: the smallest residual the working precision can show (``64 eps
            ||H||_est``); reported residuals are never below it.
        uncertain: ``{quantity: relative stderr}`` for every estimate whose standard error
            exceeds ``REL_STDERR_FLAG`` (10%) of its magnitude: ``"trace"`` and
            ``"per_layer.<group>.trace"``; computed from the fields (not an argument to fill).
        unresolved: ``{quantity: why}`` for the quantities the run's settings cannot resolve
            whatever the probes: ``density``, ``effective_rank`` and ``negative_mass`` from an
            SLQ density of fewer than :data:`hessfast.density.result.MIN_STEPS` Lanczos steps
            per probe (the summary marks them ``(!)`` and names the fix).
        hessfast_version, created: provenance (ISO time, UTC).
        provenance: where the numbers came from, so that two reports can be told apart:
            ``hessfast``/``torch`` versions, ``curvature``, ``loss`` (the loss's class or
            function name and reduction), ``model`` (class), ``params`` (the selection:
            ``"all"`` or its tensor names, with ``num_params``), ``data`` (samples and
            batches); the command line adds ``command``, ``model_spec``, ``data_spec``,
            ``loss_spec`` and ``checkpoint`` (``path``, ``sha256``, ``stripped_prefixes``: the
            DDP/compile wrapper prefixes removed from its keys), a batch run
            (:func:`hessfast.analyze_checkpoints`) the checkpoint and its ``step``.
        top_eigenvectors: the ``[k, n]`` top eigenvectors of the run (a tensor; None for a
            report read back from JSON): a warm start for the next call's ``v0``. Not part of
            the JSON record and not compared by ``==``.
    """

    curvature: str
    n: int
    operator: dict[str, Any] = field(default_factory=dict)
    lambda_max: float | None = None
    lambda_max_residual: float | None = None
    top_eigenvalues: list[float] = field(default_factory=list)
    top_residuals: list[float] = field(default_factory=list)
    top_converged: bool = False
    lambda_min: float | None = None
    lambda_min_residual: float | None = None
    lambda_min_converged: bool = False
    trace: float | None = None
    trace_stderr: float | None = None
    condition: float | None = None
    definiteness: str = "unknown"
    condition_note: str = ""
    zero_threshold: float | None = None
    negative_mass: float | None = None
    stable_lr: float | None = None
    effective_rank: float | None = None
    effective_rank_definition: str = ""
    density: dict[str, Any] | None = None
    per_layer: list[dict[str, Any]] | None = None
    parts: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    lr_curvature_scale: float = 1.0
    lr_curvature_scale_reason: str = ""
    residual_floor: float | None = None
    hessfast_version: str = ""
    created: str = ""
    uncertain: dict[str, float | None] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    unresolved: dict[str, str] = field(default_factory=dict)
    top_eigenvectors: Any = field(default=None, compare=False)

    _REPR_FIELDS: ClassVar[tuple[str, ...]] = (
        "curvature", "n", "lambda_max", "lambda_min", "trace", "definiteness", "status",
        "num_matvecs", "num_passes")
    _JSON_INDENT: ClassVar[int | None] = 1  # a record people read
    _JSON_STRICT: ClassVar[bool] = True  # non-finite values are stored as None

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "top_eigenvectors":  # a tensor, kept out of the record
                setattr(self, f.name, jsonable(getattr(self, f.name)))
        # a report of 0.1 counted each part's data passes as "data_passes"
        self.parts = [{("num_passes" if key == "data_passes" else key): v for key, v in p.items()}
                      if isinstance(p, dict) else p for p in self.parts]
        flags: dict[str, float | None] = {}
        rel = _rel(self.trace, self.trace_stderr)
        if rel is not None and not rel <= REL_STDERR_FLAG:
            flags["trace"] = rel
        for g in self.per_layer or []:
            rel = _rel(g.get("trace"), g.get("trace_stderr"))
            if rel is not None and not rel <= REL_STDERR_FLAG:
                flags[f"per_layer.{g.get('name')}.trace"] = rel
        self.uncertain = jsonable(flags)

    # -- the result contract ------------------------------------------------------------------
    @property
    def num_matvecs(self) -> int:
        """Products of all parts (the operator's pre-flight included)."""
        return int(sum(p.get("num_matvecs") or 0 for p in self.parts))

    @property
    def num_passes(self) -> int:
        """``matmat`` calls (data passes) of all parts."""
        return int(sum(p.get("num_passes") or 0 for p in self.parts))

    @property
    def status(self) -> Status:
        """``CONVERGED`` when the top-k pairs and lambda_min met ``tol``, else
        ``MAX_MATVECS`` (a budget ran out first, or lambda_min stopped early on a singular
        operator: the ``lambda_min`` part says which)."""
        ok = self.top_converged and self.lambda_min_converged
        return Status.CONVERGED if ok else Status.MAX_MATVECS

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self, *, vectors: bool = False) -> dict[str, Any]:
        """``"kind"`` and all fields as a JSON-safe dict (a deep copy). ``vectors``: the
        result interface's flag (a report holds no ``[n]`` arrays)."""
        check_vectors(vectors)
        vecs, self.top_eigenvectors = self.top_eigenvectors, None  # asdict deep-copies
        try:
            d = asdict(self)
        finally:
            self.top_eigenvectors = vecs
        del d["top_eigenvectors"]
        return {"kind": type(self).__name__, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        """Inverse of :meth:`to_dict`. Raises ConfigurationError on missing or unknown keys."""
        if not isinstance(d, dict):
            raise ArgumentTypeError(
                f"Report.from_dict: expected a dict from Report.to_dict(), got {type(d).__name__}"
            )
        d = {key: v for key, v in d.items() if key != "kind"}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        missing = sorted(k for k in ("curvature", "n") if k not in d)
        if unknown or missing:
            raise ConfigurationError(
                f"Report.from_dict: unknown keys {unknown}, missing keys {missing}; pass the "
                "dict of Report.to_dict() (or the file of Report.to_json(path)) from the same "
                "hessfast version"
            )
        return cls(**d)

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> Report:
        """Read a report from JSON text or from a file path (as :meth:`to_json` writes it)."""
        if isinstance(source, os.PathLike) or (
            isinstance(source, str) and not source.lstrip().startswith("{")
        ):
            path = Path(source)
            if not path.is_file():
                raise ConfigurationError(
                    f"Report.from_json: {str(source)[:80]!r} is neither JSON text nor an "
                    "existing file; pass report.to_json() or the path it was written to"
                )
            source = path.read_text(encoding="utf-8")
        if not isinstance(source, str):
            raise ArgumentTypeError(
                f"Report.from_json: expected JSON text or a path, got {type(source).__name__}"
            )
        try:
            d = json.loads(source)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"Report.from_json: not valid JSON ({exc})") from exc
        return cls.from_dict(d)

    # -- reading ------------------------------------------------------------------------------
    def part(self, name: str) -> dict[str, Any]:
        """The entry of ``parts`` called ``name`` (KeyError naming the parts if absent)."""
        for p in self.parts:
            if p.get("name") == name:
                return p
        raise KeyError(f"no part {name!r}; parts: {[p.get('name') for p in self.parts]}")

    def summary(self) -> str:
        """A readable table: the numbers, their uncertainty and where each came from; the
        per-layer table; the cost of each part. Lines are at most 100 characters: a long
        cell (a part's source, a long top-k list, a parameter group's name) and a long note
        continue on the next lines (``parts`` in the JSON keep each source as one string)."""
        op = self.operator
        head = f"hessfast report: {self.curvature} of {op.get('model', 'an operator')}"
        desc = [f"n = {self.n:,} parameters"]
        if op.get("num_samples") is not None:
            desc.append(f"{op['num_samples']:,} samples in {op.get('num_batches')} batch(es)")
        desc += [str(op[k]) for k in ("dtype", "device") if op.get(k)]
        if op.get("hvp_mode"):
            desc.append(f"products: {op['hvp_mode']}")
        lines = [*_wrap(head, ""), *_wrap(", ".join(desc)), ""]
        src = {q: p["name"] for p in self.parts for q in p.get("quantities", [])}
        rows: list[tuple[str, str, str, str]] = []

        def add(label: str, value: str, err: str, key: str) -> None:
            rows.append((label, value, err, src.get(key, "")))

        add("lambda_max", _f(self.lambda_max), _res(self.lambda_max_residual), "lambda_max")
        k = len(self.top_eigenvalues)
        add(f"top-{k} eigenvalues", ", ".join(_f(v, 4) for v in self.top_eigenvalues),
            "max " + _res(max(self.top_residuals, default=None)), "top_eigenvalues")
        add("lambda_min", _f(self.lambda_min), _res(self.lambda_min_residual), "lambda_min")
        add("trace", _f(self.trace), _pm(self.trace_stderr) + _flag(self.uncertain, "trace"),
            "trace")
        add("definiteness", self.definiteness, "", "definiteness")
        add("condition number", "inf (not PD)" if self.condition is None else _f(self.condition),
            "", "condition")
        add("negative mass", "n/a" if self.negative_mass is None
            else f"{100 * self.negative_mass:.3g} %", _unres(self.unresolved, "negative_mass"),
            "negative_mass")
        s = self.lr_curvature_scale
        sl = "" if s == 1 else f"{s:g} "
        add(f"stable lr 2/({sl}lambda_max)" if sl else "stable lr 2/lambda_max",
            _f(self.stable_lr), "", "stable_lr")
        if self.lr is not None:
            edge = 2.0 / self.lr
            add("lr (given); 2/lr", f"{self.lr:.4g}; {edge:.4g}",
                f"{sl}lambda_max " + ("<" if s * (self.lambda_max or 0) < edge else ">=")
                + " 2/lr", "")
        add("effective rank", _f(self.effective_rank), _unres(self.unresolved, "effective_rank"),
            "effective_rank")
        lines += _table(("quantity", "value", "± stderr / residual", "from part"), rows,
                        wrap=(1, 2))
        if self.effective_rank_definition:
            lines += _wrap(f"effective rank = {self.effective_rank_definition}")
        if self.condition_note:
            lines += _wrap(f"definiteness: {self.condition_note}")
        if self.lr_curvature_scale_reason:
            lines += _wrap(f"learning rates: {self.lr_curvature_scale_reason}")
        if self.per_layer:
            lines += ["", "per layer (diagonal blocks):"]
            lines += _table(("group", "size", "lambda_max", "residual", "trace", "± stderr"), [
                (str(g.get("name")), f"{g.get('size', 0):,}", _f(g.get("lambda_max")),
                 _res(g.get("lambda_max_residual")), _f(g.get("trace")),
                 "exact" if g.get("trace_exact") else _pm(g.get("trace_stderr"))
                 + _flag(self.uncertain, f"per_layer.{g.get('name')}.trace"))
                for g in self.per_layer
            ], wrap=(0, 5))
        if self.unresolved:
            lines += _wrap("(!) unresolved: " + "; ".join(sorted(set(self.unresolved.values()))))
        if self.uncertain:
            lines += _wrap(f"(!) relative stderr above {REL_STDERR_FLAG:.0%}: a rough estimate; "
                           "raise the probes (analyze's num_probes=) for a tighter one")
        lines += ["", "cost:"]
        tot = [sum(p.get(c) or 0 for p in self.parts) for c in ("num_matvecs", "num_passes")]
        secs = sum(p.get("seconds") or 0.0 for p in self.parts)
        prow = [(p["name"], f"{p.get('num_matvecs', 0):,}", f"{p.get('num_passes', 0):,}",
                 f"{p.get('seconds') or 0.0:.2f}", p.get("source", "")) for p in self.parts]
        prow.append(("total", f"{tot[0]:,}", f"{tot[1]:,}", f"{secs:.2f}", ""))
        lines += _table(("part", "products", "data passes", "seconds", "source"), prow,
                        wrap=(0, 4))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def plot(self, path: str | os.PathLike | None = None, *, dpi: int = 150) -> Any:
        """The figure (density with the eigenvalues marked, per-layer bars) as a
        :class:`matplotlib.figure.Figure`, as every ``plot()`` of hessfast returns; with
        ``path``, also saved there (PNG, PDF or SVG by the suffix). See
        :func:`hessfast.analysis.plot.plot_report`. Needs matplotlib."""
        return plot_report(self, path, dpi=dpi)


def _f(x: float | None, digits: int = 6) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}g}"


def _rel(value: float | None, stderr: float | None) -> float | None:
    """``stderr / |value|`` (``inf`` for 0 with a positive stderr; None where either is
    unknown: a non-finite stderr was stored as None)."""
    if value is None or stderr is None or stderr == 0:
        return None
    return stderr / abs(value) if value != 0 else float("inf")


def _unres(unresolved: dict[str, str], key: str) -> str:
    """``(!) unresolved`` when ``key`` is one of the report's unresolved quantities."""
    return "(!) unresolved" if key in unresolved else ""


def _flag(uncertain: dict[str, float | None], key: str) -> str:
    """The summary's mark of a flagged estimate ("" when ``key`` is not flagged; a relative
    stderr stored as None is infinite: a zero estimate with a positive stderr)."""
    if key not in uncertain:
        return ""
    rel = uncertain[key]
    return "  (!) rel. stderr " + ("inf" if rel is None else f"{100 * rel:.0f}%")


def _res(x: float | None) -> str:
    return "n/a" if x is None else f"res {x:.2g}"


def _pm(x: float | None) -> str:
    if x is None:
        return "n/a"
    return "exact" if x == 0 else f"± {x:.3g}"


#: The summary's line width: a terminal's, whatever the length of a part's source.
_WIDTH = 100
#: A wrapped column is never narrowed below this (nor below its header).
_MIN_COLUMN = 12


def _wrap(text: str, indent: str = "  ") -> list[str]:
    """``text`` as lines of at most ``_WIDTH`` characters, the first indented by ``indent``,
    the next ones two spaces further."""
    import textwrap  # the summary's only use

    return textwrap.wrap(text, _WIDTH, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_on_hyphens=False) or [indent.rstrip()]


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]],
           wrap: tuple[int, ...] = ()) -> list[str]:
    """Left-aligned columns in at most ``_WIDTH`` characters: the columns ``wrap`` (indices)
    are narrowed, the widest first, and their long cells continue on the next lines of the
    row (the other columns are never cut; a table they alone overflow stays wider)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    floors = {i: max(_MIN_COLUMN, len(header[i])) for i in wrap}
    excess = 2 + sum(widths) + 2 * (len(widths) - 1) - _WIDTH
    while excess > 0:
        narrowable = [i for i in wrap if widths[i] > floors[i]]
        if not narrowable:
            break
        i = max(narrowable, key=lambda j: widths[j])
        cut = min(excess, widths[i] - floors[i])
        widths[i] -= cut
        excess -= cut
    out = []
    for j, r in enumerate([header, *rows]):
        cells = [_cell_lines(c, widths[i]) if i in wrap and len(c) > widths[i] else [c]
                 for i, c in enumerate(r)]
        for h in range(max(len(c) for c in cells)):
            parts = [c[h] if h < len(c) else "" for c in cells]
            out.append("  " + "  ".join(p.ljust(widths[i]) for i, p in enumerate(parts)).rstrip())
        if j == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out


def _cell_lines(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken at spaces; a word longer
    than ``width`` (a parameter name) breaks after a ``.``, ``_`` or ``/`` inside it, and a
    run without one is cut at ``width``."""
    import re  # the summary's only use

    pieces: list[str] = []
    for word in re.findall(r"\S+\s*", text):
        pieces += [word] if len(word.rstrip()) <= width else [
            p for p in re.findall(r"[^._/]*[._/]?\s*", word) if p]
    lines, cur = [], ""
    for piece in pieces:
        if cur and len(cur) + len(piece.rstrip()) > width:
            lines.append(cur.rstrip())
            cur = ""
        cur += piece
        while len(cur.rstrip()) > width:
            lines.append(cur[:width])
            cur = cur[width:]
    if cur.strip():
        lines.append(cur.rstrip())
    return lines or [""]
