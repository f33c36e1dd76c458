"""Batch runs: :func:`analyze_checkpoints` analyzes many checkpoints of one training run, spread
over processes, and appends one JSON line per checkpoint to ``OUT/runs.jsonl``.

How the work is shared. The checkpoints are ordered by step. ``workers=1`` analyzes them in
this process; ``workers=N`` spawns N processes (``multiprocessing`` "spawn": the model factory,
loss and data are pickled into them) and hands each one whole checkpoints, the next in step
order whenever it is free, over its own pipe (a process that dies breaks only its own pipe,
never a queue shared with the others). Under ``torchrun`` (``WORLD_SIZE > 1``) rank ``r`` takes
the checkpoints ``i`` with ``i % WORLD_SIZE == r``; no process group is needed.

What is written. Every line is appended with one ``os.write`` on an ``O_APPEND`` descriptor
under ``fcntl.flock``, so lines of concurrent processes never interleave. A checkpoint whose
``(path, sha256, settings)`` already has an ``"ok"`` line is skipped (a second identical call
builds no model and makes no product); error lines are retried. An exception inside the
analysis is recorded on its checkpoint's line; a worker process that dies is noticed by the
parent, which records the checkpoint it held. ``OUT/evolution.png`` is redrawn at the end of
every call (by every torchrun rank) from the lines in the file, replaced atomically and only
when its bytes change.
"""

from __future__ import annotations

import glob
import inspect
import multiprocessing as mp
import os
import pickle
import re
import signal
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch

from .._checks import check_int, check_positive, check_seed
from ..errors import ArgumentTypeError, ConfigurationError
from ..progress import check_progress, progress_enabled
from ..results import jsonable
from .analyze import analyze
from .evolution import RUNS, append_line, best_lines, draw_atomically, read_runs
from .provenance import callable_name
from .weights import file_sha256, load_weights

__all__ = ["Checkpoint", "Loader", "analyze_checkpoints", "checkpoint_step", "find_checkpoints"]

WHO = "hessfast.analyze_checkpoints"
FIGURE = "evolution.png"
#: Integer entries of a checkpoint dict read as its step, in this order of preference.
STEP_KEYS = ("step", "global_step", "iteration", "epoch")
#: analyze's keywords that change the numbers: part of every line's ``settings``.
NUMBERS = ("curvature", "k", "num_probes", "num_steps", "per_layer", "groups", "tol", "seed",
           "lr_scale")
#: analyze's keywords the batch itself sets.
OWN = ("v0", "progress", "lr", "probes", "steps")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint file of a batch run.

    Attributes:
        path: the absolute path.
        step: the training step (from the file's contents or name), or None.
        sha256: the file's SHA-256 (hex).
    """

    path: str
    step: int | None
    sha256: str


class Loader:
    """What a worker process builds its objects with. :func:`analyze_checkpoints` wraps its
    ``make_model``, ``loss_fn`` and ``data`` in one; pass a subclass instance as
    ``make_model`` (with ``loss_fn`` and ``data`` None) to build them another way inside each
    worker, e.g. from import specs as the command line does. It is pickled into the workers:
    keep its state picklable (strings, module-level functions)."""

    def model(self, device: str) -> torch.nn.Module:
        """A new model on ``device`` (its weights are replaced by each checkpoint).

        Args:
            device: where to put it (``"cpu"``, ``"cuda:1"``).
        """
        raise NotImplementedError

    def loss(self) -> Any:
        """The loss, as for :func:`hessfast.analyze`."""
        raise NotImplementedError

    def data(self) -> Any:
        """The batches, as for :func:`hessfast.analyze`."""
        raise NotImplementedError

    def load_state(self, model: torch.nn.Module, path: str, device: str) -> None:
        """Load the checkpoint ``path`` into ``model`` (default: :func:`load_weights`).

        Args:
            model: the model of :meth:`model`.
            path: the checkpoint file.
            device: the ``map_location``.
        """
        load_weights(model, path, device, name="make_model()'s model")

    def operator_kwargs(self, model: torch.nn.Module) -> dict[str, Any]:
        """Extra keywords of :func:`hessfast.analyze` that depend on the model (default none).

        Args:
            model: the model of :meth:`model`, its checkpoint loaded.
        """
        return {}

    def describe(self) -> dict[str, Any]:
        """JSON-safe words for the problem, part of every line's ``settings`` (a line of
        another problem does not count as done)."""
        return {}

    def provenance(self) -> dict[str, Any]:
        """Entries added to every report's ``provenance`` (default none)."""
        return {}


