"""The options of :func:`~hessfast.hessian` and :func:`~hessfast.ggn`, validated once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ArgumentTypeError, ConfigurationError
from .lossform import LOSS_FORMS
from .model import BN_MODES
from .plan import HVP_MODES

__all__ = ["LOSS_REDUCTIONS", "CurvatureOptions"]

LOSS_REDUCTIONS = ("auto", "mean", "sum")


@dataclass(frozen=True)
class CurvatureOptions:
    """Everything but the model, the loss and the data (see :func:`~hessfast.hessian`).

    Attributes:
        params: parameter names or tensors to differentiate; None: every trainable one.
        bn_mode: ``"eval"``, ``"train"`` or ``"as_is"``.
        hvp_mode: ``"auto"``, ``"reuse_graph"``, ``"double_backward"`` or ``"fwd_rev"``.
        check: run the pre-flight checks.
        check_deterministic: in the pre-flight, also require a repeatable loss.
        batch_size_fn: number of samples of a batch.
        loss_form: ``"auto"``, ``"criterion"`` or ``"model"``.
        chunk_size: rows of a block per batched call; None: chosen.
        reuse_graph: force graph reuse on or off in auto mode; None: when it fits.
        loss_reduction: ``"auto"``, ``"mean"`` or ``"sum"``: how ``loss_fn`` reduces.
        max_batches: the first pass's batch limit for data without ``len()``; None: default.
        process_group: ``"auto"``, None or a ``torch.distributed`` process group: the ranks
            whose data shards make up the data (:mod:`.dataparallel`).
        outputs, targets, causal_lm: how a criterion's outputs and targets come from a
            batch of any kind (:class:`~hessfast.curvature.model.BatchSplit`).
        fused_loss: compute a torch cross-entropy's curvature w.r.t. the logits with the
            fused product (:mod:`.cehead`) instead of autograd.
        lm_head: the GGN only: the model's output ``nn.Linear``, to split the GGN at the head
            and never hold ``[k, N, V]`` logit directions (:mod:`.lmhead`).
    """

    params: Sequence[str] | Sequence[torch.Tensor] | None = None
    bn_mode: str = "eval"
    hvp_mode: str = "auto"
    check: bool = True
    check_deterministic: bool = True
    batch_size_fn: Callable[[Any], int] | None = None
    loss_form: str = "auto"
    chunk_size: int | None = None
    reuse_graph: bool | None = None
    loss_reduction: str = "auto"
    max_batches: int | None = None
    process_group: Any = "auto"
    outputs: Callable[[Any, Any], Any] | None = None
    targets: Callable[[Any], Any] | None = None
    causal_lm: bool = False
    fused_loss: bool = True
    lm_head: Any = None

    def __post_init__(self) -> None:
        for name in ("outputs", "targets"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise ArgumentTypeError(
                    f"{name} must be a callable or None, got {type(fn).__name__}"
                )
        for flag in ("causal_lm", "fused_loss"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigurationError(
                    f"{flag} must be True or False, got {getattr(self, flag)!r}"
                )
        if self.loss_form == "model" and (self.outputs or self.targets or self.causal_lm):
            raise ConfigurationError(
                "loss_form='model' calls loss_fn(model, batch), which computes the outputs "
                "itself: outputs=, targets= and causal_lm= name them for a criterion "
                "loss_fn(outputs, targets). Drop one or the other"
            )
        if self.hvp_mode not in HVP_MODES:
            raise ConfigurationError(
                f"hvp_mode must be one of {HVP_MODES}, got {self.hvp_mode!r}"
            )
        if self.bn_mode not in BN_MODES:
            raise ConfigurationError(f"bn_mode must be one of {BN_MODES}, got {self.bn_mode!r}")
        if self.loss_form not in LOSS_FORMS:
            raise ConfigurationError(
                f"loss_form must be one of {LOSS_FORMS}, got {self.loss_form!r}"
            )
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ConfigurationError(
                f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}"
            )
        if self.max_batches is not None and (
            isinstance(self.max_batches, bool)
            or not isinstance(self.max_batches, int)
            or self.max_batches < 1
        ):
            raise ConfigurationError(
                f"max_batches must be a positive integer or None, got {self.max_batches!r}"
            )
        if self.chunk_size is not None and int(self.chunk_size) < 1:
            raise ConfigurationError(f"chunk_size must be >= 1 or None, got {self.chunk_size}")
