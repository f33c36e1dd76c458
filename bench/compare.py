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

``--python`` runs the cells with another interpreter; this harness itself needs only the
standard library (numpy for the density verdicts, matplotlib for the plot).

Writes ``bench/results/compare_<device>.{jsonl,md,png}``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
MARK = "@@RESULT "

CASES = ("mlp", "cnn", "lm")
TASKS = ("lambda_max", "top5", "trace", "density", "hvp")
TOOLS = ("hessfast", "pyhessian", "curvlinops", "eigenthings")
LABELS = {
    "hessfast": "hessfast",
    "pyhessian": "PyHessian",
    "curvlinops": "curvlinops+scipy",
    "eigenthings": "hessian-eigenthings",
}
CASE_LABELS = {
    "mlp": "tanh MLP, digits",
    "cnn": "ResNet-20 (8/16/32), CIFAR-shaped",
    "lm": "causal transformer LM",
}

EIG_RTOL = 1e-3        # eigenvalues: relative error against the reference
TRACE_RTOL = 0.01      # traces: relative error (plus twice the reference's own stderr)
DENSITY_TOL = 0.1      # densities: L1 distance between smoothed densities (range 0..2)
HVP_RTOL = 1e-3        # ||H v||: relative error against the float64 reference
TARGETS = {"lambda_max": 2.0, "top5": 5.0, "trace": 3.0, "density": 2.0, "hvp": 1.0}
GPU_TARGETS = {"density": 10.0}

FULL = {"tol": 1e-3, "k": 5, "budget": 96, "probes": 8, "steps": 32, "seed": 0,
        "adaptive_cap": 600}
QUICK = {"tol": 1e-3, "k": 5, "budget": 30, "probes": 2, "steps": 16, "seed": 0,
         "adaptive_cap": 200}
REF_FULL = {"k": 5, "trace_ref_budget": 600, "density_ref_probes": 16,
            "density_ref_steps": 48}
REF_QUICK = {"k": 5, "trace_ref_budget": 300, "density_ref_probes": 8,
             "density_ref_steps": 32}


# ---------------------------------------------------------------------------------------------
# verdict logic (pure functions; tests/test_compare.py)
# ---------------------------------------------------------------------------------------------
def eig_error(values: list[float], reference: list[float]) -> float:
    """Largest relative error of the k largest ``values`` against the reference's k largest.

    Both lists are sorted descending first (a tool may return them in any order). Fewer
    values than asked is an infinite error.
    """
    k = len(reference)
    vals = sorted((float(v) for v in values), reverse=True)
    if len(vals) < k or any(not math.isfinite(v) for v in vals[:k]):
        return math.inf
    ref = sorted((float(v) for v in reference), reverse=True)
    return max(abs(v - r) / max(abs(r), 1e-300) for v, r in zip(vals[:k], ref, strict=True))


def smoothed_density(nodes, weights, grid, sigma: float):
    """Gaussian-smoothed quadrature density on ``grid``, averaged over probes.

    ``nodes``/``weights``: one list per probe (weights of each probe are renormalised to 1;
    NaN nodes are dropped). Integrates to 1 when the grid covers the nodes.
    """
    import numpy as np

    grid = np.asarray(grid, dtype=np.float64)
    out = np.zeros_like(grid)
    rows = 0
    for nrow, wrow in zip(nodes, weights, strict=True):
        n = np.asarray(nrow, dtype=np.float64)
        w = np.asarray(wrow, dtype=np.float64)
        keep = np.isfinite(n) & np.isfinite(w)
        n, w = n[keep], np.clip(w[keep], 0.0, None)
        if n.size == 0 or w.sum() <= 0:
            continue
        w = w / w.sum()
        z = (grid[:, None] - n[None, :]) / sigma
        out += (np.exp(-0.5 * z * z) * w[None, :]).sum(1) / (sigma * math.sqrt(2 * math.pi))
        rows += 1
    return out / max(rows, 1)


def density_distance(nodes_a, weights_a, nodes_b, weights_b, sigma: float,
                     num: int = 4001) -> float:
    """L1 distance (0..2) between two Gaussian-smoothed densities with the same ``sigma``,
    on one grid that covers all nodes of both plus 6 sigma."""
    import numpy as np

    flat = [x for rows in (nodes_a, nodes_b) for r in rows for x in r if math.isfinite(x)]
    if not flat:
        return math.inf
    lo, hi = min(flat) - 6 * sigma, max(flat) + 6 * sigma
    grid = np.linspace(lo, hi, num)
    pa = smoothed_density(nodes_a, weights_a, grid, sigma)
    pb = smoothed_density(nodes_b, weights_b, grid, sigma)
    return float(np.trapezoid(np.abs(pa - pb), grid))


