"""How ``loss_fn`` is called: as a criterion ``loss_fn(model(inputs), targets)`` on
``(inputs, targets)`` batches, or as ``loss_fn(model, batch)`` on batches of any kind.

The rule, first match wins (:func:`decide_loss_form`):

1. ``loss_form="criterion"`` or ``"model"`` given: that form.
2. Evidence from ``loss_fn`` itself:

   a. a loss of torch (``nn.CrossEntropyLoss()``, ``F.mse_loss``, any ``nn.modules.loss``
      class or function defined in ``torch``): criterion;
   b. its first positional parameter is annotated ``nn.Module`` (model) or ``Tensor``
      (criterion), or is named ``model``, ``module``, ``net`` or ``network`` (model);
   c. one trial call ``loss_fn(stand_in, batch_0)`` with a stand-in for the model that
      stops the call at its first use: called, or a module attribute read (``.parameters``,
      a submodule's name): model; a tensor method or operator used, or passed to a torch
      function: criterion; anything else (an attribute both have, an error before the
      first use, no use at all): no evidence. The real model is never passed, nothing is
      computed with it, and the global RNG and grad mode are restored: the trial is
      deterministic, costs no forward, and has no effect on the model.

3. A criterion needs ``(inputs, targets)`` pairs: evidence for a criterion with a batch 0
   that is not a pair (a tuple or list of two) raises :class:`~hessfast.errors.BatchError`.
4. No evidence: criterion when batch 0 is a pair, model form otherwise.

The form and the reason are recorded on the operator (``loss_form``, ``loss_form_reason``).

How ``loss_fn`` reduces over a batch (:func:`loss_reduction`) decides the batch weights
(:mod:`.data`): ``loss_fn.reduction`` (torch's loss modules, or any callable given that
attribute), else the default of a ``reduction`` parameter of its signature (torch's
functional losses, a ``functools.partial(F.cross_entropy, reduction="sum")``, a user
function ``def loss(out, y, reduction="sum")``); else unknown, and taken as the batch mean.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import BatchError
from .data import describe

__all__ = ["LOSS_FORMS", "REDUCTIONS", "decide_loss_form", "is_pair", "loss_reduction"]

LOSS_FORMS = ("auto", "criterion", "model")
MODEL_NAMES = ("model", "module", "net", "network")
# torch's reduction names -> how hessfast weights the batch ("batchmean": KLDivLoss)
REDUCTIONS = {"mean": "mean", "batchmean": "mean", "sum": "sum", "none": "none"}


def loss_reduction(loss_fn: Callable) -> tuple[str | None, str]:
    """``("mean" | "sum" | "none" | None, where it was read)``: how ``loss_fn`` reduces
    over a batch, by the rule in this module's docstring (None: it does not say)."""
    attr = getattr(loss_fn, "reduction", None)
    if isinstance(attr, str) and attr in REDUCTIONS:
        return REDUCTIONS[attr], f"loss_fn.reduction is {attr!r}"
    try:
        param = inspect.signature(loss_fn).parameters.get("reduction")
    except (TypeError, ValueError):
        param = None
    default = None if param is None else param.default
    if isinstance(default, str) and default in REDUCTIONS:
        return REDUCTIONS[default], f"loss_fn's reduction argument is {default!r}"
    return None, "loss_fn does not say how it reduces (no .reduction, no reduction= argument)"


def is_pair(batch: Any) -> bool:
    """Can a criterion take this batch, as ``(inputs, targets)``?"""
    return isinstance(batch, (tuple, list)) and len(batch) == 2


def decide_loss_form(
    loss_fn: Callable, loss_form: str, batch: Any, model: nn.Module, data_rule: str,
    rng_devices: list[int], *, named_split: bool = False,
) -> tuple[str, str]:
    """``("criterion" | "model", why)`` for ``loss_fn`` on ``batch`` (batch 0), by the rule of
    this module. ``data_rule`` says how the data was split into batches (for the errors);
    the trial call forks the RNG of the CPU and of ``rng_devices`` (CUDA indices).
    ``named_split``: ``outputs=``, ``targets=`` or ``causal_lm=`` name the criterion's
    arguments in batches of any kind (a criterion then, whatever the batch).

    Raises:
        BatchError: ``loss_fn`` is (or was declared) a criterion, but batch 0 is not an
            ``(inputs, targets)`` pair.
    """
    if named_split:
        return "criterion", (
            "outputs=, targets= or causal_lm= name the outputs and targets of a batch for "
            "a criterion"
        )
    if loss_form != "auto":
        form, why = loss_form, f"loss_form={loss_form!r} given"
    else:
        form, why = _evidence(loss_fn, batch, model, rng_devices)
    if form == "criterion" and not is_pair(batch):
        raise BatchError(
            f"loss_fn is taken as a criterion loss_fn(outputs, targets) because {why}, but "
            f"batch 0 is {describe(batch)}, not an (inputs, targets) pair. Read as: "
            f"{data_rule}. If loss_fn takes (model, batch), pass loss_form='model'"
        )
    if form is not None:
        return form, why
    if is_pair(batch):
        return "criterion", f"batch 0 is an (inputs, targets) pair and {why}"
    return "model", (
        f"batch 0 is {describe(batch)}, not an (inputs, targets) pair, so only "
        f"loss_fn(model, batch) can take it ({why})"
    )


