"""Where a report's numbers came from (:attr:`~hessfast.analysis.report.Report.provenance`):
what :func:`hessfast.analyze` records of its own arguments and of the operator, and the one
rule naming a loss or a model factory in a record (a batch run's settings use it too)."""

from __future__ import annotations

from typing import Any

import torch

from .._version import __version__

__all__ = ["callable_name", "describe_operator", "provenance"]


def callable_name(fn: Any) -> str | None:
    """``module.qualname`` of a function, the class name of a module (with a loss module's
    ``reduction``), or None: enough to tell two losses or two model factories apart in a
    record.

    Args:
        fn: a function, a callable object or an ``nn.Module`` (None gives None).
    """
    if fn is None:
        return None
    if isinstance(fn, torch.nn.Module):
        red = getattr(fn, "reduction", None)
        return type(fn).__name__ + (f"(reduction={red!r})" if isinstance(red, str) else "")
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module else name


def provenance(H: Any, kind: str, loss_fn: Any, operator_kwargs: dict[str, Any]
               ) -> dict[str, Any]:
    """What :attr:`Report.provenance` records from :func:`hessfast.analyze`'s own arguments
    (the command line and a batch run add their specs, checkpoint and step).

    Args:
        H: the operator analyzed.
        kind: ``"Hessian"``, ``"GGN"`` or ``"operator"``.
        loss_fn: the loss given to analyze (None for a given operator).
        operator_kwargs: the options passed to ``hf.hessian`` / ``hf.ggn``.
    """
    names = list(getattr(H, "param_names", None) or [])
    selected = "params" in operator_kwargs and operator_kwargs["params"] is not None
    model = getattr(H, "model", None)
    return {
        "hessfast": __version__, "torch": torch.__version__, "curvature": kind,
        "loss": callable_name(loss_fn),
        "model": None if model is None else type(model).__name__,
        # the first 64 names of a selection: enough to tell two selections apart in a record
        "params": (names[:64] + ([f"... ({len(names)} tensors)"] if len(names) > 64 else [])
                   if selected else "all"),
        "num_params": int(H.shape[0]),
        "data": {key: getattr(H, key) for key in ("num_samples", "num_batches")
                 if isinstance(getattr(H, key, None), int)},
        "operator_options": sorted(key for key in operator_kwargs if key != "params"),
    }


def describe_operator(H: Any) -> dict[str, Any]:
    """:attr:`Report.operator`: the dtype, device and model class of ``H``, its samples,
    batches, product path, loss head and form, and its number of parameter tensors.

    Args:
        H: the operator analyzed.
    """
    out: dict[str, Any] = dict(dtype=str(H.dtype), device=str(H.device))
    model = getattr(H, "model", None)
    if model is not None:
        out["model"] = type(model).__name__
    for key in ("num_samples", "num_batches", "hvp_mode", "loss_head", "loss_form",
                "loss_reduction", "bn_mode"):
        v = getattr(H, key, None)
        if v is not None:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    names = getattr(H, "param_names", None)
    if names:
        out["num_param_tensors"] = len(names)
    return out
