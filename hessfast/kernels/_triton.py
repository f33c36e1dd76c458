"""Whether and where hessfast's Triton kernels can run: ONE rule for every kernel, both
dispatchers (:mod:`hessfast.ops` and :func:`hessfast.kernels.ce_curvature.ce_backend`) and
``hessfast info``.

- :func:`import_error`: why Triton is unusable here (``"ImportError: ..."``), or None. The
  import is tried once per process and its outcome cached: Triton's import is slow, and its
  answer does not change while the process runs.
- :func:`available`: ``import_error() is None``; :func:`version`: Triton's version, or None.
- :func:`load`: the lazy loader, ``(triton, triton.language)`` for a kernel module's first
  launch, or :class:`~hessfast.errors.BackendUnavailableError` naming the import error.
- :func:`runs_on` / :func:`interpreted`: which device types a Triton kernel can take.

Importing this module never imports Triton.
"""

from __future__ import annotations

import os
from types import ModuleType

from hessfast.errors import BackendUnavailableError

__all__ = ["available", "import_error", "interpreted", "load", "runs_on", "version"]

# The cached outcome of `import triton`: _UNTRIED until the first question, then None (it
# imported) or the exception it raised. Tests set it to simulate a missing Triton.
_UNTRIED = object()
_failure: object = _UNTRIED


def _import_failure() -> BaseException | None:
    """The exception ``import triton`` raised in this process (tried once), or None."""
    global _failure
    if _failure is _UNTRIED:
        try:
            import triton  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any failure means "no Triton backend"
            _failure = exc
        else:
            _failure = None
    return _failure  # type: ignore[return-value]


def import_error() -> str | None:
    """None when ``import triton`` works here, else why not (``"ImportError: ..."``; tried
    once per process)."""
    exc = _import_failure()
    return None if exc is None else f"{type(exc).__name__}: {exc}"


def available() -> bool:
    """Whether ``import triton`` works here (:func:`import_error` is None)."""
    return _import_failure() is None


def version() -> str | None:
    """Triton's ``__version__`` where it imports (:func:`available`), else None."""
    if not available():
        return None
    import triton

    return getattr(triton, "__version__", None)


def load(needs: str, otherwise: str) -> tuple[ModuleType, ModuleType]:
    """``(triton, triton.language)`` for a kernel module that builds its kernels on first use.

    Args:
        needs: the start of the error message, e.g. ``"the fused ... kernel needs Triton"``.
        otherwise: what to do instead, the end of the message (after "or ").

    Raises:
        BackendUnavailableError: Triton does not import here (the message quotes the
            import's error and says ``pip install triton``).
    """
    exc = _import_failure()
    if exc is None:
        try:
            import triton
            import triton.language as tl
        except Exception as err:  # noqa: BLE001 - e.g. triton.language alone failing
            exc = err
        else:
            return triton, tl
    raise BackendUnavailableError(
        f"{needs}, which does not import here ({exc}); install it with `pip install triton`, "
        f"or {otherwise}") from exc


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, read by
    Triton at import: tests only, tiny shapes)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(device_type: str) -> bool:
    """Whether a Triton kernel can take tensors of ``device_type``: CUDA, or the CPU under
    the interpreter."""
    return device_type == "cuda" or (device_type == "cpu" and interpreted())
