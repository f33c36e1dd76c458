"""The memory-lean Krylov modes of eigsh (``krylov="lean"``, hessfast/lanczos/lean.py):
the plain three-term recurrence for k = 1 against float64 ``eigvalsh`` on prescribed spectra
(clustered, repeated, wide range, negative), its eigenvector pass, the restarted small basis
for k > 1, the ``auto`` choice, and the memory: the live parameter-sized tensors during the
products of a lean run are counted (a gc scan at every product)."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

import hessfast as hf
from hessfast import memory
from hessfast.lanczos import select
from hessfast.testing import spectra

CASES = {
    "clustered": lambda: spectra.clustered(300),
    "repeated": lambda: spectra.two_values(300),
    "wide": lambda: spectra.geometric(300),
    "negative": lambda: spectra.negative_dominant(300),
    "even": lambda: spectra.evenly_spaced(300, signs=True),
}


# "wide" SA is left out: its bottom is a geometric continuum down to 1e-12, where no
# method converges a relative 1e-8 in a few thousand products (nor is it a lean question)
PAIRS = [(c, w) for c in sorted(CASES) for w in ("LA", "SA", "LM") if (c, w) != ("wide", "SA")]


@pytest.mark.parametrize(("case", "which"), PAIRS)
def test_lean_extreme_equals_eigvalsh(case, which):
    M, _ = CASES[case]()
    lam = torch.linalg.eigvalsh(M.double())
    want = float(lam[select(lam, 1, which)][0])
    A = hf.LinearOperator.from_matrix(M)
    r = hf.eigsh(A, k=1, which=which, tol=1e-8, krylov="lean", max_matvecs=3000)
    assert r.krylov == "lean" and r.status == "CONVERGED" and not r.verified
    scale = float(lam.abs().max())
    # the Ritz residual bounds the distance to an eigenvalue; the extreme one is the answer
    assert abs(float(r.eigenvalues[0]) - want) <= 1e-6 * scale, (case, which)
    v = r.eigenvectors[0].double()
    true_res = float((M.double() @ v - float(r.eigenvalues[0]) * v).norm())
    assert true_res <= 10 * float(r.residuals[0]) + 1e-12 * scale
    if which == "LA":
        assert hf.lambda_max(A, tol=1e-8, krylov="lean") == pytest.approx(want, abs=1e-6 * scale)


def test_lean_float32_and_vectors_off():
    M, lam = spectra.evenly_spaced(400)
    A = hf.LinearOperator.from_matrix(M.float())
    with_v = hf.eigsh(A, k=1, tol=1e-4, krylov="lean")
    without = hf.eigsh(A, k=1, tol=1e-4, krylov="lean", vectors=False)
    assert without.eigenvectors.shape == (0, 400)
    assert with_v.eigenvectors.shape == (1, 400) and with_v.eigenvectors.dtype == torch.float32
    # the eigenvector pass re-runs the recurrence: one product fewer than the first pass
    assert with_v.num_matvecs == 2 * without.num_matvecs - 1
    assert float(with_v.eigenvalues[0]) == float(without.eigenvalues[0])
    assert float(without.eigenvalues[0]) == pytest.approx(float(lam.max()), rel=1e-4)
    v = with_v.eigenvectors[0].double()
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-6)
    assert float((M @ v - float(with_v.eigenvalues[0]) * v).norm()) < 1e-3


@pytest.mark.parametrize("case", ["clustered", "repeated", "negative"])
def test_restarted_top_k_equals_eigvalsh(case):
    M, _ = CASES[case]()
    lam = torch.linalg.eigvalsh(M)
    A = hf.LinearOperator.from_matrix(M)
    r = hf.eigsh(A, k=5, tol=1e-8, krylov="lean", max_matvecs=5000)
    assert r.krylov == "restarted" and r.status == "CONVERGED" and r.verified
    expect = lam[select(lam, 5, "LA")]
    assert torch.allclose(r.eigenvalues, expect, atol=1e-6 * float(lam.abs().max()))


def _tiny_memory(monkeypatch, nbytes: int) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda device: nbytes)


def test_auto_keeps_full_when_it_fits_and_goes_lean_when_not(monkeypatch):
    M, lam = spectra.evenly_spaced(500)
    A = hf.LinearOperator.from_matrix(M)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fits: no warning, the full path bit for bit
        auto = hf.eigsh(A, k=3)
    full = hf.eigsh(A, k=3, krylov="full")
    assert auto.krylov == "full" and auto.verified
    assert torch.equal(auto.eigenvalues, full.eigenvalues)
    need = hf.estimate_memory(A, "eigsh", k=1, krylov="full", available=1).total()
    lean = hf.estimate_memory(A, "eigsh", k=1, krylov="lean", available=1).total()
    assert lean < need
    resident = M.numel() * M.element_size()  # the plan counts the matrix as resident
    _tiny_memory(monkeypatch, (need + lean) // 2 - resident)  # the full basis does not fit
    with pytest.warns(UserWarning, match="hessfast: .*is not kept.*krylov='lean'"):
        r = hf.eigsh(A, k=1, tol=1e-8)
    assert r.krylov == "lean" and r.eigenvalues[0] == pytest.approx(float(lam.max()), abs=1e-6)
    with pytest.warns(UserWarning, match="thick restart"):
        r5 = hf.eigsh(A, k=3, tol=1e-8)
    assert r5.krylov == "restarted"
    assert torch.allclose(r5.eigenvalues, lam.flip(0)[:3], atol=1e-6)
    with pytest.warns(UserWarning, match="krylov='lean'"):
        assert hf.lambda_max(A, tol=1e-8) == pytest.approx(float(lam.max()), abs=1e-6)
    # an explicit storage keeps the full path (and its own refusal when it cannot fit)
    with pytest.raises(hf.errors.OutOfMemoryPlanError):
        hf.eigsh(A, k=1, basis_dtype=torch.float64)
    plan = hf.estimate_memory(A, "eigsh", k=1)  # auto plans lean too
    assert plan.settings["krylov"] == "lean" and plan.basis == 0


def test_auto_goes_lean_when_the_basis_would_take_over_a_quarter(monkeypatch):
    """The full plan FITS, but its basis would take more than 1/AUTO_BASIS_FRACTION of the
    capacity: auto runs lean (a 124M model's 16 GB basis on a 24 GB machine)."""
    M, lam = spectra.evenly_spaced(500)
    A = hf.LinearOperator.from_function(lambda V: V @ M, 500, dtype=M.dtype)  # nothing resident
    full = hf.estimate_memory(A, "eigsh", k=1, max_basis=500, krylov="full", available=1)
    cap = full.total()  # exactly enough for the whole full plan
    assert full.basis > cap // hf.memory.AUTO_BASIS_FRACTION
    _tiny_memory(monkeypatch, cap)
    with pytest.warns(UserWarning, match="more than 1/4 of the"):
        r = hf.eigsh(A, k=1, max_basis=500, tol=1e-8)
    assert r.krylov == "lean" and r.eigenvalues[0] == pytest.approx(float(lam.max()), abs=1e-6)
    _tiny_memory(monkeypatch, 8 * cap)  # plenty: the full, verified path (the probe ran once)
    r = hf.eigsh(A, k=1, max_basis=500, tol=1e-8)
    assert r.krylov == "full" and r.verified


def test_lean_refusals():
    M, _ = spectra.evenly_spaced(100)
    A = hf.LinearOperator.from_matrix(M)
    with pytest.raises(hf.errors.ConfigurationError, match="checkpoint"):
        hf.eigsh(A, k=1, krylov="lean", checkpoint="/tmp/never-written.pt")
    with pytest.raises(hf.errors.ConfigurationError, match="krylov"):
        hf.eigsh(A, k=1, krylov="small")
    with pytest.raises(hf.errors.ArgumentTypeError, match="vectors"):
        hf.eigsh(A, k=1, vectors="yes")


class _Counting(hf.LinearOperator):
    """A diagonal operator that counts, at every product, the bytes of live tensors whose
    last dimension is n (the parameter-sized vectors), in units of one n-vector."""

    def __init__(self, n: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(n, dtype, "cpu")
        self.d = torch.linspace(-1.0, 2.0, n, dtype=dtype)
        self.checked = True
        self.peak = 0.0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        n = self.shape[0]
        seen: dict[int, int] = {}
        for o in gc.get_objects():
            if isinstance(o, torch.Tensor) and o.dim() >= 1 and o.shape[-1] == n \
                    and o is not self.d:
                st = o.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        self.peak = max(self.peak, sum(seen.values()) / (n * self.d.element_size()))
        return V * self.d


def test_lean_memory_is_a_few_vectors():
    """Counted at each product (the output not yet allocated): 3 vectors for lean
    lambda_max, 4 with the eigenvector pass (y), 4 for lean SLQ (the probe too), against the
    32-row basis and the probes x steps bases of the full modes."""
    n = 40_000
    peaks = {}
    runs = {
        "lambda_max lean": lambda A: hf.lambda_max(A, krylov="lean", max_matvecs=15),
        "eigsh lean": lambda A: hf.eigsh(A, k=1, krylov="lean", max_matvecs=15),
        "lambda_max full": lambda A: hf.lambda_max(A, krylov="full", max_matvecs=15),
        "slq lean": lambda A: hf.spectral_density(A, num_probes=2, num_steps=12,
                                                  krylov="lean"),
        "slq full": lambda A: hf.spectral_density(A, num_probes=2, num_steps=12,
                                                  krylov="full"),
    }
    for name, run in runs.items():
        A = _Counting(n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 15 products: not converged, on purpose
            run(A)
        peaks[name] = A.peak
    assert peaks["lambda_max lean"] <= 3, peaks  # q_prev, q, w; the block is a view of q
    assert peaks["eigsh lean"] <= 4, peaks  # + y in the second pass
    assert peaks["slq lean"] <= 4, peaks
    assert peaks["lambda_max full"] >= 15, peaks  # the 32-row basis
    assert peaks["slq full"] >= 2 * 12, peaks


def test_lean_says_when_the_products_error_is_above_tol():
    """An inexact operator (finite differences: product_error) floors the residuals at its
    error; a result converged only to that level warns instead of passing silently."""
    M, lam = spectra.evenly_spaced(200)

    class Inexact(hf.LinearOperator):
        product_error = 0.2  # a coarse finite-difference operator's estimate

        def __init__(self) -> None:
            super().__init__(200, M.dtype, "cpu")
            self.checked = True

        def _matmat(self, V):
            return V @ M

    with pytest.warns(UserWarning, match="products' own accuracy"):
        r = hf.eigsh(Inexact(), k=1, krylov="lean", tol=1e-6, vectors=False)
    assert r.converged.all() and r.residual_floor >= 0.2 * r.norm_estimate * 0.999
    # the block Lanczos paths (restarted and full) floor and warn the same way
    for krylov in ("lean", "full"):
        with pytest.warns(UserWarning, match=r"eigsh: converged only to the products' own"):
            r = hf.eigsh(Inexact(), k=3, krylov=krylov, tol=1e-6, max_matvecs=400)
        assert r.status == "CONVERGED" and r.verified, krylov
        assert float(r.residuals.min()) >= 0.2 * r.norm_estimate * 0.999
        assert r.residual_floor >= 0.2 * r.norm_estimate * 0.999
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact products: no such warning
        hf.eigsh(hf.LinearOperator.from_matrix(M), k=1, krylov="lean", tol=1e-6, vectors=False)


class _FreshCounting(_Counting):
    """:class:`_Counting` whose products are fresh tensors (as a model operator's)."""

    fresh_products = True


@pytest.mark.parametrize("fresh", [False, True])
def test_restarted_rows_stay_within_the_plan(fresh):
    """The restarted top-k (k = 5, b = 1) holds at a product at most its plan's rows less
    the product: the 11 basis rows, the block, a verification round's dropped block and, only
    when a thick restart falls inside a verification round, the candidates' copy; with fresh
    products the next block is the product itself (one row fewer)."""
    n = 20_000
    A = (_FreshCounting if fresh else _Counting)(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a budget, not convergence, ends it
        hf.eigsh(A, k=5, krylov="lean", max_matvecs=60, vectors=False)
    plan = hf.estimate_memory(A, "eigsh", k=5, krylov="lean", available=2**40)
    rows = (plan.basis + plan.vectors - next(i.bytes for i in plan.items
                                             if i.name == "scratch")) / (4 * n)
    assert plan.settings["fresh_products"] is fresh
    assert rows == 11 + 5 + (2 if fresh else 3) + 1
    assert A.peak <= rows - 1, (A.peak, rows)


@pytest.mark.parametrize("max_basis", [7, 60])
def test_candidates_copied_only_when_a_restart_falls_in_a_round(monkeypatch, max_basis):
    """A verification round keeps its candidates in the basis' first rows: a copy is taken
    only when a thick restart would rewrite them (rounds of 6 steps: a basis of k + 2 rows
    restarts inside every round, one of 60 rows never does), and the answer is right either
    way."""
    import hessfast.lanczos.restart as restart_mod
    import hessfast.lanczos.run as run_mod

    monkeypatch.setattr(restart_mod, "verify_steps", lambda *args: 6)
    copies = []
    keep = run_mod.Run.keep_candidates

    def counting(self):
        before = self.ref_vecs
        keep(self)
        copies.append(before is None and self.ref_vecs is not None)

    monkeypatch.setattr(run_mod.Run, "keep_candidates", counting)
    M, _ = CASES["clustered"]()
    lam = torch.linalg.eigvalsh(M)
    A = hf.LinearOperator.from_matrix(M)
    r = hf.eigsh(A, k=5, tol=1e-8, krylov="lean", max_basis=max_basis, max_matvecs=5000)
    assert r.status == "CONVERGED" and r.verified
    assert torch.allclose(r.eigenvalues, lam[select(lam, 5, "LA")],
                          atol=1e-6 * float(lam.abs().max()))
    V = r.eigenvectors.double()
    assert float((V @ M.double() - r.eigenvalues[:, None] * V).norm(dim=1).max()) < 1e-5
    assert (sum(copies) > 0) is (max_basis == 7), copies
