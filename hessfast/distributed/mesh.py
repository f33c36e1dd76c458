"""The probe x data mesh of probe-parallel SLQ and Hutchinson, exported as
:class:`hessfast.distributed.Mesh` (see its docstring). It builds on :mod:`.comm` (imported
downward; comm knows nothing of the mesh). Its collectives are the mesh's error barrier
(:meth:`Comm.error_barrier` over the world) and one all-gather of the per-probe results over
the probe dimension."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from ..errors import ArgumentTypeError, ConfigurationError, DistributedError
from .comm import Comm, _dist, rank, world_size

__all__ = ["Mesh"]


def _share(num: int, parts: int, index: int) -> range:
    """Part ``index`` of ``range(num)`` split into ``parts`` contiguous pieces, the first
    ``num % parts`` of them one longer."""
    base, extra = divmod(num, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


class Mesh:
    """The ranks of the default group as a 2-D ``probe x data`` mesh, for probe-parallel SLQ
    and Hutchinson (``mesh=`` of :func:`hessfast.spectral_density` and :func:`hessfast.trace`).

    Rank ``r`` sits at probe index ``r // data`` and data rank ``r % data``: a probe group is
    ``data`` consecutive ranks (:attr:`data_group`; e.g. one node's GPUs), which together
    hold ALL the data, each rank its shard. Each probe group builds its data-parallel
    operator over its data group, runs its contiguous share of the probe indices
    (:meth:`share`) and the per-probe results are all-gathered over :attr:`probe_group` (the
    ``probe`` ranks with the same data rank) in probe order::

        hf.distributed.init()                           # torchrun, 8 processes
        mesh = hf.distributed.Mesh(probe=2, data=4)
        H = hf.hessian(model, loss_fn, my_shard, process_group=mesh.data_group)
        dens = hf.spectral_density(H, num_probes=16, num_steps=32, mesh=mesh)
        tr = hf.trace(H, 64, method="hutchinson", mesh=mesh)

    ``my_shard`` is this rank's part of the data split over its probe group's ``data`` ranks
    (``mesh.data_rank`` of ``mesh.data``), so every probe group sees the same data set.
    Every rank returns the same result, equal to rounding to ONE process on all the data
    with ``mesh=Mesh()`` (1 x 1, no process group needed): under a mesh, probe ``i`` is drawn
    from its own generator keyed by ``(seed, i)`` (:func:`hessfast._checks.keyed_probes`), so
    the result does not depend on the mesh's shape. Without ``mesh=`` the probes come from
    one stream: other (equally distributed) probes, so other numbers.

    Every rank of the default group must construct the mesh, with the same arguments and in
    the same order relative to other group creations (it creates process groups
    collectively; the arguments are compared across ranks).

    Args:
        probe: P >= 1 probe groups.
        data: D >= 1 ranks per probe group (default: world size // P); P * D must equal the
            world size (1 without a process group).

    Attributes:
        probe, data: P and D. rank, size: this rank and the world size.
        probe_index, data_rank: this rank's coordinates ``(rank // D, rank % D)``.
        data_group: the process group of this probe group's D ranks, to pass as
            ``process_group=`` when building the operator (None when D == 1: a local one).
        probe_group: the group of the P ranks with this data rank (None when P == 1).
    """

    def __init__(self, probe: int = 1, data: int | None = None) -> None:
        self.size, self.rank = world_size(), rank()
        for name, value in (("probe", probe), ("data", data)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ConfigurationError(f"Mesh: {name} must be an integer >= 1, got {value!r}")
        self.probe = probe
        self.data = self.size // probe if data is None else data
        if self.probe * self.data != self.size or self.data < 1:
            raise ConfigurationError(
                f"Mesh(probe={probe}, data={data}): probe * data must equal the number of "
                f"processes, {self.size} (launch probe * data ranks, e.g. torchrun "
                f"--nproc-per-node {probe * (data or 1)}, or change the shape)"
            )
        self.probe_index, self.data_rank = divmod(self.rank, self.data)
        self.comm = Comm() if self.size > 1 else None
        self.data_group: Any = None
        self.probe_group: Any = None
        self._probe_comm: Comm | None = None
        if self.comm is None:
            return
        mine = [self.probe, self.data]
        agreed = self.comm.allreduce_ints(mine + [-x for x in mine], "the mesh shape", op="max")
        if agreed != mine + [-x for x in mine]:
            raise DistributedError(
                f"rank {self.rank}: the ranks built Mesh with different shapes (this rank "
                f"probe={self.probe}, data={self.data}); pass the same probe= and data= "
                "on every rank"
            )
        dist = _dist()
        if self.probe == 1:
            self.data_group = dist.group.WORLD
        elif self.data > 1:  # every rank creates every group, in the same order
            for p in range(self.probe):
                g = dist.new_group(list(range(p * self.data, (p + 1) * self.data)))
                self.data_group = g if p == self.probe_index else self.data_group
        if self.probe > 1:
            for d in range(self.data):
                g = dist.new_group(list(range(d, self.size, self.data)))
                self.probe_group = g if d == self.data_rank else self.probe_group
            self._probe_comm = Comm(self.probe_group)

    def __repr__(self) -> str:
        return (f"Mesh(probe={self.probe}, data={self.data}; rank {self.rank} at "
                f"({self.probe_index}, {self.data_rank}))")

    @staticmethod
    def checked(mesh: Any, who: str) -> Mesh:
        """``mesh`` if it is a :class:`Mesh`, else :class:`ArgumentTypeError`."""
        if not isinstance(mesh, Mesh):
            raise ArgumentTypeError(
                f"{who}: mesh must be a hessfast.distributed.Mesh, got {type(mesh).__name__}"
            )
        return mesh

    def share(self, num: int, who: str) -> range:
        """The probe indices ``[start, stop)`` this probe group runs out of ``num``:
        contiguous, the first ``num % P`` groups one more.

        Raises:
            ConfigurationError: fewer probes than probe groups (a group would idle).
        """
        if num < self.probe:
            raise ConfigurationError(
                f"{who}: {num} probe(s) over a mesh of {self.probe} probe groups leaves a "
                f"group without probes; use at least {self.probe} probes or a smaller probe "
                "dimension"
            )
        return _share(num, self.probe, self.probe_index)

    def check_operator(self, A: Any, who: str) -> None:
        """Refuse a data-parallel operator whose group is not a probe group's ``data`` ranks
        (built with ``process_group='auto'`` over the whole world, say): its products
        would sum different probes' vectors across probe groups."""
        size = getattr(getattr(A, "ranks", None), "world_size", None)
        if size is not None and size != self.data:
            raise ConfigurationError(
                f"{who}: the operator reduces its products over {size} process(es), but the "
                f"mesh's probe groups have data={self.data} ranks: build it with "
                "process_group=mesh.data_group (each rank passing its shard of its probe "
                "group's data)"
            )

    def barrier(self, what: str) -> AbstractContextManager[None]:
        """An error barrier over the whole mesh around a probe group's local work: when one
        group raises, every rank raises before the gather (a no-op on one process)."""
        return nullcontext() if self.comm is None else self.comm.error_barrier(what)

    def gather_rows(self, rows: torch.Tensor, num: int, what: str) -> torch.Tensor:
        """This probe group's per-probe rows ``[len(share(num)), w]`` to all of them,
        ``[num, w]`` float64 in probe order: one all-gather over :attr:`probe_group` of
        buffers padded to ``ceil(num / P)`` rows (the same tensor on every rank)."""
        rows = rows.detach().to(torch.float64)
        if self._probe_comm is None:
            return rows
        most = -(-num // self.probe)
        comm = self._probe_comm
        buf = torch.zeros((most, rows.shape[1]), dtype=torch.float64)
        buf[: rows.shape[0]] = rows.cpu()
        buf = buf.to(comm._device(rows.device))
        parts = comm._all_gather(
            buf, f"{what} over the probe groups",
            f"(World rank {self.rank} of {self.size}.) Another rank stopped or did not run "
            "the same call with the same mesh",
        )
        out = [parts[i][: len(_share(num, self.probe, i))] for i in range(self.probe)]
        return torch.cat(out).to(rows.device)
