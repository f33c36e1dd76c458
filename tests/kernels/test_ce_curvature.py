"""The torch reference of the softmax cross-entropy curvature product
(:func:`hessfast.kernels.ce_curvature.ce_hessian_product_reference`): it runs without Triton."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from hessfast.errors import BackendUnavailableError, ConfigurationError
from hessfast.kernels import _triton, ce_curvature
from hessfast.kernels.ce_curvature import ce_hessian_product, ce_hessian_product_reference

IGNORE = -100


def _case(n: int, v: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V], targets [N] with some ignore_index rows, U [k, N, V] (float64)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.rand(n, generator=g) < 0.35] = IGNORE
    target[0] = 0  # at least one valid row
    U = torch.randn(k, n, v, generator=g, dtype=torch.float64)
    return logits, target, U


def _autograd_hessian(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The dense [N V, N V] Hessian of mean cross-entropy (ignore_index) w.r.t. the logits."""
    def loss(flat: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(flat.view_as(logits), target, ignore_index=IGNORE)
    return torch.autograd.functional.hessian(loss, logits.reshape(-1))


@pytest.mark.parametrize("n,v,k,seed", [(1, 3, 1, 0), (5, 7, 3, 1), (6, 4, 2, 2)])
def test_reference_matches_autograd_hessian(n: int, v: int, k: int, seed: int) -> None:
    logits, target, U = _case(n, v, k, seed)
    mask = target != IGNORE
    scale = 1.0 / mask.sum().double()  # a 0-d tensor: mean over the valid rows
    H = _autograd_hessian(logits, target)
    want = (U.reshape(k, -1) @ H).reshape(k, n, v)  # H symmetric
    got = ce_hessian_product_reference(logits, U, mask=mask, scale=scale)
    assert got.dtype == torch.float64 and got.shape == (k, n, v)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    assert torch.all(got[:, ~mask] == 0)


def test_reference_sum_reduction_and_float_scale() -> None:
    logits, target, U = _case(4, 5, 2, 3)
    H = torch.autograd.functional.hessian(
        lambda f: F.cross_entropy(f.view_as(logits), target, ignore_index=IGNORE,
                                  reduction="sum"), logits.reshape(-1))
    got = ce_hessian_product_reference(logits, U, mask=target != IGNORE, scale=1.0)
    torch.testing.assert_close(got, (U.reshape(2, -1) @ H).reshape(U.shape))


def test_reference_psd_symmetric_and_masked_rows_zero() -> None:
    logits, target, U = _case(9, 11, 2, 4)
    mask = target != IGNORE
    out = ce_hessian_product_reference(logits, U, mask=mask, scale=0.5)
    uHv = (U[0] * out[1]).sum(-1)  # per row
    vHu = (U[1] * out[0]).sum(-1)
    torch.testing.assert_close(uHv, vHu, rtol=1e-12, atol=1e-14)
    assert torch.all((U * out).sum(-1) >= -1e-14)
    assert torch.all(out[:, ~mask] == 0)
    # a row's product with a constant direction is zero (softmax is shift invariant)
    ones = torch.ones(1, 9, 11, dtype=torch.float64)
    assert ce_hessian_product_reference(logits, ones).abs().max() < 1e-14


def test_reference_low_precision_computes_in_float32() -> None:
    logits, _, U = _case(3, 50, 2, 5)
    oracle = ce_hessian_product_reference(logits, U)
    got = ce_hessian_product_reference(logits.bfloat16(), U.bfloat16())
    assert got.dtype == torch.bfloat16
    lp = ce_hessian_product_reference(logits.bfloat16().double(), U.bfloat16().double())
    # only the output rounding differs from the fp64 product of the rounded inputs
    assert (got.double() - lp).abs().max() <= 2 ** -8 * lp.abs().max()
    assert (got.double() - oracle).abs().max() <= 0.05 * oracle.abs().max()


def test_dispatch_on_cpu_is_the_reference() -> None:
    logits, target, U = _case(4, 6, 2, 6)
    mask = target != IGNORE
    torch.testing.assert_close(ce_hessian_product(logits, U, mask=mask, scale=0.25),
                               ce_hessian_product_reference(logits, U, mask=mask, scale=0.25))


def test_bad_shapes_raise() -> None:
    logits, _, U = _case(4, 6, 2, 7)
    with pytest.raises(ConfigurationError, match=r"\[k, N, V\]"):
        ce_hessian_product_reference(logits, U[:, :3])
    with pytest.raises(ConfigurationError, match="mask"):
        ce_hessian_product_reference(logits, U, mask=torch.ones(4))
    with pytest.raises(ConfigurationError, match=r"\[N, V\]"):
        ce_hessian_product_reference(logits[0], U)


def test_missing_triton_is_a_backend_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    monkeypatch.setattr(ce_curvature, "_KERNEL", None)
    monkeypatch.setattr(_triton, "_failure", _triton._UNTRIED)  # ask the one rule afresh
    assert not _triton.available() and not ce_curvature.triton_available()
    assert "import of triton halted" in _triton.import_error()
    logits, _, U = _case(2, 3, 1, 8)
    with pytest.raises(BackendUnavailableError, match="pip install triton"):
        ce_curvature.ce_hessian_product_triton(logits, U)
