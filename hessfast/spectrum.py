"""Spectral quantities of a symmetric :class:`~hessfast.linop.LinearOperator`.

:func:`eigsh` (thick-restart block Lanczos, :mod:`hessfast.lanczos`) and :func:`lambda_max`;
power iteration with a residual-based stop, the baseline the peer libraries use, as
``eigsh(method="power")``. Plain power iteration converges to the eigenvalue of largest
*magnitude*; with ``which="LA"`` a shifted second run turns a negative dominant eigenvalue
into the largest algebraic one, so a negative number is never reported as lambda_max when a
positive eigenvalue exists.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch

from .errors import ConfigurationError
from .lanczos import WHICH, block_lanczos, select
from .linop import LinearOperator

__all__ = [
    "ConditionResult",
    "EigshResult",
    "PowerResult",
    "condition_number",
    "eigsh",
    "lambda_max",
    "power_iteration",
]


@dataclass(frozen=True)
class PowerResult:
    """Result of :func:`power_iteration`.

    Attributes:
        eigenvalue: the Ritz value (float64 arithmetic).
        eigenvector: ``[n]`` unit vector.
        residual: ``||A v - theta v||``.
        converged: residual <= tol * max(|theta|, 1e-3 * ||A||_est).
        num_matvecs: products with A.
        seconds: wall time.
    """

    eigenvalue: float
    eigenvector: torch.Tensor
    residual: float
    converged: bool
    num_matvecs: int
    seconds: float


def _power(
    A: LinearOperator, v: torch.Tensor, shift: float, tol: float, max_matvecs: int
) -> tuple[float, torch.Tensor, float, bool, int, float]:
    """Power iteration on ``A - shift I``; returns the Ritz value of A itself."""
    theta, res, norm_est, used = 0.0, math.inf, 0.0, 0
    for _ in range(max_matvecs):
        w = A.matvec(v).double()
        used += 1
        theta = float(torch.dot(v.double(), w))
        res = float((w - theta * v.double()).norm())
        norm_est = max(norm_est, float(w.norm()))
        if res <= tol * max(abs(theta), 1e-3 * norm_est):
            return theta, v, res, True, used, norm_est
        w = w - shift * v.double()
        wn = float(w.norm())
        if wn == 0.0:  # v is in the null space of A - shift I: exact eigenvector
            return theta, v, res, res == 0.0, used, norm_est
        v = (w / wn).to(v.dtype)
    return theta, v, res, False, used, norm_est


def power_iteration(
    A: LinearOperator,
    *,
    which: str = "LA",
    tol: float = 1e-4,
    max_matvecs: int = 1000,
    seed: int = 0,
) -> PowerResult:
    """Dominant eigenpair of a symmetric operator by power iteration.

    Args:
        A: symmetric operator ``[n, n]``.
        which: ``"LM"`` (largest magnitude, what plain power iteration finds) or ``"LA"``
            (largest algebraic: when the dominant eigenvalue is negative, a second run on
            ``A - theta I`` finds the top of the spectrum).
        tol: relative residual tolerance.
        max_matvecs: budget over both runs.
        seed: seed of the start vector (a private generator; the global RNG is untouched).

    Returns:
        :class:`PowerResult`.
    """
    if which not in ("LA", "LM"):
        raise ConfigurationError(f"which must be 'LA' or 'LM' for power iteration, got {which!r}")
    if not (tol > 0 and math.isfinite(tol)):
        raise ConfigurationError(f"tol must be a positive finite number, got {tol}")
    if max_matvecs < 1:
        raise ConfigurationError(f"max_matvecs must be >= 1, got {max_matvecs}")
    n = A.shape[0]
    if n == 0:
        raise ConfigurationError("the operator is empty (n = 0): it has no eigenvalues")
    t0 = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    v = (v / v.norm()).to(device=A.device, dtype=A.dtype)
    theta, v, res, ok, used, _ = _power(A, v, 0.0, tol, max_matvecs)
    if which == "LA" and theta < 0 and used < max_matvecs:
        # The dominant eigenvalue is negative; A - theta I is PSD with its largest
        # eigenvalue at lambda_max - theta, so power iteration on it finds lambda_max.
        v0 = torch.randn(n, generator=gen, dtype=torch.float64)
        v0 = (v0 / v0.norm()).to(device=A.device, dtype=A.dtype)
        theta, v, res, ok, more, _ = _power(A, v0, theta, tol, max_matvecs - used)
        used += more
    return PowerResult(theta, v, res, ok, used, time.perf_counter() - t0)


@dataclass(frozen=True)
class EigshResult:
    """Eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``[k]`` float64, most wanted first (``LA``: descending; ``SA``:
            ascending; ``LM``: by decreasing magnitude; ``BE``: alternating high, low).
        eigenvectors: ``[k, n]`` unit rows, in the operator's dtype and device.
        residuals: ``[k]`` float64 ``||A v - theta v||`` (from the Lanczos relation).
        converged: ``[k]`` bool: residual <= tol * max(|theta|, 1e-3 * ||A||_est).
        status: ``CONVERGED``, ``MAX_MATVECS``, ``INVARIANT_SUBSPACE`` or ``NONFINITE``.
        num_matvecs: vectors multiplied by A; num_passes: ``matmat`` calls (data passes).
        num_restarts: thick restarts; norm_estimate: the ||A|| estimate used in the floor.
        orthogonality: ``max|V V^T - I|`` of the returned vectors.
        seconds: wall time.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    status: str
    num_matvecs: int
    num_passes: int
    num_restarts: int
    norm_estimate: float
    orthogonality: float
    seconds: float
    which: str
    tol: float
    method: str


