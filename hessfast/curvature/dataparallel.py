"""Data-parallel curvature operators over ``torch.distributed``: each rank passes its own
shard of the data, and every block product ends in one all-reduce.

The operator is the curvature of the loss averaged over the samples of ALL ranks. A rank
computes its shard's product with its local batch weights (``n_b / N_rank`` for a batch-mean
loss, ``1 / N_rank`` for a batch-sum one), scales it by ``N_rank / N`` (``N`` the global
sample count, all-reduced at construction), and the ranks sum their products in ONE flat
all-reduce of the operator's dtype (:meth:`hessfast.distributed.Comm.allreduce_sum_`). Ranks
may hold unequal shards, or none: a rank without batches contributes zeros and skips the
pre-flight (the others run it on their own first batch).

At construction the ranks also check that they hold the same model and options
(:meth:`RankGroup.agree`): the names, shapes, dtypes and exact bit checksums of every parameter
(those :class:`~hessfast.curvature.guard.ParamFingerprint` took) and buffer, the options that
must match (``hvp_mode``, ``loss_form``, ``loss_reduction``, ``bn_mode``, the checks, the loss
function, the selected parameters) go into one fixed-size digest per rank, compared in ONE
all-gather; a difference raises :class:`~hessfast.errors.DistributedError` on every rank naming
the ranks and the first differing option or parameter. Ranks whose parameters differ would
otherwise sum the products of different models: a spectrum of neither.

Every rank's local work (construction, each product) runs inside an error barrier
(:meth:`~hessfast.distributed.Comm.error_barrier`): when one rank raises, every rank raises
before the big collective and none hangs. Every rank then sees the same products, so the
algorithms (whose random vectors come from private seeded generators, never from the rank)
produce the same result on every rank, equal to the single-process run on all the data up
to rounding.

Which group (``process_group=`` of :func:`~hessfast.hessian` / :func:`~hessfast.ggn`):

* ``"auto"`` (default): a ``DistributedDataParallel`` model's own group; else the default
  group when ``torch.distributed`` is initialised with more than one process; else none;
* a process group: that group;
* ``None``: no group, the operator of this process's data only (a ``DistributedDataParallel``
  model is then refused: each rank would measure a different operator).
"""

from __future__ import annotations

import functools
import hashlib
import sys
import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import distributed
from .._digest import digest_text
from ..errors import DistributedError, EmptyDataError, UnsupportedModelError
from .guard import ParamFingerprint

if TYPE_CHECKING:
    from .options import CurvatureOptions
    from .preflight import SymmetryProbe

__all__ = ["Agreement", "RankGroup", "check_sampler", "operator_entries"]

# Loss forms and reductions as codes for the construction's one small all-reduce.
_FORMS = ("criterion", "model")
_REDUCTIONS = ("mean", "sum")
# Compute precisions, most precise first: the ranks agree on the least precise one seen.
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _group_of(model: nn.Module, process_group: Any) -> Any:
    """The process group to reduce over (None: a single-process operator)."""
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    if isinstance(process_group, str):
        if process_group != "auto":
            raise DistributedError(
                f"process_group must be 'auto', None or a torch.distributed process group, "
                f"got {process_group!r}"
            )
        if ddp:
            return model.process_group
        if distributed.is_initialized() and distributed.world_size() > 1:
            return torch.distributed.group.WORLD
        return None
    if process_group is None and ddp:
        raise DistributedError(
            "model is a DistributedDataParallel and process_group=None: each rank would "
            "measure the curvature of its own data shard only, a different operator on every "
            "rank. Pass process_group='auto' (DDP's group: the products are all-reduced over "
            "the ranks), or model.module with ALL the data on one process"
        )
    if process_group is not None and not distributed.is_initialized():
        raise DistributedError(
            "a process_group was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group (or hessfast.distributed.init()) first"
        )
    return process_group


