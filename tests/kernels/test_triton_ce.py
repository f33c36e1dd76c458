"""The fused Triton cross-entropy curvature kernel under ``TRITON_INTERPRET=1`` on the CPU,
against an fp64 oracle: the autograd double backward of ``F.cross_entropy`` (sum reduction,
``ignore_index`` on the masked rows) applied to each direction, times the scale.

The grid (issue 10): V in {7, 100, 507} x N in {1, 3} x k in {1, 3, 8} x
float32/bfloat16/float16/float64 inputs, masked rows, a float or 0-d tensor scale, plain or
non-contiguous (transposed, sliced) inputs; plus N=252 (V=100, k=3, float32) and mixed input
dtypes. Each case checks

- error vs the oracle <= the error of the same-dtype torch reference + tol, with
  tol = (2 eps(out dtype) + 8 eps(accumulation dtype)) max|oracle|: the output's final
  rounding, and the kernel's different summation order (online softmax) in float32, or
  float64 for float64 inputs;
- masked rows are exactly zero, the output is contiguous in U's dtype;
- symmetry u.(Hv) = v.(Hu) and PSD v.(Hv) >= -tol, with the kernel's own product.

The interpreter must be chosen before Triton is imported, and another test may already have
imported it in this process, so the whole grid runs in one subprocess (``python
tests/kernels/test_triton_ce.py --grid``) with ``TRITON_INTERPRET=1``. Skipped when Triton does not
import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

IGNORE = -100
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def oracle(logits: torch.Tensor, U: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """fp64 ``[k, N, V]``: ``scale * H u_j`` with H the Hessian of the summed cross-entropy
    w.r.t. ``logits [N, V]`` (masked rows as ``ignore_index``), by double backward, on
    ``logits``' device (also used by tests/kernels/test_gpu_kernels.py)."""
    ld = logits.detach().double().requires_grad_(True)
    n, v = ld.shape
    target = torch.arange(n, device=ld.device) % v
    if mask is not None:
        target = torch.where(mask.to(ld.device), target, torch.full_like(target, IGNORE))
    loss = F.cross_entropy(ld, target, ignore_index=IGNORE, reduction="sum")
    (g,) = torch.autograd.grad(loss, ld, create_graph=True)
    rows = [torch.autograd.grad((g * u).sum(), ld, retain_graph=True)[0]
            for u in U.detach().double()]
    return torch.stack(rows) * scale


def _inputs(n: int, v: int, k: int, ldt: torch.dtype, udt: torch.dtype, layout: str,
            g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """logits ``[N, V]`` and U ``[k, N, V]``: contiguous, or (layout="strided") logits a
    transposed ``[2V, N]`` buffer sliced ``::2`` and U a ``[N, k, 2V]`` buffer transposed
    and sliced ``::2``."""
    if layout == "strided":
        logits = (torch.randn(2 * v, n, generator=g, dtype=torch.float64) * 3).to(ldt).T
        logits = logits[:, ::2]
        U = torch.randn(n, k, 2 * v, generator=g, dtype=torch.float64).to(udt)
        U = U.transpose(0, 1)[..., ::2]
        assert not logits.is_contiguous() and not U.is_contiguous()
    else:
        logits = (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).to(ldt)
        U = torch.randn(k, n, v, generator=g, dtype=torch.float64).to(udt)
    return logits, U


def _cases() -> list[dict]:
    cases = []
    i = 0
    for dt in DTYPES:
        for v in (7, 100, 507):
            for n in (1, 3):
                for k in (1, 3, 8):
                    i += 1
                    cases.append(dict(
                        n=n, v=v, k=k, ldt=dt, udt=dt,
                        layout="strided" if i % 3 == 0 else "contiguous",
                        mask=("none", "some", "all")[i % 3] if n == 1 else
                        ("some", "none")[i % 2],
                        tensor_scale=i % 2 == 0,
                        block_v=16 if (v > 16 and i % 4 == 1) else None))
    cases.append(dict(n=252, v=100, k=3, ldt=torch.float32, udt=torch.float32,
                      layout="contiguous", mask="some", tensor_scale=True, block_v=None))
    for ldt, udt in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)):
        cases.append(dict(n=3, v=100, k=3, ldt=ldt, udt=udt, layout="strided", mask="some",
                          tensor_scale=True, block_v=32))
    return cases


