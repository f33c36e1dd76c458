"""Loading the user's objects for ``hessfast analyze``: ``MODULE:NAME`` specs, the model, its
data, its loss, a checkpoint, and a parameter selection; and the numeric argument checks.

Two failure kinds, kept apart because the command's exit code tells them apart:
:class:`UsageError` (a bad argument value: exit status 2) and :class:`UserCodeError` (the
user's own module, factory, data or loss raised: exit status 3, the original exception kept
as ``__cause__`` for ``--debug``).
"""

from __future__ import annotations

import copy
import glob
import importlib
import importlib.util
import math
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from .analysis.weights import WRAPPER_PREFIXES, file_sha256, strip_wrapper_prefixes
from .errors import describe

__all__ = [
    "WRAPPER_PREFIXES",
    "UsageError",
    "UserCodeError",
    "check_device",
    "check_numbers",
    "checkpoint_provenance",
    "describe",
    "expand_checkpoints",
    "file_sha256",
    "load_checkpoint",
    "load_data",
    "load_loss",
    "load_model",
    "load_object",
    "num_selected",
    "select_params",
    "spec_provenance",
    "strip_wrapper_prefixes",
]


class UsageError(Exception):
    """A bad argument value; ``arg`` names the option (``--model``)."""

    def __init__(self, arg: str | None, message: str) -> None:
        super().__init__(message)
        self.arg = arg


class UserCodeError(Exception):
    """The user's code raised; the message says where, the cause is the exception."""


# ---------------------------------------------------------------------------------------------
# numbers and device
# ---------------------------------------------------------------------------------------------


def check_numbers(**values: Any) -> None:
    """Checks ``seed``, ``steps`` (training steps), ``epochs``, ``tol``, ``k``, ``probes``,
    ``slq_steps`` (analyze's ``--num-steps``), ``density_steps``, ``lr`` and ``workers`` when
    given (None: not given), each refused with a :class:`UsageError` naming its option.

    Args:
        values: the numbers by the names above.
    """
    for name, value in values.items():
        if value is None:
            continue
        arg = f"--{name}"
        if name == "seed":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise UsageError(arg, f"seed must be an integer in [0, 2**63), got {value!r}")
        elif name == "tol":
            ok = isinstance(value, (int, float)) and math.isfinite(value) and 0.0 < value < 1.0
            if not ok:
                raise UsageError(arg, f"tol must be a number in (0, 1), got {value!r}")
        elif name in ("steps", "epochs"):
            what = "training steps" if name == "steps" else "training epochs"
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(
                    arg, f"{name} ({what}) must be a non-negative integer, got {value!r}"
                )
        elif name == "lr":
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value) and value > 0)
            if not ok:
                raise UsageError(arg, f"lr (the training learning rate) must be a positive "
                                      f"finite number, got {value!r}")
        elif name in ("k", "probes", "slq_steps", "density_steps", "workers"):
            arg, label = {
                "probes": ("--num-probes", "num-probes"),
                "slq_steps": ("--num-steps", "num-steps (Lanczos steps per probe)"),
                "density_steps": ("--density-steps", "density-steps (Lanczos steps per probe)"),
            }.get(name, (arg, name))
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(arg, f"{label} must be a positive integer, got {value!r}")
        else:  # pragma: no cover - a programming error in the caller
            raise ValueError(f"unknown number {name!r}")


