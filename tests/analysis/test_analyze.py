"""hessfast.analysis.analyze: every number of the report against float64 dense references."""

from __future__ import annotations

import json
import math

import pytest
import torch

import hessfast as hf
from hessfast.analysis.analyze import analyze
from hessfast.analysis.blocks import param_groups
from hessfast.condition import SINGULAR_STAGE
from hessfast.errors import ConfigurationError
from hessfast.linop import LinearOperator
from hessfast.testing.dense import dense_ggn_reference, dense_hessian_reference
from hessfast.testing.models import make_mlp

pytestmark = pytest.mark.usefixtures("single_thread", "no_leaking_global_state")

TOL = 1e-3
PROBES = 8


def _mlp(sizes: tuple[int, ...] = (30, 30)):
    # Linear(8->8)-LayerNorm-Tanh-Linear(8->3), n = 115, float64
    return make_mlp(sizes=sizes, d_in=8, hidden=8, n_out=3, dtype=torch.float64)


def _per_probe_mass(report, below: float) -> torch.Tensor:
    """Per-probe quadrature weight below ``below`` from the stored density, ``[P]``."""
    nodes = torch.tensor(report.density["nodes"], dtype=torch.float64)
    weights = torch.tensor(report.density["weights"], dtype=torch.float64)
    return (weights * (nodes < below)).sum(1)


@pytest.fixture(scope="module")
def hess():
    model, loss_fn, batches = _mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    training = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    # steps >= n: each probe's Gauss rule is exact, so the density-derived numbers differ from
    # the dense truth by probe sampling only (checked to 4 standard errors below)
    report = analyze(model, loss_fn, batches, k=4, num_probes=PROBES, num_steps=200, tol=TOL,
                     lr=0.5)
    untouched = (
        torch.equal(rng, torch.get_rng_state())
        and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
        and training == [m.training for m in model.modules()]
        and all(p.grad is None for p in model.parameters())
    )
    M = dense_hessian_reference(model, loss_fn, batches)
    H = hf.hessian(model, loss_fn, batches)
    return report, M, torch.linalg.eigvalsh(M), H, untouched


def test_model_and_global_rng_untouched(hess) -> None:
    assert hess[4]


def test_extreme_eigenvalues_match_dense(hess) -> None:
    r, _, ev, _, _ = hess
    scale = float(ev.abs().max())
    assert r.n == ev.numel() == 115 and r.curvature == "Hessian"
    assert r.top_converged and r.lambda_min_converged
    top = ev.flip(0)[:4]
    assert len(r.top_eigenvalues) == len(r.top_residuals) == 4
    for got, want, res in zip(r.top_eigenvalues, top.tolist(), r.top_residuals, strict=True):
        assert abs(got - want) <= TOL * scale and res <= TOL * scale
    assert r.lambda_max == r.top_eigenvalues[0]
    assert abs(r.lambda_min - float(ev[0])) <= TOL * scale
    assert r.stable_lr == 2.0 / r.lambda_max


def test_trace_within_four_stderr(hess) -> None:
    r, M, _, _, _ = hess
    exact = float(M.trace())
    assert r.trace_stderr is not None
    if r.trace_stderr == 0:
        assert r.trace == pytest.approx(exact, rel=1e-10)
    else:
        assert abs(r.trace - exact) <= 4 * r.trace_stderr
    # the report says where the trace came from (the density's probes or an extra Hutch++)
    assert sum("trace" in p["quantities"] for p in r.parts) == 1


def test_definiteness_and_negative_mass_of_indefinite_hessian(hess) -> None:
    r, _, ev, _, _ = hess
    assert float(ev[0]) < -0.05 * float(ev[-1])  # the fixture is clearly indefinite
    assert r.definiteness == "indefinite" and r.condition is None
    assert r.zero_threshold == pytest.approx(TOL * max(abs(r.lambda_max), abs(r.lambda_min)))
    exact = float((ev < -r.zero_threshold).double().mean())
    per = _per_probe_mass(r, -r.zero_threshold)
    assert r.negative_mass == pytest.approx(float(per.mean()), abs=1e-12)
    # exact Gauss rule (steps >= n): the only error is the probes' sampling, so 4 stderr of the
    # per-probe values, plus a little for eigenvalues within roundoff of the threshold
    stderr = float(per.std() / math.sqrt(per.numel()))
    assert 0 < exact < 1 and abs(r.negative_mass - exact) <= 4 * stderr + 1e-3


