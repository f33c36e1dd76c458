"""Result types shared by hessfast's algorithms: the :class:`Status` every result carries, the
one result contract (:class:`JsonResult`) and the records of the stochastic estimators
(:class:`TraceResult`, :class:`DiagonalResult`).

Every result has ``num_matvecs`` (vectors multiplied by the operator), ``num_passes``
(``matmat`` calls: passes over the data for a model operator), ``status`` (a :class:`Status`),
``to_dict(*, vectors=False)`` and ``to_json(path=None, *, indent=None, vectors=False)`` (one
writer, :func:`write_json`), a short ``repr`` (numbers, and tensors by their shape) and
``summary()``. Most also have ``converged`` (a ``bool``; :class:`~hessfast.EigshResult` has
one per pair, a ``[k]`` bool tensor). :class:`~hessfast.SpectralDensity` lives with its methods
in :mod:`hessfast.density`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import tempfile
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch

from ._checks import check_level
from .errors import ArgumentTypeError

__all__ = [
    "DiagonalResult",
    "JsonResult",
    "Status",
    "TraceResult",
    "check_vectors",
    "jsonable",
    "short",
    "t_value",
    "write_atomically",
    "write_json",
    "z_value",
]


class Status(str, Enum):
    """How a computation ended. A ``str`` subclass: ``status == "CONVERGED"`` holds, and
    ``str(status)`` / f-strings give the bare name.

    - ``CONVERGED``: the stopping test was met (eigsh: every wanted pair; ``trace`` with
      ``rtol``/``atol``: the confidence interval reached the width asked for). Nothing else.
    - ``FIXED_BUDGET``: a run without a stopping test finished as asked (``trace`` and
      ``diagonal`` with a fixed budget of probes; ``spectral_density`` with a fixed number of
      Lanczos steps or Chebyshev moments). It says nothing about accuracy: read the error
      bars (``stderr``, ``confidence_interval``). ``converged`` is ``True`` (nothing failed).
      Up to 0.1.0 these runs reported ``CONVERGED``.
    - ``EXACT``: the answer was computed exactly, not estimated (``trace``/``diagonal`` from
      the n unit vectors once the budget covers n).
    - ``MAX_MATVECS``: ``max_matvecs`` was spent before the stopping test was met; the
      partial result is returned with a warning.
    - ``INVARIANT_SUBSPACE``: the Krylov space was exhausted before the wanted pairs (eigsh).
    - ``NONFINITE``: a product contained NaN or Inf (eigsh's partial result).
    - ``OUT_OF_BOUNDS``: KPM's Chebyshev vectors kept growing after the spectral bounds were
      widened: part of the spectrum lies outside them (is the operator symmetric?), so the
      moments are unreliable.
    """

    CONVERGED = "CONVERGED"
    FIXED_BUDGET = "FIXED_BUDGET"
    EXACT = "EXACT"
    MAX_MATVECS = "MAX_MATVECS"
    INVARIANT_SUBSPACE = "INVARIANT_SUBSPACE"
    NONFINITE = "NONFINITE"
    OUT_OF_BOUNDS = "OUT_OF_BOUNDS"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def jsonable(obj: Any, *, strict: bool = False) -> Any:
    """``obj`` as plain JSON types: tensors and numpy arrays -> (nested) lists, enums (a
    :class:`Status`) -> their value, tuples -> lists, dict keys -> str, dataclasses -> dicts
    of their fields, dtypes/devices/paths -> str; bools, ints, floats (inf/nan stay floats:
    ``json`` writes them as ``Infinity``/``NaN``; ``strict=True`` makes them None, for strict
    JSON readers), strs and None as they are.

    Raises:
        ArgumentTypeError: an object of another type (named).
    """
    if isinstance(obj, Enum):  # first: a Status is also a str
        return jsonable(obj.value, strict=strict)
    if isinstance(obj, float) and strict and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().tolist()
        return jsonable(obj, strict=True) if strict else obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v, strict=strict) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, strict=strict) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name), strict=strict)
                for f in dataclasses.fields(obj)}
    if isinstance(obj, (torch.dtype, torch.device, os.PathLike)):
        return str(obj)
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return jsonable(tolist(), strict=strict)
    raise ArgumentTypeError(
        f"jsonable: cannot convert {type(obj).__name__} to JSON; convert it to a tensor, a "
        "number, a str, a list or a dict first"
    )


class JsonResult:
    """The one result contract: ``to_dict`` / ``to_json`` (the one JSON writer), a short
    ``repr`` and a readable :meth:`summary`, for every result of hessfast.

    Every result also has ``num_matvecs``, ``num_passes`` and ``status`` (fields or
    properties). A result is a dataclass declared with ``repr=False`` (so this ``repr``
    applies) and built by keyword. Class settings, overridden where a record needs them:

    * ``_VECTOR_FIELDS``: the fields of size n (eigenvectors, a diagonal) that ``to_dict``
      and ``to_json`` leave out (as None) unless ``vectors=True``: ``k`` eigenvectors of a
      model with a million parameters are megabytes of JSON that nobody reads.
    * ``_REPR_FIELDS``: the members ``repr`` shows (None: every field), in order.
    * ``_JSON_INDENT``: the layout of ``to_json(indent=None)`` (None: one line; the records
      people read, :class:`~hessfast.analysis.report.Report` and the tracker's, use 1).
    * ``_JSON_STRICT``: refuse NaN/Infinity in the text (records whose ``to_dict`` already
      stores non-finite numbers as None promise strict JSON).

    A record that is not a dataclass overrides :meth:`to_dict` (and ``repr``); ``to_json``
    is never overridden.
    """

    _VECTOR_FIELDS: ClassVar[tuple[str, ...]] = ()
    _REPR_FIELDS: ClassVar[tuple[str, ...] | None] = None
    _JSON_INDENT: ClassVar[int | None] = None
    _JSON_STRICT: ClassVar[bool] = False

    def to_dict(self, *, vectors: bool = False) -> dict[str, Any]:
        """The fields as JSON-safe values (:func:`jsonable`), ``json.dumps`` accepts it, with
        ``"kind"`` (the class name) first.

        Args:
            vectors: include the ``[n]``/``[k, n]`` arrays (``_VECTOR_FIELDS``, e.g.
                ``eigenvectors``); False (the default) stores them as None (a small record
                of the numbers).
        """
        vectors = check_vectors(vectors)
        out: dict[str, Any] = {"kind": type(self).__name__}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name.startswith("_"):
                continue
            v = getattr(self, f.name)
            out[f.name] = None if not vectors and f.name in self._VECTOR_FIELDS else jsonable(v)
        return out

    def to_json(
        self, path: str | os.PathLike | None = None, *, indent: int | None = None,
        vectors: bool = False,
    ) -> str:
        """``self.to_dict(vectors=vectors)`` as JSON text; with ``path``, the text is also
        written to that file (UTF-8, atomically: a temporary file in the same folder renamed
        over it, so a reader never sees half a record). Returns the text (the file holds
        exactly it).

        Args:
            path: a file to write, or None.
            indent: ``json.dumps``'s indent; None: the record's own layout (one line for
                results; 1 for the Report and the tracker's history, which people read).
            vectors: include the ``[n]``/``[k, n]`` arrays (see :meth:`to_dict`).
        """
        return write_json(self.to_dict(vectors=vectors), path,
                          indent=self._JSON_INDENT if indent is None else indent,
                          strict=self._JSON_STRICT)

    def __repr__(self) -> str:
        names = self._REPR_FIELDS
        if names is None:
            names = tuple(f.name for f in dataclasses.fields(self)  # type: ignore[arg-type]
                          if not f.name.startswith("_"))
        parts = [f"{name}={short(getattr(self, name, None))}" for name in names]
        return cap_repr(type(self).__name__, parts)

    def summary(self) -> str:
        """A few readable lines: what ended how, at what cost, and the numbers (tensors by
        shape; ``to_dict(vectors=True)`` has them all)."""
        head = f"{type(self).__name__}: {getattr(self, 'status', '?')}"
        cost = [f"{getattr(self, 'num_matvecs', '?')} products",
                f"{getattr(self, 'num_passes', '?')} data passes"]
        secs = getattr(self, "seconds", None)
        if isinstance(secs, (int, float)):
            cost.append(f"{secs:.3g} s")
        lines = [head + " (" + ", ".join(cost) + ")"]
        skip = {"status", "num_matvecs", "num_passes", "seconds"}
        names = self._REPR_FIELDS or tuple(
            f.name for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if not f.name.startswith("_"))
        for name in names:
            if name not in skip:
                v = getattr(self, name, None)
                shown = v if isinstance(v, str) and len(v) <= 72 else short(v, width=72)
                lines.append(f"  {name}: {shown}")
        return "\n".join(lines)


def check_vectors(vectors: Any) -> bool:
    """``vectors`` of ``to_dict``/``to_json``: True or False (anything else is refused)."""
    if not isinstance(vectors, bool):
        raise ArgumentTypeError(f"to_dict: vectors must be True or False, got {vectors!r}")
    return vectors


def write_json(record: dict[str, Any], path: str | os.PathLike | None = None, *,
               indent: int | None = None, strict: bool = False) -> str:
    """The one JSON writer behind every ``to_json``: ``record`` (JSON-safe, from a
    ``to_dict``) as text, written atomically to ``path`` when given; returns the text.
    ``strict``: NaN/Infinity are refused (ValueError) instead of written as ``NaN``."""
    text = json.dumps(record, indent=indent, allow_nan=not strict, ensure_ascii=False)
    if path is not None:
        write_atomically(path, text.encode("utf-8"), suffix=".json.tmp")
    return text


def write_atomically(path: str | os.PathLike, data: bytes, *, suffix: str = ".tmp") -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder moved into place
    (``os.replace``): a reader sees the old file or the new one, never a part; the temporary
    file is removed if the write fails.

    Args:
        path: the file to write.
        data: its new bytes.
        suffix: the temporary file's suffix.
    """
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=".hessfast-", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def short(value: Any, *, width: int = 40) -> str:
    """One member for a ``repr``/``summary``: numbers compact (``%.6g``), tensors by shape
    (``<tensor [3, 1234]>``, never their values), short lists of numbers as they are, other
    containers by length, long strings cut."""
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return repr(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, torch.Tensor):
        return f"<tensor {list(value.shape)}>"
    if isinstance(value, str):
        return repr(value if len(value) <= width else value[: width - 3] + "...")
    if isinstance(value, (list, tuple)):
        if len(value) <= 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                   for v in value):
            inner = ", ".join(short(v) for v in value)
            return f"[{inner}]" if isinstance(value, list) else f"({inner})"
        return f"<{type(value).__name__} of {len(value)}>"
    if isinstance(value, dict):
        return f"<dict of {len(value)}>"
    return f"<{type(value).__name__}>"


#: A ``repr`` stops adding members beyond this many characters (and says so with ``...``).
REPR_WIDTH = 300


def cap_repr(name: str, parts: list[str]) -> str:
    """``name(part, part, ...)`` cut after :data:`REPR_WIDTH` characters with ``...``."""
    out, size = [], len(name) + 2
    for i, p in enumerate(parts):
        if size + len(p) + 2 > REPR_WIDTH and i:
            out.append("...")
            break
        out.append(p)
        size += len(p) + 2
    return f"{name}({', '.join(out)})"


def z_value(level: float) -> float:
    """Two-sided standard normal quantile: ``P(|N(0,1)| <= z) = level``."""
    return statistics.NormalDist().inv_cdf(0.5 + 0.5 * level)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` by its continued fraction (modified Lentz),
    evaluated on the side of ``x`` where it converges fast (relative error ~1e-14)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = (a * math.log(x) + b * math.log1p(-x)
                 + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f / a


def _t_tail(x: float, dof: float) -> float:
    """``P(|T| > x)`` for Student's t with ``dof`` degrees of freedom, ``x >= 0``."""
    return _betainc(0.5 * dof, 0.5, dof / (dof + x * x))


@functools.lru_cache(maxsize=512)
def t_value(level: float, dof: float | None) -> float:
    """Two-sided Student t quantile: ``P(|T_dof| <= t) = level``; the normal quantile
    (:func:`z_value`) for ``dof=None`` or ``inf``. Bisection on the tail probability
    (stdlib only: scipy is not a dependency)."""
    if dof is None or math.isinf(dof) or dof > 1e7:
        return z_value(level)
    if dof <= 0:
        raise ValueError(f"t_value: dof must be > 0, got {dof!r}")
    alpha = 1.0 - level
    lo, hi = 0.0, max(2.0 * z_value(level), 1.0)
    while _t_tail(hi, dof) > alpha:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_tail(mid, dof) > alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


class _Estimate(JsonResult):
    """What the estimator results share beyond their fields."""

    status: Status

    @property
    def exact(self) -> bool:
        """Computed from the n unit vectors, not estimated (``status == EXACT``)."""
        return self.status is Status.EXACT


@dataclass(frozen=True, repr=False, kw_only=True)
class TraceResult(_Estimate):
    """Result of :func:`hessfast.trace`.

    Attributes:
        value: the trace estimate (float64 arithmetic), unbiased.
        stderr: estimated standard error of ``value``; ``0.0`` when the result is exact
            (the budget covered n), ``inf`` when a single sample leaves it unknown.
            Hutchinson/Hutch++: the sample standard deviation of the (deflated) samples over
            sqrt(count); XTrace: the Efron-Stein jackknife over its probes (conservative, see
            :mod:`hessfast.estimators`).
        num_matvecs: products with A spent by this call (an adaptive run's pilot included).
        num_passes: ``matmat`` calls by this call (passes over the data).
        method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        seed: seed of the private generator that drew the probes.
        converged: ``False`` only when ``max_matvecs`` ran out before the adaptive target
            (``rtol``/``atol``) was met (a warning was issued); ``True`` otherwise.
        status: ``EXACT`` (from the n unit vectors), ``FIXED_BUDGET`` (no ``rtol``/``atol``:
            the budget was spent as asked; the interval says how good the value is),
            ``CONVERGED`` (the adaptive interval reached the width asked for) or
            ``MAX_MATVECS``.
        seconds: wall time.
        num_samples: random probes behind ``value`` and ``stderr`` (Hutchinson samples;
            Hutch++'s deflated samples; XTrace's probes); ``0`` for the exact path. An
            adaptive run reports its last, fresh block only (the pilot sized it).
        dof: degrees of freedom of the Student t quantile of :meth:`confidence_interval`
            (``num_samples - 1``); ``None``: the normal quantile (exact results).
    """

    value: float
    stderr: float
    num_matvecs: int
    num_passes: int
    method: str
    seed: int
    converged: bool
    status: Status
    seconds: float
    num_samples: int = 0
    dof: int | None = None

    @property
    def rel_stderr(self) -> float:
        """``stderr / |value|`` (``inf`` for a zero value with a nonzero stderr, ``0`` when
        exact)."""
        if self.stderr == 0:
            return 0.0
        return self.stderr / abs(self.value) if self.value != 0 else math.inf

    def confidence_interval(self, level: float = 0.95) -> tuple[float, float]:
        """``value -/+ q * stderr`` with ``q`` the two-sided Student t quantile at ``level``
        with :attr:`dof` degrees of freedom (normal without). Measured coverage of the 95%
        interval over a family of spectra, fixed budgets and adaptive stops: >= 93% in every
        cell (``bench/bench_coverage.py``, ``bench/RESULTS.md``)."""
        level = check_level("level", level, who="TraceResult.confidence_interval")
        half = t_value(level, self.dof) * self.stderr if self.stderr > 0 else 0.0
        return (self.value - half, self.value + half)


@dataclass(frozen=True, repr=False, kw_only=True)
class DiagonalResult(_Estimate):
    """Result of :func:`hessfast.diagonal`.

    Attributes:
        values: ``[n]`` estimate of ``diag(A)`` (float64 for float64 operators, else
            float32), on ``A.device``.
        stderr: ``[n]`` per-entry standard error (zeros for the exact path; ``inf`` with a
            single sample). Hutchinson: the sample standard deviation of ``z_j (A z)_j``
            over sqrt(m); XDiag: the Efron-Stein jackknife over its probes (conservative).
        num_matvecs: products with A spent by this call.
        num_passes: ``matmat`` calls by this call.
        method: ``"hutchinson"`` or ``"xdiag"``.
        seed: seed of the private generator.
        converged: always ``True`` (a fixed budget, spent as asked, or the exact path).
        status: ``EXACT`` (from the n unit vectors) or ``FIXED_BUDGET``.
        by_param: for model operators (A has ``unflatten``), ``values`` split into tensors
            of the parameters' shapes keyed by parameter name (views of ``values``);
            ``None`` otherwise.
        seconds: wall time.
    """

    values: torch.Tensor
    stderr: torch.Tensor
    num_matvecs: int
    num_passes: int
    method: str
    seed: int
    converged: bool
    status: Status
    by_param: dict[str, torch.Tensor] | None = None
    seconds: float = 0.0
    dof: int | None = None

    _VECTOR_FIELDS: ClassVar[tuple[str, ...]] = ("values", "stderr", "by_param")

    def confidence_interval(self, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-entry intervals ``(lo [n], hi [n])``: ``values -/+ q * stderr`` with ``q`` the
        two-sided Student t quantile at ``level`` with :attr:`dof` degrees of freedom (normal
        without). Each entry's interval covers its ``A[j, j]`` at ``level`` (measured:
        ``bench/bench_coverage.py``); they are not simultaneous over the n entries."""
        level = check_level("level", level, who="DiagonalResult.confidence_interval")
        half = torch.where(self.stderr > 0, t_value(level, self.dof) * self.stderr, 0.0)
        return (self.values - half, self.values + half)
