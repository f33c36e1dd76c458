"""The entry point :func:`trace` and its three methods: Hutchinson, Hutch++ (both from
deflated or plain Hutchinson samples) and XTrace (leave-one-out estimates)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import ops
from .._checks import (
    PROBES,
    check_choice,
    check_int,
    check_level,
    check_positive,
    check_seed,
)
from .._probe import probe_operator
from ..distributed import Mesh
from ..errors import ConfigurationError
from ..linop import LinearOperator, local_dots, refuse_sharded, row_dots
from ..progress import set_total, track
from ..results import Status, TraceResult, t_value
from .exchangeable import Exchangeable, orth_rows, xtrace_estimates, xtrace_jackknife_stderr
from .session import Session, max_matvecs_arg, mean_stderr, renamed_arg

__all__ = ["TRACE_METHODS", "trace"]

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace")
_WHO = "trace"


@dataclass(frozen=True)
class _Stop:
    """The adaptive target: a ``confidence`` interval of half-width
    ``<= max(atol, rtol * |estimate|)`` from at least ``min_samples`` samples."""

    rtol: float
    level: float
    min_samples: int
    atol: float = 0.0

    def target(self, est: float) -> float:
        """The half-width asked for at this estimate."""
        return max(self.atol, self.rtol * abs(est))

    def half(self, err: float, count: int) -> float:
        """Half-width of the interval from ``count`` samples (t quantile, count - 1 dof)."""
        if count < 2 or not math.isfinite(err):
            return math.inf
        return t_value(self.level, count - 1) * err if err > 0 else 0.0

    def met(self, est: float, err: float, count: int) -> bool:
        return count >= self.min_samples and self.half(err, count) <= self.target(est)

    def plan(self, count: int, err: float, est: float, rate: float, remaining: int) -> int:
        """Samples of the next fresh block: the ``1/count^rate`` prediction (from ``err`` at
        ``count``) of the count whose interval meets the target, times ``_MARGIN``; at least
        ``min_samples``, at most ``remaining``."""
        tgt = self.target(est)
        if err == 0.0:
            want = self.min_samples
        elif tgt <= 0 or not math.isfinite(err):
            want = remaining
        else:
            want = self.min_samples
            for _ in range(50):  # fixed point: the t quantile depends on the count
                need = count * (t_value(self.level, max(want, 2) - 1) * err / tgt) ** (1 / rate)
                new = math.ceil(_MARGIN * need) if need < 1e15 else remaining
                new = max(self.min_samples, min(new, remaining))
                if new == want:
                    break
                want = new
        return int(max(1, min(want, remaining)))


# (value, stderr, samples, status) of one run
_Outcome = tuple[float, float, int, Status]

#: Safety factor on the planned size of a fresh block (the pilot's standard error is itself
#: noisy; a block that misses the target costs another block).
_MARGIN = 1.25
#: The convergence rate assumed when the first fresh block is planned: error ~ 1/count^rate.
#: Hutchinson samples are iid (1/2). XTrace falls between 1/2 (flat spectra) and 1 (fast
#: decay); its later blocks use the rate measured between the previous two blocks.
_RATE = {"hutchinson": 0.5, "hutch++": 0.5, "xtrace": 0.75}

def trace(
    A: LinearOperator,
    max_matvecs: int = 99,
    *,
    method: str = "hutch++",
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    confidence: float = 0.95,
    min_samples: int = 10,
    chunk_size: int | None = None,
    probe: str = "rademacher",
    num_matvecs: int | None = None,
    mesh: Mesh | None = None,
    progress: bool | None = None,
    block_size: int | None = None,
) -> TraceResult:
    """Estimate ``tr(A)`` of a symmetric ``n x n`` operator from block products.

    Args:
        A: the operator (``A.matmat(V: [k, n]) -> [k, n]``); a dense square tensor is
            wrapped with :meth:`LinearOperator.from_matrix`.
        max_matvecs: the budget of products with A. ``"hutch++"`` needs >= 3 and
            ``"xtrace"`` >= 2 (or >= n). With ``max_matvecs >= n``, ``"hutch++"`` and
            ``"xtrace"`` compute the trace exactly from the n unit vectors (n products,
            ``stderr = 0``, status ``EXACT``) instead of spending the budget on a sketch that
            covers R^n; this holds in the adaptive mode too (the cost is then at most n).
            ``"hutchinson"`` does the same with a fixed budget ``>= n``; in the adaptive mode
            it samples (stopping on ``rtol``). Probes stream through blocks of at most
            ``session.BLOCK_BYTES`` (256 MB), so memory does not grow with the budget.
        method: ``"hutchinson"``, ``"hutch++"`` (default) or ``"xtrace"``.
        seed: seed of the private probe generator (the global RNG is not used).
        rtol: adaptive mode: a pilot of ``min_samples`` samples plans the size of a fresh
            block whose own ``confidence`` t interval has half-width
            ``<= rtol * |estimate|`` (status ``CONVERGED``); the value and interval come from
            that block alone, so they are not picked for looking narrow (the rule survives
            optional stopping; :func:`_two_stage`). A block that misses the target plans the
            next; when the budget is spent first: status ``MAX_MATVECS``,
            ``converged=False`` and a warning. Without rtol/atol: status ``FIXED_BUDGET``.
        atol: adaptive mode with an absolute target: stop once the half-width
            ``<= max(atol, rtol * |estimate|)`` (alone, or with ``rtol``; a trace near 0 can
            never meet a relative target).
        confidence: level of that interval, in (0, 1).
        min_samples: the adaptive pilot's size and the fewest samples (probes behind the
            standard error) of the block that answers; at least 2.
        chunk_size: most rows per ``matmat`` call (None: a whole phase in one call; the
            operators call it ``chunk_size`` too). ``block_size`` is its deprecated old name
            (a DeprecationWarning; removed in the next release): in ``eigsh`` a block is the
            Lanczos width, not a chunk of rows.
        probe: ``"rademacher"`` (default) or ``"gaussian"``.
        num_matvecs: deprecated name of ``max_matvecs`` (a DeprecationWarning; removed in
            the next release).
        mesh: ``"hutchinson"`` with a fixed budget only: a
            :class:`hessfast.distributed.Mesh` (probe x data); ``A`` built with
            ``process_group=mesh.data_group``. Each probe group computes the samples of a
            contiguous share of the ``max_matvecs`` probe indices (probe ``i`` from its own
            generator keyed by ``(seed, i)``), and the samples are all-gathered, so every
            rank returns the result of one process on all the data with ``mesh=Mesh()``
            (``num_matvecs`` counts every group's products, ``num_passes`` this group's).
            Hutch++ and XTrace orthonormalise a sketch of ALL probes (a global QR), and the
            adaptive mode decides from all samples after each block: both refuse a mesh.
            Under a mesh the stderr is the samples' spread alone (the closed-form plug-in
            needs the probes' ``[n]`` diagonals, which the groups do not share).
        progress: a progress bar of products on stderr (total: the budget, or n on the
            exact path); None: when stderr is a terminal.
        block_size: deprecated name of ``chunk_size`` (DeprecationWarning; removed next
            release).

    Sharded vectors: an operator whose vectors are sharded over ranks (``A.shards``, an FSDP
    model) runs ``method="hutchinson"`` (the others and ``mesh=`` are refused): each rank
    draws its slice of every probe from a generator keyed by ``(seed, rank)`` (the estimate
    then depends on the world size), the samples ``z^T A z`` and the variance terms are
    summed over the ranks (:func:`hessfast.linop.row_dots`), so every rank gets the same
    numbers and stops at the same sample; the exact path (a budget >= n) is not taken.

    Returns:
        :class:`TraceResult`. Budget use with ``rtol=None``: Hutchinson m probes in one
        pass; Hutch++ ``k = m // 3`` sketch probes (one pass), ``A Q`` (one pass) and
        ``m - 2k`` deflated probes (one pass); XTrace ``k = m // 2`` probes and ``A Q`` (two
        passes). Adaptive Hutch++ spends the same sketch (a third of the budget, so pass
        a realistic budget, not a huge cap), then a pilot of ``min_samples`` deflated
        samples and a fresh block sized by the 1/sqrt(m) prediction (x 1.25); adaptive
        XTrace runs a pilot XTrace of ``max(min_samples, 2)`` probes and then a fresh XTrace
        (a new basis) sized by an assumed 1/m^0.75 decay (later blocks: the measured
        decay), so its cost follows the accuracy asked for, not the budget. The pilot is
        the price of an honest interval: on the coverage bench (n = 400, rtol = 0.05) the
        adaptive runs spend 1.04-1.08x (Hutch++), 1.2-2.3x (Hutchinson) and 2-5x (XTrace,
        whose interval is also conservative) the products of the old sequential rule, whose
        intervals covered 77-92% (bench/RESULTS.md).

    Raises:
        ConfigurationError: bad method, probe, budget, rtol, confidence, min_samples,
            chunk_size, or a non-square A.
        NonFiniteError: a product contains NaN or Inf.
    """
    with track(A, "trace", enabled=progress):
        t0 = time.perf_counter()
        max_matvecs = max_matvecs_arg(max_matvecs, num_matvecs, _WHO)
        check_choice("method", method, TRACE_METHODS, who=_WHO)
        check_choice("probe", probe, PROBES, who=_WHO)
        seed = check_seed(seed, who=_WHO)
        chunk_size = renamed_arg(chunk_size, block_size, "chunk_size", "block_size", _WHO)
        if chunk_size is not None:
            chunk_size = check_int("chunk_size", chunk_size, 1, who=_WHO)
        sess = Session(A, f"trace({method})", seed=seed, probe=probe, chunk_size=chunk_size)
        m = sess.budget(method, max_matvecs)
        stop = None
        if rtol is not None:
            rtol = check_positive("rtol", rtol, who=_WHO)
        if atol is not None:
            atol = check_positive("atol", atol, who=_WHO)
        level = check_level("confidence", confidence, who=_WHO)
        min_samples = check_int("min_samples", min_samples, 1, who=_WHO)
        if rtol is not None or atol is not None:
            stop = _Stop(rtol or 0.0, level, max(min_samples, 2), atol or 0.0)
        if mesh is not None:
            _check_mesh(mesh, method, stop, sess)
        sharded = sess.A.shards is not None
        if sharded and (method != "hutchinson" or mesh is not None):
            refuse_sharded(sess.A, f"{_WHO}(method={method!r}{', mesh' if mesh else ''})",
                           "On sharded vectors trace runs method='hutchinson' (without mesh=).")
        set_total(min(m, sess.n) if method != "hutchinson" or stop is None else m)
        probe_operator(sess.A, sess.products.who)

        if sess.n == 0:
            out: _Outcome = (0.0, 0.0, 0, Status.EXACT)
        elif m >= sess.n and (method != "hutchinson" or stop is None) and not sharded:
            d = sess.exact_diagonal()
            out = (float(d.sum(dtype=torch.float64)), 0.0, 0, Status.EXACT)
        elif mesh is not None:
            out = _hutchinson_mesh(sess, m, mesh)
        elif method == "xtrace":
            out = _xtrace(sess, m, stop)
        else:
            out = _hutchinson(sess, m, method == "hutch++", stop)
        value, stderr, samples, status = out
        spent = samples if mesh is not None and status != Status.EXACT else sess.matvecs
        res = TraceResult(
            value=float(value), stderr=float(stderr), num_matvecs=spent,
            num_passes=sess.passes, method=method, seed=seed,
            converged=status != Status.MAX_MATVECS, status=status,
            seconds=time.perf_counter() - t0, num_samples=samples,
            dof=samples - 1 if samples >= 2 and status != Status.EXACT else None,
        )
        if not res.converged:
            warnings.warn(
                f"hessfast: trace(method={method!r}) spent its budget of {m} matvecs before the "
                f"{confidence:.0%} interval reached {_asked(rtol, atol)}: estimate {res.value:.6g} "
                f"+/- {res.value - res.confidence_interval(level)[0]:.3g} from "
                f"{res.num_samples} samples; raise max_matvecs",
                stacklevel=2,
            )
        return res


def _asked(rtol: float | None, atol: float | None) -> str:
    return " or ".join(f"{k}={v:g}" for k, v in (("rtol", rtol), ("atol", atol)) if v is not None)


def _check_mesh(mesh: Mesh, method: str, stop: _Stop | None, sess: Session) -> None:
    """Refuse ``mesh=`` where the probes cannot be split over probe groups."""
    Mesh.checked(mesh, _WHO)
    if method != "hutchinson":
        raise ConfigurationError(
            f"{_WHO}: method={method!r} cannot run over a mesh: it orthonormalises a sketch "
            "of ALL its probes (a global QR), which probe groups holding disjoint probes "
            "cannot split. Use method='hutchinson' with mesh=, or drop mesh= and build the "
            "operator data-parallel over all ranks (process_group='auto')"
        )
    if stop is not None:
        raise ConfigurationError(
            f"{_WHO}: mesh= needs a fixed budget (rtol=None, atol=None): the adaptive rule "
            "sizes each block from all samples so far, which the probe groups do not share. "
            "Pass max_matvecs as the number of probes"
        )
    mesh.check_operator(sess.A, _WHO)


def _hutchinson_mesh(sess: Session, m: int, mesh: Mesh) -> _Outcome:
    """Fixed-budget Hutchinson over a mesh: this probe group's share of the m probe
    indices (keyed draws, :attr:`Session.key`), the samples ``[m]`` all-gathered in probe
    order: the samples of one process running all m probes with ``mesh=Mesh()``."""
    share = mesh.share(m, _WHO)
    sess.key = share.start
    with mesh.barrier(f"{_WHO}'s probes"):
        mine = _hutchinson_block(sess, len(share), None)
    samples = mesh.gather_rows(mine[:, None], m, "the Hutchinson samples")[:, 0]
    mean, err = mean_stderr(samples)
    return mean, err, m, Status.FIXED_BUDGET


def _dots(sess: Session, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Row dot products ``[k]`` float64 on the CPU: local sums, or summed over the ranks
    (:func:`hessfast.linop.row_dots`) when the operator's vectors are sharded."""
    if sess.A.shards is not None:
        return row_dots(sess.A, X, Y)
    return local_dots(X, Y).cpu()


