"""Per-layer spectra (hessfast/analysis/blocks.py) against dense float64 diagonal blocks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import hessfast as hf
from hessfast.analysis.blocks import BlockSpectra, block_spectra, param_groups
from hessfast.errors import ArgumentTypeError, ConfigurationError
from hessfast.linop import LinearOperator
from hessfast.testing.dense import dense_ggn_reference, dense_hessian_reference
from hessfast.testing.models import make_cnn, make_mlp, seeded


def _cases():
    model, loss, data = make_mlp()
    yield "mlp-hessian", hf.hessian(model, loss, data), dense_hessian_reference(model, loss, data)
    model, loss, data = make_cnn()
    yield "cnn-hessian", hf.hessian(model, loss, data), dense_hessian_reference(model, loss, data)
    model, loss, data = make_mlp(task="regression", seed=3)
    yield "mlp-ggn", hf.ggn(model, loss, data), dense_ggn_reference(model, loss, data)


CASES = {name: (A, D) for name, A, D in _cases()}


def _coords(A, pidx: list[int]) -> torch.Tensor:
    off = [0]
    for s in A.param_shapes:
        off.append(off[-1] + s.numel())
    return torch.cat([torch.arange(off[i], off[i + 1]) for i in pidx])


def _check_against_dense(res: BlockSpectra, blocks: dict[str, torch.Tensor], tol: float):
    assert [g.name for g in res.groups] == list(blocks)
    kinds = set()
    for g in res.groups:
        B = blocks[g.name]
        ev = torch.linalg.eigvalsh(B)
        scale = float(ev.abs().max())
        assert g.size == B.shape[0]
        assert g.converged
        assert abs(g.lambda_max - float(ev[-1])) <= 10 * tol * scale, g
        assert g.lambda_max_residual <= tol * max(abs(g.lambda_max), 1e-3 * scale) + 1e-12
        if g.trace_exact:
            kinds.add("exact")
            assert g.trace_stderr == 0.0
            assert g.trace == pytest.approx(float(B.trace()), rel=1e-10, abs=1e-12)
            assert g.lambda_min == pytest.approx(float(ev[0]), rel=1e-10, abs=1e-12)
        else:
            kinds.add("probed")
            assert g.trace_stderr > 0
            assert abs(g.trace - float(B.trace())) <= 4 * g.trace_stderr, g
            assert 1 <= g.steps <= g.size
    return kinds


@pytest.mark.parametrize("case", list(CASES))
def test_modules_match_dense_blocks(case):
    A, D = CASES[case]
    tol = 1e-6
    res = block_spectra(A, tol=tol, num_probes=8 if case.startswith("cnn") else 12, seed=1)
    blocks = {name: D[_coords(A, p)][:, _coords(A, p)] for name, p in param_groups(A)}
    assert _check_against_dense(res, blocks, tol) == {"exact", "probed"}
    assert res.num_matvecs > 0 and res.num_passes > 0 and res.seconds >= 0


def test_module_names_and_root_group():
    A, _ = CASES["cnn-hessian"]
    assert [n for n, _ in param_groups(A)] == ["conv", "bn", "fc"]
    with seeded(0):
        model = nn.Sequential(nn.Linear(3, 2))
        model.scale = nn.Parameter(torch.ones(2))
        model = model.double()
        x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)

    def loss(model, batch):
        return ((model(batch[0]) * model.scale - batch[1]) ** 2).mean()

    H = hf.hessian(model, loss, (x, y))
    groups = param_groups(H)
    assert groups == [("(root)", [0]), ("0", [1, 2])]  # named_parameters order
    D = dense_hessian_reference(model, loss, [(x, y)])
    res = block_spectra(H, num_probes=4)
    blocks = {name: D[_coords(H, p)][:, _coords(H, p)] for name, p in groups}
    _check_against_dense(res, blocks, 1e-3)


def test_dict_and_regex_groups_may_overlap():
    A, D = CASES["mlp-hessian"]
    spec = {"first": r"^0\.", "weights": r"weight$", "everything": r"."}
    res = block_spectra(A, spec, tol=1e-7, num_probes=6, seed=2)
    pg = dict(param_groups(A, spec))
    assert pg["everything"] == list(range(len(A.param_names)))
    blocks = {k: D[_coords(A, v)][:, _coords(A, v)] for k, v in pg.items()}
    _check_against_dense(res, blocks, 1e-7)
    # a list of regexes: groups named by the regex
    res2 = block_spectra(A, [r"^3\.", r"bias"], tol=1e-7, num_probes=6, seed=2)
    assert [g.name for g in res2.groups] == [r"^3\.", "bias"]
    pg2 = dict(param_groups(A, [r"^3\.", r"bias"]))
    _check_against_dense(res2, {k: D[_coords(A, v)][:, _coords(A, v)] for k, v in pg2.items()},
                         1e-7)


def test_unconverged_residual_is_honest():
    A, D = CASES["mlp-hessian"]
    res = block_spectra(A, {"big": r"^0\.weight$"}, tol=1e-12, num_probes=4, num_steps=3)
    g = res["big"]
    assert g.steps == 3 and not g.converged
    assert res.status == "MAX_MATVECS" and not res.converged
    B = D[_coords(A, [0])][:, _coords(A, [0])]
    ev = torch.linalg.eigvalsh(B)
    # a Ritz value lies within its residual of an eigenvalue; Ritz values interlace
    assert float((ev - g.lambda_max).abs().min()) <= g.lambda_max_residual * (1 + 1e-8) + 1e-12
    assert float((ev - g.lambda_min).abs().min()) <= g.lambda_min_residual * (1 + 1e-8) + 1e-12
    assert g.lambda_max <= float(ev[-1]) + 1e-12
    assert g.lambda_max_residual > 1e-12 * abs(g.lambda_max)


def _deep_mlp(layers: int = 6, width: int = 7):
    with seeded(5):
        mods: list[nn.Module] = []
        for i in range(layers):
            mods += [nn.Linear(width, width if i < layers - 1 else 3), nn.Tanh()]
        model = nn.Sequential(*mods[:-1]).double()
        x = torch.randn(24, width, dtype=torch.float64)
        y = torch.randint(0, 3, (24,))
    return model, nn.CrossEntropyLoss(), (x, y)


def test_passes_do_not_grow_with_groups():
    model, loss, batch = _deep_mlp()
    H = hf.hessian(model, loss, batch)
    modules = [n for n, _ in param_groups(H)]
    assert len(modules) == 6
    two = {m: rf"^{m}\." for m in modules[:2]}
    six = {m: rf"^{m}\." for m in modules}
    # 6 steps: the 24-coordinate output layer reaches the float64 residual floor (64 eps
    # ||A||, where a tol of 1e-300 is met too) at step 7
    kw = dict(tol=1e-300, num_probes=4, num_steps=6, seed=0)
    counts = []
    for spec in (two, six):
        before = H.num_passes
        res = block_spectra(H, spec, **kw)
        assert H.num_passes - before == res.num_passes
        assert all(g.steps == 6 for g in res.groups)
        counts.append((res.num_passes, res.num_matvecs))
    assert counts[0][0] == counts[1][0] == 6  # 1 probe pass + 5 further Lanczos steps
    assert counts[1][1] == 3 * counts[0][1]
    # at a real tolerance: the shared run costs the passes of its slowest group alone, and
    # every group's answer is the one it gets alone (probes are keyed by the group's name)
    together = block_spectra(H, six, tol=1e-6, num_probes=4, seed=3)
    alone = [block_spectra(H, {m: six[m]}, tol=1e-6, num_probes=4, seed=3) for m in six]
    assert together.num_passes == max(r.num_passes for r in alone)
    for g, r in zip(together.groups, alone, strict=True):
        assert g.steps == r.groups[0].steps
        assert g.lambda_max == pytest.approx(r.groups[0].lambda_max, rel=1e-9)
        assert g.trace == pytest.approx(r.groups[0].trace, rel=1e-9, abs=1e-12)


def test_explicit_coordinates_on_a_generic_operator():
    with seeded(7):
        Q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
        M = Q @ torch.diag(torch.linspace(-1.0, 3.0, 40, dtype=torch.float64)) @ Q.T
    A = LinearOperator.from_matrix(M)
    with pytest.raises(ArgumentTypeError, match="param_names"):
        block_spectra(A)
    spec = {"a": list(range(0, 25)), "b": torch.arange(25, 40), "c": [3, 30, 7]}
    res = block_spectra(A, spec, tol=1e-8, num_probes=5, seed=4)
    blocks = {k: M[torch.as_tensor(v)][:, torch.as_tensor(v)] for k, v in spec.items()}
    assert _check_against_dense(res, blocks, 1e-8) == {"exact", "probed"}
    assert [g.name for g in block_spectra(A, [[0, 1], [2]]).groups] == ["group0", "group1"]
    with pytest.raises(ConfigurationError, match="coordinates in"):
        block_spectra(A, {"bad": [0, 40]})


def test_errors_name_the_cause():
    A, _ = CASES["mlp-hessian"]
    with pytest.raises(ConfigurationError, match=r"'nope'.*matches no parameter.*0\.weight"):
        block_spectra(A, {"nope": r"^decoder\."})
    with pytest.raises(ConfigurationError, match="not a valid regular expression"):
        param_groups(A, ["(unclosed"])
    with pytest.raises(ConfigurationError, match="not a grouping"):
        block_spectra(A, "layers")
    with pytest.raises(ConfigurationError, match="appears twice"):
        param_groups(A, [r"bias", r"bias"])
    with pytest.raises(ConfigurationError, match="empty"):
        param_groups(A, {})
    with pytest.raises(ArgumentTypeError, match="groups must be"):
        block_spectra(A, 5)
    with pytest.raises(ConfigurationError, match="num_probes"):
        block_spectra(A, num_probes=1)
    with pytest.raises(ConfigurationError, match="tol"):
        block_spectra(A, tol=0.0)
    with pytest.raises(ConfigurationError, match="BlockSpectra"):
        BlockSpectra.from_dict({"num_matvecs": 1})


def test_round_trip_through_json(tmp_path):
    A, _ = CASES["cnn-hessian"]
    res = block_spectra(A, num_probes=8, progress=False)
    d = json.loads(res.to_json())
    text = res.to_json(tmp_path / "blocks.json", indent=1)  # a path, like every result's to_json
    assert json.loads((tmp_path / "blocks.json").read_text()) == json.loads(text) == d
    assert isinstance(d["groups"][0]["lambda_max"], float)
    back = BlockSpectra.from_dict(d)
    assert back == res
    assert back.to_dict() == res.to_dict()
    assert back["fc"].size == 39 and not math.isnan(back["fc"].lambda_min)


def test_model_and_rng_untouched():
    model, loss, data = make_cnn()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    H = hf.hessian(model, loss, data)
    torch.manual_seed(123)
    rng = torch.random.get_rng_state()
    block_spectra(H, num_probes=4, num_steps=10)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert model.training and all(m.training for m in model.modules())
    for p, p0 in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, p0) and torch.equal(p.grad, torch.full_like(p, 0.5))
    for b, b0 in zip(model.buffers(), buffers, strict=True):
        assert torch.equal(b, b0)


def test_status_and_counters():
    A, _ = CASES["mlp-hessian"]
    res = block_spectra(A, tol=1e-6, num_probes=12, seed=1)
    assert res.status == "CONVERGED" and res.converged
    small = block_spectra(A, {"bias": r"^3\.bias$"}, num_probes=12)  # 3 coordinates: exact
    assert small.status == "EXACT" and small.groups[0].trace_exact
    assert set(res.to_dict()) >= {"kind", "num_matvecs", "num_passes", "status"}


def test_renamed_names_keep_a_deprecated_alias():
    A, _ = CASES["mlp-hessian"]
    new = block_spectra(A, tol=1e-3, num_probes=4, num_steps=4, seed=2)
    with pytest.warns(DeprecationWarning, match="num_steps"):
        old = block_spectra(A, tol=1e-3, num_probes=4, max_steps=4, seed=2)
    assert [g.lambda_max for g in old.groups] == [g.lambda_max for g in new.groups]
    assert [g.steps for g in old.groups] == [g.steps for g in new.groups]
    with pytest.raises(ConfigurationError, match="num_steps"):
        block_spectra(A, num_steps=5, max_steps=4)
    with pytest.warns(DeprecationWarning, match="num_passes"):
        assert new.data_passes == new.num_passes
    # a dict written by 0.1: data_passes, no status, no kind
    d = new.to_dict()
    d["data_passes"] = d.pop("num_passes")
    del d["status"], d["kind"]
    back = BlockSpectra.from_dict(d)
    assert back.num_passes == new.num_passes and back.status == new.status


def test_float32_blocks_match_dense_float64():
    with seeded(11):
        Q, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64))
        M = Q @ torch.diag(torch.linspace(-2.0, 5.0, 60, dtype=torch.float64)) @ Q.T
    A = LinearOperator.from_matrix(M.float())
    spec = {"a": list(range(0, 35)), "b": torch.arange(35, 60)}
    res = block_spectra(A, spec, tol=1e-3, num_probes=6, seed=5)
    for g in res.groups:
        idx = torch.as_tensor(spec[g.name])
        ev = torch.linalg.eigvalsh(M[idx][:, idx])
        scale = float(ev.abs().max())
        assert g.converged and not g.trace_exact
        assert abs(g.lambda_max - float(ev[-1])) <= 1e-2 * scale, g
        # the residual is floored at float32's 64 eps ||A_gg||
        assert g.residual_floor == pytest.approx(64 * 2.0**-23 * scale, rel=1e-3)
        assert g.lambda_max_residual >= g.residual_floor
