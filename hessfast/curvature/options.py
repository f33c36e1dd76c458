"""The options of :func:`~hessfast.hessian` and :func:`~hessfast.ggn`, stated once: each
option's type, default and documentation live in one field of :class:`CurvatureOptions`;
the two functions' signatures take their defaults from it (:data:`DEFAULTS`) and their
docstrings list the options from it (:func:`options_doc`)."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..errors import ArgumentTypeError, ConfigurationError
from .lossform import LOSS_FORMS
from .model import BN_MODES
from .plan import FD_MODE, HVP_MODES

__all__ = [
    "DEFAULTS", "LOSS_REDUCTIONS", "OPTIONS_LINE", "CurvatureOptions", "options_doc", "options_of",
    "with_options_doc",
]

LOSS_REDUCTIONS = ("auto", "mean", "sum")


def _option(default: Any, doc: str | None, *, names: str | None = None) -> Any:
    """A field of :class:`CurvatureOptions`: its default and its one documentation (None:
    documented with another option, whose entry ``names`` them together)."""
    return field(default=default, metadata={"doc": doc, "names": names})


@dataclass(frozen=True)
class CurvatureOptions:
    """Everything but the model, the loss and the data: the keyword-only options of
    :func:`~hessfast.hessian` and :func:`~hessfast.ggn`, validated once. Each field is
    one keyword of those functions, with the same default; the list below is generated from
    the fields (:func:`options_doc`).
    """

    params: Sequence[str] | Sequence[torch.Tensor] | None = _option(
        None,
        "parameter names or tensors to differentiate; default all trainable ones.",
    )
    bn_mode: str = _option(
        "eval",
        '``"eval"`` (dropout off, BatchNorm running statistics), ``"train"`` (BatchNorm with '
        "each batch's statistics, running statistics never updated, dropout off), ``\"as_is\"`` "
        "(the model's own modes; active dropout makes the pre-flight raise).",
    )
    hvp_mode: str = _option(
        "auto",
        '``"auto"``, ``"reuse_graph"``, ``"double_backward"``, ``"fwd_rev"`` or '
        '``"finite_difference"``. The first four are exact; ``"finite_difference"`` '
        "(the Hessian only) is central differences of two ordinary gradients per vector, "
        "``(g(theta + e v) - g(theta - e v)) / 2e``, through perturbed copies of the "
        "parameters: no second derivative, so fused attention kernels, compiled code and "
        "custom Functions without a double backward run as in training; the step ``e`` from "
        "``||theta||``, ``||v||`` and the compute dtype "
        "(:func:`~hessfast.curvature.finitediff.fd_step`), the relative error measured once "
        "and recorded as ``H.fd_error`` (about 1e-4 in float32, 1e-8 or better in float64, "
        "1e-2 in bfloat16). ``\"auto\"`` never picks it while an exact path works.",
    )
    check: bool = _option(
        True,
        "run the pre-flight on batch 0 (a valid, finite loss; forward-over-reverse agreeing "
        "with double backward when it is used) and check the first products (finite, ``u.(Hv) "
        "== v.(Hu)`` for the first two vectors multiplied). Costs one forward beyond batch 0's "
        "graph, which graph reuse keeps. Also warns (once, a ``UserWarning`` starting "
        '"hessfast:") about parameters that get no gradient on batch 0 and an identically zero '
        "curvature (a loss linear in the parameters).",
    )
    check_deterministic: bool = _option(
        True,
        "in the pre-flight, also evaluate the loss twice and require equality (catches dropout, "
        "noise); False accepts a random operator and skips the symmetry check.",
    )
    batch_size_fn: Callable[[Any], int] | None = _option(
        None,
        "number of samples of a batch (default: the leading dimension of its tensors that have "
        "one; when they disagree and the weights depend on which counts, ``BatchError`` asks "
        "for this).",
    )
    loss_form: str = _option(
        "auto",
        '``"auto"``, ``"criterion"`` (``loss_fn(model(inputs), targets)``) or ``"model"`` '
        "(``loss_fn(model, batch)``).",
    )
    chunk_size: int | None = _option(
        None,
        "rows of a block per batched call (default: chosen by timing / up to 32).",
    )
    reuse_graph: bool | None = _option(
        None,
        "force graph reuse on/off in auto mode (default: when it fits memory).",
    )
    loss_reduction: str = _option(
        "auto",
        '``"auto"`` (read from ``loss_fn.reduction`` or the default of its ``reduction`` '
        'argument, else mean), ``"mean"`` or ``"sum"``: how ``loss_fn`` reduces over a batch; a '
        "declared value that contradicts ``loss_fn.reduction`` raises. Recorded as "
        "``H.loss_reduction`` with ``H.loss_reduction_reason``.",
    )
    max_batches: int | None = _option(
        None,
        "for data without ``len()`` (an ``IterableDataset`` loader), the most batches the first "
        "pass reads before raising ``UnboundedDataError`` (default 100_000): an endless stream "
        "fails fast instead of hanging.",
    )
    process_group: Any = _option(
        "auto",
        'the ranks whose data shards make up the data (torch.distributed). ``"auto"`` '
        "(default): a ``DistributedDataParallel`` model's group, else the default group when "
        "``torch.distributed`` is initialised with more than one process, else none. A group: "
        "that one. ``None``: this process's data only. Under a group EVERY rank must build the "
        "operator (each with its own shard, possibly empty) and run the same algorithm with the "
        "same arguments; each product ends in one all-reduce, so every rank gets the same "
        "result, that of one process on all the data. An error on one rank raises on all ranks "
        "(``DistributedError`` on the others). See :mod:`hessfast.curvature.dataparallel`.",
    )
    outputs: Callable[[nn.Module, Any], Any] | None = _option(
        None,
        "name the outputs and targets of batches of any kind for a criterion ``loss_fn(outputs, "
        "targets)`` (e.g. a tokenizer's dict): ``outputs(model, batch) -> Tensor`` (default: "
        '``model(**batch)`` without its ``"labels"`` for a dict, ``model(batch[0])`` for a '
        "pair, the ``.logits`` of a transformers output), ``targets(batch)`` (default: "
        '``batch["labels"]`` of a dict, ``batch[1]`` of a pair). ``causal_lm=True``: next-token '
        "prediction, the logits ``[B, T, V]`` lose their last position and the labels ``[B, "
        "T]`` their first, flattened to ``[B(T-1), V]`` and ``[B(T-1)]``; ``loss_fn=None`` is "
        "then ``nn.CrossEntropyLoss()`` (the mean over the tokens whose label is not -100, as "
        "transformers' causal-LM loss). Then the batch weights count sequences.",
        names="outputs, targets, causal_lm",
    )
    targets: Callable[[Any], Any] | None = _option(None, None)  # documented with outputs
    causal_lm: bool = _option(False, None)  # documented with outputs
    fused_loss: bool = _option(
        True,
        "when ``loss_fn`` is torch's cross-entropy (``nn.CrossEntropyLoss`` without class "
        "weights, ``F.cross_entropy`` or a ``functools.partial`` of it) and the targets are "
        "class indices, its second derivative w.r.t. the logits, ``p*u - p*(p.u)`` per row, is "
        "computed by a fused kernel (Triton on CUDA, plain torch on the CPU) instead of "
        "autograd's double backward of the softmax; same numbers to rounding, in float32 for "
        "bf16/fp16 logits. ``False``: autograd. Recorded as ``H.loss_head`` with "
        "``H.loss_head_reason``.",
    )
    exact: bool = _option(
        False,
        'exact products only: when the model has no exact second derivative (a custom '
        "``autograd.Function`` without a differentiable backward, a kernel whose double "
        'backward is not implemented), ``hvp_mode="auto"`` raises ``UnsupportedModelError`` '
        "instead of falling back to ``finite_difference`` (which it does by default, with a "
        'warning, ``H.hvp_mode == "finite_difference"`` and the cause in '
        '``H.hvp_mode_reason``). ``exact=True`` with ``hvp_mode="finite_difference"`` is a '
        "``ConfigurationError``.",
    )
    lm_head: nn.Module | None = _option(
        None,
        "the GGN only (:func:`~hessfast.ggn`): the model's output ``nn.Linear`` (the criterion "
        "torch's cross-entropy on its logit rows, e.g. ``causal_lm=True``); splits the GGN at "
        "the head, whose block is computed in chunks of tokens "
        "(:mod:`hessfast.kernels.linear_ce`), so a product never holds the ``[k, N, V]`` logit "
        "directions of a large vocabulary. Same numbers as without it, to rounding; graph paths "
        'only (not ``hvp_mode="fwd_rev"``).',
    )

    def __post_init__(self) -> None:
        for name in ("outputs", "targets"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise ArgumentTypeError(
                    f"{name} must be a callable or None, got {type(fn).__name__}"
                )
        for flag in ("causal_lm", "fused_loss", "exact"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigurationError(
                    f"{flag} must be True or False, got {getattr(self, flag)!r}"
                )
        if self.loss_form == "model" and (self.outputs or self.targets or self.causal_lm):
            raise ConfigurationError(
                "loss_form='model' calls loss_fn(model, batch), which computes the outputs "
                "itself: outputs=, targets= and causal_lm= name them for a criterion "
                "loss_fn(outputs, targets). Drop one or the other"
            )
        if self.hvp_mode not in HVP_MODES:
            raise ConfigurationError(
                f"hvp_mode must be one of {HVP_MODES}, got {self.hvp_mode!r}"
            )
        if self.exact and self.hvp_mode == FD_MODE:
            raise ConfigurationError(
                "hvp_mode='finite_difference' with exact=True: finite differences are not "
                "exact (their error is recorded as H.fd_error). Drop exact=True to use them, "
                "or pick an exact hvp_mode ('auto', 'reuse_graph', 'double_backward', "
                "'fwd_rev')"
            )
        if self.bn_mode not in BN_MODES:
            raise ConfigurationError(f"bn_mode must be one of {BN_MODES}, got {self.bn_mode!r}")
        if self.loss_form not in LOSS_FORMS:
            raise ConfigurationError(
                f"loss_form must be one of {LOSS_FORMS}, got {self.loss_form!r}"
            )
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ConfigurationError(
                f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}"
            )
        if self.max_batches is not None and (
            isinstance(self.max_batches, bool)
            or not isinstance(self.max_batches, int)
            or self.max_batches < 1
        ):
            raise ConfigurationError(
                f"max_batches must be a positive integer or None, got {self.max_batches!r}"
            )
        if self.chunk_size is not None and int(self.chunk_size) < 1:
            raise ConfigurationError(f"chunk_size must be >= 1 or None, got {self.chunk_size}")


#: The options' defaults: ``hessian()`` and ``ggn()`` take theirs from here.
DEFAULTS = CurvatureOptions()


#: The line of :func:`~hessfast.hessian`'s and :func:`~hessfast.ggn`'s docstrings that
#: :func:`with_options_doc` replaces by the options' entries.
OPTIONS_LINE = (
    "        options (keyword-only): as the fields of\n"
    "            :class:`~hessfast.curvature.options.CurvatureOptions`."
)


def options_doc(indent: int = 8, *, skip: tuple[str, ...] = ()) -> str:
    """The options' documentation as a docstring's ``name: text`` entries (one per field,
    grouped fields under one entry), indented by ``indent``; ``skip``: fields left out."""
    out = []
    for f in fields(CurvatureOptions):
        doc = f.metadata["doc"]
        if doc is None or f.name in skip:
            continue
        out.append(textwrap.fill(
            f"{f.metadata['names'] or f.name}: {doc}", 92, initial_indent=" " * indent,
            subsequent_indent=" " * (indent + 4), break_long_words=False,
            break_on_hyphens=False,
        ))
    return "\n".join(out)


def with_options_doc(fn: Callable[..., Any], *, skip: tuple[str, ...] = ()) -> None:
    """Give ``fn``'s docstring (which holds :data:`OPTIONS_LINE` in its ``Args``) the
    options' entries, so that ``help(fn)`` lists them (``skip``: options ``fn`` lacks)."""
    doc = fn.__doc__ or ""
    if OPTIONS_LINE not in doc:
        raise RuntimeError(f"{fn.__name__}'s docstring lacks the options line")
    fn.__doc__ = doc.replace(OPTIONS_LINE, options_doc(skip=skip))


def options_of(call: dict[str, Any]) -> CurvatureOptions:
    """The :class:`CurvatureOptions` of a call of ``hessian()`` or ``ggn()``: the fields
    found among the call's arguments ``call`` (its ``locals()``), the others at default."""
    return CurvatureOptions(**{f.name: call[f.name] for f in fields(CurvatureOptions)
                               if f.name in call})


CurvatureOptions.__doc__ = (CurvatureOptions.__doc__ or "") + "\n    Attributes:\n" + (
    options_doc()
) + "\n"
