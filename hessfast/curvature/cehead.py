"""The fused cross-entropy loss head: the criterion's curvature w.r.t. the logits computed by
:mod:`hessfast.kernels.ce_curvature` instead of autograd's double backward.

When ``loss_fn`` is torch's cross-entropy (:func:`ce_spec`: ``nn.CrossEntropyLoss`` without
class weights, ``F.cross_entropy``, or a ``functools.partial`` of it) and a batch's targets
are class indices, the Hessian of the criterion w.r.t. the logits is, per row,
``scale * (diag(p) - p p^T)`` (``p = softmax(row)``; label smoothing does not change it, since
its target distribution sums to one), zero on ``ignore_index`` rows, with ``scale`` the
reduction's ``1 / (number of counted rows)`` or 1. Two users:

* the GGN applies it directly to ``J V`` (:meth:`CEHead.product`): no double-backward graph
  of the criterion is built or kept;
* the Hessian's double-backward graph uses :func:`fused_cross_entropy`, an autograd Function
  whose backward is ``scale * (p - q)`` and whose second backward is the same product.

Any other case (probability targets, class weights, a subclass of the loss) keeps autograd.
The kernel runs Triton on CUDA and plain torch on the CPU; a product batched by autograd's
``is_grads_batched`` (its tensors have no storage) takes the plain torch composition, which
vmap can batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ..kernels.ce_curvature import (
    ce_hessian_product,
    ce_hessian_product_reference,
)

__all__ = ["CEHead", "CESpec", "FusedCriterion", "ce_spec", "fused_cross_entropy"]

_PARTIAL_KEYS = {"reduction", "ignore_index", "label_smoothing"}


@dataclass(frozen=True)
class CESpec:
    """How a recognised cross-entropy reduces and what it ignores."""

    reduction: str  # "mean" | "sum"
    ignore_index: int
    label_smoothing: float


def ce_spec(loss_fn: Any) -> CESpec | None:
    """The cross-entropy ``loss_fn`` is, or None when it is not one hessfast can fuse:
    ``nn.CrossEntropyLoss`` itself (not a subclass) with no class weights and a ``mean`` or
    ``sum`` reduction, ``F.cross_entropy``, or ``functools.partial(F.cross_entropy, ...)``
    binding only ``reduction``, ``ignore_index`` or ``label_smoothing``."""
    if type(loss_fn) is nn.CrossEntropyLoss:
        if loss_fn.weight is not None or loss_fn.reduction not in ("mean", "sum"):
            return None
        return CESpec(loss_fn.reduction, int(loss_fn.ignore_index), float(loss_fn.label_smoothing))
    kwargs: dict[str, Any] = {}
    fn = loss_fn
    if isinstance(loss_fn, functools.partial):
        if loss_fn.args or not set(loss_fn.keywords) <= _PARTIAL_KEYS:
            return None
        fn, kwargs = loss_fn.func, dict(loss_fn.keywords)
    if fn is not F.cross_entropy:
        return None
    reduction = kwargs.get("reduction", "mean")
    if reduction not in ("mean", "sum"):
        return None
    return CESpec(reduction, int(kwargs.get("ignore_index", -100)),
                  float(kwargs.get("label_smoothing", 0.0)))


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, C, *d]`` / ``[C]`` as rows ``[R, C]`` (the class dimension last)."""
    if logits.dim() == 1:
        return logits.unsqueeze(0)
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def _usable(logits: Any, targets: Any) -> bool:
    """Class-index targets whose shape matches the logits' (``[N]`` for ``[N, C]``, ...)."""
    if not (isinstance(logits, torch.Tensor) and isinstance(targets, torch.Tensor)):
        return False
    if not logits.is_floating_point() or targets.is_floating_point() or targets.is_complex():
        return False
    if targets.dtype == torch.bool or logits.dim() == 0:
        return False
    if logits.dim() == 1:
        return targets.dim() == 0
    return tuple(targets.shape) == (logits.shape[0], *logits.shape[2:])


