"""Model plumbing for the curvature operators: the loss and output wrappers that
``torch.func.functional_call`` re-parametrises, the loss form, the parameter selection and
the model modes a computation runs in (restored afterwards)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import (
    ArgumentTypeError,
    BatchError,
    ConfigurationError,
    NoParametersError,
)
from .data import describe

__all__ = [
    "BN_MODES",
    "LossModule",
    "OutputModule",
    "active_stochastic_modules",
    "check_params",
    "model_modes",
    "select_params",
    "split_batch",
    "unwrap_model",
]

BN_MODES = ("eval", "train", "as_is")


class LossModule(nn.Module):
    """model + loss as one module, so ``functional_call`` re-parametrises the model also
    when the loss is a ``loss_fn(model, batch)`` callable that calls it."""

    def __init__(self, model: nn.Module, loss_fn: Callable, form: str) -> None:
        super().__init__()
        self.model = model
        # A list, so an nn.Module criterion is not registered as a submodule.
        self._loss = [loss_fn]
        self._form = form

    def forward(self, batch: Any) -> torch.Tensor:
        loss_fn = self._loss[0]
        if self._form == "model":
            return loss_fn(self.model, batch)
        inputs, targets = split_batch(batch)
        return loss_fn(self.model(inputs), targets)


class OutputModule(nn.Module):
    """The model's outputs, for the GGN (criterion form only)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.model(inputs)


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch for a criterion loss."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise BatchError(
        "a criterion loss_fn(outputs, targets) needs (inputs, targets) batches, and this batch "
        f"is {describe(batch)}"
    )


def select_params(
    model: nn.Module, params: Sequence[str] | Sequence[torch.Tensor] | None
) -> tuple[list[str], list[nn.Parameter]]:
    """Names and parameters to differentiate: ``params`` (names or tensors), or every
    trainable parameter in ``named_parameters`` order (tied parameters once)."""
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise NoParametersError(
                f"the model has {len(named)} parameters and none requires grad: there is "
                "nothing to differentiate. Unfreeze some (p.requires_grad_(True)) or pass "
                "params=[...]"
            )
        return [n for n, _ in chosen], [p for _, p in chosen]
    if isinstance(params, (str, bytes, torch.Tensor, nn.Module)):
        raise ArgumentTypeError(
            f"params must be a list of parameter names or of the model's parameters, got a "
            f"bare {type(params).__name__}: pass params=[{params!r}]"
            if isinstance(params, str)
            else f"params must be a list of parameter names or of the model's parameters, got "
            f"a bare {type(params).__name__}: wrap it in a list (params=[p]) or pass "
            "module.parameters()"
        )
    params = list(params)
    if not params:
        raise NoParametersError("params=[] selects no parameters: pass names or tensors")
    by_name = dict(named)
    by_id = {id(p): n for n, p in named}
    names: list[str] = []
    for item in params:
        if isinstance(item, str):
            if item not in by_name:
                raise ConfigurationError(
                    f"params: no parameter named {item!r} in the model; names look like "
                    f"{[n for n, _ in named[:3]]}"
                )
            names.append(item)
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise ConfigurationError(
                    f"params: a tensor of shape {tuple(item.shape)} is not a parameter of the "
                    "model (pass the model's own nn.Parameter objects or their names)"
                )
            names.append(by_id[id(item)])
        else:
            raise ArgumentTypeError(
                f"params items must be parameter names or the model's parameters, got "
                f"{type(item).__name__}"
            )
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigurationError(f"params lists the same parameter twice: {dup}")
    frozen = [n for n in names if not by_name[n].requires_grad]
    if frozen:
        warnings.warn(
            f"hessfast: params includes frozen parameters {frozen}; they are differentiated "
            "anyway, as requested",
            stacklevel=4,
        )
    return names, [by_name[n] for n in names]


@contextmanager
def model_modes(model: nn.Module, bn_mode: str) -> Iterator[None]:
    """Set the modes for a computation and restore every module's flags afterwards.

    Normalisation layers in training mode normalise with batch statistics whatever
    ``track_running_stats`` says; turning it off for the computation only stops their
    in-place running-statistics updates, which change nothing in the output but cannot run
    under ``torch.func`` transforms (and would otherwise need buffer copies).
    """
    saved = [(m, m.training) for m in model.modules()]
    tracked: list[tuple[nn.Module, bool]] = []
    try:
        if bn_mode == "eval":
            model.eval()
        elif bn_mode == "train":
            model.eval()
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    m.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.training:
                tracked.append((m, m.track_running_stats))
                m.track_running_stats = False
        yield
    finally:
        for m, flag in saved:
            m.training = flag
        for m, flag in tracked:
            m.track_running_stats = flag


def active_stochastic_modules(model: nn.Module) -> list[str]:
    """Names of the dropout layers in training mode (they make the curvature random)."""
    out = []
    for name, m in model.named_modules():
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd):
            out.append(f"{name or '<root>'} ({type(m).__name__})")
    return out


def check_params(
    names: list[str], params: list[nn.Parameter]
) -> tuple[torch.device, torch.dtype]:
    """The one device and floating dtype of the selected parameters.

    Raises:
        ConfigurationError: several devices or dtypes, an integer dtype, the meta device.

    Warns once for float16 (second derivatives overflow easily).
    """
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ConfigurationError(
            f"the selected parameters live on several devices {sorted(map(str, devices))}; "
            "hessfast needs them on one device (move the model with model.to(device))"
        )
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1:
        raise ConfigurationError(
            f"the selected parameters have several dtypes {sorted(map(str, dtypes))}; "
            "cast the model to one dtype"
        )
    dtype = dtypes.pop()
    if not dtype.is_floating_point:
        raise ConfigurationError(f"parameters must be floating point, got {dtype}")
    device = devices.pop()
    if device.type == "meta":
        meta = names[:5]
        raise ConfigurationError(
            f"the selected parameters {meta}{' ...' if len(params) > 5 else ''} are "
            "on the meta device (shapes only, no values): there is no curvature to "
            "measure. Materialise the model first: model.to_empty(device='cpu' or 'cuda') "
            "and then load its weights (model.load_state_dict(...))"
        )
    if dtype == torch.float16:
        warnings.warn(
            "hessfast: float16 model: second derivatives overflow float16's range (6.5e4) "
            "easily; products are accumulated in float32, but each one is computed in "
            "float16. Prefer bfloat16, or a float32 master copy of the model "
            "(copy.deepcopy(model).float()) for measuring curvature",
            stacklevel=4,
        )
    return device, dtype


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside an ``nn.DataParallel`` or ``DistributedDataParallel`` (hessfast
    never calls the wrapper's forward; a DDP model's products are reduced over its process
    group by :mod:`.dataparallel`, which refuses DDP without a group).

    An ``nn.DataParallel`` over several GPUs warns: the curvature is computed on
    ``model.module``'s device only (its replicas cannot run double backward reliably);
    several GPUs take one process each (torchrun) with ``process_group=``.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    if isinstance(model, nn.DataParallel):
        if len(model.device_ids or []) > 1:
            warnings.warn(
                f"hessfast: model is an nn.DataParallel over GPUs {model.device_ids}: the "
                "curvature is computed with model.module on one device (DataParallel "
                "replicates per forward and cannot double-backward reliably). For several "
                "GPUs run one process per GPU (torchrun) and pass each rank's data shard",
                stacklevel=5,
            )
        model = model.module
    return model
