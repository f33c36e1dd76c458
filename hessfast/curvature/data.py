"""The batch source of a curvature operator: what counts as one batch, the batch weights, and
the check that every pass over the data sees the same batches.

A batch's content is summarised by a fingerprint (shape and float64 sum of every tensor in
it): one sum per tensor, cheap enough to take on every pass, and it changes when a loader
shuffles or augments at random.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from ..errors import DataChangedError, EmptyDataError, NotReiterableError

__all__ = ["BatchSource", "is_single_batch", "tensor_leaves", "to_device"]

Fingerprint = tuple[tuple[tuple[int, ...], float], ...]


def tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a batch (nested tuples, lists and dicts), in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensor_leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensor_leaves(v)]
    return []


def to_device(obj: Any, device: torch.device) -> Any:
    """The batch with every tensor moved to ``device`` (containers keep their types)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return type(obj)((k, to_device(v, device)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def is_single_batch(data: Any) -> bool:
    """Is ``data`` one batch rather than a sequence of batches?

    A tensor or a dict is one batch. A tuple is one batch (``(inputs, targets)``) unless all
    its items are tuples/lists/dicts (then it is a tuple of batches). A list is one batch
    only when all its items are tensors (``[inputs, targets]``).
    """
    if isinstance(data, (torch.Tensor, dict)):
        return True
    if isinstance(data, tuple) and len(data) > 0:
        return not all(isinstance(x, (tuple, list, dict)) for x in data)
    if isinstance(data, list) and len(data) > 0:
        return all(isinstance(x, torch.Tensor) for x in data)
    return False


def fingerprint(batch: Any) -> Fingerprint:
    """Shapes and float64 sums of every tensor in a batch."""
    fp = []
    for t in tensor_leaves(batch):
        if t.numel() == 0:
            fp.append((tuple(t.shape), 0.0))
            continue
        td = t.detach()
        s = td.double().sum().item() if not td.is_complex() else td.abs().double().sum().item()
        fp.append((tuple(t.shape), s))
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
        if is_single_batch(data):
            self._source: Iterable = [data]
            self.rule = f"data is a {type(data).__name__}: one batch"
        else:
            self.rule = f"data is a {type(data).__name__}: a sequence of batches"
            if isinstance(data, Iterator) or hasattr(data, "__next__"):
                raise NotReiterableError(
                    f"data is a one-shot iterator ({type(data).__name__}): a curvature "
                    "operator passes over the data many times. Pass a list of batches or a "
                    "DataLoader (re-iterable), e.g. data=list(your_generator)"
                )
            if not isinstance(data, Iterable):
                raise TypeError(
                    f"data must be one batch (tuple/dict of tensors) or a re-iterable of "
                    f"batches, got {type(data).__name__}"
                )
            self._source = data
        self._batch_size_fn = batch_size_fn
        self.sizes: list[int] = []
        self.fingerprints: list[Fingerprint] = []
        self._first: tuple[int, Any] | None = None
        for i, batch in enumerate(self._source):
            size = self._size(batch)
            if size > 0 and self._first is None:
                self._first = (i, batch)
            self.sizes.append(size)
            self.fingerprints.append(fingerprint(batch))
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

    def _size(self, batch: Any) -> int:
        if self._batch_size_fn is not None:
            return int(self._batch_size_fn(batch))
        leaves = tensor_leaves(batch)
        if not leaves:
            raise TypeError(
                f"a batch of type {type(batch).__name__} holds no tensors; batches are "
                "(inputs, targets) tuples or dicts of tensors. For other batch types pass "
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

    def weight(self, index: int) -> float:
        """Batch ``index``'s share of the samples."""
        return self.sizes[index] / self.num_samples

    def first(self) -> tuple[int, Any]:
        """The first non-empty batch (kept from the first pass) and its index."""
        assert self._first is not None  # guaranteed by num_samples > 0
        return self._first
