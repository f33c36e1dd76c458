"""hessfast: fast, honest curvature of PyTorch models.

    import hessfast as hf
    H = hf.hessian(model, loss_fn, data)      # symmetric operator over the parameters
    H.matmat(V)                                # V: [k, n] -> [k, n], one data pass
    report = hf.analyze(model, loss_fn, data)  # the whole curvature picture in one call

See README.md for the quickstart and docs/architecture.md for the layers.
"""

from __future__ import annotations

from . import distributed, errors
from ._version import __version__
from .analysis import (
    BlockSpectra,
    Report,
    SharpnessTracker,
    analyze,
    analyze_checkpoints,
    block_spectra,
    plot_evolution,
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

__all__ = [
    "__version__",
    # operators: the symmetric [n, n] operators everything below multiplies with
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "ggn",
    "hessian",
    # spectra: extreme eigenpairs and conditioning
    "condition_number",
    "eigsh",
    "lambda_max",
    "power_iteration",
    # density and trace: the whole spectrum, its trace and diagonal, from random probes
    "diagonal",
    "spectral_density",
    "trace",
    # analysis: one-call reports, per-layer spectra, preconditioned curvature, training,
    # many checkpoints (trainer callbacks: hessfast.integrations, imported on use)
    "SharpnessTracker",
    "analyze",
    "analyze_checkpoints",
    "block_spectra",
    "plot_evolution",
    "preconditioned",
    # results: every one has num_matvecs, num_passes, status, to_dict and to_json
    "BlockSpectra",
    "ConditionResult",
    "DiagonalResult",
    "EigshResult",
    "PowerResult",
    "Report",
    "SpectralDensity",
    "Status",
    "TraceResult",
    # memory: what a run will need, before running it
    "MemoryPlan",
    "estimate_memory",
    # modules: the error classes and the multi-process helpers
    "distributed",
    "errors",
]
