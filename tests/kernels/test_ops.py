"""Basis ops (hessfast.ops) on every backend against float64 references.

Tolerances come from one table of unit roundoffs and the standard forward-error bounds of a dot
product: |fl(v.w) - v.w| <= c * u * sqrt(len) * (|v|.|w|) (sqrt: rounding errors of the blocked
sums behave like a random walk; c = 8 covers the lane/chunk structure of the kernels).
"""

from __future__ import annotations

import math

import pytest
import torch

from hessfast import _native, _reference, ops
from hessfast.errors import BackendUnavailableError

# unit roundoff of each dtype (half an ulp at 1.0): the only tolerance table in this file.
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
C_DOT = 8.0

STORAGE = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ACC = [torch.float32, torch.float64]
# (m, k, n): empty, scalar, odd n, m = 63, k = 1/3/8, k > 8 (several column blocks).
SHAPES = [(0, 3, 17), (1, 1, 1), (5, 3, 4099), (63, 8, 257), (7, 0, 33), (3, 2, 0), (4, 11, 300)]

CUDA_OK = torch.cuda.is_available() and _native.cuda_compiled()


def _devices_backends() -> list:
    out = [
        pytest.param(("cpu", "reference"), id="cpu-reference"),
        pytest.param(("cpu", "native"), id="cpu-native"),
        pytest.param(("cuda", "native"), id="cuda-native", marks=pytest.mark.cuda),
        pytest.param(("cuda", "reference"), id="cuda-reference", marks=pytest.mark.cuda),
    ]
    return out


@pytest.fixture(params=_devices_backends())
def backend(request, monkeypatch):
    device, name = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if name == "native" and not _native.available():
        pytest.skip(f"hessfast._C unavailable: {_native.IMPORT_ERROR}")
    if device == "cuda" and name == "native" and not _native.cuda_compiled():
        pytest.skip("hessfast._C built without CUDA kernels")
    monkeypatch.setenv("HESSFAST_BACKEND", name)
    return torch.device(device)


def _basis(m: int, n: int, dtype: torch.dtype, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=torch.float64).to(dtype).to(device)


def _work(k: int, n: int, dtype: torch.dtype, device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, n, generator=g, dtype=torch.float64).to(dtype).to(device)


def _work_dtype(acc: torch.dtype) -> torch.dtype:
    return acc  # W in the accumulation dtype; mixed W/acc is covered by test_mixed_work_dtype


def _assert_dot_close(C, V, W, acc, n):
    """C vs the float64 product of the stored values, within the dot-product bound."""
    V64, W64 = V.double().cpu(), W.double().cpu()
    ref = V64 @ W64.T
    bound = C_DOT * UNIT_ROUNDOFF[acc] * math.sqrt(max(n, 1)) * (V64.abs() @ W64.abs().T)
    err = (C.double().cpu() - ref).abs()
    assert C.dtype == acc
    assert torch.all(err <= bound + 1e-300), f"max err {err.max():.3e}, bound {bound.max():.3e}"


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("acc", ACC)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_basis_dot(backend, storage, acc, m, k, n):
    V = _basis(m, n, storage, backend)
    W = _work(k, n, _work_dtype(acc), backend)
    C = ops.basis_dot(V, W, acc_dtype=acc)
    assert C.shape == (m, k) and C.device.type == backend.type
    _assert_dot_close(C, V, W, acc, n)


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("acc", ACC)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_basis_update(backend, storage, acc, m, k, n):
    V = _basis(m, n, storage, backend)
    W = _work(k, n, _work_dtype(acc), backend)
    C = _work(m, k, acc, backend, seed=2) * 0.1
    W0 = W.double().cpu().clone()
    out = ops.basis_update(V, C, W)
    assert out is W
    V64, C64 = V.double().cpu(), C.double().cpu()
    ref = W0 - C64.T @ V64
    scale = W0.abs() + C64.abs().T @ V64.abs()
    bound = C_DOT * UNIT_ROUNDOFF[acc] * math.sqrt(m + 1) * scale
    err = (W.double().cpu() - ref).abs()
    assert torch.all(err <= bound + 1e-300), f"max err {err.max():.3e}"


