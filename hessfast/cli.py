"""Command line: ``hessfast analyze``, ``hessfast demo``, ``hessfast info`` and
``hessfast --version`` (also ``python -m hessfast ...``).

Exit status: 0 success; 1 a hessfast error (its message, e.g. a pre-flight check that
failed); 2 a usage error or a bad argument value (argparse-style message naming the
argument, no traceback); 3 the user's code failed (importing --model/--data/--loss, a factory,
the data or the loss raised: one line with the exception's type and text; --debug prints the
traceback); 130 interrupted (Ctrl-C: one line, ``hessfast analyze: interrupted``; --debug
prints the traceback); 141 stdout was closed by its reader (``hessfast analyze ... | head``:
nothing more is printed, no traceback; 141 = 128 + SIGPIPE, what a shell reports for a
program killed by a closed pipe, so ``set -o pipefail`` sees the cut as for ``yes | head``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._cli_demo import demo
from ._cli_load import UsageError, UserCodeError, describe
from .errors import HessfastError, LossCallError

__all__ = ["EXIT_HESSFAST", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PIPE", "EXIT_USAGE",
           "EXIT_USER_CODE", "demo", "info", "main"]

EXIT_OK, EXIT_HESSFAST, EXIT_USAGE, EXIT_USER_CODE = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_PIPE = 130, 141  # 128 + SIGINT, 128 + SIGPIPE: what shells report

_EPILOG = """exit status: 0 success; 1 a hessfast error (its message says the cause and the fix);
2 a bad argument (the message names it); 3 your code failed (importing --model/--data/--loss,
a factory, the data or the loss raised; --debug shows the traceback); 130 interrupted
(Ctrl-C); 141 the reader of stdout closed it (| head)."""

_NO_CUDA = "no CUDA device visible to torch"


# ---------------------------------------------------------------------------------------------
# info and --version
# ---------------------------------------------------------------------------------------------


def _ops_report() -> dict[str, Any]:
    """``ops.backend_report()``, with each op's cuda entry said plainly when no CUDA device is
    visible: nothing runs there (``selected: "none"``) and why."""
    import torch

    from . import ops

    report = ops.backend_report()
    if torch.cuda.is_available():
        return report
    for op, per_dev in report.items():
        if op.startswith("_") or not isinstance(per_dev, dict) or "cuda" not in per_dev:
            continue
        per_dev["cuda"] = {
            "selected": "none",
            "why": f"{_NO_CUDA}: no op runs on cuda here",
            "not_supported_reasons": per_dev["cuda"].get("not_supported_reasons", {}),
        }
    return report


def info() -> dict[str, Any]:
    """Versions, native module status, CUDA/Triton availability and the backend of each op."""
    import numpy
    import torch

    from . import __version__

    out: dict[str, Any] = {
        "hessfast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "torch_cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name()
    try:
        from . import _native

        out["native_loaded"] = _native.available()
        out["native_error"] = _native.IMPORT_ERROR
        out["native_cuda_compiled"] = _native.cuda_compiled()
        out["native_build"] = _native.build_info()
    except Exception as exc:  # noqa: BLE001 - info must report, never fail
        out["native_loaded"] = False
        out["native_error"] = f"{type(exc).__name__}: {exc}"
    from .kernels import _triton  # the one "is Triton here?" rule, shared with the dispatchers

    out["triton"] = _triton.version()
    if _triton.import_error() is not None:
        out["triton_error"] = _triton.import_error()
    try:
        out["ops"] = _ops_report()
    except Exception as exc:  # noqa: BLE001
        out["ops"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        from .kernels import ce_curvature

        out["ce_curvature"] = ce_curvature.backend_report()
    except Exception as exc:  # noqa: BLE001
        out["ce_curvature"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _device_line(entry: dict[str, Any]) -> str:
    selected = entry.get("selected")
    why = entry.get("why")
    if why:
        return f"{selected} ({why})"
    reasons = entry.get("not_supported_reasons") or {}
    others = [f"{b}: {'; '.join(r)}" for b, r in reasons.items() if r and b != selected]
    return f"{selected}" + (f" (not: {' | '.join(others)})" if others else "")


def _print_info(data: dict[str, Any]) -> None:
    width = max(len(k) for k in data)
    for key, value in data.items():
        if key in ("ops", "ce_curvature") and isinstance(value, dict) and "error" not in value:
            print(f"{key}:")
            for op, detail in value.items():
                if isinstance(detail, dict) and ("cpu" in detail or "cuda" in detail):
                    for dev in ("cpu", "cuda"):
                        if isinstance(detail.get(dev), dict):
                            print(f"  {op:<16} {dev:<5} {_device_line(detail[dev])}")
                elif isinstance(detail, dict) and "selected" in detail:  # ce_curvature's
                    print(f"  {op:<16} {_device_line(detail)}")
                else:
                    print(f"  {op}: {json.dumps(detail, default=str)}")
        elif isinstance(value, dict):
            print(f"{key:<{width}}  {json.dumps(value, default=str)}")
        else:
            print(f"{key:<{width}}  {value}")


def _version() -> str:
    """One line for bug reports: the torch that hessfast runs with, as ``torch.__version__``
    says, build tag included (the CUDA build matters: PyPI's wheel installs as ``2.14.1`` in
    pip's metadata while it runs as ``2.14.1+cu130``). Importing hessfast imported torch."""
    import torch

    from . import __version__

    return (f"hessfast {__version__} (torch {torch.__version__}, "
            f"python {platform.python_version()})")


# ---------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------


class _RenamedOption(argparse.Action):
    """The old, hidden spelling of a renamed option (``--probes`` for ``--num-probes``): it
    stores into the new option's destination and says on stderr, once per use, which name
    replaces it. Kept one release, like the library's renamed keywords."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str,
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated and will be removed; "
              f"use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_common(p: argparse.ArgumentParser, *, out_default: str, probes: int) -> None:
    p.add_argument("--tol", type=float, default=1e-3, help="relative tolerance (0 < tol < 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--k", type=int, default=5, help="number of top eigenvalues (default 5)")
    p.add_argument("--num-probes", type=int, default=probes, dest="probes", metavar="N",
                   help=f"random probes for trace and density (default {probes})")
    p.add_argument("--probes", type=int, dest="probes", action=_RenamedOption,
                   new="--num-probes")
    p.add_argument("--out", default=out_default,
                   help=f"folder for report.json and spectrum.png (default {out_default})")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON instead of the summary")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="print tracebacks of failures")


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="hessfast", description=__doc__.split("\n\n")[0],
                                     epilog=_EPILOG, formatter_class=fmt)
    parser.add_argument("--version", action="store_true", help="print the versions and exit")
    sub = parser.add_subparsers(dest="command")
    p_an = sub.add_parser(
        "analyze", epilog=_EPILOG, formatter_class=fmt,
        help="curvature report of your model, data and loss",
        description="The curvature report of a model on its data: lambda_max, top-k "
                    "eigenvalues, trace, spectral density, condition and per-layer results, "
                    "written to OUT/report.json and OUT/spectrum.png.")
    p_an.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                      help="a callable returning an nn.Module (or an nn.Module); MODULE is a "
                           "dotted module importable from the current folder or a .py path")
    p_an.add_argument("--data", required=True, metavar="MODULE:FACTORY",
                      help="returns the batches: a list of (inputs, targets), a DataLoader "
                           "(not shuffled), or a tuple (X, y) read as one batch")
    p_an.add_argument("--loss", default="ce", metavar="ce|mse|MODULE:FN",
                      help="cross-entropy (default), mean squared error, or your loss: "
                           "fn(outputs, targets) or fn(model, batch)")
    p_an.add_argument("--checkpoint", metavar="PATH", nargs="+",
                      help="weights to load (a state_dict, or a dict with 'state_dict' or "
                           "'model'; read with torch.load(weights_only=True)); a DDP or "
                           "torch.compile prefix on every key is removed. Several files or "
                           "globs (quoted: 'ckpts/*.pt') analyze each checkpoint in turn")
    p_an.add_argument("--workers", type=int, default=1, metavar="N",
                      help="processes sharing several checkpoints (default 1)")
    p_an.add_argument("--lr", type=float, metavar="LR",
                      help="the training learning rate: the report compares lambda_max with "
                           "2/LR (the edge of stability)")
    p_an.add_argument("--params", metavar="REGEX",
                      help="only these parameters: the one of this exact name, else the "
                           "trainable ones whose names the regular expression matches "
                           "(re.search); the rule of params= in the API")
    p_an.add_argument("--curvature", choices=("hessian", "ggn"), default="hessian")
    p_an.add_argument("--num-steps", type=int, default=64, dest="steps", metavar="N",
                      help="Lanczos steps per probe of the spectral density (default 64)")
    p_an.add_argument("--steps", type=int, dest="steps", action=_RenamedOption,
                      new="--num-steps")
    p_an.add_argument("--no-per-layer", action="store_true",
                      help="skip the per-layer results")
    _add_common(p_an, out_default="hessfast-report", probes=8)
    p_demo = sub.add_parser(
        "demo", epilog=_EPILOG, formatter_class=fmt,
        help="train a small CNN on scikit-learn's digits and analyze it",
        description="Trains a small CNN on scikit-learn's digits (a few seconds) and writes "
                    "its curvature report, as `hessfast analyze` would.")
    p_demo.add_argument("--steps", type=int, default=200,
                        help="training steps (Adam, batches of 64; default 200)")
    p_demo.add_argument("--density-steps", type=int, default=24,
                        help="Lanczos steps per probe of the spectral density (default 24)")
    _add_common(p_demo, out_default="hessfast-demo", probes=4)
    p_info = sub.add_parser("info", help="versions, native kernels, backends")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    return parser, {"analyze": p_an, "demo": p_demo, "info": p_info}


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------


def _progress(args: argparse.Namespace) -> bool | None:
    """False (no bars) with --quiet or when stderr is not a terminal; None: hessfast decides."""
    if args.quiet:
        os.environ["HESSFAST_PROGRESS"] = "0"
        return False
    return None if sys.stderr.isatty() else False


def _write(report: Any, out: str) -> tuple[Path, Path]:
    folder = Path(out).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError("--out", f"cannot create folder {out!r}: {exc}") from None
    json_path, png_path = folder / "report.json", folder / "spectrum.png"
    report.to_json(json_path)
    report.plot(png_path)
    return json_path, png_path


def _finish(report: Any, args: argparse.Namespace, header: list[str]) -> int:
    json_path, png_path = _write(report, args.out)
    if args.json:
        print(report.to_json())
    else:
        for line in header:
            print(line)
        print(report.summary())
        print(f"wrote {json_path} and {png_path}")
    return EXIT_OK


def _analyze(args: argparse.Namespace) -> int:
    from ._cli_load import (
        check_device,
        check_numbers,
        checkpoint_provenance,
        expand_checkpoints,
        load_checkpoint,
        load_data,
        load_loss,
        load_model,
        num_selected,
        select_params,
    )

    check_numbers(seed=args.seed, tol=args.tol, k=args.k, probes=args.probes,
                  slq_steps=args.steps, lr=args.lr, workers=args.workers)
    device = check_device(args.device)
    paths = expand_checkpoints(args.checkpoint) if args.checkpoint else []
    if args.workers > 1 and not paths:
        raise UsageError("--workers", "--workers spreads several checkpoints over processes: "
                                      "give them with --checkpoint PATH [PATH ...]")
    if len(paths) > 1 or args.workers > 1:
        from ._cli_batch import run_batch

        return run_batch(args, paths)
    os.environ.setdefault("MPLBACKEND", "Agg")
    loss_fn = load_loss(args.loss)
    model = load_model(args.model, device)
    checkpoint: dict[str, Any] | None = None
    if paths:
        removed = load_checkpoint(model, paths[0], device)
        if removed:
            print(f"hessfast analyze: note: loaded {paths[0]} without the prefix "
                  f"{''.join(removed)!r} on every key (saved from a wrapped model)",
                  file=sys.stderr)
        checkpoint = checkpoint_provenance(paths[0], removed)
    data = load_data(args.data)
    kwargs: dict[str, Any] = {}
    names = select_params(model, args.params) if args.params else None
    if names is not None:
        kwargs["params"] = names
    n = num_selected(model, names)
    if args.k > n:  # analyze would refuse it as a ConfigurationError (exit 1) after the set-up
        what = (f"the {n} parameters --params selects" if names is not None
                else f"the model's {n} parameters")
        raise UsageError("--k", f"k={args.k} is more than {what} (n); use --k <= {n}")
    if args.lr is not None:
        kwargs["lr"] = args.lr
    from .analysis.analyze import analyze

    try:
        report = analyze(model, loss_fn, data, curvature=args.curvature, k=args.k,
                         num_probes=args.probes, num_steps=args.steps,
                         per_layer=not args.no_per_layer, tol=args.tol,
                         seed=args.seed, progress=_progress(args), **kwargs)
    except HessfastError:
        raise
    except Exception as exc:
        raise UserCodeError(
            f"the model, loss or data raised during the analysis: {describe(exc)}"
        ) from exc
    report.provenance.update(_provenance(args, device, checkpoint))
    return _finish(report, args, [])


def _provenance(args: argparse.Namespace, device: str,
                checkpoint: dict[str, Any] | None) -> dict[str, Any]:
    """What the command line adds to ``report.provenance`` (analyze records the versions,
    the loss, the model class, the parameter selection and the data itself)."""
    from ._cli_load import spec_provenance

    out: dict[str, Any] = {**spec_provenance(args.model, args.data, args.loss, args.params,
                                             getattr(args, "command_line", None)),
                           "device": device}
    if checkpoint is not None:
        out["checkpoint"] = checkpoint
    return out


def _demo(args: argparse.Namespace) -> int:
    from ._cli_demo import demo_cnn, demo_with_training
    from ._cli_load import check_device, check_numbers

    check_numbers(seed=args.seed, steps=args.steps, tol=args.tol, k=args.k, probes=args.probes,
                  density_steps=args.density_steps)
    check_device(args.device)
    n = sum(p.numel() for p in demo_cnn(args.seed).parameters())
    if args.k > n:
        raise UsageError("--k", f"k={args.k} is more than the demo model's {n} parameters (n); "
                                f"use --k <= {n}")
    os.environ.setdefault("MPLBACKEND", "Agg")
    report, fig = demo_with_training(seed=args.seed, steps=args.steps, tol=args.tol,
                                     device=args.device, k=args.k, progress=_progress(args),
                                     lanczos_steps=args.density_steps, probes=args.probes)
    header = [f"{fig['model']}: {fig['num_params']} parameters",
              f"trained {fig['train_steps']} Adam steps in {fig['train_seconds']} s: loss "
              f"{fig['train_loss']}, accuracy {fig['train_accuracy']} (all 1797 images)",
              f"analyzing the Hessian of the mean loss over the first "
              f"{fig['analysis_samples']} images", ""]
    return _finish(report, args, header)


@contextlib.contextmanager
def _warnings_as_lines(prog: str, enabled: bool) -> Iterator[None]:
    """Warnings printed as ``hessfast analyze: warning: ...`` (one message, no file and source
    line of hessfast's internals) while the command runs from the command line; a caller of
    :func:`main` with ``argv`` keeps its own warning handling (pytest's capture, filters)."""
    if not enabled:
        yield
        return

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        text = str(message).removeprefix("hessfast: ")
        print(f"{prog}: warning: {text}", file=sys.stderr if file is None else file)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _quiet_stdout() -> None:
    """stdout's reader is gone: what is still buffered goes to the null device, so that the
    interpreter's final flush raises no second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # a stdout without a file descriptor (a test's capture)
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hessfast`` command; returns the exit status (a usage error exits
    through argparse with status 2).

    Args:
        argv: the arguments after ``hessfast`` (default ``sys.argv[1:]``; warnings are then
            printed as one ``hessfast CMD: warning: ...`` line each).
    """
    from_shell = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, subs = _parser()
    args = parser.parse_args(argv)
    prog = "hessfast" + (f" {args.command}" if args.command else "")
    args.command_line = shlex.join(["hessfast", *argv])  # report.provenance["command"]
    try:
        with _warnings_as_lines(prog, from_shell):
            code = _run(args, parser, subs)
            sys.stdout.flush()  # a closed pipe raises here, inside the handler below
        return code
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_PIPE


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser,
         subs: dict[str, argparse.ArgumentParser]) -> int:
    """The parsed command, its failures turned into exit statuses (see the module)."""
    if args.version:
        print(_version())
        return EXIT_OK
    if args.command is None:
        parser.error("a command is required: analyze, demo or info (or --version)")
    if args.command == "info":
        data = info()
        print(json.dumps(data, indent=2, default=str)) if args.json else _print_info(data)
        return EXIT_OK
    sub = subs[args.command]
    prog = f"hessfast {args.command}"
    try:
        return _analyze(args) if args.command == "analyze" else _demo(args)
    except UsageError as exc:
        sub.error(f"argument {exc.arg}: {exc}" if exc.arg else str(exc))  # exits with 2
    except UserCodeError as exc:
        if args.debug and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__)
        hint = "" if args.debug else " (--debug shows the traceback)"
        print(f"{prog}: error: {exc}{hint}", file=sys.stderr)
        return EXIT_USER_CODE
    except LossCallError as exc:  # the user's loss or model raised on a batch
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USER_CODE
    except HessfastError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_HESSFAST
    return EXIT_USAGE  # pragma: no cover - sub.error exits


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
