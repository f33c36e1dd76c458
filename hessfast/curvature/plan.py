"""Which product path and chunk size a curvature operator uses for a block of k vectors.

An explicit ``hvp_mode`` is used as given. ``hvp_mode="auto"`` decides per block size k:

* the graph path: ``reuse_graph`` when the graphs of all batches fit in a quarter of the free
  memory (measured on batch 0's graph, which is built once and kept), else
  ``double_backward``;
* k <= ``REUSE_WITHOUT_TIMING``: the graph path, untimed; with graph reuse, its chunk (all k
  rows in one batched call, or one by one) is timed once per k > 1;
* larger k: graph reuse timed over chunk sizes; without reuse, ``double_backward`` and
  ``fwd_rev`` timed against each other (their results on the same vectors must agree);
* ``fwd_rev`` alone when double backward cannot differentiate the model;
* ``finite_difference`` (central differences of two ordinary gradients per vector,
  :mod:`.finitediff`) is NEVER timed or chosen while an exact path works: only when every
  exact path failed because the model has no exact second derivative (a custom
  ``autograd.Function`` without a differentiable backward, a kernel whose derivative is not
  implemented), and only for an operator that can take it (the Hessian; ``exact=False``).
  The switch warns (a ``UserWarning`` starting "hessfast:") and its reason is the plan's.

So ``torch.func`` (1-2.5 s of one-time initialisation in a fresh process) is touched only
when ``fwd_rev`` is requested, raced where it can win, or the only path left. The decision
per block size and its reason are kept in an :class:`HVPPlan`.

The planner is policy only: it never touches the operator. It is told the size of batch 0's
graph (:meth:`Planner.record_graph_size`) and given the timings it decides from
(:data:`TimePaths`, measured by :mod:`.products` next to the products), so a test can drive
it with fake ones (tests/curvature/test_plan_policy.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedModelError
from ..memory import available_memory

__all__ = [
    "EXACT_MODES", "FD_MODE", "GRAPH_MODES", "HVPPlan", "HVP_MODES", "Planner", "TimePaths",
    "inplace_write_error", "no_second_derivative",
]

HVP_MODES = ("auto", "reuse_graph", "double_backward", "fwd_rev", "finite_difference")
GRAPH_MODES = ("reuse_graph", "double_backward")
#: The exact paths (autograd's second derivative); ``finite_difference`` is not one.
EXACT_MODES = ("reuse_graph", "double_backward", "fwd_rev")
FD_MODE = "finite_difference"

# What torch and hessfast say when a second derivative does not exist (as opposed to a path
# that fails for another reason): auto mode falls back to finite differences only when double
# backward failed with one of these (forward-over-reverse fails on any custom Function
# without a jvp, so its failure tells nothing).
_NO_SECOND_DERIVATIVE = (
    "is not implemented",  # "the derivative for '...' is not implemented"
    "once_differentiable",  # "trying to differentiate twice a function that was marked ..."
    "differentiate twice",
    "no usable second derivative",  # the pre-flight's flat custom Function
    "double backward is not",
)


def no_second_derivative(exc: BaseException) -> bool:
    """Does ``exc`` (or an exception it chains) say that the model has no exact second
    derivative (double backward or forward-mode AD not implemented for one of its ops, a
    custom Function marked ``once_differentiable`` or without a differentiable backward)?"""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = str(cur).lower()
        if any(mark in text for mark in _NO_SECOND_DERIVATIVE):
            return True
        cur = cur.__cause__ or cur.__context__
    return False

# Chunk sizes (rows of V per batched call) that auto mode tries for k > REUSE_WITHOUT_TIMING.
# Larger chunks amortise per-call overhead but grow activation memory linearly; on the 2-core
# CPU, forward-over-reverse at k=4 cost 0.55x its own k=1 per vector on a CNN while k=16 was
# worse than k=4 (memory traffic). Explicit modes use chunks of up to 32 rows.
# Timing a chunk of c rows costs about 2-3 c products, so the search is kept short: on a
# ResNet-20 a k=48 block spent 11.5 s choosing among 1/4/8/16/32/48 (three passes' worth).
CHUNK_CANDIDATES = (1, 4, 16)
MAX_CHUNK = 32
# Graph reuse beat forward-over-reverse and recomputed double backward at k = 1 and k = 4 on
# every model of bench/bench_hvp.py, and double backward beat forward-over-reverse there, on
# the 2-core CPU and on an H200 (2026-11-26): small blocks are not timed. Forward-over-reverse
# never beat graph reuse at any k on those models (k=16: 1.33 vs 1.33 gradients per vector on
# the MLP, worse elsewhere), so it is raced only against recomputed double backward, which
# it beat at k=16 on the LM (2.02 vs 2.31).
REUSE_WITHOUT_TIMING = 4
# The graphs of all batches may take this fraction of the free memory.
GRAPH_MEMORY_FRACTION = 4
# Relative gap above which forward-over-reverse "disagrees" with double backward (x eps).
AGREE_EPS = 1e4


#: The timings auto mode decides from: ``time(modes, k, chunks)`` runs each mode on the same
#: vectors in chunks of each size and returns seconds per vector by ``(mode, chunk)``; a mode
#: that fails or disagrees is reported to the planner (:meth:`Planner.path_failed`,
#: :meth:`Planner.check_agreement`) and may be missing or marked unavailable.
TimePaths = Callable[[list[str], int, list[int]], dict[tuple[str, int], float]]


@dataclass(frozen=True)
class HVPPlan:
    """What the operator does for blocks of k vectors, and why.

    Attributes:
        mode: the product path, one of ``reuse_graph``, ``double_backward``, ``fwd_rev``,
            ``finite_difference``.
        chunk: rows of a block per batched call.
        seconds_per_vector: the timings auto mode chose from (``"mode/chunk=c"`` -> s).
        reason: why this path.
    """

    mode: str
    chunk: int
    seconds_per_vector: dict[str, float] = field(default_factory=dict)
    reason: str = ""


# torch's error when a backward finds that a tensor it saved was changed in place since
_INPLACE_MARK = "modified by an inplace operation"


def inplace_write_error(exc: BaseException) -> UnsupportedModelError | None:
    """The refusal for a forward that writes in place into a tensor autograd saved (``h =
    torch.sigmoid(x); h.mul_(2)``: sigmoid saved ``h`` for its backward), when ``exc`` (or an
    exception it chains) is torch's version-counter error; None for any other failure.

    Torch refuses the first backward of such a forward, so double backward and graph reuse
    cannot run. It is a property of the forward, not of a path: every ``hvp_mode`` raises
    this same error, and auto mode does not fall back to torch.func's forward-over-reverse
    (which would differentiate a forward whose recorded backward torch itself refuses)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = str(cur)
        if isinstance(cur, RuntimeError) and _INPLACE_MARK in text:
            detail = text.split(_INPLACE_MARK, 1)[1].lstrip(": ").split(" Hint:")[0]
            detail = detail.strip().rstrip(".")
            return UnsupportedModelError(
                "the forward writes in place into a tensor that autograd saved for the "
                f"backward (torch: {detail}), so torch refuses to differentiate it, on every "
                "hvp_mode. Write that step out of place: h = h * 2 instead of h.mul_(2) or "
                "h *= 2, torch.sigmoid(z) instead of z.sigmoid_(), inplace=False on "
                "activations such as nn.ReLU that follow a layer which saves its output. "
                "torch.autograd.set_detect_anomaly(True) shows the forward line of the op "
                "whose saved output was overwritten"
            )
        cur = cur.__cause__ or cur.__context__
    return None


