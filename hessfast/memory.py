"""A memory plan before a long run: :func:`estimate_memory` and the basis storage choice
:func:`choose_basis` that :func:`hessfast.eigsh` and :func:`hessfast.spectral_density` make
when ``basis_dtype`` / ``basis_device`` are not given.

What is exact and what is a model:

- **Exact** (allocation sizes read from the code): the Krylov basis (eigsh: ``max_basis`` rows
  of ``n`` in ``basis_dtype``, allocated up front, or of the largest rank's 128-aligned slice
  of n with ``basis_sharding``; SLQ with ``reorth="full"``: ``P m n``, one group) and the
  parameters and buffers (the operator keeps two copies of each buffer and clones one per
  evaluation, so buffers count three times).
- **Measured**: the HVP's activations. The saved-tensor bytes ``S`` of batch 0's first-order
  graph (forward plus the gradient with ``create_graph=True``, each storage once; the model's
  parameters left out: a layer that saves its weight holds no new memory), counted by
  :func:`measure_saved` while the operator's :meth:`~hessfast.LinearOperator.saved_bytes`
  builds that graph once more (about one gradient; cached by the operator).
- **A model**: the product's peak is ``S (ACT_BASE + ACT_PER_ROW c)`` for chunks of ``c``
  rows (``S num_batches`` plus the product when every batch's graph is kept,
  ``reuse_graph``); the working vectors (block, product, next block, returned vectors) are
  counted in rows of ``n``; a fixed scratch (``SCRATCH_BYTES``) covers restarts and QR.
  Calibrated on the CPU (rise of ``VmHWM`` after ``malloc_trim``; two MLPs and a CNN, S of
  16-22 MiB, double backward): peak/S was 2.9-4.2 at c = 1, 8.0-11.1 at c = 4, 12.4-13.8 at
  c = 8 (graph reuse, graph included: 2.8-3.5, 8.1-10.4, 12.5-15.6); the model's 3.9, 8.1 and
  13.7 are within 1.4x of each (tests/contracts/test_memory.py checks 1.5x at c = 4).
- On CUDA the torch backend of ``ops.reorthogonalize`` converts a low-precision basis to the
  working dtype in row chunks of ``_reference.CAST_CHUNK_BYTES`` (64 MiB): that transient is
  counted (at most one chunk, or the whole basis when smaller).

Extra bytes per parameter of each Krylov mode (``krylov=``), beyond the model's own state
(parameters, buffers, the product's activations), for an fp32 model (float32 vectors, 4 bytes
each; double every figure for float64); k pairs, block size b, P probes, m steps:

=================================  ============================  ==========================
mode                               vectors of n                  bytes / parameter (fp32)
=================================  ============================  ==========================
eigsh full (default basis 32 rows) ``max_basis + 3b + k + 2b``   152 (k = b = 1)
eigsh / lambda_max lean, k = 1     3 working + 1 product (+1 y)  16 (20 with eigenvectors)
eigsh lean k > 1 (restarted)       ``(k+2b+4) + k + 2b + b``     76 (k = 5, b = 1; 44 with
                                                                 a bfloat16 basis)
power iteration                    3 working + 2                 20
SLQ full (one group)               ``P m + 4P + 2P``             ``4 (P m + 6P)``
SLQ lean (probes one at a time)    3 working + 1 product         16, any P and m
=================================  ============================  ==========================

The restarted mode's rows: its ``k + 2b + 4`` basis rows, a copy of the k candidates
(basis dtype) taken only when a thick restart falls inside a verification round, the block
and a verification round's dropped block; the next block is the product itself, normalised in
place (an operator whose products are fresh tensors,
:attr:`~hessfast.LinearOperator.fresh_products`; one more row otherwise). At the end the
basis is freed once the returned vectors are formed (``k`` rows in the operator's dtype).
Finite-difference products add one row in the parameters' dtype (the perturbed parameters
``theta + e v``, "perturbed parameters" in the table) and hold one ordinary gradient's graph
at a time (activations ``S ACT_FD``, whatever the chunk).

So lambda_max and the density run in 4 parameter-sized vectors in the lean mode (the target
was <= 6; 5 with finite-difference products); tests/lanczos/test_lean.py counts the live
``[*, n]`` tensors during the products and finds at most 4 (lean lambda_max) and 5 (lean
SLQ, the probe included). With vectors sharded over R ranks (``A.shards``: an FSDP model)
each rank holds ``1/R`` of each vector. The float64 tridiagonal T stays on the CPU (``16 m``
bytes per probe or run; lean eigsh solves for its wanted extreme eigenpair alone, in O(m)
memory).

"Capacity" is the device's free memory plus what the plan already finds resident there (the
model's parameters and buffers), or ``available=`` when given (plan for another machine).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from . import ops
from ._checks import STREAM_BYTES, work_dtype
from .distributed import shard_size
from .errors import ConfigurationError, OutOfMemoryPlanError
from .linop import LinearOperator
from .ops import CAST_CHUNK_BYTES
from .results import JsonResult, Status

__all__ = ["ALGORITHMS", "KRYLOV", "MemoryItem", "MemoryPlan", "available_memory",
           "choose_basis", "estimate_memory", "full_basis_fits", "graph_bytes",
           "measure_saved"]

T = TypeVar("T")

ALGORITHMS = ("eigsh", "slq", "kpm", "trace", "power")
#: the Krylov memory modes of eigsh / lambda_max / spectral_density (module docstring)
KRYLOV = ("auto", "full", "lean")
#: rows the restarted lean eigsh basis holds beyond k + 2 block_size
LEAN_EXTRA_ROWS = 4
#: Product peak in units of the measured saved bytes S: S (ACT_BASE + ACT_PER_ROW c).
ACT_BASE = 2.5
ACT_PER_ROW = 1.4
#: A finite-difference product's peak in units of its S (one ordinary gradient's saved
#: bytes, parameters left out): the rows run one gradient at a time, whatever the chunk.
#: Measured peak/S (VmHWM rise, as for ACT_BASE): 3.7-5.4 on a small CNN and 4.0-6.8 on a
#: 3-layer MLP (few layers: the backward's temporaries are large against S; the MLP's moves
#: with the allocator from one process to the next), 2.1-2.2 on a 4-layer GPT-2
#: (tests/contracts/test_memory.py checks 1.7x on the CNN and the GPT-2).
ACT_FD = 3.5
#: Restart / QR scratch (Ritz vectors are formed in column chunks of about this size).
SCRATCH_BYTES = 2**26
#: The automatic choice measures activations only when the basis needs more than this
#: fraction of the capacity (smaller runs skip the extra graph build).
MEASURE_FRACTION = 8
#: ``krylov="auto"`` keeps the full basis (verified results, the fewest products) only while
#: it takes at most this fraction of the capacity; a larger one buys nothing the lean mode
#: lacks in accuracy, and would leave the user's model little room (GPT-2 small's k = 1 basis
#: is 16 GB of a 24 GB machine).
AUTO_BASIS_FRACTION = 4
GROUP_BYTES = STREAM_BYTES  # what density.slq.GROUP_BYTES is (SLQ probe groups)
MIN_GROUP = 64
BLOCK_BYTES = STREAM_BYTES  # what estimators.session.BLOCK_BYTES is (estimator probe blocks)


def _size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _fmt(x: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    unit = next(u for u in range(4, -1, -1) if x >= 1024**u or u == 0)
    return f"{x / 1024**unit:.4g} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[unit]}"


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device`` (host: ``MemAvailable``; 2 GiB when it cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 << 30


def measure_saved(build: Callable[[], T], exclude: Iterable[torch.Tensor] = ()
                  ) -> tuple[T, int]:
    """Run ``build`` and count the bytes of the tensors autograd saves meanwhile (each
    storage once): what keeping the graph it builds costs. The graph stays usable (the pack
    hook hands autograd a detached alias; autograd restores the history on unpack).

    Storages of the ``exclude`` tensors (the model's parameters: a linear layer saves its
    weight, a view of memory the model holds anyway) are not counted."""
    seen: dict[tuple[int, int], int] = {}
    held = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            if storage.data_ptr() in held:
                return t.detach()
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            seen[(id(t), 0)] = t.numel() * t.element_size()
        return t.detach()  # no reference cycle tensor -> grad_fn -> saved -> tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = build()
    return result, sum(seen.values())


@dataclass(frozen=True)
class MemoryItem:
    """One line of a plan: ``bytes`` on ``where`` (``"device"`` or ``"host"``)."""

    name: str
    bytes: int
    where: str
    note: str = ""


@dataclass(frozen=True, repr=False)
class MemoryPlan(JsonResult):
    """Bytes per device of one run (see the module docstring for what is measured).

    ``to_dict()`` / ``to_json()`` as on every result: the fields below (``items`` as a list
    of ``{name, bytes, where, note}``, dtypes and devices as str) plus the derived
    ``totals`` (``{"device": bytes, "host": bytes}``) and ``fits``.

    Attributes:
        algorithm, n: the run and the operator size (parameters).
        device, basis_device, basis_dtype, pinned: where the products run and the basis lives.
        world_size, basis_sharding: ranks, and whether each stores 1/R of the basis.
        items: the lines of the table (parameters, basis, vectors, activations, ...).
        capacity: ``{"device": bytes, "host": bytes}`` the plan may use.
        resident: bytes of ``items`` already allocated (counted in the capacity).
        activations_measured: False when activations were not measured (counted as 0).
        settings: the algorithm's arguments the plan used.
        num_matvecs, num_passes: the operator's products the estimate itself ran (0: the
            activation measurement builds one first-order graph, no product).
        status: ``FIXED_BUDGET``: a plan has no stopping test (the common result member).
    """

    algorithm: str
    n: int
    device: torch.device
    basis_device: torch.device
    basis_dtype: torch.dtype
    pinned: bool
    world_size: int
    basis_sharding: bool
    items: tuple[MemoryItem, ...]
    capacity: dict[str, int]
    resident: int
    activations_measured: bool
    settings: dict[str, Any]
    num_matvecs: int = 0
    num_passes: int = 0
    status: Status = Status.FIXED_BUDGET
    _rebuild: Callable[[int], MemoryPlan] | None = field(default=None, repr=False, compare=False)

    def _sum(self, *names: str) -> int:
        return sum(i.bytes for i in self.items if i.name in names)

    parameters = property(lambda self: self._sum("parameters"), doc="bytes")
    basis = property(lambda self: self._sum("basis"), doc="bytes of the Krylov basis")
    activations = property(lambda self: self._sum("activations"), doc="bytes (0: unmeasured)")
    vectors = property(lambda self: self._sum("vectors", "working vectors", "scratch",
                                              "reorth cast"), doc="bytes of working vectors")

    def to_dict(self, *, vectors: bool = False) -> dict[str, Any]:
        """The fields as JSON-safe values (``json.dumps`` accepts it), without the private
        rescaling function, plus ``totals`` per place and ``fits``. ``vectors`` is accepted
        for the common result interface (a plan holds no ``[n]`` arrays)."""
        out = super().to_dict(vectors=vectors)
        places = dict.fromkeys([*self.capacity, *(i.where for i in self.items)])
        out["totals"] = {w: self.total(w) for w in places}
        out["fits"] = self.fits
        return out

    def total(self, where: str = "device") -> int:
        """Bytes the plan needs on ``where`` (``"device"`` or ``"host"``)."""
        return sum(i.bytes for i in self.items if i.where == where)

    @property
    def fits(self) -> bool:
        """Every place's total within its capacity."""
        return all(self.total(w) <= cap for w, cap in self.capacity.items())

    def at(self, n: int) -> MemoryPlan:
        """The same plan (settings, bytes per parameter, activations) for ``n`` parameters."""
        if self._rebuild is None:
            raise ConfigurationError("this plan cannot be rescaled")
        return self._rebuild(int(n))

    @property
    def largest_n(self) -> int:
        """The most parameters for which :meth:`at` still fits (0 if none does)."""
        if not self.at(1).fits:
            return 0
        lo, hi = 1, 2
        while self.at(hi).fits and hi < 2**60:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.at(mid).fits else (lo, mid)
        return lo

    def __str__(self) -> str:
        head = (
            f"memory plan: {self.algorithm} (krylov={self.settings.get('krylov', 'full')}), "
            f"n={self.n:,}, device={self.device}, basis "
            f"{str(self.basis_dtype).replace('torch.', '')} on {self.basis_device}"
            f"{' (pinned)' if self.pinned else ''}, world_size={self.world_size}"
            f"{' (sharded basis)' if self.basis_sharding else ''}"
        )
        rows = [head, f"  {'item':<20}{'where':<8}{'size':>15}  note"]
        for i in self.items:
            rows.append(f"  {i.name:<20}{i.where:<8}{_fmt(i.bytes):>14}  {i.note}")
        for w, cap in self.capacity.items():
            ok = "fits" if self.total(w) <= cap else "DOES NOT FIT"
            rows.append(f"  {'total ' + w:<28}{_fmt(self.total(w)):>14}  of {_fmt(cap)} "
                        f"capacity: {ok}")
        if self._rebuild is not None:
            rows.append(f"  largest n with these settings: {self.largest_n:,}")
        return "\n".join(rows)


