"""The entry point :func:`spectral_density` (validation, probes, dispatch to SLQ or KPM) and
:func:`draw_probes`, the probes it uses."""

from __future__ import annotations

import functools
import os
import time
import warnings
from contextlib import nullcontext
from typing import Any

import torch

from .._checks import (
    PROBES,
    Products,
    as_operator,
    check_basis_device,
    check_basis_dtype,
    check_choice,
    check_int,
    check_seed,
    check_start_vectors,
    keyed_probes,
    probe_generator,
    sample_probes,
    unit_rows,
    work_dtype,
)
from .._digest import tensor_digest
from .._probe import probe_operator
from ..distributed import Mesh
from ..errors import ConfigurationError
from ..lanczos.checkpoint import Checkpoint
from ..lanczos.lean import sharded_generator
from ..lanczos.probes import REORTHS
from ..linop import LinearOperator, refuse_sharded, row_dots
from ..memory import KRYLOV, choose_basis, full_basis_fits
from ..progress import set_total, track
from ..results import Status
from .kpm import KPM_BOUND_STEPS, kpm
from .result import SpectralDensity, few_steps_message
from .slq import LEAN_GROUP, gather_slq, slq_group_size, slq_grouped

__all__ = ["MAX_PRODUCTS", "METHODS", "draw_probes", "spectral_density"]

METHODS = ("slq", "kpm")
_WHO = "spectral_density"

#: :func:`spectral_density` warns before a run that plans more products with the operator
#: than this (SLQ: probes x steps; KPM: the bounds' Lanczos steps plus probes x passes);
#: ``max_products=`` raises it for one call. For a model operator each product is a pass
#: over its data; for a small matrix the dense eigendecomposition is exact anyway.
MAX_PRODUCTS = 100_000
# the dense alternative is suggested when the n x n float64 matrix takes at most this
DENSE_HINT_BYTES = 2**31


