"""The inner contract of :mod:`hessfast.curvature`: what the pre-flight checks
(:mod:`.preflight`, :mod:`.forwardcheck`) may use of a curvature operator.

They never receive the operator itself: :class:`~.operator.CurvatureOperator` hands them a
view of batch 0 and of its batch-level pieces (:class:`CheckedOperator`), and the planner's
decisions they need (``path_failed``, ``check_agreement``) as plain callables. So the checks
depend on this leaf module only, and the operator's private state stays in ``operator.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["CheckedOperator"]


class CheckedOperator(Protocol):
    """A curvature operator as its pre-flight checks see it.

    Attributes:
        kind: the operator's name in messages (``"Hessian"``, ``"GGN"``).
        model: the user's model (read only, inside :meth:`guard`).
        bn_mode: how BatchNorm layers normalise (``"eval"``, ``"train"``, ``"as_is"``).
        loss_form: ``"criterion"`` or ``"model"``: how ``loss_fn`` is called.
        param_names: the selected parameters' names, in layout order.
        param_dtype: the selected parameters' dtype.
        params: the selected parameters, in layout order.
        batch_sizes: the samples of each of this process's batches, in data order.
        n: the operator's size (the number of selected parameter entries).
        dtype, device: of the operator's vectors.
    """

    kind: str
    model: nn.Module
    bn_mode: Any
    loss_form: str
    param_names: Sequence[str]
    param_dtype: torch.dtype
    params: Sequence[torch.Tensor]
    batch_sizes: Sequence[int]
    n: int
    dtype: torch.dtype
    device: torch.device

    def guard(self) -> AbstractContextManager[None]:
        """Modes, kernels and the global RNG set for an evaluation and restored after."""
        ...

    def batch0(self) -> tuple[int, Any]:
        """The first non-empty batch's index, and the batch on the operator's device."""
        ...

    def first_graph(self) -> Any:
        """Batch 0's first-order graph, built once (call inside :meth:`guard`); its loss,
        checked, as ``state.loss``."""
        ...

    def loss_value(self, batch: Any, index: int) -> torch.Tensor:
        """The batch's loss by a fresh forward (no backward), detached."""
        ...

    def split(self, V: torch.Tensor) -> list[torch.Tensor]:
        """A block ``[c, n]`` as per-parameter pieces ``[c, *shape]``."""
        ...

    def graph_product(self, state: Any, V: list[torch.Tensor], *, retain: bool) -> torch.Tensor:
        """Products of a batch's graph ``state`` with a chunk ``V``; returns ``[c, n]``."""
        ...

    def fwd_rev_product(self, batch: Any, V: list[torch.Tensor]) -> torch.Tensor:
        """Forward-over-reverse products of one batch with a chunk; returns ``[c, n]``."""
        ...