def test_mixed_work_dtype(backend):
    """W float32 with float64 accumulation and W float64 with float32 accumulation (raised
    to float64: a float64 W keeps its precision)."""
    V = _basis(9, 1001, torch.bfloat16, backend)
    for wd, acc in [(torch.float32, torch.float64), (torch.float64, torch.float32)]:
        W = _work(3, 1001, wd, backend)
        eff = torch.float64 if wd == torch.float64 else acc
        _assert_dot_close(ops.basis_dot(V, W, acc_dtype=acc), V, W, eff, 1001)
        C = _work(9, 3, acc, backend, seed=3) * 0.1
        ref = W.double().cpu() - C.double().cpu().T @ V.double().cpu()
        ops.basis_update(V, C, W)
        u = max(UNIT_ROUNDOFF[acc], UNIT_ROUNDOFF[wd])
        assert torch.allclose(W.double().cpu(), ref, rtol=0, atol=C_DOT * u * 10 * ref.abs().max())


def _orthonormal(m: int, n: int, storage: torch.dtype, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small QR: threading it costs ~0.7 s on a busy 2-core box
    try:
        q, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
    finally:
        torch.set_num_threads(threads)
    return q.T.contiguous().to(storage).to(device)


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("acc", ACC)
@pytest.mark.parametrize("m,k,n", [(1, 1, 64), (5, 3, 4099), (63, 8, 257), (4, 11, 300)])
def test_reorthogonalize(backend, storage, acc, m, k, n):
    V = _orthonormal(m, n, storage, backend)
    W = _work(k, n, acc, backend)
    V64, W64 = V.double().cpu(), W.double().cpu().clone()
    C, norms = ops.reorthogonalize(V, W, acc_dtype=acc)
    assert C.shape == (m, k) and norms.shape == (3, k)
    # Same decisions and coefficients as float64 CGS2 on the stored values.
    Wr = W64.clone()
    Cr, nr = _reference.reorthogonalize(V64, Wr, acc_dtype=torch.float64)
    redo = norms[1].cpu() < ops.DGKS_ETA * norms[0].cpu()
    assert torch.equal(redo, nr[1] < ops.DGKS_ETA * nr[0])
    bound = C_DOT * UNIT_ROUNDOFF[acc] * math.sqrt(n) * (V64.abs() @ W64.abs().T)
    assert torch.all((C.double().cpu() - Cr).abs() <= 2 * bound + 1e-300)
    assert torch.allclose(norms.double().cpu(), nr, rtol=C_DOT * UNIT_ROUNDOFF[acc] * math.sqrt(n))
    # Orthogonality to the stored basis: the stored basis is orthonormal only to u_storage, so
    # one CGS pass leaves |V w| ~ u_storage * |C|; the arithmetic adds u_acc * sqrt(n).
    u = UNIT_ROUNDOFF[storage] * math.sqrt(m) + UNIT_ROUNDOFF[acc] * math.sqrt(n)
    Wn = W.double().cpu()
    rel = (V64 @ Wn.T).abs() / (V64.norm(dim=1)[:, None] * W64.norm(dim=1)[None, :])
    assert rel.max() <= 4 * u, f"{rel.max():.3e} > 4 * {u:.3e}"


def test_reorthogonalize_dgks_second_pass(backend):
    """The second pass fires on a nearly dependent row, and only there."""
    m, n = 6, 2053
    V = _orthonormal(m, n, torch.float32, backend)
    W = _work(2, n, torch.float32, backend)
    W[0] = V[:3].sum(0) + 1e-4 * W[0] / W[0].norm()  # 1e-4 of it lies outside span(V)
    W1 = W[1].clone()
    C, norms = ops.reorthogonalize(V, W)
    redo = norms[1] < ops.DGKS_ETA * norms[0]
    assert redo.tolist() == [True, False]
    assert norms[2, 1] == norms[1, 1]  # untouched row: final norm is the pass-1 norm
    # The untouched row's coefficients are exactly one classical GS pass.
    C1 = ops.basis_dot(V, W1[None])
    assert torch.allclose(C[:, 1], C1[:, 0], rtol=0, atol=1e-6)
    # After two passes the dependent row is orthogonal to V relative to what remains of it.
    rel = (V.double() @ W[0].double()).abs().max() / W[0].double().norm()
    assert rel < 1e-3, rel  # one pass would leave ~ u32 * |w|/|w_after| = 6e-8 / 1e-4 ~ 6e-4


# --------------------------------------------------------------------------------------------
# layouts, validation, dispatch
# --------------------------------------------------------------------------------------------


def test_noncontiguous_inputs(backend):
    n, m, k = 1000, 5, 3
    Vo = _orthonormal(m, n, torch.float32, backend)
    big = torch.zeros(m, n + 24, device=backend)
    big[:, 7 : 7 + n] = Vo
    V_rows = big[:, 7 : 7 + n]  # row stride n + 24: read in place
    V_t = Vo.T.contiguous().T  # inner stride m: copied
    for V in (V_rows, V_t):
        Wbig = _work(k, 2 * n, torch.float32, backend)
        W = Wbig[:, ::2]  # inner stride 2: computed on a copy and written back
        W0 = W.double().cpu().clone()
        _assert_dot_close(ops.basis_dot(V, W), V, W, torch.float32, n)
        C = ops.basis_dot(V, W) * 0.5
        ops.basis_update(V, C, W)
        ref = W0 - C.double().cpu().T @ V.double().cpu()
        assert torch.allclose(W.double().cpu(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
        assert torch.equal(Wbig[:, 1::2].cpu(), _work(k, 2 * n, torch.float32, "cpu")[:, 1::2])
        Wt = _work(n, k, torch.float32, backend).T  # [k, n] view with inner stride k
        C, norms = ops.reorthogonalize(V, Wt)
        rel = (V.double() @ Wt.double().T).abs().max() / norms[0].min()
        assert rel < 4 * UNIT_ROUNDOFF[torch.float32] * n**0.5, rel


def test_aliasing_is_refused(backend):
    V = _basis(4, 100, torch.float32, backend)
    C = torch.zeros(4, 4, device=backend)
    with pytest.raises(ValueError, match="W must not alias V"):
        ops.basis_update(V, C, V)
    with pytest.raises(ValueError, match="W must not alias V"):
        ops.reorthogonalize(V, V[1:3])
    with pytest.raises(ValueError, match="overlapping elements"):
        ops.basis_update(V[:2], C[:2, :3], torch.zeros(1, 100, device=backend).expand(3, 100))


def test_bad_arguments(backend):
    V = _basis(4, 100, torch.float32, backend)
    W = _work(2, 100, torch.float32, backend)
    with pytest.raises(TypeError, match="V must have dtype"):
        ops.basis_dot(V.to(torch.int32), W)
    with pytest.raises(TypeError, match="W must have dtype"):
        ops.basis_dot(V, W.to(torch.bfloat16))
    with pytest.raises(TypeError, match="acc_dtype"):
        ops.basis_dot(V, W, acc_dtype=torch.float16)
    with pytest.raises(ValueError, match="W must have n=100"):
        ops.basis_dot(V, W[:, :50])
    with pytest.raises(ValueError, match=r"C must have shape \(m, k\) = \(4, 2\)"):
        ops.basis_update(V, torch.zeros(2, 4, device=backend), W)
    with pytest.raises(ValueError, match="eta"):
        ops.reorthogonalize(V, W, eta=-1.0)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ops.basis_dot(V.tolist(), W)


@pytest.mark.skipif(not _native.available(), reason="hessfast._C unavailable")
def test_cpp_backstop_raises_value_error():
    """Called directly with nonsense, _C raises ValueError instead of crashing."""
    with pytest.raises(ValueError, match="null data pointer"):
        _native._C.cpu.basis_dot(0, 10, 0, 0, 10, 0, 0, 0, 2, 2, 10)
    with pytest.raises(ValueError, match="dtype"):
        _native._C.cpu.basis_dot(8, 10, 0, 8, 10, 2, 8, 0, 2, 2, 10)


def test_forced_native_unavailable(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "IMPORT_ERROR", "ImportError: simulated")
    V, W = _basis(3, 10, torch.float32, "cpu"), _work(2, 10, torch.float32, "cpu")
    monkeypatch.setenv("HESSFAST_BACKEND", "native")
    with pytest.raises(BackendUnavailableError, match="simulated"):
        ops.basis_dot(V, W)
    monkeypatch.setenv("HESSFAST_BACKEND", "auto")
    monkeypatch.setattr(ops, "_FALLBACK_WARNED", False)
    with pytest.warns(UserWarning, match="native kernels unavailable.*simulated"):
        _assert_dot_close(ops.basis_dot(V, W), V, W, torch.float32, 10)
    report = ops.backend_report()
    assert report["basis_dot"]["cpu"]["selected"] == "reference"
    assert "simulated" in report["basis_dot"]["cpu"]["not_supported_reasons"]["native"][0]


def test_backend_report_shape():
    report = ops.backend_report()
    for op in ops.OPS:
        for dev in ("cpu", "cuda"):
            entry = report[op][dev]
            assert {"selected", "not_supported_reasons"} <= set(entry) <= {
                "selected", "not_supported_reasons", "why"}
            assert set(entry["not_supported_reasons"]) == {"native", "reference"}
    if _native.available():
        assert report["basis_dot"]["cpu"]["selected"] == "native"


def test_bad_backend_env(monkeypatch):
    monkeypatch.setenv("HESSFAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="HESSFAST_BACKEND"):
        ops.basis_dot(_basis(2, 4, torch.float32, "cpu"), _work(1, 4, torch.float32, "cpu"))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and CUDA kernels")
def test_cuda_device_mismatch():
    V = _basis(3, 10, torch.float32, "cuda")
    with pytest.raises(ValueError, match="one device"):
        ops.basis_dot(V, _work(2, 10, torch.float32, "cpu"))


def test_auto_on_cuda_uses_native_only_where_it_measured_faster(monkeypatch):
    """The choice is a table from the H200 benchmark (no op beat torch there); forcing native
    overrides it."""
    monkeypatch.setattr(ops, "_native_reasons", lambda device_type: [])
    monkeypatch.setenv("HESSFAST_BACKEND", "auto")
    cuda = torch.device("cuda")
    for op in ("basis_dot", "basis_update", "reorthogonalize"):
        assert ops._pick(op, cuda) == "reference"
        assert ops._pick(op, torch.device("cpu")) == "native"
    monkeypatch.setenv("HESSFAST_BACKEND", "native")
    assert ops._pick("reorthogonalize", cuda) == "native"


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32])
def test_reference_casts_a_low_precision_basis_in_row_chunks(monkeypatch, storage) -> None:
    """The reference backend converts a bf16/fp16 basis chunk by chunk (its fp32 copy never
    exists whole); the chunked results equal the one-shot ones to rounding."""
    import hessfast._reference as ref

    g = torch.Generator().manual_seed(5)
    V = torch.linalg.qr(torch.randn(300, 37, generator=g, dtype=torch.float64))[0].T
    V = V.contiguous().to(storage)
    W = torch.randn(3, 300, generator=g)
    C_one, W_one = ref.basis_dot(V, W), W.clone()
    Cr_one, norms_one = ref.reorthogonalize(V, W_one)
    seen: list[int] = []
    original = ref._rows

    def spy(Vx, acc):
        for rows, Vc in original(Vx, acc):
            seen.append(Vc.shape[0])
            yield rows, Vc

    monkeypatch.setattr(ref, "CAST_CHUNK_BYTES", 5 * 300 * 4)  # 5 rows of fp32 at a time
    monkeypatch.setattr(ref, "_rows", spy)
    W_chunk = W.clone()
    Cr_chunk, norms_chunk = ref.reorthogonalize(V, W_chunk)
    torch.testing.assert_close(ref.basis_dot(V, W), C_one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(Cr_chunk, Cr_one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(W_chunk, W_one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norms_chunk, norms_one, rtol=1e-5, atol=1e-6)
    if storage == torch.float32:
        assert set(seen) == {37}  # no cast needed: the basis is used as it is
    else:
        assert max(seen) == 5 and sum(seen) % 37 == 0
