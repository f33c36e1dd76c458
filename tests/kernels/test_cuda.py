"""The whole pipeline on a CUDA device agrees with the CPU float64 reference.

Runs only where torch sees a GPU (``pytest -m cuda``); CI has none, the device machine does.
"""

from __future__ import annotations

import pytest
import torch

import hessfast as hf
from hessfast.testing import spectra

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def _to(batches, device):
    out = []
    for b in batches:
        if isinstance(b, dict):
            out.append({k: v.to(device) for k, v in b.items()})
        else:
            out.append(tuple(t.to(device) for t in b))
    return out


@pytest.mark.parametrize("kind", ["mlp", "cnn", "lm"])
@pytest.mark.parametrize("hvp_mode", ["auto", "reuse_graph", "double_backward", "fwd_rev"])
def test_hessian_on_cuda_matches_cpu_reference(kind: str, hvp_mode: str) -> None:
    import models

    model, loss_fn, batches = models.BUILDERS[kind]()
    ref = models.dense_hessian_reference(model, loss_fn, batches)
    H = hf.hessian(model.cuda(), loss_fn, _to(batches, "cuda"), hvp_mode=hvp_mode)
    assert H.device.type == "cuda"
    D = H.to_dense().cpu()
    model.cpu()
    assert (D - ref).norm() <= 1e-10 * ref.norm()


def test_eigsh_trace_density_on_cuda() -> None:
    M, lam = spectra.wishart(300, shift=0.5)
    A = hf.LinearOperator.from_matrix(M.cuda())
    r = hf.eigsh(A, k=4, which="BE", tol=1e-10)
    assert r.eigenvectors.device.type == "cuda"
    from hessfast.lanczos import select

    assert torch.allclose(r.eigenvalues, lam[select(lam, 4, "BE")], atol=1e-9)
    rb = hf.eigsh(hf.LinearOperator.from_matrix(M.float().cuda()), k=3, tol=1e-4,
                  basis_dtype=torch.bfloat16)
    assert torch.allclose(rb.eigenvalues, lam.flip(0)[:3], atol=5e-3)
    rh = hf.eigsh(hf.LinearOperator.from_matrix(M.float().cuda()), k=3, tol=1e-4,
                  basis_device="cpu")
    assert torch.allclose(rh.eigenvalues, lam.flip(0)[:3], atol=1e-4)
    t = hf.trace(A, 300, method="hutch++")  # budget >= n: exact
    assert abs(t.value - float(lam.sum())) <= 1e-8 * float(lam.abs().sum())
    d = hf.spectral_density(A, num_probes=8, num_steps=40)
    assert torch.allclose(d.weights.sum(dim=1), torch.ones(8, dtype=torch.float64))
