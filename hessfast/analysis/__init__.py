"""The analysis product: a one-call report (:func:`analyze` -> :class:`Report`), per-layer
spectra from shared passes (:func:`block_spectra`), the optimizer-preconditioned operator
(:func:`preconditioned`), sharpness tracking during training (:class:`SharpnessTracker`) and
the analysis of many checkpoints over processes (:func:`analyze_checkpoints`,
:func:`plot_evolution`)."""

from .analyze import analyze
from .batch import analyze_checkpoints
from .blocks import BlockResult, BlockSpectra, block_spectra, param_groups
from .evolution import plot_evolution
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
    "analyze_checkpoints",
    "block_spectra",
    "param_groups",
    "plot_evolution",
    "preconditioned",
    "preconditioner_diagonal",
    "stability_thresholds",
]
