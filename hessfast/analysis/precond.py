"""The preconditioned curvature an adaptive optimizer really steps on.

An adaptive optimizer updates ``theta <- theta - lr * m_hat / D`` with a diagonal ``D`` built
from its running second moments. On a quadratic its stability is governed by the eigenvalues
of ``D^-1 H``, which are those of the symmetric ``D^-1/2 H D^-1/2`` (Cohen et al. 2022,
"Adaptive gradient methods at the edge of stability"). :func:`preconditioned` is that operator
and :func:`preconditioner_diagonal` the flat ``D [n]``, read from the optimizer's state exactly
as torch 2.13's ``_single_tensor_*`` updates compute their denominators:

* ``Adam`` / ``AdamW``: ``D = sqrt(exp_avg_sq) / sqrt(1 - beta2^t) + eps`` (``amsgrad``:
  ``max_exp_avg_sq``), ``t`` the state's ``step`` (a tensor, on the device when capturable);
* ``RMSprop``: ``D = sqrt(square_avg) + eps``; centered: ``sqrt(square_avg - grad_avg^2) + eps``;
* ``Adagrad``: ``D = sqrt(sum) + eps``.

Scale. The operator keeps H's scale: the curvature of the MEAN loss. An optimizer on a
sum-reduced loss sees ``samples x`` that curvature (and its ``D`` comes from the moments of
that loss's gradients), so before comparing the eigenvalues of :func:`preconditioned` with a
learning-rate threshold multiply them by
:func:`hessfast.condition.lr_curvature_scale` ``(H).scale``, as
:class:`~hessfast.analysis.tracking.SharpnessTracker` does.

Hyperparameters are read per parameter group. The optimizer's state is only read (the
results are new tensors). ``D`` is the preconditioner of the LAST step taken: the next step
updates the moments with the next gradient first, a change of order ``1 - beta2`` per step.
"""

from __future__ import annotations

import torch
from torch import optim

from .._digest import tensor_digest
from ..errors import ArgumentTypeError, ConfigurationError
from ..estimators.session import renamed_arg
from ..linop import LinearOperator

__all__ = ["PreconditionedOperator", "preconditioned", "preconditioner_diagonal",
           "SUPPORTED_OPTIMIZERS"]

#: The optimizer classes (and their subclasses) whose preconditioner is known.
SUPPORTED_OPTIMIZERS: tuple[type, ...] = (optim.Adam, optim.RMSprop, optim.Adagrad)
_SUPPORTED_NAMES = "Adam, AdamW, RMSprop, Adagrad"


def _check_optimizer(optimizer: object, who: str) -> optim.Optimizer:
    if not isinstance(optimizer, optim.Optimizer):
        raise ArgumentTypeError(
            f"{who}: optimizer must be a torch.optim.Optimizer ({_SUPPORTED_NAMES}), got "
            f"{type(optimizer).__name__}"
        )
    if isinstance(optimizer, optim.SGD):
        raise ConfigurationError(
            f"{who}: SGD has no preconditioner; track H itself (hessfast.hessian(...) and "
            "hessfast.lambda_max, or SharpnessTracker without the preconditioned part)"
        )
    if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
        raise ConfigurationError(
            f"{who}: {type(optimizer).__name__} is not supported: its preconditioner is not "
            f"a known diagonal. Supported: {_SUPPORTED_NAMES} (and their subclasses); for "
            "other optimizers build the operator yourself with "
            "LinearOperator.from_function"
        )
    return optimizer


def _group_of(optimizer: optim.Optimizer) -> dict[int, dict]:
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def _as_float(x: object) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _denominator(optimizer: optim.Optimizer, p: torch.Tensor, group: dict, state: dict,
                 name: str, who: str) -> torch.Tensor:
    """The optimizer's ``D`` for one parameter, shaped like it (new tensor, float64)."""

    def get(key: str) -> torch.Tensor:
        if key not in state:
            raise ConfigurationError(
                f"{who}: the state of parameter {name!r} has no {key!r} (keys "
                f"{sorted(state)}); the {type(optimizer).__name__} options and its state "
                "disagree: was the state loaded from another optimizer?"
            )
        t = state[key]
        if t.is_complex():
            raise ConfigurationError(f"{who}: parameter {name!r} is complex; not supported")
        return t.detach().to(torch.float64)

    eps = _as_float(group["eps"])
    if isinstance(optimizer, optim.Adam):  # AdamW is a subclass in torch 2.13
        beta2 = _as_float(group["betas"][1])
        step = _as_float(state["step"])
        v = get("max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq")
        return v.sqrt() / (1.0 - beta2**step) ** 0.5 + eps
    if isinstance(optimizer, optim.RMSprop):
        square_avg = get("square_avg")
        if group.get("centered", False):
            grad_avg = get("grad_avg")
            return (square_avg - grad_avg * grad_avg).sqrt() + eps
        return square_avg.sqrt() + eps
    return get("sum").sqrt() + eps  # Adagrad