@dataclass
class _Objects(Loader):
    """The Python API's loader: the user's factory, loss and data."""

    make_model: Any
    loss_fn: Any
    data_: Any

    def model(self, device: str) -> torch.nn.Module:
        model = self.make_model()
        if not isinstance(model, torch.nn.Module):
            raise ConfigurationError(f"{WHO}: make_model() must return a new torch.nn.Module, "
                                     f"got {type(model).__name__}")
        return model.to(device)

    def loss(self) -> Any:
        return self.loss_fn

    def data(self) -> Any:
        return self.data_

    def describe(self) -> dict[str, Any]:
        return {"model": callable_name(self.make_model), "loss": callable_name(self.loss_fn)}


@dataclass
class _Job:
    """What every worker of one call needs besides the loader."""

    kwargs: dict[str, Any]
    settings: dict[str, Any]
    lr: float | None
    warm_start: bool
    runs: str
    rank: int
    threads: int | None = None


def analyze_checkpoints(
    make_model: Any,
    loss_fn: Any,
    data: Any,
    paths: Any,
    *,
    out: str | os.PathLike,
    workers: int = 1,
    device: str | None = None,
    lr: float | None = None,
    warm_start: bool = True,
    progress: bool | None = None,
    **analyze_kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`hessfast.analyze` of every checkpoint of a training run, spread over processes,
    each checkpoint's result appended to ``OUT/runs.jsonl`` and all of them drawn in
    ``OUT/evolution.png`` (see the module docstring for the sharing and the resume rules).

    Each line of ``runs.jsonl`` is a JSON object: ``path`` (absolute), ``sha256``, ``step``,
    ``status`` (``"ok"`` or ``"error"``), ``error`` (``"Type: message"``) and ``traceback``
    (its last lines), ``worker``, ``rank``, ``device``, ``seconds``, ``warm`` (the top-k
    started from the previous checkpoint's eigenvectors), ``top_k_matvecs`` (that part's
    products), ``lambda_max``, ``trace``, ``settings`` (the keywords that change the numbers
    and the problem's names) and ``report`` (:meth:`Report.to_dict`, its ``provenance`` with
    ``checkpoint: {path, sha256}`` and ``step``; None on an error).

    Args:
        make_model: a zero-argument callable returning a NEW ``nn.Module`` (each checkpoint's
            weights are loaded into it), or a :class:`Loader` (then ``loss_fn`` and ``data``
            are None). With ``workers > 1`` it and ``loss_fn``/``data`` are pickled into
            spawned processes: module-level functions, not lambdas or local functions.
        loss_fn: the loss, as for :func:`hessfast.analyze`.
        data: the batches, as for :func:`hessfast.analyze`.
        paths: checkpoint files: a path or glob pattern, or a list of them. Each file is read
            with ``torch.load(weights_only=True)``: a state_dict, or a dict holding one under
            ``state_dict`` or ``model``. The step is the dict's integer ``step``,
            ``global_step``, ``iteration`` or ``epoch`` entry, else the last integer in the
            file name (``ckpt_000300.pt``: 300), else the number after ``checkpoint``,
            ``step``... ending its folder's name (``checkpoint-50/model.pt``: 50), else
            None; the order is by step, then path.
        out: the folder of ``runs.jsonl`` and ``evolution.png`` (created if needed).
        workers: processes on this machine (>= 1); with GPUs worker ``i`` uses
            ``cuda:{i % device_count}``. Under torchrun keep 1: every rank is one worker.
        device: ``"cpu"``, ``"cuda"`` (spread over the GPUs) or ``"cuda:1"``; None: cuda
            when available, else cpu.
        lr: the training learning rate, if known: passed to analyze (``report.lr``) and
            drawn as ``2/lr`` in the figure; it does not change the numbers, so a resumed
            call with another ``lr`` reuses the finished lines.
        warm_start: start each worker's top-k from the previous checkpoint's eigenvectors
            (``analyze(v0=)``); False: cold starts (to compare the products).
        progress: one bar over the checkpoints (None: when stderr is a terminal and
            ``HESSFAST_PROGRESS`` is not ``"0"``); analyze's own bars are off.
        analyze_kwargs: the rest of :func:`hessfast.analyze`'s keywords (``k``,
            ``num_probes``, ``num_steps``, ``tol``, ``seed``, ``curvature``, ``per_layer``,
            ``params`` ...), the same for every checkpoint.

    Returns:
        The lines of the requested checkpoints, in step order (an ``"ok"`` line where one
        exists, else the latest error line; a checkpoint that another torchrun rank has not
        finished yet is left out).

    Raises:
        ConfigurationError: no checkpoint, a path that does not exist, a bad argument, an
            object that cannot be sent to the workers, or workers that could not start.
        ArgumentTypeError: a keyword that analyze does not take.
    """
    loader = _loader(make_model, loss_fn, data)
    workers = check_int("workers", workers, 1, who=WHO)
    check_progress(progress, WHO)
    if lr is not None:
        lr = check_positive("lr", lr, who=WHO)
    if not isinstance(warm_start, bool):
        raise ConfigurationError(f"{WHO}: warm_start must be True or False, got {warm_start!r}")
    _check_kwargs(analyze_kwargs)
    rank, world, local = _torchrun()
    if world > 1 and workers > 1:
        raise ConfigurationError(f"{WHO}: under torchrun every rank is one worker; pass "
                                 "workers=1 and launch more ranks (--nproc-per-node)")
    device = _device(device)
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigurationError(f"{WHO}: out={str(out)!r} is a file; pass a folder")
    checkpoints = find_checkpoints(paths)
    folder.mkdir(parents=True, exist_ok=True)
    runs = folder / RUNS
    settings = _settings(loader, analyze_kwargs)
    done = best_lines(read_runs(runs), settings)
    mine = [c for i, c in enumerate(checkpoints) if i % world == rank]
    todo = [c for c in mine if done.get((c.path, c.sha256), {}).get("status") != "ok"]
    job = _Job(dict(analyze_kwargs), settings, lr, warm_start, str(runs), rank)
    bar = _bar(len(todo), progress)
    try:
        if todo and workers == 1:
            runner = _Runner(loader, job, local, _place(device, local))
            for c in todo:
                _advance(bar, append_line(runs, runner.run(c)))
        elif todo:
            _pool(loader, job, todo, workers, device, bar)
    finally:
        if bar is not None:
            bar.close()
    best = best_lines(read_runs(runs), settings)
    lines = [best[(c.path, c.sha256)] for c in checkpoints if (c.path, c.sha256) in best]
    draw_atomically(folder / FIGURE, [ln for ln in lines if ln.get("status") == "ok"], lr, WHO)
    return lines


# -- checkpoints ------------------------------------------------------------------------------
def find_checkpoints(paths: Any) -> list[Checkpoint]:
    """The checkpoints of ``paths`` (files or glob patterns) with their steps and hashes, in
    step order (then by path; checkpoints without a step last).

    Args:
        paths: a path or glob pattern (str or PathLike), or a list of them.

    Raises:
        ConfigurationError: a path that does not exist, a folder, a pattern that matches
            nothing, or no path at all.
        ArgumentTypeError: ``paths`` of another type.
    """
    files = _expand(paths)
    found = [Checkpoint(f, checkpoint_step(f), file_sha256(f)) for f in files]
    return sorted(found, key=lambda c: (c.step is None, c.step or 0, c.path))


def _expand(paths: Any) -> list[str]:
    """Absolute, existing, de-duplicated files of ``paths``, globs expanded."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    if not isinstance(items, (list, tuple)) or not all(
            isinstance(p, (str, os.PathLike)) for p in items):
        raise ArgumentTypeError(f"{WHO}: paths must be a path, a glob pattern or a list of "
                                f"them, got {type(paths).__name__}")
    out: list[str] = []
    for item in items:
        text = os.path.expanduser(os.fspath(item))
        if glob.has_magic(text):
            matched = sorted(glob.glob(text, recursive=True))
            if not matched:
                raise ConfigurationError(f"{WHO}: no file matches the pattern {text!r}")
        else:
            matched = [text]
        for f in matched:
            if not os.path.exists(f):
                raise ConfigurationError(f"{WHO}: checkpoint {f!r}: no such file; check the "
                                         "path (relative to the current folder "
                                         f"{os.getcwd()})")
            if os.path.isdir(f):
                raise ConfigurationError(f"{WHO}: {f!r} is a folder; pass the checkpoint "
                                         f"files in it, e.g. {os.path.join(f, '*.pt')!r}")
            f = os.path.abspath(f)
            if f not in out:
                out.append(f)
    if not out:
        raise ConfigurationError(f"{WHO}: no checkpoints given; pass files or a glob pattern")
    return out


