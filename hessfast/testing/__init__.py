"""Oracles, test models and a timer for checking and measuring curvature code.

What hessfast's own tests and benchmarks use, public so that anyone can check an operator or a
solver (hessfast's or their own) the same way:

* :mod:`hessfast.testing.spectra`: symmetric float64 matrices with prescribed spectra,
  ``with_spectrum(eigenvalues, seed)`` and named families (repeated, clustered, geometric,
  indefinite, ...) that break Krylov solvers and stochastic estimators.
* :mod:`hessfast.testing.dense`: dense float64 Hessian and GGN references built from plain
  double backward (``dense_hessian_reference``, ``dense_ggn_reference``).
* :mod:`hessfast.testing.models`: tiny seeded MLP (LayerNorm), CNN (BatchNorm, Dropout) and
  transformer LM builders with uneven batches, small enough for the dense references.
* :mod:`hessfast.testing.timing`: ``timeit`` with warm-up, best and median, CUDA-synchronised.
* :mod:`hessfast.testing.comparison`: the rules of the peer comparison (``bench/compare.py``):
  verdicts of an answer against a reference, the ranking of correct cells, the report.

``import hessfast`` does not import this subpackage.
"""

from __future__ import annotations

from . import comparison, dense, models, spectra, timing
from .dense import assert_symmetric, dense_ggn_reference, dense_hessian_reference
from .spectra import random_orthogonal, with_spectrum
from .timing import Timing, timeit

__all__ = [
    "Timing",
    "assert_symmetric",
    "comparison",
    "dense",
    "dense_ggn_reference",
    "dense_hessian_reference",
    "models",
    "random_orthogonal",
    "spectra",
    "timeit",
    "timing",
    "with_spectrum",
]