def check_sampler(data: Any) -> None:
    """Refuse a DataLoader whose sampler is a shuffling ``DistributedSampler``; warn when one
    pads the data (repeats samples to make the shards equal).

    Raises:
        DistributedError: ``DistributedSampler(shuffle=True)``.
    """
    from torch.utils.data.distributed import DistributedSampler

    sampler = getattr(data, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        return
    if sampler.shuffle:
        raise DistributedError(
            "data's sampler is DistributedSampler(shuffle=True): which samples a rank holds "
            "depends on the sampler's epoch (set_epoch), so the operator is not a fixed "
            "function of the data. Use DistributedSampler(dataset, shuffle=False)"
        )
    extra = sampler.total_size - len(sampler.dataset)  # type: ignore[arg-type]
    if extra > 0 and not sampler.drop_last and distributed.is_main_process():
        warnings.warn(
            f"hessfast: the DistributedSampler repeats {extra} sample(s) to give every rank "
            f"{sampler.num_samples} (dataset of {len(sampler.dataset)} over "  # type: ignore
            f"{sampler.num_replicas} ranks): they count twice in the curvature. Use a "
            "dataset size divisible by the world size, or drop_last=True",
            stacklevel=5,
        )


def _describe_loss(loss_fn: Any) -> str:
    """``loss_fn`` as text that is equal on ranks with the same loss: its qualified name and,
    for a module or partial, its plain settings (reduction, label_smoothing, ...)."""
    fn = loss_fn.func if isinstance(loss_fn, functools.partial) else loss_fn
    name = getattr(fn, "__qualname__", type(fn).__qualname__)
    text = f"{getattr(fn, '__module__', type(fn).__module__)}.{name}"
    settings: dict[str, Any] = {}
    if isinstance(loss_fn, functools.partial):
        settings = dict(loss_fn.keywords)
    elif isinstance(loss_fn, nn.Module):
        settings = {k: v for k, v in vars(loss_fn).items()
                    if not k.startswith("_") and k != "training"}
    plain = (bool, int, float, str, type(None))
    shown = {k: v for k, v in sorted(settings.items()) if isinstance(v, plain)}
    return text + (f" {shown}" if shown else "")


def operator_entries(
    operator: str, param_names: Sequence[str], loss_fn: Any, options: CurvatureOptions,
    fingerprint: ParamFingerprint, buffers: Mapping[str, torch.Tensor],
) -> list[tuple[str, str]]:
    """What the ranks of a data-parallel operator must hold alike, as ``(label, value)``
    pairs: the options that change the operator or the collectives, then every parameter of
    the model (shape, dtype, exact int32 checksum of its bits, as the operator's
    :class:`~hessfast.curvature.guard.ParamFingerprint` took them at construction) and every
    buffer (as at construction). No data: each rank holds its own.

    Args:
        operator: the operator's kind, size and dtype (``"HessianOperator n=10 float64"``).
        param_names: the selected parameters' names.
        loss_fn: the criterion the operator was built with (compared by its qualified name
            and plain settings, see ``_describe_loss``).
        options: the operator's :class:`CurvatureOptions`; those that change the operator or
            its collectives are compared.
        fingerprint: the checksums the operator took of the model's parameters.
        buffers: the model's buffers by name, as at construction.
    """
    names = ",".join(param_names)
    out = [
        ("the operator", operator),
        ("the selected parameters", f"{len(param_names)}, names sha256 {digest_text(names)}"),
        ("loss_fn", _describe_loss(loss_fn)),
    ]
    for key in ("hvp_mode", "loss_form", "loss_reduction", "bn_mode", "check",
                "check_deterministic", "causal_lm", "fused_loss"):
        out.append((f"option {key}", repr(getattr(options, key))))
    out.append(("option lm_head", "given" if options.lm_head is not None else "None"))
    for name, p, s in fingerprint.taken():
        out.append((f"parameter {name!r}",
                    f"shape {tuple(p.shape)} {p.dtype} checksum {s & 0xFFFFFFFF:08x}"))
    saved = list(buffers.items())
    sums = ParamFingerprint.checksums([b for _, b in saved])
    for (name, b), s in zip(saved, sums, strict=True):
        out.append((f"buffer {name!r}",
                    f"shape {tuple(b.shape)} {b.dtype} checksum {s & 0xFFFFFFFF:08x}"))
    return out


@dataclass(frozen=True)
class Agreement:
    """What the ranks of a curvature operator settled at construction
    (:meth:`RankGroup.settle`); without a process group, this process's own values.

    Attributes:
        num_samples, num_batches: of all ranks (the batch weights' denominator).
        loss_form, loss_reduction: one reading of ``loss_fn`` for all ranks (a rank without
            batches takes the other ranks').
        compute_dtype: the least precise dtype any rank's pre-flight saw the model compute
            in (the symmetry tolerance follows it on every rank alike).
    """

    num_samples: int
    num_batches: int
    loss_form: str
    loss_reduction: str
    compute_dtype: torch.dtype


class RankGroup:
    """The ranks a curvature operator reduces over (a no-op without a process group).

    Attributes:
        comm: the :class:`~hessfast.distributed.Comm`, or None (one process).
        process_group: the group (None: one process).
        rank, world_size: this process's rank and the group's size (0 and 1 without one).
        scale: ``N_rank / N``, the factor applied to this rank's product before the sum.
        digest: SHA-256 (hex) of the operator's :func:`operator_entries`, set at the end
            of construction.
    """

    def __init__(self, model: nn.Module, data: Any, process_group: Any) -> None:
        group = _group_of(model, process_group)
        check_sampler(data)
        self.process_group = group
        self.comm = None if group is None else distributed.Comm(group)
        if self.comm is not None and self.comm.size == 1:
            self.comm = None  # a group of one: nothing to reduce
        self.rank = 0 if self.comm is None else self.comm.rank
        self.world_size = 1 if self.comm is None else self.comm.size
        self.scale = 1.0
        self.digest = ""  # of the operator's parameters and options (agree)

    @property
    def active(self) -> bool:
        """Are products reduced over more than one process?"""
        return self.comm is not None

    def barrier(self, what: str) -> Any:
        """An error barrier around a block of local work (a no-op with one process)."""
        return nullcontext() if self.comm is None else self.comm.error_barrier(what)

    @staticmethod
    def empty_loss_form(loss_form: str) -> tuple[str, str]:
        """The loss form of a rank without batches (it cannot read one): a placeholder that
        :meth:`settle` replaces by the form the other ranks decided."""
        form = "criterion" if loss_form == "auto" else loss_form
        return form, "this rank has no batches: the loss form the other ranks decided"

    def settle(
        self, num_samples: int, num_batches: int, loss_form: str, loss_reduction: str,
        compute_dtype: torch.dtype,
    ) -> Agreement:
        """After every rank built its part from its own data (this rank's counts and reading
        of the loss given): the global sample and batch counts, one loss form and reduction,
        and one compute dtype for all ranks, in one small all-reduce. Sets :attr:`scale`.

        Raises:
            EmptyDataError: no rank has a sample.
            DistributedError: ranks read the loss differently (form or reduction).
        """
        own = Agreement(num_samples, num_batches, loss_form, loss_reduction, compute_dtype)
        if self.comm is None:
            return own
        has = num_samples > 0
        votes = [num_samples, num_batches]
        votes += [int(has and loss_form == f) for f in _FORMS]
        votes += [int(has and loss_reduction == r) for r in _REDUCTIONS]
        votes += [int(has and compute_dtype == d) for d in _DTYPES]
        counts = self.comm.allreduce_ints(votes, "the sample counts at construction")
        total, batches, forms, reductions = counts[0], counts[1], counts[2:4], counts[4:6]
        # every rank takes the least precise compute dtype any rank's pre-flight saw (a rank
        # without batches saw none), so that all apply the same symmetry tolerance
        least = [d for d, c in zip(_DTYPES, counts[6:], strict=True) if c]
        if least:
            compute_dtype = least[-1]
        if total == 0:
            raise EmptyDataError(
                f"no rank of the {self.world_size} holds a sample: the curvature of a loss "
                "over no data is undefined. Check each rank's dataset / DataLoader"
            )
        if min(forms) > 0 or min(reductions) > 0:
            raise DistributedError(
                "the ranks read loss_fn differently (loss forms criterion/model on "
                f"{forms} ranks, reductions mean/sum on {reductions}): pass loss_form= and "
                "loss_reduction= explicitly so that every rank agrees"
            )
        if not has:
            loss_form = _FORMS[forms.index(max(forms))]
            loss_reduction = _REDUCTIONS[reductions.index(max(reductions))]
        self.scale = num_samples / total
        return Agreement(total, batches, loss_form, loss_reduction, compute_dtype)

    def agree(self, kind: str, entries: list[tuple[str, str]]) -> None:
        """Record the digest of the operator's :func:`operator_entries` (:attr:`digest`,
        which an algorithm's argument check compares too); under a process group compare
        the entries across the ranks in one all-gather of a fixed-size digest.

        Raises:
            DistributedError: on every rank, when some rank holds other parameters, buffers
                or options (the message names the ranks and the first difference).
        """
        text = "\n".join(f"{k}={v}" for k, v in entries)
        self.digest = hashlib.sha256(text.encode()).hexdigest()
        if self.comm is None:
            return
        self.comm.agree(
            f"the {kind} operator's construction (rank {self.rank} of {self.world_size})",
            entries,
            "A data-parallel operator is the curvature of ONE model over every rank's data: "
            "build it on every rank from the same model (parameters and buffers equal bit for "
            "bit: load the same weights, seed every rank alike, or broadcast rank 0's state "
            "as DistributedDataParallel does when it wraps the model) with the same options; "
            "only the data differ between ranks",
        )

    def check_symmetry(
        self, probe: SymmetryProbe | None, V: torch.Tensor, HV: torch.Tensor
    ) -> None:
        """Let ``probe`` look at the (global) products ``HV [k, n]`` of ``V [k, n]``; under a
        process group inside an error barrier, so that ranks whose tolerances differ (an
        empty rank did not see the model's compute precision) all stop together."""
        if probe is None or probe.done:
            return
        with self.barrier("the symmetry check of the first products"):
            probe.observe(V, HV)

    def reduce(self, out: torch.Tensor) -> torch.Tensor:
        """This rank's product ``[k, n]`` (weighted within its shard) to the global one:
        scaled by ``N_rank / N`` and summed over the ranks in one all-reduce."""
        if self.comm is None:
            return out
        if self.scale != 1.0:
            out.mul_(self.scale)
        return self.comm.allreduce_sum_(out)



def refuse_fsdp(model: nn.Module) -> None:
    """Refuse a model sharded by FSDP that reached an exact operator: FSDP1
    (``FullyShardedDataParallel``) always, FSDP2 (``fully_shard``) in :func:`hessfast.ggn`
    (:func:`hessfast.hessian` sends FSDP2 models to the finite-difference operator of
    :mod:`hessfast.curvature.fsdp` before this check).

    Exact double backward is not supported under FSDP (FSDP1 warns that it is unsupported;
    FSDP2 frees the gathered parameters and reduce-scatters in post-backward hooks, so a
    second backward sees freed storage and unreduced gradients), and forward-over-reverse
    fails on its hooks. Nothing is imported: FSDP is looked for only when the user's code
    has loaded it.

    Raises:
        UnsupportedModelError: some module of ``model`` is FSDP-sharded.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return
    two = getattr(fsdp, "FSDPModule", None)
    one = getattr(fsdp, "FullyShardedDataParallel", None)
    kinds = tuple(cls for cls in (one, two) if isinstance(cls, type))
    sharded = [name or "<root>" for name, m in model.named_modules() if isinstance(m, kinds)]
    if not sharded:
        return
    if isinstance(two, type) and any(isinstance(m, two) for m in model.modules()):
        raise UnsupportedModelError(
            f"modules {sharded[:4]} are sharded by FSDP (fully_shard): torch cannot "
            "differentiate an FSDP model twice, so no exact GGN product exists, and a finite "
            "difference of gradients gives the Hessian, not the GGN. Use hf.hessian(model, "
            "loss_fn, data) (finite-difference products on the local shards), or measure the "
            "unsharded model: load its full state dict into a plain model on each rank and "
            "pass each rank's data shard (process_group='auto' reduces the products)"
        )
    raise UnsupportedModelError(
        f"modules {sharded[:4]} are sharded by FSDP1 (FullyShardedDataParallel): torch "
        "cannot differentiate an FSDP model twice (its parameters are freed and its "
        "gradients reduce-scattered in backward hooks), so no exact Hessian product exists, "
        "and hessfast's finite-difference operator runs on FSDP2 only. Shard the model with "
        "torch.distributed.fsdp.fully_shard (FSDP2) and call hf.hessian again (products by "
        "finite differences on the local shards), or measure the unsharded model: load its "
        "full state dict into a plain model on each rank and pass each rank's data shard "
        "(process_group='auto' reduces the products)"
    )
