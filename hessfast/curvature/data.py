"""The batch source of a curvature operator: what counts as one batch, the batch weights, and
the check that every pass over the data sees the same batches.

A batch's content is summarised by a fingerprint (shape and float64 sum of every tensor in
it): one sum per tensor, cheap enough to take on every pass, and it changes when a loader
shuffles or augments at random.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from ..errors import BatchError, DataChangedError, EmptyDataError, NotReiterableError

__all__ = ["BatchSource", "describe", "is_single_batch", "tensor_leaves", "to_device"]

# How data is split into batches, said in every error that depends on it.
SINGLE_RULE = "a tensor, tuple or dict is one batch; a list or other iterable is a sequence"

Fingerprint = tuple[tuple[tuple[int, ...], float], ...]


def tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a batch (nested tuples, lists and mappings), in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in tensor_leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensor_leaves(v)]
    return []


def to_device(obj: Any, device: torch.device) -> Any:
    """The batch with every tensor moved to ``device`` (containers keep their types)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        moved = {k: to_device(v, device) for k, v in obj.items()}
        try:
            return type(obj)(moved)
        except TypeError:  # a mapping type that cannot be built from a dict
            return moved
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def is_single_batch(data: Any) -> bool:
    """Is ``data`` ONE batch rather than a sequence of batches?

    A tensor, a tuple (namedtuples too) or a mapping (dict) is one batch; anything else (a
    list, a DataLoader, any other iterable) is a sequence of batches, whatever it holds. So
    ``(inputs, targets)`` is one batch and ``[ids_0, ids_1, ids_2]`` three. To pass one
    batch of another kind, wrap it: ``data=[batch]``; batches held in a tuple: ``list(data)``.
    """
    return isinstance(data, (torch.Tensor, tuple, Mapping))


def describe(obj: Any) -> str:
    """``a Tensor [4, 8]``, ``a tuple of 2``, ``a dict with keys ['input_ids', 'labels']``."""
    if isinstance(obj, torch.Tensor):
        return f"a Tensor {list(obj.shape)}"
    if isinstance(obj, Mapping):
        return f"a {type(obj).__name__} with keys {list(obj)[:4]}"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)}"
    return f"a {type(obj).__name__}"


def fingerprint(batch: Any) -> Fingerprint:
    """Shapes and float64 sums of every tensor in a batch."""
    fp = []
    for t in tensor_leaves(batch):
        if t.numel() == 0:
            fp.append((tuple(t.shape), 0.0))
            continue
        td = t.detach().abs() if t.is_complex() else t.detach()
        # accumulated in float64 without a float64 copy of the batch
        fp.append((tuple(t.shape), td.sum(dtype=torch.float64).item()))
    return tuple(fp)


def fingerprints_equal(a: Fingerprint, b: Fingerprint) -> bool:
    """Same shapes and sums up to rounding (a NaN sum equals a NaN sum)."""
    if len(a) != len(b):
        return False
    for (sa, va), (sb, vb) in zip(a, b, strict=False):
        if sa != sb:
            return False
        if math.isnan(va) and math.isnan(vb):
            continue  # a NaN batch is the same NaN batch; the loss check names it
        if not (va == vb or abs(va - vb) <= 1e-9 * max(abs(va), abs(vb), 1.0)):
            return False
    return True


