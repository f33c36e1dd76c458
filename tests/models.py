"""Tiny float64 test models with exact dense curvature references.

Every builder returns ``(model, loss_fn, batches)``:

* ``model`` in float64 with a deterministic seeded init (the global torch RNG is forked, so
  building a model never changes the caller's RNG state);
* ``loss_fn`` either a criterion ``loss_fn(outputs, targets)`` or a callable
  ``loss_fn(model, batch)``;
* ``batches`` a list of batches with an uneven last batch (e.g. 8, 8, 5 samples).

The references are deliberately naive: the Hessian is assembled column by column from plain
double-backward products with unit vectors (``torch.autograd.grad`` twice, no vmap, no
``torch.func.hessian``, which is wrong on LayerNorm networks in torch 2.13), the GGN from an
explicit Jacobian and the explicit Hessian of the loss w.r.t. the outputs.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

DTYPE = torch.float64
HVP_MODES = ("reuse_graph", "double_backward", "fwd_rev", "auto")

# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the global CPU RNG inside the block and restore the caller's RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _perturb_norm_layers(model: nn.Module, scale: float = 0.3) -> None:
    """Give LayerNorm/BatchNorm affine params and BN running stats non-trivial values."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)):
                if m.weight is not None:
                    m.weight.add_(scale * torch.randn_like(m.weight))
                    m.bias.add_(scale * torch.randn_like(m.bias))
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(0.2 * torch.randn_like(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
                m.num_batches_tracked.fill_(7)


def sizes_to_slices(sizes: Sequence[int]) -> list[slice]:
    out, start = [], 0
    for s in sizes:
        out.append(slice(start, start + s))
        start += s
    return out


def make_mlp(
    *,
    seed: int = 0,
    task: str = "classification",
    sizes: Sequence[int] = (8, 8, 5),
    d_in: int = 5,
    hidden: int = 6,
    n_out: int = 3,
    layernorm: bool = True,
    dtype: torch.dtype = DTYPE,
):
    """Linear-LayerNorm-Tanh-Linear MLP (``n = 69`` params with the defaults).

    ``task="classification"``: CrossEntropy over ``n_out`` classes;
    ``task="regression"``: MSELoss (mean) on ``n_out`` targets.
    """
    with seeded(seed):
        layers: list[nn.Module] = [nn.Linear(d_in, hidden)]
        if layernorm:
            layers.append(nn.LayerNorm(hidden))
        layers += [nn.Tanh(), nn.Linear(hidden, n_out)]
        model = nn.Sequential(*layers).to(dtype)
        _perturb_norm_layers(model)
        N = sum(sizes)
        X = torch.randn(N, d_in, dtype=dtype)
        if task == "classification":
            Y = torch.randint(0, n_out, (N,))
            loss_fn = nn.CrossEntropyLoss()
        elif task == "regression":
            Y = torch.randn(N, n_out, dtype=dtype)
            loss_fn = nn.MSELoss()
        else:
            raise ValueError(task)
    batches = [(X[s], Y[s]) for s in sizes_to_slices(sizes)]
    return model, loss_fn, batches


class SmallCNN(nn.Module):
    """Conv(2->3, 3x3) - BatchNorm2d - Tanh - Dropout - AvgPool(2) - Linear(12 -> 3)."""

    def __init__(self, p_drop: float = 0.3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.Tanh()
        self.drop = nn.Dropout(p_drop)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.drop(self.act(self.bn(self.conv(x)))))
        return self.fc(x.flatten(1))


def make_cnn(
    *,
    seed: int = 1,
    sizes: Sequence[int] = (8, 8, 5),
    p_drop: float = 0.3,
    dtype: torch.dtype = DTYPE,
):
    """Small CNN with BatchNorm2d and Dropout on 2x6x6 images, CrossEntropy (``n = 102``)."""
    with seeded(seed):
        model = SmallCNN(p_drop).to(dtype)
        _perturb_norm_layers(model)
        N = sum(sizes)
        X = torch.randn(N, 2, 6, 6, dtype=dtype)
        Y = torch.randint(0, 3, (N,))
    batches = [(X[s], Y[s]) for s in sizes_to_slices(sizes)]
    return model, nn.CrossEntropyLoss(), batches


class TinyLM(nn.Module):
    """Token + position embedding, one pre-LN causal self-attention block with a GELU MLP,
    final LayerNorm and LM head. Attention is written with plain matmuls (no SDPA)."""

    def __init__(self, vocab: int, d: int, seq: int, hidden: int, heads: int = 1) -> None:
        super().__init__()
        assert d % heads == 0
        self.vocab, self.d, self.heads = vocab, d, heads
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.3 * torch.randn(seq, d))
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.lnf = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", torch.ones(seq, seq).tril().bool(), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        x = self.tok(ids) + self.pos[:T]
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        dh = self.d // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, T, self.heads, dh).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(dh)
        att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, self.d)
        x = x + self.proj(y)
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(self.lnf(x))


def lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Token-level CrossEntropy of an LM on a dict batch ``{"input_ids", "labels"}``."""
    logits = model(batch["input_ids"])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))


def make_lm(
    *,
    seed: int = 2,
    sizes: Sequence[int] = (4, 4, 3),
    vocab: int = 5,
    d: int = 4,
    seq: int = 4,
    hidden: int = 8,
    heads: int = 1,
    dtype: torch.dtype = DTYPE,
):
    """Tiny transformer LM (``n = 241`` params with the defaults), callable loss, dict
    batches."""
    with seeded(seed):
        model = TinyLM(vocab, d, seq, hidden, heads).to(dtype)
        _perturb_norm_layers(model)
        N = sum(sizes)
        ids = torch.randint(0, vocab, (N, seq + 1))
    batches = [
        {"input_ids": ids[s, :-1].contiguous(), "labels": ids[s, 1:].contiguous()}
        for s in sizes_to_slices(sizes)
    ]
    return model, lm_loss, batches


BUILDERS: dict[str, Callable] = {"mlp": make_mlp, "cnn": make_cnn, "lm": make_lm}


# ---------------------------------------------------------------------------------------
# helpers shared by the references
# ---------------------------------------------------------------------------------------


def is_model_form(loss_fn: Callable, loss_form: str = "auto") -> bool:
    if loss_form == "model":
        return True
    if loss_form == "criterion":
        return False
    try:
        params = list(inspect.signature(loss_fn).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0] == "model"


def compute_loss(model, loss_fn, batch, loss_form: str = "auto") -> torch.Tensor:
    if is_model_form(loss_fn, loss_form):
        return loss_fn(model, batch)
    inputs, targets = batch
    return loss_fn(model(inputs), targets)


def default_batch_size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return default_batch_size(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)):
        return default_batch_size(batch[0])
    raise TypeError(f"cannot size batch of type {type(batch).__name__}")


def select_params(model: nn.Module, params=None) -> list[tuple[str, torch.Tensor]]:
    """(name, param) pairs in the order given (names or tensors), or all trainable ones in
    ``named_parameters`` order when ``params`` is None."""
    named = list(model.named_parameters())
    if params is None:
        return [(n, p) for n, p in named if p.requires_grad]
    by_name = dict(named)
    by_id = {id(p): n for n, p in named}
    out = []
    for p in params:
        if isinstance(p, str):
            out.append((p, by_name[p]))
        else:
            out.append((by_id[id(p)], p))
    return out


@contextlib.contextmanager
def curvature_mode(model: nn.Module, bn_mode: str = "eval") -> Iterator[None]:
    """Run the block in the given bn_mode; restore training flags and buffers after."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        if bn_mode == "eval":
            model.eval()
        elif bn_mode == "train":
            model.eval()
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
        elif bn_mode != "as_is":
            raise ValueError(bn_mode)
        yield
    finally:
        for m, t in flags:
            m.training = t
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _flat(grads, plist) -> torch.Tensor:
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(grads, plist, strict=True)
        ]
    )


def assert_symmetric(M: torch.Tensor, rtol: float = 1e-10, what: str = "matrix") -> None:
    scale = max(float(M.norm()), 1e-300)
    asym = float((M - M.T).norm())
    assert asym <= rtol * scale or asym == 0.0, f"{what} not symmetric: {asym:.3e} vs {scale:.3e}"


def _as_batch_list(batches):
    if isinstance(batches, (tuple, dict)):
        return [batches]
    return list(batches)


# ---------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------


def dense_hessian_reference(
    model: nn.Module,
    loss_fn: Callable,
    batches,
    params=None,
    bn_mode: str = "eval",
    *,
    loss_form: str = "auto",
    batch_size_fn: Callable | None = None,
) -> torch.Tensor:
    """Exact dense Hessian ``[n, n]`` of the sample-size-weighted mean loss over ``batches``.

    Column i is the double-backward product with the unit vector ``e_i`` on every batch,
    weighted by ``batch_size / N``. The model's modes and buffers are restored afterwards.
    """
    batches = _as_batch_list(batches)
    sel = select_params(model, params)
    plist = [p for _, p in sel]
    n = sum(p.numel() for p in plist)
    sizes = [(batch_size_fn or default_batch_size)(b) for b in batches]
    N = sum(sizes)
    H = torch.zeros(n, n, dtype=torch.float64)
    with curvature_mode(model, bn_mode):
        for batch, size in zip(batches, sizes, strict=True):
            if size == 0:
                continue
            loss = compute_loss(model, loss_fn, batch, loss_form)
            grads = torch.autograd.grad(loss, plist, create_graph=True, allow_unused=True)
            g = _flat(grads, plist)
            Hb = torch.zeros(n, n, dtype=torch.float64)
            if g.requires_grad:
                for i in range(n):
                    e = torch.zeros_like(g)
                    e[i] = 1.0
                    col = torch.autograd.grad(
                        g, plist, grad_outputs=e, retain_graph=True, allow_unused=True
                    )
                    Hb[:, i] = _flat(col, plist).double()
            H += (size / N) * Hb
    assert_symmetric(H, what="reference Hessian")
    return H


