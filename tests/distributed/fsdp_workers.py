"""Rank processes for test_fsdp_fd.py, run through dist_workers.py's harness (``python
tests/distributed/fsdp_workers.py SCENARIO RANK WORLD PORT OUTDIR``: a gloo group on 127.0.0.1,
one thread, 30 s timeout; each rank writes ``OUTDIR/SCENARIO-RANK.pt``).

Each scenario shards a model with FSDP2's ``fully_shard`` (every block, then the root), builds
``hf.hessian`` on the rank's own batches (unequal sizes: the batch weights are tested) and
records its products of fixed GLOBAL vectors, each rank multiplying its slice (:func:`local`),
as ``{parameter name: local piece}``; the test concatenates the pieces along dim 0 (FSDP2's
``torch.chunk`` layout) and compares them with one process's exact products on all the data.

The problems are built here, so the test process builds the same ones for its references.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import dist_workers
import torch
from torch import nn

# each rank's batch sizes (the batches themselves are drawn in rank order from one seed)
SIZES = {1: [[3, 5]], 2: [[3, 5], [4, 2]], 4: [[3, 5], [4, 2], [6, 1], [2, 3]]}
D_IN, HIDDEN, CLASSES = 6, 10, 4  # 6*10 + 10 + 10*4 + 4 = 114 parameters
SEQ = 8


def mlp(dtype: torch.dtype) -> nn.Module:
    """A tanh MLP ``6 -> 10 -> 4`` with fixed weights."""
    gen = torch.Generator().manual_seed(11)
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.6)
    return model.to(dtype)


def gpt2(dtype: torch.dtype, n_embd: int = 32) -> nn.Module:
    """A transformers GPT-2 from a config (2 layers, vocabulary 101), fixed weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(5)
    cfg = GPT2Config(n_layer=2, n_embd=n_embd, n_head=2, vocab_size=101, n_positions=SEQ)
    return GPT2LMHeadModel(cfg).to(dtype)


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The model's own causal-LM loss of a batch of token ids ``[B, T]`` (mean over
    tokens; every sequence has T tokens, so the batch weights count sequences). It upcasts
    the logits to float32."""
    return model(input_ids=batch, labels=batch).loss


def lm_loss64(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The same next-token cross-entropy computed in the logits' dtype (float64 stays
    float64)."""
    logits = model(input_ids=batch).logits[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       batch[:, 1:].reshape(-1))


def problem(kind: str, world: int) -> tuple[nn.Module, Any, list[list[Any]]]:
    """The model (unsharded), the loss and every rank's batches."""
    gen = torch.Generator().manual_seed(3)
    dtype = torch.float64 if kind.endswith("64") else torch.float32
    ranks: list[list[Any]] = []
    if kind.startswith("mlp"):
        for sizes in SIZES[world]:
            ranks.append([(torch.randn(s, D_IN, generator=gen, dtype=dtype),
                           torch.randint(0, CLASSES, (s,), generator=gen)) for s in sizes])
        return mlp(dtype), nn.CrossEntropyLoss(), ranks
    for sizes in SIZES[world]:
        ranks.append([torch.randint(0, 101, (s, SEQ), generator=gen) for s in sizes])
    return gpt2(dtype), (lm_loss64 if dtype == torch.float64 else lm_loss), ranks


def shard_model(model: nn.Module) -> None:
    """fully_shard every block (the Linears of the MLP, GPT-2's transformer blocks), then
    the root."""
    from torch.distributed.fsdp import fully_shard

    blocks = model.transformer.h if hasattr(model, "transformer") else [
        m for m in model if isinstance(m, nn.Linear)]
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def global_vectors(model: nn.Module, k: int = 2) -> dict[str, torch.Tensor]:
    """``k`` fixed float64 global vectors as ``{name: [k, *shape]}`` (unsharded model)."""
    gen = torch.Generator().manual_seed(17)
    return {name: torch.randn((k, *p.shape), generator=gen, dtype=torch.float64)
            for name, p in model.named_parameters() if p.requires_grad}


def chunk(t: torch.Tensor, world: int, rank: int, dim: int = 0) -> torch.Tensor:
    """Rank ``rank``'s dim-``dim`` slice of ``t`` as FSDP2 shards (``torch.chunk``; ranks past
    the chunks get an empty slice)."""
    parts = torch.chunk(t, world, dim=dim)
    if rank < len(parts):
        return parts[rank]
    return t.narrow(dim, 0, 0)


def local(vectors: dict[str, torch.Tensor], world: int, rank: int) -> torch.Tensor:
    """This rank's slice ``[k, n_local]`` of the global vectors (layout order)."""
    return torch.cat([chunk(v, world, rank, dim=1).reshape(v.shape[0], -1)
                      for v in vectors.values()], dim=1)