def density_sigma(reference: dict, steps: int) -> float:
    """The common smoothing width: the reference's spectral range over the step count."""
    lo, hi = reference["lambda_min"], reference["top"][0]
    return max(hi - lo, 1e-12) / max(steps, 1)


def verdict(task: str, result: dict, reference: dict, cfg: dict) -> dict:
    """Status and error of one cell against the reference.

    ``result`` is the adapter's output, or ``{"error": ...}``, ``{"timeout": s}``,
    ``{"unsupported": why}``, ``{"missing": why}``.
    """
    for key, status in (("missing", "not installed"), ("unsupported", "unsupported"),
                        ("timeout", "timeout"), ("error", "failed")):
        if key in result:
            return {"status": status, "error": None, "detail": str(result[key])}
    detail = ""
    if task in ("lambda_max", "top5"):
        k = 1 if task == "lambda_max" else cfg["k"]
        err = eig_error(result.get("eigenvalues", []), reference["top"][:k])
        ok = err <= EIG_RTOL
        conv = result.get("converged")
        if conv is not None and not all(conv):
            detail = f"{sum(bool(c) for c in conv)}/{len(conv)} flagged converged"
    elif task == "trace":
        ref, ref_se = reference["trace"], reference.get("trace_stderr", 0.0) or 0.0
        est = result["trace"]
        err = abs(est - ref) / max(abs(ref), 1e-300)
        allowed = TRACE_RTOL + 2 * ref_se / max(abs(ref), 1e-300)
        ok = err <= allowed
        se = result.get("stderr")
        if se is not None and math.isfinite(se):
            within = abs(est - ref) <= 2 * math.sqrt(se * se + ref_se * ref_se) + 1e-300
            detail = f"{'within' if within else 'OUTSIDE'} its 2-stderr bar ({se:.3g})"
        conv = result.get("converged")
        if conv is not None and not all(conv):
            detail = (detail + "; " if detail else "") + "not converged"
    elif task == "density":
        sigma = density_sigma(reference, cfg["steps"])
        err = density_distance(result["nodes"], result["weights"],
                               reference["density_nodes"], reference["density_weights"], sigma)
        ok = err <= DENSITY_TOL
    elif task == "hvp":
        err = abs(result["hv_norm"] - reference["hv_norm"]) / max(reference["hv_norm"], 1e-300)
        ok = err <= HVP_RTOL
    else:
        raise ValueError(f"unknown task {task!r}")
    if not math.isfinite(err):
        ok = False
    return {"status": "correct" if ok else "wrong", "error": err, "detail": detail}


def cell_seconds(cell: dict) -> float | None:
    """The time a cell is ranked by: what the user waits for, from the first call to the
    answer (set-up + solve); per product for the ``hvp`` task."""
    if cell.get("solve_seconds") is None:
        return None
    if cell["task"] == "hvp":
        return cell["solve_seconds"] / max(cell.get("num_matvecs") or 1, 1)
    if cell.get("total_seconds") is not None:
        return cell["total_seconds"]
    return cell["solve_seconds"] + (cell.get("setup_seconds") or 0.0)


