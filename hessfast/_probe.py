"""What every algorithm checks before its first product: under a process group, that every
rank runs it with the same arguments (:func:`agree_arguments`); and, once per generic
operator, that it is symmetric and gives the same product twice.

Agreement. When the algorithm's products are collective (a data-parallel curvature operator,
a ``mesh=``, ``basis_sharding=True``), :func:`probe_operator` first compares the algorithm's
name, the operator (size, dtype, and the digest of a curvature operator's parameters and
options) and every argument of the calling algorithm (``k``, ``which``, ``tol``, ``seed``,
``max_matvecs``, ``v0`` by SHA-256, ...; read from the caller's frame, or given as
``args=``) across the group in ONE all-gather of a fixed-size digest. A difference raises
:class:`~hessfast.errors.DistributedError` on every rank, naming the argument and each rank's
value, before any product. Without it, ranks asking for different work run different
sequences of collectives: a gloo "Connection closed by peer" on one rank while another
returns a number, or a hang until the group's timeout. Not compared: ``progress`` (a display)
and device indices (``"cuda:1"`` compares as ``"cuda"``: each rank has its own GPU).

Every algorithm (``eigsh``, ``lambda_max``, ``power_iteration``, ``condition_number``,
``trace``, ``diagonal``, ``spectral_density``) calls :func:`probe_operator` after validating
its arguments and before its first product. An operator is probed once: afterwards
``A.checked`` is True and later calls cost nothing. Not probed:

* ``LinearOperator.from_matrix`` operators (the matrix was checked symmetric, or the user
  waived it with ``check_symmetric=False``);
* ``LinearOperator.from_function(..., check=False)``, or any operator with
  ``A.checked = True`` set by its owner;
* operators whose class sets ``checks_itself = True`` because they run their own pre-flight:
  the model operators of :mod:`hessfast.curvature` (pre-flight ``check=True``; the user's
  ``check=False`` is respected too).

The probe: two random vectors ``X = [u; v]`` (``[2, n]``, standard normal, from a private
generator: the global RNG is untouched) multiplied twice, ``Y1 = A X`` and ``Y2 = A X``:
``PROBE_MATVECS = 4`` products in 2 ``matmat`` calls. They count in the operator's own
``A.num_matvecs`` / ``A.num_passes``; a result's ``num_matvecs`` counts the algorithm's
products only.

* determinism: ``||Y1 - Y2|| <= tol ||Y1||``;
* symmetry: ``|u.(Av) - v.(Au)| <= tol (||u|| ||Av|| + ||v|| ||Au||) / sqrt(n)`` (the dot
  products of random vectors are ``~1/sqrt(n)`` of the product of the norms, and so is their
  rounding);

with ``tol = PROBE_SLACK * eps * sqrt(n)``: ``eps`` of the operator's dtype (for float32,
that of TF32/bf16 when ``torch.get_float32_matmul_precision()`` lowers matmuls to them), and
``sqrt(n)`` the growth of rounding in a sum of n terms. Both tests are scale-invariant. What it
catches: an asymmetric part above ``~tol`` of the operator in the Frobenius norm (e.g.
``S + 1e-2 N``: found at any n in float64, up to n ~ 1e6 in float32), and random products
(noise, dropout, sampling) above ``~tol`` relative.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import os
import sys
from collections.abc import Mapping
from types import FrameType
from typing import Any

import torch

from ._checks import probe_generator
from .errors import AsymmetricOperatorError, NonDeterministicError, NonFiniteError
from .linop import global_size, row_dots

__all__ = ["PROBE_MATVECS", "PROBE_SLACK", "agree_arguments", "probe_operator"]

#: Products one probe costs (two vectors, multiplied twice).
PROBE_MATVECS = 4
#: Rounding allowance in units of ``eps * sqrt(n)``.
PROBE_SLACK = 16.0
_PROBE_SEED = 20261201
# float32 matmul precision below "highest": TF32 (10 explicit mantissa bits) or bf16 (7)
_LOWERED_EPS = {"high": 2.0**-10, "medium": 2.0**-7}
# Arguments the ranks need not share: a display, and the operator itself (compared apart).
_NOT_COMPARED = frozenset({"A", "progress"})
# Fields of a reused result (condition_number(lambda_max=EigshResult)) that differ per rank.
_PER_RANK = frozenset({"seconds", "num_passes"})
_AGREE_FIX = (
    "Every rank of the process group must run the same algorithm with the same arguments, "
    "in the same order (the products are collective): pass the same values on every rank "
    "(print or log from rank 0 only: hf.distributed.is_main_process()); a value hessfast chose "
    "per rank (basis_dtype from each device's free memory) must then be passed explicitly"
)
_FIX = (
    "if this is intended (rounding of a lower-precision computation), skip the check with "
    "LinearOperator.from_function(..., check=False) or by setting A.checked = True"
)


def _skip(A: Any) -> bool:
    # model operators (hessfast.curvature) set checks_itself: they run their own pre-flight
    return bool(getattr(A, "checked", False) or getattr(type(A), "checks_itself", False))


def _mark(A: Any) -> None:
    try:
        A.checked = True
    except AttributeError:  # a duck-typed operator that refuses attributes: probed each time
        pass


def rounding_eps(dtype: torch.dtype) -> float:
    """The unit roundoff the operator's products are computed with."""
    eps = torch.finfo(dtype).eps
    if dtype == torch.float32:
        eps = max(eps, _LOWERED_EPS.get(torch.get_float32_matmul_precision(), 0.0))
    return float(eps)