class BatchSource:
    """A re-iterable source of batches with a fixed, verified content.

    The first pass (at construction) records every batch's size and fingerprint; every later
    pass is checked against them. ``verify`` also looks at the start of a second pass at once,
    which catches a shuffling loader before any curvature is computed.
    """

    def __init__(
        self, data: Any, batch_size_fn: Callable[[Any], int] | None, *, verify: bool
    ) -> None:
        if data is None:
            raise EmptyDataError("data is None: pass one batch or a re-iterable of batches")
        single = is_single_batch(data)
        if single:
            self._source: Iterable = [data]
        else:
            if isinstance(data, Iterator) or hasattr(data, "__next__"):
                raise NotReiterableError(
                    f"data is a one-shot iterator ({type(data).__name__}): a curvature "
                    "operator passes over the data many times. Pass a list of batches or a "
                    "DataLoader (re-iterable), e.g. data=list(your_generator)"
                )
            if not isinstance(data, Iterable):
                raise BatchError(
                    f"data is {describe(data)}: neither one batch ({SINGLE_RULE}) nor an "
                    "iterable of batches. Pass a tuple (inputs, targets), a dict or a tensor; "
                    "a list or DataLoader of them; or wrap a batch of another kind: "
                    "data=[batch] (with batch_size_fn=)"
                )
            self._source = data
        self._batch_size_fn = batch_size_fn
        self.sizes: list[int] = []
        self.fingerprints: list[Fingerprint] = []
        self._first: tuple[int, Any] | None = None
        for i, batch in enumerate(self._source):
            size = self._size(batch, i)
            if size > 0 and self._first is None:
                self._first = (i, batch)
            self.sizes.append(size)
            self.fingerprints.append(fingerprint(batch))
        self.rule = _rule(data, single, len(self.sizes))
        self.num_samples = sum(self.sizes)
        if self.num_samples == 0:
            raise EmptyDataError(
                f"data yielded {len(self.sizes)} batches and 0 samples: the Hessian of a loss "
                "over no data is undefined. Check the dataset / DataLoader is not empty"
            )
        skipped = self.sizes.count(0)
        if skipped:
            warnings.warn(f"hessfast: skipping {skipped} empty batch(es) in data", stacklevel=4)
        self.num_batches = len(self.sizes) - skipped
        if verify and len(self.sizes) > 1:
            # A shuffling loader almost surely changes its first batch: one look at the
            # start of a second pass catches it before any curvature is computed.
            for batch in self._source:
                if not fingerprints_equal(fingerprint(batch), self.fingerprints[0]):
                    raise DataChangedError(
                        "the first batch differs between two passes over the data: the "
                        "loader shuffles or augments at random, so the operator would change "
                        "from one product to the next. Use shuffle=False and no random "
                        "augmentation, or materialise the batches once: data=list(loader)"
                    )
                break

    def _size(self, batch: Any, index: int) -> int:
        if self._batch_size_fn is not None:
            return int(self._batch_size_fn(batch))
        leaves = tensor_leaves(batch)
        if not leaves:
            raise BatchError(
                f"batch {index} is {describe(batch)} and holds no tensors that hessfast can "
                "count samples in (it looks into tensors, tuples, lists and dicts). Pass "
                "batch_size_fn=lambda batch: <number of samples>"
            )
        t = leaves[0]
        return int(t.shape[0]) if t.dim() > 0 else 1

    def __iter__(self) -> Iterator[tuple[int, Any, float]]:
        """Yield ``(index, batch, weight = batch size / total)``, verifying the content."""
        count = 0
        for i, batch in enumerate(self._source):
            if i >= len(self.sizes) or not fingerprints_equal(
                fingerprint(batch), self.fingerprints[i]
            ):
                raise DataChangedError(
                    f"batch {i} differs from the first pass over the data: the operator is "
                    "defined by a fixed set of batches. Turn off shuffling (shuffle=False, "
                    "no random sampler), random augmentation and drop_last with shuffling, "
                    "or materialise the batches once: data=list(loader)"
                )
            count += 1
            if self.sizes[i] == 0:
                continue
            yield i, batch, self.weight(i)
        if count != len(self.sizes):
            raise DataChangedError(
                f"data yielded {count} batches on this pass but {len(self.sizes)} on the "
                "first: the data must be the same on every pass (no shuffling, no "
                "drop_last with a random sampler); materialise it: data=list(loader)"
            )

    def set_loss(self, loss_fn: Callable, loss_form: str) -> None:
        """Record the loss the batches feed (its reduction decides the batch weights)."""
        self._loss = (loss_fn, loss_form)

    def weight(self, index: int) -> float:
        """Batch ``index``'s share of the samples."""
        return self.sizes[index] / self.num_samples

    def first(self) -> tuple[int, Any]:
        """The first non-empty batch (kept from the first pass) and its index."""
        assert self._first is not None  # guaranteed by num_samples > 0
        return self._first


def _rule(data: Any, single: bool, count: int) -> str:
    """How ``data`` was read, and how to read it otherwise (for the messages)."""
    if single:
        rule = f"data is {describe(data)}, so it is ONE batch ({SINGLE_RULE})"
        if isinstance(data, tuple) and data and all(
            isinstance(x, (tuple, list, Mapping)) for x in data
        ):
            rule += "; if it holds batches, pass them as a list: data=list(data)"
        return rule
    return (
        f"data is a {type(data).__name__} of {count} items, so it is a SEQUENCE of {count} "
        f"batches ({SINGLE_RULE}); for one batch pass a tuple, e.g. data=(inputs, targets), or "
        "wrap it: data=[batch]"
    )
