"""The one home of hessfast's Krylov methods.

- :mod:`.basis`: the row basis and its float64 projection, block orthonormalisation with
  rank-deficiency replacement, selection of wanted Ritz values.
- :mod:`.verify`: the residual floor, THE convergence rule of every eigenvalue solver
  (:func:`.verify.converged`) and the verification round's arithmetic.
- :mod:`.run`: the state of one thick-restart run (:class:`.run.Run`) and its result
  (:class:`LanczosState`); :mod:`.restart`: the loop that drives it (thick-restart block
  Lanczos with a verified wanted set, the engine of :func:`hessfast.eigsh`);
  :mod:`.wanted`: the pairs a run returns; :mod:`.sharded`: a basis split over the ranks;
  :mod:`.checkpoint`: save and resume.
- :mod:`.lean`: the memory-lean mode (``krylov="lean"``): the plain three-term recurrence
  with no basis for one extreme eigenvalue, dot products through ``row_dots`` (sharded
  vectors work), the eigenvector by a second pass.
- :mod:`.probes`: one Lanczos tridiagonal per probe, all probes advanced by one product per
  step, and their Gauss rule (the engine of SLQ, :func:`hessfast.spectral_density`).
- :mod:`.lockstep`: Lanczos on many small blocks advanced by one shared product per step,
  on the probes' Gauss rule (the engine of :func:`hessfast.analysis.block_spectra`).

Imports point down only: ``restart`` -> ``run``, ``wanted``, ``checkpoint``; ``wanted`` ->
``run``, ``checkpoint``; ``sharded`` -> ``restart``, ``run``, ``basis``; ``run`` ->
``basis``, ``verify``; ``lockstep`` -> ``probes``, ``verify``; ``lean`` -> ``verify``;
``verify`` -> ``basis``.
"""

from __future__ import annotations

from .basis import WHICH, select
from .lockstep import Lockstep
from .probes import ProbeTridiagonals, probe_lanczos
from .restart import LanczosState, block_lanczos
from .verify import converged

__all__ = ["WHICH", "LanczosState", "Lockstep", "ProbeTridiagonals", "block_lanczos",
           "converged", "probe_lanczos", "select"]
