"""Progress bars of operator products on long calls.

:func:`track` shows a tqdm bar of the products (``A.num_matvecs`` increments, unit
"products") made while it is active. Every long entry point (``eigsh``, ``lambda_max``,
``power_iteration``, ``spectral_density``, ``trace``, ``diagonal``, ``condition_number``)
wraps its work in one, and takes ``progress: bool | None = None``:

- ``None`` (default): a bar when stderr is a terminal and the environment variable
  ``HESSFAST_PROGRESS`` is not ``"0"`` (``"1"`` shows it even when stderr is not a terminal);
- ``True``: always a bar (on stderr); ``False``: never.

How products are counted: :data:`hessfast.linop.PRODUCT_LISTENERS` is a context variable of
callbacks that :meth:`LinearOperator.matmat` calls with the number of vectors multiplied. With
no bar it is empty (one lookup per ``matmat``); the callback only adds an int (no tensor is
read, so nothing synchronises a GPU). Operators that are not :class:`LinearOperator`
subclasses (duck-typed ``matmat``) are not counted while running; the bar is brought up to
their ``num_matvecs`` at the end.

Nesting: only the outermost :func:`track` shows a bar (``condition_number`` calling ``eigsh``
gives one bar); inner ones are silent, whatever their ``enabled``. The bar opens on the first
product, so a call that fails validation prints nothing. tqdm is imported only when a bar is
shown; without tqdm there is no bar and no error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from .errors import ArgumentTypeError
from .linop import PRODUCT_LISTENERS

__all__ = ["check_progress", "progress_enabled", "set_postfix", "set_total", "track"]

#: the tracker of the outermost active :func:`track` in this context (None: none active)
_ACTIVE: ContextVar[_Tracker | None] = ContextVar("hessfast_progress_active", default=None)


def check_progress(progress: Any, who: str) -> bool | None:
    """``progress`` validated: ``True``, ``False`` or ``None``."""
    if progress is not None and not isinstance(progress, bool):
        raise ArgumentTypeError(
            f"{who}: progress must be True, False or None (a bar when stderr is a terminal), "
            f"got {progress!r}"
        )
    return progress


def progress_enabled(enabled: bool | None) -> bool:
    """Whether a bar is shown for ``enabled``: itself when a bool; for ``None``, stderr is a
    terminal and ``HESSFAST_PROGRESS`` is not ``"0"`` (``"1"`` forces it on)."""
    if enabled is not None:
        return bool(enabled)
    env = os.environ.get("HESSFAST_PROGRESS", "").strip()
    if env == "0":
        return False
    if env == "1":
        return True
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


class _Tracker:
    """The state of one shown bar: created on the first product (lazily imports tqdm)."""

    def __init__(self, A: Any, desc: str, total: int | None) -> None:
        self.desc = desc
        self.total = total
        self.count = 0
        self.bar: Any = None
        self.failed = False  # tqdm missing: stay silent
        self.postfix: dict[str, Any] = {}
        self.duck = getattr(A, "num_matvecs", None) if not _is_linop(A) else None

    def __call__(self, k: int) -> None:
        self.count += k
        if self.bar is None:
            if self.failed or not self._open():
                return
        self.bar.update(k)

    def _open(self) -> bool:
        try:
            from tqdm import tqdm
        except ImportError:
            self.failed = True
            return False
        self.bar = tqdm(total=self.total, desc=self.desc, unit="products", file=sys.stderr,
                        dynamic_ncols=True, leave=True, initial=0)
        if self.postfix:
            self.bar.set_postfix(self.postfix, refresh=False)
        return True

    def close(self, ok: bool, A: Any) -> None:
        if self.duck is not None and isinstance(getattr(A, "num_matvecs", None), int):
            more = A.num_matvecs - self.duck - self.count
            if more > 0:
                self(more)
        if self.bar is None:
            return
        if ok:  # finished early (converged) or past the plan: show the count as 100%
            self.bar.total = self.bar.n
            self.bar.refresh()
        self.bar.close()


def _is_linop(A: Any) -> bool:
    from .linop import LinearOperator

    return isinstance(A, LinearOperator)


@contextmanager
def track(
    A: Any, desc: str, total: int | None = None, enabled: bool | None = None
) -> Iterator[None]:
    """Show a tqdm bar of the products of ``A`` made while active (see the module docstring).

    Args:
        A: the operator (any :class:`LinearOperator`'s products are counted, including one
            wrapped from a tensor inside the call).
        desc: the bar's label, e.g. ``"eigsh"``.
        total: planned products (the budget), or None; settable later with :func:`set_total`.
            A run that ends earlier (converged) shows its count as the total.
        enabled: True / False / None (auto: :func:`progress_enabled`).
    """
    check_progress(enabled, desc)
    outer = _ACTIVE.get()
    if outer is not None:  # nested: the outermost bar counts these products already
        yield
        return
    tracker = _Tracker(A, desc, total) if progress_enabled(enabled) else None
    token = _ACTIVE.set(tracker if tracker is not None else _SILENT)
    ltoken = None
    if tracker is not None:
        ltoken = PRODUCT_LISTENERS.set((*PRODUCT_LISTENERS.get(), tracker))
    ok = False
    try:
        yield
        ok = True
    finally:
        if ltoken is not None:
            PRODUCT_LISTENERS.reset(ltoken)
        _ACTIVE.reset(token)
        if tracker is not None:
            tracker.close(ok, A)


#: marks "a silent outermost track is active" (progress=False), so inner ones stay silent too
_SILENT = _Tracker(None, "", None)


def set_total(total: int) -> None:
    """Set the planned products of the active bar, unless it already has a total (an outer
    call's plan wins over an inner call's budget). No effect without a bar."""
    t = _ACTIVE.get()
    if t is not None and t is not _SILENT and t.total is None:
        t.total = int(total)
        if t.bar is not None:
            t.bar.total = t.total
            t.bar.refresh()


def set_postfix(**values: Any) -> None:
    """Show ``key=value`` after the active bar (e.g. the current Ritz value); shown at the
    bar's next refresh. No effect without a bar."""
    t = _ACTIVE.get()
    if t is None or t is _SILENT:
        return
    t.postfix.update(values)
    if t.bar is not None:
        t.bar.set_postfix(t.postfix, refresh=False)
