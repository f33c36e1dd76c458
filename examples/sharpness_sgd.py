"""Sharpness while training with (full-batch) SGD: lambda_max of the Hessian rises during
training (progressive sharpening) until it reaches 2 / lr, then hovers there while the loss
keeps falling, non-monotonically: the edge of stability (Cohen et al., 2021).

    python examples/sharpness_sgd.py [--quick] [--out DIR] [--lr LR]

Prints the history and writes DIR/history.json and DIR/sharpness.png.
"""

from __future__ import annotations

import torch
from _common import parser
from _sharpness import run


def main() -> None:
    p = parser(__doc__.split("\n\n")[0], "sharpness-sgd")
    p.add_argument("--lr", type=float, default=0.8, help="learning rate (default 0.8: 2/lr = "
                   "2.5, a little above the initial lambda_max of about 2)")
    args = p.parse_args()
    steps, every = (320, 10) if args.quick else (600, 3)
    run(lambda params: torch.optim.SGD(params, lr=args.lr), steps=steps, every=every,
        samples=512, out=args.out, label=f"SGD lr {args.lr} (2/lr = {2 / args.lr:.3g})")


if __name__ == "__main__":
    main()
