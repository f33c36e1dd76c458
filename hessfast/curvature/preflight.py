"""The pre-flight of a curvature operator: before any answer is computed, check on the first
batch that the loss is a valid scalar, that the model can be differentiated twice, and that
the products are finite, symmetric and repeatable. Each failure raises its own
``hessfast.errors`` class naming the cause and the fix."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..errors import (
    AsymmetricOperatorError,
    ConfigurationError,
    LossError,
    NonDeterministicError,
    NonFiniteError,
    UnsupportedModelError,
)
from .data import to_device
from .model import active_stochastic_modules

if TYPE_CHECKING:
    from .operator import CurvatureOperator

__all__ = ["preflight"]

# hessfast errors found while computing a product are the user's to fix, not a sign that
# the path cannot differentiate the model.
_USER_ERRORS = (LossError, NonFiniteError, ConfigurationError)


def preflight(op: CurvatureOperator, check_deterministic: bool) -> None:
    """One small product on the first batch by every path: the loss is a valid scalar, the
    paths agree, the product is finite, symmetric and (optionally) repeatable. A path that
    cannot run is recorded in ``op._planner.unavailable``."""
    unavailable = op._planner.unavailable
    index, batch = op._data.first()
    batch = to_device(batch, op.device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    V = torch.randn(2, op.shape[0], generator=gen, dtype=op.dtype).to(op.device)
    Vs = op._split(V)
    results: dict[str, torch.Tensor] = {}
    errors: dict[str, BaseException] = {}
    with op._guard():
        try:
            state = op._graph(batch, index)
            results["double_backward"] = op._graph_product(state, Vs, retain=False)
        except _USER_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001
            errors["double_backward"] = exc
            unavailable["double_backward"] = f"{type(exc).__name__}: {exc}"
            unavailable["reuse_graph"] = "double backward failed"
            state = None
        try:
            results["fwd_rev"] = op._fwd_rev_product(batch, Vs)
        except _USER_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001
            errors["fwd_rev"] = exc
            unavailable["fwd_rev"] = f"{type(exc).__name__}: {exc}"
        if not results:
            raise UnsupportedModelError(
                "neither double backward nor torch.func forward-over-reverse can "
                "differentiate this model twice: "
                + "; ".join(f"{m}: {type(e).__name__}: {e}" for m, e in errors.items())
                + ". Common fixes: inplace=False on activations; "
                "torch.backends.cudnn.flags(enabled=False) for RNNs; the math SDPA "
                "backend for attention; checkpoint(use_reentrant=False)"
            ) from next(iter(errors.values()))
        requested = op._planner.requested
        if requested in ("reuse_graph", "double_backward") and "double_backward" in errors:
            raise UnsupportedModelError(
                f"hvp_mode={requested!r} needs double backward, which fails here: "
                f"{errors['double_backward']}; use hvp_mode='fwd_rev' or 'auto'"
            ) from errors["double_backward"]
        if requested == "fwd_rev" and "fwd_rev" in errors:
            raise UnsupportedModelError(
                f"hvp_mode='fwd_rev' fails on this model: {errors['fwd_rev']}; use "
                "hvp_mode='double_backward' or 'auto'"
            ) from errors["fwd_rev"]
        for hv in results.values():
            op._check_finite(hv, index)
        hv = next(iter(results.values()))
        # Element-wise comparisons are against the largest entry of the product.
        scale = max(hv.abs().max().item(), torch.finfo(op.dtype).tiny)
        eps = torch.finfo(op.param_dtype).eps
        if check_deterministic:
            # The RNG stream has advanced since the first product (the guard restores it
            # only at the end), so a dropout layer draws new masks on the rebuilt path.
            again = (
                op._graph_product(op._graph(batch, index), Vs, retain=False)
                if state is not None
                else op._fwd_rev_product(batch, Vs)
            )
            diff = (again - hv).abs().max().item()
            if diff > 1e3 * eps * scale:
                active = active_stochastic_modules(op.model)
                cause = (
                    f"active stochastic layers: {', '.join(active)}; use bn_mode='eval' "
                    "(the default) or call model.eval()"
                    if active
                    else "a random operation in the model or loss (dropout, noise, "
                    "sampling), or non-deterministic kernels"
                )
                raise NonDeterministicError(
                    f"two products with the same vector on batch {index} differ by "
                    f"{diff:.3g} (scale {scale:.3g}): the curvature is random. Cause: "
                    f"{cause}. check_deterministic=False skips this check"
                )
        # Both paths must agree: they compute the same matrix.
        if len(results) == 2:
            a, b = results["double_backward"], results["fwd_rev"]
            gap = (a - b).abs().max().item()
            if gap > 1e4 * eps * scale:
                unavailable["fwd_rev"] = (
                    f"disagrees with double backward by {gap:.3g} (scale {scale:.3g})"
                )
                if requested == "fwd_rev":
                    raise UnsupportedModelError(
                        f"torch.func forward-over-reverse disagrees with double backward "
                        f"by {gap:.3g} on this model; use hvp_mode='double_backward'"
                    )
        uHv = torch.dot(V[0].double(), hv[1].double()).item()
        vHu = torch.dot(V[1].double(), hv[0].double()).item()
        # |u.Hv| <= ||u|| ||Hv|| <= ||u|| sqrt(n) max|Hv|
        tol = 1e4 * eps * scale * math.sqrt(op.shape[0]) * float(V[0].norm().item())
        if abs(uHv - vHu) > tol:
            raise AsymmetricOperatorError(
                f"u.(Hv) = {uHv:.6g} but v.(Hu) = {vHu:.6g} on batch {index}: the "
                f"{op._kind} product is not symmetric, so the loss is not a fixed "
                "function of the parameters (randomness, in-place updates of state)"
            )
