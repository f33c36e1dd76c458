"""Central finite differences of gradients: the step rule and the error estimate of
``hvp_mode="finite_difference"``.

A Hessian-vector product by central differences of two ordinary gradients::

    H v ~ (g(theta + e v) - g(theta - e v)) / (2 e)

needs no second derivative: it runs through fused kernels (flash attention, fused losses,
custom ``autograd.Function`` s without a double backward) and sharded parameters, at the
cost of two gradients per vector and an error of two kinds:

* truncation, ``O(e^2)``: the third derivative along ``v`` (``|H(2e)v - H(e)v| / 3`` by
  Richardson's step doubling);
* rounding, ``O(eps / e)``: the gradients' rounding divided by the step, and the rounding of
  ``theta +- e v`` to the parameters' dtype.

Both functions here are pure functions of norms (and, for :func:`fd_error`, tensors): the
model operators (:mod:`.products`) and a sharded operator, whose norms are all-reduced over
its ranks, share them. Nothing here touches a model.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigurationError

__all__ = [
    "FD_STEP_CONSTANT",
    "THETA_FLOOR",
    "fd_error",
    "fd_error_from_norms",
    "fd_step",
]

#: The constant ``c`` of :func:`fd_step`'s rule ``e = c eps^(1/3) max(||theta||, 1) / ||v||``
#: (see its docstring for the calibration).
FD_STEP_CONSTANT = 0.1
#: A parameter vector shorter than this (zero included) is taken at this norm: the loss's
#: own scale, so that a model at the origin still gets a finite, usable step.
THETA_FLOOR = 1.0


def _eps(dtype: torch.dtype) -> float:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigurationError(
            f"the finite-difference step needs a floating compute dtype, got {dtype!r}: "
            "pass the dtype the model computes in (H.compute_dtype)"
        )
    return float(torch.finfo(dtype).eps)


def _norm(value: float, name: str, *, positive: bool) -> float:
    x = float(value)
    if not math.isfinite(x) or x < 0.0 or (positive and x == 0.0):
        need = "a positive finite number" if positive else "a finite number >= 0"
        raise ConfigurationError(
            f"{name} must be {need}, got {value!r}: pass the 2-norm of the "
            f"{'vector' if name == 'v_norm' else 'parameters'} (a zero vector's product is "
            "zero and needs no step)"
        )
    return x


def fd_step(theta_norm: float, v_norm: float, dtype: torch.dtype) -> float:
    """The step ``e`` of the central difference ``(g(theta + e v) - g(theta - e v)) / 2e``.

    ``e = FD_STEP_CONSTANT * eps^(1/3) * max(||theta||, THETA_FLOOR) / ||v||``: the classical
    ``eps^(1/3)`` relative step of a central difference (it balances the ``e^2`` truncation
    against the ``eps / e`` rounding), applied to the parameters' scale and divided by the
    vector's length, so that ``e ||v||`` is a fixed fraction of ``||theta||`` and the product
    is linear in ``v`` (``fd_step(t, 2s, d) == fd_step(t, s, d) / 2``).

    Calibration of ``FD_STEP_CONSTANT = 0.1`` (float32 on the CPU, 2026-12-06): a
    transformers GPT-2 from a config (2 layers, n_embd 64, 2 heads, vocabulary 101,
    n = 110,656, ||theta|| = 18.7), two batches of 4 x 32 tokens, its own causal-LM loss,
    unit random vectors, error against double backward in float64: the V-curve of the
    relative error against ``e`` has its floor (~1e-4, set by the rounding of
    ``theta +- e v`` to float32 and of the gradients) for ``e`` between about 3e-3 and 3e-2
    (``c`` from 0.03 to 0.3), the fd-probe of 2026-12-05 saw the same (7.7e-5 at 1e-2);
    ``c = 0.1`` (e = 9.2e-3) sits in the middle. In float64 the same rule gives e = 1.1e-6
    and errors of about 1e-9. bfloat16/float16 take their own eps (``eps^(1/3)`` = 0.20 and
    0.099): steps of a few percent of ``||theta||`` and errors of about 1e-2 to 5e-2, as the
    published bf16 finite differences.

    Args:
        theta_norm: ``||theta||``, the 2-norm of the (selected) parameters; 0 (a model at the
            origin) and anything below ``THETA_FLOOR`` count as ``THETA_FLOOR``.
        v_norm: ``||v||`` (> 0), the 2-norm of the vector multiplied.
        dtype: the precision the gradients are computed in (the operator's
            ``compute_dtype``; bfloat16 and float16 allowed).

    Returns:
        The step ``e`` (> 0).

    Raises:
        ConfigurationError: a norm that is negative or not finite, ``v_norm == 0``, or a
            dtype that is not floating point.
    """
    theta = _norm(theta_norm, "theta_norm", positive=False)
    v = _norm(v_norm, "v_norm", positive=True)
    eps = _eps(dtype)
    return FD_STEP_CONSTANT * eps ** (1.0 / 3.0) * max(theta, THETA_FLOOR) / v


def fd_error_from_norms(
    diff_norm: float, hv_norm: float, step: float, grad_norm: float, dtype: torch.dtype
) -> float:
    """The relative error estimate of a central-difference product, from norms only.

    ``(||Hv(2e) - Hv(e)|| + eps ||g|| / e) / ||Hv(e)||``: the step-doubling difference
    holds three times the truncation error at ``e`` (Richardson: the error is ``a e^2``, so
    the difference is ``3 a e^2``) and the rounding noise of both evaluations (about
    1.1 times the noise at ``e``), so it bounds both; ``eps ||g|| / e`` adds the rounding of
    the gradients themselves as a floor (it matters when the difference happens to cancel).
    Measured against float64 double backward (tests/curvature/test_finite_difference.py), the
    true error was below this estimate on every model and dtype tried, within a factor of
    about 3 to 30.

    Args:
        diff_norm: ``||Hv(2e) - Hv(e)||``, the products at the step and at twice it.
        hv_norm: ``||Hv(e)||``.
        step: ``e``.
        grad_norm: ``||g(theta)||``, e.g. the norm of ``(g(theta + e v) + g(theta - e v)) / 2``.
        dtype: the precision the gradients are computed in.

    Returns:
        The relative error estimate (``inf`` when ``hv_norm`` is 0 and the numerator is
        not; 0 when both are).
    """
    eps = _eps(dtype)
    for name, x in (("diff_norm", diff_norm), ("hv_norm", hv_norm), ("grad_norm", grad_norm)):
        _norm(x, name, positive=False)
    e = _norm(step, "step", positive=True)
    absolute = float(diff_norm) + eps * float(grad_norm) / e
    if hv_norm == 0.0:
        return 0.0 if absolute == 0.0 else math.inf
    return absolute / float(hv_norm)


def fd_error(
    hv_step: torch.Tensor, hv_double: torch.Tensor, step: float, grad_norm: float,
    dtype: torch.dtype,
) -> float:
    """The relative error estimate of the product ``hv_step`` (at step ``e``), given the same
    product at ``2e`` (:func:`fd_error_from_norms` on these tensors' norms).

    Args:
        hv_step: the product at the step ``e``, any shape (``[n]`` or ``[k, n]``; a block is
            estimated as a whole, in Frobenius norm).
        hv_double: the same product at ``2e``, same shape.
        step: ``e``.
        grad_norm: ``||g(theta)||``.
        dtype: the precision the gradients are computed in.

    Returns:
        The relative error estimate.
    """
    if hv_step.shape != hv_double.shape:
        raise ConfigurationError(
            f"the two products have shapes {tuple(hv_step.shape)} and "
            f"{tuple(hv_double.shape)}: pass the product of the same vector at e and at 2e"
        )
    a, b = hv_step.detach().double(), hv_double.detach().double()
    return fd_error_from_norms(
        float((b - a).norm()), float(a.norm()), step, grad_norm, dtype
    )
