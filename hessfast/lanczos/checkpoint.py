"""Checkpoint and resume of long Lanczos runs (``checkpoint=path`` of :func:`hessfast.eigsh`
and :func:`hessfast.spectral_density`).

A run saves its whole state at the top of a step (before the product) every
``checkpoint_every`` steps (an ``int``) or seconds (a ``float``; default 60 s): the basis rows,
the float64 projection and couplings, the loop's counters and verification state, the next
block and the private generator's state. The file is written to ``path + ".tmp<pid>"`` and
moved over ``path`` with ``os.replace``, so an interruption never leaves a torn file. Only
rank 0 writes when ``torch.distributed`` is initialised. Calling again with the same path
and arguments resumes from the file: the arithmetic after the saved step is the same, so the
result is the one of an uninterrupted run (bitwise for the same seed, backend and threads),
with ``num_matvecs`` counting the products before the checkpoint too. The file stays after a
run ends (a new call replays from its last save); delete it to start afresh.

The arguments' fingerprint (operator size and dtype, k, which, tol, block size, basis size and
dtype, seed, reorth, start vectors, probes...) is stored; a file made with other arguments
raises :class:`~hessfast.errors.ConfigurationError` naming each mismatch. ``max_matvecs`` and
``basis_device`` are not part of it: a resumed run may have a larger budget or another device.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigurationError

__all__ = ["Checkpoint", "fingerprint_tensor", "lanczos_state", "restore_lanczos"]

DEFAULT_SECONDS = 60.0
FORMAT = 1


def fingerprint_tensor(t: torch.Tensor | None) -> str:
    """A short exact digest of a tensor's values (None -> ``"none"``)."""
    if t is None:
        return "none"
    x = t.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(x.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}:{digest}"


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu")
    if isinstance(x, list):
        return [_to_cpu(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_to_cpu(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    return x


def _writer() -> bool:
    """Whether this process writes (rank 0, or no process group)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


class Checkpoint:
    """One run's checkpoint file.

    Args:
        path: the file (its folder must exist).
        kind: ``"eigsh"`` or ``"slq"`` (a file of the other kind is refused).
        fingerprint: the arguments that decide the result (str/int/float/bool/None values).
        every: ``int`` steps or ``float`` seconds between saves (None: 60 s).
        who: the entry point, for messages.
    """

    def __init__(self, path: str | os.PathLike, kind: str, fingerprint: dict[str, Any],
                 every: int | float | None, who: str) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigurationError(
                f"{who}: checkpoint must be a file path (str or Path), got {type(path).__name__}")
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ConfigurationError(
                f"{who}: checkpoint={str(path)!r}: folder {str(self.path.parent)!r} does not "
                "exist; create it or pass another path")
        every = DEFAULT_SECONDS if every is None else every
        if isinstance(every, bool) or not isinstance(every, (int, float)) or not every > 0:
            raise ConfigurationError(
                f"{who}: checkpoint_every must be an int number of steps >= 1 or a float "
                f"number of seconds > 0, got {every!r}")
        self.kind, self.fp, self.who = kind, dict(fingerprint), who
        self.steps_every = every if isinstance(every, int) else None
        self.seconds_every = float(every) if isinstance(every, float) else None
        self.steps = 0
        self.last = time.monotonic()
        self.saves = 0

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is no file; a file made by other arguments
        raises :class:`ConfigurationError` naming the mismatches."""
        if not self.path.exists():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
            raise ConfigurationError(
                f"{self.who}: checkpoint {str(self.path)!r} cannot be read ({exc}); delete it "
                "or pass another path") from exc
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ConfigurationError(
                f"{self.who}: {str(self.path)!r} is not a hessfast checkpoint; delete it or "
                "pass another path")
        saved = dict(payload.get("fingerprint", {}), kind=payload.get("kind"))
        want = dict(self.fp, kind=self.kind)
        bad = [f"{k}: file {saved.get(k)!r}, now {want.get(k)!r}"
               for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
        if bad:
            raise ConfigurationError(
                f"{self.who}: checkpoint {str(self.path)!r} was made by a different run ("
                + "; ".join(bad) + "): call with the same operator and arguments to resume, "
                "or delete the file / pass another path to start afresh")
        return payload["state"]

    def due(self) -> bool:
        """Called once per step: is a save due now?"""
        self.steps += 1
        if self.steps_every is not None:
            return self.steps > 1 and (self.steps - 1) % self.steps_every == 0
        assert self.seconds_every is not None
        return time.monotonic() - self.last >= self.seconds_every

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically (tmp file, fsync, ``os.replace``); rank 0 only."""
        self.last = time.monotonic()
        if not _writer():
            return
        payload = {"format": FORMAT, "kind": self.kind, "fingerprint": self.fp,
                   "state": _to_cpu(state)}
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self.saves += 1


#: What a block Lanczos checkpoint holds besides the basis rows, T and the generator.
RUN_FIELDS = ("G", "coupling", "norm_est", "theta", "Y", "res", "ok", "block", "restarts",
              "history", "extremes", "ref", "ref_res", "ref_vecs", "ref_slack", "verify_left",
              "n_verify", "n_miss", "verify_mv", "verify_mv0")


def lanczos_state(run: Any, used: int, passes: int) -> dict[str, Any]:
    """The state of a block Lanczos run (``restart._Run``) at the top of a step, with the
    products (``used``) and passes so far."""
    state = {f: getattr(run, f) for f in RUN_FIELDS}
    state.update(m=run.basis.m, Q=run.basis.rows(), T=run.basis.T, gen=run.gen.get_state(),
                 used=used, passes=passes)
    return state


def restore_lanczos(run: Any, state: dict[str, Any]) -> None:
    """Put a saved state back into a fresh run (vectors onto the basis device)."""
    for f in RUN_FIELDS:
        setattr(run, f, state[f])
    run.block = state["block"].to(run.bdev)
    run.ref_vecs = state["ref_vecs"].to(run.bdev)
    m = int(state["m"])
    run.basis.m = m
    run.basis.Q[:m] = state["Q"].to(device=run.bdev, dtype=run.bdtype)
    run.basis.T.copy_(state["T"])
    run.gen.set_state(state["gen"])
