"""The exchangeable estimators XTrace and XDiag (Epperly, Tropp and Webber, SIMAX 2024).

Probes ``Om [k, n]`` sketch ``Y = A Om``; ``Q`` is an orthonormal row basis of ``Y``
(``Y = R^T Q``) and ``Z = A Q``. For each i, ``P_i`` projects onto the span of ``Y`` without
``y_i``; it equals ``Q (I - s_i s_i^T) Q^T`` for the unit direction ``s_i`` that removes
``y_i`` (:func:`downdate_directions`), so all k leave-one-out estimates come from one basis
and k x k algebra, never from k separate factorizations.

Error bars: the k leave-one-out estimates share k - 2 of their k - 1 basis probes, so they are
positively correlated and their spread over sqrt(k) underestimates the error (coverage of the
"95%" interval 77-87% on decaying spectra at n = 400). Here the standard error is the
Efron-Stein jackknife of the whole estimator instead: with ``T_(-i)`` the XTrace (XDiag)
estimate of the k - 1 probes without probe i,
``stderr^2 = sum_i (T_(-i) - mean_j T_(-j))^2``. Efron and Stein (Ann. Stat. 1981) show its
expectation bounds ``Var(T_{k-1}) >= Var(T_k)`` from above for ANY symmetric function of iid
probes, so the interval is conservative (measured coverage 96-100%, half-widths 1.2-2.7x the
naive ones; ``bench/bench_coverage.py``). ``T_(-i)`` needs the leave-TWO-out bases: the span
of Y without columns i and j is ``span(Q)`` minus ``span(s_i, s_j)``, so every pair again
costs only k x k algebra (:func:`_pair_terms`); the whole jackknife is ``O(k^3)`` for XTrace
and four ``[k, k] @ [k, n]`` products for XDiag.
"""

from __future__ import annotations

import math

import torch

from .. import ops
from .session import Session

__all__ = [
    "Exchangeable",
    "append_orth",
    "downdate_directions",
    "orth_rows",
    "xdiag_estimates",
    "xdiag_jackknife_stderr",
    "xtrace_estimates",
    "xtrace_jackknife_stderr",
]