def _model_bytes(model: nn.Module | None) -> tuple[int, int, torch.device | None]:
    """(parameter bytes, buffer bytes, device) of a model (0, 0, None without one)."""
    if model is None:
        return 0, 0, None
    def nbytes(ts: Any) -> int:
        return sum(t.numel() * t.element_size() for t in ts)
    dev = next((p.device for p in model.parameters()), None)
    return nbytes(model.parameters()), nbytes(model.buffers()), dev


def _rows(alg: str, s: dict[str, Any], n: int, wb: int, bb: int) -> tuple[int, int, int]:
    """(basis rows, working rows in the working dtype, product rows) of a run at size n."""
    P = s["num_probes"]
    lean = s.get("krylov") == "lean"
    if alg == "eigsh" and lean and s["k"] == 1:  # q_prev, q, w (+ y); the product's output
        return 0, 3 + bool(s.get("vectors", False)), 1
    if alg == "slq" and lean:  # one probe at a time: q, q_prev, w, and the product's output
        return 0, 3, 1
    if alg == "eigsh" and lean:  # thick restart on a small basis
        # + a copy of the k candidates (basis dtype) when a verification round restarts;
        # working: block, next block, a verification round's dropped block; the product
        # (the next block is the product itself, normalised in place, when the operator's
        # products are fresh tensors; else its own rows)
        k, b = s["k"], s["block_size"]
        cap = s["max_basis"] or k + 2 * b + LEAN_EXTRA_ROWS
        return min(cap, n) + min(k, n), (2 if s.get("fresh_products") else 3) * b, b
    if alg == "eigsh":
        k, b = s["k"], s["block_size"]
        return min(s["max_basis"] or max(2 * k + 2 * b, 32), n), 3 * b + k, 2 * b
    if alg == "slq":  # one group of probes (density.slq.slq_group_size)
        m, full = min(s["num_steps"], n), s["reorth"] == "full"
        P = min(P, max(MIN_GROUP, GROUP_BYTES // (max(n, 1) * (4 * wb + m * bb * full))))
        return P * m * full, 4 * P, 2 * P
    if alg == "trace":  # probe blocks of at most BLOCK_BYTES
        P = min(P, max(1, BLOCK_BYTES // max(n * wb, 1)))
    return (0, 5 * P, 2 * P) if alg != "power" else (0, 3, 2)


def _build(n: int, alg: str, s: dict[str, Any], w: torch.dtype, a_bytes: int,
           dev: torch.device, bdev: torch.device, bdtype: torch.dtype, pinned: bool,
           params: tuple[int, int, int, int], act: int | None, act_note: str,
           capacity: dict[str, int], resident: int) -> MemoryPlan:
    wb, bb = _size(w), _size(bdtype)
    shard = shard_size(n, s["world_size"]) if s["basis_sharding"] else n  # the largest
    where_b = "device" if bdev == dev else "host"
    scale = (n / params[2]) ** params[3] if params[2] else 1.0  # a matrix grows as n^2
    what = "the matrix" if params[3] == 2 else "parameters + 3x buffers"
    items = [MemoryItem("parameters", int(params[0] * scale) + 3 * int(params[1] * scale),
                        "device", what if params[0] else "not known")]
    brows, vrows, drows = _rows(alg, s, n, wb, bb)
    lean = s.get("krylov") == "lean"
    rows_note = {"eigsh": "max_basis rows", "slq": "probes x steps rows (one group)"}
    note = "none (krylov='lean')" if lean and not brows else rows_note.get(alg, "none")
    if lean and brows:
        note = (f"{brows - s['k']} rows + {s['k']} candidates' copy (krylov='lean': "
                "restarted)")
    # lean vectors of an operator sharded over ranks (A.shards, or basis_sharding=True of a
    # planned FSDP run): each rank holds the largest slice of every vector
    vn = shard if lean and s["basis_sharding"] else n
    items.append(MemoryItem("basis", brows * shard * bb, where_b, note))
    per = (vrows * wb + drows * a_bytes) / max(a_bytes, 1)
    items.append(MemoryItem("working vectors", vrows * vn * wb,
                            where_b if alg == "eigsh" else "device",
                            f"{vrows} rows" + (f" (lean: {per:.3g} parameter-sized vectors "
                                               "with the product's)" if lean else "")))
    items.append(MemoryItem("vectors", drows * vn * a_bytes, "device",
                            f"{drows} rows: block and product" if not lean
                            else f"{drows} row(s): the product"))
    if s.get("finite_difference"):
        items.append(MemoryItem("perturbed parameters", vn * a_bytes, "device",
                                "1 row: finite differences' theta + e v"))
    if not (lean and not brows):
        items.append(MemoryItem("scratch", min(SCRATCH_BYTES, max(brows, 1) * n * wb),
                                where_b, "restart / QR chunks"))
    if brows and bdtype != w and bdev.type == "cuda" and ops._pick("reorthogonalize", bdev) \
            == "reference":
        cast = (brows if alg == "eigsh" else min(s["num_steps"], n)) * shard * wb
        cast = min(cast, max(CAST_CHUNK_BYTES, shard * wb))  # at least one row
        items.append(MemoryItem("reorth cast", cast, where_b,
                                "torch backend converts the basis in row chunks"))
    items.append(MemoryItem("activations", act or 0, "device", act_note))
    if alg in ("eigsh", "slq"):
        side = brows * brows * 8 if alg == "eigsh" else 16 * brows
        if lean and not brows:  # T grows: max_matvecs (eigsh) or num_steps (slq) steps
            steps = s["num_steps"] if alg == "slq" else s.get("max_matvecs") or 1000
            side = 16 * steps
        items.append(MemoryItem("projection", side, "host" if dev.type != "cpu" else "device",
                                "float64 T / coefficients on the CPU"))
    caps = {k: v for k, v in capacity.items() if k == "device" or where_b == "host"}
    if dev.type != "cpu" and alg in ("eigsh", "slq"):
        caps.setdefault("host", capacity.get("host", 0))

    def rebuild(n2: int) -> MemoryPlan:
        return _build(n2, alg, s, w, a_bytes, dev, bdev, bdtype, pinned, params, act,
                      act_note, capacity, resident)

    return MemoryPlan(
        algorithm=alg, n=n, device=dev, basis_device=bdev, basis_dtype=bdtype, pinned=pinned,
        world_size=s["world_size"], basis_sharding=s["basis_sharding"], items=tuple(items),
        capacity=caps, resident=resident, activations_measured=act is not None,
        settings=dict(s), num_matvecs=0, num_passes=0, status=Status.FIXED_BUDGET,
        _rebuild=rebuild,
    )


def estimate_memory(
    A: LinearOperator | nn.Module,
    algorithm: str = "eigsh",
    *,
    k: int = 6,
    block_size: int | None = None,
    max_basis: int | None = None,
    num_steps: int = 64,
    num_probes: int = 8,
    reorth: str = "full",
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    world_size: int = 1,
    basis_sharding: bool = False,
    available: int | None = None,
    measure: bool = True,
    krylov: str = "auto",
) -> MemoryPlan:
    """The memory plan of a run, before running it (see the module docstring).

    Args:
        A: the operator ``[n, n]`` (a model's Hessian/GGN: activations are measured on batch
            0, about one gradient's cost; any LinearOperator: no activations), or an
            ``nn.Module`` (nothing is built: n is its trainable parameters, activations are
            not measured and count as 0, said in the table).
        algorithm: ``eigsh`` (also for ``lambda_max``), ``slq`` (``spectral_density``),
            ``kpm``, ``trace`` (Hutchinson, Hutch++, XTrace, diagonal) or ``power``.
        k: eigsh's number of pairs.
        block_size: eigsh's rows per block (default as in eigsh: 1 on the CPU, else
            ``min(k, 4)``).
        max_basis: eigsh's basis rows before a restart (default as in eigsh:
            ``max(2k + 2 block_size, 32)``, at most n).
        num_steps: Lanczos steps per probe of SLQ (the basis holds ``probes x steps`` rows).
        num_probes: probes of SLQ/KPM/trace (SLQ and trace stream them in groups or blocks,
            as those runs do).
        reorth: SLQ's reorthogonalisation: ``"full"`` keeps the probes' bases, other values
            keep none.
        basis_dtype: storage dtype of the basis (default: the working dtype).
        basis_device: where the basis lives (default: the operator's device).
        world_size: number of ranks of a data-parallel run (>= 1).
        basis_sharding: each rank stores its ~1/R slice of the basis (the largest of
            :func:`hessfast.distributed.shard_bounds`, as eigsh allocates it).
        available: capacity in bytes of the operator's device (default: free now plus the
            plan's resident parameters); plan for another machine by giving it.
        measure: False skips the activation measurement.
        krylov: the Krylov mode planned (``eigsh``/``lambda_max`` and ``slq``): ``"full"``
            (the basis above), ``"lean"`` (eigsh k = 1 and SLQ: no basis, 3 working vectors
            and the product's; eigsh k > 1: a restarted basis of ``k + 2 block_size + 4``
            rows) or ``"auto"`` (default): the full plan when it fits within a quarter of the
            capacity, else the lean one, as the runs choose. The table's working-vectors
            row states the lean vectors per parameter; ``plan.settings["krylov"]`` says
            which mode was planned. With
            ``basis_sharding=True`` (an operator whose vectors are sharded over
            ``world_size`` ranks, e.g. FSDP) the lean vectors are each rank's slice.

    Returns:
        :class:`MemoryPlan` (``print(plan)`` shows the table).
    """
    if krylov not in KRYLOV:
        raise ConfigurationError(f"estimate_memory: krylov must be one of {KRYLOV}, got "
                                 f"{krylov!r}")
    algorithm = {"lambda_max": "eigsh", "spectral_density": "slq"}.get(algorithm, algorithm)
    if algorithm not in ALGORITHMS:
        raise ConfigurationError(
            f"estimate_memory: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigurationError(f"estimate_memory: world_size must be an int >= 1, got "
                                 f"{world_size!r}")
    model: nn.Module | None
    if isinstance(A, nn.Module):
        model = A
        ps = [p for p in A.parameters() if p.requires_grad]
        if not ps:
            raise ConfigurationError("estimate_memory: the model has no trainable parameters")
        n, dev = sum(p.numel() for p in ps), ps[0].device
        dtype = torch.promote_types(ps[0].dtype, torch.float32)
    elif isinstance(A, LinearOperator):
        model = getattr(A, "model", None)
        n, dev, dtype = A.shape[0], torch.device(A.device), A.dtype
    else:
        raise ConfigurationError(
            f"estimate_memory: pass a LinearOperator or an nn.Module, got {type(A).__name__}")
    w = work_dtype(dtype)
    bdtype = basis_dtype or w
    bdev = torch.device(basis_device) if basis_device is not None else dev
    b = block_size or (1 if dev.type == "cpu" else min(k, 4))
    s = dict(k=k, block_size=b, max_basis=max_basis, num_steps=num_steps,
             num_probes=num_probes, reorth=reorth, world_size=world_size,
             basis_sharding=basis_sharding, krylov="full" if krylov == "auto" else krylov)
    s["finite_difference"] = isinstance(A, LinearOperator) and _finite_difference(A)
    s["fresh_products"] = isinstance(A, LinearOperator) and A.fresh_products
    if isinstance(A, LinearOperator) and A.shards is not None:
        s["krylov"] = "lean"  # whole vectors are refused on shards; n is the local share
    pb, bufb, mdev = _model_bytes(model)
    quad = model is None and isinstance(getattr(A, "matrix", None), torch.Tensor)
    if quad:
        pb = A.matrix.numel() * A.matrix.element_size()
    params = (pb, bufb, n, 2 if quad else 1)
    act, note = _activations(A, model, measure, b)
    resident = pb + bufb if (mdev == dev or model is None) and available is None else 0
    cap = {"device": available if available is not None else available_memory(dev) + resident}
    cap["host"] = available_memory(torch.device("cpu"))
    pinned = bdev.type == "cpu" and dev.type == "cuda"
    plan = _build(n, algorithm, s, w, _size(dtype), dev, bdev, bdtype, pinned, params, act,
                  note, cap, resident)
    if krylov == "auto" and algorithm in ("eigsh", "slq") and not plan.fits \
            and s["krylov"] == "full":
        plan = _build(n, algorithm, dict(s, krylov="lean"), w, _size(dtype), dev, bdev,
                      bdtype, pinned, params, act, note, cap, resident)
    return plan


def _activations(A: Any, model: nn.Module | None, measure: bool, b: int
                 ) -> tuple[int | None, str]:
    """Measured activation bytes of a product of ``b`` rows, and the table's note."""
    if isinstance(A, nn.Module):
        return None, "not measured (a model was given: pass its operator)"
    if not isinstance(A, LinearOperator) or not _keeps_graph(A):
        return 0, "none (not a model operator)"
    if not measure:
        return None, "not measured (measure=False)"
    S = graph_bytes(A)
    if _finite_difference(A):
        return int(S * ACT_FD), (f"measured S={S / 2**20:.1f} MiB x {ACT_FD} (finite "
                                 "differences: one ordinary gradient at a time)")
    plan = A.plans.get(b) if hasattr(A, "plans") else None
    c = plan.chunk if plan is not None else min(b, 32)
    keep = A.num_batches if (plan is not None and plan.mode == "reuse_graph") else 1
    peak = int(S * (keep - 1 + ACT_BASE + ACT_PER_ROW * c))
    return peak, f"measured S={S / 2**20:.1f} MiB x ({keep - 1} kept + {ACT_BASE} + {c} rows)"


def _finite_difference(A: Any) -> bool:
    """Are ``A``'s products finite differences (which hold a perturbed copy of the
    parameters, one row in their dtype, and one ordinary gradient's graph)?"""
    return getattr(A, "hvp_mode", None) == "finite_difference"


def _keeps_graph(A: LinearOperator) -> bool:
    """Does ``A`` implement :meth:`~hessfast.LinearOperator.saved_bytes` (a model operator,
    whose products build graphs), so that measuring may be asked of it?"""
    return type(A).saved_bytes is not LinearOperator.saved_bytes


def graph_bytes(H: LinearOperator) -> int:
    """Bytes autograd saves for batch 0's first-order graph of a model operator (forward
    and gradient with its graph, each storage once): its
    :meth:`~hessfast.LinearOperator.saved_bytes`, measured once by the operator (about one
    gradient, the user's model untouched) and cached there; 0 when it cannot say."""
    return H.saved_bytes() or 0


def full_basis_fits(A: LinearOperator, algorithm: str, **settings: Any) -> tuple[bool, str]:
    """Does the full Krylov basis fit in the default storage (the working dtype on the
    operator's device), taking at most 1/:data:`AUTO_BASIS_FRACTION` of the capacity?
    ``(fits, why)`` with ``why`` the needed and available bytes: the ``krylov="auto"``
    decision of eigsh and SLQ. Activations are measured only when the
    basis needs more than 1/MEASURE_FRACTION of the capacity (as :func:`choose_basis`)."""
    dev = torch.device(A.device)
    w = work_dtype(A.dtype)
    kw = dict(settings, basis_dtype=w, basis_device=dev, krylov="full")
    p = estimate_memory(A, algorithm, measure=False, **kw)
    if p.basis > p.capacity["device"] // AUTO_BASIS_FRACTION:
        return False, (f"the full basis would take {_fmt(p.basis)} in "
                       f"{str(w).replace('torch.', '')} on {dev}, more than 1/"
                       f"{AUTO_BASIS_FRACTION} of the {_fmt(p.capacity['device'])} capacity")
    if p.fits and p.basis <= p.capacity["device"] // MEASURE_FRACTION:
        return True, ""
    p = estimate_memory(A, algorithm, measure=True, **kw)
    why = (f"{_fmt(p.total())} needed with a {_fmt(p.basis)} basis in "
           f"{str(w).replace('torch.', '')} on {dev}, {_fmt(p.capacity['device'])} capacity")
    return p.fits, why


def choose_basis(A: LinearOperator, algorithm: str, basis_dtype: torch.dtype | None,
                 basis_device: torch.device | None, who: str, **settings: Any
                 ) -> tuple[torch.dtype | None, torch.device | None, bool]:
    """The basis storage a run uses: ``(dtype, device, pinned)``.

    Candidates in order: the working dtype on the operator's device, float32 (float64
    operators), bfloat16, then the host (pinned, when the operator is on CUDA) in the same
    dtypes; a given ``basis_dtype`` / ``basis_device`` fixes that coordinate. The first that
    fits is used; a fallback warns once with the reason; none fitting raises
    :class:`~hessfast.errors.OutOfMemoryPlanError` with the plan and the fixes. Activations
    are measured only when the basis needs more than 1/MEASURE_FRACTION of the capacity.
    """
    dev = torch.device(A.device)
    w = work_dtype(A.dtype)
    dtypes = [basis_dtype] if basis_dtype is not None else list(
        dict.fromkeys([w, torch.float32 if w == torch.float64 else w, torch.bfloat16]))
    devs = [basis_device] if basis_device is not None else list(
        dict.fromkeys([dev, torch.device("cpu")]))
    cands = [(d, v) for v in devs for d in dtypes]

    settings = dict(settings, krylov=settings.get("krylov", "full"))

    def plan(d: torch.dtype, v: torch.device, measure: bool) -> MemoryPlan:
        return estimate_memory(A, algorithm, basis_dtype=d, basis_device=v, measure=measure,
                               **settings)

    first = plan(*cands[0], measure=False)
    if first.fits and first.basis <= first.capacity["device"] // MEASURE_FRACTION:
        return basis_dtype, basis_device, False  # small: as given, nothing measured
    for i, (d, v) in enumerate(cands):
        p = plan(d, v, measure=True)
        if i == 0:
            first = p
        if p.fits:
            if i > 0:
                warnings.warn(
                    f"{who}: the basis in {str(cands[0][0]).replace('torch.', '')} on "
                    f"{cands[0][1]} does not fit ({_fmt(first.total())} needed, "
                    f"{_fmt(first.capacity['device'])} capacity); using "
                    f"{str(d).replace('torch.', '')} on {v}{' (pinned)' if p.pinned else ''}"
                    f". Pass basis_dtype/basis_device to choose. Plan:\n{p}",
                    stacklevel=3,
                )
            return d, v, p.pinned
    raise OutOfMemoryPlanError(
        f"{who}: no basis storage fits ({', '.join(f'{d} on {v}' for d, v in cands)}).\n"
        f"{first}\nFixes: a smaller max_basis / num_steps, fewer probes, "
        "basis_device='cpu', basis_dtype=torch.bfloat16, or basis_sharding over more ranks"
    )
