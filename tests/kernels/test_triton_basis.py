"""The Triton basis kernels (hessfast/kernels/basis_triton.py) against a float64 oracle.

Rule for every output, entry by entry: ``|triton - oracle| <= B_triton + B_oracle``, the oracle
being the torch reference on the stored values converted to float64, and each ``B`` a worst-case
forward error bound of that computation as it is evaluated (Higham, Accuracy and Stability of
Numerical Algorithms, 2nd ed., section 3.1), built from the magnitudes actually involved:

- a sum of ``L`` terms in ANY order (any tiling, slab split, tree or sequential reduction, FMA
  or not) with unit roundoff ``u`` is off by at most ``gamma_L = L u / (1 - L u)`` times the sum
  of the terms' magnitudes. ``basis_dot``: ``L = n`` products, magnitude ``|V| |W|^T``.
  ``basis_update``: ``w - sum_i c_i v_i`` has ``L = m + 1`` terms, magnitude
  ``|W| + |C|^T |V|`` (the error is relative to the magnitudes BEFORE the subtraction, not to
  its small result after reorthogonalisation).
- ``mode="dot"`` (float32 only): each product has a relative error ``delta`` from splitting one
  operand (bf16x3: ``2^-24``; tf32x3: ``2^-20``, more than the ``3.01 * 2^-22`` its three
  dropped cross terms cost) and counts as 3 terms; tensor cores may truncate instead of round
  while accumulating, so the unit is ``2u``: ``delta + gamma_3L(2u) (1 + delta)``.
- a 2-norm ``sqrt(sum w^2)`` is off by at most ``gamma_(n+1)`` relative to the norm of the
  computed row, which itself is off by the row's elementwise bound (triangle inequality).
- CGS2: pass 1's computed C1 and W1 carry their bounds into pass 2: ``|dC2| <= |V| dW1^T +
  rd |V| (|W1| + dW1)^T`` and ``dW2 <= dW1 + dC2^T |V| + ru (|W1| + dW1 + (|C2| + dC2)^T
  |V|)``. The oracle's float64 bound is added. Terms of order ``u^2`` are dropped.

The torch reference in the same dtypes must meet the same rule with its own (fma) bound: a
check of the derivation. The interpreter (``TRITON_INTERPRET=1``) must be chosen before Triton
is imported, and another test may already have imported it here, so the CPU grid runs in one
subprocess. The GPU grid (``-m cuda``) runs in process and skips without CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hessfast import ops
from hessfast.errors import BackendUnavailableError
from hessfast.kernels import _triton, basis_triton

COMMON = textwrap.dedent(
    """
    import math
    import torch
    from hessfast import _reference as ref
    from hessfast.kernels import basis_triton as bt

    U = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
    # relative error of one product in the dot modes (split of one operand into bf16/tf32 parts)
    DELTA = {1: 2.0**-24, 2: 2.0**-20}
    failures = []
    worst = {}
    cases = 0

    def basis(m, n, dt, g, dev, orth):
        X = torch.randn(max(n, m), m, generator=g, dtype=torch.float64)
        if orth and n >= m:
            X = torch.linalg.qr(X[:n])[0]
        return X[:n].T.contiguous().to(dt).to(dev)

    def block(V, k, g, dgks):
        # dgks: rows alternately inside span(V) (pass 2 fires) and orthogonal to it (it does not)
        m, n = V.shape
        W = torch.randn(k, n, generator=g, dtype=torch.float64).to(V.device)
        if dgks:
            Vd = V.double()
            Q = torch.linalg.qr(Vd.T)[0]
            for j in range(k):
                if j % 2 == 0:
                    W[j] = W[j] @ Q @ Q.T + 1e-3 * W[j] / max(1.0, n**0.5)
                else:
                    W[j] = W[j] - W[j] @ Q @ Q.T
        return W

    def mode_code(mode, storage, acc):
        # the documented arithmetic: fma; bf16x3 for a bf16 basis; tf32x3 otherwise (float32)
        if mode == "fma" or acc == torch.float64:
            return 0
        return 1 if storage == torch.bfloat16 else 2

    def gamma(terms, u):
        if not terms * u < 0.5:
            raise ValueError(f"no useful bound for {terms} terms at u={u}")
        return terms * u / (1 - terms * u)

    def coef(terms, acc, code, extra=0):
        # |computed - exact| <= coef * magnitude for a sum of `terms` products and `extra` plain
        # terms, summed in any order in the accumulation dtype `acc` by arithmetic `code`
        if code == 0:
            return gamma(terms + extra, U[acc])
        d = DELTA[code]
        return d + gamma(3 * terms + extra, 2 * U[acc]) * (1 + d)

    def dot_bound(Vd, Wd, acc, code):
        # [m, k]: bound on |fl(V W^T) - V W^T|
        return coef(Vd.shape[1], acc, code) * (Vd.abs() @ Wd.abs().T)

    def update_bound(Vd, Cd, Wd, acc, code):
        # [k, n]: bound on |fl(W - C^T V) - (W - C^T V)|
        return coef(Vd.shape[0], acc, code, 1) * (Wd.abs() + Cd.abs().T @ Vd.abs())

    def reorth_bound(Vd, Wd, redo, acc, code):
        # bounds on |computed - exact| of CGS2 (pass 2 on the rows `redo`) as
        # reorthogonalize computes it: W [k, n], C [m, k], norms [3, k]
        m, n = Vd.shape
        A = Vd.abs()
        rd, ru, rn = coef(n, acc, code), coef(m, acc, code, 1), gamma(n + 1, U[acc])
        C1 = Vd @ Wd.T
        W1 = Wd - C1.T @ Vd
        eC1 = rd * (A @ Wd.abs().T)
        eW1 = eC1.T @ A + ru * (Wd.abs() + (C1.abs() + eC1).T @ A)
        C2 = Vd @ W1.T
        W2 = W1 - C2.T @ Vd
        W1m = W1.abs() + eW1  # |computed W1|
        eC2 = A @ eW1.T + rd * (A @ W1m.T)
        eW2 = eW1 + eC2.T @ A + ru * (W1m + (C2.abs() + eC2).T @ A)
        eC = eC1 + eC2 + U[acc] * ((C1 + C2).abs() + eC1 + eC2)

        def norm_bound(X, eX):
            ex = eX.norm(dim=1)
            return ex + rn * (X.norm(dim=1) + ex)

        e_after1 = norm_bound(W1, eW1)
        eW = torch.where(redo[:, None], eW2, eW1)
        eCf = torch.where(redo[None, :], eC, eC1)
        e_final = torch.where(redo, norm_bound(W2, eW2), e_after1)
        return eW, eCf, torch.stack([rn * Wd.norm(dim=1), e_after1, e_final])

    def check(name, got, same, oracle, bound, same_bound):
        # entrywise |got - oracle| <= bound; the torch reference in the same dtypes, `same`,
        # must meet its own bound (else the derivation, not the kernel, is wrong)
        global cases
        cases += 1
        got, same = got.double(), same.double()
        if got.shape != oracle.shape:
            failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(oracle.shape)}")
            return
        if not got.numel():
            return
        for who, x, b in (("triton", got, bound), ("torch reference", same, same_bound)):
            err = (x - oracle).abs()
            ratio = (err / b.clamp_min(1e-300)).max().item()
            key = f"{who} {name.split(' ')[0]}"
            worst[key] = max(worst.get(key, 0.0), ratio)
            if not ratio <= 1.0:
                i = int((err / b.clamp_min(1e-300)).argmax())
                failures.append(f"{name}: {who} error {err.flatten()[i].item():.3g} > bound "
                                f"{b.flatten()[i].item():.3g} at flat index {i}")

    def run_case(tag, V, W0, mode, kw, eta, dev):
        global cases
        m, n = V.shape
        k = W0.shape[0]
        acc = torch.float64 if V.dtype == torch.float64 else torch.float32
        code = mode_code(mode, V.dtype, acc)
        f64 = torch.float64
        Vd = V.double()
        Wst = W0.to(acc)
        Wd = Wst.double()
        name = f"{tag} {V.dtype} m={m} k={k} n={n} mode={mode} {kw} eta={eta}"
        b64 = dot_bound(Vd, Wd, f64, 0)
        check("dot " + name, bt.basis_dot_triton(V, Wst, mode=mode, **kw),
              ref.basis_dot(V, Wst), ref.basis_dot(Vd, Wd), dot_bound(Vd, Wd, acc, code) + b64,
              dot_bound(Vd, Wd, acc, 0) + b64)
        C = ref.basis_dot(V, Wst)
        Cd = C.double()
        Wt, Wr = Wst.clone(), Wst.clone()
        out = bt.basis_update_triton(V, C, Wt, mode=mode, **kw)
        if out is not Wt:
            failures.append(f"update {name}: did not return W")
        b64 = update_bound(Vd, Cd, Wd, f64, 0)
        check("update " + name, Wt, ref.basis_update(V, C, Wr),
              ref.basis_update(Vd, Cd, Wd.clone()), update_bound(Vd, Cd, Wd, acc, code) + b64,
              update_bound(Vd, Cd, Wd, acc, 0) + b64)
        Wt, Wr, Wo = Wst.clone(), Wst.clone(), Wd.clone()
        Ct, Nt = bt.reorthogonalize_triton(V, Wt, mode=mode, eta=eta, **kw)
        Cr, Nr = ref.reorthogonalize(V, Wr, eta=eta)
        Co, No = ref.reorthogonalize(Vd, Wo, eta=eta)
        if Ct.dtype != acc or Nt.dtype != acc or Nt.shape != (3, k):
            failures.append(f"reorth {name}: dtypes {Ct.dtype} {Nt.dtype} shape {Nt.shape}")
        redo_t, redo_o = Nt[1] < eta * Nt[0], No[1] < eta * No[0]
        if not torch.equal(redo_t.cpu(), redo_o.cpu()):
            failures.append(f"reorth {name}: pass-2 rows {redo_t.tolist()} != {redo_o.tolist()}")
            return
        if eta > 0:  # rows without pass 2 are bit for bit what pass 1 left
            Wp = Wst.clone()
            Cp, Np = bt.reorthogonalize_triton(V, Wp, mode=mode, eta=0.0, **kw)
            keep = ~redo_t
            cases += 1
            if not (torch.equal(Wt[keep], Wp[keep]) and torch.equal(Ct[:, keep], Cp[:, keep])
                    and torch.equal(Nt[:, keep], Np[:, keep])):
                failures.append(f"reorth {name}: rows without pass 2 changed")
        redo = redo_o.to(Vd.device)
        bt_ = reorth_bound(Vd, Wd, redo, acc, code)
        br = reorth_bound(Vd, Wd, redo, acc, 0)
        bo = reorth_bound(Vd, Wd, redo, f64, 0)
        for i, what in enumerate(("W", "C", "norms")):
            check(f"reorth-{what} " + name, (Wt, Ct, Nt)[i], (Wr, Cr, Nr)[i], (Wo, Co, No)[i],
                  bt_[i] + bo[i], br[i] + bo[i])
    """
)

GRID_SCRIPT = COMMON + textwrap.dedent(
    """
    import json, os
    from hessfast import ops
    g = torch.Generator().manual_seed(0)
    i = 0
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        for n in (1, 7, 100, 507):
            for m in (1, 3, 8):
                i += 1
                k = (1, 3)[i % 2]
                mode = ("fma", "dot")[(i // 2) % 2]
                kw = {(3, 507): {"num_slabs": 5, "block": (2, 2, 16)},
                      (8, 100): {"num_slabs": 7, "block": (4, 2, 16)}}.get((m, n), {})
                V = basis(m, n, dt, g, "cpu", orth=True)
                dgks = n >= 4 * m and k > 1
                for eta in ((0.0, bt.DGKS_ETA, float("inf")) if dgks else (float("inf"),)):
                    W0 = block(V, k, g, dgks and eta == bt.DGKS_ETA)
                    run_case("grid", V, W0, mode, kw, eta, "cpu")
    # a strided-row basis and a block with strided rows and columns, updated in place
    for dt in (torch.bfloat16, torch.float32):
        Vbig = basis(5, 300, dt, g, "cpu", orth=True)
        V = torch.zeros(5, 317, dtype=dt)[:, 9:309]
        V.copy_(Vbig)
        W0 = block(V, 3, g, True)
        run_case("strided", V, W0, "fma", {"num_slabs": 2}, bt.DGKS_ETA, "cpu")
        Wbig = torch.full((3, 320), 7.0)
        Wv = Wbig[:, 11:311]
        Wv.copy_(W0.float())
        Wt = torch.full((300, 3), 7.0).T  # inner stride 3
        Wt.copy_(W0.float())
        Wr = W0.float().clone()
        C = ref.basis_dot(V, Wr)
        Vd, Cd, Wd = V.double(), C.double(), Wr.double()
        Wo = ref.basis_update(Vd, Cd, Wd.clone())
        bound = (update_bound(Vd, Cd, Wd, torch.float32, 0)
                 + update_bound(Vd, Cd, Wd, torch.float64, 0))
        for W in (Wv, Wt):
            ptr = W.data_ptr()
            bt.basis_update_triton(V, C, W)
            cases += 1
            if W.data_ptr() != ptr or not torch.all((W.double() - Wo).abs() <= bound):
                failures.append(f"in-place update on strides {W.stride()} wrong")
        cases += 1
        if not (torch.all(Wbig[:, :11] == 7) and torch.all(Wbig[:, 311:] == 7)):
            failures.append("update wrote outside W's columns")
    # the dispatcher: HESSFAST_BACKEND=triton goes to the kernels (counted; the same bits as
    # calling them directly, which the grid checked against the oracle), fp16 storage too
    direct = (bt.basis_dot_triton, bt.basis_update_triton, bt.reorthogonalize_triton)
    calls = []
    for fn in ("basis_dot_triton", "basis_update_triton", "reorthogonalize_triton"):
        orig = getattr(bt, fn)
        setattr(bt, fn, lambda *a, _o=orig, _f=fn, **k: (calls.append(_f), _o(*a, **k))[1])
    os.environ["HESSFAST_BACKEND"] = "triton"
    for dt in (torch.float16, torch.bfloat16):
        V = basis(4, 257, dt, g, "cpu", orth=True)
        W0 = block(V, 3, g, True).float()
        C = ops.basis_dot(V, W0)
        W, Wd = W0.clone(), W0.clone()
        same = [torch.equal(C, direct[0](V, W0)),
                ops.basis_update(V, C, W) is W and torch.equal(W, direct[1](V, C, Wd))]
        W, Wd = W0.clone(), W0.clone()
        Ct, Nt = ops.reorthogonalize(V, W)
        Cd, Nd = direct[2](V, Wd)
        same.append(torch.equal(W, Wd) and torch.equal(Ct, Cd) and torch.equal(Nt, Nd))
        cases += 3
        if not all(same):
            failures.append(f"ops with HESSFAST_BACKEND=triton, {dt}: same bits {same}")
    want = ["basis_dot_triton", "basis_update_triton", "reorthogonalize_triton"] * 2
    if calls != want:
        failures.append(f"dispatcher calls {calls} != {want}")
    print(json.dumps({"cases": cases, "failures": failures, "worst": worst}))
    """
)


def test_triton_basis_interpreter_grid(tmp_path) -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", HESSFAST_BACKEND="auto")
    # cwd outside the repository: `python -c` puts cwd first on sys.path, and the source tree's
    # hessfast (without its built _C) must not shadow the installed one the suite tests
    proc = subprocess.run([sys.executable, "-c", GRID_SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cases"] >= 150
    assert result["failures"] == [], "\n".join(result["failures"])


def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("HESSFAST_BACKEND", "triton")
    V, W = torch.randn(3, 10), torch.randn(2, 10)
    want = "TRITON_INTERPRET" if basis_triton.triton_import_error() is None else "pip install"
    for call in (lambda: ops.basis_dot(V, W), lambda: ops.reorthogonalize(V, W.clone()),
                 lambda: ops.basis_update(V, torch.zeros(3, 2), W.clone())):
        with pytest.raises(BackendUnavailableError, match=f"HESSFAST_BACKEND=triton.*{want}"):
            call()
    # the kernels themselves refuse CPU tensors the same way
    if basis_triton.triton_import_error() is None:
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
            basis_triton.basis_dot_triton(V, W)


def test_forced_triton_without_triton_names_the_import_error(monkeypatch) -> None:
    monkeypatch.setattr(_triton, "_failure", ImportError("simulated"))
    assert basis_triton.triton_import_error() == "ImportError: simulated"
    monkeypatch.setenv("HESSFAST_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="simulated.*pip install triton"):
        ops.basis_dot(torch.randn(3, 10), torch.randn(2, 10))
    report = ops.backend_report()["_triton"]["not_supported_reasons"]
    assert all("simulated" in report[op][dev][0] for op in ops.OPS for dev in ("cpu", "cuda"))


def test_backend_report_and_auto_table(monkeypatch) -> None:
    """The report names why Triton cannot run per op and device; auto picks Triton on CUDA only
    for ops in ops._CUDA_AUTO_TRITON (empty until a GPU measured them)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("HESSFAST_BACKEND", "auto")
    tri = ops.backend_report()["_triton"]
    assert tri["auto_on_cuda"] == sorted(ops._CUDA_AUTO_TRITON)
    assert set(tri["not_supported_reasons"]) == set(ops.OPS)
    assert tri["not_supported_reasons"]["basis_dot"]["cpu"]  # never on the CPU outside tests
    cuda = torch.device("cuda")
    monkeypatch.setattr(ops, "_native_reasons", lambda device_type: [])
    monkeypatch.setattr(ops, "_triton_reasons", lambda device_type: [])
    assert all(ops._pick(op, cuda) == "reference" for op in ops.OPS)
    monkeypatch.setattr(ops, "_CUDA_AUTO_TRITON", frozenset({"reorthogonalize"}))
    assert ops._pick("reorthogonalize", cuda) == "triton"
    assert ops._pick("basis_dot", cuda) == "reference"
    assert ops._pick("reorthogonalize", torch.device("cpu")) == "native"


GPU_OK = torch.cuda.is_available()


@pytest.mark.cuda
@pytest.mark.skipif(not GPU_OK, reason="needs a CUDA device")
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["fma", "dot"])
def test_triton_basis_gpu_grid(dt, mode) -> None:
    pytest.importorskip("triton")
    scope: dict = {}
    exec(COMMON, scope)  # the same checks as the interpreter grid, on CUDA tensors
    g = torch.Generator().manual_seed(1)
    for n, m, k in ((1, 1, 1), (4099, 63, 8), (100_000, 16, 3), (1_000_000, 64, 8)):
        V = scope["basis"](m, n, dt, g, "cpu", True).cuda()
        for eta in (float("inf"), basis_triton.DGKS_ETA):
            W0 = scope["block"](V, k, g, eta != float("inf") and n >= 4 * m)
            scope["run_case"]("gpu", V, W0, mode, {}, eta, "cuda")
    assert scope["failures"] == [], "\n".join(scope["failures"])