def check_device(device: str) -> str:
    """``device`` if torch can run there now, else a :class:`UsageError` saying why."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(
            "--device", f"device {device!r} is not a torch device name (cpu, cuda, cuda:1): {exc}"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise UsageError(
                "--device",
                f"device {device!r} is not available here ({count} CUDA device(s) visible, "
                f"torch {torch.__version__}); use --device cpu",
            )
    elif dev.type != "cpu":
        raise UsageError("--device", f"hessfast's CLI runs on cpu or cuda, got device {device!r}")
    return device


# ---------------------------------------------------------------------------------------------
# MODULE:NAME
# ---------------------------------------------------------------------------------------------


def _import_module(module: str, arg: str) -> ModuleType:
    looks_like_path = module.endswith(".py") or os.sep in module or "/" in module
    if looks_like_path:
        path = Path(module).expanduser()
        if not path.is_file():
            raise UsageError(arg, f"{module!r}: no such file (give a .py file or a dotted "
                                  f"module name importable from {os.getcwd()})")
        name = f"_hessfast_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise UsageError(arg, f"{module!r} cannot be imported as a Python file")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        # the file's own folder is importable from it, as for `python file.py`
        folder = str(path.resolve().parent)
        added = folder not in sys.path
        if added:
            sys.path.insert(0, folder)
        try:
            spec.loader.exec_module(mod)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise UserCodeError(f"importing {module} raised {describe(exc)}") from exc
        return mod
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    except Exception as exc:  # a parent package's __init__ raised
        raise UserCodeError(f"importing {module} raised {describe(exc)}") from exc
    if found is None:
        raise UsageError(arg, f"no module named {module!r} importable from {os.getcwd()} "
                              f"(give a dotted module name or a path to a .py file)")
    try:
        return importlib.import_module(module)
    except Exception as exc:
        raise UserCodeError(f"importing {module} raised {describe(exc)}") from exc


def load_object(spec: str, arg: str) -> Any:
    """The object ``NAME`` (dotted attributes allowed) of ``MODULE`` in ``MODULE:NAME``."""
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name:
        raise UsageError(arg, f"expected MODULE:NAME (e.g. mymodels:make_model or "
                              f"path/to/file.py:make_model), got {spec!r}")
    mod = _import_module(module, arg)
    obj: Any = mod
    for part in name.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(mod) if not n.startswith("_"))
            listed = ", ".join(public[:12]) + (", ..." if len(public) > 12 else "")
            raise UsageError(arg, f"{module} has no attribute {name!r} (it has: {listed})")
        obj = getattr(obj, part)
    return obj


def _call_factory(obj: Any, spec: str, arg: str) -> Any:
    if not callable(obj):
        raise UsageError(arg, f"{spec} is a {type(obj).__name__}, not a callable factory")
    try:
        return obj()
    except Exception as exc:
        raise UserCodeError(f"{spec}() raised {describe(exc)}") from exc


# ---------------------------------------------------------------------------------------------
# model, data, loss
# ---------------------------------------------------------------------------------------------


def load_model(spec: str, device: str) -> Any:
    """The model of ``--model``: a factory's result, or a copy of a module-level Module."""
    from torch import nn

    obj = load_object(spec, "--model")
    if isinstance(obj, nn.Module):
        model = copy.deepcopy(obj)  # the module's own object stays as it is
    else:
        model = _call_factory(obj, spec, "--model")
    if not isinstance(model, nn.Module):
        raise UsageError("--model", f"{spec} must be (or return) a torch.nn.Module, "
                                    f"got {type(model).__name__}")
    try:
        return model.to(device)
    except Exception as exc:
        raise UserCodeError(f"moving the model to {device} raised {describe(exc)}") from exc


def load_data(spec: str) -> Any:
    """The batches of ``--data``: a list/sequence of batches or a DataLoader as returned; an
    ``(X, y)`` pair of tensors is one batch; an iterator (one pass only) is read into a list."""
    import torch

    obj = load_object(spec, "--data")
    data = obj if isinstance(obj, (list, tuple)) else _call_factory(obj, spec, "--data")
    if isinstance(data, tuple) and data and all(isinstance(t, torch.Tensor) for t in data):
        return [data]  # (X, y): one batch
    if isinstance(data, (torch.Tensor, dict)):
        return [data]
    if data is None or not hasattr(data, "__iter__"):
        raise UsageError("--data", f"{spec} must return batches (a list of (inputs, targets), "
                                   f"a DataLoader, or a tuple (X, y)), got {type(data).__name__}")
    if iter(data) is data:  # a generator or iterator: materialise it once
        try:
            data = list(data)
        except Exception as exc:
            raise UserCodeError(f"iterating the data of {spec} raised {describe(exc)}") from exc
    if isinstance(data, (list, tuple)) and len(data) == 0:
        raise UsageError("--data", f"{spec} returned no batches")
    return data


def load_loss(spec: str) -> Any:
    """``ce`` (cross-entropy), ``mse``, or ``MODULE:FN`` (a criterion ``fn(outputs, targets)``
    or ``fn(model, batch)``; a loss Module class is instantiated without arguments)."""
    from torch import nn

    if spec == "ce":
        return nn.CrossEntropyLoss()
    if spec == "mse":
        return nn.MSELoss()
    if ":" not in spec:
        raise UsageError("--loss", f"expected ce, mse or MODULE:FN, got {spec!r}")
    obj = load_object(spec, "--loss")
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        try:
            obj = obj()
        except Exception as exc:
            raise UserCodeError(f"{spec}() raised {describe(exc)}") from exc
    if not callable(obj):
        raise UsageError("--loss", f"{spec} is a {type(obj).__name__}, not a callable loss")
    return obj


