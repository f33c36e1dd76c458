"""The one harness of every script in bench/: its flags, its timer, its JSON records and the
name of its results file.

A script imports it as a sibling module (``python bench/<script>.py`` puts bench/ on the
import path; nothing edits ``sys.path``)::

    import _harness as harness
    from hessfast.testing import timeit

    ap = harness.parser(__doc__, "quick", "repeats", "device", repeats=5)
    args = ap.parse_args()
    out = harness.Records("bench_hvp", args)    # --out FILE and/or --save
    t = timeit(lambda: H.matmat(V), repeats=args.repeats, device=args.device)
    out.emit({"case": "mlp", "hvp_s": t.median})  # one stamped JSON line
    out.close()

* **Flags.** :func:`parser` gives ``--out FILE`` (append the records to FILE) and ``--save``
  (append them to the file the naming rule gives); a script asks for the other shared flags
  by name (``quick``, ``repeats``, ``device``, ``threads``) with its own default.
* **Timer.** :func:`hessfast.testing.timeit` (warm-up calls, then timed ones; median and
  best; the device synchronised): no script hand-rolls ``perf_counter`` loops. This module
  itself needs the standard library alone (``compare.py`` only orchestrates processes).
* **Records.** :class:`Records` prints one JSON line per record and appends it to the chosen
  file. Every record gets a ``"stamp"`` object (:func:`stamp`): the script, the UTC date and
  time, the git commit and whether the tree was dirty, the host, CPU model and cores, the GPU
  if torch has one, and the python, torch and hessfast versions. The stamp is one nested key,
  so no field a script printed before changes meaning.
* **Naming rule.** :func:`results_path`: ``bench/results/<name>[_<tag>]-<YYYY-MM-DD>-<commit7>
  [-dirty].<ext>``, where ``<name>`` is the script's file name without ``bench_`` and ``.py``
  and ``<tag>`` says where it ran (the device: ``cpu``, ``cuda``). Files written before the
  rule keep their names (``bench/RESULTS.md`` cites them).
* **Fresh processes.** :func:`run_child` runs a script's ``--child`` mode for one case and
  reads its JSON line back; :func:`import_transformers` imports transformers past a broken
  torchvision.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from typing import Any, TextIO

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")

# The shared flags a script may ask for by name: (help, type, default); "quick" is a switch.
# ``--out`` is always there, ``--save`` unless the script says otherwise.
_FLAGS: dict[str, tuple[str, Any, Any]] = {
    "quick": ("the smallest cases and fewest repeats (a smoke run)", None, False),
    "repeats": ("timed calls per measurement (the median is reported)", int, None),
    "device": ("cpu or cuda", str, "cpu"),
    "threads": ("torch threads (default: torch's own choice)", int, None),
}


# ---------------------------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------------------------
def parser(doc: str | None, *flags: str, raw: bool = False, save: bool = True,
           **defaults: Any) -> argparse.ArgumentParser:
    """The argument parser of a bench script: ``--out``, ``--save`` and the shared ``flags``.

    Args:
        doc: the script's module docstring; its first paragraph is the description (all of
            it with ``raw=True``, printed as written).
        flags: names from ``quick``, ``repeats``, ``device``, ``threads``.
        raw: keep the whole docstring and its line breaks in ``--help``.
        save: offer ``--save`` (False for a script whose default file already follows the
            naming rule).
        defaults: a script's own default per flag name (``repeats=5``); ``<name>_help``
            replaces the flag's help text, ``<name>_choices`` restricts its values
            (``out`` and ``out_help`` likewise for ``--out``).

    Returns:
        an :class:`argparse.ArgumentParser` the script adds its own flags to.
    """
    text = doc or ""
    if raw:
        ap = argparse.ArgumentParser(description=text,
                                     formatter_class=argparse.RawTextHelpFormatter)
    else:
        ap = argparse.ArgumentParser(description=text.split("\n\n")[0])
    ap.add_argument("--out", default=defaults.pop("out", None),
                    help=defaults.pop("out_help", "append the JSON records to this file"))
    if save:
        ap.add_argument("--save", action="store_true",
                        help="also append them to bench/results/<name>[_<tag>]-<date>-"
                        "<commit7>.jsonl (the naming rule, bench/README.md)")
    for name in flags:
        if name not in _FLAGS:
            raise ValueError(f"unknown shared flag {name!r}; choose from {sorted(_FLAGS)}")
        helptext, kind, default = _FLAGS[name]
        default = defaults.pop(name, default)
        helptext = defaults.pop(f"{name}_help", helptext)
        if kind is None:
            ap.add_argument(f"--{name}", action="store_true", help=helptext)
        else:
            extra = {"choices": defaults.pop(f"{name}_choices")} \
                if f"{name}_choices" in defaults else {}
            ap.add_argument(f"--{name}", type=kind, default=default, help=helptext, **extra)
    if defaults:
        raise ValueError(f"defaults for flags not asked for: {sorted(defaults)}")
    return ap


# ---------------------------------------------------------------------------------------------
# the stamp
# ---------------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.cache
def commit() -> str:
    """The repository's HEAD, 7 hex digits (``unknown`` outside a git checkout)."""
    return _git("rev-parse", "--short=7", "HEAD") or "unknown"