def checkpoint_step(path: str) -> int | None:
    """The step of a checkpoint: its contents' integer :data:`STEP_KEYS` entry, else the
    last integer of the file name, else the number after ``checkpoint``, ``ckpt``, ``step``,
    ``epoch`` or ``iter`` that ends its folder's name (``checkpoint-50/model.pt``), else
    None.

    Args:
        path: the checkpoint file.
    """
    state = _peek(path)
    if isinstance(state, dict):
        for key in STEP_KEYS:
            v = state.get(key)
            if isinstance(v, int) and not isinstance(v, bool):
                return int(v)
    p = Path(path)
    ints = re.findall(r"\d+", p.stem)
    if not ints:  # a folder per checkpoint (checkpoint-50/model.pt), not any folder's digits
        ints = re.findall(r"(?:checkpoint|ckpt|step|epoch|iter|iteration)s?[-_=]?(\d+)$",
                          p.parent.name, flags=re.IGNORECASE)
    return int(ints[-1]) if ints else None


def _peek(path: str) -> Any:
    """The checkpoint's top level, memory-mapped where the format allows (the tensors are not
    read); None when it cannot be read (its worker then records why)."""
    for mmap in (True, False):
        try:
            return torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
        except Exception:  # noqa: BLE001 - an old format refuses mmap; the worker reports
            continue
    return None


