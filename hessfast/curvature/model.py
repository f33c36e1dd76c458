"""Model plumbing for the curvature operators: the loss and output wrappers that
``torch.func.functional_call`` re-parametrises, the loss form, the parameter selection and
the model modes and kernels a computation runs in (restored afterwards)."""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
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
    "BatchSplit",
    "LossModule",
    "OutputModule",
    "active_stochastic_modules",
    "check_params",
    "model_modes",
    "twice_differentiable",
    "select_params",
    "shown_names",
    "split_batch",
    "unwrap_model",
]

BN_MODES = ("eval", "train", "as_is")


class BatchSplit:
    """How a criterion's two arguments come from a batch: ``loss_fn(outputs, targets)``.

    By default batches are ``(inputs, targets)`` pairs and the outputs are
    ``model(inputs)``. ``outputs``, ``targets`` or ``causal_lm`` name them in batches of any
    kind (a dict of a tokenizer, say):

    * ``outputs(model, batch) -> Tensor``; default: ``model(**batch)`` without its
      ``"labels"`` for a dict, ``model(batch[0])`` for a pair, ``model(batch)`` otherwise,
      and the ``.logits`` of a result that has them (transformers' ``ModelOutput``);
    * ``targets(batch)``; default: ``batch["labels"]`` for a dict, ``batch[1]`` for a pair;
    * ``causal_lm=True``: position t predicts token t+1, so the outputs ``[B, T, V]`` lose
      their last position and the targets ``[B, T]`` their first, flattened to ``[B(T-1), V]``
      and ``[B(T-1)]`` (what ``nn.CrossEntropyLoss`` takes; its ``ignore_index=-100`` drops
      padding and prompt tokens), as transformers' causal-LM loss does.

    Args:
        outputs, targets: the callables, or None for the defaults.
        causal_lm: shift and flatten for next-token prediction.
    """

    def __init__(
        self,
        outputs: Callable[[nn.Module, Any], Any] | None = None,
        targets: Callable[[Any], Any] | None = None,
        causal_lm: bool = False,
    ) -> None:
        self._outputs = outputs
        self._targets = targets
        self.causal_lm = causal_lm
        # the batch is split by the callables (or their defaults), not as a pair
        self.named = outputs is not None or targets is not None or causal_lm

    def describe(self) -> str:
        """How ``loss_fn`` is called, for messages."""
        if not self.named:
            return "loss_fn(model(inputs), targets)"
        out = "outputs(model, batch)" if self._outputs else "the model's outputs"
        tgt = "targets(batch)" if self._targets else "the batch's labels"
        shift = ", shifted for next-token prediction (causal_lm=True)" if self.causal_lm else ""
        return f"loss_fn({out}, {tgt}){shift}"

    def split(self, batch: Any) -> tuple[Any, Any]:
        """``(what the outputs are computed from, targets)`` of a batch."""
        if not self.named:
            return split_batch(batch)
        if self._targets is not None:
            targets = self._targets(batch)
        elif isinstance(batch, Mapping) and "labels" in batch:
            targets = batch["labels"]
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            targets = batch[1]
        else:
            raise BatchError(
                f"the targets of a batch that is {describe(batch)} are not known: pass "
                "targets=lambda batch: ... (the default reads batch['labels'] of a dict and "
                "batch[1] of a pair)"
            )
        if self.causal_lm:
            targets = targets[..., 1:].reshape(-1)
        return batch, targets

    def outputs(self, model: nn.Module, batch: Any) -> Any:
        """The outputs the criterion takes, from ``split(batch)[0]``."""
        if not self.named:
            return model(batch)
        if self._outputs is not None:
            out = self._outputs(model, batch)
        else:
            if isinstance(batch, Mapping):
                out = model(**{k: v for k, v in batch.items() if k != "labels"})
            elif isinstance(batch, (tuple, list)) and len(batch) == 2:
                out = model(batch[0])
            else:
                out = model(batch)
            if not isinstance(out, torch.Tensor) and hasattr(out, "logits"):
                out = out.logits
        if self.causal_lm and isinstance(out, torch.Tensor):
            out = out[..., :-1, :].reshape(-1, out.shape[-1])
        return out


