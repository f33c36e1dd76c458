"""Tiny seeded models with uneven batches: the model zoo of hessfast's tests and benchmarks.

Every builder returns ``(model, loss_fn, batches)``:

* ``model`` in float64 (``dtype=``) with a deterministic seeded init; the global torch RNG is
  forked, so building a model never changes the caller's RNG state. LayerNorm/BatchNorm
  affine parameters and BatchNorm running statistics get non-trivial values;
* ``loss_fn`` a criterion ``loss_fn(outputs, targets)`` (MLP, CNN) or a callable
  ``loss_fn(model, batch)`` (LM, dict batches);
* ``batches`` a list of batches with an uneven last batch (8, 8, 5 samples by default).

They are small enough for the dense references of :mod:`hessfast.testing.dense` (69, 102 and
241 parameters with the defaults) and cover LayerNorm, BatchNorm, Dropout, attention and GELU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BUILDERS",
    "DTYPE",
    "SmallCNN",
    "TinyLM",
    "lm_loss",
    "make_cnn",
    "make_lm",
    "make_mlp",
    "seeded",
    "sizes_to_slices",
]

DTYPE = torch.float64


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
    """Consecutive slices of the given lengths: ``(8, 8, 5)`` -> ``[0:8], [8:16], [16:21]``."""
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
        """Class logits ``[B, 3]`` of images ``x [B, 2, 6, 6]``."""
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
        if d % heads:
            raise ValueError(f"d={d} is not a multiple of heads={heads}")
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
        """Next-token logits ``[B, T, vocab]`` of token ids ``ids [B, T]`` (``T <= seq``)."""
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
