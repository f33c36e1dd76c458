"""Stochastic Lanczos quadrature: each probe's ``m``-point Gauss rule from its Lanczos
tridiagonal ``T_m = S diag(theta) S^T`` (nodes ``theta_j``, weights ``S[0, j]^2``). The
recurrences run in :func:`hessfast.lanczos.probes.probe_lanczos`.

Lean SLQ (``spectral_density(krylov="lean")``): the plain three-term recurrence
(``reorth="none"``) with the probes streamed one at a time (:data:`LEAN_GROUP`), so memory is
the probe, ``q_prev``, ``q`` and ``w`` (plus the product's output) whatever ``num_probes``
and ``num_steps``; dot products through :func:`hessfast.linop.row_dots` (sharded vectors
work). Why the density stays right: in finite precision the computed ``T_m`` is, to
rounding, the exact Lanczos tridiagonal of a larger matrix whose eigenvalues cluster at A's
(Greenbaum), so the Gauss rule integrates polynomials of degree ``< 2m`` against a measure
close to the probe's spectral measure; lost orthogonality makes ghost copies of converged
nodes, and those copies SHARE the weight of the one node they copy (they split the same
eigenvector's component of the probe), so they change the nodes, not the measure.

Measured (tests/density/test_lean_slq.py; W1 of the quadrature measures averaged over 8
Gaussian probes, divided by the spectral width; the same probes for lean and full):

==================  ===  ===========  ===========  ==========
spectrum (n)        m    lean-exact   full-exact   lean-full
==================  ===  ===========  ===========  ==========
evenly spaced 300   50   1.1e-02      1.1e-02      3.4e-16
evenly spaced 300   150  1.0e-02      1.0e-02      7.2e-04
clustered 300       150  2.5e-03      2.5e-03      4.2e-17
geometric 300       50   4.1e-03      4.0e-03      1.2e-04
geometric 300       150  4.0e-03      4.0e-03      8.0e-06
negative-dom. 300   150  1.0e-02      1.0e-02      6.3e-04
two values 300      150  1.3e-02      1.3e-02      2.4e-16
MLP Hessian 199     50   6.1e-03      6.4e-03      3.3e-03
MLP Hessian 199     120  5.7e-03      5.7e-03      3.8e-04
==================  ===  ===========  ===========  ==========

(the MLP: ``make_mlp(d_in=8, hidden=14)``, its dense float64 Hessian by double backward;
n = 400 and a 259-parameter MLP gave the same picture: lean-full <= 2.4e-3). The distance to
the exact spectrum is the probes' sampling error, the same with or without
reorthogonalisation; lean and full differ by less than a tenth of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .._checks import STREAM_BYTES
from ..lanczos.checkpoint import Checkpoint
from ..lanczos.probes import probe_lanczos
from ..results import Status
from .result import slq_sigma

if TYPE_CHECKING:
    from ..distributed import Mesh

__all__ = ["GROUP_BYTES", "LEAN_GROUP", "MIN_GROUP", "gather_slq", "slq", "slq_group_size",
           "slq_grouped"]

#: Probes advance together (one product per step for all of them) unless their memory (bases
#: and recurrence vectors) exceeds this: then they run in groups of this size...
GROUP_BYTES = STREAM_BYTES
#: ...but never in groups of fewer probes than this (ordinary runs are one group).
MIN_GROUP = 64
#: ``krylov="lean"``: probes one at a time (memory: a few vectors whatever P and m)
LEAN_GROUP = 1


def slq(
    products: Callable[[torch.Tensor], torch.Tensor],
    Z: torch.Tensor | list[torch.Tensor],
    m: int,
    reorth: str,
    bdtype: torch.dtype,
    **lanczos: Any,
) -> dict[str, Any]:
    """SLQ from the unit probes ``Z: [P, n]`` with ``m <= n`` steps: the fields of
    :class:`SpectralDensity` (nodes and weights ``[P, m]``, padded after a breakdown).
    ``Z`` may be a list holding the probes, handed on to :func:`probe_lanczos`, which takes
    them out of it (the caller's reference is dropped). ``lanczos``: basis_device,
    pin_memory, save, resume of :func:`probe_lanczos`."""
    P = (Z[0] if isinstance(Z, list) else Z).shape[0]
    tri = probe_lanczos(products, Z, m, reorth=reorth, basis_dtype=bdtype, **lanczos)
    nodes = torch.empty((P, m), dtype=torch.float64)
    weights = torch.zeros((P, m), dtype=torch.float64)
    lo, hi = math.inf, -math.inf
    for p in range(P):
        theta, w, resid = tri.gauss(p)
        k = theta.numel()
        nodes[p, :k] = theta
        nodes[p, k:] = theta[-1]
        weights[p, :k] = w
        lo = min(lo, float((theta - resid).min()))
        hi = max(hi, float((theta + resid).max()))
    bounds = (lo, hi)
    return dict(
        nodes=nodes,
        weights=weights,
        trace_weights=weights,
        num_steps=m,
        steps=tri.steps.clone(),
        bounds=bounds,
        default_sigma=slq_sigma(bounds, m),
        status=Status.FIXED_BUDGET,  # a fixed number of steps, no stopping test
    )


def slq_group_size(n: int, m: int, reorth: str, work: torch.dtype, bdtype: torch.dtype) -> int:
    """Probes per group: ``GROUP_BYTES`` of per-probe memory (4 working vectors, plus the
    ``m``-row basis with ``reorth="full"``), at least ``MIN_GROUP``."""
    wbytes = torch.finfo(work).bits // 8
    bbytes = torch.finfo(bdtype).bits // 8 if reorth == "full" else 0
    per_probe = max(n, 1) * (4 * wbytes + m * bbytes)
    return max(MIN_GROUP, GROUP_BYTES // per_probe)


def slq_grouped(
    products: Callable[[torch.Tensor], torch.Tensor],
    draw: Callable[[int], torch.Tensor],
    P: int,
    m: int,
    reorth: str,
    bdtype: torch.dtype,
    group: int,
    *,
    gen: torch.Generator | None = None,
    checkpoint: Checkpoint | None = None,
    **lanczos: Any,
) -> dict[str, Any]:
    """:func:`slq` on ``P`` probes drawn ``group`` at a time by ``draw(count) -> [count, n]``
    (unit rows): memory stays one group's whatever ``P``; the fields are those of one run on
    all probes (nodes and weights ``[P, m]``), at ``ceil(P / group)`` times the passes.

    With a ``checkpoint`` the state (finished groups, ``gen``'s state before the current
    group's draw, its Lanczos state, the product counters of ``products``) is kept at every
    step, saved when due or on an interrupt (:meth:`Checkpoint.guard` around the call), and a
    saved state is resumed: the current group is drawn again from the saved
    generator state, so the result is the uninterrupted one."""
    saved = checkpoint.load() if checkpoint is not None else None
    parts = [dict(f, status=Status(f["status"])) for f in saved["parts"]] if saved else []
    if saved:
        products.num_matvecs, products.num_passes = saved["used"], saved["passes"]
    for start in range(saved["start"] if saved else 0, P, group):
        resume = saved["probe"] if saved and start == saved["start"] else None
        if resume is not None and gen is not None:
            gen.set_state(saved["gen"])
        g_state = gen.get_state() if gen is not None else None

        def save(state: dict[str, Any], start: int = start, g: Any = g_state) -> None:
            assert checkpoint is not None
            done = [dict(f, status=str(f["status"].value)) for f in parts]
            checkpoint.top(lambda: dict(parts=done, start=start, gen=g, probe=state,
                                        used=products.num_matvecs, passes=products.num_passes))

        # handed over in a list: the probes are freed once the recurrence is past them
        parts.append(slq(products, [draw(min(group, P - start))], m, reorth, bdtype,
                         resume=resume,
                         save=None if checkpoint is None else save, **lanczos))
    if len(parts) == 1:
        return parts[0]
    out = dict(parts[0])
    for key in ("nodes", "weights", "steps"):
        out[key] = torch.cat([f[key] for f in parts])
    out["trace_weights"] = out["weights"]
    bounds = (min(f["bounds"][0] for f in parts), max(f["bounds"][1] for f in parts))
    out["bounds"] = bounds
    out["default_sigma"] = slq_sigma(bounds, m)
    return out


def gather_slq(fields: dict[str, Any], mesh: Mesh, num: int) -> dict[str, Any]:
    """A probe group's :func:`slq_grouped` fields (its ``[p, m]`` share of the probes) to
    those of all ``num`` probes, on every rank: nodes, weights, steps and each group's
    bounds travel as one ``[p, 2m + 3]`` float64 block in ONE all-gather over the probe
    dimension (:meth:`Mesh.gather_rows`); the bounds are the extremes over all groups and
    ``num_matvecs`` the products of all groups (one per probe step: ``steps.sum()``)."""
    m = fields["num_steps"]
    lo, hi = fields["bounds"]
    p = fields["nodes"].shape[0]
    rows = torch.cat([fields["nodes"], fields["weights"], fields["steps"].double()[:, None],
                      torch.tensor([[lo, hi]], dtype=torch.float64).expand(p, 2)], dim=1)
    every = mesh.gather_rows(rows, num, "the SLQ nodes and weights").cpu()
    out = dict(fields)
    out["nodes"], out["weights"] = every[:, :m].contiguous(), every[:, m : 2 * m].contiguous()
    out["trace_weights"] = out["weights"]
    out["steps"] = every[:, 2 * m].to(torch.int64)
    bounds = (float(every[:, 2 * m + 1].min()), float(every[:, 2 * m + 2].max()))
    out["bounds"] = bounds
    out["default_sigma"] = slq_sigma(bounds, m)
    out["num_matvecs"] = int(out["steps"].sum())
    return out