@functools.cache
def dirty() -> bool | None:
    """Whether tracked files differ from HEAD (None outside a git checkout)."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu() -> str | None:
    # Only a torch this process already imported is asked: the stamp never imports torch
    # (compare.py's harness runs on the standard library) nor starts CUDA by itself.
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001 - a broken driver is no GPU for the stamp
        return None
    return None


@functools.cache
def _fixed() -> dict[str, Any]:
    torch = sys.modules.get("torch")
    return {
        "commit": commit(), "dirty": dirty(), "host": socket.gethostname(),
        "cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
        "torch": getattr(torch, "__version__", None) or _version("torch"),
        "hessfast": _version("hessfast"),
    }


def stamp(script: str) -> dict[str, Any]:
    """Where and when a record was made: ``script``, ``date`` (UTC, ISO 8601 to the second),
    ``commit``, ``dirty``, ``host``, ``cpu``, ``cores``, ``gpu`` (None without one),
    ``python``, ``torch``, ``hessfast`` (installed versions)."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"script": script, "date": now, **_fixed(), "gpu": _gpu()}


# ---------------------------------------------------------------------------------------------
# the naming rule and the writer
# ---------------------------------------------------------------------------------------------
def results_path(script: str, tag: str | None = None, ext: str | None = "jsonl") -> str:
    """``bench/results/<name>[_<tag>]-<YYYY-MM-DD>-<commit7>[-dirty].<ext>`` (UTC date).

    ``<name>`` is ``script`` without a ``bench_`` prefix (``bench_hvp`` -> ``hvp``,
    ``compare`` -> ``compare``); ``tag`` says where it ran (``cpu``, ``cuda``, ``cuda_quick``).
    ``ext=None`` gives the prefix a script adds its own extensions to (``compare.py``).
    """
    name = script.removeprefix("bench_")
    if tag:
        name += f"_{tag}"
    day = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    suffix = "-dirty" if dirty() else ""
    stem = os.path.join(RESULTS, f"{name}-{day}-{commit()}{suffix}")
    return stem if ext is None else f"{stem}.{ext}"


class Records:
    """The one JSON record writer: each record is stamped, printed as one line on stdout and
    appended to the files ``--out`` and ``--save`` name (a results file is a log: appended,
    never overwritten), or to ``paths``.

    Args:
        script: the script's name (``bench_hvp``): in the stamp and the ``--save`` file name.
        args: the parsed flags (``out``, ``save``); or None for no file from the flags.
        tag: where it ran, for the ``--save`` name (``cpu``, ``cuda``).
        paths: more files to write.
        echo: print each record on stdout (False: files only).
        sort_keys: print the keys sorted (as some scripts always did).
        append: False starts the files afresh (a file that holds one run beside a report of
            that run, as ``compare.py``'s).
    """

    def __init__(self, script: str, args: argparse.Namespace | None = None, *,
                 tag: str | None = None, paths: tuple[str, ...] = (), echo: bool = True,
                 sort_keys: bool = False, append: bool = True) -> None:
        self.script = script
        self.echo = echo
        self.sort_keys = sort_keys
        self.paths: list[str] = []
        if args is not None and getattr(args, "out", None):
            self.paths.append(args.out)
        if args is not None and getattr(args, "save", False):
            self.paths.append(results_path(script, tag))
        self.paths += list(paths)
        self._sinks: list[TextIO] = []
        for path in self.paths:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._sinks.append(open(path, "a" if append else "w"))  # noqa: SIM115 - close()

    def emit(self, record: dict[str, Any]) -> dict[str, Any]:
        """Stamp ``record`` (a new dict: the argument is left as it was), print and append it.

        Returns:
            the stamped record.
        """
        rec = {**record, "stamp": stamp(self.script)}
        line = json.dumps(rec, sort_keys=self.sort_keys)
        if self.echo:
            print(line, flush=True)
        for sink in self._sinks:
            sink.write(line + "\n")
            sink.flush()
        return rec

    def close(self) -> None:
        """Close the files."""
        for sink in self._sinks:
            sink.close()
        self._sinks = []

    def __enter__(self) -> Records:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# fresh processes
# ---------------------------------------------------------------------------------------------
def run_child(script_file: str, spec: dict[str, Any], *, timeout: float | None = None
              ) -> tuple[dict[str, Any] | None, str]:
    """Run ``python <script_file> --child SPEC`` in a fresh process from the repository root.

    A script that measures one-time costs (set-up, peak memory) runs each case this way and
    answers in its ``--child`` mode with one JSON line on stdout.

    Returns:
        (the child's last stdout line as a dict, or None when it failed; its stderr).
    """
    proc = subprocess.run([sys.executable, script_file, "--child", json.dumps(spec)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return None, proc.stderr
    return json.loads(lines[-1]), proc.stderr


def import_transformers():
    """transformers, with a broken torchvision (a wheel built for another torch) hidden from
    it: transformers treats an absent torchvision as optional. Its logging is set to errors."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - "operator torchvision::nms does not exist"
        sys.modules["torchvision"] = None
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers
