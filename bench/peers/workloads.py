"""The three workloads of the comparison, prepared once and loaded by every cell.

* ``mlp``: tanh MLP 64-32-10 on scikit-learn's bundled digits (1797 samples, one batch),
  briefly trained; n = 2410, small enough for a dense float64 Hessian.
* ``cnn``: ResNet-20-style CNN (3 stages x 3 basic blocks, 8/16/32 channels, BatchNorm in
  eval mode) on one fixed random CIFAR-shaped batch (3x32x32, 10 classes).
* ``lm``: 2-layer causal transformer LM (d=64, 4 heads, vocab 256, seq 32, batch 16),
  untrained; its logits are flattened to ``[B*T, V]`` so that one ``nn.CrossEntropyLoss``
  criterion serves every library.

``prepare(case, path)`` builds the model and batch from fixed seeds and saves them;
``load(case, path, device)`` gives every subprocess the identical model (eval mode) and batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

CASES = ("mlp", "cnn", "lm")


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.short is None else self.short(x)))


class ResNet20(nn.Module):
    """ResNet-20 layout (He et al. 2016, CIFAR variant) with widths 8/16/32."""

    def __init__(self, widths: tuple[int, int, int] = (8, 16, 32), classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(3):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(out.mean(dim=(2, 3)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.reshape(B, T, h, D // h).transpose(1, 2) for t in (q, k, v))
        # plain attention (no fused SDPA kernel: those lack double backward / JVP)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(D // h)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Causal LM; returns logits flattened to ``[B*T, vocab]``."""

    def __init__(self, vocab: int = 256, d: int = 64, seq: int = 32, layers: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(T, device=ids.device))
        logits = self.head(self.ln(self.blocks(x)))
        return logits.reshape(-1, logits.shape[-1])


# ---------------------------------------------------------------------------------------------
# prepare / load
# ---------------------------------------------------------------------------------------------
def _build(case: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if case == "mlp":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32)
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        y = torch.tensor(d.target, dtype=torch.long)
        model = MLP()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(150):          # briefly trained: a realistic, non-random point
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return model, (x, y)
    if case == "cnn":
        model = ResNet20()
        x = torch.randn(32, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (32,), generator=g)
        return model, (x, y)
    if case == "lm":
        model = TinyLM()
        ids = torch.randint(0, 256, (16, 33), generator=g)
        return model, (ids[:, :-1].contiguous(), ids[:, 1:].reshape(-1).contiguous())
    raise ValueError(f"unknown case {case!r}; one of {CASES}")


def prepare(case: str, path: str) -> dict:
    model, (x, y) = _build(case)
    model.eval()
    torch.save({"state": model.state_dict(), "x": x, "y": y}, path)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"case": case, "n": n, "batch": int(x.shape[0]), "path": path}


def make_model(case: str) -> nn.Module:
    return {"mlp": MLP, "cnn": ResNet20, "lm": TinyLM}[case]()


def load(case: str, path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model in eval mode, criterion, (x, y)) on ``device``, identical in every process."""
    blob = torch.load(path, weights_only=True)
    model = make_model(case)
    model.load_state_dict(blob["state"])
    model = model.to(device=device, dtype=dtype).eval()
    x, y = blob["x"].to(device), blob["y"].to(device)
    if x.is_floating_point():
        x = x.to(dtype)
    return model, nn.CrossEntropyLoss(), (x, y)
