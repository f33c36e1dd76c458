"""What keeps the user's model untouched, and an operator a fixed function, while products run.

* :func:`tensor_slots`: every ``module._parameters`` / ``module._buffers`` slot that holds a
  tensor, by tensor. ``torch.func.functional_call`` is given one entry per distinct slot with
  ``tie_weights=False``: its own weight tying expands a name to every *path* of a tensor, and a
  submodule reachable by two paths (``Sequential(shared, act, shared)``) is then swapped twice
  and restored once, leaving plain tensors in the user's model (pytorch/pytorch#164759).
* :class:`SlotGuard`: every module's ``_parameters`` / ``_buffers`` entries, checked by identity
  after a computation and put back if anything replaced them (a second line of defence).
* :class:`BufferCopies`: the buffers as they were at construction; every evaluation gets fresh
  copies, so a forward that writes a buffer (observers, counters, running averages) neither
  changes the user's model nor the next evaluation.
* :class:`ParamFingerprint`: identity, dtype, device, shape, storage, version, ``requires_grad``
  and an exact checksum of every parameter at construction; an operator is the curvature at
  those parameters, and a product after any of them changed raises
  :class:`~hessfast.errors.ParametersChangedError`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

import torch
from torch import nn

from ..errors import ParametersChangedError

__all__ = ["BufferCopies", "ParamFingerprint", "SlotGuard", "tensor_slots"]


def tensor_slots(model: nn.Module) -> dict[int, list[str]]:
    """``id(tensor) -> names`` of the distinct ``(module, attribute)`` slots holding it.

    A module reused at two places is one slot (listed once, under its first path); a tensor
    tied between two modules (an embedding shared with a head) is two slots.
    """
    seen: set[tuple[int, str]] = set()
    slots: dict[int, list[str]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                if tensor is None or (id(module), key) in seen:
                    continue
                seen.add((id(module), key))
                slots.setdefault(id(tensor), []).append(f"{prefix}.{key}" if prefix else key)
    return slots


class SlotGuard:
    """Every module's parameter and buffer entries, restored by identity on exit."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    @contextmanager
    def hold(self) -> Iterator[None]:
        """A context in which the model's modules may swap their parameter and buffer
        entries (functional calls do); on exit every module's entries are the very tensors
        they were on entry, even after an exception."""
        saved = [(m, dict(m._parameters), dict(m._buffers)) for m in self._model.modules()]
        try:
            yield
        finally:
            for module, params, buffers in saved:
                for store, old in ((module._parameters, params), (module._buffers, buffers)):
                    if store.keys() != old.keys() or any(
                        store[k] is not v for k, v in old.items()
                    ):
                        store.clear()
                        store.update(old)