def _hutchinson_block(sess: Session, k: int, Q: torch.Tensor | None) -> torch.Tensor:
    """k samples ``z^T A z`` (or of the deflated operator with ``z <- (I - QQ^T) z``),
    float64; probes are drawn per ``matmat`` chunk so memory stays ``chunk_size x n``."""
    return _QuadForms(sess, Q).draw(k).samples


class _QuadForms:
    """Samples ``z^T B z`` of ``B = P A P`` (``P = I - QQ^T``, or ``I`` without ``Q``) with
    what the closed-form variance needs, at no extra product: per sample ``||B z||^2`` and,
    for Rademacher probes, ``d = z * (B z)`` summed over samples (``[n]``, in the working
    dtype: its rounding, about ``eps ||B||_F^2`` in the variance, is far below the plug-in's
    own spread; a float64 sum was two parameter-sized vectors, 1.4 GB at GPT-2 medium).

    ``Var(z^T B z) = 2 (||B||_F^2 - sum_j b_jj^2)`` for Rademacher probes (``2 ||B||_F^2`` for
    Gaussian ones); ``E ||B z||^2 = ||B||_F^2`` and ``E[d_j d'_j] = b_jj^2`` for two independent
    probes, so :meth:`stderr` has an unbiased plug-in of the exact variance. Each sample adds
    an n-vector of information to it, where the sample variance of the scalars sees one
    number per probe: with few probes on a spectrum dominated by a few eigenvalues (skewed,
    chi-square-like samples) the sample variance is too often small, and the t interval
    covered 91-92% at 30 probes (PSD 1/i^2, n = 400; 1/i^1.2 at n = 100)."""

    def __init__(self, sess: Session, Q: torch.Tensor | None) -> None:
        self.sess = sess
        self.Q = Q if Q is not None and Q.shape[0] else None
        self.samples = torch.zeros(0, dtype=torch.float64)
        self.fro = torch.zeros(0, dtype=torch.float64)
        self.dsum = torch.zeros(sess.n, dtype=sess.work, device=sess.device)
        self.dsq = 0.0

    def draw(self, k: int) -> _QuadForms:
        sess, Q = self.sess, self.Q
        out, fro = [self.samples], [self.fro]
        for size in sess.chunks(k):
            Z = sess.probes(size)
            G = Z.clone() if Q is not None else Z
            if Q is not None:
                ops.basis_update(Q, ops.basis_dot(Q, G), G)  # G -= (G Q^T) Q: one CGS pass
            AG = sess.apply_block(G)
            out.append(_dots(sess, G, AG))
            if Q is not None:
                ops.basis_update(Q, ops.basis_dot(Q, AG), AG)  # B z = P A P z
            fro.append(_dots(sess, AG, AG))
            if sess.probe == "rademacher":
                # z_j = +-1 exactly, so ||z * Bz||^2 = ||Bz||^2, already in ``fro``; and
                # dsum += z * Bz in place, with no [n] temporary
                self.dsq += float(fro[-1].sum())
                for z, ag in zip(Z, AG, strict=True):
                    self.dsum.addcmul_(z, ag)
        self.samples, self.fro = torch.cat(out), torch.cat(fro)
        return self

    def stderr(self) -> tuple[float, float]:
        """``(mean, stderr)``: the larger of the sample standard error and the closed-form
        plug-in ``sqrt(2 (mean ||Bz||^2 - est. sum b_jj^2) / m)`` (the larger, so that a
        slightly non-symmetric operator, where the closed form does not hold, is still
        covered by the sample spread); inf for one sample."""
        mean, err = mean_stderr(self.samples)
        m = self.samples.numel()
        if m < 2:
            return mean, err
        diag2 = 0.0
        if self.sess.probe == "rademacher":  # U-statistic over pairs of probes
            dd = float(_dots(self.sess, self.dsum[None], self.dsum[None])[0])
            diag2 = (dd - self.dsq) / (m * (m - 1))
        plug = 2.0 * max(float(self.fro.mean()) - diag2, 0.0) / m
        return mean, max(err, math.sqrt(plug))