def _evidence(
    loss_fn: Callable, batch: Any, model: nn.Module, rng_devices: list[int]
) -> tuple[str | None, str]:
    if isinstance(loss_fn, nn.modules.loss._Loss):
        return "criterion", f"loss_fn is torch's {type(loss_fn).__name__}"
    module = getattr(loss_fn, "__module__", None) or ""
    if module == "torch" or module.startswith("torch."):
        return "criterion", f"loss_fn is torch's {getattr(loss_fn, '__name__', loss_fn)}"
    form, why = _signature_evidence(loss_fn)
    if form is not None:
        return form, why
    return _trial(loss_fn, batch, model, rng_devices)


def _signature_evidence(loss_fn: Callable) -> tuple[str | None, str]:
    try:
        params = list(inspect.signature(loss_fn).parameters.values())
    except (TypeError, ValueError):
        return None, "loss_fn has no signature to read"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not params or params[0].kind not in positional:
        return None, "loss_fn has no first positional parameter"
    first = params[0]
    ann = first.annotation
    name = ann if isinstance(ann, str) else getattr(ann, "__name__", "")
    if (isinstance(ann, type) and issubclass(ann, nn.Module)) or (
        isinstance(ann, str) and name.split(".")[-1] == "Module"
    ):
        return "model", f"its first parameter {first.name!r} is annotated {name}"
    if (isinstance(ann, type) and issubclass(ann, torch.Tensor)) or (
        isinstance(ann, str) and name.split(".")[-1] == "Tensor"
    ):
        return "criterion", f"its first parameter {first.name!r} is annotated {name}"
    if first.name in MODEL_NAMES:
        return "model", f"its first parameter is named {first.name!r}"
    return None, f"its signature does not say (first parameter {first.name!r})"


class _Verdict(Exception):  # noqa: N818 - a signal, not an error
    """Raised by the stand-in at its first use: what that use says about the form."""

    def __init__(self, form: str | None, how: str) -> None:
        super().__init__(how)
        self.form, self.how = form, how


class _StandIn:
    """Takes the model's place in the trial call; its first use ends the call (and is
    remembered, should ``loss_fn`` catch the signal and go on)."""

    def __init__(self, model: nn.Module) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "first", None)

    def _use(self, form: str | None, how: str) -> _Verdict:
        verdict = _Verdict(form, how)
        if object.__getattribute__(self, "first") is None:
            object.__setattr__(self, "first", verdict)
        return verdict

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._use("model", "loss_fn calls its first argument")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)  # Python protocols: not a use
        on_model = hasattr(object.__getattribute__(self, "_model"), name)
        on_tensor = hasattr(torch.Tensor, name)
        if on_model != on_tensor:
            form, what = ("model", "a model's") if on_model else ("criterion", "a tensor's")
            raise self._use(form, f"loss_fn reads .{name} of its first argument, {what}")
        both = "both a model and a tensor have" if on_model else "neither has"
        raise self._use(None, f"loss_fn reads .{name} of its first argument, which {both}")

    def __getitem__(self, key: Any) -> Any:
        model = object.__getattribute__(self, "_model")
        if hasattr(model, "__getitem__") and isinstance(key, (int, str)):
            raise self._use(None, "loss_fn indexes its first argument, as a model or a tensor")
        raise self._use("criterion", "loss_fn slices its first argument, as a tensor")

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        stand_in = next(a for a in (*args, *(kwargs or {}).values()) if isinstance(a, cls))
        name = getattr(func, "__name__", str(func))
        raise stand_in._use("criterion", f"loss_fn passes its first argument to torch's {name}")


def _arithmetic(name: str) -> Callable[..., Any]:
    def use(self: _StandIn, *args: Any) -> Any:
        raise self._use("criterion", f"loss_fn computes with its first argument ({name})")

    return use


for _op in ("add", "sub", "mul", "truediv", "pow", "matmul", "floordiv", "mod"):
    setattr(_StandIn, f"__{_op}__", _arithmetic(_op))
    setattr(_StandIn, f"__r{_op}__", _arithmetic(_op))
for _op in ("neg", "abs", "pos"):
    setattr(_StandIn, f"__{_op}__", _arithmetic(_op))


def _trial(
    loss_fn: Callable, batch: Any, model: nn.Module, rng_devices: list[int]
) -> tuple[str | None, str]:
    """One call ``loss_fn(stand_in, batch)``; the verdict of the stand-in's first use."""
    stand_in = _StandIn(model)
    failure = None
    with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
        try:
            loss_fn(stand_in, batch)
        except Exception as exc:  # noqa: BLE001 - the trial only looks for evidence
            failure = exc
    verdict = stand_in.first
    if verdict is not None:
        return verdict.form, f"a trial call with a stand-in for the model showed {verdict.how}"
    if failure is not None:
        return None, (
            f"a trial call with a stand-in for the model raised {type(failure).__name__} "
            "before using it"
        )
    return None, "a trial call with a stand-in for the model did not use it"