def summarize(cells: list[dict], device: str = "cpu") -> list[dict]:
    """Per (workload, task): hessfast's fastest correct cell against the fastest correct peer.

    Only correct cells enter a ratio: a wrong, failed or timed-out peer is never "the fastest"
    and a wrong hessfast cell never meets a target.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        groups.setdefault((c["case"], c["task"]), []).append(c)
    rows = []
    for (case, task), group in groups.items():
        hf_cells = [c for c in group if c["tool"] == "hessfast"]
        hf_ok = [c for c in hf_cells if c["status"] == "correct" and cell_seconds(c) is not None]
        peers_ok = [c for c in group if c["tool"] != "hessfast" and c["status"] == "correct"
                    and cell_seconds(c) is not None]
        target = (GPU_TARGETS.get(task, TARGETS[task]) if device.startswith("cuda")
                  else TARGETS[task])
        row = {"case": case, "task": task, "target": target, "hessfast": None, "peer": None,
               "speedup": None, "met": None,
               "hessfast_status": ",".join(sorted({c["status"] for c in hf_cells})) or "-",
               "peers_wrong": sorted({LABELS[c["tool"]] for c in group
                                      if c["tool"] != "hessfast" and c["status"] == "wrong"})}
        if hf_ok:
            best = min(hf_ok, key=cell_seconds)
            row["hessfast"] = {"variant": best.get("variant", ""), "seconds": cell_seconds(best),
                               "setup_seconds": best.get("setup_seconds"),
                               "num_matvecs": best.get("num_matvecs")}
        if peers_ok:
            fastest = min(peers_ok, key=cell_seconds)
            row["peer"] = {"tool": fastest["tool"], "variant": fastest.get("variant", ""),
                           "seconds": cell_seconds(fastest),
                           "setup_seconds": fastest.get("setup_seconds")}
        arpack = [c for c in group if c["tool"] == "curvlinops" and c.get("num_matvecs")]
        if task in ("lambda_max", "top5") and arpack:
            row["arpack_matvecs"] = arpack[0]["num_matvecs"]   # scipy eigsh on curvlinops
        if task == "density" and hf_ok:
            peer_errs = [c["error"] for c in group if c["tool"] != "hessfast"
                         and c.get("error") is not None and math.isfinite(c["error"])]
            if peer_errs:
                row["density_vs_best_peer"] = (min(c["error"] for c in hf_ok), min(peer_errs))
        if not hf_ok:
            row["met"] = False
        elif row["peer"] is None:
            row["met"] = None                     # no correct peer to compare with
        else:
            row["speedup"] = row["peer"]["seconds"] / max(row["hessfast"]["seconds"], 1e-12)
            row["met"] = row["speedup"] >= target
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# running cells
# ---------------------------------------------------------------------------------------------
def run_spec(python: str, spec: dict, timeout: float) -> dict:
    """Run ``python -m peers.cell SPEC`` in ``bench/`` in a fresh process; the parsed result.

    ``wall_seconds`` is the subprocess's whole life (interpreter start, imports, loading):
    the watchdog's figure, never a ranking one (those come from the cell itself).
    """
    t0 = time.perf_counter()
    try:
        p = subprocess.run([python, "-m", "peers.cell", json.dumps(spec)], cwd=BENCH,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"timeout": timeout, "wall_seconds": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(MARK):
            out = json.loads(line[len(MARK):])
            out["wall_seconds"] = wall
            if "error" in out:
                out["stderr_tail"] = p.stderr[-1500:]
            return out
    return {"error": f"no result (exit {p.returncode}): {p.stderr[-800:]}", "wall_seconds": wall}


def cells_for(task: str, tools: list[str], cfg: dict) -> list[tuple[str, str, dict]]:
    """(tool, variant, cfg) for one task."""
    out = []
    for tool in tools:
        out.append((tool, "", dict(cfg)))
        if tool == "hessfast" and task in ("lambda_max", "top5", "density"):
            # the operator's product path named, skipping auto's timing of every path
            out.append((tool, "reuse_graph", dict(cfg, hvp_mode="reuse_graph")))
        if tool == "hessfast" and task == "trace":
            out.append((tool, "adaptive 1%", dict(cfg, rtol=TRACE_RTOL,
                                                  budget=cfg["adaptive_cap"])))
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                       text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_err(e) -> str:
    return "-" if e is None else ("inf" if not math.isfinite(e) else f"{e:.1e}")


def markdown(meta: dict, cells: list[dict], summary: list[dict]) -> str:
    lines = [
        f"## hessfast vs peers ({meta['device']})",
        "",
        f"Machine: {meta['machine']}. {meta['date']}, hessfast commit {meta['commit']}; "
        f"torch {meta['torch']}"
        + "".join(f"; {LABELS[t]} {v}" for t, v in meta["tools"].items()
                  if v and t != "hessfast") + ".",
        f"Settings: tol {meta['cfg']['tol']:g} (eigenvalues), k = {meta['cfg']['k']}, trace "
        f"budget {meta['cfg']['budget']} products, density {meta['cfg']['probes']} probes x "
        f"{meta['cfg']['steps']} steps; every cell a fresh process, clocked as a user waits: "
        "from the tool's first call to its answer, nothing warmed up before (imports and "
        "loading the workload untimed); seconds = that time, of which set-up = operator "
        "construction (hessfast: with its pre-flight); hvp: seconds per product after one "
        "untimed product.",
        f"Correct means: eigenvalues within {EIG_RTOL:g} relative of the reference; trace "
        f"within {TRACE_RTOL:.0%} (+2 reference stderr); density L1 distance <= "
        f"{DENSITY_TOL:g} between Gaussian-smoothed densities (sigma = reference range / "
        f"steps); ||Hv|| within {HVP_RTOL:g}. Ratios only against correct peers.",
    ]
    for note in meta.get("notes", []):
        lines.append(f"Note: {note}")
    lines += ["", "| workload | n | task | hessfast | its set-up | its products | fastest "
              "correct peer | its set-up | ARPACK's products | speedup | target | met | wrong "
              "peers |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        hf = r["hessfast"]
        hf_s = (f"{_fmt_s(hf['seconds'])}" + (f" ({hf['variant']})" if hf["variant"] else "")
                if hf else r["hessfast_status"])
        peer = r["peer"]
        peer_s = f"{LABELS[peer['tool']]} {_fmt_s(peer['seconds'])}" if peer else "none correct"
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        met = {True: "yes", False: "**no**", None: "n/a"}[r["met"]]
        lines.append(f"| {CASE_LABELS.get(r['case'], r['case'])} | {meta['n'].get(r['case'])} "
                     f"| {r['task']} | {hf_s} | {_fmt_s((hf or {}).get('setup_seconds'))} "
                     f"| {(hf or {}).get('num_matvecs') or '-'} "
                     f"| {peer_s} | {_fmt_s((peer or {}).get('setup_seconds'))} "
                     f"| {r.get('arpack_matvecs') or '-'} | {sp} "
                     f"| >= {r['target']:g}x | {met} | {', '.join(r['peers_wrong']) or '-'} |")
    lines += ["", "| workload | task | tool | verdict | error | seconds | set-up | matvecs | "
              "passes | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        tool = LABELS[c["tool"]] + (f" ({c['variant']})" if c.get("variant") else "")
        notes = "; ".join(x for x in [c.get("detail", "")] + c.get("notes", [])[:2] if x)
        notes = notes.replace("|", "/")[:160]
        lines.append(
            f"| {c['case']} | {c['task']} | {tool} | {c['status']} | {_fmt_err(c.get('error'))} "
            f"| {_fmt_s(cell_seconds(c))} | {_fmt_s(c.get('setup_seconds'))} | "
            f"{c.get('num_matvecs', '-')} | {c.get('num_passes', '-')} | {notes} |")
    return "\n".join(lines) + "\n"


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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small budgets and timeouts")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per cell")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter with hessfast and the peers installed")
    ap.add_argument("--out", default=None, help="output prefix (default "
                    "bench/results/compare_<device>[_quick])")
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
    out = args.out or os.path.join(ROOT, "bench", "results",
                                   f"compare_{dev}{'_quick' if args.quick else ''}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="hessfast-compare-")
    os.makedirs(cache, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    info = run_spec(args.python, {"kind": "version", "device": args.device}, 120)
    if "error" in info or "timeout" in info:
        print(f"cannot start {args.python}: {info}", file=sys.stderr)
        return 2
    log(f"tools: {info['tools']}")
    machine = f"{_cpu_name()}, {os.cpu_count()} cores ({info.get('threads')} torch threads)"
    if info.get("gpu"):
        machine += f"; GPU {info['gpu']}"
    meta = {"kind": "meta", "device": args.device, "machine": machine,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _commit(), "torch": info["torch"], "python": info["python"],
            "tools": info["tools"], "cfg": cfg, "ref_cfg": ref_cfg, "timeout": timeout,
            "quick": args.quick, "n": {}, "notes": [], "references": {}}

    cells: list[dict] = []
    for case in cases:
        path = os.path.join(cache, f"{case}.pt")
        prep = run_spec(args.python, {"kind": "prepare", "case": case, "path": path}, 300)
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
                                         "device": args.device, "cfg": ref_cfg}, 1200)
            if "error" in ref or "timeout" in ref:
                log(f"{case}: reference failed: {ref}")
                continue
            if info["tools"].get("curvlinops") and ref.get("kind", "").startswith("hessfast"):
                cc = run_spec(args.python, {"kind": "crosscheck", "case": case, "path": path,
                                            "device": args.device,
                                            "cfg": {"k": ref_cfg["k"], "tol": 1e-6}}, 900)
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
                                                 "device": args.device, "cfg": ccfg}, timeout)
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
                    f" {cell['status']:9s} err {_fmt_err(cell.get('error')):8s} "
                    f"{_fmt_s(cell_seconds(cell)):>10s} (set-up "
                    f"{_fmt_s(cell.get('setup_seconds'))})  mv {cell.get('num_matvecs', '-')}")

    summary = summarize(cells, args.device)
    meta["total_seconds"] = time.perf_counter() - t_start
    with open(out + ".jsonl", "w") as f:
        f.write(json.dumps(meta) + "\n")
        for c in cells:
            f.write(json.dumps({k: v for k, v in c.items() if not k.startswith("_")}) + "\n")
        for r in summary:
            f.write(json.dumps({"kind": "summary", **r}) + "\n")
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