def draw_probes(
    n: int,
    num_probes: int,
    *,
    seed: int = 0,
    probe: str = "rademacher",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The unit probes :func:`spectral_density` uses: ``[num_probes, n]``, rows of norm 1.

    ``"rademacher"``: entries ``+-1/sqrt(n)``; ``"gaussian"``: normalised standard normal rows
    (uniform on the sphere). Both satisfy ``E[u u^T] = I / n``, so ``n u^T A u`` is an unbiased
    estimate of ``tr(A)`` (Hutchinson with ``z = sqrt(n) u``). Drawn and normalised on the CPU
    in float64 from a private generator seeded with ``seed`` (the global RNG is untouched),
    then cast to ``dtype`` and moved to ``device``: the values depend on
    (seed, n, num_probes, probe, dtype), not on the device.
    """
    check_choice("probe", probe, PROBES, who="draw_probes")
    Z = sample_probes(probe_generator(seed), num_probes, n, probe)
    Z = Z / torch.linalg.vector_norm(Z, dim=1, keepdim=True)
    return Z.to(device=device, dtype=dtype)


def spectral_density(
    A: LinearOperator,
    num_probes: int = 8,
    num_steps: int = 64,
    *,
    method: str = "slq",
    seed: int = 0,
    probe: str = "rademacher",
    reorth: str = "full",
    basis_dtype: torch.dtype | None = None,
    num_moments: int | None = None,
    v0: torch.Tensor | None = None,
    basis_device: torch.device | str | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | float | None = None,
    mesh: Mesh | None = None,
    progress: bool | None = None,
    max_products: int | None = None,
    krylov: str = "auto",
) -> SpectralDensity:
    """Estimate the spectral density of a symmetric operator by SLQ or KPM.

    Args:
        A: symmetric :class:`~hessfast.linop.LinearOperator` ``[n, n]``, ``n >= 1`` (a dense
            square tensor is wrapped with :meth:`LinearOperator.from_matrix`).
        num_probes: P >= 1 random probes, advanced together (one ``A.matmat`` of ``[P, n]``
            per step). SLQ with more probes than fit in 256 MB (and more than 64) runs them in
            groups, so memory does not grow with P (passes: ``m`` per group).
        num_steps: SLQ: Lanczos steps per probe, m >= 1 (clipped to ``n``: the rule is then
            exact). Data passes: ``m``. KPM: sets the default ``num_moments = 2 m``.
        method: ``"slq"`` (stochastic Lanczos quadrature) or ``"kpm"`` (kernel polynomial
            method with Jackson damping).
        seed: seed of the private generator that draws the probes (:func:`draw_probes`).
        probe: ``"rademacher"`` or ``"gaussian"`` (normalised: uniform on the sphere).
        reorth: ``"full"`` (each probe's new vector is reorthogonalised against its whole
            basis; memory ``P m n`` in ``basis_dtype``) or ``"none"`` (plain three-term
            recurrence: cheaper, but lost orthogonality produces ghost Ritz values that
            distort the weights). Only SLQ stores a basis.
        basis_dtype: storage dtype of the Lanczos basis (``torch.float64``, ``float32``,
            ``bfloat16``, ``float16``); default: the working dtype (float64 for a float64
            operator, else float32), or the memory plan's choice when that does not fit
            (:func:`hessfast.estimate_memory`: float32, bfloat16, then the host, with a
            warning; nothing fitting raises ``OutOfMemoryPlanError``). Coefficients and
            current vectors stay in the working dtype.
        num_moments: KPM: Chebyshev moments M >= 1 (default ``2 num_steps``). The doubling
            ``mu_{2k} = 2 <T_k u, T_k u> - mu_0``, ``mu_{2k+1} = 2 <T_{k+1} u, T_k u> - mu_1``
            gives them in ``ceil((M - 1)/2)`` data passes, plus ``min(n, 10)`` Lanczos passes
            for the bounds.
        v0: optional start vectors ``[P, n]`` (or one ``[n]``) instead of random probes (rows
            are normalised); overrides ``num_probes``, ``seed`` and ``probe``. The name is
            :func:`hessfast.eigsh`'s.
        basis_device: where the SLQ bases live, e.g. ``"cpu"`` for a CUDA operator
            (default: the operator's device, or the memory plan's choice).
        checkpoint: SLQ only: a file path; the run saves its state there every
            ``checkpoint_every`` and at once on Ctrl-C or SIGTERM, and resumes from it when
            called again with the same operator and arguments (the uninterrupted result,
            with a warning and ``resumed_from_step``); a file made by another run is refused
            naming the difference (:mod:`hessfast.lanczos.checkpoint`).
        checkpoint_every: how often the ``checkpoint`` file is written: an int counts
            steps, a float seconds (default 60.0 seconds).
        mesh: SLQ only: a :class:`hessfast.distributed.Mesh` (probe x data). ``A`` must be
            built with ``process_group=mesh.data_group``; each probe group runs a contiguous
            share of the probe indices (at least one each) and the nodes, weights and steps
            are all-gathered over the probe groups, so every rank returns the result of one
            process on all the data with ``mesh=Mesh()``. Probe ``i`` is drawn from its own
            generator keyed by ``(seed, i)`` (other probes than without ``mesh=``); ``v0``
            rows are split the same way. ``num_matvecs`` counts every group's products,
            ``num_passes`` this group's. No ``checkpoint`` with a mesh.
        progress: a progress bar of products on stderr (total: the planned count, this
            process's share under a mesh); None: when stderr is a terminal.
        max_products: the planned products (SLQ: ``num_probes x min(num_steps, n)``; KPM:
            ``min(n, 10) + num_probes x ceil((M - 1) / 2)``; this process's share
            under a mesh) above which a UserWarning, before any product, gives the count
            and how to lower it (default :data:`MAX_PRODUCTS` = 100,000). The run goes on:
            pass a larger value to run a large budget without the warning. Past ``n``
            products the dense path (``torch.linalg.eigvalsh(A.to_dense())``, n products)
            is exact and, where the matrix fits in memory, cheaper.
        krylov: SLQ's memory mode. ``"full"``: the probes' bases as ``reorth`` says (today's
            path). ``"lean"``: the plain three-term recurrence (``reorth="none"``) with the
            probes streamed one at a time, so memory is a few parameter-sized vectors
            whatever ``num_probes`` and ``num_steps`` (the passes are ``num_probes x m``
            instead of ``m``; the Gauss rule's accuracy is in :mod:`hessfast.density.slq`).
            ``"auto"`` (default): ``"full"`` when its basis fits the memory plan in the
            default storage within a quarter of the capacity
            (``memory.AUTO_BASIS_FRACTION``), else ``"lean"`` with a ``UserWarning``
            (instead of a bf16/host
            basis or ``OutOfMemoryPlanError``); a given ``basis_dtype``, ``basis_device`` or
            ``reorth="none"`` keeps the full path. An operator whose vectors are sharded over
            ranks (``A.shards``, an FSDP model) runs ``"lean"`` only (``"auto"`` picks it):
            its probes are drawn per rank from a generator keyed by ``(seed, rank)`` (the
            density then depends on the world size) and ``v0`` rows are local shards. KPM
            is refused on sharded vectors. The mode that ran is ``result.krylov``.

    Returns:
        :class:`SpectralDensity` with ``status`` ``FIXED_BUDGET`` (the steps or moments asked
        for were computed; there is no stopping test) or ``OUT_OF_BOUNDS`` for a KPM run whose
        bounds kept failing, with a warning.

    Raises:
        ConfigurationError: a bad argument (named in the message).
        NonFiniteError: the operator returned NaN or Inf, or ``v0`` contains them.
    """
    with track(A, "spectral_density", enabled=progress):
        t0 = time.perf_counter()
        A = as_operator(A, _WHO, allow_empty=False)
        check_choice("method", method, METHODS, who=_WHO)
        check_choice("probe", probe, PROBES, who=_WHO)
        check_choice("reorth", reorth, REORTHS, who=_WHO)
        check_choice("krylov", krylov, KRYLOV, who=_WHO)
        sharded = A.shards is not None
        if sharded:
            instead = ("On sharded vectors spectral_density runs method='slq' with "
                       "krylov='lean' (the default 'auto' picks it).")
            if method != "slq" or krylov == "full":
                refuse_sharded(A, f"{_WHO}(method={method!r}, krylov={krylov!r})", instead)
            if mesh is not None:
                refuse_sharded(A, f"{_WHO}(mesh=...)", instead)
        num_probes = check_int("num_probes", num_probes, 1, who=_WHO)
        num_steps = check_int("num_steps", num_steps, 1, who=_WHO)
        if max_products is not None:
            max_products = check_int("max_products", max_products, 1, who=_WHO)
        seed = check_seed(seed, who=_WHO)
        work = work_dtype(A.dtype)
        bdtype = check_basis_dtype(basis_dtype, work, who=_WHO)
        bdev = check_basis_device(basis_device, who=_WHO)
        if num_moments is not None:
            if method != "kpm":
                raise ConfigurationError(
                    f"{_WHO}: num_moments applies to method='kpm' only; drop it or pass "
                    "method='kpm'"
                )
            num_moments = check_int("num_moments", num_moments, 1, who=_WHO)
        if mesh is not None:
            mesh = Mesh.checked(mesh, _WHO)
            if method != "slq" or checkpoint is not None:
                raise ConfigurationError(
                    f"{_WHO}: mesh= runs method='slq' without checkpoint= only (KPM's bounds and "
                    "moments are not split over probe groups, and one checkpoint file cannot "
                    "hold every group's state); drop mesh=, or use SLQ without a checkpoint"
                )
            mesh.check_operator(A, _WHO)
        n = A.shape[0]
        probe_name = probe
        total = num_probes if v0 is None else check_start_vectors(v0, n, who=_WHO).shape[0]
        share = range(total) if mesh is None else mesh.share(total, _WHO)
        m = min(num_steps, n)
        if method == "slq":
            planned = len(share) * m
        else:  # the bounds' Lanczos steps, then the doubling passes of all probes (kpm's
            # K = M // 2; the progress total had one pass too many per probe)
            M_planned = num_moments if num_moments is not None else 2 * num_steps
            planned = min(n, KPM_BOUND_STEPS) + len(share) * (M_planned // 2)
        _warn_products(planned, len(share), m, n, method, max_products)  # before any work
        pin = False
        mode = "lean" if method == "kpm" or sharded or krylov == "lean" else "full"
        if (method == "slq" and krylov == "auto" and mode == "full" and basis_dtype is None
                and bdev is None and reorth == "full"):
            fits, why = full_basis_fits(A, "slq", num_steps=m, num_probes=len(share),
                                        reorth=reorth)
            if not fits:
                warnings.warn(
                    f"hessfast: {_WHO}: the SLQ bases ({len(share)} probes x {m} steps of "
                    f"n={n:,}) are not kept ({why}); running krylov='lean' instead (the plain "
                    "recurrence, probes one at a time: a few vectors of memory, "
                    f"{len(share)} x {m} passes). Pass krylov='full' with basis_dtype / "
                    "basis_device to keep the bases",
                    UserWarning, stacklevel=3)
                mode = "lean"
        lean = method == "slq" and mode == "lean"
        if lean:
            reorth = "none"  # the plain recurrence; no basis to plan
        if method == "slq" and not lean:
            given = None if basis_dtype is None else bdtype
            chosen, bdev, pin = choose_basis(A, "slq", given, bdev, _WHO, num_steps=m,
                                             num_probes=len(share), reorth=reorth)
            bdtype = chosen or bdtype
        elif method != "slq" and checkpoint is not None:
            raise ConfigurationError(f"{_WHO}: checkpoint applies to method='slq' only; drop it")
        group = LEAN_GROUP if lean else slq_group_size(n, m, reorth, work, bdtype)
        probe_operator(A, _WHO, agree_only=True)  # ranks agree before a checkpoint's collective
        ckpt = None if checkpoint is None else Checkpoint(checkpoint, "slq", dict(
            n=n, dtype=str(A.dtype), num_probes=num_probes, num_steps=m, seed=seed, probe=probe,
            reorth=reorth, basis_dtype=str(bdtype), group=group, v0=tensor_digest(v0),
        ), checkpoint_every, _WHO, operator=A)
        Z: torch.Tensor | None = None
        raw: torch.Tensor | None = None  # lean v0: normalised a row at a time
        if v0 is not None and lean:
            raw = check_start_vectors(v0, n, who=_WHO)[share.start : share.stop]
            probe_name = "given"
        elif v0 is not None:
            Z = _start_vectors(v0, n, work, A.device)[share.start : share.stop]
            probe_name = "given"
        elif mesh is None and (method == "kpm" or num_probes <= group):
            Z = draw_probes(n, num_probes, seed=seed, probe=probe, dtype=work, device=A.device)
        set_total(planned)
        probe_operator(A, _WHO)

        products = Products(A, work, _WHO)
        barrier = nullcontext() if mesh is None else mesh.barrier(f"{_WHO}'s probes")
        guard = nullcontext() if ckpt is None else ckpt.guard()  # saves on Ctrl-C / SIGTERM
        with torch.no_grad(), barrier, guard:
            if method == "slq":  # many probes: streamed in groups, memory bounded
                gen = probe_generator(seed) if Z is None and mesh is None else None
                if sharded and raw is None:  # each rank its own slice of every probe
                    gen = sharded_generator(A, seed)
                key = [share.start]  # mesh: the next probe index, drawn from its keyed generator

                def draw(count: int) -> torch.Tensor:
                    if Z is not None:
                        return Z
                    if raw is not None:  # lean v0: these rows, normalised (global norms)
                        G = raw[key[0] - share.start : key[0] - share.start + count].double()
                        key[0] += count
                        return _unit(A, G).to(device=A.device, dtype=work)
                    if gen is None:
                        G = keyed_probes(seed, range(key[0], key[0] + count), n, probe)
                        key[0] += count
                    else:
                        G = sample_probes(gen, count, n, probe)
                    # in place: the float64 draw is already two vectors' worth per probe
                    G = _unit(A, G) if sharded else G.div_(torch.linalg.vector_norm(
                        G, dim=1, keepdim=True))
                    return G.to(device=A.device, dtype=work)

                extra = dict(dots=functools.partial(row_dots, A)) if lean else {}
                fields = slq_grouped(products, draw, len(share) if Z is None else Z.shape[0],
                                     m, reorth, bdtype, group if Z is None else Z.shape[0],
                                     gen=gen, checkpoint=ckpt, basis_device=bdev,
                                     pin_memory=pin, **extra)
            else:
                M = num_moments if num_moments is not None else 2 * num_steps
                fields = kpm(products, Z, M, bdtype)
        if mesh is not None:
            fields = gather_slq(fields, mesh, total)
        result = SpectralDensity(
            method=method,
            n=n,
            probe=probe_name,
            seed=seed,
            num_matvecs=fields.pop("num_matvecs", products.num_matvecs),
            num_passes=products.num_passes,
            converged=fields["status"] != Status.OUT_OF_BOUNDS,
            seconds=time.perf_counter() - t0,
            resumed_from_step=None if ckpt is None else ckpt.resumed_from_step,
            steps_taken=fields.pop("steps"),  # the runs' (and checkpoints') name for it
            krylov=mode,
            **fields,
        )
    if not result.resolved:  # after the run: a probe whose Krylov space ran out is exact
        warnings.warn(few_steps_message(result.num_steps, n), UserWarning, stacklevel=2)
    return result


def _warn_products(
    planned: int, probes: int, m: int, n: int, method: str, max_products: int | None
) -> None:
    """Warn, before the first product, when the run plans more than ``max_products``
    (default :data:`MAX_PRODUCTS`) products: the count and how to lower it."""
    bound = MAX_PRODUCTS if max_products is None else max_products
    if planned <= bound:
        return
    shape = f"{probes:,} probes x {m} steps" if method == "slq" else f"{probes:,} probes"
    dense = (
        f" n = {n:,} products give the whole matrix: torch.linalg.eigvalsh(A.to_dense()) is "
        f"its exact spectrum ({planned / n:.3g}x fewer products)."
        if planned > n and n * n * 8 <= DENSE_HINT_BYTES
        else ""
    )
    warnings.warn(
        f"hessfast: spectral_density(method={method!r}) plans {planned:,} products with the "
        f"operator ({shape}), more than max_products={bound:,}; each product is a pass over "
        f"the data for a model operator.{dense} The density's probe error falls only like "
        "1/sqrt(num_probes): 8-100 probes and 64-256 steps are typical. Lower num_probes "
        "or num_steps, or pass max_products= to run this budget without the warning",
        stacklevel=3,
    )


def _unit(A: LinearOperator, G: torch.Tensor) -> torch.Tensor:
    """Rows of ``G [c, n]`` (float64) scaled to global norm 1 (:func:`row_dots`: summed over
    the ranks when ``A``'s vectors are sharded); a zero row is refused."""
    nz = row_dots(A, G, G).to(G.device)
    if bool((nz <= 0).any()) or not bool(torch.isfinite(nz).all()):
        raise ConfigurationError(f"{_WHO}: a probe / v0 row is zero or not finite; every "
                                 "vector must be nonzero and finite")
    return G / nz.sqrt()[:, None]


def _start_vectors(v0: Any, n: int, work: torch.dtype, device: torch.device) -> torch.Tensor:
    """``v0`` as unit rows ``[P, n]`` in the working dtype on the operator's device."""
    Z = check_start_vectors(v0, n, who=_WHO).to(device=device, dtype=work)
    return unit_rows(Z, "v0", who=_WHO)
