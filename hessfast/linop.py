"""The symmetric linear operator every hessfast algorithm consumes.

An operator maps a block of row vectors ``V: [k, n]`` to ``A V^T`` written back as rows,
``[k, n]``. Feeding whole blocks is the point: a model operator multiplies all k rows in
one pass over its data, so algorithms ask for blocks, never for one vector at a time.

This module imports nothing from torch.func and nothing from the kernel layers, so the
eigensolvers can depend on it alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextvars import ContextVar
from typing import ClassVar

import torch

from ._digest import tensor_digest
from .errors import ArgumentTypeError, AsymmetricOperatorError, ConfigurationError

__all__ = [
    "PRODUCT_LISTENERS", "LinearOperator", "global_size", "local_dots", "local_norm",
    "refuse_sharded", "row_dots",
]

#: Callbacks ``fn(k)`` told of every ``matmat`` of k vectors made in this context, by any
#: operator (:func:`hessfast.progress.track` installs one for a progress bar). Empty by
#: default: one context-variable lookup per ``matmat``, no synchronisation (k is a shape).
PRODUCT_LISTENERS: ContextVar[tuple[Callable[[int], None], ...]] = ContextVar(
    "hessfast_product_listeners", default=()
)


class LinearOperator:
    """A symmetric ``n x n`` operator applied to blocks of row vectors.

    Subclasses implement :meth:`_matmat`. The public :meth:`matmat` validates the block,
    casts it to the operator's dtype and device, and keeps the counters that explain the
    cost of a computation: ``num_matvecs`` (vectors multiplied) and ``num_passes`` (calls
    of ``matmat``: for a model operator, passes over the data).

    ``checked`` is True once the operator is known to be symmetric and deterministic. Every
    algorithm probes an unchecked operator once before using it (4 products, counted in
    ``num_matvecs``; see :mod:`hessfast._probe`) and sets it; set it yourself to skip the
    probe. A subclass whose constructor runs its own checks sets ``checks_itself = True``.
    """

    #: True for subclasses that check symmetry and determinism themselves (never probed).
    checks_itself: ClassVar[bool] = False
    #: The ranks over which every vector of this operator is SHARDED (a
    #: :class:`hessfast.distributed.Comm`): each rank's ``[k, n]`` blocks hold only its own
    #: ``n`` entries of every global vector (an FSDP model's local parameter shards), so a
    #: dot product is the local one summed over these ranks (:func:`row_dots`). None (the
    #: default): every rank holds whole vectors. Algorithms that cannot work on shards
    #: refuse an operator whose ``shards`` is set (:func:`refuse_sharded`).
    shards: object | None = None
    #: True for subclasses whose :meth:`_matmat` always returns a NEW tensor that nothing
    #: else references (the model operators: every product is a fresh parameter-sized
    #: block): algorithms may then update it in place instead of copying it first (a
    #: parameter-sized copy per product, 3 GB at GPT-2 large). False (the default): the
    #: result may be a view of the input or of the operator's own state, and is copied.
    fresh_products: ClassVar[bool] = False

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | str) -> None:
        if int(n) < 0:
            raise ConfigurationError(f"operator size n must be >= 0, got {n}")
        self.shape: tuple[int, int] = (int(n), int(n))
        self.dtype: torch.dtype = dtype
        self.device: torch.device = torch.device(device)
        self.num_matvecs: int = 0
        self.num_passes: int = 0
        self.checked: bool = False

    # -- to implement -------------------------------------------------------------
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Return the products for a validated block ``V: [k, n]`` as ``[k, n]``."""
        raise NotImplementedError

    # -- public -------------------------------------------------------------------
    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Multiply a block of row vectors.

        Args:
            V: ``[k, n]`` block; each row is one vector.

        Returns:
            ``[k, n]`` tensor whose row i is ``A @ V[i]``, in ``self.dtype`` on
            ``self.device``.

        Raises:
            ArgumentTypeError: ``V`` is not a tensor, or is complex or not floating point.
            ConfigurationError: ``V`` is not ``[k, n]``, lives on the meta device (no data)
                or cannot be moved to ``self.device``; or the operator returned another
                shape than ``[k, n]``.
        """
        V = self._checked_block(V)
        k, n = V.shape
        if k == 0:
            return V.new_zeros((0, n))
        out = self._matmat(V)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (k, n):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigurationError(
                f"{type(self).__name__} returned {got} for a block [{k}, {n}]; an operator "
                f"must map [k, n] to [k, n]: return one product per row of the block"
            )
        self.num_matvecs += k
        self.num_passes += 1
        for listener in PRODUCT_LISTENERS.get():
            listener(k)
        return out

    def _checked_block(self, V: object) -> torch.Tensor:
        """``V`` checked (a real floating-point ``[k, n]`` tensor holding data) and moved to
        the operator's dtype and device."""
        n = self.shape[0]
        if not isinstance(V, torch.Tensor):
            raise ArgumentTypeError(
                f"matmat expects a torch.Tensor [k, {n}], got {type(V).__name__}"
            )
        if V.dim() != 2 or V.shape[1] != n:
            raise ConfigurationError(
                f"matmat expects a block of row vectors [k, {n}], got shape {tuple(V.shape)}; "
                "for a single vector use matvec or `op @ v`"
            )
        if V.is_complex():
            raise ArgumentTypeError(
                f"matmat expects real vectors, got dtype {V.dtype}: the operator is real, so "
                "multiply the real and imaginary parts separately (A @ X.real, A @ X.imag) "
                "and combine them"
            )
        if not V.is_floating_point():
            raise ArgumentTypeError(
                f"matmat expects floating-point vectors, got dtype {V.dtype}: pass "
                f"V.to({self.dtype})"
            )
        if V.device.type == "meta":
            raise ConfigurationError(
                f"matmat got a block on the meta device (shapes without data), but the "
                f"operator lives on {self.device}: create the vectors there "
                f"(torch.randn(k, {n}, device={str(self.device)!r}, dtype={self.dtype}))"
            )
        try:
            return V.to(device=self.device, dtype=self.dtype)
        except (RuntimeError, NotImplementedError) as exc:
            raise ConfigurationError(
                f"matmat cannot move a block on {V.device} to the operator's device "
                f"{self.device} ({type(exc).__name__}: {exc}); create the vectors on "
                f"{self.device}"
            ) from exc

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Multiply one vector ``v: [n]`` and return ``[n]``."""
        if not isinstance(v, torch.Tensor) or v.dim() != 1:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"matvec expects a vector [n], got {shape}")
        return self.matmat(v.unsqueeze(0))[0]

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        """``A @ v`` for ``v: [n]``; ``A @ X`` for ``X: [n, k]`` (matrix convention)."""
        if isinstance(x, torch.Tensor) and x.dim() == 2:
            return self.matmat(x.T).T
        return self.matvec(x)

    def to_dense(self, block_size: int = 64) -> torch.Tensor:
        """The operator as a dense ``[n, n]`` matrix (small n only: n products).

        Raises:
            ConfigurationError: the operator's vectors are sharded over ranks (``shards``).
        """
        refuse_sharded(self, "to_dense", "Build the dense matrix from the unsharded model on "
                       "one process.")
        n = self.shape[0]
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        cols = [self.matmat(eye[i : i + block_size]) for i in range(0, n, block_size)]
        if not cols:
            return eye
        return torch.cat(cols, dim=0).T.contiguous()

    def __repr__(self) -> str:
        n = self.shape[0]
        return f"{type(self).__name__}(n={n}, dtype={self.dtype}, device={self.device})"

    def state_fingerprint(self) -> dict[str, str] | None:
        """What the products depend on besides ``n`` and the dtype, as short strings, for a
        checkpoint to bind to (:mod:`hessfast.lanczos.checkpoint`: a file saved with another
        state is refused, naming the entries that differ).

        ``from_matrix``: ``{"matrix": digest}`` (a SHA-256 of the matrix's bits). Model
        operators (:func:`hessfast.hessian`, :func:`hessfast.ggn`): every parameter and buffer
        by name with its shape, dtype and bits, and the data. ``from_function`` and this
        default: None, no state hessfast can read (a Python function's closure may change
        unseen), so a checkpoint is bound by the arguments only: give a changed function a
        new checkpoint path. A subclass that wraps another operator should return the
        wrapped operator's entries plus its own.
        """
        return None

    @property
    def product_error(self) -> float | None:
        """The relative error of one product when the products are not exact to rounding
        (a finite-difference Hessian: its measured ``fd_error``), else None. Krylov
        methods floor their residuals at ``product_error * ||A||_est``: no residual below
        the products' own error can be shown, so convergence is judged to that accuracy
        (the result's ``residual_floor`` says so)."""
        return None

    def saved_bytes(self) -> int | None:
        """Bytes one product keeps saved for its backward passes, the unit the memory plan
        (:func:`hessfast.estimate_memory`) scales its activation estimate by; None: unknown.

        Model operators (:func:`hessfast.hessian`, :func:`hessfast.ggn`): the bytes autograd
        saves for batch 0's first-order graph (forward and gradient with its graph, each
        storage once), measured once by building that graph (about one gradient; the
        user's model untouched) and cached. This default, ``from_matrix`` and
        ``from_function``: None (no graph hessfast can measure). A subclass that overrides
        it tells the memory plan that its products build graphs worth measuring.
        """
        return None

    # -- constructors -------------------------------------------------------------
    @staticmethod
    def from_matrix(M: torch.Tensor, *, check_symmetric: bool = True) -> LinearOperator:
        """Wrap a dense symmetric matrix ``M: [n, n]``.

        Raises:
            AsymmetricOperatorError: ``M`` differs from ``M.T`` by more than rounding.
        """
        return _MatrixOperator(M, check_symmetric=check_symmetric)

    @staticmethod
    def from_function(
        fn: Callable[[torch.Tensor], torch.Tensor],
        n: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        check: bool = True,
    ) -> LinearOperator:
        """Wrap ``fn: [k, n] -> [k, n]``, a symmetric operator given by its block product.

        ``fn`` must return real floating-point products ``[k, n]`` (another floating dtype or
        device is cast to the operator's); a complex or integer result raises
        ``ArgumentTypeError`` naming its dtype (a cast would drop the imaginary part), and
        a result of another shape ``ConfigurationError``.

        With ``check=True`` (default) the first algorithm that uses the operator probes it
        once (4 products: symmetry ``u.(Av) = v.(Au)`` and determinism ``A x = A x`` to
        rounding) and raises ``AsymmetricOperatorError`` / ``NonDeterministicError`` naming
        the measured mismatch; ``check=False`` skips the probe (``checked`` is then True).
        """
        if not callable(fn):
            raise TypeError(f"from_function expects a callable [k, n] -> [k, n], got {fn!r}")
        if not isinstance(check, bool):
            raise ConfigurationError(f"from_function: check must be True or False, got {check!r}")
        op = _FunctionOperator(fn, n, dtype, device)
        op.checked = not check
        return op


class _MatrixOperator(LinearOperator):
    def __init__(self, M: torch.Tensor, *, check_symmetric: bool) -> None:
        if not isinstance(M, torch.Tensor) or M.dim() != 2 or M.shape[0] != M.shape[1]:
            shape = tuple(M.shape) if isinstance(M, torch.Tensor) else type(M).__name__
            raise ValueError(f"from_matrix expects a square matrix [n, n], got {shape}")
        if not M.is_floating_point():
            raise TypeError(f"from_matrix expects a floating-point matrix, got {M.dtype}")
        if check_symmetric and M.numel():
            asym = (M - M.T).abs().max().item()
            scale = M.abs().max().item()
            # Rounding in a product computed symmetrically is a few ulps of the entries.
            if asym > 64 * torch.finfo(M.dtype).eps * scale:
                raise AsymmetricOperatorError(
                    f"from_matrix: max|M - M.T| = {asym:.3g} against max|M| = {scale:.3g}; "
                    "hessfast's algorithms need a symmetric matrix: pass (M + M.T) / 2 or "
                    "check_symmetric=False if the asymmetry is intended rounding"
                )
        super().__init__(M.shape[0], M.dtype, M.device)
        self.matrix = M
        self.checked = True  # symmetric as checked above (or waived); a matrix is deterministic

    def state_fingerprint(self) -> dict[str, str]:
        """``{"matrix": "(n, n):dtype:sha256"}`` of the matrix's bits (a changed entry changes
        it; :meth:`LinearOperator.state_fingerprint`)."""
        return {"matrix": tensor_digest(self.matrix)}

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return V @ self.matrix.T


class _FunctionOperator(LinearOperator):
    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        n: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__(n, dtype, device)
        self.fn = fn

    def state_fingerprint(self) -> None:
        """None: a function's state (its closure, the tensors it reads) cannot be read, so a
        checkpoint of a function operator is bound by the arguments only
        (:meth:`LinearOperator.state_fingerprint`)."""
        return None

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.fn(V)
        k, n = V.shape
        if not isinstance(out, torch.Tensor):
            raise ArgumentTypeError(
                f"the operator function returned {type(out).__name__}; it must return a "
                f"tensor [k, n] for a block [k, n]"
            )
        if out.is_complex() or not out.is_floating_point():
            # .to() would drop an imaginary part (with only torch's warning) or read
            # integers as if they were the product
            fix = (
                "return a real tensor: a symmetric real operator has real products (if the "
                "imaginary part is rounding, return out.real)"
                if out.is_complex()
                else "compute the products in floating point"
            )
            raise ArgumentTypeError(
                f"the operator function returned dtype {out.dtype} for a block [{k}, {n}] of "
                f"{V.dtype}; it must return real floating-point products [k, n] "
                f"(the operator's dtype is {self.dtype}): {fix}"
            )
        if tuple(out.shape) != (k, n):
            raise ConfigurationError(
                f"the operator function returned shape {tuple(out.shape)} for a block "
                f"[{k}, {n}]; it must return one product per row: [k, n] (for a function "
                "of one vector, wrap it: lambda V: torch.stack([f(v) for v in V]))"
            )
        if out.device.type == "meta":
            raise ConfigurationError(
                f"the operator function returned a tensor on the meta device (no data) for "
                f"a block on {V.device}; it must compute the products (on {self.device})"
            )
        return out.to(dtype=self.dtype, device=self.device)


#: :func:`local_dots` converts at most this many entries (per row) to float64 at a time.
#: Converting whole rows cost 6 vectors' worth of float64 copies at the peak of every lean
#: step (3 GB at GPT-2 small's 124M parameters); slices of 2 MiB are reused by the allocator
#: where fresh large blocks are page-faulted in each time (one dot of two 124M rows, cpu2:
#: 1.17 s with 4M-entry slices, 0.15 s with 1M, 0.09 s with 256K; float32 torch.dot 0.03 s)
DOT_CHUNK = 1 << 18


def local_dots(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products ``[k]`` (float64, on ``X``'s device) of two ``[k, n]`` blocks,
    each product formed in float64, summed slice by slice (:data:`DOT_CHUNK` entries of a row
    at a time). ``X is Y`` gives squared norms."""
    k, n = X.shape[0], X.shape[-1]
    width = max(1, DOT_CHUNK // max(k, 1))
    if n <= width:  # one slice: the whole rows at once
        x = X.double()
        return x.pow(2).sum(-1) if X is Y else (x * Y.double()).sum(dim=-1)
    out = torch.zeros(X.shape[:-1], dtype=torch.float64, device=X.device)
    for a in range(0, n, width):
        x = X[..., a : a + width].double()
        out += x.pow(2).sum(-1) if X is Y else (x * Y[..., a : a + width].double()).sum(-1)
    return out


def local_norm(x: torch.Tensor) -> float:
    """The 2-norm of a whole tensor (any shape), summed in float64 slice by slice
    (:func:`local_dots`): ``torch.linalg.vector_norm(x, dtype=torch.float64)`` converts all of
    ``x`` to float64 first (two vectors' worth of float32 at a time)."""
    flat = x.reshape(1, -1)
    return math.sqrt(float(local_dots(flat, flat)[0]))


def row_dots(A: LinearOperator, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products ``[k]`` (float64, CPU) of two ``[k, n]`` blocks of ``A``'s
    vectors: the local sums, added over ``A.shards``' ranks when the vectors are sharded
    (one all-reduce of k numbers). ``X is Y`` gives squared norms."""
    local = local_dots(X, Y)
    comm = A.shards
    if comm is None:
        return local.cpu()
    return comm.allreduce_sum_(local.cpu(), "the dot products of sharded vectors").cpu()  # type: ignore[attr-defined]


def global_size(A: LinearOperator) -> int:
    """The length of ``A``'s whole vectors: ``A.shape[0]``, or its sum over ``A.shards``'
    ranks when the vectors are sharded (the operator's ``global_size`` when it has one, else
    one all-reduce of an int). What size-based choices (a dense route for tiny operators,
    ``k <= n``) must see, so that every rank takes the same one."""
    n = int(A.shape[0])
    comm = A.shards
    if comm is None:
        return n
    known = getattr(A, "global_size", None)
    if isinstance(known, int):
        return known
    return int(comm.allreduce_ints([n], "the sharded vectors' sizes")[0])  # type: ignore[attr-defined]


def refuse_sharded(A: LinearOperator, who: str, instead: str) -> None:
    """Raise ConfigurationError when ``A``'s vectors are sharded over ranks (``A.shards``)
    and the caller (``who``) needs whole vectors; ``instead`` names what runs on shards."""
    if A.shards is not None:
        raise ConfigurationError(
            f"{who}: this operator's vectors are sharded over the ranks (an FSDP model: each "
            f"rank holds its parameter shards only), and {who} needs whole vectors. {instead}"
        )
