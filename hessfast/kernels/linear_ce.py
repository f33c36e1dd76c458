"""The GGN block of a linear LM head followed by cross-entropy, chunked over tokens.

For hidden states ``h`` ``[N, d]``, a head ``logits = h W^T + b`` (``W`` ``[V, d]``, ``b``
``[V]`` or None) and ``cross_entropy(logits, targets)`` (``ignore_index`` rows masked, mean or
sum reduction), the generalized Gauss-Newton matrix restricted to the head's inputs and
parameters ``(h, W, b)`` applied to k directions ``(dh, dW, db)`` is ``J^T H J``:

    ``u  = dh W^T + h dW^T + db``      ``[k, N, V]``   (J: the logits' directional derivative)
    ``q  = H_CE u``                    ``[k, N, V]``   (:func:`ce_hessian_product`, scaled)
    ``gh = q W`` ``[k, N, d]``,   ``gW = q^T h`` ``[k, V, d]``,   ``gb = sum_rows q`` ``[k, V]``

:func:`linear_ce_ggn_product` computes this without ever holding ``u`` or ``q`` (or the
logits) for all N rows: it loops over chunks of ``c`` tokens, builds the chunk's logits
``[c, V]``, ``u`` and ``q`` ``[k, c, V]`` with matmuls and the row kernel, writes the chunk's
rows of ``gh`` and accumulates ``gW`` and ``gb`` in place.

Memory besides the inputs and outputs, independent of N: per chunk the logits ``[c, V]`` and a
few ``[k, c, V]`` buffers in the compute dtype (``u``, ``q``, and the torch row product's own
temporaries on the CPU path: about 4 such buffers at the peak), the chunk's ``[k, c, d]`` rows,
and for low-precision inputs a float32 accumulator for ``gW`` ``[k, V, d]`` plus one
``[k, V, d]`` chunk partial. ``c`` is ``chunk_tokens``, or by default the largest count whose
``[k, c, V]`` compute-dtype buffer fits ``chunk_bytes`` (256 MiB).

Chunk size trade-off (not measured here): every chunk reads and writes the ``[k, V, d]``
``gW`` accumulator once, while its matmuls do ``O(k c V d)`` work, so very small chunks
(large k and V under a small budget) spend their time on that traffic rather than on the
matmuls; raise ``chunk_bytes`` when memory allows.

Precision: float64 inputs are computed in float64 throughout. For float32/bfloat16/float16
inputs the matmuls run in the input dtype (cuBLAS accumulates in float32; upcasting ``W`` or
``dW`` would cost a ``[V, d]``-sized copy each), their results are upcast to float32 for the
sum forming ``u``, the softmax, ``q``, the loss, and the ``gW``/``gb`` accumulators; ``q`` is
rounded to the input dtype for the two matmuls ``q W`` and ``q^T h``. Outputs have the input
dtype. The loss scale ``1/num_valid`` is a device tensor; the loop never synchronises with the
host.
"""

from __future__ import annotations

import torch

from hessfast.errors import BackendUnavailableError, ConfigurationError
from hessfast.kernels._triton import runs_on
from hessfast.kernels.ce_curvature import (
    ce_hessian_product,
    ce_hessian_product_reference,
    ce_hessian_product_triton,
)

__all__ = ["choose_chunk_tokens", "linear_ce_ggn_product"]