# -- one checkpoint ---------------------------------------------------------------------------
class _Runner:
    """One worker's state: the loss and data (built once), the model (rebuilt after a
    failure) and the previous checkpoint's eigenvectors (the warm start)."""

    def __init__(self, loader: Loader, job: _Job, worker: int, device: str) -> None:
        self.loader, self.job, self.worker, self.device = loader, job, worker, device
        self.objects: tuple[Any, Any] | None = None
        self.model: torch.nn.Module | None = None
        self.v0: torch.Tensor | None = None

    def run(self, c: Checkpoint) -> dict[str, Any]:
        t0 = time.perf_counter()
        line = _line(c, self.job, self.worker, self.device, "ok")
        try:
            if self.objects is None:
                self.objects = (self.loader.loss(), self.loader.data())
            if self.model is None:
                self.model = self.loader.model(self.device)
            self.loader.load_state(self.model, c.path, self.device)
            kwargs = {**self.job.kwargs, **self.loader.operator_kwargs(self.model)}
            report = analyze(self.model, *self.objects, progress=False, lr=self.job.lr,
                             v0=self.v0, **kwargs)
        except Exception as exc:  # noqa: BLE001 - recorded on the line; the others go on
            self.model, self.v0 = None, None
            tail = traceback.format_exception(type(exc), exc, exc.__traceback__)
            line.update(status="error", error=_describe(exc),
                        traceback="".join(tail)[-1500:], seconds=time.perf_counter() - t0)
            return line
        self.v0 = report.top_eigenvectors if self.job.warm_start else None
        report.provenance.update(checkpoint=dict(path=c.path, sha256=c.sha256), step=c.step,
                                 **self.loader.provenance())
        top = next((p for p in report.parts if p.get("name") == "top_k"), {})
        line.update(seconds=time.perf_counter() - t0, warm=bool(top.get("warm", False)),
                    top_k_matvecs=top.get("num_matvecs"), lambda_max=report.lambda_max,
                    trace=report.trace, report=report.to_dict())
        return line


def _line(c: Checkpoint, job: _Job, worker: int, device: str, status: str, **more: Any
          ) -> dict[str, Any]:
    """A line of runs.jsonl with its fields in their order, the results still empty."""
    line: dict[str, Any] = dict(
        path=c.path, sha256=c.sha256, step=c.step, status=status, error=None, traceback=None,
        worker=worker, rank=job.rank, device=device, seconds=None, warm=False,
        top_k_matvecs=None, lambda_max=None, trace=None, settings=job.settings, report=None)
    line.update(more)
    return line


# -- processes --------------------------------------------------------------------------------
@dataclass
class _Slot:
    proc: Any
    conn: Any
    held: Checkpoint | None = None
    ready: bool = False
    failed: bool = False