class CEHead:
    """The criterion's Hessian w.r.t. the outputs of one batch, as a batched product.

    Attributes:
        logits: the outputs ``[N, C, *d]`` (detached), rows ``[R, C]`` inside.
        mask: ``[R]`` bool, the rows that count.
        scale: 0-d tensor on the logits' device, the reduction's factor.
    """

    def __init__(self, spec: CESpec, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.shape = logits.shape
        self.rows = _rows(logits.detach())
        self.mask, self.scale = _mask_scale(spec, targets, self.rows)

    @classmethod
    def build(cls, spec: CESpec | None, logits: Any, targets: Any) -> CEHead | None:
        """The head for this batch, or None when it cannot be fused (autograd then)."""
        if spec is None or not _usable(logits, targets):
            return None
        return cls(spec, logits, targets)

    def product(self, U: torch.Tensor) -> torch.Tensor:
        """``H U`` for directions ``U [c, *outputs]``; returns ``[c, *outputs]``."""
        c = U.shape[0]
        if len(self.shape) == 1:
            rows = U.unsqueeze(1)
        else:
            rows = U.movedim(2, -1).reshape(c, -1, self.shape[1])
        out = ce_hessian_product(self.rows, rows, mask=self.mask, scale=self.scale)
        if len(self.shape) == 1:
            return out.squeeze(1)
        moved = (c, self.shape[0], *self.shape[2:], self.shape[1])
        return out.reshape(moved).movedim(-1, 2)


def _mask_scale(
    spec: CESpec, targets: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    mask = targets.reshape(-1).to(rows.device) != spec.ignore_index
    cdt = torch.float64 if rows.dtype == torch.float64 else torch.float32
    if spec.reduction == "mean":
        scale = 1.0 / mask.sum().to(cdt)  # on the device: no host synchronisation
    else:
        scale = torch.ones((), dtype=cdt, device=rows.device)
    return mask, scale


def _has_storage(t: torch.Tensor) -> bool:
    """False for the storage-less tensors of a vmapped backward (``is_grads_batched``)."""
    try:
        t.data_ptr()
    except RuntimeError:
        return False
    return True


def _apply_hessian(
    v: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``H v`` for one direction ``v [R, C]`` (or a vmapped batch of them)."""
    # Inside autograd's batched backward (no storage) only plain torch ops, which vmap batches.
    product = ce_hessian_product if _has_storage(v) else ce_hessian_product_reference
    return product(rows, v.unsqueeze(0), mask=mask, scale=scale)[0]


class _CEGrad(torch.autograd.Function):
    """``scale * (p - q)`` per counted row (the criterion's gradient w.r.t. the rows); its
    backward is the Hessian product (third derivatives are not supported)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                scale: torch.Tensor, smoothing: float) -> torch.Tensor:
        ctx.save_for_backward(rows, mask, scale)
        cdt = scale.dtype
        p = torch.softmax(rows.to(cdt), dim=-1)
        safe = torch.where(mask, targets, torch.zeros_like(targets))
        q = F.one_hot(safe, rows.shape[-1]).to(cdt) * (1.0 - smoothing) + smoothing / rows.shape[-1]
        g = (p - q) * scale
        return torch.where(mask[:, None], g, torch.zeros((), dtype=cdt)).to(rows.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, v: torch.Tensor) -> tuple[Any, ...]:
        rows, mask, scale = ctx.saved_tensors
        return _apply_hessian(v, rows, mask, scale), None, None, None, None


class _CELoss(torch.autograd.Function):
    """The criterion's value (torch's own), with a backward built from :class:`_CEGrad`."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, targets: torch.Tensor, spec: CESpec
                ) -> torch.Tensor:
        ctx.save_for_backward(rows, targets)
        ctx.spec = spec
        return F.cross_entropy(rows, targets, ignore_index=spec.ignore_index,
                               reduction=spec.reduction, label_smoothing=spec.label_smoothing)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        rows, targets = ctx.saved_tensors
        spec = ctx.spec
        mask, scale = _mask_scale(spec, targets, rows)
        g = _CEGrad.apply(rows, targets, mask, scale, spec.label_smoothing)
        return grad * g, None, None


def fused_cross_entropy(spec: CESpec, logits: torch.Tensor, targets: torch.Tensor
                        ) -> torch.Tensor:
    """``cross_entropy(logits, targets)`` as ``spec`` says, with first and second derivatives
    w.r.t. the logits from the fused product (for a double-backward graph).

    Args:
        spec: the recognised cross-entropy (:func:`ce_spec`): its reduction, ignored index and
            label smoothing.
        logits: ``[N, C, *d]`` or ``[C]`` (check with :meth:`CEHead.build` or ``_usable``
            first).
        targets: class indices ``[N, *d]`` (or ``[]`` for ``[C]`` logits).

    Returns:
        The loss, a scalar ``[]``.
    """
    rows = _rows(logits)
    return _CELoss.apply(rows, targets.reshape(-1).to(rows.device), spec)


class FusedCriterion:
    """``loss_fn`` with the fused cross-entropy where a batch allows it, else ``loss_fn``
    itself."""

    def __init__(self, loss_fn: Any, spec: CESpec) -> None:
        self.loss_fn, self.spec = loss_fn, spec

    def __call__(self, outputs: Any, targets: Any) -> Any:
        """The loss of one batch: fused when ``outputs``/``targets`` are class-index logits and
        targets it can take, else ``loss_fn(outputs, targets)`` unchanged."""
        if _usable(outputs, targets):
            return fused_cross_entropy(self.spec, outputs, targets)
        return self.loss_fn(outputs, targets)
