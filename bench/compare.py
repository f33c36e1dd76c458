"""hessfast against its peers -- PyHessian, curvlinops, hessian-eigenthings -- side by side.

Same workloads, same run, same machine. Every cell (one tool, one workload, one task) runs in
a fresh subprocess (``python -m peers.cell`` in ``bench/``) with a timeout, hessfast included;
each peer goes through its own recommended API and defaults wherever the task does not fix a
parameter (see ``bench/peers/*_peer.py``). A cell is clocked as a user waits: from the tool's
first call (operator construction) to its answer, in a fresh process, with nothing warmed up
before (imports and loading the workload are not timed). The set-up part of it (operator
construction, with hessfast's pre-flight) is reported in its own column. Tasks:

* ``lambda_max``: the largest algebraic eigenvalue at ``tol`` (each tool's own meaning of tol).
* ``top5``: the 5 largest algebraic eigenvalues at ``tol``.
* ``trace``: a fixed budget of products (hessfast: XTrace at the budget, and adaptive XTrace
  stopping on a 1% confidence interval).
* ``density``: spectral density from ``probes x steps`` Lanczos products.
* ``hvp``: seconds per Hessian-vector product on the one batch (graph reuse).

Every cell gets a verdict against an exact or tight reference: ``correct``, ``wrong`` (with
its error), ``unsupported``, ``failed`` (with the exception) or ``timeout``. Speed ratios are
taken only against peers whose answer is correct: a wrong cell is never fast.

    python bench/compare.py                       # full CPU run, ~20 min on 2 cores
    python bench/compare.py --quick --cases mlp --tasks lambda_max,top5
    python bench/compare.py --device cuda         # on a GPU (writes compare_cuda.*)

``--python`` runs the cells with another interpreter; this process times nothing and needs
hessfast installed for :mod:`hessfast.testing.comparison` (the verdicts, the ranking and the
report, which hessfast's tests check; numpy for the density verdicts, matplotlib for the plot).

Writes ``bench/results/compare_<device>[_quick]-<date>-<commit7>.{jsonl,md,png}`` (the naming
rule of bench/_harness.py; ``--out PREFIX`` chooses another prefix). Every JSON line carries the
harness's ``stamp``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import _harness as harness

from hessfast.testing.comparison import (
    CASES,
    FULL,
    LABELS,
    QUICK,
    REF_FULL,
    REF_QUICK,
    TASKS,
    TOOLS,
    cell_seconds,
    cells_for,
    eig_error,
    fmt_error,
    fmt_seconds,
    markdown,
    run_spec,
    summarize,
    verdict,
)

BENCH = harness.BENCH


def plot(path: str, cells: list[dict], cases: list[str], tasks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"correct": "tab:green", "wrong": "tab:red"}
    fig, axes = plt.subplots(len(cases), len(tasks), figsize=(3.2 * len(tasks),
                                                             2.6 * len(cases)), squeeze=False)
    for i, case in enumerate(cases):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            group = [c for c in cells if c["case"] == case and c["task"] == task]
            names, secs, cols = [], [], []
            for c in group:
                s = cell_seconds(c)
                names.append(LABELS[c["tool"]].split("+")[0][:10]
                             + ("*" if c.get("variant") else ""))
                secs.append(s if s is not None else 0.0)
                cols.append(colors.get(c["status"], "tab:gray"))
            ax.bar(range(len(secs)), secs, color=cols)
            ax.set_xticks(range(len(secs)), names, rotation=45, ha="right", fontsize=7)
            if any(s > 0 for s in secs):
                ax.set_yscale("log")
            ax.set_title(f"{case} / {task}", fontsize=9)
            if j == 0:
                ax.set_ylabel("seconds" + (" (per hvp)" if task == "hvp" else ""))
    fig.suptitle("green: correct, red: wrong, gray: failed/timeout/unsupported; "
                 "* = hessfast adaptive", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser(__doc__, "quick", "device", save=False,
                        quick_help="small budgets and timeouts",
                        out_help="output prefix (default bench/results/compare_<device>"
                        "[_quick]-<date>-<commit7>, the naming rule)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--timeout", type=float, default=None, help="seconds per cell")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter with hessfast and the peers installed")
    ap.add_argument("--cache-dir", default=None, help="where prepared workloads and "
                    "references are kept between runs (default: a fresh temp dir)")
    args = ap.parse_args(argv)

    cases = [c for c in args.cases.split(",") if c]
    tasks = [t for t in args.tasks.split(",") if t]
    tools = [t for t in args.tools.split(",") if t]
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c}")
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t}")
    cfg = dict(QUICK if args.quick else FULL)
    ref_cfg = dict(REF_QUICK if args.quick else REF_FULL)
    timeout = args.timeout or (90.0 if args.quick else 150.0)
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    # the naming rule's prefix unless --out names one (so no --save flag here)
    out = args.out or harness.results_path("compare", f"{dev}{'_quick' if args.quick else ''}",
                                           ext=None)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="hessfast-compare-")
    os.makedirs(cache, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    info = run_spec(args.python, {"kind": "version", "device": args.device}, 120, BENCH)
    if "error" in info or "timeout" in info:
        print(f"cannot start {args.python}: {info}", file=sys.stderr)
        return 2
    log(f"tools: {info['tools']}")
    here = harness.stamp("compare")
    machine = f"{here['cpu']}, {here['cores']} cores ({info.get('threads')} torch threads)"
    if info.get("gpu"):
        machine += f"; GPU {info['gpu']}"
    meta = {"kind": "meta", "device": args.device, "machine": machine,
            "date": here["date"][:10] + " " + here["date"][11:16] + " UTC",
            "commit": harness.commit(), "torch": info["torch"], "python": info["python"],
            "tools": info["tools"], "cfg": cfg, "ref_cfg": ref_cfg, "timeout": timeout,
            "quick": args.quick, "n": {}, "notes": [], "references": {}}

    cells: list[dict] = []
    for case in cases:
        path = os.path.join(cache, f"{case}.pt")
        prep = run_spec(args.python, {"kind": "prepare", "case": case, "path": path}, 300,
                        BENCH)
        if "error" in prep:
            log(f"{case}: prepare failed: {prep['error']}")
            continue
        meta["n"][case] = prep["n"]
        ref_path = os.path.join(cache, f"{case}.ref{'_quick' if args.quick else ''}.json")
        if os.path.exists(ref_path) and args.cache_dir:
            with open(ref_path) as f:
                ref = json.load(f)
            log(f"{case}: reference from cache {ref_path}")
        else:
            ref = run_spec(args.python, {"kind": "reference", "case": case, "path": path,
                                         "device": args.device, "cfg": ref_cfg}, 1200, BENCH)
            if "error" in ref or "timeout" in ref:
                log(f"{case}: reference failed: {ref}")
                continue
            if info["tools"].get("curvlinops") and ref.get("kind", "").startswith("hessfast"):
                cc = run_spec(args.python, {"kind": "crosscheck", "case": case, "path": path,
                                            "device": args.device,
                                            "cfg": {"k": ref_cfg["k"], "tol": 1e-6}}, 900,
                                      BENCH)
                if "top" in cc:
                    ref["crosscheck_top"] = cc["top"]
                    ref["crosscheck_err"] = eig_error(cc["top"], ref["top"])
                else:
                    ref["crosscheck_error"] = str(cc)[:300]
            with open(ref_path, "w") as f:
                json.dump(ref, f)
        meta["references"][case] = {k: v for k, v in ref.items()
                                    if not k.startswith("density_")}
        log(f"{case}: n={prep['n']} reference {ref.get('kind')}: top {ref['top'][:2]}, "
            f"lambda_min {ref['lambda_min']:.4g}, trace {ref['trace']:.4g} "
            f"+- {ref.get('trace_stderr', 0):.2g}, crosscheck err "
            f"{ref.get('crosscheck_err', 'n/a')}")
        if ref["lambda_min"] < 0 and abs(ref["lambda_min"]) > abs(ref["top"][0]):
            meta["notes"].append(
                f"{case}: the largest-magnitude eigenvalue is negative ({ref['lambda_min']:.4g}"
                f" vs lambda_max {ref['top'][0]:.4g}): power iteration converges to it")
        for task in tasks:
            for tool, variant, ccfg in cells_for(task, tools, cfg):
                if not info["tools"].get(tool):
                    res = {"missing": info.get("missing", {}).get(tool, "not importable")}
                else:
                    res = run_spec(args.python, {"kind": "cell", "tool": tool, "task": task,
                                                 "case": case, "path": path,
                                                 "device": args.device, "cfg": ccfg}, timeout,
                                   BENCH)
                try:
                    v = verdict(task, res, ref, ccfg)
                except Exception as e:  # noqa: BLE001  (a malformed result is a failure)
                    v = {"status": "failed", "error": None,
                         "detail": f"bad result: {type(e).__name__}: {e}"[:300]}
                cell = {"kind": "cell", "case": case, "task": task, "tool": tool,
                        "variant": variant, **v}
                for key in ("eigenvalues", "converged", "trace", "stderr", "hv_norm",
                            "num_matvecs", "num_passes", "setup_seconds", "solve_seconds",
                            "total_seconds", "wall_seconds", "warmup_seconds",
                            "hvp_mode", "shim", "stderr_tail"):
                    if key in res:
                        cell[key] = res[key]
                cell["notes"] = res.get("notes", [])
                if res.get("shim") and res["shim"] not in meta["notes"]:
                    meta["notes"].append(res["shim"])
                if task == "density" and "nodes" in res:
                    cell["_density"] = (res["nodes"], res["weights"])
                cells.append(cell)
                log(f"{case:4s} {task:10s} {LABELS[tool] + ('/' + variant if variant else ''):28s}"
                    f" {cell['status']:9s} err {fmt_error(cell.get('error')):8s} "
                    f"{fmt_seconds(cell_seconds(cell)):>10s} (set-up "
                    f"{fmt_seconds(cell.get('setup_seconds'))})  mv {cell.get('num_matvecs', '-')}")

    summary = summarize(cells, args.device)
    meta["total_seconds"] = time.perf_counter() - t_start
    with harness.Records("compare", paths=(out + ".jsonl",), echo=False, append=False) as rec:
        rec.emit(meta)
        for c in cells:
            rec.emit({k: v for k, v in c.items() if not k.startswith("_")})
        for r in summary:
            rec.emit({"kind": "summary", **r})
    md = markdown(meta, cells, summary)
    with open(out + ".md", "w") as f:
        f.write(md)
    try:
        plot(out + ".png", cells, [c for c in cases if c in meta["n"]], tasks)
    except Exception as e:  # noqa: BLE001
        log(f"plot failed: {e}")
    print(md)
    log(f"wrote {out}.{{jsonl,md,png}} in {meta['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
