"""Exceptions raised by hessfast.

Every error is a subclass of :class:`HessfastError` and of the builtin exception a user
would catch for that kind of problem (``ValueError`` for bad input, ``TypeError`` for a
wrong kind of object, ``RuntimeError`` for a failure found while running). Messages name
the cause and the fix.
"""

from __future__ import annotations


class HessfastError(Exception):
    """Base class of every error raised by hessfast."""


class ConfigurationError(HessfastError, ValueError):
    """An argument has a value hessfast cannot use (unknown mode, bad combination)."""


class EmptyDataError(HessfastError, ValueError):
    """The data yielded no samples, so the operator is undefined."""


class NotReiterableError(HessfastError, TypeError):
    """The data can be iterated only once (an iterator or generator)."""


class DataChangedError(HessfastError, RuntimeError):
    """The batches differ between two passes over the data (shuffling, augmentation)."""


class NonDeterministicError(HessfastError, RuntimeError):
    """Two products with the same vector differ: the operator is random."""


class AsymmetricOperatorError(HessfastError, RuntimeError):
    """u.(Av) and v.(Au) differ by more than rounding: the operator is not symmetric."""


class NonFiniteError(HessfastError, FloatingPointError):
    """A loss or a curvature product contains NaN or Inf."""


class LossError(HessfastError, ValueError):
    """The loss is not a differentiable floating-point scalar of the selected parameters."""


class LossCallError(LossError):
    """Evaluating the loss on a batch raised: ``loss_fn`` (or the model inside it) cannot take
    the batch as hessfast read it. The message says how the data was split into batches, how
    ``loss_fn`` was called, and how to override either (``loss_form=``, wrapping ``data``)."""


class BatchError(HessfastError, TypeError):
    """``data`` or one of its batches is not a kind hessfast can read (no tensors, not
    iterable, not an ``(inputs, targets)`` pair where a criterion needs one)."""


class ArgumentTypeError(HessfastError, TypeError):
    """An argument is the wrong kind of object (a model that is not an ``nn.Module``, a
    ``loss_fn`` that is not callable)."""


class NoParametersError(HessfastError, ValueError):
    """No trainable parameter was selected."""


class UnsupportedModelError(HessfastError, RuntimeError):
    """The model cannot be differentiated twice by any available path."""


class BackendUnavailableError(HessfastError, RuntimeError):
    """A forced kernel backend cannot run here (not compiled, no device)."""


class ParametersChangedError(HessfastError, RuntimeError):
    """The model's parameters changed (an optimizer step, ``model.float()``, ``.to()``) after
    the curvature operator was built: an operator is the curvature at the parameters it was
    built at. Build a new one at the new parameters."""


class UnboundedDataError(HessfastError, ValueError):
    """The data has no length and did not end within the batch limit (an endless
    ``IterableDataset``): hessfast needs a finite, fixed set of batches."""


class DistributedError(HessfastError, RuntimeError):
    """A multi-process run that cannot go on correctly, raised on every rank: ranks whose
    parameters, options or algorithm arguments differ (named, with each rank's value), a rank
    that failed (named) while the others waited at a collective, a collective that timed out,
    or a set-up hessfast cannot handle (a ``DistributedDataParallel`` model on one rank's
    shard)."""


__all__ = [
    "ArgumentTypeError",
    "AsymmetricOperatorError",
    "BackendUnavailableError",
    "BatchError",
    "ConfigurationError",
    "DataChangedError",
    "DistributedError",
    "EmptyDataError",
    "HessfastError",
    "LossCallError",
    "LossError",
    "NoParametersError",
    "NonDeterministicError",
    "NonFiniteError",
    "NotReiterableError",
    "ParametersChangedError",
    "UnboundedDataError",
    "UnsupportedModelError",
]


class OutOfMemoryPlanError(HessfastError, MemoryError):
    """The memory plan of a run (:func:`hessfast.estimate_memory`) does not fit the device
    with any basis storage allowed: the message carries the plan's table and the fixes
    (smaller ``max_basis`` / ``num_steps``, fewer probes, ``basis_device='cpu'``,
    ``basis_dtype=torch.bfloat16``)."""


__all__ += ["OutOfMemoryPlanError"]


def describe(exc: BaseException) -> str:
    """``Type: first line of the message`` of ``exc`` (``Type`` alone for an empty message):
    how a message that reports someone else's exception names it in one line.

    Args:
        exc: the exception.
    """
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


__all__ += ["describe"]
