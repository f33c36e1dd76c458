"""Several processes: hessfast's collectives, process-group helpers and the probe x data mesh.

The public face of the package; the work is done in two modules, imported downward:

* :mod:`.comm`: every collective hessfast runs (:class:`Comm`: one flat all-reduce of a block
  product, the error barrier, agreement digests, sharded-vector gathers), the process-group
  helpers and the shard arithmetic;
* :mod:`.mesh`: :class:`Mesh`, the ``probe x data`` layout of probe-parallel SLQ and
  Hutchinson, built on :class:`Comm`;
* :mod:`._gloo_settle` (private, used by :mod:`.comm` only): collectives that leave no buffer
  with gloo's worker thread when the process exits.

Timeouts are the process group's (``init_process_group(timeout=...)``; torch's default is
30 minutes for gloo and 10 for NCCL). A rank waits at the barrier for the slowest rank's
pass over its shard, so the timeout must exceed one pass over the largest shard. A rank
that never arrives (it crashed, or only some ranks build the operator) ends in a
:class:`~hessfast.errors.DistributedError` after that timeout, never in a hang.

Probe parallelism: :class:`Mesh` lays the ranks out as ``probe x data``; each probe group
builds its operator over :attr:`Mesh.data_group`, runs its share of the SLQ or Hutchinson
probes and the per-probe results are all-gathered over :attr:`Mesh.probe_group` at the end.

Helpers: :func:`init` (from torchrun's environment), :func:`shutdown` (tear the process
group down, also after a caught error), :func:`session` (``init`` and ``shutdown`` as a
context manager), :func:`is_initialized`, :func:`world_size`, :func:`rank`,
:func:`is_main_process` (rank 0, or no process group: where to print and write).
"""

from __future__ import annotations

from .comm import (
    SHARD_ALIGN,
    Comm,
    init,
    is_initialized,
    is_main_process,
    rank,
    session,
    shard_bounds,
    shard_size,
    shutdown,
    world_size,
)
from .mesh import Mesh

__all__ = [
    "SHARD_ALIGN",
    "Comm",
    "Mesh",
    "init",
    "is_initialized",
    "is_main_process",
    "rank",
    "session",
    "shard_bounds",
    "shard_size",
    "shutdown",
    "world_size",
]
