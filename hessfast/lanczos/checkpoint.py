"""Checkpoint and resume of long Lanczos runs (``checkpoint=path`` of :func:`hessfast.eigsh`
and :func:`hessfast.spectral_density`).

Saving. A run keeps its whole state at the top of every step (before the product: the basis
rows, the float64 projection and couplings, the loop's counters and verification state, the
next block, the private generator's state) and writes it every ``checkpoint_every`` steps (an
``int``) or seconds (a ``float``; default 60 s), and at once on ``KeyboardInterrupt`` (Ctrl-C)
or ``SIGTERM``, before the interrupt goes on (:meth:`Checkpoint.guard`). The file is written
to ``path + ".tmp<pid>"`` and moved over ``path`` with ``os.replace``, so an interruption never
leaves a torn file. Only rank 0 writes when ``torch.distributed`` is initialised. A run that
ends writes nothing more: the file, if one was written, stays and holds its last save (a new
call replays from there); delete it to start afresh.

Resuming. Calling again with the same path, operator and arguments resumes from the file,
with a warning ``resumed from step s of <file>`` and ``resumed_from_step`` on the result: the
arithmetic after the saved step is the same, so the result is the one of an uninterrupted
run (bitwise for the same seed, backend and threads), with ``num_matvecs`` counting the
products before the checkpoint too. A step is one product (one data pass).

Binding. The file stores two fingerprints, and a file whose fingerprints differ from the
call's is refused with a :class:`~hessfast.errors.ConfigurationError` naming each difference:

* the arguments (operator size and dtype, k, which, tol, block size, basis size and dtype,
  seed, reorth, start vectors, probes...); ``max_matvecs`` and ``basis_device`` are not part
  of it: a resumed run may have a larger budget or another device;
* the operator's state, :meth:`~hessfast.linop.LinearOperator.state_fingerprint`: for a model
  operator every parameter's name, shape, dtype and a SHA-256 of its bits, the buffers, the
  operator's kind and loss, and the data (number of batches and samples, each batch's size
  and bits); for ``from_matrix`` the matrix's bits. A ``from_function`` operator has no state
  hessfast can read: its file is bound by the arguments only.

Interrupts. ``SIGTERM`` (where its handler is the default, which kills the process) and
``SIGINT`` (where its handler is Python's, which raises ``KeyboardInterrupt``) get a handler for
the duration of the run, in the main thread only, and the previous one back afterwards. A
signal that arrives while the basis is rewritten in place (a restart: a few reductions, no
product) waits until the next step begins. After the save, ``KeyboardInterrupt`` is re-raised
and ``SIGTERM`` delivered again to the restored default handler, so the process ends as it
would have, with the file written.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigurationError

__all__ = ["Checkpoint", "Terminated", "lanczos_state", "restore_lanczos"]

DEFAULT_SECONDS = 60.0
#: 2: the operator's state fingerprint and the step are stored (format 1 files are refused).
FORMAT = 2
#: Differences named in a refusal before "and N more".
SHOWN = 8


class Terminated(BaseException):  # noqa: N818 - a signal, like KeyboardInterrupt
    """SIGTERM, raised by the handler a checkpointed run installs; the run saves its state,
    and the signal is delivered again to the previous (default) handler."""


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


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside hessfast, for a warning issued by the
    caller of this function (so it points at the user's call)."""
    package = str(Path(__file__).resolve().parents[1])
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _split(value: Any) -> tuple[str, str]:
    """``"(shape):dtype:digest"`` -> (``"(shape) dtype"``, digest)."""
    head, _, digest = str(value).rpartition(":")
    return head.replace(":", " "), digest