def _dense_eigsh(A: LinearOperator, k: int, which: str, tol: float, t0: float) -> EigshResult:
    mv0, p0 = A.num_matvecs, A.num_passes
    M = A.to_dense().double()
    theta, Y = torch.linalg.eigh(0.5 * (M + M.T))
    idx = select(theta.cpu(), k, which).to(theta.device)
    vecs = Y[:, idx].T.contiguous()
    res = (vecs @ M - theta[idx, None] * vecs).norm(dim=1).cpu()
    scale = float(theta.abs().max()) if theta.numel() else 0.0
    ok = res <= tol * torch.clamp(theta[idx].abs().cpu(), min=1e-3 * scale)
    gram = vecs @ vecs.T
    ortho = float((gram - torch.eye(k, dtype=gram.dtype, device=gram.device)).abs().max())
    return EigshResult(
        theta[idx].cpu(), vecs.to(A.dtype), res, ok, "CONVERGED" if bool(ok.all()) else
        "MAX_MATVECS", A.num_matvecs - mv0, A.num_passes - p0, 0, scale, ortho,
        time.perf_counter() - t0, which, tol, "dense",
    )


def eigsh(
    A: LinearOperator,
    k: int = 6,
    *,
    which: str = "LA",
    tol: float = 1e-4,
    max_matvecs: int | None = None,
    block_size: int | None = None,
    max_basis: int | None = None,
    v0: torch.Tensor | None = None,
    seed: int = 0,
    reorth: str = "full",
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    method: str = "lanczos",
    dense_below: int = 32,
) -> EigshResult:
    """k eigenpairs of a symmetric operator by thick-restart block Lanczos.

    Args:
        A: symmetric operator ``[n, n]`` (a model's Hessian/GGN or any LinearOperator).
        k: number of pairs, ``1 <= k <= n``.
        which: ``LA`` largest algebraic, ``SA`` smallest, ``LM`` largest magnitude, ``BE``
            both ends.
        tol: relative residual tolerance; converged when ``||A v - theta v|| <= tol *
            max(|theta|, 1e-3 ||A||_est)`` (the floor lets zero eigenvalues converge).
        max_matvecs: budget of products (default ``max(1000, 40 k)``); on exhaustion the
            partial result is returned with a warning and ``status == "MAX_MATVECS"``.
        block_size: rows per block, one data pass each (default ``min(k, 4)``).
        max_basis: basis rows before a thick restart (default ``max(2k + 2b, 32)``, <= n).
        v0: ``[n]`` or ``[j, n]`` start vectors, e.g. eigenvectors of an earlier run (with
            the default block size, the block grows to ``min(j, k)`` to use them all).
        seed: seed of the private generator for the random start (global RNG untouched).
        reorth: ``full`` (CGS2, default), ``partial`` or ``none``.
        basis_dtype: storage of the Krylov basis, e.g. ``torch.bfloat16`` (coefficients
            and the projection stay in fp32/fp64).
        basis_device: where the basis lives, e.g. ``"cpu"`` while A runs on a GPU.
        method: ``lanczos`` or ``power`` (k = 1 only; for parity with PyHessian).
        dense_below: operators with ``n <= dense_below`` are solved densely (n products),
            with a warning.

    Returns:
        :class:`EigshResult`.
    """
    t0 = time.perf_counter()
    if not isinstance(A, LinearOperator):
        raise TypeError(
            f"eigsh expects a hessfast.LinearOperator, got {type(A).__name__}; wrap a "
            "matrix with LinearOperator.from_matrix(M)"
        )
    n = A.shape[0]
    if which not in WHICH:
        raise ConfigurationError(f"which must be one of {WHICH}, got {which!r}")
    if not isinstance(k, int) or k < 1 or k > n:
        raise ConfigurationError(f"k must be an integer in [1, n={n}], got {k!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ConfigurationError(f"tol must be a positive finite number, got {tol!r}")
    if reorth not in ("full", "partial", "none"):
        raise ConfigurationError(f"reorth must be 'full', 'partial' or 'none', got {reorth!r}")
    if method not in ("lanczos", "power"):
        raise ConfigurationError(f"method must be 'lanczos' or 'power', got {method!r}")
    if max_matvecs is None:
        max_matvecs = max(1000, 40 * k)
    if max_matvecs < 1:
        raise ConfigurationError(f"max_matvecs must be >= 1, got {max_matvecs}")
    if method == "power":
        if k != 1:
            raise ConfigurationError(
                f"method='power' finds one eigenpair, got k={k}; use method='lanczos'"
            )
        if which not in ("LA", "LM"):
            raise ConfigurationError(f"method='power' supports which='LA' or 'LM', got {which}")
        mv0, p0 = A.num_matvecs, A.num_passes
        r = power_iteration(A, which=which, tol=tol, max_matvecs=max_matvecs, seed=seed)
        vec = r.eigenvector.unsqueeze(0)
        if not r.converged:
            warnings.warn(
                f"hessfast.eigsh(method='power'): not converged after {r.num_matvecs} "
                f"products (residual {r.residual:.3g}); returning the partial result",
                stacklevel=2,
            )
        return EigshResult(
            torch.tensor([r.eigenvalue], dtype=torch.float64), vec,
            torch.tensor([r.residual], dtype=torch.float64), torch.tensor([r.converged]),
            "CONVERGED" if r.converged else "MAX_MATVECS", A.num_matvecs - mv0,
            A.num_passes - p0, 0, abs(r.eigenvalue), 0.0, time.perf_counter() - t0, which,
            tol, "power",
        )
    if n <= dense_below or k > n // 2:
        warnings.warn(
            f"hessfast.eigsh: n={n} is tiny or k={k} is more than half of it; solving "
            f"densely ({n} products, float64 eigh)",
            stacklevel=2,
        )
        return _dense_eigsh(A, k, which, tol, t0)
    b = block_size if block_size is not None else min(k, 4)
    if block_size is None and v0 is not None and v0.dim() == 2:
        b = max(b, min(v0.shape[0], k))  # a warm start uses every given vector
    if not isinstance(b, int) or b < 1:
        raise ConfigurationError(f"block_size must be a positive integer, got {block_size!r}")
    b = min(b, n)
    cap = max_basis if max_basis is not None else max(2 * k + 2 * b, 32)
    cap = min(cap, n)
    if cap < k + 2 * b and cap < n:
        raise ConfigurationError(
            f"max_basis={cap} is too small for k={k} and block_size={b}: it needs at least "
            f"k + 2*block_size = {k + 2 * b}"
        )
    st = block_lanczos(
        A, k, which, tol=tol, block_size=b, max_basis=cap, max_matvecs=max_matvecs, v0=v0,
        seed=seed, reorth=reorth, basis_dtype=basis_dtype, basis_device=basis_device,
    )
    lost = 100 * math.sqrt(torch.finfo(basis_dtype or torch.float32).eps)
    if st.orthogonality > lost:
        warnings.warn(
            f"hessfast.eigsh: the returned vectors are far from orthogonal (max|V V^T - I| = "
            f"{st.orthogonality:.2g}, reorth={reorth!r}): duplicate 'ghost' eigenvalues and "
            "wrong residuals are likely. Use reorth='full'",
            stacklevel=2,
        )
    if st.status != "CONVERGED" and not bool(st.converged.all()):
        warnings.warn(
            f"hessfast.eigsh: {int(st.converged.sum())} of {k} pairs converged "
            f"(status {st.status}, {st.num_matvecs} products); returning the partial result "
            "with its residuals. Raise max_matvecs or tol",
            stacklevel=2,
        )
    return EigshResult(
        st.theta, st.vectors, st.residuals, st.converged, st.status, st.num_matvecs,
        st.num_passes, st.num_restarts, st.norm_estimate, st.orthogonality,
        time.perf_counter() - t0, which, tol, "lanczos",
    )


def lambda_max(A: LinearOperator, tol: float = 1e-4, **kwargs) -> float:
    """The largest algebraic eigenvalue of A (``eigsh(A, k=1, which="LA")``)."""
    return float(eigsh(A, k=1, which="LA", tol=tol, **kwargs).eigenvalues[0])


@dataclass(frozen=True)
class ConditionResult:
    """Conditioning of a symmetric operator.

    Attributes:
        lambda_max, lambda_min: extreme eigenvalues (``eigsh`` LA and SA).
        kappa: ``lambda_max / lambda_min`` when the operator is positive definite (lambda_min
            above the zero threshold), else ``inf``.
        definiteness: ``"positive definite"``, ``"singular"`` (|lambda_min| at or below the
            zero threshold ``tol * max(|lambda_max|, |lambda_min|)``) or ``"indefinite"``.
        negative_ratio: ``|lambda_min| / lambda_max`` for an indefinite operator (how strong
            the negative curvature is against the positive), else 0.
        negative_mass: fraction of the spectrum below ``-zero_threshold``, from an SLQ
            density (indefinite operators only; None otherwise or when ``density=False``).
        stable_lr: ``2 / lambda_max``: gradient descent with a larger step size diverges along
            the top eigenvector (inf when lambda_max <= 0).
        converged: both extreme eigenpairs converged.
        num_matvecs, seconds: total cost.
    """

    lambda_max: float
    lambda_min: float
    kappa: float
    definiteness: str
    negative_ratio: float
    negative_mass: float | None
    stable_lr: float
    zero_threshold: float
    converged: bool
    num_matvecs: int
    seconds: float


def condition_number(
    A: LinearOperator,
    *,
    tol: float = 1e-4,
    max_matvecs: int | None = None,
    density: bool = True,
    num_probes: int = 8,
    num_steps: int = 64,
    seed: int = 0,
) -> ConditionResult:
    """Condition number, definiteness and the stable learning rate of a symmetric operator.

    For a PSD operator (a GGN) ``kappa = lambda_max / lambda_min``; a Hessian is usually
    indefinite, and then ``kappa = inf`` and the result reports the negative curvature:
    ``lambda_min < 0``, ``|lambda_min| / lambda_max`` and the mass of the spectrum below zero
    from an SLQ density. The bottom of a network's spectrum is a tight cluster near zero, so
    ``lambda_min`` may need many products; raise ``max_matvecs`` or ``tol`` if it does not
    converge (``converged`` says so, with a warning from ``eigsh``).
    """
    t0 = time.perf_counter()
    mv0 = A.num_matvecs
    top = eigsh(A, k=1, which="LA", tol=tol, max_matvecs=max_matvecs, seed=seed)
    bottom = eigsh(A, k=1, which="SA", tol=tol, max_matvecs=max_matvecs, seed=seed + 1)
    lmax, lmin = float(top.eigenvalues[0]), float(bottom.eigenvalues[0])
    zero = tol * max(abs(lmax), abs(lmin))
    if lmin > zero:
        definiteness, kappa = "positive definite", lmax / lmin
    elif lmin >= -zero:
        definiteness, kappa = "singular", math.inf
    else:
        definiteness, kappa = "indefinite", math.inf
    neg_ratio = abs(lmin) / lmax if definiteness == "indefinite" and lmax > 0 else 0.0
    neg_mass = None
    if definiteness == "indefinite" and density:
        from .density import spectral_density

        d = spectral_density(A, num_probes=num_probes, num_steps=num_steps, seed=seed)
        neg_mass = float((d.weights * (d.nodes < -zero)).sum(dim=1).mean())
    return ConditionResult(
        lambda_max=lmax, lambda_min=lmin, kappa=kappa, definiteness=definiteness,
        negative_ratio=neg_ratio, negative_mass=neg_mass,
        stable_lr=2.0 / lmax if lmax > 0 else math.inf, zero_threshold=zero,
        converged=bool(top.converged.all() and bottom.converged.all()),
        num_matvecs=A.num_matvecs - mv0, seconds=time.perf_counter() - t0,
    )