def orth_rows(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Householder QR of the columns ``Y^T``: rows ``Q: [k, n]`` orthonormal and ``R: [k, k]``
    with ``Y^T = Q^T R`` (so ``Y = R^T Q``)."""
    Qc, R = torch.linalg.qr(Y.T, mode="reduced")
    return Qc.T.contiguous(), R


def append_orth(
    Q: torch.Tensor, Ynew: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Extend orthonormal rows ``Q: [k, n]`` by new rows ``Ynew: [j, n]``.

    Returns ``(Qa [j, n], C [k, j], Ra [j, j])`` with ``[Q; Qa]`` orthonormal and
    ``Ynew = C^T Q + Ra^T Qa`` (to rounding). Classical Gram-Schmidt twice ("twice is
    enough": ``ops.reorthogonalize`` with the second pass forced); if the new rows lie
    (numerically) in span(Q) the basis is still completed orthonormally, so a
    rank-deficient operator never yields a non-orthogonal basis.
    """
    Yp = Ynew.clone()
    C, _ = ops.reorthogonalize(Q, Yp, eta=math.inf)  # eta = inf: always the second pass
    Qa, _ = orth_rows(Yp)
    # rounding-level Yp: make the completed basis orthogonal to Q
    ops.reorthogonalize(Q, Qa, eta=math.inf)
    Qa, _ = orth_rows(Qa)
    return Qa, C, ops.basis_dot(Qa, Yp)


def downdate_directions(R: torch.Tensor, eps: float) -> torch.Tensor:
    """Unit columns ``s_i`` with ``s_i ⟂ R e_j`` for every ``j != i``: column i of ``R^{-T}``
    normalized, from the SVD ``R = U diag(sigma) V^T`` as ``U diag(1/sigma) V^T e_i``.

    Removing the direction ``Q s_i`` from ``span(Q)`` leaves ``span(Y without column i)``.
    Singular values below ``eps * k * sigma_max`` (a numerically rank-deficient sketch) are
    clamped there: the direction then points into the part of ``span(Q)`` that Y does not
    use, which is the exact-arithmetic limit, and no infinity appears.
    """
    k = R.shape[0]
    U, sig, Vh = torch.linalg.svd(R)
    smax = float(sig.max()) if k else 0.0
    if smax == 0.0:
        return torch.eye(k, dtype=R.dtype, device=R.device)
    floor = smax * max(k, 10) * eps
    inv = 1.0 / sig.clamp(min=floor)
    S = (U * inv) @ Vh  # columns: R^{-T} e_i up to the clamp
    return S / S.norm(dim=0, keepdim=True)


class Exchangeable:
    """State shared by XTrace and XDiag: probes ``Om``, an orthonormal basis ``Q`` of
    ``Y = A Om`` with ``Y = R^T Q`` (rows), and ``Z = A Q`` (rows). It grows by appending
    probes: the basis is extended, so only the new rows of ``Z`` cost products."""

    def __init__(self, sess: Session) -> None:
        self.sess = sess
        n, work, dev = sess.n, sess.work, sess.device
        self.Om = torch.zeros((0, n), dtype=work, device=dev)
        self.Q = torch.zeros((0, n), dtype=work, device=dev)
        self.Z = torch.zeros((0, n), dtype=work, device=dev)
        self.R = torch.zeros((0, 0), dtype=torch.float64)  # column convention, CPU float64

    @property
    def k(self) -> int:
        """The number of probes drawn so far (rows of ``Om``, ``Q`` and ``Z``)."""
        return self.Om.shape[0]

    def grow(self, j: int) -> None:
        """Draw j more probes: one block ``A Om_new`` and one block ``A Q_new``."""
        Om_new = self.sess.probes(j)
        Y_new = self.sess.apply(Om_new)
        if self.k == 0:
            Qa, R = orth_rows(Y_new)
            Rnew = R.double().cpu()
        else:
            Qa, C, Ra = append_orth(self.Q, Y_new)
            k = self.k
            Rnew = torch.zeros((k + j, k + j), dtype=torch.float64)
            Rnew[:k, :k] = self.R
            Rnew[:k, k:] = C.double().cpu()
            Rnew[k:, k:] = Ra.double().cpu()
        Z_new = self.sess.apply(Qa)
        self.Om = torch.cat([self.Om, Om_new])
        self.Q = torch.cat([self.Q, Qa])
        self.Z = torch.cat([self.Z, Z_new])
        self.R = Rnew

    def directions(self) -> torch.Tensor:
        """The k leave-one-out downdate directions ``s_i`` as the columns of a float64 CPU
        ``[k, k]`` (:func:`downdate_directions` of ``R``)."""
        return downdate_directions(self.R, torch.finfo(self.sess.work).eps)


def xtrace_estimates(st: Exchangeable) -> torch.Tensor:
    """The k leave-one-out estimates ``t_i`` of XTrace (float64, CPU).

    With ``P_i = Q (I - s_i s_i^T) Q^T`` the projector onto ``span(Y without y_i)``
    (column convention, ``Y = Q R``), write ``w_i = Q^T omega_i``, ``t_i = Z^T omega_i``,
    ``H = Q^T A Q``, ``c_i = s_i^T w_i`` and ``v_i = w_i - c_i s_i``. Then
    ``tr(P_i A) = tr(H) - s_i^T H s_i`` and, since ``(I - P_i) omega_i = omega_i - Q v_i``
    and ``A (I - P_i) omega_i = Q r_i - Z v_i``,
    ``omega_i^T (I-P_i) A (I-P_i) omega_i = c_i s_i^T r_i - t_i^T v_i + v_i^T H v_i``.
    Only k x k quantities appear, so all k estimates cost O(n k^2 + k^3).
    """
    Q, Z, Om = st.Q, st.Z, st.Om
    H = (Q @ Z.T).double().cpu()  # H[a, b] = q_a^T A q_b
    H = 0.5 * (H + H.T)
    W = (Q @ Om.T).double().cpu()  # column i: Q^T omega_i
    T = (Z @ Om.T).double().cpu()  # column i: Z^T omega_i
    R = st.R
    S = st.directions()
    c = (S * W).sum(0)
    V = W - S * c
    sHs = (S * (H @ S)).sum(0)
    sr = (S * R).sum(0)
    vHv = (V * (H @ V)).sum(0)
    tv = (T * V).sum(0)
    return torch.trace(H) - sHs + c * sr - tv + vHv


def xdiag_estimates(st: Exchangeable) -> torch.Tensor:
    """The k leave-one-out diagonal estimates ``[k, n]`` of XDiag (working dtype).

    ``d_i = diag(P_i A) + omega_i * ((I - P_i) A omega_i)`` (Rademacher: ``omega * omega = 1``)
    with ``diag(P_i A) = rowsum(Q * Z) - (Q s_i) * (Z s_i)`` and, because ``A omega_i = Q r_i``
    lies in span(Q), ``(I - P_i) A omega_i = (s_i^T r_i) Q s_i``.
    """
    S = st.directions()
    sr = (S * st.R).sum(0)
    St = S.T.to(device=st.Q.device, dtype=st.Q.dtype)
    QS = St @ st.Q  # row i: (Q s_i)^T
    ZS = St @ st.Z
    base = (st.Q * st.Z).sum(0)
    coef = sr.to(device=st.Q.device, dtype=st.Q.dtype).unsqueeze(1)
    return base.unsqueeze(0) - QS * ZS + coef * (st.Om * QS)


def _pair_terms(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For the unit directions ``S [k, k]`` (columns), the entries of
    ``(S_p^T S_p)^{-1} = [[alpha, beta], [beta, alpha]]`` for every pair ``S_p = [s_i, s_j]``:
    ``alpha_ij = 1 / (1 - g^2)``, ``beta_ij = -g / (1 - g^2)`` with ``g = s_i^T s_j``, as
    ``[k, k]`` matrices with a zero diagonal (the pair ``i = j`` does not exist).
    ``1 - g^2`` is clamped at ``k * eps`` (a numerically rank-deficient sketch)."""
    k = S.shape[1]
    g = S.T @ S
    det = (1.0 - g * g).clamp(min=max(k, 10) * torch.finfo(S.dtype).eps)
    alpha, beta = 1.0 / det, -g / det
    alpha.fill_diagonal_(0.0)
    beta.fill_diagonal_(0.0)
    return alpha, beta


def xtrace_jackknife_stderr(st: Exchangeable) -> float:
    """Efron-Stein jackknife standard error of XTrace (module docstring): ``sqrt(sum_i
    (T_(-i) - mean)^2)`` with ``T_(-i)`` the XTrace estimate without probe i, float64.

    ``T_(-i)`` is the mean over ``j != i`` of the leave-one-out estimate of probe j on the
    basis of Y without columns i and j, i.e. :func:`xtrace_estimates`' formula with the
    single direction ``s_j`` replaced by the pair ``S_p = [s_i, s_j]``:
    ``tr(H) - tr(G_p^{-1} S_p^T H S_p) + w^T r - 2 r^T v + v^T H v`` with
    ``v = w - S_p G_p^{-1} S_p^T w`` (``w = Q^T omega_j``, ``r = R e_j``); all k(k-1) pairs
    from the ``[k, k]`` matrices below. ``inf`` for k < 3 (no pair to leave out twice)."""
    k = st.k
    if k < 3:
        return math.inf
    Q, Z, Om = st.Q, st.Z, st.Om
    H = (Q @ Z.T).double().cpu()
    H = 0.5 * (H + H.T)
    W = (Q @ Om.T).double().cpu()
    R = st.R
    S = st.directions()
    alpha, beta = _pair_terms(S)
    HS = H @ S
    Mss = S.T @ HS  # s_a^T H s_b
    SW, SR, SHW = S.T @ W, S.T @ R, HS.T @ W  # [a, j]: s_a^T w_j, s_a^T r_j, s_a^T H w_j
    wr = (W * R).sum(0)  # omega_j^T A omega_j
    wHw = (W * (H @ W)).sum(0)
    # row i, column j: the pair (i, j), held-out probe j; "own" = the entry [j, j]
    own = lambda X: X.diagonal()[None, :]  # noqa: E731
    c1 = alpha * SW + beta * own(SW)  # coefficients of s_i and s_j in G_p^{-1} S_p^T w_j
    c2 = beta * SW + alpha * own(SW)
    mi, mj = Mss.diagonal()[:, None], Mss.diagonal()[None, :]
    tr_pair = alpha * (mi + mj) + 2.0 * beta * Mss  # tr(G_p^{-1} S_p^T H S_p)
    cMc = c1 * c1 * mi + 2.0 * c1 * c2 * Mss + c2 * c2 * mj
    quad = ((wHw - wr)[None, :] + 2.0 * (c1 * SR + c2 * own(SR))
            - 2.0 * (c1 * SHW + c2 * own(SHW)) + cMc)
    T = torch.trace(H) - tr_pair + quad
    T.fill_diagonal_(0.0)
    Tout = T.sum(1) / (k - 1)
    return float(((Tout - Tout.mean()) ** 2).sum().sqrt())


def xdiag_jackknife_stderr(st: Exchangeable) -> torch.Tensor:
    """Efron-Stein jackknife standard error ``[n]`` of XDiag per entry (module docstring),
    in the working dtype; ``inf`` for k < 3.

    With the pair ``[s_i, s_j]`` removed, probe j's estimate is
    ``diag(Q^T Q A) - sum_cd Ginv_cd (Q s_c) * (Z s_d)
    + omega_j * sum_cd Ginv_cd (s_d^T r_j) Q s_c`` (``c, d`` in ``{i, j}``); averaging over
    ``j != i`` turns each term into a ``[k, k] @ [k, n]`` product. The common
    ``diag(Q^T Q A)`` cancels in the spread."""
    k, n = st.k, st.Q.shape[1]
    if k < 3:
        return torch.full((n,), math.inf, dtype=st.Q.dtype, device=st.Q.device)
    S = st.directions()
    alpha, beta = _pair_terms(S)
    SR = S.T @ st.R
    C1 = alpha * SR + beta * SR.diagonal()[None, :]
    C2 = beta * SR + alpha * SR.diagonal()[None, :]
    to = lambda X: X.to(device=st.Q.device, dtype=st.Q.dtype)  # noqa: E731
    St = to(S.T)
    QS, ZS = St @ st.Q, St @ st.Z  # rows: (Q s_i)^T, (Z s_i)^T
    QZ = QS * ZS
    a, b = to(alpha), to(beta)
    X = (-a.sum(1, keepdim=True) * QZ - a @ QZ - QS * (b @ ZS) - ZS * (b @ QS)
         + QS * (to(C1) @ st.Om) + to(C2) @ (st.Om * QS)) / (k - 1)
    return ((X - X.mean(0)) ** 2).sum(0).sqrt()