def _named(kind: str, saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The differences of the ``kind:name`` entries (parameters or buffers), one per name."""
    out = []
    prefix = kind + ":"
    for key in sorted(set(saved) | set(now)):
        if not key.startswith(prefix) or saved.get(key) == now.get(key):
            continue
        name = key[len(prefix):]
        if key not in now:
            out.append(f"{kind} {name!r} (in the file's run, not in this operator)")
        elif key not in saved:
            out.append(f"{kind} {name!r} (new: not in the file's run)")
        else:
            (was, _), (is_, _) = _split(saved[key]), _split(now[key])
            out.append(f"{kind} {name!r} ({was} -> {is_})" if was != is_
                       else f"{kind} {name!r} (values changed)")
    return out


def _data(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The differences of the data entries."""
    out = []
    a, b = saved.get("data.batches"), now.get("data.batches")
    if a != b:
        out.append(f"the data ({a} batches in the file's run, {b} now)")
    a, b = saved.get("data.samples"), now.get("data.samples")
    if a != b:
        out.append(f"the data ({a} samples in the file's run, {b} now)")
    a, b = saved.get("data.contents"), now.get("data.contents")
    if a != b and not out:
        was, is_ = str(a).split(","), str(b).split(",")
        if len(was) == len(is_) and ":" in was[0]:  # one entry per batch (or per rank)
            idx = [f"rank {x.partition(':')[0][4:]}" if x.startswith("rank") else f"batch {i}"
                   for i, (x, y) in enumerate(zip(was, is_, strict=True)) if x != y]
            out.append(f"the data ({', '.join(idx[:SHOWN])}"
                       + (f" and {len(idx) - SHOWN} more" if len(idx) > SHOWN else "")
                       + " changed)")
        else:
            out.append("the data (the batches' contents changed)")
    for key in sorted(set(saved) | set(now)):
        if (key.startswith("data.") and key not in ("data.batches", "data.samples",
                                                    "data.contents")
                and saved.get(key) != now.get(key)):
            out.append(f"the data ({key[5:]}: file {saved.get(key)!r}, now {now.get(key)!r})")
    return out


def state_changes(saved: dict[str, Any] | None, now: dict[str, Any] | None) -> list[str]:
    """What differs between two operator state fingerprints, in words (empty: nothing):
    parameters and buffers by name, the data, then any other entry."""
    saved, now = saved or {}, now or {}
    if saved == now:
        return []
    out = _named("parameter", saved, now) + _named("buffer", saved, now) + _data(saved, now)
    for key in sorted(set(saved) | set(now)):
        if key.startswith(("parameter:", "buffer:", "data.")) or saved.get(key) == now.get(key):
            continue
        out.append(f"{key}: file {saved.get(key, 'absent')!r}, now {now.get(key, 'absent')!r}")
    return out


class Checkpoint:
    """One run's checkpoint file.

    Args:
        path: the file (its folder must exist).
        kind: ``"eigsh"`` or ``"slq"`` (a file of the other kind is refused).
        fingerprint: the arguments that decide the result (str/int/float/bool/None values).
        every: ``int`` steps or ``float`` seconds between saves (None: 60 s).
        who: the entry point, for messages.
        operator: the operator of the run; its
            :meth:`~hessfast.linop.LinearOperator.state_fingerprint` (computed here, once) is
            stored and compared too.

    Attributes:
        resumed_from_step: the step a resumed run started from (None: a fresh run).
    """

    def __init__(self, path: str | os.PathLike, kind: str, fingerprint: dict[str, Any],
                 every: int | float | None, who: str, operator: Any = None) -> None:
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
        self.state = None if operator is None else operator.state_fingerprint()
        self.steps_every = every if isinstance(every, int) else None
        self.seconds_every = float(every) if isinstance(every, float) else None
        self.steps = 0
        self.last = time.monotonic()
        self.saves = 0
        self.resumed_from_step: int | None = None
        self._kept: dict[str, Any] | None = None  # the state at the top of the current step
        self._deferring = False  # the state is being rewritten in place: signals wait
        self._pending: int | None = None  # a signal that waits for the next step

    def bind(self, operator: Any) -> None:
        """Bind the file to ``operator``'s state (what ``operator=`` does at construction):
        for a caller that validates the arguments first and reads the fingerprint, a
        collective for a data-parallel operator, only after its ranks agreed on them."""
        self.state = operator.state_fingerprint()

    def _refuse(self, what: str) -> ConfigurationError:
        return ConfigurationError(
            f"{self.who}: checkpoint {str(self.path)!r} {what}. Delete the file to start "
            "afresh, or pass another path")

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is no file; a file made by another run (other
        arguments or another operator state) raises :class:`ConfigurationError` naming the
        differences, an unreadable one names the file."""
        if not self.path.exists():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except OSError as exc:
            raise self._refuse(f"cannot be read ({type(exc).__name__}: {exc.strerror})") from None
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
            # torch's own message advises weights_only=False, which would run the file's code:
            # not relayed (from None), a checkpoint never needs it.
            raise self._refuse(
                f"is corrupt or not a hessfast checkpoint (torch.load failed with "
                f"{type(exc).__name__}; hessfast reads tensors only, never code)") from None
        if not isinstance(payload, dict) or "format" not in payload or "state" not in payload:
            raise self._refuse("is not a hessfast checkpoint")
        if payload["format"] != FORMAT:
            raise self._refuse(
                f"was written by another hessfast version (format {payload['format']!r}, this "
                f"version reads {FORMAT}: it binds a file to the operator's parameters and data)")
        saved = dict(payload.get("fingerprint", {}), kind=payload.get("kind"))
        want = dict(self.fp, kind=self.kind)
        bad = [f"{k}: file {saved.get(k)!r}, now {want.get(k)!r}"
               for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
        bad += state_changes(payload.get("operator"), self.state)
        if bad:
            shown = "; ".join(bad[:SHOWN]) + (f"; and {len(bad) - SHOWN} more"
                                              if len(bad) > SHOWN else "")
            raise self._refuse(
                f"was made by a different run ({shown}): resuming it would continue another "
                "run's Krylov basis. To resume, call with the operator and arguments it was made "
                "with")
        step = int(payload.get("step", 0))
        self.resumed_from_step = step
        warnings.warn(
            f"{self.who}: resumed from step {step} of {str(self.path)!r} (the products before "
            "it are not repeated; the result is the uninterrupted run's)",
            stacklevel=_user_stacklevel())
        return payload["state"]

    def due(self) -> bool:
        """Called once per step: is a save due now?"""
        self.steps += 1
        if self.steps_every is not None:
            return self.steps > 1 and (self.steps - 1) % self.steps_every == 0
        assert self.seconds_every is not None
        return time.monotonic() - self.last >= self.seconds_every

    def top(self, make_state: Callable[[], dict[str, Any]]) -> None:
        """At the top of each step: keep ``make_state()`` (for an interrupt) and write it
        when a save is due; a signal that waited for this step is raised now."""
        self._kept = make_state()
        self._deferring = False
        if self.due():
            self.save(self._kept)
        pending, self._pending = self._pending, None
        if pending is not None:
            self._raise(pending)

    def busy(self) -> None:
        """The state is about to be rewritten in place (a restart of the basis): the kept
        state no longer matches it, and a signal waits for the next :meth:`top`."""
        self._kept = None
        self._deferring = True

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically (tmp file, fsync, ``os.replace``); rank 0 only."""
        self.last = time.monotonic()
        if not _writer():
            return
        payload = {"format": FORMAT, "kind": self.kind, "fingerprint": self.fp,
                   "operator": self.state, "step": int(state["passes"]),
                   "state": _to_cpu(state)}
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self.saves += 1

    # -- interrupts -------------------------------------------------------------------
    @staticmethod
    def _raise(signum: int) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(f"signal {signum} (SIGTERM)")

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._deferring:
            self._pending = signum
            return
        self._raise(signum)

    def _install(self) -> dict[int, Any]:
        """Our handler for SIGINT (over Python's default) and SIGTERM (over the default
        action), in the main thread; the previous handlers, to restore."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum, default in ((signal.SIGINT, signal.default_int_handler),
                                (getattr(signal, "SIGTERM", None), signal.SIG_DFL)):
            if signum is not None and signal.getsignal(signum) is default:
                previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    def _save_kept(self, why: str) -> None:
        """On an interrupt: write the state of the step it came in (when there is one). A
        failed write is reported, never raised: the interrupt must go on."""
        if self._kept is None:
            return
        step = int(self._kept["passes"])
        try:
            self.save(self._kept)
            said = (f"{self.who}: {why}: the state at step {step} was saved to "
                    f"{str(self.path)!r}; the same call resumes from it")
        except Exception as exc:  # noqa: BLE001 - a full disk must not hide the interrupt
            said = (f"{self.who}: {why}: the state at step {step} could not be saved to "
                    f"{str(self.path)!r} ({type(exc).__name__}: {exc})")
        try:
            warnings.warn(said, stacklevel=3)
        except Exception:  # noqa: BLE001 - warnings turned into errors must not hide the interrupt
            pass

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Around a run: on ``KeyboardInterrupt`` or ``SIGTERM`` the kept state is written,
        then the interrupt goes on (re-raised; SIGTERM delivered again to the restored
        default handler). Handlers: see the module docstring."""
        previous = self._install()
        terminated = False
        try:
            yield
            pending, self._pending = self._pending, None
            if pending is not None:  # arrived after the last step: not swallowed
                self._raise(pending)
        except KeyboardInterrupt:
            self._save_kept("interrupted (KeyboardInterrupt)")
            raise
        except Terminated:
            terminated = True
            self._save_kept("terminated (SIGTERM)")
            raise
        finally:
            self._kept, self._deferring = None, False
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if terminated and previous.get(getattr(signal, "SIGTERM", -1)) is signal.SIG_DFL:
                signal.raise_signal(signal.SIGTERM)  # the default action: the process ends


#: What a block Lanczos checkpoint holds besides the basis rows, T and the generator.
RUN_FIELDS = ("G", "coupling", "norm_est", "theta", "Y", "res", "ok", "block", "restarts",
              "extremes", "ref", "ref_res", "ref_vecs", "ref_slack", "verify_left", "n_verify",
              "n_miss", "verify_mv", "verify_mv0")


def lanczos_state(run: Any, used: int, passes: int) -> dict[str, Any]:
    """The state of a block Lanczos run (:class:`.run.Run`) at the top of a step, with the
    products (``used``) and passes so far."""
    state = {f: getattr(run, f) for f in RUN_FIELDS}
    # kept until the next step (an interrupt writes it): what the loop changes in place is
    # copied (lists, T: small); the rows Q[:m] stay as they are until a restart (busy())
    state.update(G=list(run.G), extremes=list(run.extremes), ref_vecs=run.candidates())
    state.update(m=run.basis.m, Q=run.basis.rows(), T=run.basis.T.clone(),
                 gen=run.gen.get_state(), used=used, passes=passes)
    # the verification rounds' dropped rows (exact residuals); a step reorthogonalises them in
    # place, so the saved state holds a copy ([d, n], d = b per round so far)
    state["D"] = None if run.D is None else run.D.clone()
    return state


def restore_lanczos(run: Any, state: dict[str, Any]) -> None:
    """Put a saved state back into a fresh run (vectors onto the basis device)."""
    for f in RUN_FIELDS:
        setattr(run, f, state[f])
    run.block = state["block"].to(run.bdev)
    D = state.get("D")
    run.D = None if D is None else D.to(device=run.bdev, dtype=run.wdtype)
    vecs = state["ref_vecs"]  # a copy, or the candidates' basis rows as they were saved
    run.ref_vecs = vecs.to(run.bdev) if run.ref is not None and vecs.shape[0] else None
    m = int(state["m"])
    run.basis.m = m
    run.basis.Q[:m] = state["Q"].to(device=run.bdev, dtype=run.bdtype)
    run.basis.T.copy_(state["T"])
    run.gen.set_state(state["gen"])
