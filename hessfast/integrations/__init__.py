"""Hooks into the trainers people use: :class:`HessianCallback` for transformers' ``Trainer``
(:mod:`hessfast.integrations.transformers`).

transformers stays optional: importing this package imports no training framework. The
callback's class is a subclass of ``transformers.TrainerCallback``, so it is created on first
use (``from hessfast.integrations import HessianCallback``), which imports transformers then;
without it, that import raises an ImportError that says what to install.

No Lightning callback yet: :class:`~hessfast.analysis.tracking.SharpnessTracker` called after
``optimizer.step()`` (``on_train_batch_end``) does the same job in any loop.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HessianCallback"]


def __getattr__(name: str) -> Any:
    """The lazily imported names (module ``__getattr__``, PEP 562).

    Args:
        name: the attribute asked for.

    Raises:
        ImportError: ``HessianCallback`` without transformers installed.
        AttributeError: any other name.
    """
    if name == "HessianCallback":
        try:
            import transformers  # noqa: F401 - the check only: is it installed and importable?
        except ImportError as exc:
            raise ImportError(
                "hessfast.integrations.HessianCallback is a transformers TrainerCallback and "
                f"needs transformers, which could not be imported ({exc}): "
                "pip install transformers (its Trainer also needs accelerate)"
            ) from exc
        from .transformers import HessianCallback

        return HessianCallback
    raise AttributeError(f"module 'hessfast.integrations' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, the lazy ones included (for tab completion)."""
    return sorted(__all__)
