"""The fused Triton cross-entropy curvature kernel under ``TRITON_INTERPRET=1`` on the CPU,
against an fp64 oracle (:func:`ce_hessian_product_reference` on float64 inputs).

The interpreter must be chosen before Triton is imported, and another test may already have
imported it in this process, so the whole grid runs in one subprocess with
``TRITON_INTERPRET=1`` in its environment. Skipped when Triton does not import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

GRID_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    from hessfast.kernels.ce_curvature import (
        ce_hessian_product_reference as ref, ce_hessian_product_triton as tri)

    failures = []
    cases = 0
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        for vi, V in enumerate((7, 100, 507)):
            for ni, N in enumerate((1, 3, 17)):
                k = (1, 3)[(vi + ni) % 2]
                block_vs = (None, 16) if (N == 3 and V > 16) else (None,)
                logits = (torch.randn(N, V, generator=g, dtype=torch.float64) * 3).to(dt)
                U = torch.randn(k, N, V, generator=g, dtype=torch.float64).to(dt)
                mask = torch.rand(N, generator=g) > 0.3
                if N > 1:
                    mask[-1] = False
                scale = 1.0 / mask.sum().clamp(min=1).double()  # mean over valid rows
                oracle = ref(logits.double(), U.double(), mask=mask, scale=scale)
                same = ref(logits, U, mask=mask, scale=scale).double()
                tol = 2 * torch.finfo(dt).eps * oracle.abs().max().item() + 1e-7
                for bv in block_vs:
                    cases += 1
                    name = f"{dt} V={V} N={N} k={k} block_v={bv}"
                    out = tri(logits, U, mask=mask, scale=scale, block_v=bv)
                    if out.dtype != dt or out.shape != (k, N, V):
                        failures.append(f"{name}: got {out.dtype} {tuple(out.shape)}")
                        continue
                    out = out.double()
                    err = (out - oracle).abs().max().item()
                    err_ref = (same - oracle).abs().max().item()
                    if not err <= err_ref + tol:
                        failures.append(
                            f"{name}: error {err:.3g} > torch {err_ref:.3g} + {tol:.3g}")
                    if not bool(torch.all(out[:, ~mask] == 0)):
                        failures.append(f"{name}: masked rows not zero")
                    Ud = U.double()
                    quad = (Ud * out).sum(-1)  # u.(Hu) per row, [k, N]
                    if not bool(torch.all(quad >= -tol * V)):
                        failures.append(f"{name}: not PSD, min u.Hu {quad.min().item():.3g}")
                    if k > 1:
                        uHv = (Ud[0] * out[1]).sum(-1)
                        vHu = (Ud[1] * out[0]).sum(-1)
                        asym = (uHv - vHu).abs().max().item()
                        if not asym <= 4 * tol * V:
                            failures.append(f"{name}: u.Hv - v.Hu = {asym:.3g}")
    # float64 inputs are computed in float64 inside the kernel
    l64 = torch.randn(3, 100, generator=g, dtype=torch.float64)
    U64 = torch.randn(2, 3, 100, generator=g, dtype=torch.float64)
    err64 = (tri(l64, U64, scale=0.5, block_v=16) - ref(l64, U64, scale=0.5)).abs().max().item()
    cases += 1
    if not err64 <= 1e-14:
        failures.append(f"float64: error {err64:.3g}")
    print(json.dumps({"cases": cases, "failures": failures}))
    """
)


def test_triton_kernel_interpreter_grid() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", GRID_SCRIPT], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cases"] >= 20
    assert result["failures"] == [], "\n".join(result["failures"])