class LossModule(nn.Module):
    """model + loss as one module, so ``functional_call`` re-parametrises the model also
    when the loss is a ``loss_fn(model, batch)`` callable that calls it."""

    def __init__(
        self, model: nn.Module, loss_fn: Callable, form: str, split: BatchSplit
    ) -> None:
        super().__init__()
        self.model = model
        # A list, so an nn.Module criterion is not registered as a submodule.
        self._loss = [loss_fn]
        self._form = form
        self._split = split

    def forward(self, batch: Any) -> torch.Tensor:
        """The loss of one batch, a scalar ``[]``: ``loss_fn(model, batch)`` in the model
        form, else ``loss_fn(outputs, targets)`` of the batch's ``(inputs, targets)``."""
        loss_fn = self._loss[0]
        if self._form == "model":
            return loss_fn(self.model, batch)
        inputs, targets = self._split.split(batch)
        return loss_fn(self._split.outputs(self.model, inputs), targets)


class OutputModule(nn.Module):
    """The model's outputs, for the GGN (criterion form only)."""

    def __init__(self, model: nn.Module, split: BatchSplit) -> None:
        super().__init__()
        self.model = model
        self._split = split

    def forward(self, inputs: Any) -> torch.Tensor:
        """The model's outputs as the criterion takes them, from ``inputs`` (the first
        element of :meth:`BatchSplit.split`); logit rows ``[N, V]`` with ``causal_lm``."""
        return self._split.outputs(self.model, inputs)


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch for a criterion loss."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise BatchError(
        "a criterion loss_fn(outputs, targets) needs (inputs, targets) batches, and this batch "
        f"is {describe(batch)}; name them in batches of other kinds with outputs= and "
        "targets= (or causal_lm=True)"
    )


def select_params(
    model: nn.Module, params: Sequence[str] | Sequence[torch.Tensor] | None
) -> tuple[list[str], list[nn.Parameter]]:
    r"""Names and parameters to differentiate: THE parameter selection of ``params=`` in the
    API (:func:`hessfast.hessian`, :func:`hessfast.ggn`, :func:`hessfast.analyze`) and of the
    CLI's ``--params PATTERN`` (which passes ``[PATTERN]`` here).

    ``params`` is None (every trainable parameter, in ``named_parameters`` order, tied
    parameters once) or a list whose items are any of:

    - one of the model's parameters (an ``nn.Parameter`` object): that parameter;
    - a string equal to a parameter's name (``"fc.weight"``): that parameter, even a frozen
      one (with a warning);
    - any other string: a regular expression that selects every TRAINABLE parameter whose
      name it matches anywhere (``re.search``), in ``named_parameters`` order. So ``"fc"``
      selects ``fc.weight`` and ``fc.bias`` (and ``fc2.weight``, ``head.fc.bias``: anchor it,
      ``r"^fc\."``, for the ``fc`` module alone), and ``r"\.bias$"`` every bias.

    The selection is in the order of the items; a pattern adds only the parameters that no
    other item selected (a parameter or name listed explicitly keeps its own place). Listing
    one parameter twice by object or exact name is an error.

    Raises:
        ArgumentTypeError: ``params`` is a bare string, tensor or module, or an item is
            neither a string nor a tensor.
        NoParametersError: ``params=[]``, or nothing is trainable and ``params`` is None.
        ConfigurationError: a string that is no parameter's name and, as a regular
            expression, matches no trainable parameter's name (or does not compile): the
            message names it and lists the trainable parameters; a tensor that is not the
            model's; a parameter listed twice.
    """
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
    trainable = [n for n, p in named if p.requires_grad]
    # First every item's own selection: one name for a parameter or an exact name, the
    # matches for a pattern; then patterns skip what an explicit item selected.
    picks: list[tuple[bool, list[str]]] = []  # (explicit?, names)
    for item in params:
        if isinstance(item, str):
            if item in by_name:
                picks.append((True, [item]))
            else:
                picks.append((False, _pattern_matches(item, trainable)))
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise ConfigurationError(
                    f"params: a tensor of shape {tuple(item.shape)} is not a parameter of the "
                    "model (pass the model's own nn.Parameter objects or their names)"
                )
            picks.append((True, [by_id[id(item)]]))
        else:
            raise ArgumentTypeError(
                f"params items must be parameter names or the model's parameters, got "
                f"{type(item).__name__}"
            )
    explicit = {n for is_explicit, ns in picks if is_explicit for n in ns}
    names: list[str] = []
    for is_explicit, ns in picks:
        names += ns if is_explicit else [n for n in ns if n not in explicit and n not in names]
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


