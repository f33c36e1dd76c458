"""``hessfast analyze`` over several checkpoints (``--checkpoint A B C`` or a glob,
``--workers N``): :func:`run_batch` runs :func:`hessfast.analysis.batch.analyze_checkpoints`
with a :class:`SpecLoader`, which every worker process uses to rebuild the model, data and
loss from the ``MODULE:FACTORY`` strings (the user's objects themselves may not pickle), and
prints one line per checkpoint."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from ._cli_load import (
    UsageError,
    load_checkpoint,
    load_data,
    load_loss,
    load_model,
    load_object,
    select_params,
    spec_provenance,
)
from .analysis.batch import Loader, analyze_checkpoints

__all__ = ["SpecLoader", "run_batch"]


@dataclass
class SpecLoader(Loader):
    """The command line's problem as its spec strings, rebuilt in each worker with the loading
    rules of a single ``hessfast analyze`` (so a checkpoint's wrapper prefixes are removed,
    ``--params`` is the same regular expression).

    Attributes:
        model_spec: ``--model``'s ``MODULE:FACTORY``.
        data_spec: ``--data``'s ``MODULE:FACTORY``.
        loss_spec: ``--loss``: ``ce``, ``mse`` or ``MODULE:FN``.
        params: ``--params``'s regular expression, or None (all parameters).
        command: the command line, for the reports' provenance.
    """

    model_spec: str
    data_spec: str
    loss_spec: str = "ce"
    params: str | None = None
    command: str | None = None

    @classmethod
    def of(cls, args: argparse.Namespace) -> SpecLoader:
        """The specs of parsed ``hessfast analyze`` options.

        Args:
            args: the namespace (model, data, loss, params, and ``command_line`` if set).
        """
        return cls(args.model, args.data, args.loss, args.params,
                   getattr(args, "command_line", None))

    def model(self, device: str) -> Any:
        """``--model`` built on ``device``.

        Args:
            device: where to put it.
        """
        return load_model(self.model_spec, device)

    def loss(self) -> Any:
        """``--loss``."""
        return load_loss(self.loss_spec)

    def data(self) -> Any:
        """``--data``'s batches."""
        return load_data(self.data_spec)

    def load_state(self, model: Any, path: str, device: str) -> None:
        """The single run's checkpoint rule (wrapper prefixes removed).

        Args:
            model: the model of :meth:`model`.
            path: the checkpoint file.
            device: the ``map_location``.
        """
        load_checkpoint(model, path, device)

    def operator_kwargs(self, model: Any) -> dict[str, Any]:
        """``params=`` of ``--params`` (resolved on the model).

        Args:
            model: the model of :meth:`model`.
        """
        return {"params": select_params(model, self.params)} if self.params else {}

    def describe(self) -> dict[str, Any]:
        """The specs, part of every line's settings."""
        return {"model": self.model_spec, "data": self.data_spec, "loss": self.loss_spec,
                "params": self.params}

    def provenance(self) -> dict[str, Any]:
        """The specs and the command line, as a single run's report records them
        (:func:`~hessfast._cli_load.spec_provenance`)."""
        return spec_provenance(self.model_spec, self.data_spec, self.loss_spec, self.params,
                               self.command)


def run_batch(args: argparse.Namespace, paths: list[str]) -> int:
    """Analyze every checkpoint of ``paths`` as ``hessfast analyze`` would one, spread over
    ``--workers`` processes (or the ranks of torchrun), appending to ``OUT/runs.jsonl`` and
    drawing ``OUT/evolution.png``; print one line per checkpoint.

    Args:
        args: the parsed ``hessfast analyze`` options (model, data, loss, params, curvature,
            steps, no_per_layer, tol, seed, k, probes, out, json, quiet, device, lr, workers).
        paths: the checkpoint files (globs already expanded, or still to expand).

    Returns:
        0 when every checkpoint is analyzed, 1 when some failed (named on stderr; a rerun of
        the same command retries them and skips the others).

    Raises:
        UsageError: a spec that names no importable object, or a checkpoint that is missing.
    """
    for spec, arg in ((args.model, "--model"), (args.data, "--data")):
        load_object(spec, arg)  # fail here, once, rather than on every checkpoint's line
    load_loss(args.loss)
    os.environ.setdefault("MPLBACKEND", "Agg")
    if args.quiet:
        os.environ["HESSFAST_PROGRESS"] = "0"
    loader = SpecLoader.of(args)
    for path in paths:
        if not glob.has_magic(path) and not os.path.isfile(os.path.expanduser(path)):
            raise UsageError("--checkpoint", f"{path!r}: no such file")
    lines = analyze_checkpoints(
        loader, None, None, list(paths), out=args.out,
        workers=getattr(args, "workers", None) or 1, device=args.device,
        lr=getattr(args, "lr", None), progress=False if args.quiet else None,
        curvature=args.curvature, k=args.k, num_probes=args.probes, num_steps=args.steps,
        per_layer=not args.no_per_layer, tol=args.tol, seed=args.seed)
    failed = [ln for ln in lines if ln.get("status") != "ok"]
    if args.json:
        for ln in lines:
            print(json.dumps(ln))
    else:
        width = max(len(str(ln.get("step"))) for ln in lines) if lines else 4
        for ln in lines:
            print(f"step {str(ln.get('step')):>{width}}  lambda_max {_g(ln.get('lambda_max'))}"
                  f"  trace {_g(ln.get('trace'))}  {ln.get('status')}  {ln.get('path')}")
        missing = len(paths) - len(lines)
        if missing > 0:
            print(f"{missing} checkpoint(s) belong to other torchrun ranks, not finished yet")
        out = os.path.join(args.out, "")
        figure = os.path.isfile(f"{out}evolution.png")
        print(f"wrote {out}runs.jsonl" + (f" and {out}evolution.png" if figure else
                                          " (no evolution.png: no checkpoint finished)"))
    if failed:
        print(f"hessfast analyze: error: {len(failed)} of {len(lines)} checkpoints failed:",
              file=sys.stderr)
        for ln in failed:
            print(f"  {ln.get('path')}: {ln.get('error')}", file=sys.stderr)
        print("rerun the same command to retry them (the finished ones are skipped)",
              file=sys.stderr)
        return 1
    return 0


def _g(x: Any) -> str:
    return f"{x:12.6g}" if isinstance(x, (int, float)) else f"{'-':>12}"
