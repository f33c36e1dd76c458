"""hessfast: fast, honest curvature of PyTorch models.

    import hessfast as hf
    H = hf.hessian(model, loss_fn, data)      # symmetric operator over the parameters
    H.matmat(V)                                # V: [k, n] -> [k, n], one data pass
    report = hf.analyze(model, loss_fn, data)  # the whole curvature picture in one call

See README.md for the quickstart and docs/architecture.md for the layers.
"""

from __future__ import annotations

from . import distributed, errors
from .analysis import (
    BlockSpectra,
    Report,
    SharpnessTracker,
    analyze,
    block_spectra,
    preconditioned,
)
from .condition import ConditionResult, condition_number
from .curvature import GGNOperator, HessianOperator, ggn, hessian
from .density import SpectralDensity, spectral_density
from .estimators import DiagonalResult, TraceResult, diagonal, trace
from .linop import LinearOperator
from .memory import MemoryPlan, estimate_memory
from .power import PowerResult, power_iteration
from .results import Status
from .spectrum import EigshResult, eigsh, lambda_max

__version__ = "0.1.0"

__all__ = [
    "BlockSpectra",
    "Report",
    "SharpnessTracker",
    "analyze",
    "block_spectra",
    "preconditioned",
    "ConditionResult",
    "DiagonalResult",
    "SpectralDensity",
    "Status",
    "TraceResult",
    "condition_number",
    "diagonal",
    "spectral_density",
    "trace",
    "EigshResult",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "PowerResult",
    "__version__",
    "eigsh",
    "estimate_memory",
    "MemoryPlan",
    "distributed",
    "errors",
    "ggn",
    "hessian",
    "lambda_max",
    "power_iteration",
]
