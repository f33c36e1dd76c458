"""The one home of hessfast's Krylov methods.

- :mod:`.basis`: the row basis and its float64 projection, block orthonormalisation with
  rank-deficiency replacement, selection of wanted Ritz values.
- :mod:`.restart`: thick-restart block Lanczos with a verified wanted set (the engine of
  :func:`hessfast.eigsh`); :mod:`.verify`: the verification round's arithmetic.
- :mod:`.probes`: one Lanczos tridiagonal per probe, all probes advanced by one product per
  step (the engine of SLQ, :func:`hessfast.spectral_density`).
"""

from __future__ import annotations

from .basis import WHICH, select
from .probes import ProbeTridiagonals, probe_lanczos
from .restart import LanczosState, block_lanczos

__all__ = ["WHICH", "LanczosState", "ProbeTridiagonals", "block_lanczos", "probe_lanczos", "select"]
