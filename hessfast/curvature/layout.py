"""How the selected parameters map onto the operator's flat vectors ``[n]``: in the given
parameter order, each one row-major."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ArgumentTypeError, ConfigurationError

__all__ = ["ParamLayout"]


class ParamLayout:
    """Offsets of the parameters in a flat vector, and the conversions both ways.

    Args:
        names: parameter names, in flattening order.
        shapes: their shapes.
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[torch.Size]) -> None:
        self.names = list(names)
        self.shapes = [torch.Size(s) for s in shapes]
        self.numels = [s.numel() for s in self.shapes]
        offsets = [0]
        for m in self.numels:
            offsets.append(offsets[-1] + m)
        self.n = offsets[-1]
        self._spans = list(zip(offsets[:-1], offsets[1:], strict=True))

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[..., n]`` -> ``{name: [..., *shape]}`` (views).

        Raises:
            ArgumentTypeError: ``v`` is not a tensor.
            ConfigurationError: ``v``'s last dimension is not ``n``.
        """
        if not isinstance(v, torch.Tensor):
            raise ArgumentTypeError(
                f"unflatten expects a tensor [n] or [k, n] with n = {self.n}, got "
                f"{type(v).__name__}"
            )
        if v.dim() == 0 or v.shape[-1] != self.n:
            raise ConfigurationError(
                f"unflatten expects a vector [{self.n}] or a block [k, {self.n}] (n = {self.n} "
                f"entries of {len(self.names)} parameters), got shape {tuple(v.shape)}: pass "
                "a vector of this operator's size"
            )
        lead = tuple(v.shape[:-1])
        return {
            name: v[..., a:b].reshape(*lead, *shape)
            for name, (a, b), shape in zip(self.names, self._spans, self.shapes, strict=True)
        }

    def flatten(self, tensors: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """``{name: [*shape]}`` or a list in order -> ``[n]``.

        Raises:
            ConfigurationError: a name is missing (other names are ignored), a list has
                the wrong length, or a piece has the wrong number of entries.
        """
        if isinstance(tensors, dict):
            missing = [n for n in self.names if n not in tensors]
            if missing:
                raise ConfigurationError(
                    f"flatten needs every parameter of the operator {self.names}; missing "
                    f"{missing} (got {list(tensors)}): pass a dict with these names (as "
                    "unflatten returns; other names are ignored) or a list in param_names order"
                )
            tensors = [tensors[n] for n in self.names]
        tensors = list(tensors)
        if len(tensors) != len(self.names):
            raise ConfigurationError(
                f"flatten needs {len(self.names)} tensors (one per parameter in param_names "
                f"order {self.names}), got {len(tensors)}"
            )
        for name, t, shape in zip(self.names, tensors, self.shapes, strict=True):
            if not isinstance(t, torch.Tensor) or t.numel() != shape.numel():
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ConfigurationError(
                    f"flatten: {name} must have shape {tuple(shape)} ({shape.numel()} "
                    f"entries), got {got}"
                )
        return torch.cat([t.reshape(-1) for t in tensors])

    def split(self, V: torch.Tensor) -> list[torch.Tensor]:
        """``[c, n]`` -> per parameter ``[c, *shape]`` (views)."""
        c = V.shape[0]
        return [
            V[:, a:b].reshape(c, *shape)
            for (a, b), shape in zip(self._spans, self.shapes, strict=True)
        ]

    def cat(
        self, pieces: Sequence[torch.Tensor | None], c: int, dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor:
        """Per parameter ``[c, *shape]`` (None: zero) -> ``[c, n]`` in ``dtype``."""
        out = []
        for piece, numel in zip(pieces, self.numels, strict=True):
            if piece is None:
                out.append(torch.zeros(c, numel, dtype=dtype, device=device))
            else:
                out.append(piece.reshape(c, numel).to(dtype))
        return torch.cat(out, dim=1)
