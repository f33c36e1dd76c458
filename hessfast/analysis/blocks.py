"""Per-layer spectra from shared passes: ``lambda_max`` and the trace of the diagonal block
``A_gg`` of every parameter group g of one curvature operator.

Every product is one of the FULL operator with a stack of block-masked rows ``[G, n]`` (row g
zero outside group g's coordinates; output row g restricted to them is ``A_gg v_g``), so one
data pass serves every group (the naive way, one operator per layer, pays passes per layer):

* trace: Rademacher probes of all groups packed into one block ``[G p, n]`` (streamed in
  chunks of at most 256 MB); a group of size ``<= num_probes`` gets its exact block from unit
  vectors instead (``trace_exact``; its lambda_max/lambda_min come from that dense block);
* lambda_max: Lanczos on every ``A_gg`` in lockstep (:class:`hessfast.lanczos.lockstep.Lockstep`),
  one ``matmat`` of the stacked Lanczos vectors per step, full reorthogonalisation within
  each group's basis, started from the group's first normalised probe (so the trace pass is
  also its first step). A group stops when its top Ritz residual ``|beta_j s_j|`` (Lanczos
  relation, floored at ``64 eps max|Ritz|``) meets the rule of every solver,
  :func:`hessfast.lanczos.verify.converged` (``<= max(tol * max(|theta|, 1e-3 max|Ritz|),
  that floor)``), when its Krylov space is the whole block, or at ``num_steps``.

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

import itertools
import math
import re
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
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
from ..estimators.session import renamed_arg
from ..lanczos.lockstep import Lockstep
from ..lanczos.verify import residual_floor
from ..linop import refuse_sharded
from ..progress import track
from ..results import JsonResult, Status

__all__ = ["BlockResult", "BlockSpectra", "block_spectra", "param_groups"]

WHO = "block_spectra"
#: Most bytes of one stacked block of masked vectors (and of its products).
BLOCK_BYTES = STREAM_BYTES


@dataclass(frozen=True, kw_only=True)
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
    A record inside :class:`BlockSpectra` (the groups share the products: the counters and
    the status are the run's).
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


@dataclass(frozen=True, repr=False, kw_only=True)
class BlockSpectra(JsonResult):
    """Result of :func:`block_spectra`: one :class:`BlockResult` per group, in group order,
    and the cost of the whole run.

    Attributes:
        groups: one :class:`BlockResult` per group.
        num_matvecs: vectors multiplied by the full operator (all groups together).
        num_passes: ``matmat`` calls (data passes), shared by all groups.
        status: ``EXACT`` (every group's block came from unit vectors), ``CONVERGED`` (every
            group's top Ritz pair met the stopping rule) or ``MAX_MATVECS`` (some group
            reached ``num_steps`` first: see its ``converged`` and residual).
        seconds: wall time; tol, num_probes, seed: the arguments.
    """

    groups: list[BlockResult]
    num_matvecs: int
    num_passes: int
    status: Status
    seconds: float
    tol: float = 1e-3
    num_probes: int = 16
    seed: int = 0

    @property
    def converged(self) -> bool:
        """Every group's stopping rule was met (``status`` is ``CONVERGED`` or ``EXACT``)."""
        return all(g.converged for g in self.groups)

    @property
    def data_passes(self) -> int:
        """Deprecated name of :attr:`num_passes` (removed in the next release)."""
        warnings.warn(
            "BlockSpectra.data_passes is deprecated and will be removed in the next release: "
            "it is now called num_passes, like on every other result",
            DeprecationWarning, stacklevel=2,
        )
        return self.num_passes

    def __getitem__(self, name: str) -> BlockResult:
        """The result of the group called ``name``."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group {name!r}; groups: {[g.name for g in self.groups]}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockSpectra:
        """Inverse of :meth:`to_dict` (keys it does not know are ignored; a dict of 0.1,
        with ``data_passes`` and no ``status``, is read too)."""
        names = {f.name for f in fields(BlockResult)}
        top = {f.name for f in fields(cls)} - {"groups", "status"}
        try:
            groups = [BlockResult(**{k: v for k, v in g.items() if k in names})
                      for g in d["groups"]]
            rest = {k: v for k, v in d.items() if k in top}
            if "num_passes" not in rest and "data_passes" in d:
                rest["num_passes"] = d["data_passes"]
            status = Status(d["status"]) if "status" in d else _status(groups)
            return cls(groups=groups, status=status, **rest)
        except (KeyError, TypeError) as exc:
            raise ConfigurationError(
                f"BlockSpectra.from_dict: not a BlockSpectra dict ({exc}); pass what "
                "BlockSpectra.to_dict() returned"
            ) from None


def _status(groups: list[BlockResult]) -> Status:
    """The run's status from its groups (see :class:`BlockSpectra`)."""
    if groups and all(g.trace_exact for g in groups):
        return Status.EXACT
    return Status.CONVERGED if all(g.converged for g in groups) else Status.MAX_MATVECS


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