def preconditioner_diagonal(H: LinearOperator, optimizer: optim.Optimizer) -> torch.Tensor:
    """The optimizer's diagonal preconditioner ``D`` over H's parameters, flattened.

    Args:
        H: a curvature operator from :func:`hessfast.hessian` / :func:`hessfast.ggn` (its
            ``params`` and ``flatten`` give the parameter order).
        optimizer: an Adam, AdamW, RMSprop or Adagrad optimizer over (at least) H's
            parameters, after at least one ``optimizer.step()``.

    Returns:
        ``[n]`` tensor in ``H.dtype`` on ``H.device``; the update is ``-lr * m_hat / D``.

    Raises:
        ArgumentTypeError: H is not a curvature operator or optimizer not an Optimizer.
        ConfigurationError: an unsupported optimizer (SGD has none), a parameter of H the
            optimizer does not hold, or no state yet (before the first ``optimizer.step()``).
    """
    who = "hessfast.analysis.preconditioned"
    if not isinstance(H, LinearOperator) or not hasattr(H, "params"):
        raise ArgumentTypeError(
            f"{who}: H must be a curvature operator from hessfast.hessian or hessfast.ggn "
            f"(it knows its parameters), got {type(H).__name__}; for a plain operator scale "
            "it yourself with LinearOperator.from_function"
        )
    optimizer = _check_optimizer(optimizer, who)
    groups = _group_of(optimizer)
    names = list(getattr(H, "param_names", [str(i) for i in range(len(H.params))]))
    pieces = []
    for name, p in zip(names, H.params, strict=True):
        if id(p) not in groups:
            raise ConfigurationError(
                f"{who}: parameter {name!r} of H is not in the optimizer's param_groups; "
                "build H over the optimizer's parameters (hessfast.hessian(..., params=[...]))"
                " or add the parameter to the optimizer"
            )
        state = optimizer.state.get(p, {})
        if not state:
            raise ConfigurationError(
                f"{who}: the optimizer has no state for parameter {name!r}: it has not "
                "stepped yet (call after the first optimizer.step()) or the parameter never "
                "had a gradient; the preconditioner exists only after an update"
            )
        d = _denominator(optimizer, p, groups[id(p)], state, name, who)
        if tuple(d.shape) != tuple(p.shape):
            raise ConfigurationError(
                f"{who}: the optimizer state of {name!r} has shape {tuple(d.shape)}, the "
                f"parameter {tuple(p.shape)}; was the state loaded from another model?"
            )
        pieces.append(d)
    D = H.flatten(pieces) if hasattr(H, "flatten") else torch.cat([t.reshape(-1) for t in pieces])
    return D.to(dtype=H.dtype, device=H.device)


class PreconditionedOperator(LinearOperator):
    """``x -> D^-1/2 H D^-1/2 x`` for a symmetric H and a positive diagonal ``D [n]``.

    Symmetric by construction, deterministic when H is, so it is marked ``checked`` when H
    is (no probe products are spent on it); an unchecked H is probed through it. Each
    product is one product of H (``H.num_matvecs`` grows with this operator's counter).
    """

    def __init__(self, H: LinearOperator, diagonal: torch.Tensor) -> None:
        n = H.shape[0]
        if diagonal.dim() != 1 or diagonal.shape[0] != n:
            raise ConfigurationError(
                f"PreconditionedOperator: the diagonal must be [{n}], got "
                f"{tuple(diagonal.shape)}"
            )
        if not bool(torch.isfinite(diagonal).all()) or not bool((diagonal > 0).all()):
            raise ConfigurationError(
                "PreconditionedOperator: the preconditioner diagonal must be finite and "
                "positive (eps = 0 with a zero second moment gives D = 0); use eps > 0"
            )
        super().__init__(n, H.dtype, H.device)
        self.H = H
        self.diagonal = diagonal.to(dtype=H.dtype, device=H.device)
        self.scale = self.diagonal.rsqrt()  # D^-1/2, [n]
        self.checked = bool(H.checked or type(H).checks_itself)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.H.matmat(V * self.scale) * self.scale

    def state_fingerprint(self) -> dict[str, str] | None:
        """H's state plus the diagonal's bits (a checkpoint of a preconditioned run is
        refused after either changed; :meth:`LinearOperator.state_fingerprint`)."""
        return {**(self.H.state_fingerprint() or {}), "preconditioner": tensor_digest(
            self.diagonal)}


def preconditioned(A: LinearOperator | None = None, optimizer: optim.Optimizer | None = None,
                   *, H: LinearOperator | None = None) -> PreconditionedOperator:
    """The preconditioned curvature ``D^-1/2 A D^-1/2`` of an adaptive optimizer (``A`` the
    curvature operator, called H below).

    Its eigenvalues are those of ``D^-1 H``, the curvature the update ``-lr * m_hat / D``
    sees (times ``lr_curvature_scale(H).scale`` for a sum-reduced loss, module docstring);
    its largest, so scaled, is the preconditioned sharpness compared with
    ``(2 + 2 beta1) / ((1 - beta1) lr)`` for Adam (see :mod:`hessfast.analysis.tracking`).

    Args:
        A: curvature operator ``[n, n]`` from :func:`hessfast.hessian` / :func:`hessfast.ggn`
            (named ``A`` like every operator argument of hessfast).
        optimizer: Adam, AdamW (amsgrad or not), RMSprop (centered or not) or Adagrad, after
            at least one step; per-group hyperparameters are honoured; its state is only read.
        H: deprecated keyword name of ``A`` (a DeprecationWarning; removed in the next
            release). Positional calls ``preconditioned(H, optimizer)`` are unchanged.

    Returns:
        :class:`PreconditionedOperator` ``[n, n]``: ``matmat(V [k, n]) -> [k, n]``, the
        diagonal as ``.diagonal [n]``. A snapshot of both H and the optimizer state.

    Raises:
        See :func:`preconditioner_diagonal`.
    """
    A = renamed_arg(A, H, "A", "H", "hessfast.analysis.preconditioned")
    return PreconditionedOperator(A, preconditioner_diagonal(A, optimizer))
