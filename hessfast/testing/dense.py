"""Dense float64 curvature references, built the naive way so they can be trusted.

* :func:`dense_hessian_reference`: the Hessian of the sample-size-weighted mean loss, column by
  column from plain double-backward products with the unit vectors (``torch.autograd.grad``
  twice, no vmap). Not ``torch.func.hessian`` (jacfwd of jacrev): in torch 2.13 it returns a
  wrong, non-symmetric Hessian for a Linear-LayerNorm-Tanh network (entries off by 0.013 of
  0.5), while double backward, ``vmap(jvp(grad))`` and finite differences agree to 1e-10.
* :func:`dense_ggn_reference`: the generalised Gauss-Newton ``sum_b (B_b / N) J_b^T H_b J_b``
  from an explicit Jacobian and the explicit Hessian of the loss w.r.t. the outputs.

Both cost one backward per parameter (or output) entry: for models of a few thousand
parameters, as oracles in tests. They take the same ``(model, loss_fn, data)`` as
:func:`hessfast.hessian` and leave the model's modes and buffers as they found them.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = [
    "assert_symmetric",
    "compute_loss",
    "curvature_mode",
    "default_batch_size",
    "dense_ggn_reference",
    "dense_hessian_reference",
    "is_model_form",
    "select_params",
]


def is_model_form(loss_fn: Callable, loss_form: str = "auto") -> bool:
    """Whether the references call ``loss_fn(model, batch)`` (else ``loss_fn(model(x), y)``).

    ``loss_form="model"`` or ``"criterion"`` decides; ``"auto"`` takes the model form when the
    first parameter of ``loss_fn`` is named ``model``. A deliberately simple rule of the
    references' own: pass ``loss_form`` whenever the name does not say it.
    """
    if loss_form == "model":
        return True
    if loss_form == "criterion":
        return False
    try:
        params = list(inspect.signature(loss_fn).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0] == "model"


def compute_loss(model, loss_fn, batch, loss_form: str = "auto") -> torch.Tensor:
    """The scalar loss of one batch in either form (see :func:`is_model_form`)."""
    if is_model_form(loss_fn, loss_form):
        return loss_fn(model, batch)
    inputs, targets = batch
    return loss_fn(model(inputs), targets)


def default_batch_size(batch) -> int:
    """Samples in a batch: the leading dimension of its first tensor that has one (dicts,
    tuples, lists; 0-d tensors such as a temperature are skipped)."""
    stack = [batch]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor):
            if item.dim() > 0:
                return int(item.shape[0])
        elif isinstance(item, dict):
            stack[:0] = list(item.values())
        elif isinstance(item, (tuple, list)):
            stack[:0] = list(item)
    raise TypeError(f"cannot size a batch of type {type(batch).__name__}: no tensor has a "
                    "leading dimension (pass batch_size_fn)")


def select_params(model: nn.Module, params=None) -> list[tuple[str, torch.Tensor]]:
    """(name, param) pairs in the order given (names or tensors), or all trainable ones in
    ``named_parameters`` order when ``params`` is None."""
    named = list(model.named_parameters())
    if params is None:
        return [(n, p) for n, p in named if p.requires_grad]
    by_name = dict(named)
    by_id = {id(p): n for n, p in named}
    out = []
    for p in params:
        if isinstance(p, str):
            out.append((p, by_name[p]))
        else:
            out.append((by_id[id(p)], p))
    return out


@contextlib.contextmanager
def curvature_mode(model: nn.Module, bn_mode: str = "eval") -> Iterator[None]:
    """Run the block in the given bn_mode; restore training flags and buffers after."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        if bn_mode == "eval":
            model.eval()
        elif bn_mode == "train":
            model.eval()
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
        elif bn_mode != "as_is":
            raise ValueError(bn_mode)
        yield
    finally:
        for m, t in flags:
            m.training = t
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _flat(grads, plist) -> torch.Tensor:
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(grads, plist, strict=True)
        ]
    )


def assert_symmetric(M: torch.Tensor, rtol: float = 1e-10, what: str = "matrix") -> None:
    """Raise AssertionError unless ``||M - M^T||_F <= rtol ||M||_F`` (or M is exactly symmetric)."""
    scale = max(float(M.norm()), 1e-300)
    asym = float((M - M.T).norm())
    if not (asym <= rtol * scale or asym == 0.0):
        raise AssertionError(f"{what} not symmetric: {asym:.3e} vs {scale:.3e}")


def _as_batch_list(batches):
    if isinstance(batches, (tuple, dict)):
        return [batches]
    return list(batches)


def _layout(model: nn.Module, batches, params, batch_size_fn: Callable | None):
    """The batch list, the selected parameters, ``n``, each batch's size and their sum."""
    batches = _as_batch_list(batches)
    plist = [p for _, p in select_params(model, params)]
    sizes = [(batch_size_fn or default_batch_size)(b) for b in batches]
    return batches, plist, sum(p.numel() for p in plist), sizes, sum(sizes)


