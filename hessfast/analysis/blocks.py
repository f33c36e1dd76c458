"""Per-layer spectra from shared passes: ``lambda_max`` and the trace of the diagonal block
``A_gg`` of every parameter group g of one curvature operator.

Every product is one of the FULL operator with a stack of block-masked rows ``[G, n]`` (row g
zero outside group g's coordinates; output row g restricted to them is ``A_gg v_g``), so one
data pass serves every group (the naive way, one operator per layer, pays passes per layer):

* trace: Rademacher probes of all groups packed into one block ``[G p, n]`` (streamed in
  chunks of at most 256 MB); a group of size ``<= num_probes`` gets its exact block from unit
  vectors instead (``trace_exact``; its lambda_max/lambda_min come from that dense block);
* lambda_max: Lanczos on every ``A_gg`` in lockstep, one ``matmat`` of the stacked Lanczos
  vectors per step, full reorthogonalisation within each group's basis, started from the
  group's first normalised probe (so the trace pass is also its first step). A group stops
  when its top Ritz residual ``|beta_j s_j|`` (Lanczos relation, floored at ``64 eps
  max|Ritz|``) is ``<= max(tol * max(|theta|, 1e-3 max|Ritz|), that floor)``, when its
  Krylov space is the whole block, or at ``max_steps``.

Data passes: ``ceil(trace rows / chunk)`` + longest Lanczos run - 1, independent of the number
of groups while ``G p n`` entries fit one chunk. Bases: ``steps x size`` entries per group.

Groups: ``"modules"`` (one per module directly owning selected parameters, named by its path;
root-level parameters form ``"(root)"``), ``{name: regex}`` or ``[regex, ...]`` (named by the
regex; ``re.search`` on parameter names), or for any operator explicit flat coordinates
(``{name: [indices]}`` or a list of them, named ``"group<i>"``). Groups may overlap (each is
its own block); parameters in no group are not reported; a regex matching nothing raises
ConfigurationError.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from .._checks import (
    STREAM_BYTES,
    Products,
    as_operator,
    check_int,
    check_positive,
    check_seed,
    probe_generator,
    probe_key,
    sample_probes,
    work_dtype,
)
from ..errors import ArgumentTypeError, ConfigurationError
from ..lanczos.verify import residual_floor

__all__ = ["BlockResult", "BlockSpectra", "block_spectra", "param_groups"]

WHO = "block_spectra"
#: Most bytes of one stacked block of masked vectors (and of its products).
BLOCK_BYTES = STREAM_BYTES
#: Floor of the convergence scale, relative to the largest Ritz magnitude (see the docstring).
_FLOOR = 1e-3


@dataclass
class BlockResult:
    """One group's diagonal block ``A_gg`` (``size x size``).

    ``lambda_max`` is the largest Ritz value, ``lambda_max_residual`` its residual
    ``||A_gg v - theta v||`` from the Lanczos relation (from the dense block when
    ``trace_exact``); ``converged`` says whether the stopping rule was met. ``lambda_min``
    is the smallest Ritz value of the same Krylov space with its residual (not watched by the
    stopping rule: trust it only as far as its residual says). ``trace`` is exact
    (``trace_stderr == 0``) when ``trace_exact``, else the mean of ``num_probes`` Hutchinson
    samples with its standard error. ``steps``: Lanczos vectors (0 for exact groups).
    ``residual_floor``: ``64 eps max|Ritz|`` (:func:`hessfast.lanczos.verify.residual_floor`):
    both residuals are reported as at least this, and the stopping rule never asks for less.
    """

    name: str
    size: int
    lambda_max: float
    lambda_max_residual: float
    converged: bool
    trace: float
    trace_stderr: float
    trace_exact: bool = False
    lambda_min: float = math.nan
    lambda_min_residual: float = math.nan
    steps: int = 0
    residual_floor: float = 0.0


@dataclass
class BlockSpectra:
    """Result of :func:`block_spectra`: one :class:`BlockResult` per group, in group order,
    and the cost of the whole run (``num_matvecs`` vectors, ``data_passes`` ``matmat`` calls,
    ``seconds`` wall time)."""

    groups: list[BlockResult]
    num_matvecs: int
    data_passes: int
    seconds: float
    tol: float = 1e-3
    num_probes: int = 16
    seed: int = 0

    def __getitem__(self, name: str) -> BlockResult:
        """The result of the group called ``name``."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group {name!r}; groups: {[g.name for g in self.groups]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain floats, ints, bools, strings and lists (``json.dumps`` accepts it)."""
        return asdict(self)

    def to_json(
        self, path: str | os.PathLike | None = None, *, indent: int | None = None
    ) -> str:
        """:meth:`to_dict` as JSON text; with ``path``, also written to that file (UTF-8),
        like every other result's ``to_json``. Returns the JSON text."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockSpectra:
        """Inverse of :meth:`to_dict` (keys it does not know are ignored)."""
        names = {f.name for f in fields(BlockResult)}
        top = {f.name for f in fields(cls)} - {"groups"}
        try:
            groups = [BlockResult(**{k: v for k, v in g.items() if k in names})
                      for g in d["groups"]]
            rest = {k: v for k, v in d.items() if k in top}
            return cls(groups=groups, **rest)
        except (KeyError, TypeError) as exc:
            raise ConfigurationError(
                f"BlockSpectra.from_dict: not a BlockSpectra dict ({exc}); pass what "
                "BlockSpectra.to_dict() returned"
            ) from None


def _is_index_list(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dim() == 1 and not x.is_floating_point() and not x.is_complex()
    return isinstance(x, (list, tuple, range)) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in x
    )


def _param_names(A: Any) -> list[str]:
    names = getattr(A, "param_names", None)
    if names is None or getattr(A, "param_shapes", None) is None:
        raise ArgumentTypeError(
            f"{WHO}: groups by module or regex need a curvature operator (hf.hessian / hf.ggn: "
            f"param_names, param_shapes); {type(A).__name__} has none. Pass groups as explicit "
            "flat-coordinate lists ({name: [indices]}) for a generic operator"
        )
    return list(names)


def param_groups(A: Any, groups: Any = "modules") -> list[tuple[str, list[int]]]:
    """The parameter groups of a curvature operator: ``(name, indices into A.param_names)``.

    Args:
        A: a curvature operator (``param_names``, ``param_shapes``).
        groups: ``"modules"``, ``{name: regex}`` or ``[regex, ...]`` (``re.search`` on the
            parameter names; a list's groups are named by their regex).

    Raises:
        ArgumentTypeError: ``A`` has no parameter names, or ``groups`` is of another kind.
        ConfigurationError: a regex matches nothing or is invalid, duplicate or empty groups.
    """
    names = _param_names(A)
    if isinstance(groups, str):
        if groups != "modules":
            raise ConfigurationError(
                f"{WHO}: groups={groups!r} is not a grouping; pass 'modules', a dict "
                "{name: regex} or a list of regexes (to match one regex, pass [regex])"
            )
        order: dict[str, list[int]] = {}
        for i, pname in enumerate(names):
            module = pname.rpartition(".")[0] or "(root)"
            order.setdefault(module, []).append(i)
        return list(order.items())
    if isinstance(groups, dict):
        items = list(groups.items())
    elif isinstance(groups, (list, tuple)):
        items = [(g, g) for g in groups]
    else:
        raise ArgumentTypeError(
            f"{WHO}: groups must be 'modules', a dict {{name: regex}} or a list of regexes, "
            f"got {type(groups).__name__}"
        )
    if not items:
        raise ConfigurationError(f"{WHO}: groups is empty; name at least one group")
    out, seen = [], set()
    for gname, pattern in items:
        if not isinstance(gname, str) or not isinstance(pattern, str):
            raise ArgumentTypeError(
                f"{WHO}: group {gname!r}: expected a str name and a str regex, got "
                f"{type(gname).__name__} -> {type(pattern).__name__}"
            )
        if gname in seen:
            raise ConfigurationError(f"{WHO}: group {gname!r} appears twice; name it once")
        seen.add(gname)
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise ConfigurationError(
                f"{WHO}: group {gname!r}: {pattern!r} is not a valid regular expression ({exc})"
            ) from None
        idx = [i for i, pname in enumerate(names) if rx.search(pname)]
        if not idx:
            some = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigurationError(
                f"{WHO}: group {gname!r}: regex {pattern!r} matches no parameter of the "
                f"operator (re.search on names such as {some}); fix the regex or drop the group"
            )
        out.append((gname, idx))
    return out


def _coordinate_groups(A: Any, groups: Any, n: int) -> list[tuple[str, torch.Tensor]]:
    """``(name, flat coordinate indices [m])`` of every group."""
    explicit = None
    if isinstance(groups, dict) and groups and all(_is_index_list(v) for v in groups.values()):
        explicit = list(groups.items())
    elif isinstance(groups, (list, tuple)) and groups and all(_is_index_list(v) for v in groups):
        explicit = [(f"group{i}", v) for i, v in enumerate(groups)]
    if explicit is not None:
        out = []
        for gname, v in explicit:
            idx = torch.as_tensor(v, dtype=torch.long).reshape(-1)
            if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= n:
                raise ConfigurationError(
                    f"{WHO}: group {gname!r} must list coordinates in [0, {n}), at least one"
                )
            if torch.unique(idx).numel() != idx.numel():
                raise ConfigurationError(f"{WHO}: group {gname!r} lists a coordinate twice")
            out.append((str(gname), idx))
        return out
    pg = param_groups(A, groups)
    offsets = [0]
    for s in A.param_shapes:
        offsets.append(offsets[-1] + torch.Size(s).numel())
    if offsets[-1] != n:
        raise ConfigurationError(
            f"{WHO}: param_shapes cover {offsets[-1]} entries but the operator has n = {n}"
        )
    return [
        (gname, torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in idx]))
        for gname, idx in pg
    ]


class _Stacked:
    """Products of the full operator with stacks of block-masked rows, streamed in chunks of
    at most BLOCK_BYTES. ``rows`` yields ``(coordinates [m], local vector [m], tag)``; yields
    ``(tag, local product [m])`` in order."""

    def __init__(self, products: Products, n: int, work: torch.dtype) -> None:
        self.products, self.n, self.work = products, n, work
        itemsize = torch.empty((), dtype=work).element_size()
        self.chunk = max(1, BLOCK_BYTES // max(1, n * itemsize))

    def __call__(self, rows: Iterable[tuple]) -> Iterator[tuple[Any, torch.Tensor]]:
        it = iter(rows)
        while part := list(itertools.islice(it, self.chunk)):
            V = torch.zeros((len(part), self.n), dtype=self.work, device=self.products.device)
            for r, (idx, v, _) in enumerate(part):
                V[r, idx] = v
            W = self.products(V)
            for r, (idx, _, tag) in enumerate(part):
                yield tag, W[r, idx]


class _Lanczos:
    """Lanczos on one block with full reorthogonalisation (CGS2), in local coordinates."""

    def __init__(self, q0: torch.Tensor, w0: torch.Tensor, max_steps: int, tol: float) -> None:
        self.m, self.tol, self.w, self.j, self.converged = q0.numel(), tol, w0, 1, False
        self.cap = min(max_steps, self.m)
        self.Q = q0.new_zeros((self.cap, self.m))
        self.Q[0] = q0
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.ritz = (math.nan,) * 4  # theta_max, its residual, theta_min, its residual
        self.floor = 0.0

    def step(self) -> torch.Tensor | None:
        """Absorb ``self.w = A_gg q_j``; return the next Lanczos vector, or None when done."""
        j, Q, w = self.j, self.Q[: self.j], self.w
        h = Q @ w
        self.alphas.append(float(h[j - 1]))
        w = w - Q.T @ h
        w = w - Q.T @ (Q @ w)
        beta = float(torch.linalg.vector_norm(w))
        T = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if self.betas:
            off = torch.tensor(self.betas, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        norm = float(evals.abs().max())
        self.floor = floor = residual_floor(norm, self.Q.dtype)  # the arithmetic's limit
        theta, res = float(evals[-1]), max(abs(beta * float(evecs[-1, -1])), floor)
        self.ritz = (theta, res, float(evals[0]), max(abs(beta * float(evecs[-1, 0])), floor))
        scale = max(abs(theta), _FLOOR * norm)
        breakdown = beta <= 1e-14 * max(norm, 1e-300)  # invariant space
        self.converged = res <= max(self.tol * scale, floor) or j >= self.m or breakdown
        if self.converged or j >= self.cap:
            return None
        self.betas.append(beta)
        self.Q[j] = w / beta
        self.j = j + 1
        return self.Q[j]


def _progress(A: Any, enabled: Any):
    try:
        from ..progress import track  # type: ignore[import-not-found]
    except ImportError:
        return contextlib.nullcontext()
    return track(A, "per-layer spectra", enabled=enabled)


def block_spectra(
    A: Any,
    groups: Any = "modules",
    *,
    tol: float = 1e-3,
    num_probes: int = 16,
    max_steps: int = 60,
    seed: int = 0,
    progress: Any = None,
) -> BlockSpectra:
    """lambda_max and trace of every group's diagonal block ``A_gg``, all groups sharing passes.

    Args:
        A: a curvature operator ``[n, n]`` (``hf.hessian`` / ``hf.ggn``), or any symmetric
            LinearOperator when ``groups`` lists flat coordinates explicitly.
        groups: see :func:`param_groups`; or explicit coordinate lists (module docstring).
        tol: relative residual at which a group's top Ritz pair is converged.
        num_probes: Rademacher probes per group for the trace (>= 2); groups of at most this
            size get their exact block from unit vectors.
        max_steps: most Lanczos vectors per group.
        seed: seed of the private generators of the probes (one per group, keyed by
            (seed, group name), so a group's result does not depend on the other groups; the
            global RNG is not touched).
        progress: passed to ``hessfast.progress.track`` when that module exists.

    Returns:
        :class:`BlockSpectra`; ``data_passes`` counts ``A.matmat`` calls made here. Unlike
        :func:`hessfast.eigsh` there is no verification round: a converged ``lambda_max`` is
        an eigenvalue of ``A_gg`` within its residual, and the largest one with high
        probability (random start), not certified.
    """
    A = as_operator(A, WHO, allow_empty=False)
    tol = check_positive("tol", tol, who=WHO)
    num_probes = check_int("num_probes", num_probes, 2, who=WHO)
    max_steps = check_int("max_steps", max_steps, 1, who=WHO)
    seed = check_seed(seed, who=WHO)
    n = int(A.shape[0])
    coords = _coordinate_groups(A, groups, n)
    work = work_dtype(A.dtype)
    device = torch.device(A.device)
    coords = [(g, idx.to(device)) for g, idx in coords]
    t0 = time.perf_counter()
    products = Products(A, work, WHO)
    stacked = _Stacked(products, n, work)
    exact = [idx.numel() <= num_probes for _, idx in coords]

    def probe_rows() -> Iterator[tuple]:
        """Unit vectors of the small groups, Rademacher probes of the others (first: q0)."""
        for g, (gname, idx) in enumerate(coords):
            if exact[g]:
                vecs = torch.eye(idx.numel(), dtype=work, device=device)
            else:
                gen = probe_generator(probe_key(seed, zlib.crc32(gname.encode())))
                vecs = sample_probes(gen, num_probes, idx.numel(), "rademacher", dtype=work,
                                     device=device)
            yield from ((idx, v, (g, i, v)) for i, v in enumerate(vecs))

    columns: dict[int, list[torch.Tensor]] = {g: [] for g in range(len(coords)) if exact[g]}
    samples: dict[int, list[float]] = {g: [] for g in range(len(coords)) if not exact[g]}
    solvers: dict[int, _Lanczos] = {}
    with _progress(A, progress):
        for (g, i, v), y in stacked(probe_rows()):  # the shared probe pass(es)
            if exact[g]:
                columns[g].append(y.double())  # A_gg e_i
                continue
            samples[g].append(float(v.double() @ y.double()))
            if i == 0:
                nz = float(torch.linalg.vector_norm(v))
                solvers[g] = _Lanczos(v / nz, y / nz, max_steps, tol)
        active = list(solvers)
        while active:  # Lanczos in lockstep: one stacked product per step
            nxt = [(g, solvers[g].step()) for g in active]
            active = [g for g, q in nxt if q is not None]
            for g, w in stacked((coords[g][1], q, g) for g, q in nxt if q is not None):
                solvers[g].w = w
    results = []
    for g, (gname, idx) in enumerate(coords):
        if exact[g]:
            B = torch.stack(columns[g], dim=1)
            evals, evecs = torch.linalg.eigh(0.5 * (B + B.T))
            floor = residual_floor(float(evals.abs().max()), work)
            res = torch.linalg.vector_norm(B @ evecs - evecs * evals, dim=0).clamp(min=floor)
            results.append(BlockResult(
                gname, idx.numel(), float(evals[-1]), float(res[-1]), True,
                float(torch.trace(B)), 0.0, True, float(evals[0]), float(res[0]), 0, floor,
            ))
        else:
            lz, z = solvers[g], torch.tensor(samples[g], dtype=torch.float64)
            theta, res, tmin, rmin = lz.ritz
            results.append(BlockResult(
                gname, lz.m, theta, res, lz.converged, float(z.mean()),
                float(z.std() / math.sqrt(z.numel())), False, tmin, rmin, lz.j, lz.floor,
            ))
    return BlockSpectra(
        groups=results,
        num_matvecs=products.num_matvecs,
        data_passes=products.num_passes,
        seconds=time.perf_counter() - t0,
        tol=tol,
        num_probes=num_probes,
        seed=seed,
    )