DEFAULT_CHUNK_BYTES = 256 * 2**20
_BACKENDS = ("auto", "torch", "triton")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _validate(h, weight, bias, targets, dh, dW, db, reduction, chunk_tokens, backend) -> None:
    """Shapes, dtypes, devices and options; raises ConfigurationError naming the argument."""
    for name, t in (("h", h), ("weight", weight), ("targets", targets), ("dh", dh), ("dW", dW)):
        if not isinstance(t, torch.Tensor):
            raise ConfigurationError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if h.dim() != 2:
        raise ConfigurationError(f"h must be the hidden states [N, d], got shape {_shape(h)}; "
                                 "flatten batch and sequence dims with h.reshape(-1, d)")
    n, d = h.shape
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ConfigurationError(f"weight must be [V, d] = [V, {d}] (the head's "
                                 f"nn.Linear.weight), got shape {_shape(weight)}")
    v = weight.shape[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or _shape(bias) != (v,)):
        raise ConfigurationError(f"bias must be [V] = [{v}] or None, got "
                                 f"{_shape(bias) if isinstance(bias, torch.Tensor) else bias!r}")
    if _shape(targets) != (n,) or targets.is_floating_point() or targets.is_complex():
        raise ConfigurationError(f"targets must be integer class indices of shape [N] = [{n}], "
                                 f"got {targets.dtype} of shape {_shape(targets)}; flatten them "
                                 "like h and pass class indices, not probabilities")
    if dh.dim() != 3 or _shape(dh)[1:] != (n, d):
        raise ConfigurationError(f"dh must be [k, N, d] = [k, {n}, {d}], got shape {_shape(dh)}; "
                                 "add a leading direction dim (dh[None]) for one direction")
    k = dh.shape[0]
    if _shape(dW) != (k, v, d):
        raise ConfigurationError(f"dW must be [k, V, d] = [{k}, {v}, {d}], got shape "
                                 f"{_shape(dW)}")
    if db is not None:
        if bias is None:
            raise ConfigurationError("db was given but bias is None: a head without a bias has "
                                     "no bias direction; pass db=None")
        if not isinstance(db, torch.Tensor) or _shape(db) != (k, v):
            raise ConfigurationError(f"db must be [k, V] = [{k}, {v}] or None, got "
                                     f"{_shape(db) if isinstance(db, torch.Tensor) else db!r}")
    floats = [("h", h), ("weight", weight), ("dh", dh), ("dW", dW)]
    floats += [("bias", bias)] if bias is not None else []
    floats += [("db", db)] if db is not None else []
    for name, t in floats:
        if not t.is_floating_point():
            raise ConfigurationError(f"{name} must be floating point, got {t.dtype}")
        if t.dtype != h.dtype:
            raise ConfigurationError(f"{name} has dtype {t.dtype} but h has {h.dtype}: pass all "
                                     f"floating inputs in one dtype ({name}.to(h.dtype))")
    for name, t in floats + [("targets", targets)]:
        if t.device != h.device:
            raise ConfigurationError(f"{name} is on {t.device} but h is on {h.device}: move "
                                     f"it with {name}.to(h.device)")
    if reduction not in ("mean", "sum"):
        raise ConfigurationError(f"reduction must be 'mean' or 'sum', got {reduction!r} "
                                 "('none' has no scalar loss whose curvature this is)")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool)
                                     or not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ConfigurationError(f"chunk_tokens must be a positive int or None (choose from "
                                 f"chunk_bytes), got {chunk_tokens!r}")
    if backend not in _BACKENDS:
        raise ConfigurationError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def choose_chunk_tokens(n: int, k: int, v: int, dtype: torch.dtype,
                        chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """The chunk size ``c`` in tokens: the largest with ``k * c * V * itemsize(dtype) <=
    chunk_bytes`` (at least 1, at most ``n``). ``dtype`` is the compute dtype (float32 or
    float64)."""
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ConfigurationError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    per_token = max(1, k * v * torch.empty((), dtype=dtype).element_size())
    return max(1, min(max(n, 1), chunk_bytes // per_token))


def _row_product(backend: str, device: torch.device):
    """The ``ce_hessian_product`` implementation for ``backend``."""
    if backend == "torch":
        return ce_hessian_product_reference
    if backend == "triton":
        if not runs_on(device.type):
            raise BackendUnavailableError(
                f"backend='triton' needs CUDA tensors (got {device}), or TRITON_INTERPRET=1 set "
                "before Triton is imported to run the kernel on the CPU; use backend='auto'")
        return ce_hessian_product_triton
    return ce_hessian_product


def linear_ce_ggn_product(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    dh: torch.Tensor,
    dW: torch.Tensor,
    db: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_tokens: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    backend: str = "auto",
    return_loss: bool = False,
) -> tuple:
    """The head's GGN ``J^T H_CE J`` applied to k directions, chunked over tokens.

    Args:
        h: ``[N, d]`` hidden states entering the head.
        weight: ``[V, d]`` head weight (``logits = h @ weight.T + bias``).
        bias: ``[V]`` or None.
        targets: ``[N]`` integer classes; rows equal to ``ignore_index`` do not count.
        dh: ``[k, N, d]`` directions for ``h``.
        dW: ``[k, V, d]`` directions for ``weight``.
        db: ``[k, V]`` directions for ``bias``, or None (zero; must be None when bias is).
        ignore_index: the target value of masked rows.
        reduction: ``"mean"`` (scale ``1 / num_valid``) or ``"sum"`` (scale 1).
        chunk_tokens: rows per chunk; None picks :func:`choose_chunk_tokens`.
        chunk_bytes: the budget for one ``[k, c, V]`` compute-dtype buffer when
            ``chunk_tokens`` is None.
        backend: the row product: ``"auto"`` (Triton on CUDA when it imports, else torch),
            ``"torch"``, or ``"triton"`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``).
        return_loss: also return the cross-entropy loss (0-d, compute dtype), computed from the
            same chunks' logits.

    Returns:
        ``(gh, gW, gb)``, or ``(gh, gW, gb, loss)`` with ``return_loss``: ``gh`` ``[k, N, d]``,
        ``gW`` ``[k, V, d]``, ``gb`` ``[k, V]`` (None when ``bias`` is None), in the input
        dtype. With every row ignored all three are zero and the loss is 0 (torch's mean
        cross-entropy would be NaN).

    Raises:
        ConfigurationError: a bad shape, dtype, device or option (the message names it).
        BackendUnavailableError: ``backend="triton"`` where Triton cannot run.
    """
    _validate(h, weight, bias, targets, dh, dW, db, reduction, chunk_tokens, backend)
    row_product = _row_product(backend, h.device)
    n, d = h.shape
    k, v = dh.shape[0], weight.shape[0]
    dt = h.dtype
    cdt = torch.float64 if dt == torch.float64 else torch.float32
    low = dt != cdt
    dev = h.device
    if return_loss and n > 0:
        valid_t = targets[targets != ignore_index]
        if valid_t.numel() and bool(((valid_t < 0) | (valid_t >= v)).any()):  # one sync, once
            raise ConfigurationError(f"targets must lie in [0, V) = [0, {v}) or equal "
                                     f"ignore_index={ignore_index}")
    with torch.no_grad():
        mask = targets != ignore_index                                 # [N]
        if reduction == "mean":
            scale = 1.0 / mask.sum().clamp(min=1).to(cdt)              # 0-d, on the device
        else:
            scale = torch.ones((), dtype=cdt, device=dev)
        c = chunk_tokens if chunk_tokens is not None else choose_chunk_tokens(
            n, k, v, cdt, chunk_bytes)
        gh = torch.empty((k, n, d), dtype=dt, device=dev)
        gW_acc = torch.zeros((k, v, d), dtype=cdt, device=dev)
        gb_acc = torch.zeros((k, v), dtype=cdt, device=dev) if bias is not None else None
        loss_acc = torch.zeros((), dtype=cdt, device=dev)
        wt = weight.T                                                  # [d, V] view
        dWt = dW.transpose(1, 2)                                       # [k, d, V] view
        for s in range(0, n, c):
            e = min(n, s + c)
            h_c = h[s:e]                                               # [c, d]
            logits = h_c @ wt if bias is None else torch.addmm(bias, h_c, wt)   # [c, V]
            u = (dh[:, s:e] @ wt).to(cdt)                              # [k, c, V]
            if low:
                u += torch.matmul(h_c, dWt).to(cdt)
            else:
                u.baddbmm_(h_c.expand(k, -1, -1), dWt)
            if db is not None:
                u += db.to(cdt)[:, None, :]
            if return_loss:
                lc = logits.to(cdt)
                m_c = mask[s:e]
                picked = lc.gather(1, torch.where(m_c, targets[s:e], 0)[:, None])[:, 0]
                loss_acc += torch.where(m_c, torch.logsumexp(lc, dim=1) - picked, 0).sum()
                del lc
            q = row_product(logits, u, mask=mask[s:e], scale=scale)   # [k, c, V], cdt
            del u, logits
            if bias is not None:
                gb_acc += q.sum(dim=1)
            qm = q.to(dt) if low else q
            del q
            gh[:, s:e] = qm @ weight                                   # [k, c, d]
            if low:
                gW_acc += torch.matmul(qm.transpose(1, 2), h_c).to(cdt)
            else:
                gW_acc.baddbmm_(qm.transpose(1, 2), h_c.expand(k, -1, -1))
            del qm
        gW = gW_acc.to(dt) if low else gW_acc
        gb = None if gb_acc is None else (gb_acc.to(dt) if low else gb_acc)
    if return_loss:
        return gh, gW, gb, loss_acc * scale
    return gh, gW, gb
