"""A checkpoint's weights into a model: the state_dict found in the file (a plain one, or one
held under ``state_dict`` or ``model``, read with ``torch.load(weights_only=True)``), a
wrapper's key prefixes removed when that makes the keys the model's, and a short message
with a hint when they still differ. One rule for ``hessfast analyze --checkpoint`` and
:func:`hessfast.analyze_checkpoints`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigurationError, describe

__all__ = ["WRAPPER_PREFIXES", "file_sha256", "load_weights", "mismatch_message",
           "read_state_dict", "strip_wrapper_prefixes"]


#: What DistributedDataParallel (``module.``) and ``torch.compile`` (``_orig_mod.``) put in
#: front of every key of a wrapped model's state_dict; named in the note and the hint.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(
    state: dict[str, Any], model_keys: Any
) -> tuple[dict[str, Any], list[str]]:
    """``state`` with the dotted prefixes that ALL its keys share removed, when removing them
    makes its keys exactly ``model_keys``; else ``state`` unchanged.

    A model saved from inside a wrapper names every tensor with the wrapper's attribute in
    front: ``module.`` (DistributedDataParallel, DataParallel), ``_orig_mod.``
    (``torch.compile``), both in either order, or a training module's attribute (Lightning's
    ``model.``). One leading segment is removed at a time while every key shares it, and the
    first result whose key set equals ``model_keys`` is taken; a partial match strips nothing,
    so a checkpoint of another architecture is reported as it was saved.

    Args:
        state: a state_dict (key -> tensor), not modified.
        model_keys: the keys of the model's ``state_dict()`` (any iterable of str).

    Returns:
        ``(state, removed)``: the state_dict to load (a new dict when prefixes were removed,
        else ``state`` itself) and the removed prefixes in order (``["module.",
        "_orig_mod."]``), empty when none was.
    """
    want = set(model_keys)
    keys = list(state)
    if not keys or set(keys) == want:
        return state, []
    removed: list[str] = []
    # a prefix shorter than every key: stripping never leaves an empty name
    while all("." in k for k in keys):
        head = keys[0].split(".", 1)[0] + "."
        if not all(k.startswith(head) for k in keys):
            break
        keys = [k[len(head):] for k in keys]
        removed.append(head)
        if set(keys) == want:
            return dict(zip(keys, state.values(), strict=True)), removed
    return state, []


def _shared_prefixes(keys: list[str]) -> list[str]:
    """The leading dotted segments every key in ``keys`` shares (``["module.", "_orig_mod."]``)."""
    out: list[str] = []
    while keys and all("." in k for k in keys):
        head = keys[0].split(".", 1)[0] + "."
        if not all(k.startswith(head) for k in keys):
            break
        out.append(head)
        keys = [k[len(head):] for k in keys]
    return out


def _heads(keys: Any, limit: int = 4) -> str:
    """The distinct first segments of ``keys`` in order, quoted (``'conv1.', 'fc.'``)."""
    seen: list[str] = []
    for k in keys:
        head = k.split(".", 1)[0] + ("." if "." in k else "")
        if head not in seen:
            seen.append(head)
    shown = ", ".join(repr(h) for h in seen[:limit])
    return shown + (f" and {len(seen) - limit} more" if len(seen) > limit else "")


def mismatch_message(path: str, state: dict[str, Any], own: dict[str, Any],
                     model: str = "the model of --model") -> str | None:
    """The short message of a checkpoint whose keys or shapes differ from the model's: the
    counts, a few keys of each kind, and a hint on what the keys suggest; None if it fits.

    Args:
        path: the checkpoint, as named in the message.
        state: its state_dict.
        own: the model's state_dict.
        model: how the message names the model (``"make_model()'s model"``).
    """
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or shapes):
        return None

    def few(keys: list[str], limit: int = 5) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)"
                                          if len(keys) > limit else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {few(shapes, 3)}")
    counts = (f"{len(state)} tensors in the checkpoint, {len(own)} in the model, "
              f"{len(set(state) & set(own))} names in common")
    if shapes and not (missing or unexpected):
        hint = ("same names, other sizes: does {model} build the sizes the "
                "checkpoint was saved with?")
    else:
        shared = _shared_prefixes(list(state))
        wrapped = [p for p in shared if p in WRAPPER_PREFIXES]
        hint = (f"the checkpoint's keys start with {_heads(state)}, the model's with "
                f"{_heads(own)}: does {model} build the architecture the checkpoint was "
                "saved from?")
        if wrapped:
            hint += (f" (its shared prefix {''.join(shared)!r} was not removed: without it "
                     "the keys still differ)")
    return (f"{path} does not match {model} ({counts}; " + "; ".join(parts)
            + f"). {hint}")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes, read in 1 MiB chunks.

    Args:
        path: the file.
    """
    digest = hashlib.sha256()
    with open(os.path.expanduser(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> dict[str, torch.Tensor]:
    """The state_dict of a checkpoint file: the file's dict of tensors, or the one it holds
    under ``state_dict`` or ``model`` (a training checkpoint), read with
    ``torch.load(weights_only=True, map_location=device)``.

    Args:
        path: the checkpoint file.
        device: where the tensors are loaded.

    Raises:
        ConfigurationError: no such file, a file torch cannot read as weights, or no
            state_dict in it (each named, with what was expected).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigurationError(f"{str(path)!r}: no such file")
    try:
        state = torch.load(file, weights_only=True, map_location=device)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the file's
        raise ConfigurationError(f"{path} could not be read as a weights-only torch checkpoint: "
                                 f"{describe(exc)}") from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ConfigurationError(f"{path} holds no state_dict (expected a dict of tensors, or "
                                 "a dict with 'state_dict' or 'model')")
    return state


def load_weights(model: torch.nn.Module, path: str | os.PathLike,
                 device: str | torch.device = "cpu", *, name: str = "the model"
                 ) -> list[str]:
    """Load the checkpoint ``path`` into ``model`` (:func:`read_state_dict`), a wrapper's
    prefixes removed first when that makes the keys the model's
    (:func:`strip_wrapper_prefixes`).

    Args:
        model: the model whose weights are replaced.
        path: the checkpoint file.
        device: the ``map_location``.
        name: how a mismatch message names the model.

    Returns:
        The prefixes removed from the keys, in order (empty when none was).

    Raises:
        ConfigurationError: what :func:`read_state_dict` raises, or keys and shapes that differ
            from the model's (:func:`mismatch_message`).
    """
    state = read_state_dict(path, device)
    own = model.state_dict()
    state, removed = strip_wrapper_prefixes(state, own)
    problem = mismatch_message(str(path), state, own, name)
    if problem is not None:
        raise ConfigurationError(problem)
    model.load_state_dict(state)
    return removed
