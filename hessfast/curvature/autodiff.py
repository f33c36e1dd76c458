"""Vector-Jacobian products through a kept graph, for one vector or a chunk of them.

One vector goes in as the scalar ``sum_i <outputs_i, v_i>`` differentiated without
``grad_outputs``: the same numbers (the scalar's gradient w.r.t. ``outputs_i`` is exactly
``v_i``), but ``torch.autograd.grad`` with a tensor ``grad_outputs`` imports sympy on its
first call (``torch.fx.experimental.symbolic_shapes``: 0.5-1 s of a fresh process on the
2-core CPU), which a single-vector user (``lambda_max``, power iteration) then never pays.
A chunk uses ``is_grads_batched`` (one call for all rows), row by row where autograd cannot
batch an op.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

__all__ = ["graph_vjp", "scalar_vjp"]


def scalar_vjp(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    vectors: Sequence[torch.Tensor],
    *,
    retain: bool,
    create_graph: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """``sum_i J_i^T v_i`` per input, for one vector per output (``v_i`` shaped like
    ``outputs_i``); None for an input the outputs do not depend on."""
    total = sum((o * v).sum() for o, v in zip(outputs, vectors, strict=True))
    return torch.autograd.grad(
        total, inputs, retain_graph=retain, create_graph=create_graph, allow_unused=True
    )


def graph_vjp(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor],
    *,
    retain: bool,
) -> tuple[torch.Tensor | None, ...]:
    """vjps for a chunk: each grad output ``[c, *output shape]``; returns per input
    ``[c, *input shape]`` (None where unused). ``retain=False`` frees the graph after."""
    c = grad_outputs[0].shape[0]
    if c == 1:
        res = scalar_vjp(outputs, inputs, [g[0] for g in grad_outputs], retain=retain)
        return tuple(None if r is None else r.unsqueeze(0) for r in res)
    try:
        with warnings.catch_warnings():
            # The vmap fallback for an op without a batching rule warns per call.
            warnings.simplefilter("ignore", UserWarning)
            return torch.autograd.grad(
                outputs,
                inputs,
                grad_outputs,
                # kept even when the caller is done: the loop below may need it
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
    except RuntimeError:
        rows = [
            scalar_vjp(outputs, inputs, [g[i] for g in grad_outputs], retain=True)
            for i in range(c)
        ]
        return tuple(
            None if rows[0][j] is None else torch.stack([r[j] for r in rows])
            for j in range(len(inputs))
        )