def test_effective_rank_matches_dense(hess) -> None:
    r, _, ev, _, _ = hess
    norm = float(ev.abs().max())
    exact = float(ev.abs().sum()) / norm
    d = hf.SpectralDensity.from_dict({k: v for k, v in r.density.items() if k != "sigma"})
    stderr = d.trace_stderr(torch.abs) / max(abs(r.lambda_max), abs(r.lambda_min))
    assert abs(r.effective_rank - exact) <= 4 * stderr + TOL * exact
    assert "tr|H|" in r.effective_rank_definition


def test_per_layer_equals_dense_diagonal_blocks(hess) -> None:
    r, M, _, H, _ = hess
    groups: dict[str, list[int]] = {}  # flat coordinates of each module's parameters
    start = 0
    for name, shape in zip(H.param_names, H.param_shapes, strict=True):
        size = math.prod(shape)
        groups.setdefault(name.rpartition(".")[0], []).extend(range(start, start + size))
        start += size
    assert [g for g, _ in param_groups(H, "modules")] == list(groups)
    assert r.per_layer is not None and [g["name"] for g in r.per_layer] == list(groups)
    for g in r.per_layer:
        idx = torch.tensor(groups[g["name"]])
        block = M[idx][:, idx]
        bev = torch.linalg.eigvalsh(block)
        assert g["size"] == idx.numel()
        assert abs(g["lambda_max"] - float(bev[-1])) <= 10 * TOL * float(bev.abs().max())
        if g.get("trace_exact"):
            assert g["trace"] == pytest.approx(float(block.trace()), rel=1e-9, abs=1e-12)
        else:
            assert abs(g["trace"] - float(block.trace())) <= 4 * g["trace_stderr"]


def test_parts_account_for_the_products(hess) -> None:
    r = hess[0]
    names = [p["name"] for p in r.parts]
    assert names[:5] == ["operator", "top_k", "lambda_min", "density", *names[4:5]]
    assert "per_layer" in names
    dens = r.part("density")
    # one pass per Lanczos step for all probes (a probe that breaks down early, in an
    # invariant subspace, stops costing products)
    assert dens["num_passes"] == max(r.density["steps_taken"]) <= 115
    assert dens["num_matvecs"] == r.density["num_matvecs"] <= PROBES * 115
    for p in r.parts:
        assert p["num_matvecs"] >= 0 and p["num_passes"] >= 0 and p["seconds"] >= 0
        assert p["source"]
    assert r.num_passes == sum(p["num_passes"] for p in r.parts)
    assert r.num_matvecs == sum(p["num_matvecs"] for p in r.parts)
    json.dumps(r.to_dict(), allow_nan=False)


def test_ggn_is_positive_semidefinite():
    # 12 samples x 3 classes: rank(GGN) <= 24 < n = 115, so it is singular
    model, loss_fn, batches = _mlp(sizes=(6, 6))
    r = analyze(model, loss_fn, batches, curvature="ggn", k=2, num_probes=4, num_steps=30,
                per_layer=False)
    G = dense_ggn_reference(model, loss_fn, batches)
    ev = torch.linalg.eigvalsh(G)
    assert r.curvature == "GGN" and r.per_layer is None
    assert r.definiteness == "positive semi-definite (singular to tolerance)"
    assert r.condition is None and r.negative_mass == 0.0
    assert abs(r.lambda_max - float(ev[-1])) <= TOL * float(ev[-1])
    assert abs(r.lambda_min) <= r.zero_threshold + r.lambda_min_residual
    # the staged search stops at the singular end instead of spending its 300-product budget
    low = next(p for p in r.parts if p["name"] == "lambda_min")
    assert low["num_matvecs"] <= SINGULAR_STAGE, low


def test_singular_float32_ggn_stops_early():
    """The demo's CNN after 50 training steps, GGN over 128 digits in float32 (rank <= 1152 <
    n = 6090): a plain SA eigsh spends its whole 300-product budget without meeting the
    residual test on the zero eigenvalue; the lambda_min part stops after its first stage."""
    from hessfast._cli_demo import train_demo_model

    model, batches, _ = train_demo_model(steps=50, analysis_samples=128)
    r = analyze(model, torch.nn.CrossEntropyLoss(), batches, curvature="ggn", k=1, num_probes=2,
                num_steps=8, per_layer=False, progress=False)
    low = next(p for p in r.parts if p["name"] == "lambda_min")
    assert r.definiteness == "positive semi-definite (singular to tolerance)"
    assert low["num_matvecs"] <= SINGULAR_STAGE, low
    assert "singular" in low["source"]


