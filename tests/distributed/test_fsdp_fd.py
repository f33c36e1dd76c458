"""The finite-difference Hessian of FSDP2 (``fully_shard``) models on gloo (issue 18, part 3).

Each spawned run (tests/distributed/fsdp_workers.py through _spawn.py's harness: one thread
per rank, every exit code checked) shards a model over 2 or 4 ranks, builds ``hf.hessian`` on
each rank's own batches (unequal batch sizes, so the batch weights matter) and multiplies
each rank's slice of two fixed global vectors. The test gathers the rows (FSDP2's dim-0
``torch.chunk`` layout) and compares them with one process's float64 exact products on all
the data (plain double backward: hessfast.testing.dense for the MLP, ``autograd.grad``
twice under the math attention kernel for GPT-2): within the error the operator records.
Also: lambda_max (and the lean SLQ with ``v0`` the ranks' slices of the same probes, once
the lean algorithms take sharded operators) against the single-process answers; the
parameters bit for bit, the user's ``.grad`` objects, modes and RNG as they were; the
refusals (ggn, unequal batch counts, an exact hvp_mode, changed parameters). Marked
``distributed``; the 4-rank runs also ``slow``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import _spawn
import fsdp_workers
import pytest
import torch
from torch import nn

import hessfast as hf

pytestmark = pytest.mark.distributed


def spawn(scenario: str, world: int, tmp_path: Path, monkeypatch) -> list[dict]:
    """_spawn's harness with this file's worker; every rank's results."""
    pytest.importorskip("torch.distributed.fsdp")
    monkeypatch.setattr(_spawn, "WORKER", Path(fsdp_workers.__file__))
    codes, logs, _ = _spawn.spawn(scenario, world, tmp_path)
    assert codes == [0] * world, logs
    return _spawn.results(scenario, world, tmp_path)


def gathered(ranks: list[dict], names: list[str]) -> torch.Tensor:
    """The ranks' product pieces ``{name: [k, *local]}`` as global rows ``[k, n]``."""
    rows = []
    for name in names:
        full = torch.cat([r["products"][name] for r in ranks], dim=1)
        rows.append(full.reshape(full.shape[0], -1))
    return torch.cat(rows, dim=1).double()


