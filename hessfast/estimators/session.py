"""What every estimator run shares: probes from the private generator, products in chunks
(counted and checked), the exact diagonal from unit vectors, the budget rule and the sample
statistics."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from .._checks import (
    STREAM_BYTES,
    Products,
    as_operator,
    check_budget,
    keyed_probes,
    probe_generator,
    probe_key,
    sample_probes,
    work_dtype,
)
from ..errors import ConfigurationError
from ..linop import LinearOperator

__all__ = ["MIN_MATVECS", "Session", "max_matvecs_arg", "mean_stderr", "renamed_arg"]

#: Fewest products each method needs when it cannot afford the exact computation (n products).
MIN_MATVECS = {"hutchinson": 1, "hutch++": 3, "xtrace": 2, "xdiag": 2}
#: Unit vectors per pass on the exact path when no chunk_size is given (memory: rows x n).
EXACT_BLOCK = 1024
#: Most bytes of one block of probes (and of its products): a budget of any size streams
#: through blocks of at most this many rows x n, so memory never grows with the budget.
BLOCK_BYTES = STREAM_BYTES
_DEFAULT_BUDGET = 99


class Session:
    """One estimator run on ``A`` (validated here): probes ``[k, n]`` with ``E[z z^T] = I``
    from a private CPU generator (so the result does not depend on the device), and products
    in the working dtype (float64 for float64 operators, else float32), at most
    ``chunk_size`` rows per ``matmat``."""

    def __init__(
        self, A: Any, who: str, *, seed: int, probe: str = "rademacher",
        chunk_size: int | None = None,
    ) -> None:
        self.A: LinearOperator = as_operator(A, who)
        self.n = int(self.A.shape[0])
        self.work = work_dtype(self.A.dtype)
        self.device = torch.device(self.A.device)
        # sharded vectors (A.shards): each rank draws its slice from a (seed, rank) key
        self.gen = (probe_generator(seed) if self.A.shards is None
                    else probe_generator(probe_key(seed, int(getattr(self.A.shards, "rank", 0)))))
        self.seed = seed
        self.probe = probe
        #: mesh runs: the index of the next probe, drawn from its own generator keyed by
        #: (seed, index) (:func:`hessfast._checks.keyed_probes`); None: the stream of ``gen``
        self.key: int | None = None
        self.chunk_size = chunk_size
        self.products = Products(self.A, self.work, who)

    @property
    def matvecs(self) -> int:
        """Products with ``A`` made by this run so far (rows of all its ``matmat`` calls)."""
        return self.products.num_matvecs

    @property
    def passes(self) -> int:
        """``matmat`` calls (data passes) made by this run so far."""
        return self.products.num_passes

    def probes(self, k: int) -> torch.Tensor:
        """``[k, n]`` probes in the working dtype on ``A.device``: the next k of ``gen``'s
        stream, or with :attr:`key` set the probes of indices ``key .. key + k - 1``."""
        if self.key is None:
            return sample_probes(self.gen, k, self.n, self.probe, dtype=self.work,
                                 device=self.device)
        first, self.key = self.key, self.key + k
        return keyed_probes(self.seed, range(first, first + k), self.n, self.probe,
                            dtype=self.work, device=self.device)

    @property
    def max_rows(self) -> int:
        """Most rows of one block: ``BLOCK_BYTES`` of probes in the working dtype (>= 1)."""
        row = max(self.n, 1) * torch.finfo(self.work).bits // 8
        return max(1, BLOCK_BYTES // row)

    def chunks(self, k: int, default_cap: int | None = None) -> list[int]:
        """Rows per ``matmat`` call for a block of k rows: ``chunk_size`` (or ``default_cap``,
        else all k) caps them, and so does :attr:`max_rows` (memory bounded whatever k)."""
        cap = min(self.chunk_size or default_cap or max(k, 1), self.max_rows)
        return [min(cap, k - i) for i in range(0, k, cap)]

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """``A`` applied to the rows of ``V: [k, n]``, one ``matmat`` per chunk."""
        outs = []
        start = 0
        for size in self.chunks(V.shape[0]):
            outs.append(self.apply_block(V[start : start + size]))
            start += size
        return torch.cat(outs, dim=0) if len(outs) != 1 else outs[0]

    def apply_block(self, V: torch.Tensor) -> torch.Tensor:
        """``A V`` for ``V: [k, n]`` in ONE ``matmat`` (the caller sized the block)."""
        return self.products(V)

    def exact_diagonal(self) -> torch.Tensor:
        """``diag(A)`` from the n unit vectors, in blocks: ``[n]`` in the working dtype."""
        d = torch.empty(self.n, dtype=self.work, device=self.device)
        start = 0
        for size in self.chunks(self.n, EXACT_BLOCK):
            E = torch.zeros((size, self.n), dtype=self.work, device=self.device)
            idx = torch.arange(size, device=self.device)
            E[idx, start + idx] = 1.0
            AE = self.apply_block(E)
            d[start : start + size] = AE[idx, start + idx]
            start += size
        return d

    def budget(self, method: str, max_matvecs: Any) -> int:
        """``max_matvecs`` checked against what ``method`` needs at this n."""
        need = min(MIN_MATVECS[method], max(self.n, 1))
        return check_budget(
            "max_matvecs", max_matvecs, need, what=f"method={method!r} at n = {self.n}",
            who=self.products.who,
        )


def max_matvecs_arg(max_matvecs: Any, num_matvecs: Any, who: str) -> Any:
    """The budget from ``max_matvecs`` or its deprecated alias ``num_matvecs`` (the name of
    the argument until 0.1; ``num_matvecs`` now means products *spent*, on every result)."""
    return renamed_arg(
        max_matvecs, num_matvecs, "max_matvecs", "num_matvecs", who, default=_DEFAULT_BUDGET,
        what="the budget", stacklevel=4,
        why="the budget is now called max_matvecs (num_matvecs is the count spent, on the "
            "result)",
    )


def renamed_arg(new: Any, old: Any, new_name: str, old_name: str, who: str, *,
                default: Any = None, stacklevel: int = 3, what: str | None = None,
                why: str | None = None) -> Any:
    """The value of a renamed argument: ``new`` (the new name's value) or, with a
    DeprecationWarning naming ``new_name``, ``old`` (the deprecated name's; ``None`` when it was
    not passed). Both given (``new`` not at its ``default``): ConfigurationError.

    ``what`` names the quantity in that error ("pass the budget once, as max_matvecs");
    ``why`` replaces the warning's "use NEW=..." ending. ``stacklevel`` points the warning at
    the user's call (3: the caller of the public function that calls this)."""
    if old is None:
        return new
    if new is not default and (default is None or new != default):
        once = f"{what} once, as {new_name}" if what else f"{new_name} once"
        raise ConfigurationError(
            f"{who}: pass {once} ({old_name} is its deprecated old name), got "
            f"{new_name}={new!r} and {old_name}={old!r}"
        )
    warnings.warn(
        f"{who}({old_name}=...) is deprecated and will be removed in the next release: "
        f"{why or f'use {new_name}=...'}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return old


def mean_stderr(samples: torch.Tensor) -> tuple[float, float]:
    """Sample mean and ``std / sqrt(m)`` (unbiased variance); stderr inf for one sample."""
    m = samples.numel()
    mean = float(samples.mean())
    if m < 2:
        return mean, math.inf
    return mean, float(samples.std(unbiased=True)) / math.sqrt(m)

