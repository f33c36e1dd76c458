"""The Triton kernels on a real CUDA device (``pytest -m cuda``; skipped without CUDA or Triton).

The fused cross-entropy curvature product (``hessfast.kernels.ce_curvature``) on the shapes
of issue 10, N in {1, 257, 8192} x V in {1000, 32000, 128256} x k in {1, 4, 8} x
bfloat16/float16/float32 (cases whose logits + U + output exceed ~38 GB are left out), with
masked rows, against an fp64 oracle (autograd double backward of ``F.cross_entropy``) on a
sample of rows: the product is row-separable, so sampled rows test the same kernel programs
as the whole output without an fp64 copy of it. The whole output is checked for finite values
and exactly zero masked rows. Also: :func:`ce_hessian_product` dispatches to Triton on CUDA,
and a call allocates nothing beyond its output.
"""

from __future__ import annotations

import pytest
import torch

from hessfast.kernels import ce_curvature
from hessfast.kernels.ce_curvature import (
    ce_hessian_product,
    ce_hessian_product_reference,
    ce_hessian_product_triton,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

MEMORY_BUDGET = 38e9          # bytes of logits + U + output per case (the card must hold more)
SAMPLE_ROWS = 48


def _shapes() -> list[tuple[torch.dtype, int, int, int]]:
    out = []
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        size = torch.empty((), dtype=dt).element_size()
        for n in (1, 257, 8192):
            for v in (1000, 32000, 128256):
                for k in (1, 4, 8):
                    if n * v * size * (1 + 2 * k) <= MEMORY_BUDGET:
                        out.append((dt, n, v, k))
    return out


def _sample_rows(n: int, mask: torch.Tensor | None, g: torch.Generator) -> torch.Tensor:
    """First, last, some masked and random rows (sorted, unique) on the CPU."""
    picks = [torch.tensor([0, n - 1]), torch.randint(0, n, (SAMPLE_ROWS,), generator=g)]
    if mask is not None:
        picks.append((~mask).nonzero().flatten().cpu()[:4])
    return torch.unique(torch.cat(picks))


@pytest.mark.parametrize("dt,n,v,k", _shapes(),
                         ids=lambda x: str(x).replace("torch.", "") if isinstance(x, torch.dtype)
                         else str(x))
def test_ce_triton_matches_fp64_oracle_on_cuda(dt: torch.dtype, n: int, v: int, k: int) -> None:
    pytest.importorskip("triton")
    check_case(torch.device("cuda"), dt, n, v, k)
    torch.cuda.empty_cache()


def check_case(dev: torch.device, dt: torch.dtype, n: int, v: int, k: int) -> None:
    """One case on ``dev`` (CUDA here; the CPU under ``TRITON_INTERPRET=1`` with tiny shapes
    to check this test itself)."""
    from test_triton_ce import oracle

    g = torch.Generator(device=dev).manual_seed(n * 7 + v * 3 + k)
    gc = torch.Generator().manual_seed(n + v + k)
    logits = torch.randn(n, v, device=dev, dtype=dt, generator=g).mul_(3)
    U = torch.randn(k, n, v, device=dev, dtype=dt, generator=g)
    if n == 1:
        mask = None if k == 4 else torch.tensor([k == 1], device=dev)
    else:
        mask = torch.rand(n, device=dev, generator=g) > 0.3
        mask[0] = True
        mask[-1] = False
    valid = n if mask is None else int(mask.sum())
    scale_f = 1.0 / max(valid, 1)
    scale = torch.tensor(scale_f, device=dev)                 # 0-d device tensor, no sync

    out = ce_hessian_product_triton(logits, U, mask=mask, scale=scale)
    assert out.shape == (k, n, v) and out.dtype == dt and out.is_contiguous()

    # whole output: finite, masked rows exactly zero (one direction at a time: no big temps)
    for j in range(k):
        row_max = out[j].abs().amax(dim=-1)                  # [N]
        assert bool(torch.isfinite(row_max).all()), f"direction {j}: non-finite values"
        if mask is not None:
            assert bool((row_max[~mask] == 0).all()), f"direction {j}: masked rows not zero"
    # sampled rows against the fp64 oracle, the same rule as the interpreter grid
    rows = _sample_rows(n, mask, gc).to(dev)
    ls, Us = logits[rows], U[:, rows]
    ms = None if mask is None else mask[rows]
    want = oracle(ls, Us, ms, scale_f)
    same = ce_hessian_product_reference(ls, Us, mask=ms, scale=scale).double()
    got = out[:, rows].double()
    peak = want.abs().max().item()
    tol = (2 * torch.finfo(dt).eps + 8 * torch.finfo(torch.float32).eps) * peak + 1e-300
    err = (got - want).abs().max().item()
    err_ref = (same - want).abs().max().item()
    assert err <= err_ref + tol, f"error {err:.3g} > torch {err_ref:.3g} + {tol:.3g}"
    # symmetry and PSD of the kernel's product on the sampled rows (float32 accumulation)
    Uf = Us.double().reshape(k, -1)
    gram = Uf @ got.reshape(k, -1).T                          # [k, k]: u_i.(H u_j)
    form_tol = 4 * tol * rows.numel() * v ** 0.5 * Uf.abs().max().item()
    assert bool((gram.diagonal() >= -form_tol).all()), gram.diagonal()
    assert (gram - gram.T).abs().max().item() <= 2 * form_tol


def test_ce_hessian_product_dispatches_to_triton_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.delenv("HESSFAST_CE_BACKEND", raising=False)
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return ce_hessian_product_triton(*args, **kwargs)

    def no_reference(*args, **kwargs):
        raise AssertionError("ce_hessian_product used the torch reference on CUDA")

    monkeypatch.setattr(ce_curvature, "ce_hessian_product_triton", spy)
    monkeypatch.setattr(ce_curvature, "ce_hessian_product_reference", no_reference)
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(5, 300, device="cuda", generator=g)
    U = torch.randn(2, 5, 300, device="cuda", generator=g)
    out = ce_hessian_product(logits, U, scale=0.2)
    assert calls == [1]
    monkeypatch.undo()
    torch.testing.assert_close(out, ce_hessian_product_reference(logits, U, scale=0.2),
                               rtol=1e-5, atol=1e-7)
    assert ce_curvature.ce_backend(torch.device("cuda"))[0] == "triton"


@pytest.mark.parametrize("masked", [False, True])
def test_ce_triton_allocates_only_its_output(masked: bool) -> None:
    pytest.importorskip("triton")
    n, v, k = 8192, 32000, 4
    g = torch.Generator(device="cuda").manual_seed(1)
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, generator=g)
    U = torch.randn(k, n, v, device="cuda", dtype=torch.bfloat16, generator=g)
    mask = (torch.rand(n, device="cuda", generator=g) > 0.5) if masked else None
    scale = torch.tensor(1.0 / n, device="cuda")
    ce_hessian_product_triton(logits, U, mask=mask, scale=scale)  # compile, warm; freed
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = ce_hessian_product_triton(logits, U, mask=mask, scale=scale)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    out_bytes = out.numel() * out.element_size()
    # slack: the int8 copy of the mask (N bytes) and the 0-d scale, in 512-byte blocks
    slack = n + (1 << 16)
    assert out_bytes <= extra <= out_bytes + slack, (extra, out_bytes)