def dense_hessian_reference(
    model: nn.Module,
    loss_fn: Callable,
    batches,
    params=None,
    bn_mode: str = "eval",
    *,
    loss_form: str = "auto",
    batch_size_fn: Callable | None = None,
    symmetry_rtol: float = 1e-10,
) -> torch.Tensor:
    """Exact dense Hessian ``[n, n]`` of the sample-size-weighted mean loss over ``batches``.

    Column i is the double-backward product with the unit vector ``e_i`` on every batch,
    weighted by ``batch_size / N``. The model's modes and buffers are restored afterwards.

    Args:
        model: the model, on the CPU; its dtype is the dtype of the products (use float64).
        loss_fn: a criterion ``loss_fn(outputs, targets)`` or ``loss_fn(model, batch)``
            (see :func:`is_model_form`).
        batches: one batch (a tuple or dict) or a list of batches.
        params: names or tensors of the parameters, in the order of the rows (default: all
            trainable ones in ``named_parameters`` order, as :func:`hessfast.hessian`).
        bn_mode: ``"eval"``, ``"train"`` or ``"as_is"``, with :func:`hessfast.hessian`'s meaning.
        loss_form: ``"auto"``, ``"model"`` or ``"criterion"``.
        batch_size_fn: samples in a batch (default :func:`default_batch_size`).
        symmetry_rtol: the symmetry check's tolerance (:func:`assert_symmetric`): a float64
            model that computes pieces in float32 inside (transformers' RMSNorm, its LM
            loss) is symmetric to float32's rounding only.

    Returns:
        ``[n, n]`` float64, checked symmetric.
    """
    batches, plist, n, sizes, N = _layout(model, batches, params, batch_size_fn)
    H = torch.zeros(n, n, dtype=torch.float64)
    with curvature_mode(model, bn_mode):
        for batch, size in zip(batches, sizes, strict=True):
            if size == 0:
                continue
            loss = compute_loss(model, loss_fn, batch, loss_form)
            grads = torch.autograd.grad(loss, plist, create_graph=True, allow_unused=True)
            g = _flat(grads, plist)
            Hb = torch.zeros(n, n, dtype=torch.float64)
            if g.requires_grad:
                for i in range(n):
                    e = torch.zeros_like(g)
                    e[i] = 1.0
                    col = torch.autograd.grad(
                        g, plist, grad_outputs=e, retain_graph=True, allow_unused=True
                    )
                    Hb[:, i] = _flat(col, plist).double()
            H += (size / N) * Hb
    assert_symmetric(H, rtol=symmetry_rtol, what="reference Hessian")
    return H


def dense_ggn_reference(
    model: nn.Module,
    loss_fn: Callable,
    batches,
    params=None,
    bn_mode: str = "eval",
    *,
    batch_size_fn: Callable | None = None,
) -> torch.Tensor:
    """Exact dense GGN ``sum_b (B_b / N) J_b^T H_b J_b`` for a criterion ``loss_fn``.

    ``J_b`` is the explicit Jacobian of the flattened outputs of batch b (one backward per
    output entry) and ``H_b`` the explicit Hessian of ``loss_fn(outputs, targets)`` w.r.t.
    the outputs. ``batches`` are ``(inputs, targets)`` pairs; the other arguments are those
    of :func:`dense_hessian_reference`. Returns ``[n, n]`` float64, checked symmetric.
    """
    batches, plist, n, sizes, N = _layout(model, batches, params, batch_size_fn)
    G = torch.zeros(n, n, dtype=torch.float64)
    with curvature_mode(model, bn_mode):
        for (inputs, targets), size in zip(batches, sizes, strict=True):
            out = model(inputs)
            of = out.reshape(-1)
            m = of.numel()
            J = torch.zeros(m, n, dtype=torch.float64)
            for j in range(m):
                row = torch.autograd.grad(of[j], plist, retain_graph=True, allow_unused=True)
                J[j] = _flat(row, plist).double()
            o = out.detach().clone().requires_grad_(True)
            loss = loss_fn(o, targets)
            (go,) = torch.autograd.grad(loss, o, create_graph=True)
            go = go.reshape(-1)
            Ho = torch.zeros(m, m, dtype=torch.float64)
            if go.requires_grad:
                for j in range(m):
                    (row,) = torch.autograd.grad(go[j], o, retain_graph=True, allow_unused=True)
                    if row is not None:
                        Ho[j] = row.reshape(-1).double()
            assert_symmetric(Ho, what="loss Hessian w.r.t. outputs")
            G += (size / N) * (J.T @ Ho @ J)
    assert_symmetric(G, what="reference GGN")
    return G