def _hutchinson(sess: Session, m: int, hutchpp: bool, stop: _Stop | None) -> _Outcome:
    """Hutchinson, or Hutch++ (a third of the budget sketches ``Q = orth(A S)``; the exact
    ``tr(Q^T A Q)`` plus Hutchinson on the deflated operator). Adaptive: :func:`_two_stage`
    over the (deflated) samples."""
    offset, Q = 0.0, None
    if hutchpp:
        Q, _ = orth_rows(sess.apply(sess.probes(m // 3)))
        offset = float((Q * sess.apply(Q)).sum(dtype=torch.float64))
    remaining = m - sess.matvecs
    if stop is None:
        mean, err = _QuadForms(sess, Q).draw(remaining).stderr()
        return offset + mean, err, remaining, Status.FIXED_BUDGET

    def block(count: int) -> tuple[float, float, int]:
        mean, err = _QuadForms(sess, Q).draw(count).stderr()
        return offset + mean, err, count

    return _two_stage(block, stop, remaining, 1, _RATE["hutch++" if hutchpp else "hutchinson"])


def _xtrace(sess: Session, m: int, stop: _Stop | None) -> _Outcome:
    """XTrace with ``k = m // 2`` probes; adaptively, :func:`_two_stage` over fresh XTrace
    runs (each a new basis: 2 products per probe)."""

    def block(k: int) -> tuple[float, float, int]:
        st = Exchangeable(sess)
        st.grow(k)
        return float(xtrace_estimates(st).mean()), xtrace_jackknife_stderr(st), k

    if stop is None:
        mean, err, k = block(m // 2)
        return mean, err, k, Status.FIXED_BUDGET
    return _two_stage(block, stop, m - sess.matvecs, 2, _RATE["xtrace"], measure=True)


def _two_stage(
    block: Callable[[int], tuple[float, float, int]], stop: _Stop, budget: int, cost: int,
    rate: float, measure: bool = False,
) -> _Outcome:
    """The adaptive rule, built to survive optional stopping (Stein's two-stage idea).

    ``block(count)`` draws ``count`` FRESH samples (``cost`` products each) and returns
    ``(estimate, stderr, count)`` from them alone. A pilot of ``min_samples`` plans the size
    of the next block (:meth:`_Stop.plan`); that block is drawn fresh and its own estimate
    and t interval are the answer, so the size is independent of the samples behind the
    interval: the interval is a fixed-size one and covers at its level, and the estimate
    stays unbiased. Only if that block's interval misses the target does it become the
    pilot of one more fresh block (the planned size carries a ``_MARGIN`` so this is rare).
    ``rate``: the assumed decay ``stderr ~ 1/count^rate``; ``measure``: replace it by the
    rate measured between the last two blocks (clamped to [1/2, 1]; XTrace).

    Cost: the pilot (``min_samples``) and the margin on top of what the old sequential rule
    spent; the old rule stopped as soon as a running interval looked narrow, which is
    optional stopping (77-88% coverage of a nominal 95% at rtol=0.05)."""
    left = budget // cost
    count = min(stop.min_samples, left)
    est, err, count = block(count)
    left -= count
    prev: tuple[int, float] | None = None
    while True:
        if left <= 0:
            return est, err, count, Status.MAX_MATVECS
        if prev is not None and measure and err > 0 and prev[1] > err and count > prev[0]:
            measured = math.log(prev[1] / err) / math.log(count / prev[0])
            rate = min(max(measured, 0.5), 1.0)
        want = stop.plan(count, err, est, rate, left)
        prev = (count, err)
        est, err, count = block(want)
        left -= count
        if stop.met(est, err, count):
            return est, err, count, Status.CONVERGED