def caller_arguments(frame: FrameType) -> dict[str, Any]:
    """The parameters of the function running in ``frame`` and their current values (after
    the function's own validation reassigned them), in signature order."""
    code = frame.f_code
    count = code.co_argcount + code.co_kwonlyargcount
    count += bool(code.co_flags & inspect.CO_VARARGS)
    count += bool(code.co_flags & inspect.CO_VARKEYWORDS)
    local = frame.f_locals
    return {name: local[name] for name in code.co_varnames[:count] if name in local}


def _value_text(value: Any, name: str = "") -> str:
    """``value`` as text that is equal on two ranks exactly when the values are: tensors by
    shape, dtype and the SHA-256 of their bits, devices by type, objects field by
    field, anything else unknown by its type only (never an address)."""
    from .distributed import Mesh

    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        if isinstance(value, str) and "device" in name:
            try:
                return repr(torch.device(value).type)
            except (RuntimeError, ValueError):
                pass
        return repr(value) if not isinstance(value, torch.dtype) else str(value)
    if isinstance(value, torch.device):
        return repr(value.type)
    if isinstance(value, torch.Tensor):  # SHA-256 of the bits (a sum misses sign flips)
        raw = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest = hashlib.sha256(raw.numpy()).hexdigest()[:16]
        return f"tensor {tuple(value.shape)} {value.dtype} sha256 {digest}"
    if isinstance(value, Mesh):
        return f"Mesh(probe={value.probe}, data={value.data})"
    if isinstance(value, os.PathLike):
        return repr(os.fspath(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value_text(v, name) for v in value) + "]"
    if isinstance(value, Mapping):
        items = sorted((str(k), v) for k, v in value.items())
        return "{" + ", ".join(f"{k}: {_value_text(v, k)}" for k, v in items) + "}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ", ".join(f"{f.name}={_value_text(getattr(value, f.name), f.name)}"
                           for f in dataclasses.fields(value) if f.name not in _PER_RANK)
        return f"{type(value).__qualname__}({fields})"
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '?')}"
    return f"<{type(value).__qualname__}>"


def _agreement_comm(A: Any, args: Mapping[str, Any]) -> Any:
    """The group whose ranks run this algorithm together, or None (no collective)."""
    from . import distributed

    mesh = args.get("mesh")
    if isinstance(mesh, distributed.Mesh) and mesh.comm is not None:
        return mesh.comm  # the whole mesh: every probe group's operator too
    ranks = getattr(A, "ranks", None)
    if ranks is not None and getattr(ranks, "active", False):
        return ranks.comm
    shards = getattr(A, "shards", None)
    if shards is not None and getattr(shards, "size", 1) > 1:
        return shards  # vectors sharded over these ranks (an FSDP model): they run together
    if args.get("basis_sharding") is True and distributed.world_size() > 1:
        return distributed.Comm()  # a replicated operator's basis over the default group
    return None


def agree_arguments(A: Any, who: str, args: Mapping[str, Any]) -> None:
    """Under a process group whose ranks run this algorithm together, check that every rank
    runs ``who`` on the same operator with the same ``args`` (module docstring): one
    all-gather of a fixed-size digest; nothing without such a group.

    Raises:
        DistributedError: on every rank, naming the first differing argument (or the
            algorithm, or the operator) and each rank's value.
    """
    comm = _agreement_comm(A, args)
    if comm is None:
        return
    digest = getattr(getattr(A, "ranks", None), "digest", "")
    sharded = getattr(A, "shards", None) is not None
    # sharded vectors: each rank's n and v0 are its own shares; the whole length must agree
    n = global_size(A) if sharded else A.shape[0]
    entries = [
        ("the algorithm", who),
        ("the operator", f"{type(A).__name__} n={int(n)} {A.dtype}"
                         + (f" parameters and options {digest[:16]}" if digest else "")),
    ]
    for name, value in args.items():
        if name in _NOT_COMPARED or value is A or (sharded and name == "v0"):
            continue
        entries.append((f"argument {name}", _value_text(value, name)))
    comm.agree(f"{who} (rank {comm.rank} of {comm.size})", entries, _AGREE_FIX)