def shown_names(names: list[str]) -> str:
    """The first 8 of ``names`` as a list, then how many more (for an error message)."""
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    return f"{names[:8]}{more}"


def _pattern_matches(pattern: str, trainable: list[str]) -> list[str]:
    """The names in ``trainable`` that the regular expression ``pattern`` matches
    (``re.search``), in order; a ConfigurationError naming the pattern and listing the
    trainable parameters when it matches none or does not compile."""
    how = ("a string selects the parameter of that name, or else every trainable parameter "
           "whose name it matches as a regular expression (re.search)")
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ConfigurationError(
            f"params: {pattern!r} is not a regular expression ({exc}) nor a parameter's name "
            f"({how})"
        ) from None
    chosen = [n for n in trainable if rx.search(n)]
    if not chosen:
        raise ConfigurationError(
            f"params: {pattern!r} matches no trainable parameter (the model has: "
            f"{shown_names(trainable)}; {how})"
        )
    return chosen


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


@contextmanager
def twice_differentiable() -> Iterator[None]:
    """Kernels that autograd can differentiate twice and ``torch.func`` can push tangents
    through, for the computations inside (restored afterwards).

    * ``scaled_dot_product_attention`` on its math backend: the fused kernels (flash,
      memory-efficient, cuDNN, and CPU flash) have neither a double backward
      (pytorch/pytorch#116350) nor forward-mode AD (#128971). The math backend materialises
      the ``[batch, heads, S, S]`` attention weights, so attention's activation memory grows
      as O(S^2) per layer (what ``attn_implementation="eager"`` costs too).
    * ``torch.compile``d code (a compiled model, submodule or loss) runs eagerly: double
      backward through compiled code is unsupported (#91469). The numbers are those of the
      same function. Checked only once ``torch._dynamo`` is imported (a compiled function
      cannot exist before), so a model without one never pays for importing it.
    """
    with ExitStack() as stack:
        stack.enter_context(_math_attention())
        if "torch._dynamo" in sys.modules and hasattr(torch.compiler, "set_stance"):
            stack.enter_context(torch.compiler.set_stance("force_eager"))
        yield


def _math_attention():  # noqa: ANN202 - a context manager of torch's
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return torch.backends.cuda.sdp_kernel(
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        )
    return sdpa_kernel(SDPBackend.MATH)


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
    """The module inside an ``nn.DataParallel``, ``DistributedDataParallel`` or
    ``torch.compile`` wrapper (hessfast never calls the wrapper's forward; a DDP model's
    products are reduced over its process group by :mod:`.dataparallel`, which refuses DDP
    without a group).

    An ``nn.DataParallel`` over several GPUs warns: the curvature is computed on
    ``model.module``'s device only (its replicas cannot run double backward reliably);
    several GPUs take one process each (torchrun) with ``process_group=``. A compiled model
    warns that its original module runs eagerly: double backward through compiled code is
    unsupported (pytorch/pytorch#91469), and the eager module is the same function with the
    same Parameters (compiled submodules run eagerly too: :func:`twice_differentiable`).
    """
    model = _uncompiled(model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return _uncompiled(model.module)
    if isinstance(model, nn.DataParallel):
        if len(model.device_ids or []) > 1:
            warnings.warn(
                f"hessfast: model is an nn.DataParallel over GPUs {model.device_ids}: the "
                "curvature is computed with model.module on one device (DataParallel "
                "replicates per forward and cannot double-backward reliably). For several "
                "GPUs run one process per GPU (torchrun) and pass each rank's data shard",
                stacklevel=5,
            )
        model = _uncompiled(model.module)
    return model


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (``_orig_mod``), with a warning; the
    model itself otherwise. (The wrapper's class exists only once torch._dynamo is
    imported: nothing to look for before.)"""
    frames = sys.modules.get("torch._dynamo.eval_frame")
    if frames is None or not isinstance(model, frames.OptimizedModule):
        return model
    warnings.warn(
        "hessfast: model is torch.compile'd: its curvature is computed with the original "
        "module (model._orig_mod, the same Parameters) run eagerly, because double backward "
        "through compiled code is unsupported (pytorch/pytorch#91469). The numbers are "
        "those of the same function; only the products' speed differs",
        stacklevel=6,  # the user's hf.hessian / hf.ggn call
    )
    return model._orig_mod
