"""The curvature report of a small ResNet-style CNN (skip connections, BatchNorm) trained
briefly on scikit-learn's digits: lambda_max, top-k, trace, spectral density, condition and
per-block results (stem, the two residual blocks, the head).

    python examples/cnn_report.py [--quick] [--out DIR]

Writes DIR/report.json and DIR/spectrum.png and prints the summary.
"""

from __future__ import annotations

import time

import torch
from _common import digits, parser, write_report
from torch import nn

import hessfast as hf


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class SmallResNet(nn.Module):
    def __init__(self, c: int = 12, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU())
        self.block1 = Block(c)
        self.pool = nn.MaxPool2d(2)  # 8x8 -> 4x4
        self.block2 = Block(c)
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.pool(self.block1(self.stem(x))))
        return self.head(h.mean(dim=(2, 3)))  # global average pooling


def main() -> None:
    args = parser(__doc__.split("\n\n")[0], "cnn-report").parse_args()
    steps, n_eval = (60, 256) if args.quick else (300, 512)
    X, y = digits(images=True)
    torch.manual_seed(0)
    model = SmallResNet()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(X), (64,), generator=gen)
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(X).argmax(1) == y).float().mean().item()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"SmallResNet, {n_params} parameters: {steps} Adam steps in "
          f"{time.perf_counter() - t0:.1f} s, accuracy {acc:.3f} on all {len(X)} images")
    # the Hessian of the mean loss over the first n_eval images, BatchNorm in eval mode
    batches = [(X[:n_eval], y[:n_eval])]
    blocks = {"stem": r"^stem\.", "block1": r"^block1\.", "block2": r"^block2\.",
              "head": r"^head\."}
    report = hf.analyze(model, loss_fn, batches, k=3 if args.quick else 5,
                        num_probes=2 if args.quick else 4,
                        num_steps=10 if args.quick else 24, groups=blocks)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