def block_spectra(
    A: Any,
    groups: Any = "modules",
    *,
    tol: float = 1e-3,
    num_probes: int = 16,
    num_steps: int = 60,
    seed: int = 0,
    progress: bool | None = None,
    max_steps: int | None = None,
) -> BlockSpectra:
    """lambda_max and trace of every group's diagonal block ``A_gg``, all groups sharing passes.

    Args:
        A: a curvature operator ``[n, n]`` (``hf.hessian`` / ``hf.ggn``), or any symmetric
            LinearOperator when ``groups`` lists flat coordinates explicitly.
        groups: see :func:`param_groups`; or explicit coordinate lists (module docstring).
        tol: relative residual at which a group's top Ritz pair is converged.
        num_probes: Rademacher probes per group for the trace (>= 2); groups of at most this
            size get their exact block from unit vectors.
        num_steps: most Lanczos vectors per group (``max_steps`` is its deprecated old name,
            removed in the next release).
        seed: seed of the private generators of the probes (one per group, keyed by
            (seed, group name), so a group's result does not depend on the other groups; the
            global RNG is not touched).
        progress: a progress bar of products on stderr (:mod:`hessfast.progress`); None: when
            stderr is a terminal.
        max_steps: deprecated name of ``num_steps`` (DeprecationWarning; removed next release).

    Returns:
        :class:`BlockSpectra`; ``num_passes`` counts ``A.matmat`` calls made here. Unlike
        :func:`hessfast.eigsh` there is no verification round: a converged ``lambda_max`` is
        an eigenvalue of ``A_gg`` within its residual, and the largest one with high
        probability (random start), not certified.
    """
    A = as_operator(A, WHO, allow_empty=False)
    refuse_sharded(A, WHO, "Per-layer spectra need each block's whole vectors: run "
                   "block_spectra on the unsharded model (its full state dict on one process), "
                   "or lambda_max / spectral_density(krylov='lean') on the whole operator.")
    tol = check_positive("tol", tol, who=WHO)
    num_probes = check_int("num_probes", num_probes, 2, who=WHO)
    num_steps = renamed_arg(num_steps, max_steps, "num_steps", "max_steps", WHO, default=60)
    num_steps = check_int("num_steps", num_steps, 1, who=WHO)
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
    lanczos = Lockstep(len(coords), num_steps, tol)
    with track(A, "per-layer spectra", enabled=progress):
        for (g, i, v), y in stacked(probe_rows()):  # the shared probe pass(es)
            if exact[g]:
                columns[g].append(y.double())  # A_gg e_i
                continue
            samples[g].append(float(v.double() @ y.double()))
            if i == 0:
                nz = float(torch.linalg.vector_norm(v))
                lanczos.start(g, v / nz, y / nz)
        while nxt := lanczos.advance():  # Lanczos in lockstep: one stacked product per step
            for g, w in stacked((coords[g][1], q, g) for g, q in nxt):
                lanczos.receive(g, w)
    results = []
    for g, (gname, idx) in enumerate(coords):
        if exact[g]:
            B = torch.stack(columns[g], dim=1)
            evals, evecs = torch.linalg.eigh(0.5 * (B + B.T))
            floor = residual_floor(float(evals.abs().max()), work)
            res = torch.linalg.vector_norm(B @ evecs - evecs * evals, dim=0).clamp(min=floor)
            results.append(BlockResult(
                name=gname, size=idx.numel(), lambda_max=float(evals[-1]),
                lambda_max_residual=float(res[-1]), converged=True, trace=float(torch.trace(B)),
                trace_stderr=0.0, trace_exact=True, lambda_min=float(evals[0]),
                lambda_min_residual=float(res[0]), steps=0, residual_floor=floor,
            ))
        else:
            r, z = lanczos.ritz(g), torch.tensor(samples[g], dtype=torch.float64)
            results.append(BlockResult(
                name=gname, size=idx.numel(), lambda_max=r.lambda_max,
                lambda_max_residual=r.lambda_max_residual, converged=r.converged,
                trace=float(z.mean()), trace_stderr=float(z.std() / math.sqrt(z.numel())),
                trace_exact=False, lambda_min=r.lambda_min,
                lambda_min_residual=r.lambda_min_residual, steps=r.steps,
                residual_floor=r.residual_floor,
            ))
    return BlockSpectra(
        groups=results,
        num_matvecs=products.num_matvecs,
        num_passes=products.num_passes,
        status=_status(results),
        seconds=time.perf_counter() - t0,
        tol=tol,
        num_probes=num_probes,
        seed=seed,
    )

