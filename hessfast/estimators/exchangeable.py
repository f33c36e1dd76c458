"""The exchangeable estimators XTrace and XDiag (Epperly, Tropp and Webber, SIMAX 2024).

Probes ``Om [k, n]`` sketch ``Y = A Om``; ``Q`` is an orthonormal row basis of ``Y``
(``Y = R^T Q``) and ``Z = A Q``. For each i, ``P_i`` projects onto the span of ``Y`` without
``y_i``; it equals ``Q (I - s_i s_i^T) Q^T`` for the unit direction ``s_i`` that removes
``y_i`` (:func:`downdate_directions`), so all k leave-one-out estimates come from one basis
and k x k algebra, never from k separate factorizations.
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
    "xtrace_estimates",
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