class Planner:
    """The plans of one operator, one per block size, decided on first use.

    Args:
        requested: the ``hvp_mode`` asked for.
        fixed_chunk: ``chunk_size`` if given.
        reuse: ``reuse_graph`` if given (forces graph reuse on or off in auto mode).
        num_batches: batches in the data.
        exact: ``exact=True``: auto mode refuses instead of falling back to finite
            differences.
        fd_ok: may this operator fall back to finite differences (the Hessian: yes; the
            GGN: no, a difference of gradients is the Hessian).
    """

    def __init__(
        self, requested: str, fixed_chunk: int | None, reuse: bool | None, num_batches: int,
        *, exact: bool = False, fd_ok: bool = False,
    ) -> None:
        self.requested = requested
        self.fixed_chunk = fixed_chunk
        self.exact = exact
        self.fd_ok = fd_ok
        # auto mode fell back to finite differences: why (None while an exact path works)
        self.fallback: str | None = None
        # path -> the exception it failed with
        self.failures: dict[str, BaseException] = {}
        self.plans: dict[int, HVPPlan] = {}
        # path -> why it cannot be used (it failed, or disagrees with double backward)
        self.unavailable: dict[str, str] = {}
        self.fits: tuple[bool, str] | None = None
        if requested == "reuse_graph":
            self.fits = (True, "requested")
        elif requested != "auto":
            self.fits = (False, "requested")
        elif reuse is not None:
            self.fits = (bool(reuse), "reuse_graph set by the caller")
        elif num_batches == 1:
            self.fits = (True, "one batch: its graph is built once and kept")

    @property
    def needs_graph_size(self) -> bool:
        """Is the size of batch 0's graph still needed to decide on graph reuse?"""
        return self.fits is None and self.fallback is None

    @property
    def keeps_graphs(self) -> bool:
        """May the graphs be kept (so batch 0's graph is worth caching)?"""
        return self.fits is None or self.fits[0]

    def record_graph_size(self, nbytes: int, num_batches: int, device: torch.device) -> None:
        """Decide graph reuse from the bytes batch 0's graph holds."""
        need = nbytes * num_batches
        budget = available_memory(device) // GRAPH_MEMORY_FRACTION
        if need <= budget:
            self.fits = (True, f"graphs of {num_batches} batches ~{need / 2**20:.0f} MiB fit")
        else:
            self.fits = (False, (
                f"graphs of {num_batches} batches ~{need / 2**20:.0f} MiB exceed a quarter of "
                f"free memory ({budget / 2**20:.0f} MiB)"
            ))

    def mark_unavailable(self, mode: str, why: str) -> None:
        """Record that ``mode`` cannot be used (both graph paths fall with double backward);
        plans that used it are dropped."""
        for m in GRAPH_MODES if mode in GRAPH_MODES else (mode,):
            self.unavailable.setdefault(m, why)
        self.plans = {k: p for k, p in self.plans.items() if p.mode not in self.unavailable}

    def path_failed(self, mode: str, exc: BaseException) -> None:
        """``mode`` raised on its first use. An explicitly requested path raises
        :class:`UnsupportedModelError` naming the alternative; in auto mode the path is
        marked unavailable, and the error is raised only when no path is left."""
        inplace = inplace_write_error(exc)
        if inplace is not None:  # the forward's fault, not the path's: no fallback
            raise inplace from exc
        why = f"{type(exc).__name__}: {exc}"
        if mode == FD_MODE:
            raise UnsupportedModelError(
                "hvp_mode='finite_difference' needs ordinary gradients of the loss, which "
                f"fail here: {why}. Fix the forward/backward (one loss.backward() must run)"
            ) from exc
        if self.requested == FD_MODE:  # never reached: the FD path runs no exact product
            raise UnsupportedModelError(f"finite differences failed: {why}") from exc
        if self.requested == "fwd_rev":
            raise UnsupportedModelError(
                f"hvp_mode='fwd_rev' fails on this model: {why}; use "
                "hvp_mode='double_backward' or 'auto'"
            ) from exc
        if self.requested != "auto":
            raise UnsupportedModelError(
                f"hvp_mode={self.requested!r} needs double backward, which fails here: {why}; "
                "use hvp_mode='fwd_rev' or 'auto'"
            ) from exc
        self.mark_unavailable(mode, why)
        for m in GRAPH_MODES if mode in GRAPH_MODES else (mode,):
            self.failures.setdefault(m, exc)
        if all(m in self.unavailable for m in ("double_backward", "fwd_rev")):
            db = self.failures.get("double_backward")
            if self.fallback is None and db is not None and no_second_derivative(db):
                self._fall_back(exc)
                return
            raise UnsupportedModelError(
                "neither double backward nor torch.func forward-over-reverse can "
                "differentiate this model twice: "
                + "; ".join(f"{m}: {self.unavailable[m]}" for m in ("double_backward", "fwd_rev"))
                + ". Common fixes: inplace=False on activations; "
                "torch.backends.cudnn.flags(enabled=False) for RNNs; the math SDPA "
                "backend for attention; checkpoint(use_reentrant=False)"
                + ("; hessian(..., hvp_mode='finite_difference') needs only gradients"
                   if self.fd_ok and not self.exact else "")
            ) from exc

    def _fall_back(self, exc: BaseException) -> None:
        """Every exact path failed for want of a second derivative: finite differences, or
        (``exact=True``, or an operator without them) the refusal naming the cause."""
        db, fr = self.unavailable["double_backward"], self.unavailable["fwd_rev"]
        causes = db if db == fr else f"double_backward: {db}; fwd_rev: {fr}"
        if not self.fd_ok:
            raise UnsupportedModelError(
                "no exact second derivative exists for this model, so neither double "
                f"backward nor forward-over-reverse can compute its products ({causes}). "
                "The GGN has no finite-difference path (a difference of gradients is the "
                "Hessian): use hessian(..., hvp_mode='finite_difference'), or give the model "
                "twice-differentiable layers"
            ) from exc
        if self.exact:
            raise UnsupportedModelError(
                f"no exact second derivative exists for this model ({causes}), and "
                "exact=True refuses the finite-difference fallback. Fix: exact=False (the "
                "default) lets hvp_mode='auto' use central differences of two gradients per "
                "product, with their error recorded as H.fd_error; or give the model "
                "twice-differentiable layers"
            ) from exc
        self.fallback = (
            "auto: finite differences, because no exact second derivative exists ("
            + causes[:600] + ")"
        )
        self.plans = {}
        warnings.warn(
            "hessfast: this model has no exact second derivative (double backward and "
            "forward-over-reverse both fail: "
            + (db[:300] if db == fr else f"double_backward: {db[:200]}; fwd_rev: {fr[:200]}")
            + "), so hvp_mode='auto' uses finite differences of two gradients per product; "
            "their relative error is recorded as H.fd_error. exact=True refuses instead",
            UserWarning, stacklevel=2,
        )

    def check_agreement(
        self, ref: torch.Tensor, fwd_rev: torch.Tensor, dtype: torch.dtype
    ) -> None:
        """Forward-over-reverse products must equal double backward's on the same vectors
        (to ``AGREE_EPS`` ulps of the parameters' dtype, relative to the largest entry);
        otherwise it is unavailable, or an error when it was requested."""
        scale = max(ref.abs().max().item(), torch.finfo(ref.dtype).tiny)
        gap = (fwd_rev - ref).abs().max().item()
        if gap <= AGREE_EPS * torch.finfo(dtype).eps * scale:
            return
        why = f"disagrees with double backward by {gap:.3g} (scale {scale:.3g})"
        if self.requested == "fwd_rev":
            raise UnsupportedModelError(
                f"torch.func forward-over-reverse {why} on this model; use "
                "hvp_mode='double_backward'"
            )
        self.mark_unavailable("fwd_rev", why)

    def plan_for(
        self, k: int, *, time: TimePaths, timed_on: int = 0,
        release: Callable[[], None] = lambda: None,
    ) -> HVPPlan:
        """The plan for blocks of ``k`` vectors (decided, and timed in auto mode, once).

        Args:
            k: the block size.
            time: the timings auto mode decides from (:data:`TimePaths`; the operator's
                products measure them on batch 0). Not called for an explicit ``hvp_mode``
                or a small block on a path that needs no timing.
            timed_on: the index of the batch ``time`` measures on (for the reason).
            release: called when auto mode timed the paths and chose one that does not
                keep the graphs (the cached graphs are then dropped).

        Auto mode needs the graph-reuse decision first: the caller measures batch 0's
        graph (:meth:`record_graph_size`) while :attr:`needs_graph_size`.
        """
        if k not in self.plans:
            if self.requested != "auto":
                chunk = self.fixed_chunk or min(k, MAX_CHUNK)
                self.plans[k] = HVPPlan(self.requested, chunk, reason="requested")
            elif self.fallback is not None:
                chunk = self.fixed_chunk or min(k, MAX_CHUNK)
                self.plans[k] = HVPPlan(FD_MODE, chunk, reason=self.fallback)
            else:
                self.plans[k] = self._auto_plan(k, time, timed_on, release)
        return self.plans[k]

    def _auto_plan(
        self, k: int, time: TimePaths, timed_on: int, release: Callable[[], None]
    ) -> HVPPlan:
        if self.fits is None:
            raise RuntimeError("auto mode's plan needs the graph size first (record_graph_size)")
        fits, why_fits = self.fits
        graph_mode = "reuse_graph" if fits else "double_backward"
        if graph_mode not in self.unavailable:
            candidates = [graph_mode] if fits else [graph_mode, "fwd_rev"]
        else:
            candidates = ["fwd_rev"]
        candidates = [m for m in candidates if m not in self.unavailable]
        if not candidates:
            raise UnsupportedModelError(
                "no Hessian-vector-product path works for this model: "
                + "; ".join(f"{m}: {r}" for m, r in self.unavailable.items())
            )
        if k <= REUSE_WITHOUT_TIMING:
            mode = candidates[0]
            why = "untimed (the fastest path at k <= 4 on every benchmark model, CPU and H200)"
            if mode == "fwd_rev":
                why = "the only path left"
            chunk, timings = self.fixed_chunk or k, {}
            if mode == "reuse_graph" and chunk > 1:
                # one batched double backward (chunk k) against k single ones (chunk 1):
                # batching copies [k, tokens, vocab] intermediates, which lost on a GPT-2
                # with a 50k vocabulary on the 2-core CPU (products.py says more)
                per_vector = time(["reuse_graph"], k, [1, k])
                timings = {c: t for (m, c), t in per_vector.items() if m not in self.unavailable}
                if not timings:  # reuse failed while timed: now unavailable
                    return self._auto_plan(k, time, timed_on, release)
                chunk = min(timings, key=timings.__getitem__)
                why += f"; chunk {chunk} timed fastest of {sorted(timings)}"
            return HVPPlan(mode, chunk, {f"reuse_graph/chunk={c}": t for c, t in timings.items()},
                           reason=self._reason(f"auto for k={k}: {mode} {why}", why_fits))
        chunks = (
            [self.fixed_chunk]
            if self.fixed_chunk
            else sorted({c for c in CHUNK_CANDIDATES if c <= k} or {k})
        )
        per_vector = time(candidates, k, chunks)
        usable = {key: t for key, t in per_vector.items() if key[0] not in self.unavailable}
        if not usable:  # every candidate failed and is now unavailable
            return self._auto_plan(k, time, timed_on, release)
        (mode, c), best = min(usable.items(), key=lambda item: item[1])
        if mode != "reuse_graph":
            release()
        timings = {f"{m}/chunk={cc}": t for (m, cc), t in per_vector.items()}
        reason = (
            f"auto for k={k}: fastest of {len(timings)} timed on batch {timed_on} "
            f"({best * 1e3:.3g} ms/vector)"
        )
        return HVPPlan(mode, c, timings, self._reason(reason, why_fits))

    def _reason(self, reason: str, why_fits: str) -> str:
        reason += f"; {why_fits}"
        if self.unavailable:
            reason += "; unavailable: " + "; ".join(
                f"{m} ({r[:120]})" for m, r in self.unavailable.items()
            )
        return reason