def _pool(loader: Loader, job: _Job, todo: list[Checkpoint], workers: int, device: str,
          bar: Any) -> None:
    """Spawn ``min(workers, len(todo))`` processes and deal them the checkpoints in order; a
    process that dies is recorded on the checkpoint it held and replaced."""
    n = min(workers, len(todo))
    if torch.device(device).type == "cpu":  # N processes share the cores
        job.threads = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // n))
    payload = _payload(loader, job)
    ctx = mp.get_context("spawn")
    pending, live, failures = deque(todo), {}, []

    def start(i: int) -> None:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child, payload, i, _place(device, i)),
                           name=f"hessfast-batch-{i}", daemon=True)
        proc.start()
        child.close()
        live[i] = _Slot(proc, parent)

    def deal(i: int, slot: _Slot) -> None:
        slot.ready, slot.held = True, (pending.popleft() if pending else None)
        try:
            slot.conn.send(slot.held)  # None: no more work, exit
        except OSError:  # it died between two checkpoints: the next one was never started
            if slot.held is not None:
                pending.appendleft(slot.held)
            slot.held = None

    def ended(i: int, slot: _Slot) -> None:
        slot.proc.join(5)
        del live[i]
        code = slot.proc.exitcode
        if slot.held is not None:
            c = slot.held
            if best_lines(read_runs(Path(job.runs)), job.settings).get(
                    (c.path, c.sha256), {}).get("status") != "ok":
                _advance(bar, append_line(Path(job.runs), _line(
                    c, job, i, _place(device, i), "error",
                    error=f"worker {i} died ({_exit_text(code)}) while analyzing {c.path}")))
        if slot.ready and pending:
            start(i)  # a replacement takes the rest of its share
        elif not slot.ready and not slot.failed:
            failures.append(f"worker {i} exited ({_exit_text(code)}) before it was ready")

    for i in range(n):
        start(i)
    try:
        while live:
            waits = {s.conn: (i, s) for i, s in live.items()}
            waits.update({s.proc.sentinel: (i, s) for i, s in live.items()})
            for obj in wait(list(waits)):
                i, slot = waits[obj]
                if live.get(i) is not slot:  # ended earlier in this round
                    continue
                msg = _receive(slot.conn)
                if msg is None:
                    if obj is slot.proc.sentinel or slot.conn.closed or not slot.proc.is_alive():
                        ended(i, slot)
                elif msg[0] == "failed":
                    slot.failed = True
                    failures.append(f"worker {i}: {msg[1]}")
                elif msg[0] == "done":
                    _advance(bar, msg[1])
                    deal(i, slot)
                else:  # "ready"
                    deal(i, slot)
    finally:
        for slot in live.values():
            slot.proc.terminate()
            slot.proc.join(5)
    if pending:
        raise ConfigurationError(
            f"{WHO}: the worker processes could not start: "
            f"{'; '.join(failures) or 'no reason given'}. With "
            "workers > 1 make_model, loss_fn and data are pickled into spawned processes: "
            "define them at module level in an importable module (not in a notebook or an "
            "interactive session), guard a script's entry with if __name__ == '__main__', or "
            "pass workers=1")


def _receive(conn: Any) -> tuple | None:
    """The next message on ``conn`` if one is waiting, else None (also on a broken pipe)."""
    try:
        return conn.recv() if conn.poll() else None
    except (EOFError, OSError):
        conn.close()
        return None