def exact_products(model: nn.Module, loss_fn: Any, batches: list, V: torch.Tensor) -> torch.Tensor:
    """``V [k, n]`` times the float64 Hessian of the sample-mean loss over ``batches`` by
    plain double backward (math attention kernel, eval mode)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hessfast.testing.dense import compute_loss, default_batch_size

    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [default_batch_size(b) for b in batches]
    total = sum(sizes)
    out = torch.zeros_like(V)
    model.eval()
    with sdpa_kernel(SDPBackend.MATH):
        for batch, size in zip(batches, sizes, strict=True):
            loss = compute_loss(model, loss_fn, batch, loss_form="model"
                                if not isinstance(batch, tuple) else "criterion")
            grads = torch.autograd.grad(loss, params, create_graph=True)
            flat = torch.cat([g.reshape(-1) for g in grads])
            for i in range(V.shape[0]):
                hv = torch.autograd.grad(flat @ V[i], params, retain_graph=True)
                out[i] += size / total * torch.cat([h.reshape(-1) for h in hv])
    return out


def reference(kind: str, world: int) -> tuple[nn.Module, Any, list, torch.Tensor, list[str]]:
    """The float64 unsharded model (same values as the sharded one), the loss, all ranks'
    batches in rank order, the global vectors ``[k, n]`` and the parameter names."""
    model, loss_fn, ranks = fsdp_workers.problem(kind[:-2] + "64", world)
    _, _, data = fsdp_workers.problem(kind, world)  # the ranks' own batches (their dtype)
    batches = [tuple(t.double() if t.is_floating_point() else t for t in b)
               if isinstance(b, tuple) else b for r in data for b in r]
    vectors = fsdp_workers.global_vectors(model)
    names = list(vectors)
    V = torch.cat([v.reshape(v.shape[0], -1) for v in vectors.values()], dim=1)
    return model, loss_fn, batches, V, names


_SINGLE: dict[tuple[str, int, str], Any] = {}


def single_process(kind: str, world: int, what: str, run: Callable[[], Any]) -> Any:
    """``run()``'s single-process answer, computed once per problem: the float32 and float64
    GPT-2 share their float64 reference."""
    key = (kind.rstrip("_0123456789") or kind, world, what)
    if key not in _SINGLE:
        _SINGLE[key] = run()
    return _SINGLE[key]


def check(kind: str, world: int, ranks: list[dict]) -> None:
    """Every rank's record against one process's float64 exact answers."""
    model, loss_fn, batches, V, names = reference(kind, world)
    first = ranks[0]
    for r in ranks:
        assert r["params_same"] and r["grads_same"] and r["modes_same"] and r["rng_same"]
        assert r["hvp_mode"] == "finite_difference" and "FSDP" in r["hvp_mode_reason"]
        assert any(w.startswith("hessfast: the model is sharded by FSDP") for w in r["warnings"])
        assert r["global_n"] == V.shape[1] and r["shards_size"] == world
        assert r["fd_error"] == first["fd_error"] and r["num"] == first["num"]
        assert r["compute_dtype"] == ("torch.float32" if kind.endswith("32") else "torch.float64")
    assert sum(r["local_n"] for r in ranks) == V.shape[1]
    samples = sum(sum(s) for s in fsdp_workers.SIZES[world])
    # 2 rows: 4 gradients, 1 at construction (the compute dtype), and the step search's
    # products (2 gradients each, once: at least the step-doubling pair and the first row
    # again at the chosen step and twice it)
    num = first["num"]
    assert num[:2] == (2, 1) and num[3:] == (samples, 2 * world)
    assert num[2] >= 5 + 8 and (num[2] - 5) % 2 == 0, num
    got = gathered(ranks, names)
    want = exact_products(model, loss_fn, batches, V)
    err = ((got - want).norm(dim=1) / want.norm(dim=1)).max().item()
    fd_error = first["fd_error"]
    bound = 1e-6 if kind.endswith("64") else 1e-2
    assert 0 < fd_error < bound, fd_error
    assert err <= fd_error, (err, fd_error)
    # lambda_max of the sharded operator against the exact single-process one
    assert "lambda_max_error" not in first, first["lambda_max_error"]
    assert "slq_error" not in first, first["slq_error"]
    assert all(r["lambda_max"] == first["lambda_max"] for r in ranks)
    exact = single_process(kind, world, "lambda_max", lambda: hf.lambda_max(
        hf.hessian(model, loss_fn, batches), tol=1e-5, krylov="lean", seed=0))
    assert abs(first["lambda_max"] - exact) <= (1e-5 + 4 * fd_error) * abs(exact), (
        first["lambda_max"], exact)
    dens = single_process(kind, world, "slq", lambda: hf.spectral_density(
        hf.hessian(model, loss_fn, batches), num_probes=2, num_steps=6, krylov="lean",
        v0=V))
    # nodes relative to the spectrum's scale, weights absolute (they sum to 1): both
    # within the products' recorded error (measured: 0.1-0.5 of it)
    node_err = float((first["slq_nodes"] - dens.nodes).abs().max()
                     / dens.nodes.abs().max())
    weight_err = float((first["slq_weights"] - dens.weights).abs().max())
    print(f"{kind} {world}: SLQ nodes {node_err:.3g} of max|node|, weights {weight_err:.3g}")
    assert node_err <= fd_error and weight_err <= fd_error, (node_err, weight_err, fd_error)
    print(f"{kind} {world}: product error {err:.3g} (fd_error {fd_error:.3g}), lambda_max "
          f"{first['lambda_max']}")


def test_mlp_float64_two_ranks(tmp_path, monkeypatch) -> None:
    """The float64 MLP on 2 ranks, and the refusals."""
    ranks = spawn("mlp", 2, tmp_path, monkeypatch)
    check("mlp64", 2, ranks)
    for r in ranks:
        assert r["ggn"][0] == "UnsupportedModelError" and "hf.hessian" in r["ggn"][1]
        assert r["uneven"][0] == "ConfigurationError" and "same number of batches" in r["uneven"][1]
        assert r["exact_mode"][0] == "ConfigurationError"
        assert r["changed"][0] == "ParametersChangedError"  # on every rank, not just rank 0
        assert r["mixed_compute_dtype"] == "torch.float32"
    assert ranks[0]["bad_data"][0] == "BatchError"
    assert ranks[1]["bad_data"][0] == "DistributedError"
    assert "rank(s) [0]" in ranks[1]["bad_data"][1]


@pytest.mark.slow
def test_mlp_float64_four_ranks(tmp_path, monkeypatch) -> None:
    """The float64 MLP on 4 ranks (a 4-row output layer: one row per rank)."""
    check("mlp64", 4, spawn("mlp", 4, tmp_path, monkeypatch))


@pytest.mark.parametrize("kind", ["gpt2_64", "gpt2_32"])
def test_gpt2_two_ranks(kind: str, tmp_path, monkeypatch) -> None:
    """A tiny transformers GPT-2 (2 layers, n_embd 32) in float64 and float32, default
    (fused) attention in the FSDP products."""
    pytest.importorskip("transformers")
    check(kind, 2, spawn(kind, 2, tmp_path, monkeypatch))


@pytest.mark.slow
def test_gpt2_float32_four_ranks(tmp_path, monkeypatch) -> None:
    """The float32 GPT-2 on 4 ranks."""
    pytest.importorskip("transformers")
    check("gpt2_32", 4, spawn("gpt2_32", 4, tmp_path, monkeypatch))