def test_positive_definite_operator_condition_number() -> None:
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64, generator=g))
    ev = torch.linspace(0.5, 20.0, 60, dtype=torch.float64)
    A = LinearOperator.from_matrix((Q * ev) @ Q.T, check_symmetric=False)
    r = analyze(A, k=3, num_probes=4, num_steps=20, tol=1e-6, per_layer=False)
    assert r.curvature == "operator" and r.definiteness == "positive definite"
    assert r.condition == pytest.approx(40.0, rel=1e-5)
    assert r.negative_mass == 0.0


def test_operator_argument_and_small_budget_trace_fallback() -> None:
    model, loss_fn, batches = _mlp()
    H = hf.hessian(model, loss_fn, batches)
    M = dense_hessian_reference(model, loss_fn, batches)
    r = analyze(H, k=1, num_probes=2, num_steps=20)  # < 8 probes: an extra Hutch++ for the trace
    assert "operator" not in [p["name"] for p in r.parts]
    tpart = r.part("trace")
    assert "hutch++" in tpart["source"] and tpart["num_matvecs"] == 30
    assert abs(r.trace - float(M.trace())) <= 4 * r.trace_stderr
    assert r.operator["num_samples"] == 60 and r.operator["model"] == "Sequential"
    # a plain LinearOperator has no parameter names: per-layer is skipped, and says so
    r2 = analyze(LinearOperator.from_matrix(M), k=1, num_probes=8, num_steps=10)
    assert r2.per_layer is None and "skipped" in r2.part("per_layer")["source"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k must be"), (dict(k=116), "k must be <= n"), (dict(num_probes=0), "num_probes"),
    (dict(tol=-1.0), "tol"), (dict(per_layer="yes"), "per_layer"), (dict(lr=0.0), "lr"),
    (dict(curvature="fisher"), "curvature"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    model, loss_fn, batches = _mlp(sizes=(4,))
    with pytest.raises(ConfigurationError, match=match):
        analyze(model, loss_fn, batches, **kwargs)


def test_operator_with_model_arguments_refused() -> None:
    model, loss_fn, batches = _mlp(sizes=(4,))
    H = hf.hessian(model, loss_fn, batches)
    with pytest.raises(ConfigurationError, match="either analyze"):
        analyze(H, loss_fn)
    with pytest.raises(ConfigurationError, match="data is required"):
        analyze(model, loss_fn)


def test_exact_hutchpp_trace_preferred_on_a_small_operator() -> None:
    g = torch.Generator().manual_seed(5)
    B = torch.randn(20, 20, dtype=torch.float64, generator=g)
    M = B + B.T
    with pytest.warns(UserWarning, match="solving densely"):
        r = analyze(LinearOperator.from_matrix(M), k=2, num_probes=2, num_steps=8, per_layer=False)
    # 2 probes: an extra Hutch++ run; its budget of 30 >= n = 20 makes it exact
    assert "EXACT" in r.part("trace")["source"] and "reported: hutch++" in r.part("trace")["source"]
    assert r.trace_stderr == 0.0 and r.trace == pytest.approx(float(M.trace()), abs=1e-10)
    ev = torch.linalg.eigvalsh(M)
    assert r.lambda_max == pytest.approx(float(ev[-1]), rel=1e-10)
    assert r.lambda_min == pytest.approx(float(ev[0]), rel=1e-10)


def test_old_keywords_warn_and_give_the_same_report() -> None:
    """probes=/steps= are the deprecated names of num_probes=/num_steps= (one release)."""
    g = torch.Generator().manual_seed(3)
    B = torch.randn(40, 40, dtype=torch.float64, generator=g)
    A = LinearOperator.from_matrix(B @ B.T)
    new = analyze(A, k=2, num_probes=3, num_steps=12, per_layer=False, progress=False)
    with pytest.warns(DeprecationWarning, match=r"use num_probes=") as rec:
        old = analyze(A, k=2, probes=3, steps=12, per_layer=False, progress=False)
    assert any("use num_steps=" in str(w.message) for w in rec)
    def numbers(r: hf.Report) -> dict:
        d = {k: v for k, v in r.to_dict().items() if k not in ("created", "parts")}
        d["density"] = {k: v for k, v in d["density"].items() if k != "seconds"}
        return d

    assert numbers(old) == numbers(new)
    with pytest.raises(ConfigurationError, match="pass num_probes once"):
        analyze(A, num_probes=4, probes=3)


def test_unknown_keyword_names_analyze() -> None:
    model, loss_fn, batches = _mlp(sizes=(4,))
    with pytest.raises(TypeError, match=r"hessfast\.analyze: unknown keyword argument 'num_probe'"
                       r".*Did you mean num_probes"):
        analyze(model, loss_fn, batches, num_probe=4)


# -- warm starts and provenance ----------------------------------------------------------------
def test_top_eigenvectors_are_the_reported_pairs(hess) -> None:
    report, M = hess[0], hess[1]
    V = report.top_eigenvectors
    assert V.shape == (4, report.n)
    lam = torch.tensor(report.top_eigenvalues, dtype=torch.float64)
    resid = torch.linalg.vector_norm(V.double() @ M - lam[:, None] * V.double(), dim=1)
    # each returned vector is an eigenvector to its reported residual (plus rounding)
    assert torch.all(resid <= torch.tensor(report.top_residuals) * 1.01 + 1e-10)
    # not part of the record: JSON round trip drops it, and == ignores it
    assert "top_eigenvectors" not in report.to_dict()
    back = type(report).from_json(report.to_json())
    assert back.top_eigenvectors is None and back == report


def test_warm_start_from_nearby_weights_saves_products_and_agrees() -> None:
    model, loss_fn, batches = _mlp()
    kw = dict(k=3, num_probes=2, num_steps=16, per_layer=False, tol=TOL, progress=False)
    first = analyze(model, loss_fn, batches, **kw)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a nearby checkpoint: weights moved by 1e-3 relative
        for p in model.parameters():
            p.add_(1e-3 * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    cold = analyze(model, loss_fn, batches, **kw)
    warm = analyze(model, loss_fn, batches, v0=first.top_eigenvectors, **kw)
    assert warm.part("top_k")["warm"] is True and cold.part("top_k")["warm"] is False
    assert "warm v0" in warm.part("top_k")["source"]
    assert warm.top_converged and cold.top_converged
    ref = torch.linalg.eigvalsh(dense_hessian_reference(model, loss_fn, batches)).flip(0)[:3]
    for got in (warm.top_eigenvalues, cold.top_eigenvalues):
        assert torch.allclose(torch.tensor(got, dtype=torch.float64), ref,
                              rtol=2 * TOL, atol=0)
    assert warm.part("top_k")["num_matvecs"] < cold.part("top_k")["num_matvecs"]


@pytest.mark.parametrize("v0, match", [
    (torch.ones(2, 7, dtype=torch.float64), r"v0 must be a tensor \[j, n\] with n = 115"),
    ([1.0, 2.0], "v0 must be a tensor"),
    (torch.full((1, 115), float("nan"), dtype=torch.float64), "non-finite"),
])
def test_bad_warm_start_refused(v0, match: str) -> None:
    model, loss_fn, batches = _mlp()
    with pytest.raises(ConfigurationError, match=match):
        analyze(model, loss_fn, batches, k=1, num_probes=1, num_steps=4, per_layer=False,
                progress=False, v0=v0)


def test_provenance_tells_two_reports_apart() -> None:
    model, loss_fn, batches = _mlp()
    kw = dict(k=1, num_probes=1, num_steps=4, per_layer=False, progress=False)
    whole = analyze(model, loss_fn, batches, **kw)
    first = next(n for n, _ in model.named_parameters())
    part = analyze(model, torch.nn.CrossEntropyLoss(reduction="sum"), batches,
                   curvature="ggn", params=[first], **kw)
    p, q = whole.provenance, part.provenance
    assert p["hessfast"] == hf.__version__ and p["torch"] == torch.__version__
    assert p["params"] == "all" and q["params"] == [first]
    assert p["num_params"] == whole.n and q["num_params"] == part.n < whole.n
    assert p["curvature"] == "Hessian" and q["curvature"] == "GGN"
    assert q["loss"] == "CrossEntropyLoss(reduction='sum')" and p["loss"] != q["loss"]
    assert p["model"] == type(model).__name__
    assert p["data"] == {"num_samples": sum(len(b[1]) for b in batches),
                         "num_batches": len(batches)}
    assert json.loads(part.to_json())["provenance"] == q