def _worker_main(conn: Any, payload: bytes, worker: int, device: str) -> None:
    """A spawned worker: rebuild the loader, then analyze each checkpoint it is sent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the workers
    try:
        loader, job = pickle.loads(payload)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which explains it
        conn.send(("failed", f"unpickling the problem raised {_describe(exc)}"))
        return
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    runner = _Runner(loader, job, worker, device)
    conn.send(("ready",))
    while True:
        try:
            c = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if c is None:
            return
        line = append_line(Path(job.runs), runner.run(c))
        conn.send(("done", {key: line[key] for key in ("step", "status", "lambda_max")}))


def _payload(loader: Loader, job: _Job) -> bytes:
    """The pickled (loader, job) for the workers; a ConfigurationError naming the object that
    cannot be pickled."""
    try:
        return pickle.dumps((loader, job))
    except Exception as exc:  # noqa: BLE001 - named below
        parts = ([("make_model", loader.make_model), ("loss_fn", loader.loss_fn),
                  ("data", loader.data_)] if isinstance(loader, _Objects)
                 else [("make_model (the Loader)", loader)])
        parts += [(f"analyze keyword {k}", v) for k, v in job.kwargs.items()]
        bad = next((name for name, obj in parts if not _picklable(obj)), "an argument")
        raise ConfigurationError(
            f"{WHO}: workers > 1 send make_model, loss_fn and data to spawned processes, and "
            f"{bad} cannot be pickled ({_describe(exc)}): pass module-level functions and "
            "picklable objects (not lambdas, local functions or open handles), or workers=1"
        ) from exc


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001
        return False
    return True


# -- small rules ------------------------------------------------------------------------------
def _loader(make_model: Any, loss_fn: Any, data: Any) -> Loader:
    if isinstance(make_model, Loader):
        if loss_fn is not None or data is not None:
            raise ConfigurationError(f"{WHO}: a Loader builds the loss and data itself; pass "
                                     "loss_fn=None and data=None with it")
        return make_model
    if not callable(make_model) or isinstance(make_model, torch.nn.Module):
        raise ConfigurationError(
            f"{WHO}: make_model must be a zero-argument function returning a new nn.Module "
            f"(each checkpoint is loaded into it), got {type(make_model).__name__}; for a "
            "model m, pass e.g. a module-level function that builds it")
    if data is None:
        raise ConfigurationError(f"{WHO}: data is required (one batch or a sequence of "
                                 "batches, as for analyze)")
    return _Objects(make_model, loss_fn, data)


def _check_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse the keywords the batch sets itself and those analyze does not take; check the
    numbers before any process starts."""
    from ..curvature import ggn, hessian

    own = [k for k in kwargs if k in OWN]
    if own:
        raise ArgumentTypeError(f"{WHO}: {own} are set by the batch (v0 by warm_start, "
                                "progress by progress=, lr by lr=; num_probes/num_steps are "
                                "the names of probes/steps)")
    known = set(inspect.signature(analyze).parameters)
    for build in (hessian, ggn):
        known |= set(inspect.signature(build).parameters)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ArgumentTypeError(f"{WHO}: unknown keyword arguments {unknown}: analyze takes "
                                f"{', '.join(NUMBERS)} and hf.hessian's / hf.ggn's options")
    for name in ("k", "num_probes", "num_steps"):
        if name in kwargs:
            check_int(name, kwargs[name], 1, who=WHO)
    if "tol" in kwargs:
        check_positive("tol", kwargs["tol"], who=WHO)
    if "seed" in kwargs:
        check_seed(kwargs["seed"], who=WHO)


def _settings(loader: Loader, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The numbers' settings of every line: analyze's keywords (defaults filled in), the
    operator's options and the problem's names."""
    sig = inspect.signature(analyze).parameters
    numbers = {k: _plain(kwargs.get(k, sig[k].default)) for k in NUMBERS}
    options = {k: _plain(v) for k, v in sorted(kwargs.items()) if k not in NUMBERS}
    return {"analyze": numbers, "operator": options, "problem": _plain(loader.describe())}


def _plain(v: Any) -> Any:
    try:
        return jsonable(v, strict=True)
    except Exception:  # noqa: BLE001 - an object without a JSON form is named by its repr
        return repr(v)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _torchrun() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` of a torchrun launch, ``(0, 1, 0)`` otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigurationError(f"{WHO}: RANK/WORLD_SIZE/LOCAL_RANK are not integers "
                                 f"({exc}); unset them or launch with torchrun") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigurationError(f"{WHO}: RANK={rank} is not in [0, WORLD_SIZE={world})")
    return (rank, world, local) if world > 1 else (0, 1, 0)


def _device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError) as exc:
        raise ConfigurationError(f"{WHO}: device {device!r} is not a torch device (cpu, "
                                 f"cuda, cuda:1): {exc}") from None


def _place(device: str, i: int) -> str:
    """Worker ``i``'s device: ``cuda`` spreads over the visible GPUs, others stay."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and torch.cuda.device_count() > 0:
        return f"cuda:{i % torch.cuda.device_count()}"
    return str(d)


def _bar(total: int, progress: bool | None) -> Any:
    if total == 0 or not progress_enabled(progress):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="checkpoints", unit="ckpt", file=sys.stderr,
                dynamic_ncols=True)


def _advance(bar: Any, line: dict[str, Any]) -> None:
    if bar is not None:
        lm = line.get("lambda_max")
        bar.set_postfix(step=line.get("step"), status=line.get("status"),
                        lambda_max="-" if lm is None else f"{lm:.4g}", refresh=False)
        bar.update(1)