def probe_operator(
    A: Any, who: str, args: Mapping[str, Any] | None = None, *, agree_only: bool = False
) -> None:
    """Before an algorithm's first product: agree on the arguments across the ranks
    (:func:`agree_arguments`; ``args`` default: the calling algorithm's own parameters), then
    check once that ``A`` is symmetric and deterministic (module docstring).

    ``agree_only=True``: the agreement alone, for an algorithm that runs another collective
    before its first product (a checkpoint's fingerprint of a data-parallel operator): ranks
    that disagree would otherwise meet in different collectives and wait for the group's
    timeout. The later plain call agrees again (one more 40-byte all-gather).

    Raises:
        DistributedError: ranks running the algorithm together passed different arguments.
        NonDeterministicError: two products of the same vectors differ beyond rounding.
        AsymmetricOperatorError: ``u.(Av)`` and ``v.(Au)`` differ beyond rounding.
        NonFiniteError: a probe product contains NaN or Inf.
    """
    if args is None:
        frame = sys._getframe(1)
        try:
            args = caller_arguments(frame)
        finally:
            del frame  # no reference cycle through the caller's frame
    agree_arguments(A, who, args)
    if agree_only:
        return
    n = int(A.shape[0])
    if _skip(A) or n == 0:
        return
    gen = probe_generator(_PROBE_SEED)
    X = torch.randn((2, n), dtype=torch.float64, generator=gen)
    X = X.to(device=A.device, dtype=A.dtype)
    with torch.no_grad():
        Y1 = A.matmat(X)
        Y2 = A.matmat(X)
    x, y1, y2 = (t.detach().to(device="cpu", dtype=torch.float64) for t in (X, Y1, Y2))

    def dot(a: torch.Tensor, b: torch.Tensor) -> float:
        # summed over the ranks when the vectors are sharded (A.shards), so every rank
        # judges the whole vectors and takes the same decision (a NaN anywhere reaches all)
        return float(row_dots(A, a[None], b[None])[0])

    flat1, flat2 = y1.reshape(-1), y2.reshape(-1)
    if not math.isfinite(dot(flat1, flat1) + dot(flat2, flat2)):
        raise NonFiniteError(
            f"{who}: the operator returned NaN or Inf for random vectors (the one-time check "
            "of a new operator, before any computation); check the operator function"
        )
    n_all = global_size(A)
    tol = PROBE_SLACK * rounding_eps(A.dtype) * math.sqrt(n_all)
    d = (y1 - y2).reshape(-1)
    y = y1.reshape(-1)
    diff, size = math.sqrt(dot(d, d)), math.sqrt(dot(y, y))
    if diff > tol * size:
        raise NonDeterministicError(
            f"{who}: the operator is not deterministic: two products of the same 2 random "
            f"vectors differ by {diff / size:.3g} relative (||A x - A x|| / ||A x||; rounding "
            f"allows {tol:.3g}). Every hessfast algorithm needs the same product for the same "
            "vector (random noise, dropout, sampling or a random sketch inside the operator "
            "break convergence and error bars): make the operator deterministic (fix its "
            f"seed); {_FIX}"
        )
    u, v = x
    Au, Av = y1
    mismatch = abs(dot(u, Av) - dot(v, Au))
    scale = (math.sqrt(dot(u, u) * dot(Av, Av)) + math.sqrt(dot(v, v) * dot(Au, Au))
             ) / math.sqrt(n_all)
    if mismatch > tol * scale:
        raise AsymmetricOperatorError(
            f"{who}: the operator is not symmetric: |u.(Av) - v.(Au)| = {mismatch:.3g} for "
            f"random u, v, {mismatch / scale:.3g} of the scale (||u|| ||Av|| + ||v|| ||Au||) "
            f"/ sqrt(n) where rounding allows {tol:.3g}. hessfast's algorithms need a "
            "symmetric operator (an asymmetric one gives wrong eigenvalues that still look "
            f"converged): symmetrize it, e.g. (A v + A^T v) / 2; {_FIX}"
        )
    _mark(A)
