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
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ..errors import ConfigurationError
from ..linop import DOT_CHUNK, local_norm

__all__ = [
    "FD_ERROR_SAFETY",
    "FD_STEP_CONSTANT",
    "THETA_FLOOR",
    "fd_error",
    "fd_error_from_norms",
    "fd_step",
    "coarse_message",
    "KINKED_OPS",
    "KinkRecorder",
    "kink_message",
    "perturbation_rounding",
    "search_step",
]

#: The constant ``c`` of :func:`fd_step`'s rule ``e = c eps^(1/3) max(||theta||, 1) / ||v||``
#: (see its docstring for the calibration).
FD_STEP_CONSTANT = 0.02
#: :func:`fd_error_from_norms` counts the step-doubling difference this many times.
FD_ERROR_SAFETY = 2.0
#: A parameter vector shorter than this (zero included) is taken at this norm: the loss's
#: own scale, so that a model at the origin still gets a finite, usable step.
THETA_FLOOR = 1.0
#: :func:`search_step` halves (or doubles) the rule's step at most this many times.
MAX_HALVINGS = 12


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

    Calibration of ``FD_STEP_CONSTANT = 0.02`` (float32, CPU, 2026-12-06; relative errors
    against float64 double backward; "top" is the direction of largest ``|lambda|``):

    ==============================  ===========  ===========  ===========  ===========
    model, direction                c = 0.1      c = 0.03     c = 0.02     c = 0.01
    ==============================  ===========  ===========  ===========  ===========
    GPT-2 2L/64, n = 108,608, rand  7.7e-5       2.6e-4       3.9e-4       7.7e-4
    same, top (30 power steps)      1.8e-2       1.6e-3       7.1e-4       1.8e-4
    GPT-2 1L/8, n = 1,112, random   1.4e-4       7.6e-5       8.1e-5       1.6e-4
    same, top eigenvector           1.3e-2       1.1e-3       5.1e-4       1.3e-4
    LLaMA 1L/8, n = 920, top        3.4e-3       3.0e-4       1.3e-4       4.4e-5
    MLP, n = 69, random             9.7e-5       3.2e-4       4.6e-4       8.7e-4
    ==============================  ===========  ===========  ===========  ===========

    (GPT-2 2L/64: transformers' GPT-2 from a config, n_embd 64, 2 heads, vocabulary 101,
    ||theta|| = 18.7, two batches of 4 x 32 tokens, its causal-LM loss; the fd-probe of
    2026-12-05 saw 7.7e-5 at e = 1e-2 on random vectors. The small models are
    tests/curvature/test_finite_difference.py's.) Random vectors want c ~ 0.1, but along
    the extreme eigenvectors the error is 10-200 times larger at the same step: the loss is
    most nonlinear where its curvature is largest, and ``||theta||`` is dominated by the
    norm layers' weights (1.0) while the embeddings (0.02) set the scale along those
    directions. Krylov methods converge to exactly those eigenvectors, so c = 0.02 keeps
    both kinds of direction below about 7e-4 on every model measured. In float64 the same
    rule gives e ~ 1e-7 ||theta|| and errors of about 1e-10. bfloat16/float16 take their own
    eps (``eps^(1/3)`` = 0.20 and 0.099), but rounding ``theta +- e v`` to the parameters'
    dtype then costs about ``eps^(2/3) / c`` relative: finite differences of a model with
    bfloat16 parameters are coarse (0.3-0.5 on the tests' MLP, float16 0.1), which the
    recorded error estimate reports and a warning states; float32 parameters with a
    bfloat16 autocast do not pay this.

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

    ``(FD_ERROR_SAFETY ||Hv(2e) - Hv(e)|| + eps ||g|| / e) / ||Hv(e)||``: the
    step-doubling difference holds three times the truncation error at ``e`` (Richardson:
    the error is ``a e^2``, so the difference is ``3 a e^2``) and the rounding noise of
    both evaluations (about 1.1 times the noise at ``e``); counted twice
    (``FD_ERROR_SAFETY = 2``), it bounds their sum with room for the directions the
    estimate was not measured on (the operator measures it on a random vector and one power
    step from it: the extreme eigenvectors' error was up to 1.7 times that step's on the
    tiny transformers). ``eps ||g|| / e`` adds the rounding of the gradients themselves as
    a floor (it matters when the difference happens to cancel). Against float64 double
    backward (tests/curvature/test_finite_difference.py) the true error of random products
    was below this estimate on every model and dtype tried.

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
    absolute = FD_ERROR_SAFETY * float(diff_norm) + eps * float(grad_norm) / e
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
    a, b = hv_step.detach(), hv_double.detach()
    return fd_error_from_norms(local_norm(b - a), local_norm(a), step, grad_norm, dtype)


def perturbation_rounding(
    params: list[torch.Tensor], v: list[torch.Tensor], step: float
) -> tuple[float, float]:
    """The part of ``e v`` lost when ``theta + e v`` is rounded to the parameters' dtype:
    ``(||fl(theta + e v) - theta - e v||^2, ||e v||^2)``, local sums in float64 (a sharded
    operator adds them over its ranks). Their square-root ratio is the relative error of
    the vector the central difference actually multiplies, and so (along the stiffest
    directions) of the product: a float32 GPT-2 small has ``||theta|| ~ 265`` but
    ``|v_i| ~ 1e-4``, and below half an ulp of ``theta_i`` a coordinate's perturbation is
    lost at BOTH steps of a step-doubling estimate, which therefore cannot see it.

    Args:
        params: the parameters ``theta`` (any shapes).
        v: the vector, one piece per parameter (same shapes).
        step: ``e``.

    Returns:
        ``(lost squared norm, perturbation squared norm)``.
    """
    lost = 0.0
    total = 0.0
    chunk = DOT_CHUNK  # float64 temporaries of 2 MiB (linop.DOT_CHUNK: reused, not faulted in)
    with torch.no_grad():
        for p, x in zip(params, v, strict=True):
            pf, xf = p.reshape(-1), x.reshape(-1)
            for a in range(0, pf.numel(), chunk):
                pc, xc = pf[a:a + chunk], xf[a:a + chunk]
                ev = xc.double().mul(step)
                moved = torch.add(pc, xc.to(pc.dtype), alpha=step) if pc.dtype in (
                    torch.float32, torch.float64) else torch.add(
                        pc.float(), xc.float(), alpha=step).to(pc.dtype)
                lost += float((moved.double() - pc.double() - ev).pow(2).sum())
                total += float(ev.pow(2).sum())
    return lost, total


def search_step(
    product: Callable[[float], torch.Tensor], step: float, grad_norm: float,
    dtype: torch.dtype, norm: Callable[[torch.Tensor], float] | None = None,
    rounding: Callable[[float], float] | None = None,
) -> tuple[float, float, int]:
    """The step that minimises the estimated error of one direction's product, found by
    halving (or doubling) the rule's step, and that error.

    The rule (:func:`fd_step`) scales with ``||theta||``, which grows with the model (GPT-2
    small: ||theta|| ~ 265, e = 0.023 along a unit vector), while the loss's nonlinearity
    along its stiffest directions does not shrink with it: at the rule's step the estimate
    along a power step of GPT-2 small was 0.28 (truncation), on a 108k-parameter GPT-2
    7e-4. The estimate at ``e``, :func:`fd_error_from_norms` of ``Hv(2e) - Hv(e)``, falls
    about 4x per halving while truncation dominates and rises once rounding does (the
    V-curve of the fd-probe); so the search halves while the estimate falls
    (each halving one product: the previous step's product is the new ``2e``), doubles
    instead when the first halving did not help, and keeps the best step seen (at most
    :data:`MAX_HALVINGS` moves). Run once per operator on the direction of largest
    curvature it can find cheaply (one power step), where the error is largest.

    Args:
        product: ``e -> Hv(e)`` (any shape), the central difference of one fixed vector at
            step ``e``.
        step: the rule's step ``e0`` for that vector.
        grad_norm: ``||g(theta)||`` (the rounding floor of the estimate).
        dtype: the precision the gradients are computed in.
        norm: the 2-norm of a product-shaped tensor (default: the local one; a sharded
            operator passes its all-reduced norm, so every rank takes the same steps).
        rounding: ``e -> relative error`` of the perturbation's rounding at step ``e``
            (:func:`perturbation_rounding`), added to each estimate: the step-doubling
            difference cannot see it.

    Returns:
        ``(best step, its error estimate, products spent)``.
    """
    nrm = norm or local_norm

    def estimate(lo: torch.Tensor, hi: torch.Tensor, e: float) -> float:
        lost = 0.0 if rounding is None else rounding(e)
        return fd_error_from_norms(nrm(hi - lo), nrm(lo), e, grad_norm, dtype) + lost

    at = {step: product(step), 2.0 * step: product(2.0 * step)}
    spent = 2
    best_e, best = step, estimate(at[step], at[2.0 * step], step)
    del at[2.0 * step]  # halving reads only the step's own product
    for direction in (0.5, 2.0):
        e, last = best_e, best
        for _ in range(MAX_HALVINGS):
            if direction == 0.5:
                new = e / 2.0
                at[new] = product(new)
                err = estimate(at[new], at[e], new)
            else:
                new = 2.0 * e
                if 2.0 * new not in at:
                    at[2.0 * new] = product(2.0 * new)
                    spent += 1
                err = estimate(at[new], at[2.0 * new], new)
            spent += direction == 0.5
            # keep only the product the next move reads (at most two are held at a time)
            keep = {2.0 * new} if direction == 2.0 else {new}
            at = {k: v for k, v in at.items() if k in keep}
            if err < best:
                best_e, best = new, err
            # the V's bottom: the estimate no longer falls. (Stopping once it fell by less
            # than 2x stopped GPT-2 medium at 0.44: far from the e^2 regime the estimate
            # falls only 2-3x per halving, and the true error, 0.106 at the step it kept,
            # reaches 1.4e-4 five halvings further: /tmp V-curve against the exact product.)
            if not err < last:
                break
            e, last = new, err
        if best_e != step:  # halving helped (or doubling did): done
            break
        at = {2.0 * step: product(2.0 * step)}  # restart for doubling (reads 2e and 4e)
        spent += 1
    return best_e, best, spent


def coarse_message(error: float, subject: str, measured: str, param_dtype: torch.dtype,
                   compute_dtype: torch.dtype, low_fix: str, tail: str = "") -> str:
    """The warning's text when the estimated error exceeds the warning level: ``subject``
    (whose products), ``measured`` (where the estimate was taken), and the cause: the
    parameters' half precision (then ``low_fix``) or the loss's nonlinearity or noise."""
    low = param_dtype in (torch.bfloat16, torch.float16)
    return (f"hessfast: {subject} relative error is about {error:.2g} (H.fd_error, "
            f"{measured})"
            + (f": the parameters are {param_dtype}, and rounding theta +- e v to it is "
               f"coarse. {low_fix}" if low else ": the loss is far from quadratic at the "
               f"step's scale or its gradients are noisy (compute dtype {compute_dtype}). "
               "With piecewise-linear activations (ReLU, max-pooling) the step crosses "
               "their kinks and the true error can be many times this estimate (19 "
               "against an estimated 1.6 on a ResNet-20)")
            + tail)


#: torch functions whose output's gradient jumps where their input crosses a point (the
#: kinks of piecewise-linear activations, pooling by maximum, clamping, absolute values).
#: The exact Hessian (double backward) takes their second derivative as 0 there; a central
#: difference whose step carries some inputs across a kink adds the jump divided by the step
#: instead. That bias does not shrink with the step (a smaller step crosses fewer kinks, each
#: divided by less), so no comparison of two steps sees it: ``fd_error`` cannot bound it.
KINKED_OPS = frozenset({
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "prelu",
    "rrelu", "rrelu_", "threshold", "threshold_", "hardsigmoid", "hardshrink", "softshrink",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "fractional_max_pool2d",
    "fractional_max_pool3d", "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_max",
    "abs", "abs_", "absolute", "maximum", "minimum", "fmax", "fmin", "l1_loss",
})


class KinkRecorder(TorchFunctionMode):
    """A torch function mode that notes which :data:`KINKED_OPS` run under it (by their
    ``__name__``; ``F.relu``, ``torch.relu`` and ``Tensor.relu`` alike) and changes nothing
    else. ``seen``: the sorted names."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    @property
    def seen(self) -> list[str]:
        """The kinked functions that ran so far, sorted."""
        return sorted(self._seen)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in KINKED_OPS:
            self._seen.add(name)
        return func(*args, **(kwargs or {}))


def kink_message(ops: list[str], who: str) -> str:
    """The warning's text when a finite-difference operator's loss ran :data:`KINKED_OPS`."""
    return (f"hessfast: {who} loss runs {', '.join(ops)}, whose gradient jumps at a kink: a "
            "finite-difference product whose step carries inputs across kinks adds those "
            "jumps divided by the step, a bias that H.fd_error cannot see (it compares two "
            "steps, and the bias does not shrink with the step; on a ResNet-20 the products' "
            "relative error was 19 against an estimate of 1.6). Use an exact hvp_mode where the "
            "model allows one, or smooth activations (GELU, SiLU, softplus) for finite "
            "differences; H.fd_kinks lists the functions. Functions applied to the data "
            "alone (not depending on the parameters) are harmless")