class BufferCopies:
    """The model's buffers at construction, handed out as fresh copies per evaluation.

    Args:
        named: ``(name, buffer)`` pairs (each tensor once).
    """

    def __init__(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self._saved = {n: b.detach().clone() for n, b in named}
        self.written: list[str] = []

    @property
    def saved(self) -> Mapping[str, torch.Tensor]:
        """The buffers' values at construction by name (read-only view; do not write)."""
        return MappingProxyType(self._saved)

    def fresh(self) -> dict[str, torch.Tensor]:
        """New copies of every buffer ``{name: tensor}`` for one evaluation."""
        return {n: b.clone() for n, b in self._saved.items()}

    def note_writes(self, copies: dict[str, torch.Tensor]) -> None:
        """After an evaluation: warn once naming the buffers its forward wrote."""
        new = [n for n, b in copies.items() if b._version != 0 and n not in self.written]
        if not new:
            return
        first = not self.written
        self.written.extend(new)
        if first:
            warnings.warn(
                f"hessfast: the model's forward writes the buffer(s) {new} (an observer, a "
                "counter, a running average). hessfast evaluates every batch with fresh copies "
                "of the buffers' values at construction: your model's buffers are untouched "
                "and the operator is a fixed function of the parameters",
                stacklevel=2,
            )


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """Exact, order-independent checksum of ``t``'s bits: its bytes read as int32 words and
    summed modulo 2**32 (wrapping int32 addition is associative, so the thread count and the
    reduction order do not matter; 10-50x cheaper than a float64 or int64-accumulated sum on
    the CPU). A 0-d int32 tensor; any change of one entry changes it."""
    flat = t.detach().reshape(-1)
    per_word = max(1, 4 // flat.element_size())
    pad = (-flat.numel()) % per_word
    if pad:  # 1- and 2-byte dtypes with a length that does not fill whole words
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(torch.int32).sum(dtype=torch.int32)


class ParamFingerprint:
    """The model's parameters at construction, checked cheaply before every product.

    Records per parameter: the object, dtype, device, shape, ``data_ptr``, ``_version``,
    ``requires_grad`` and an exact checksum of its bits (catches ``p.data.add_()``, which
    does not bump ``_version``). One checksum pass reads every parameter once.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._named = list(model.named_parameters())
        self._facts = [self._facts_of(p) for _, p in self._named]
        self._sums = self._checksums([p for _, p in self._named])

    @staticmethod
    def _facts_of(p: torch.Tensor) -> tuple:
        return (p.dtype, p.device, tuple(p.shape), p.data_ptr(), p._version, p.requires_grad)

    @staticmethod
    def _checksums(params: list[torch.Tensor]) -> list[int]:
        if not params:
            return []
        by_device: dict[torch.device, list[int]] = {}
        for i, p in enumerate(params):
            by_device.setdefault(p.device, []).append(i)
        out = [0] * len(params)
        for device, idx in by_device.items():
            if device.type == "meta":  # no values (an unselected, unmaterialised part)
                continue
            sums = torch.stack([_checksum(params[i]) for i in idx]).tolist()
            for i, s in zip(idx, sums, strict=True):
                out[i] = s
        return out

    def taken(self) -> list[tuple[str, torch.Tensor, int]]:
        """``(name, parameter, checksum)`` of every parameter of the model, as taken at
        construction (the checksum: the int of :meth:`checksums` over its bits)."""
        return [(n, p, s) for (n, p), s in zip(self._named, self._sums, strict=True)]

    @classmethod
    def checksums(cls, tensors: list[torch.Tensor]) -> list[int]:
        """The exact checksum of each tensor's bits (what :meth:`taken` holds)."""
        return cls._checksums(tensors)

    def changes(self) -> list[str]:
        """What changed since construction, one entry per parameter (empty: nothing)."""
        now = list(self._model.named_parameters())
        before = {n: (p, f) for (n, p), f in zip(self._named, self._facts, strict=True)}
        names_now = [n for n, _ in now]
        out = [f"{n} (removed)" for n in before if n not in dict(now)]
        out += [f"{n} (new parameter)" for n in names_now if n not in before]
        labels = ("dtype", "device", "shape", "storage", "version", "requires_grad")
        same_object = []
        for n, p in now:
            if n not in before:
                continue
            old, facts = before[n]
            if p is not old:
                out.append(f"{n} (replaced by another Parameter object)")
                continue
            diff = [
                f"{label} {a} -> {b}" if label not in ("storage", "version") else label
                for label, a, b in zip(labels, facts, self._facts_of(p), strict=True)
                if a != b
            ]
            if diff:
                out.append(f"{n} ({', '.join(diff)})")
            else:
                same_object.append(n)
        if same_object:
            index = {n: i for i, (n, _) in enumerate(self._named)}
            pmap = dict(now)
            sums = self._checksums([pmap[n] for n in same_object])
            out += [
                f"{n} (values changed in place)"
                for n, s in zip(same_object, sums, strict=True)
                if s != self._sums[index[n]]
            ]
        return out

    def check(self, kind: str) -> None:
        """Raise :class:`ParametersChangedError` when any parameter changed."""
        changed = self.changes()
        if not changed:
            return
        shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8
                                          else "")
        raise ParametersChangedError(
            f"the model's parameters changed after this {kind} operator was built: {shown}. "
            "An operator is the curvature at the parameters it was built at (an optimizer "
            "step, model.float(), model.to(dtype), p.data = ..., or a requires_grad change "
            f"after building it changes the function). Fix: build a new operator: "
            f"hf.{'ggn' if kind == 'GGN' else 'hessian'}(model, ...) at the new parameters; "
            "a SharpnessTracker-style loop rebuilds it every step"
        )
