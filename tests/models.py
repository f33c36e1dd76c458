"""The test suite's models and references, and the helpers only the tests need.

The model builders and the dense float64 references live in :mod:`hessfast.testing`
(``hessfast.testing.models``, ``hessfast.testing.dense``), where the benchmarks use them too;
they are imported here so that every test takes them from one place. This module adds the
test-only helpers: the product paths to cover, relative errors, reordering a reference to an
operator's parameter order, and snapshots of everything hessfast promises not to touch.
"""

from __future__ import annotations

import torch
from torch import nn

from hessfast.testing.dense import (  # noqa: F401  (re-exported for the tests)
    assert_symmetric,
    compute_loss,
    curvature_mode,
    default_batch_size,
    dense_ggn_reference,
    dense_hessian_reference,
    is_model_form,
    select_params,
)
from hessfast.testing.models import (  # noqa: F401  (re-exported for the tests)
    BUILDERS,
    DTYPE,
    SmallCNN,
    TinyLM,
    lm_loss,
    make_cnn,
    make_lm,
    make_mlp,
    seeded,
    sizes_to_slices,
)

HVP_MODES = ("reuse_graph", "double_backward", "fwd_rev", "auto")


def rel_err(A: torch.Tensor, B: torch.Tensor) -> float:
    """Relative Frobenius error ||A - B|| / ||B|| (absolute when B == 0)."""
    A = A.detach().to(torch.float64)
    B = B.detach().to(torch.float64)
    denom = float(B.norm())
    num = float((A - B).norm())
    return num / denom if denom > 0 else num


# ---------------------------------------------------------------------------------------
# state snapshots
# ---------------------------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict:
    """Everything hessfast promises not to touch: modes, params, buffers, .grad, RNG."""
    return {
        "training": [(name, m.training) for name, m in model.named_modules()],
        "params": [(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()],
        "buffers": [(n, b.detach().clone()) for n, b in model.named_buffers()],
        "grads": [
            (n, None if p.grad is None else (id(p.grad), p.grad.detach().clone()))
            for n, p in model.named_parameters()
        ],
        "rng": torch.get_rng_state().clone(),
        # identity: the user's optimizer holds these objects
        "param_ids": [(n, id(p), type(p)) for n, p in model.named_parameters()],
        "buffer_ids": [(n, id(b)) for n, b in model.named_buffers()],
        "slots": module_slots(model),
        "tracking": [
            (name, m.track_running_stats)
            for name, m in model.named_modules()
            if hasattr(m, "track_running_stats")
        ],
    }


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"], "training flags changed"
    for (n, a, ra), (_, b, rb) in zip(after["params"], before["params"], strict=True):
        assert torch.equal(a, b), f"parameter {n} changed"
        assert ra == rb, f"requires_grad of {n} changed"
        assert a.dtype == b.dtype
    for (n, a), (_, b) in zip(after["buffers"], before["buffers"], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), f"buffer {n} changed: {b} -> {a}"
    for (n, a), (_, b) in zip(after["grads"], before["grads"], strict=True):
        if b is None:
            assert a is None, f".grad of {n} was None and is now set"
        else:
            assert a is not None, f".grad of {n} was removed"
            assert a[0] == b[0], f".grad of {n} was replaced by another tensor"
            assert torch.equal(a[1], b[1]), f".grad of {n} changed"
    assert torch.equal(after["rng"], before["rng"]), "global torch RNG state changed"
    assert after["param_ids"] == before["param_ids"], "a Parameter object was replaced"
    assert after["buffer_ids"] == before["buffer_ids"], "a buffer object was replaced"
    assert after["slots"] == before["slots"], "a module's _parameters/_buffers entry changed"
    assert after["tracking"] == before["tracking"], "track_running_stats changed"


def reorder_reference(ref: torch.Tensor, model: nn.Module, ref_names, op_names) -> torch.Tensor:
    """Principal submatrix of ``ref`` (built over ``ref_names`` in that order) in the order
    of ``op_names``: lets a test compare against an operator whatever order it flattens in."""
    shapes = dict(model.named_parameters())
    offsets, off = {}, 0
    for name in ref_names:
        k = shapes[name].numel()
        offsets[name] = (off, off + k)
        off += k
    assert off == ref.shape[0], "reference size does not match ref_names"
    idx = torch.cat([torch.arange(*offsets[name]) for name in op_names])
    return ref[idx][:, idx]


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def module_slots(model: nn.Module) -> list[tuple[str, str, int, type]]:
    """Every module's ``_parameters`` / ``_buffers`` entry, by path, as ``(path, key, id,
    type)``: a module reused at two places is listed under both paths, so a tensor swapped
    in at one path and left there shows."""
    out = []
    for prefix, m in model.named_modules(remove_duplicate=False):
        for store in (m._parameters, m._buffers):
            for key, t in store.items():
                out.append((prefix, key, id(t), type(t)))
    return out


def shared_module_mlp(seed: int = 0) -> tuple[nn.Module, object, tuple]:
    """``Sequential(shared, Tanh, shared, Tanh, Linear)`` in float64 (one Linear(3, 3)
    instance at two places, n = 16), a squared-error loss and one batch of 8."""
    with seeded(seed):
        shared = nn.Linear(3, 3).double()
        model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(3, 1).double())
        x = torch.randn(8, 3, dtype=torch.float64)
        y = torch.randn(8, 1, dtype=torch.float64)

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((out - target) ** 2).mean()

    return model, loss_fn, (x, y)
