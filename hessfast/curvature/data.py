"""The batch source of a curvature operator: what counts as one batch, the batch weights, and
the check that every pass over the data sees the same batches.

Batch weights. The operator is the curvature of the MEAN loss over samples. A loss that
averages over its batch (``reduction="mean"``, the default of torch's losses, and the
assumption for any callable) gets the weight ``n_b / N``; one that sums over its batch
(``reduction="sum"``) gets ``1 / N``, so both give the same operator (the curvature of the
summed loss is ``N`` times it). The reduction is read from ``loss_fn.reduction`` (torch's
loss modules, or any callable given that attribute) or from a ``functools.partial``'s
``reduction=`` keyword (:func:`~hessfast.curvature.lossform.loss_reduction`).

Batch sizes. ``batch_size_fn(batch)`` when given; else the leading dimension of the batch's
tensors that have one (0-d tensors such as a temperature are not samples). When those
tensors disagree and the weights would depend on which one counts, :class:`BatchError` asks
for ``batch_size_fn``: the size is never guessed silently.

Unsized data. A source without ``len()`` (an ``IterableDataset``, a custom iterable) is read
for at most :data:`MAX_UNSIZED_BATCHES` batches on the first pass; more raises
:class:`~hessfast.errors.UnboundedDataError` (an endless stream would never end the pass).

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

from ..errors import (
    BatchError,
    ConfigurationError,
    DataChangedError,
    EmptyDataError,
    LossError,
    NotReiterableError,
    UnboundedDataError,
)

__all__ = [
    "MAX_UNSIZED_BATCHES",
    "BatchSource",
    "describe",
    "is_single_batch",
    "leading_dims",
    "tensor_leaves",
    "to_device",
]

# Batches read on the first pass over a source without len() before it is taken for endless.
MAX_UNSIZED_BATCHES = 100_000

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


def leading_dims(obj: Any, path: str = "batch") -> list[tuple[str, int]]:
    """``(where, leading dimension)`` of every tensor of a batch with at least one dimension,
    in order: ``[("batch['x']", 8), ("batch['y']", 8)]`` (0-d tensors are not samples)."""
    if isinstance(obj, torch.Tensor):
        return [(path, int(obj.shape[0]))] if obj.dim() > 0 else []
    if isinstance(obj, Mapping):
        return [d for k, v in obj.items() for d in leading_dims(v, f"{path}[{k!r}]")]
    if isinstance(obj, (list, tuple)):
        return [d for i, v in enumerate(obj) for d in leading_dims(v, f"{path}[{i}]")]
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
        self,
        data: Any,
        batch_size_fn: Callable[[Any], int] | None,
        *,
        verify: bool,
        max_batches: int | None = None,
        allow_empty: bool = False,
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
        # per batch, the leading dimension of each tensor (None with batch_size_fn)
        self._dims: list[list[tuple[str, int]] | None] = []
        self._first: tuple[int, Any] | None = None
        self.reduction, self.reduction_reason = "mean", "not known yet (set_reduction)"
        limit = None if _has_len(self._source) else (max_batches or MAX_UNSIZED_BATCHES)
        for i, batch in enumerate(self._source):
            if limit is not None and i >= limit:
                raise UnboundedDataError(
                    f"data ({type(data).__name__}) has no len() and yielded more than "
                    f"{limit} batches on the first pass: it looks endless (an IterableDataset "
                    "that never stops). hessfast needs a finite, fixed set of batches: take "
                    "some, e.g. data=list(itertools.islice(loader, N)), or give the dataset "
                    "a __len__"
                )
            size = self._size(batch, i)
            if size > 0 and self._first is None:
                self._first = (i, batch)
            self.sizes.append(size)
            self.fingerprints.append(fingerprint(batch))
        self.rule = _rule(data, single, len(self.sizes))
        self.num_samples = sum(self.sizes)
        if self.num_samples == 0 and not allow_empty:  # allowed: a rank of a process group
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
            self._dims.append(None)
            return int(self._batch_size_fn(batch))
        if not tensor_leaves(batch):
            raise BatchError(
                f"batch {index} is {describe(batch)} and holds no tensors that hessfast can "
                "count samples in (it looks into tensors, tuples, lists and dicts). Pass "
                "batch_size_fn=lambda batch: <number of samples>"
            )
        dims = leading_dims(batch)
        self._dims.append(dims)
        return dims[0][1] if dims else 1  # only 0-d tensors: one sample

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

    def set_reduction(self, found: str | None, where: str, declared: str = "auto") -> None:
        """Learn how the loss reduces over a batch, which decides the batch weights.

        Args:
            found: the reduction read from ``loss_fn`` (``"mean"``, ``"sum"``, ``"none"``),
                or None when it cannot be read (:func:`~.lossform.loss_reduction`).
            where: where ``found`` was read (or why it was not), for the messages.
            declared: ``"mean"`` or ``"sum"`` as declared by the user, or ``"auto"``: the
                one found, else mean.

        Raises:
            LossError: ``loss_fn`` does not reduce (``reduction="none"``).
            ConfigurationError: a declared reduction contradicts the one ``loss_fn`` has.
            BatchError: a batch's tensors disagree on its number of samples and the weights
                depend on which one counts.
        """
        reduction = declared
        if found == "none":
            raise LossError(
                f"{where}: loss_fn returns one loss per sample, and the curvature needs one "
                "scalar per batch. Use reduction='mean' (or 'sum')"
            )
        if reduction != "auto":
            if found is not None and found != reduction:
                raise ConfigurationError(
                    f"loss_reduction={reduction!r} was given but {where}: drop the argument "
                    "or make them agree"
                )
            self.reduction, self.reduction_reason = reduction, f"loss_reduction={reduction!r}"
        elif found is not None:
            self.reduction, self.reduction_reason = found, where
        else:
            self.reduction = "mean"
            self.reduction_reason = f"{where}; loss_fn is assumed to return the batch MEAN"
        self._check_sizes()

    def _weights(self, sizes: list[int]) -> list[float] | None:
        """The batch weights for these sizes under the loss's reduction (None: no samples)."""
        total = sum(sizes)
        if total <= 0:
            return None
        if self.reduction == "sum":
            return [1.0 / total if s > 0 else 0.0 for s in sizes]
        return [s / total for s in sizes]

    def _check_sizes(self) -> None:
        """Raise unless every reading of an ambiguous batch's size gives the same weights."""
        ambiguous = [
            i for i, d in enumerate(self._dims) if d is not None and len({n for _, n in d}) > 1
        ]
        if not ambiguous:
            return
        chosen = self._weights(self.sizes)
        shapes = {len(d) if d is not None else -1 for d in self._dims}
        agree = len(shapes) == 1 and chosen is not None
        for j in range(shapes.pop() if agree else 0):
            other = self._weights([d[j][1] for d in self._dims if d is not None])
            if other is None or not all(
                math.isclose(a, b, rel_tol=1e-12) for a, b in zip(chosen, other, strict=True)
            ):
                agree = False
        if agree:
            return
        i = ambiguous[0]
        found = ", ".join(f"{where} has {n}" for where, n in self._dims[i] or [])
        raise BatchError(
            f"batch {i}'s tensors disagree on its number of samples ({found}), and the batch "
            f"weights depend on which counts (loss reduction {self.reduction!r}: "
            f"{self.reduction_reason}). Pass batch_size_fn=lambda batch: <number of samples>"
        )

    def weight(self, index: int) -> float:
        """Batch ``index``'s weight: its share of the samples for a batch-mean loss
        (``n_b / N``), ``1 / N`` for a batch-sum loss."""
        if self.reduction == "sum":
            return 1.0 / self.num_samples
        return self.sizes[index] / self.num_samples

    def first(self) -> tuple[int, Any]:
        """The first non-empty batch (kept from the first pass) and its index."""
        assert self._first is not None  # guaranteed by num_samples > 0
        return self._first


def _has_len(source: Iterable) -> bool:
    """Does ``source`` say how many batches it holds (a DataLoader over an IterableDataset
    without ``__len__`` raises TypeError)?"""
    try:
        len(source)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError, AttributeError):
        return False
    return True


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
