"""Randomized trace and diagonal estimators for a symmetric :class:`LinearOperator`.

Everything here sees the operator only through block products ``A.matmat(V: [k, n])``; a
block is one pass over the data for a model operator, so probes always travel in blocks.

Trace (:func:`trace`):

* ``"hutchinson"`` (Girard 1989, Hutchinson 1990): ``tr(A) ~ (1/m) sum_i z_i^T A z_i`` with
  independent probes, ``E[z z^T] = I``. With Rademacher probes the variance of one sample is
  ``2 (||A||_F^2 - sum_i a_ii^2)``; with Gaussian probes ``2 ||A||_F^2``.
* ``"hutch++"`` (Meyer, Musco, Musco and Woodruff, SOSA 2021): a third of the budget sketches
  the range, ``Q = orth(A S)``; the top part ``tr(Q^T A Q)`` is computed exactly from ``A Q``
  and Hutchinson runs on the deflated operator ``(I - QQ^T) A (I - QQ^T)``. Error
  ``O(1/m)`` instead of ``O(1/sqrt(m))`` for PSD operators with decaying spectra.
* ``"xtrace"`` (Epperly, Tropp and Webber, SIMAX 2024): the exchangeable estimator. Every
  probe serves both the sketch and the residual: with ``Y = A Omega`` and ``Q_(i)`` an
  orthonormal basis of ``Y`` without column i,
  ``t_i = tr(Q_(i)^T A Q_(i)) + w_i^T (I - Q_(i)Q_(i)^T) A (I - Q_(i)Q_(i)^T) w_i``
  and the estimate is the mean of the ``t_i``. The leave-one-out bases come from one QR by
  downdating (see :func:`_xtrace_estimates`), never from k separate factorizations.

Diagonal (:func:`diagonal`):

* ``"hutchinson"`` (Bekas, Kokiopoulou and Saad 2007): ``diag(A) ~ sum z*(Az) / sum z*z``.
* ``"xdiag"`` (Epperly, Tropp and Webber): the same exchangeable construction for
  ``diag(A) = diag(P_i A) + diag((I - P_i) A)`` with the second part estimated by Bekas'
  estimator on the probe that ``P_i`` left out.

Error bars (issue 16: each ``confidence_interval(level)`` covers at its level; measured over
a family of spectra by ``bench/bench_coverage.py``, guarded by
``tests/estimators/test_coverage.py``):

* Hutchinson and Hutch++'s deflated samples: the larger of the sample standard error and
  the unbiased closed-form plug-in ``sqrt(2 (mean ||Bz||^2 - est. sum b_jj^2) / m)``, which
  costs no product and is far less noisy than the sample spread of a few skewed samples;
  Hutch++'s sketched part is exact given Q.
* XTrace and XDiag: the Efron-Stein jackknife of the whole estimator (the spread of the
  leave-one-out estimates ignores their correlation); conservative
  (:mod:`.exchangeable`).
* Intervals use Student t quantiles with ``dof = samples - 1`` (``result.dof``).
* The adaptive mode (``rtol``/``atol``) is a two-stage rule: a pilot of ``min_samples``
  plans the size of a FRESH block, whose own estimate and interval are the answer, so the
  interval is not chosen for looking narrow (stopping as soon as a running interval looks
  narrow is optional stopping and covered 77-88%). Never the relative change of a running
  mean (which exits at once on negative or zero traces).
* A fixed budget ends in ``Status.FIXED_BUDGET``; ``CONVERGED`` only when an adaptive
  target was met.

Randomness comes from a private ``torch.Generator`` seeded with ``seed``: the global RNG is
never touched, and the same seed gives the same result.

Modules: :mod:`.session` (probes, counted chunked products, budgets, statistics),
:mod:`.exchangeable` (the XTrace/XDiag leave-one-out machinery), :mod:`.stochastic_trace`
(:func:`trace`), :mod:`.stochastic_diagonal` (:func:`diagonal`); the results are in
:mod:`hessfast.results`.
"""

from __future__ import annotations

from ..results import DiagonalResult, TraceResult
from .stochastic_diagonal import DIAGONAL_METHODS, diagonal
from .stochastic_trace import TRACE_METHODS, trace

__all__ = [
    "DIAGONAL_METHODS",
    "TRACE_METHODS",
    "DiagonalResult",
    "TraceResult",
    "diagonal",
    "trace",
]