def _mask(kind: str, n: int, g: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "all":
        return torch.zeros(n, dtype=torch.bool)
    m = torch.rand(n, generator=g) > 0.3
    if n > 1:
        m[0], m[-1] = True, False
    return m


def run_grid() -> dict:
    """Every case of :func:`_cases`; returns ``{"cases", "failures", "worst"}`` where worst maps
    each input dtype pair to the largest error / (torch error + tol) seen (<= 1 passes)."""
    from hessfast.kernels.ce_curvature import ce_hessian_product_reference as ref
    from hessfast.kernels.ce_curvature import ce_hessian_product_triton as tri

    g = torch.Generator().manual_seed(0)
    failures: list[str] = []
    worst: dict[str, float] = {}
    cases = _cases()
    for c in cases:
        n, v, k = c["n"], c["v"], c["k"]
        logits, U = _inputs(n, v, k, c["ldt"], c["udt"], c["layout"], g)
        mask = _mask(c["mask"], n, g)
        valid = n if mask is None else int(mask.sum())
        scale_f = 1.0 / max(valid, 1)  # reduction="mean" over the valid rows
        scale = torch.tensor(scale_f, dtype=torch.float64) if c["tensor_scale"] else scale_f
        name = " ".join(f"{key}={val}" for key, val in c.items())
        want = oracle(logits, U, mask, scale_f)
        same = ref(logits, U, mask=mask, scale=scale).double()
        out = tri(logits, U, mask=mask, scale=scale, block_v=c["block_v"])
        if out.dtype != c["udt"] or out.shape != (k, n, v) or not out.is_contiguous():
            failures.append(f"{name}: got {out.dtype} {tuple(out.shape)} {out.stride()}")
            continue
        out = out.double()
        peak = want.abs().max().item()
        acc = torch.float64 if torch.float64 in (c["ldt"], c["udt"]) else torch.float32
        tol = (2 * torch.finfo(c["udt"]).eps + 8 * torch.finfo(acc).eps) * peak + 1e-300
        err = (out - want).abs().max().item()
        err_ref = (same - want).abs().max().item()
        key = f"{c['ldt']}/{c['udt']}".replace("torch.", "")
        worst[key] = max(worst.get(key, 0.0), err / (err_ref + tol))
        if not err <= err_ref + tol:
            failures.append(f"{name}: error {err:.3g} > torch {err_ref:.3g} + {tol:.3g}")
        if mask is not None and not bool(torch.all(out[:, ~mask] == 0)):
            failures.append(f"{name}: masked rows not zero")
        # quadratic forms over the whole [N, V] vector: u.(Hv) with the kernel's product
        Ud = U.double().reshape(k, -1)
        gram = Ud @ out.reshape(k, -1).T                       # [k, k], gram[i, j] = u_i.(H u_j)
        form_tol = 4 * tol * n * v ** 0.5 * Ud.abs().max().item()
        if not bool(torch.all(gram.diagonal() >= -form_tol)):
            failures.append(f"{name}: not PSD, min u.Hu {gram.diagonal().min().item():.3g}")
        asym = (gram - gram.T).abs().max().item()
        if not asym <= 2 * form_tol:
            failures.append(f"{name}: max |u.Hv - v.Hu| = {asym:.3g} > {2 * form_tol:.3g}")
    failures += _fp64_symmetry(tri, g)
    return {"cases": len(cases) + 1, "failures": failures, "worst": worst}


def _fp64_symmetry(tri, g: torch.Generator) -> list[str]:
    """Symmetry and PSD in float64 (the kernel accumulates in fp64 there): tight tolerances,
    large logits (a wide softmax range) and the online max rescaling across 16-wide chunks."""
    n, v, k = 3, 507, 8
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 8
    U = torch.randn(k, n, v, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, False, True])
    out = tri(logits, U, mask=mask, scale=torch.tensor(0.5, dtype=torch.float64), block_v=16)
    gram = U.reshape(k, -1) @ out.reshape(k, -1).T
    bound = 1e-13 * gram.abs().max().item()
    fails = []
    if not (gram - gram.T).abs().max().item() <= bound:
        fails.append(f"float64 symmetry: {(gram - gram.T).abs().max().item():.3g} > {bound:.3g}")
    if not torch.linalg.eigvalsh((gram + gram.T) / 2).min().item() >= -bound:
        fails.append("float64: the Gram matrix of u.(Hv) is not PSD")
    return fails


def test_triton_kernel_interpreter_grid() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--grid"], env=env,
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cases"] == len(_cases()) + 1
    assert result["failures"] == [], "\n".join(result["failures"])


def test_oracle_matches_dense_hessian() -> None:
    """The oracle itself against the dense autograd Hessian of the mean cross-entropy."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, generator=g, dtype=torch.float64)
    U = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True])
    target = torch.where(mask, torch.arange(4) % 5, torch.full((4,), IGNORE))

    def loss(flat: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(flat.view(4, 5), target, ignore_index=IGNORE)

    H = torch.autograd.functional.hessian(loss, logits.reshape(-1))
    dense = (U.reshape(2, -1) @ H).reshape(2, 4, 5)
    torch.testing.assert_close(oracle(logits, U, mask, 1 / 3), dense, rtol=1e-12, atol=1e-14)


if __name__ == "__main__" and sys.argv[1:] == ["--grid"]:
    print(json.dumps(run_grid()))
