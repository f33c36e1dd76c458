"""What every entry point validates, in one place: the operator, integers, numbers, named
choices, dtypes, budgets; the one probe sampler; and the counted, checked product.

Messages name the argument, the value received and what would be accepted; every error is a
:mod:`hessfast.errors` class: ``ConfigurationError`` (a ``ValueError``) for a value,
``ArgumentTypeError`` (a ``TypeError``) for an object that is not an operator at all.

Probes come from ONE private generator per call: a CPU ``torch.Generator`` seeded with
``seed``; probes are drawn on the CPU in float64 and then cast and moved, so the same seed
gives the same probes (to the cast) on every device, and the global RNG is never touched.
Probe-parallel runs (``mesh=``) draw probe ``i`` instead from its own generator seeded with
:func:`probe_key` ``(seed, i)`` (:func:`keyed_probes`), so any subset of the indices gives
the same rows as the whole run, whichever ranks draw them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import ArgumentTypeError, ConfigurationError, NonFiniteError
from .linop import LinearOperator

__all__ = [
    "BASIS_DTYPES",
    "PROBES",
    "Products",
    "STREAM_BYTES",
    "as_operator",
    "check_basis_device",
    "check_basis_dtype",
    "check_budget",
    "check_choice",
    "check_int",
    "check_level",
    "check_positive",
    "check_seed",
    "check_start_vectors",
    "keyed_probes",
    "probe_key",
    "probe_generator",
    "sample_probes",
    "unit_rows",
    "work_dtype",
]

#: Probe distributions: entries +-1 (Rademacher) or standard normal; both E[z z^T] = I.
PROBES = ("rademacher", "gaussian")
#: Storage dtypes of a Krylov basis (what ``hessfast.ops`` accepts for a basis).
BASIS_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
_KEY_MOD = 2**64
_OPERATOR_ATTRS = ("matmat", "shape", "dtype", "device")
#: Most bytes of one streamed block of vectors (and of its products): estimator probe blocks
#: (estimators/session.py), SLQ probe groups (density/slq.py) and the block-masked vectors of
#: analysis/blocks.py. Any budget streams through blocks of at most this size, so memory never
#: grows with the budget. 256 MB was not tuned by a measurement: it is small next to any
#: accelerator's memory (and the model's own activations) yet holds thousands of rows of a
#: million-parameter model, so the per-block product overhead stays negligible.
STREAM_BYTES = 2**28


def _where(who: str | None) -> str:
    return f"{who}: " if who else ""


# ---------------------------------------------------------------------------------------------
# scalars and choices
# ---------------------------------------------------------------------------------------------


def check_int(name: str, value: Any, minimum: int, *, who: str | None = None) -> int:
    """``value`` as an int ``>= minimum`` (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(
            f"{_where(who)}{name} must be an integer >= {minimum}, got {value!r}"
        )
    return int(value)


def check_seed(seed: Any, *, who: str | None = None) -> int:
    """An int seed in the range ``torch.Generator.manual_seed`` accepts."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < _SEED_MIN:
        raise ConfigurationError(
            f"{_where(who)}seed must be an integer in [-2**63, 2**64), got {seed!r}"
        )
    if seed > _SEED_MAX:
        raise ConfigurationError(f"{_where(who)}seed must be < 2**64, got {seed}")
    return int(seed)


def shift_seed(seed: int, i: int) -> int:
    """A different seed (for another run's start), still in :func:`check_seed`'s range."""
    return seed + i if seed + i < 2**64 else seed - i


def check_positive(name: str, value: Any, *, who: str | None = None) -> float:
    """A finite real number ``> 0`` (a tolerance, a width)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise ConfigurationError(
            f"{_where(who)}{name} must be a finite number > 0, got {value!r}"
        )
    return float(value)


def check_level(name: str, value: Any, *, who: str | None = None) -> float:
    """A probability in the open interval (0, 1) (a confidence level)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and 0.0 < value < 1.0):
        raise ConfigurationError(f"{_where(who)}{name} must be in (0, 1), got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...], *, who: str | None = None) -> str:
    """One of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigurationError(
            f"{_where(who)}{name} must be one of {choices}, got {value!r}"
        )
    return value


def check_budget(
    name: str, value: Any, need: int, *, what: str, who: str | None = None
) -> int:
    """A budget of products ``>= need`` (``need`` says what ``what`` requires)."""
    value = check_int(name, value, 1, who=who)
    if value < need:
        raise ConfigurationError(
            f"{_where(who)}{what} needs {name} >= {need}, got {value}; raise {name}"
        )
    return value


# ---------------------------------------------------------------------------------------------
# operator and dtypes
# ---------------------------------------------------------------------------------------------


def as_operator(A: Any, who: str, *, allow_empty: bool = True) -> LinearOperator:
    """``A`` as an operator: a :class:`LinearOperator` (or an object with ``matmat``,
    ``shape``, ``dtype``, ``device``) as given, a dense square tensor wrapped with
    :meth:`LinearOperator.from_matrix`. Square, real floating dtype; ``n >= 1`` unless
    ``allow_empty``."""
    for attr in ("shape", "dtype") if isinstance(A, torch.Tensor) else _OPERATOR_ATTRS:
        if not hasattr(A, attr):
            raise ArgumentTypeError(
                f"{who}: A must be a hessfast.LinearOperator (matmat, shape, dtype, device), "
                f"got {type(A).__name__} without {attr!r}; wrap a matrix with "
                "LinearOperator.from_matrix(M) or a function with LinearOperator.from_function"
            )
    shape = tuple(A.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ConfigurationError(f"{who}: A must be a square [n, n] operator, got shape {shape}")
    if not isinstance(A.dtype, torch.dtype) or A.dtype.is_complex or not (
        A.dtype.is_floating_point
    ):
        raise ConfigurationError(f"{who}: A must have a real floating dtype, got {A.dtype}")
    if isinstance(A, torch.Tensor):
        A = LinearOperator.from_matrix(A)
    if shape[0] == 0 and not allow_empty:
        raise ConfigurationError(f"{who}: A has size n = 0; there is nothing to compute")
    return A


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The working precision for an operator of ``dtype``: float64 for float64, float32
    otherwise (bf16/fp16 operators are widened; vectors and dot products stay >= fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_basis_dtype(
    basis_dtype: Any, work: torch.dtype, *, who: str | None = None
) -> torch.dtype:
    """The storage dtype of a Krylov basis: ``basis_dtype`` or, if None, ``work``."""
    if basis_dtype is None:
        return work
    if not isinstance(basis_dtype, torch.dtype) or basis_dtype not in BASIS_DTYPES:
        raise ConfigurationError(
            f"{_where(who)}basis_dtype must be None or one of {BASIS_DTYPES}, "
            f"got {basis_dtype!r}"
        )
    return basis_dtype


def check_basis_device(basis_device: Any, *, who: str | None = None) -> torch.device | None:
    """Where a Krylov basis may live: None (the operator's device) or a device torch can
    allocate on now (not ``meta``, not a CUDA index beyond ``torch.cuda.device_count()``)."""
    if basis_device is None:
        return None
    fix = "pass None (the operator's device), 'cpu', or an available 'cuda:<i>'"
    try:
        dev = torch.device(basis_device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"{_where(who)}basis_device {basis_device!r} is not a device ({exc}); {fix}"
        ) from None
    if dev.type == "meta":
        raise ConfigurationError(
            f"{_where(who)}basis_device='meta' holds no data, so a basis cannot live there; {fix}"
        )
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise ConfigurationError(
                f"{_where(who)}basis_device={str(dev)!r} is not available ({count} CUDA "
                f"devices visible to torch); {fix}"
            )
    try:
        torch.empty(1, device=dev)
    except Exception as exc:  # noqa: BLE001 - any failure to allocate means "not usable"
        raise ConfigurationError(
            f"{_where(who)}basis_device={str(dev)!r} cannot allocate tensors here ({exc}); {fix}"
        ) from None
    return dev


def check_start_vectors(v0: Any, n: int, *, who: str) -> torch.Tensor:
    """``v0`` (one vector ``[n]`` or rows ``[j, n]``, ``j >= 1``) as a detached ``[j, n]``
    tensor; refused with the expected shape otherwise (a flat ``[j n]`` vector is not split
    into rows), or when it is not a real floating tensor or holds NaN/Inf. Zero rows are
    allowed here (each algorithm decides)."""
    if not isinstance(v0, torch.Tensor):
        raise ArgumentTypeError(
            f"{who}: v0 must be a torch.Tensor [{n}] or [j, {n}], got {type(v0).__name__}; "
            "convert it with torch.as_tensor(v0)"
        )
    if v0.is_complex() or not v0.is_floating_point():
        raise ArgumentTypeError(
            f"{who}: v0 must be a real floating-point tensor, got dtype {v0.dtype}"
        )
    if v0.dim() not in (1, 2) or v0.shape[-1] != n or v0.numel() == 0:
        raise ConfigurationError(
            f"{who}: v0 must have shape [{n}] (one start vector) or [j, {n}] with j >= 1 "
            f"(one per row), got {tuple(v0.shape)}"
        )
    if not bool(torch.isfinite(v0).all()):
        raise NonFiniteError(f"{who}: v0 contains NaN or Inf; pass finite start vectors")
    return v0.detach().reshape(-1, n)


# ---------------------------------------------------------------------------------------------
# probes
# ---------------------------------------------------------------------------------------------


def probe_generator(seed: int) -> torch.Generator:
    """The private generator of a call: on the CPU, seeded with ``seed``."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


def sample_probes(
    gen: torch.Generator,
    k: int,
    n: int,
    probe: str,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[k, n]`` probes with ``E[z z^T] = I``: entries ``+-1`` (``"rademacher"``) or standard
    normal (``"gaussian"``), drawn from ``gen`` on the CPU in float64, then cast to ``dtype``
    and moved to ``device`` (the values do not depend on the device)."""
    if probe == "rademacher":
        # drawn in the target dtype (when floating): bernoulli_ gives the same 0/1 values in
        # every float dtype from the same generator state (one draw per entry), and +-1 is
        # exact in all of them, so this is the float64 draw without its two vectors' worth
        # of float64 (1 GB per probe at GPT-2 small's 124M parameters)
        into = dtype if dtype.is_floating_point else torch.float64
        Z = torch.empty((k, n), dtype=into).bernoulli_(0.5, generator=gen)
        Z.mul_(2.0).sub_(1.0)
    elif probe == "gaussian":
        Z = torch.randn((k, n), dtype=torch.float64, generator=gen)
    else:
        raise ConfigurationError(f"probe must be one of {PROBES}, got {probe!r}")
    return Z.to(device=device, dtype=dtype)


def probe_key(seed: int, index: int) -> int:
    """The seed of probe ``index``'s own generator under ``seed``: the SplitMix64 finaliser
    of ``seed + (index + 1) * golden`` (mod 2**64), in ``[0, 2**64)``. Nearby seeds and
    indices give unrelated keys."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) % _KEY_MOD
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % _KEY_MOD
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % _KEY_MOD
    return z ^ (z >> 31)


def keyed_probes(
    seed: int,
    indices: range | list[int],
    n: int,
    probe: str,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[len(indices), n]`` probes, row j drawn by :func:`sample_probes` from its own CPU
    generator seeded with ``probe_key(seed, indices[j])``: a row depends on (seed, its
    index, n, probe) only, so probe groups drawing disjoint index ranges reproduce the rows
    of one process drawing them all (the probes of ``mesh=`` runs)."""
    rows = [sample_probes(probe_generator(probe_key(seed, i)), 1, n, probe) for i in indices]
    Z = torch.cat(rows) if rows else torch.empty((0, n), dtype=torch.float64)
    return Z.to(device=device, dtype=dtype)


def unit_rows(Z: torch.Tensor, name: str, *, who: str) -> torch.Tensor:
    """``Z: [k, n]`` (the argument ``name``) with every row scaled to norm 1 (float64 norms);
    zero or non-finite rows are refused."""
    if not bool(torch.isfinite(Z).all()):
        raise NonFiniteError(f"{who}: {name} contains NaN or Inf; pass finite vectors")
    nz = torch.linalg.vector_norm(Z.double(), dim=1, keepdim=True)
    if bool((nz == 0).any()):
        raise ConfigurationError(f"{who}: {name} has a zero row; every vector must be nonzero")
    return (Z.double() / nz).to(Z.dtype)


# ---------------------------------------------------------------------------------------------
# products
def all_finite(x: torch.Tensor) -> bool:
    """Whether a float tensor has no NaN/Inf, from its min and max (NaN propagates through
    both): one read, no boolean copy. ``isfinite(x).all()`` on a 124M-entry product took
    0.23 s (a fresh 124 MB mask faulted in), ``aminmax`` 0.018 s (cpu2)."""
    return x.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(x))).all())


# ---------------------------------------------------------------------------------------------


class Products:
    """``A`` applied to blocks ``V: [k, n]``: one ``matmat`` per call (one data pass), counted
    here (so duck-typed operators without counters work), returned as a fresh tensor in the
    working dtype on ``A.device`` and checked for NaN/Inf. The result is copied unless ``A``
    declares ``fresh_products`` (:class:`hessfast.LinearOperator`) and it is already in the
    working dtype and on ``A.device``."""

    def __init__(self, A: LinearOperator, work: torch.dtype, who: str) -> None:
        self.A = A
        self.work = work
        self.device = torch.device(A.device)
        self.who = who
        self._copy = not getattr(A, "fresh_products", False)
        self.num_matvecs = 0
        self.num_passes = 0

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        """``[k, n]`` rows ``A v_i`` (a tensor the caller owns: it may update it in place)."""
        out = self.A.matmat(V)
        self.num_matvecs += V.shape[0]
        self.num_passes += 1
        out = out.to(device=self.device, dtype=self.work, copy=self._copy)
        if not all_finite(out):
            raise NonFiniteError(
                f"{self.who}: the operator returned NaN or Inf for a block of {V.shape[0]} "
                f"vectors (pass {self.num_passes}, {self.num_matvecs} products so far); check "
                "the model and loss for overflow (fp16?) and the data for NaN"
            )
        return out