def dense_ggn_reference(
    model: nn.Module,
    loss_fn: Callable,
    batches,
    params=None,
    bn_mode: str = "eval",
    *,
    batch_size_fn: Callable | None = None,
) -> torch.Tensor:
    """Exact dense GGN ``sum_b (B_b / N) J_b^T H_b J_b`` for a criterion ``loss_fn``.

    ``J_b`` is the explicit Jacobian of the flattened outputs of batch b (one backward per
    output entry) and ``H_b`` the explicit Hessian of ``loss_fn(outputs, targets)`` w.r.t.
    the outputs.
    """
    batches = _as_batch_list(batches)
    sel = select_params(model, params)
    plist = [p for _, p in sel]
    n = sum(p.numel() for p in plist)
    sizes = [(batch_size_fn or default_batch_size)(b) for b in batches]
    N = sum(sizes)
    G = torch.zeros(n, n, dtype=torch.float64)
    with curvature_mode(model, bn_mode):
        for (inputs, targets), size in zip(batches, sizes, strict=True):
            out = model(inputs)
            of = out.reshape(-1)
            m = of.numel()
            J = torch.zeros(m, n, dtype=torch.float64)
            for j in range(m):
                row = torch.autograd.grad(of[j], plist, retain_graph=True, allow_unused=True)
                J[j] = _flat(row, plist).double()
            o = out.detach().clone().requires_grad_(True)
            loss = loss_fn(o, targets)
            (go,) = torch.autograd.grad(loss, o, create_graph=True)
            go = go.reshape(-1)
            Ho = torch.zeros(m, m, dtype=torch.float64)
            if go.requires_grad:
                for j in range(m):
                    (row,) = torch.autograd.grad(go[j], o, retain_graph=True, allow_unused=True)
                    if row is not None:
                        Ho[j] = row.reshape(-1).double()
            assert_symmetric(Ho, what="loss Hessian w.r.t. outputs")
            G += (size / N) * (J.T @ Ho @ J)
    assert_symmetric(G, what="reference GGN")
    return G


def rel_err(A: torch.Tensor, B: torch.Tensor) -> float:
    """Relative Frobenius error ||A - B|| / ||B|| (absolute when B == 0)."""
    A = A.detach().to(torch.float64)
    B = B.detach().to(torch.float64)
    denom = float(B.norm())
    num = float((A - B).norm())
    return num / denom if denom > 0 else num


# ---------------------------------------------------------------------------------------
# state snapshots
# ---------------------------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict:
    """Everything hessfast promises not to touch: modes, params, buffers, .grad, RNG."""
    return {
        "training": [(name, m.training) for name, m in model.named_modules()],
        "params": [(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()],
        "buffers": [(n, b.detach().clone()) for n, b in model.named_buffers()],
        "grads": [
            (n, None if p.grad is None else (id(p.grad), p.grad.detach().clone()))
            for n, p in model.named_parameters()
        ],
        "rng": torch.get_rng_state().clone(),
    }


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"], "training flags changed"
    for (n, a, ra), (_, b, rb) in zip(after["params"], before["params"], strict=True):
        assert torch.equal(a, b), f"parameter {n} changed"
        assert ra == rb, f"requires_grad of {n} changed"
        assert a.dtype == b.dtype
    for (n, a), (_, b) in zip(after["buffers"], before["buffers"], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), f"buffer {n} changed: {b} -> {a}"
    for (n, a), (_, b) in zip(after["grads"], before["grads"], strict=True):
        if b is None:
            assert a is None, f".grad of {n} was None and is now set"
        else:
            assert a is not None, f".grad of {n} was removed"
            assert a[0] == b[0], f".grad of {n} was replaced by another tensor"
            assert torch.equal(a[1], b[1]), f".grad of {n} changed"
    assert torch.equal(after["rng"], before["rng"]), "global torch RNG state changed"


def reorder_reference(ref: torch.Tensor, model: nn.Module, ref_names, op_names) -> torch.Tensor:
    """Principal submatrix of ``ref`` (built over ``ref_names`` in that order) in the order
    of ``op_names``: lets a test compare against an operator whatever order it flattens in."""
    shapes = dict(model.named_parameters())
    offsets, off = {}, 0
    for name in ref_names:
        k = shapes[name].numel()
        offsets[name] = (off, off + k)
        off += k
    assert off == ref.shape[0], "reference size does not match ref_names"
    idx = torch.cat([torch.arange(*offsets[name]) for name in op_names])
    return ref[idx][:, idx]


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