def pieces(H: Any, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows ``[k, n_local]`` back to ``{name: [k, *local shape]}``."""
    out, offset = {}, 0
    for name, p in zip(H.param_names, H.params, strict=True):
        shape = p.to_local().shape
        size = shape.numel()
        out[name] = rows[:, offset:offset + size].reshape(rows.shape[0], *shape).clone()
        offset += size
    return out


def measure(kind: str, rank: int, world: int) -> dict[str, Any]:
    """One FSDP operator: products of the global vectors' slices, its records, and the
    user's state before and after."""
    import hessfast as hf

    model, loss_fn, ranks = problem(kind, world)
    vectors = global_vectors(model)
    shard_model(model)
    batches = ranks[rank]
    # the user's state: gradients from a training step, train mode
    model.train()
    loss = dist_workers_loss(model, loss_fn, batches[0])
    loss.backward()
    user_grads = {n: p.grad for n, p in model.named_parameters()}
    grad_values = {n: g.to_local().clone() for n, g in user_grads.items()}
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    # an evaluation: FSDP keeps the root's parameters gathered (model.parameters() are then
    # the gathered plain tensors); the operator must reshard before it reads or sets them
    with torch.no_grad():
        dist_workers_loss(model, loss_fn, batches[-1])
    rng = torch.get_rng_state()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        H = hf.hessian(model, loss_fn, batches)
    out: dict[str, Any] = {"warnings": [str(w.message) for w in seen]}
    V = local(vectors, world, rank).to(H.dtype)
    out["products"] = pieces(H, H.matmat(V))
    out["local_n"], out["global_n"] = H.shape[0], H.global_size
    out["fd_error"], out["fd_step"] = H.fd_error, H.fd_step
    out["hvp_mode"], out["hvp_mode_reason"] = H.hvp_mode, H.hvp_mode_reason
    out["num"] = (H.num_matvecs, H.num_passes, H.num_gradients, H.num_samples, H.num_batches)
    out["dtype"], out["compute_dtype"] = str(H.dtype), str(H.compute_dtype)
    out["shards_size"] = H.shards.size
    out["fingerprint"] = H.state_fingerprint()
    out["params_same"] = all(
        torch.equal(p.to_local(), before[n]) and
        p.to_local().view(-1).view(torch.uint8).equal(before[n].view(-1).view(torch.uint8))
        for n, p in model.named_parameters())
    out["grads_same"] = all(
        p.grad is user_grads[n] and torch.equal(p.grad.to_local(), grad_values[n])
        for n, p in model.named_parameters())
    out["modes_same"] = all(m.training for m in model.modules())
    out["rng_same"] = torch.equal(torch.get_rng_state(), rng)
    out.update(lean(H, vectors, world, rank))
    return out


def dist_workers_loss(model: nn.Module, loss_fn: Any, batch: Any) -> torch.Tensor:
    """One batch's loss in either form (the user's own training step)."""
    if isinstance(batch, tuple):
        return loss_fn(model(batch[0]), batch[1])
    return loss_fn(model, batch)


def lean(H: Any, vectors: dict[str, torch.Tensor], world: int, rank: int) -> dict[str, Any]:
    """lambda_max and the lean SLQ on the sharded operator (an error is recorded, and the
    test fails on it)."""
    import hessfast as hf

    out: dict[str, Any] = {}
    try:
        out["lambda_max"] = float(hf.lambda_max(H, tol=1e-5, krylov="lean", seed=0))
    except Exception as exc:  # noqa: BLE001 - recorded; the test fails on it
        out["lambda_max_error"] = f"{type(exc).__name__}: {exc}"
    try:
        v0 = local(vectors, world, rank).to(H.dtype)
        dens = hf.spectral_density(H, num_probes=2, num_steps=6, krylov="lean", v0=v0)
        out["slq_nodes"], out["slq_weights"] = dens.nodes, dens.weights
    except Exception as exc:  # noqa: BLE001 - recorded; the test fails on it
        out["slq_error"] = f"{type(exc).__name__}: {exc}"
    return out


def scenario_mlp(rank: int, world: int) -> dict[str, Any]:
    """The float64 MLP; also the refusals (ggn, unequal batch counts, a wrong hvp_mode) and
    a parameter change after construction."""
    import hessfast as hf

    out = measure("mlp64", rank, world)
    model, loss_fn, ranks = problem("mlp64", world)
    shard_model(model)
    for name, call in (
        ("ggn", lambda: hf.ggn(model, loss_fn, ranks[rank])),
        ("uneven", lambda: hf.hessian(model, loss_fn, ranks[rank][: 1 + (rank == 0)])),
        ("exact_mode", lambda: hf.hessian(model, loss_fn, ranks[rank], hvp_mode="fwd_rev")),
        # rank 0's data cannot be read: every rank raises (no rank waits in a collective)
        ("bad_data", lambda: hf.hessian(model, loss_fn, [object()] if rank == 0 else ranks[rank])),
    ):
        dist_workers._expect_failure(name, out, call)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        H = hf.hessian(model, loss_fn, ranks[rank])
    if rank == 0:
        with torch.no_grad():
            next(model.parameters()).to_local().mul_(1.5)
    # a float64 model computing a piece in float32: the ranks see float32
    mixed = nn.Sequential(model, dist_workers.Float32Softplus())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["mixed_compute_dtype"] = str(hf.hessian(mixed, loss_fn, ranks[rank]).compute_dtype)
    dist_workers._expect_failure("changed", out, lambda: H.matvec(torch.ones(H.shape[0],
                                                                          dtype=H.dtype)))
    return out


def scenario_gpt2_64(rank: int, world: int) -> dict[str, Any]:
    """The float64 GPT-2."""
    return measure("gpt2_64", rank, world)


def scenario_gpt2_32(rank: int, world: int) -> dict[str, Any]:
    """The float32 GPT-2."""
    return measure("gpt2_32", rank, world)


dist_workers.SCENARIOS.update(
    mlp=scenario_mlp, gpt2_64=scenario_gpt2_64, gpt2_32=scenario_gpt2_32)

if __name__ == "__main__":
    sys.exit(dist_workers.main(sys.argv[1:]))
