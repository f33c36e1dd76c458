"""The one home of hessfast's Krylov methods.

- :mod:`.basis`: the row basis and its float64 projection, block orthonormalisation with
  rank-deficiency replacement, selection of wanted Ritz values.
- :mod:`.restart`: thick-restart block Lanczos with locking and the final verification of
  the wanted set (the engine of :func:`hessfast.eigsh`).
"""

from __future__ import annotations

from .basis import WHICH, select
from .probes import ProbeTridiagonals, probe_lanczos
from .restart import LanczosState, block_lanczos

__all__ = ["WHICH", "LanczosState", "ProbeTridiagonals", "block_lanczos", "probe_lanczos", "select"]
