"""The analysis product: a one-call report (:func:`analyze` -> :class:`Report`), per-layer
spectra from shared passes (:func:`block_spectra`), the optimizer-preconditioned operator
(:func:`preconditioned`) and sharpness tracking during training (:class:`SharpnessTracker`)."""

from .analyze import analyze
from .blocks import BlockResult, BlockSpectra, block_spectra, param_groups
from .precond import PreconditionedOperator, preconditioned, preconditioner_diagonal
from .report import Report
from .tracking import SharpnessTracker, TrackPoint, stability_thresholds

__all__ = [
    "BlockResult",
    "BlockSpectra",
    "PreconditionedOperator",
    "Report",
    "SharpnessTracker",
    "TrackPoint",
    "analyze",
    "block_spectra",
    "param_groups",
    "preconditioned",
    "preconditioner_diagonal",
    "stability_thresholds",
]
