"""The checks a curvature operator runs before any answer is computed (``check=True``).

At construction, on the first batch, at the cost of one forward pass beyond batch 0's
first-order graph (which graph reuse keeps, so it is built once):

* an error in the user's model or loss (on batch 0's forward, before any differentiation)
  is a :class:`~hessfast.errors.LossCallError` with the user's exception chained and, when
  the cause is recognisable, a hint (:func:`.forwardcheck.explain_call_error`); only a
  failure of the differentiation itself is an :class:`~hessfast.errors.UnsupportedModelError`;
* the loss is a finite floating-point scalar that depends on the selected parameters
  (checked on batch 0's graph; every later graph is checked too);
* the precision the model really computes in: the least precise dtype of the tensors that
  depend on the parameters while batch 0's graph is built (``op.compute_dtype``, seen by
  :class:`.forwardcheck.GraphWatch` at no extra forward). A float64 model with float32
  pieces inside (transformers' RMSNorm, its causal-LM loss) computes to float32's rounding;
  the repeatability, symmetry and forward-over-reverse tolerances below follow it;
* every custom ``autograd.Function`` of the graph has a usable second derivative: one whose
  backward returns gradients without a graph (a fused linear-cross-entropy loss, a fused
  kernel) raises :class:`~hessfast.errors.UnsupportedModelError`
  (:func:`.forwardcheck.check_custom_functions`);
* the gradient of batch 0 is finite (the Hessian's graph holds it: no extra cost): a loss
  that is finite but not differentiable at the parameters (``sqrt(x**2)`` at 0) raises
  :class:`~hessfast.errors.NonFiniteError` naming the parameters;
* the loss is repeatable: a second forward of batch 0 gives the same loss
  (``check_deterministic``), which catches dropout, noise and sampling in the model or loss;
* every selected parameter gets a gradient: one used by the forward only with gradient
  recording off (``torch.utils.checkpoint(use_reentrant=True)`` around the first layers)
  raises :class:`~hessfast.errors.UnsupportedModelError`; one the loss does not use warns;
  a curvature that is identically zero (a loss linear in the parameters) warns. Warnings
  are UserWarnings starting "hessfast:", once per operator
  (:func:`.forwardcheck.check_graph_structure`);
* BatchNorm in training statistics and a later batch of one sample raises
  :class:`~hessfast.errors.ConfigurationError` naming the batch
  (:func:`.forwardcheck.check_small_batches`). These two checks cost one more forward of
  batch 0, only when a parameter gets no gradient or a batch holds one sample;
* with ``hvp_mode="fwd_rev"`` (or when double backward cannot build the graph), one
  forward-over-reverse product runs and, where double backward works, must agree with it;
* with ``hvp_mode="finite_difference"`` no second derivative is needed: batch 0's graph is an
  ordinary gradient (no ``create_graph``, the fused kernels, no zero-curvature warning), a
  custom Function with a flat backward is accepted, and the operator measures the
  finite-difference error (``H.fd_error``) right after these checks. In auto mode such a
  Function makes the exact paths unusable, so the planner falls back to finite differences
  (with a warning; ``exact=True`` refuses).

On the first products, at no extra product:

* every product is finite (checked per batch on every pass; the error names the
  parameters whose rows hold the NaN/Inf: a second derivative that is not finite where
  the gradient is, ``|w|**1.5`` at 0, or any NaN in the GGN);
* the operator is symmetric: :class:`SymmetryProbe` compares ``u.(Hv)`` with ``v.(Hu)`` for
  the first two non-parallel vectors multiplied (finite differences: within their recorded
  error, ``FD_SYMMETRY_FACTOR * fd_error``), which catches a loss that is not a fixed
  function of the parameters (in-place state updates, a custom ``autograd.Function`` whose
  backward is not its derivative).

Each failure raises its own ``hessfast.errors`` class naming the cause and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .._checks import all_finite, probe_generator
from ..errors import (
    AsymmetricOperatorError,
    HessfastError,
    LossCallError,
    LossError,
    NonDeterministicError,
    NonFiniteError,
    UnsupportedModelError,
)
from ..linop import local_dots, local_norm
from .forwardcheck import (
    GraphWatch,
    check_custom_functions,
    check_graph_structure,
    check_small_batches,
    explain_call_error,
    shown_names,
)
from .model import active_stochastic_modules
from .plan import AGREE_EPS, FD_MODE

if TYPE_CHECKING:
    from ._contract import CheckedOperator

__all__ = ["SymmetryProbe", "check_finite", "check_loss", "preflight"]

# Two evaluations of a deterministic loss agree to rounding; dropout moves it by far more.
REPEAT_EPS = 1e3
# Vectors closer to parallel than this (|cos|) make a vacuous symmetry test: wait for others.
PARALLEL_COS = 0.99
# Finite-difference products: u.(Hv) and v.(Hu) may differ by this many times their recorded
# relative error (op.fd_error) of ||u|| ||Hv|| (Cauchy-Schwarz on the products' errors).
FD_SYMMETRY_FACTOR = 4.0
#: bfloat16's unit roundoff (2^-8): the relative rounding of a kept row (:class:`SymmetryProbe`)
BF16_KEEP_ROUNDING = 2.0**-8


def _dot(x: torch.Tensor, y: torch.Tensor) -> float:
    """``x . y`` of two ``[n]`` rows of any float dtypes (float64 sums, slice by slice)."""
    return float(local_dots(x[None], y[None])[0])


def _max_abs(x: torch.Tensor) -> float:
    """``max |x_i|`` without an ``|x|`` copy."""
    lo, hi = torch.aminmax(x)
    return max(float(hi), -float(lo))


def preflight(
    op: CheckedOperator,
    check_deterministic: bool,
    *,
    requested: str,
    path_failed: Callable[[str, BaseException], None],
    check_agreement: Callable[[torch.Tensor, torch.Tensor, torch.dtype], None],
) -> torch.dtype:
    """Check the loss, its repeatability and (when used) forward-over-reverse on batch 0.

    Args:
        op: the operator as the checks see it (:class:`~._contract.CheckedOperator`).
        check_deterministic: compare a second evaluation of the loss with the first.
        requested: the ``hvp_mode`` asked for (``"fwd_rev"`` runs one such product here).
        path_failed: the planner's verdict on a path that raised (``Planner.path_failed``:
            raises for an explicit ``hvp_mode`` or when no path is left).
        check_agreement: the planner's comparison of forward-over-reverse with double
            backward (``Planner.check_agreement``).

    Returns:
        The least precise dtype the model computes in, seen while batch 0's graph was built
        (the operator's ``compute_dtype``).

    Raises:
        LossError, LossCallError, NonFiniteError: the loss on batch 0 is not a finite
            differentiable scalar, or ``loss_fn`` cannot take the batch.
        NonDeterministicError: a second evaluation of the loss differs.
        UnsupportedModelError: no path can differentiate the model twice, or the requested
            one cannot.
    """
    index, batch = op.batch0()
    # One guard for everything: the RNG advances from one evaluation to the next, so a
    # dropout layer draws a new mask for the repeat.
    with op.guard():
        try:
            return _checks(op, batch, index, check_deterministic, requested, path_failed,
                           check_agreement)
        except LossCallError as exc:
            # the user's forward or loss raised: say so, with a hint for the cause
            raise explain_call_error(exc, op, batch) from exc.__cause__


def _checks(
    op: CheckedOperator, batch: Any, index: int, check_deterministic: bool, requested: str,
    path_failed: Callable[[str, BaseException], None],
    check_agreement: Callable[[torch.Tensor, torch.Tensor, torch.dtype], None],
) -> torch.dtype:
    state: Any = None
    watch = GraphWatch(op.param_dtype)
    try:
        # the forward is wrapped by the operator's loss call: the user's errors are
        # LossCallErrors, anything else is double backward failing
        with watch:
            state = op.first_graph()
    except HessfastError:
        raise
    except Exception as exc:  # noqa: BLE001 - double backward cannot even start
        # (finite differences: batch 0's ordinary gradient fails, so no path can run)
        path_failed(FD_MODE if requested == FD_MODE else "double_backward", exc)
    compute_dtype = watch.compute_dtype
    if requested != FD_MODE:  # a Function's flat backward is right for a first derivative
        try:
            check_custom_functions(op, watch)
        except UnsupportedModelError as exc:
            if requested != "auto":
                raise
            # no exact path can be right through it: auto mode falls back to finite
            # differences (or refuses: exact=True, the GGN)
            path_failed("double_backward", exc)
            path_failed("fwd_rev", exc)
    if check_deterministic:
        first = state.loss if state is not None else op.loss_value(batch, index)
        _check_repeatable(op, compute_dtype, first, op.loss_value(batch, index), index)
    if state is not None:
        check_graph_structure(op, state, batch, index, stacklevel=6)
        _check_finite_gradient(op, state, index)
    check_small_batches(op, batch, index)
    if requested == "fwd_rev" or (state is None and requested != FD_MODE):
        _check_fwd_rev(op, batch, index, state, compute_dtype, path_failed, check_agreement)
    return compute_dtype


def check_loss(loss: Any, index: int) -> None:
    """The loss of batch ``index`` is a finite floating-point scalar with a graph."""
    if not isinstance(loss, torch.Tensor):
        raise LossError(
            f"loss_fn returned {type(loss).__name__} on batch {index}; it must return a "
            "scalar tensor (not a Python float: no .item())"
        )
    if loss.numel() != 1:
        raise LossError(
            f"loss_fn returned a tensor of shape {tuple(loss.shape)} on batch {index}; it "
            "must be a scalar: reduce it (reduction='mean')"
        )
    if not loss.is_floating_point():
        raise LossError(f"loss_fn returned dtype {loss.dtype}; it must be floating point")
    if not loss.requires_grad:
        raise LossError(
            f"the loss on batch {index} does not depend on the selected parameters "
            "(no grad_fn): do not compute it under torch.no_grad(), with .detach() or "
            ".item(), and check params selects parameters the loss uses"
        )
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteError(
            f"the loss is {loss.item()} on batch {index}: fix the data or the model "
            "(log(0), division by zero, overflow) before measuring curvature"
        )


def check_finite(
    part: torch.Tensor, index: int, kind: str, names: Sequence[str] | None = None,
    split: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
) -> None:
    """A product of batch ``index`` has no NaN/Inf (:func:`hessfast._checks.all_finite`: its
    min and max, one read without a boolean copy: 0.6 ms against 12 ms for
    ``isfinite(part).all()`` on 7M float32 entries, 2-core CPU). With the parameters'
    ``names`` and the operator's ``split`` (``[c, n]`` to per-parameter pieces), the message
    names the parameters whose rows hold them (``part: [c, n]``)."""
    if not all_finite(part):
        where = ""
        if names is not None and split is not None:
            bad = _nonfinite_names(list(names), split(part))
            where = f" in the rows of {shown_names(bad)}"
        raise NonFiniteError(
            f"the {kind} product on batch {index} contains NaN/Inf{where}: the loss is "
            "finite but its second derivative is not at these parameters (sqrt(x**2) or a "
            "norm at 0, |x|**p with 1 < p < 2 at 0, log near 0, fp16 overflow). Use "
            f"float32/float64. {_FIX}"
        )


def _nonfinite_names(names: list[str], pieces: Any) -> list[str]:
    """Names of the parameters whose piece (``[..., *shape]`` or None) has a NaN/Inf."""
    return [
        name
        for name, t in zip(names, pieces, strict=True)
        if t is not None and t.numel() and not torch.isfinite(t.detach()).all()
    ]


def _check_finite_gradient(op: CheckedOperator, state: Any, index: int) -> None:
    """The loss is finite (checked before); its gradient on batch 0, which the Hessian's
    graph holds, must be too, or the Hessian is undefined at these parameters
    (``sqrt(w**2)`` or a norm at 0 gives 0/0). Free: no product. A finite gradient with a
    non-finite second derivative (``|w|**1.5`` at 0) and the GGN (whose graph holds no
    gradient) are caught by the first product, which names the parameters
    (:func:`check_finite`): a product of batch 0 here would cost one double backward at
    every construction (tests/curvature/test_transformers.py::test_setup_cost_counts pins one)."""
    grads = getattr(state, "grads", None)
    if grads is None:
        return
    bad = _nonfinite_names(op.param_names, grads)
    if bad:
        raise NonFiniteError(
            f"the loss on batch {index} is finite ({float(state.loss):.6g}) but its gradient "
            f"is NaN/Inf in {shown_names(bad)}: the loss is not differentiable at these "
            f"parameters, so its {op.kind} is undefined there. {_FIX}"
        )


_FIX = (
    "Fix the model's numerics where the derivative is singular (an eps inside sqrt or norm: "
    "sqrt(x**2 + eps); clamp before log), move the parameters off that point, or leave "
    "those parameters out with params="
)


def _check_repeatable(
    op: CheckedOperator, compute_dtype: torch.dtype, first: torch.Tensor, again: torch.Tensor,
    index: int,
) -> None:
    a, b = float(first), float(again)
    eps = torch.finfo(compute_dtype).eps
    if a == b or abs(a - b) <= REPEAT_EPS * eps * max(abs(a), abs(b)):
        return
    active = active_stochastic_modules(op.model)
    cause = (
        f"active stochastic layers: {', '.join(active)}; use bn_mode='eval' "
        "(the default) or call model.eval()"
        if active
        else "a random operation in the model or loss (dropout, noise, sampling), or "
        "non-deterministic kernels"
    )
    raise NonDeterministicError(
        f"two evaluations of the loss on batch {index} differ ({a:.9g} vs {b:.9g}, more "
        f"than {compute_dtype}'s rounding, the precision the model computes in): the "
        f"curvature is random. Cause: {cause}. check_deterministic=False skips this check"
    )


def _check_fwd_rev(
    op: CheckedOperator, batch: Any, index: int, state: Any, compute_dtype: torch.dtype,
    path_failed: Callable[[str, BaseException], None],
    check_agreement: Callable[[torch.Tensor, torch.Tensor, torch.dtype], None],
) -> None:
    """One forward-over-reverse product on batch 0; it must agree with double backward."""
    gen = probe_generator(0)
    V = torch.randn(1, op.n, generator=gen, dtype=op.dtype).to(op.device)
    Vs = op.split(V)
    try:
        hv = op.fwd_rev_product(batch, Vs)
    except HessfastError:
        raise
    except Exception as exc:  # noqa: BLE001
        path_failed("fwd_rev", exc)
        return
    check_finite(hv, index, op.kind, op.param_names, op.split)
    if state is None:
        return
    try:
        ref = op.graph_product(state, Vs, retain=True)
    except Exception:  # noqa: BLE001 - no reference to compare with; the products will tell
        return
    check_agreement(ref, hv, compute_dtype)


class SymmetryProbe:
    """Completes the pre-flight's symmetry check on the operator's first products.

    Keeps the first vector multiplied and its product; when a second, non-parallel vector
    comes (in the same block or a later one) compares ``u.(Hv)`` with ``v.(Hu)`` once, to
    the rounding of the precision the model computes in.

    Args:
        kind: the operator's name for messages ("Hessian", "GGN").
        dtype: the least precise dtype the model computes in (``op.compute_dtype``).

    Attributes:
        relative_error: the products' recorded relative error (finite differences:
            ``op.fd_error``; 0 for the exact paths): the tolerance grows by
            ``FD_SYMMETRY_FACTOR * relative_error * max(||u|| ||Hv||, ||v|| ||Hu||)``.
    """

    def __init__(self, kind: str, dtype: torch.dtype) -> None:
        self._kind = kind
        self._dtype = dtype
        self._eps = torch.finfo(dtype).eps
        self._first: tuple[torch.Tensor, torch.Tensor] | None = None
        self.done = False
        self.relative_error = 0.0

    def observe(self, V: torch.Tensor, HV: torch.Tensor) -> None:
        """Look at a block ``V: [k, n]`` and its products ``HV: [k, n]``."""
        # Dots are float64 sums over slices of the rows (linop.local_dots: no whole-row
        # float64 copies); their rounding is far inside the tolerance, AGREE_EPS sqrt(n) eps
        # of the compute dtype (never more precise).
        for v, hv in zip(V, HV, strict=True):
            if self.done:
                return
            v_norm = v.norm().item()
            if v_norm == 0.0:
                continue
            if self._first is None:  # a block row is a view: keep copies
                keep = torch.bfloat16 if self._coarse() else v.dtype
                self._first = (v.to(keep, copy=True), hv.to(keep, copy=True))
                continue
            u, hu = self._first
            if abs(_dot(u, v)) > PARALLEL_COS * local_norm(u) * v_norm:
                continue
            self._compare(u, hu, v, hv)

    def _coarse(self) -> bool:
        """Whether the products' own error is coarse enough to keep the first pair in
        bfloat16: half the probe's memory (its two parameter-sized rows are all it holds,
        1 GB at GPT-2 small), at a cost to the tolerance (:data:`BF16_KEEP_ROUNDING` relative,
        by Cauchy-Schwarz) of at most a quarter of the finite-difference term's."""
        return FD_SYMMETRY_FACTOR * self.relative_error >= 4.0 * BF16_KEEP_ROUNDING

    def _compare(
        self, u: torch.Tensor, hu: torch.Tensor, v: torch.Tensor, hv: torch.Tensor
    ) -> None:
        self.done, self._first = True, None
        uHv = _dot(u, hv)
        vHu = _dot(v, hu)
        nu, nv = local_norm(u), local_norm(v)
        # |u.Hv| <= ||u|| ||Hv|| <= ||u|| sqrt(n) max|Hv|, and the same for v.Hu
        bound = max(nu * _max_abs(hv), nv * _max_abs(hu))
        tol = AGREE_EPS * self._eps * math.sqrt(u.numel()) * bound
        scale = max(nu * local_norm(hv), nv * local_norm(hu))
        if self.relative_error:
            tol += FD_SYMMETRY_FACTOR * self.relative_error * scale
        if u.dtype == torch.bfloat16:  # the kept pair's rounding: |(u - fl(u)).Hv| <= ...
            tol += 2.0 * BF16_KEEP_ROUNDING * scale
        if abs(uHv - vHu) > tol:
            raise AsymmetricOperatorError(
                f"u.(Hv) = {uHv:.9g} but v.(Hu) = {vHu:.9g} for the first two vectors "
                f"multiplied, further apart than the rounding of {self._dtype} (the least "
                f"precise dtype the model computes in allows {tol:.3g}): the {self._kind} "
                "product is not symmetric, so the loss is not a fixed function of the "
                "parameters (randomness, in-place updates of model state, a custom "
                "autograd.Function whose backward is not its derivative). Make the loss "
                "deterministic; check_deterministic=False accepts a random operator and "
                "skips this check"
            )