# ---------------------------------------------------------------------------------------------
# checkpoint and parameters (the weights' rule: analysis/weights.py, re-exported here)
# ---------------------------------------------------------------------------------------------


def load_checkpoint(model: Any, path: str, device: str) -> list[str]:
    """Loads ``path`` into ``model`` (the CLI's own instance) by the one rule of
    :func:`hessfast.analysis.weights.load_weights`: a state_dict, or a dict holding one under
    ``state_dict`` or ``model``; a wrapper's prefix on every key (``module.``, ``_orig_mod.``)
    removed when that makes the keys the model's; a mismatch is a short :class:`UsageError`
    (the counts, a few keys, a hint).

    Args:
        model: the model of ``--model`` (its weights are replaced).
        path: the checkpoint file.
        device: where the tensors are loaded (``map_location``).

    Returns:
        The prefixes removed from the keys, in order (empty when none was).
    """
    from .analysis.weights import load_weights
    from .errors import ConfigurationError

    try:
        return load_weights(model, path, device, name="the model of --model")
    except ConfigurationError as exc:
        raise UsageError("--checkpoint", str(exc)) from None


def expand_checkpoints(patterns: list[str]) -> list[str]:
    """The files of ``--checkpoint PATH [PATH ...]``: a path with ``*``, ``?`` or ``[`` is a
    glob, replaced by the files it matches (``glob.glob``, sorted); other paths stay as given
    (a missing one is refused when loaded). A file named twice is kept once, first place.

    Args:
        patterns: the values given to ``--checkpoint``.

    Raises:
        UsageError: a glob that matches no file (named).
    """
    out: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            found = sorted(p for p in glob.glob(os.path.expanduser(pattern))
                           if os.path.isfile(p))
            if not found:
                raise UsageError("--checkpoint", f"{pattern!r} matches no file (a glob, "
                                                 f"read from {os.getcwd()})")
            out += found
        else:
            out.append(pattern)
    seen: dict[str, str] = {}
    for p in out:
        seen.setdefault(os.path.realpath(os.path.expanduser(p)), p)
    return list(seen.values())


def spec_provenance(model: str, data: str, loss: str, params: str | None,
                    command: str | None) -> dict[str, Any]:
    """What the command line's specs add to ``report.provenance``, for a single run and for
    every checkpoint of a batch alike.

    Args:
        model: ``--model``'s spec.
        data: ``--data``'s spec.
        loss: ``--loss``'s spec.
        params: ``--params``'s pattern, or None.
        command: the command line as one shell-quoted string, or None.
    """
    return {"command": command, "model_spec": model, "data_spec": data, "loss_spec": loss,
            "params": params}


def checkpoint_provenance(path: str, removed: list[str]) -> dict[str, Any]:
    """``report.provenance["checkpoint"]``: the file's absolute path, its SHA-256 and the
    prefixes removed from its keys.

    Args:
        path: the checkpoint file (as given).
        removed: what :func:`load_checkpoint` returned.
    """
    return {"path": str(Path(path).expanduser().resolve()), "sha256": file_sha256(path),
            "stripped_prefixes": list(removed)}


def num_selected(model: Any, names: list[str] | None) -> int:
    """``n``: the number of scalars in the parameters ``names`` (exact names, as
    :func:`select_params` returns them), or in every trainable parameter when None: the
    operator's size, by the one selection rule of ``params=``.

    Args:
        model: the model.
        names: the selected parameter names, or None for all trainable ones.
    """
    from .curvature.model import select_params as select  # torch: imported when needed

    if names is None:
        _, tensors = select(model, None)
    else:  # already selected (and warned about, for a frozen one): count them
        named = dict(model.named_parameters())
        tensors = [named[name] for name in names]
    return sum(int(p.numel()) for p in tensors)


def select_params(model: Any, pattern: str) -> list[str]:
    """The names ``--params PATTERN`` selects: :func:`hessfast.curvature.model.select_params`
    of ``[pattern]``, the one rule ``params=`` follows in the API too (the parameter of that
    exact name, else every trainable parameter whose name ``re.search(pattern, name)``
    matches); its refusals become a :class:`UsageError` of ``--params``."""
    from .curvature.model import select_params as select  # torch: imported when needed
    from .errors import ConfigurationError

    try:
        names, _ = select(model, [pattern])
    except ConfigurationError as exc:
        raise UsageError("--params", str(exc).removeprefix("params: ")) from None
    return names
