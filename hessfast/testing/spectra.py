"""Symmetric test matrices with prescribed spectra.

Each builder returns ``(M, eigenvalues)``: ``M = Q diag(lam) Q^T`` in float64 with a seeded
random orthogonal ``Q`` (or a classical tridiagonal matrix), and its exact eigenvalues sorted
ascending. Diagonal matrices are avoided on purpose: Rademacher probes are exact on them and
hide estimator bugs. Wrap ``M`` with :meth:`hessfast.LinearOperator.from_matrix` to hand it to
a solver.

The families are the shapes that break Krylov solvers and stochastic estimators: zero and
scaled identities (breakdown at once), evenly spaced and geometric spectra, one outlier over a
tiny bulk (the shape of a network Hessian), repeated eigenvalues, Wilkinson's nearly equal
pairs, Strakos' spectrum (orthogonality lost fast), low rank, slow and fast decay, Wishart
(also shifted to indefinite), and a negative eigenvalue that dominates in magnitude.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "DTYPE",
    "clustered",
    "decaying",
    "evenly_spaced",
    "geometric",
    "low_rank_psd",
    "negative_dominant",
    "random_orthogonal",
    "scaled_identity",
    "strakos",
    "two_values",
    "wilkinson",
    "wishart",
    "with_spectrum",
    "zero",
]

DTYPE = torch.float64


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A Haar-distributed orthogonal ``[n, n]`` float64 matrix (QR of a Gaussian, signs fixed).

    Drawn from a private generator: the global torch RNG is untouched.
    """
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=gen, dtype=DTYPE)
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, torch.ones(()))


def with_spectrum(lam: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The matrix with prescribed eigenvalues: ``Q diag(lam) Q^T`` for a random orthogonal
    ``Q`` (:func:`random_orthogonal` with ``seed``), symmetrised exactly, and ``sort(lam)``.

    Args:
        lam: eigenvalues ``[n]``, any order, repeats allowed.
        seed: seed of ``Q``.

    Returns:
        ``(M [n, n], eigenvalues [n] ascending)``, both float64.
    """
    lam = lam.to(DTYPE)
    n = lam.numel()
    Q = random_orthogonal(n, seed)
    M = (Q * lam) @ Q.T
    M = 0.5 * (M + M.T)
    return M, torch.sort(lam).values


def zero(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The zero matrix (every Krylov method breaks down at its first step)."""
    return torch.zeros(n, n, dtype=DTYPE), torch.zeros(n, dtype=DTYPE)


def scaled_identity(n: int, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``c I`` (one eigenvalue of multiplicity n: an invariant subspace after one step)."""
    return c * torch.eye(n, dtype=DTYPE), torch.full((n,), c, dtype=DTYPE)


def evenly_spaced(n: int, seed: int = 0, signs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues evenly spaced from 1 down to 1/n; ``signs=True`` flips random ones."""
    lam = torch.linspace(1.0, 1.0 / n, n, dtype=DTYPE)
    if signs:
        gen = torch.Generator().manual_seed(seed + 1)
        lam = lam * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(DTYPE)
    return with_spectrum(lam, seed)


def geometric(n: int, seed: int = 0, low: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues geometrically spaced from 1 down to ``low``."""
    lam = torch.logspace(0.0, math.log10(low), n, dtype=DTYPE)
    return with_spectrum(lam, seed)


def clustered(n: int, seed: int = 0, tail: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """One eigenvalue 1 and n-1 tiny ones: the shape of a network Hessian."""
    lam = torch.full((n,), tail, dtype=DTYPE)
    lam[0] = 1.0
    return with_spectrum(lam, seed)


def two_values(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues 1 and 2, each of multiplicity n/2: a solver that keeps only as many copies
    of an eigenvalue as its block size returns a wrong top-k here."""
    lam = torch.ones(n, dtype=DTYPE)
    lam[n // 2 :] = 2.0
    return with_spectrum(lam, seed)


def wilkinson(m: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """W_{2m+1}^+: diagonal |m..0..m|, off-diagonal ones; nearly equal top pairs."""
    n = 2 * m + 1
    d = torch.tensor([abs(m - i) for i in range(n)], dtype=DTYPE)
    M = torch.diag(d) + torch.diag(torch.ones(n - 1, dtype=DTYPE), 1)
    M = M + torch.diag(torch.ones(n - 1, dtype=DTYPE), -1)
    return M, torch.linalg.eigvalsh(M)


def strakos(n: int = 100, l1: float = 0.1, ln: float = 100.0, rho: float = 0.9, seed: int = 0):
    """Strakos spectrum: eigenvalues accumulate at the low end; Lanczos loses orthogonality
    fast on it without reorthogonalization."""
    i = torch.arange(n, dtype=DTYPE)
    lam = l1 + (i / (n - 1)) * (ln - l1) * rho ** (n - 1 - i)
    return with_spectrum(lam, seed)


def low_rank_psd(n: int, r: int, seed: int = 0, tail: float = 0.0):
    """Rank r positive semi-definite (eigenvalues 10..1), plus ``tail`` on the other n-r."""
    lam = torch.full((n,), tail, dtype=DTYPE)
    lam[:r] = torch.linspace(10.0, 1.0, r, dtype=DTYPE)
    return with_spectrum(lam, seed)


def decaying(n: int, seed: int = 0, kind: str = "harmonic"):
    """Eigenvalues ``1/(i+1)`` (``kind="harmonic"``) or ``0.7**i`` (anything else)."""
    i = torch.arange(n, dtype=DTYPE)
    lam = 1.0 / (i + 1.0) if kind == "harmonic" else 0.7**i
    return with_spectrum(lam, seed)


def wishart(n: int, seed: int = 0, shift: float = 0.0):
    """``X X^T / p - shift I`` with p = 2n; indefinite for shift = 0.5."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2 * n, generator=gen, dtype=DTYPE)
    M = X @ X.T / (2 * n) - shift * torch.eye(n, dtype=DTYPE)
    M = 0.5 * (M + M.T)
    return M, torch.linalg.eigvalsh(M)


def negative_dominant(n: int, seed: int = 0):
    """|lambda_min| > lambda_max: power iteration's "lambda_max" is the negative one."""
    lam = torch.linspace(-3.0, 1.0, n, dtype=DTYPE)
    return with_spectrum(lam, seed)
