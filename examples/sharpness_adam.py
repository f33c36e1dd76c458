"""Sharpness while training with (full-batch) Adam: the PRECONDITIONED sharpness
lambda_max(D^-1/2 H D^-1/2), D Adam's denominator, rises to Adam's stability threshold
(2 + 2 beta1) / ((1 - beta1) lr) = 38 / lr and hovers there: the adaptive edge of stability
(Cohen et al., 2022). The raw lambda_max of H is recorded too.

    python examples/sharpness_adam.py [--quick] [--out DIR] [--lr LR]

Prints the history and writes DIR/history.json and DIR/sharpness.png.
"""

from __future__ import annotations

import torch
from _common import parser
from _sharpness import run


def main() -> None:
    p = parser(__doc__.split("\n\n")[0], "sharpness-adam")
    p.add_argument("--lr", type=float, default=0.03,
                   help="learning rate (default 0.03: 38/lr = 1267)")
    args = p.parse_args()
    steps, every = (320, 10) if args.quick else (600, 3)
    run(lambda params: torch.optim.Adam(params, lr=args.lr), steps=steps, every=every,
        samples=512, out=args.out, label=f"Adam lr {args.lr} (38/lr = {38 / args.lr:.4g})")


if __name__ == "__main__":
    main()
