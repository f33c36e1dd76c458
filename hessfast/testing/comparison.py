"""The peer comparison's rules: verdicts against a reference, the ranking, and the report.

``bench/compare.py`` runs hessfast and its peers (PyHessian, curvlinops, hessian-eigenthings)
on the same workloads, one cell (tool, workload, task) per fresh process, and grades every
cell with the pure functions here; hessfast's tests check these rules without the bench:

* :func:`verdict`: ``correct``, ``wrong`` (with its error), ``unsupported``, ``failed``,
  ``timeout`` or ``not installed``, against an exact or tight reference: eigenvalues within
  :data:`EIG_RTOL` (:func:`eig_error`), traces within :data:`TRACE_RTOL` plus twice the
  reference's own standard error, densities within :data:`DENSITY_TOL` in L1 distance between
  Gaussian-smoothed densities (:func:`density_distance`), ``||Hv||`` within :data:`HVP_RTOL`.
* :func:`summarize`: per (workload, task), hessfast's fastest correct cell against the fastest
  correct peer. A wrong cell is never fast: it enters no ratio.
* :func:`markdown`: the report's tables.
* :func:`run_spec`: one cell in a fresh process (``python -m peers.cell SPEC``), its result.

The settings of a run (:data:`FULL`, :data:`QUICK`, :data:`REF_FULL`, :data:`REF_QUICK`) are
here too, so that a test grades with the budgets the comparison uses. Needs the standard
library only (numpy for the density distance).
"""

from __future__ import annotations

import json
import math
import subprocess
import time

MARK = "@@RESULT "
"""The prefix of a cell's result line on stdout (``bench/peers/cell.py`` prints it)."""

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
# verdicts and ranking (pure functions)
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
# running one cell
# ---------------------------------------------------------------------------------------------
def run_spec(python: str, spec: dict, timeout: float, cwd: str) -> dict:
    """Run ``python -m peers.cell SPEC`` in ``cwd`` (bench/) in a fresh process; its result.

    Args:
        python: the interpreter (with hessfast and the peers installed).
        spec: the cell's JSON object (``{"kind": "cell", "tool": ..., ...}``).
        timeout: seconds before the process is killed (the result is then ``{"timeout": s}``).
        cwd: the directory that holds the ``peers`` package (bench/).

    Returns:
        the cell's result dict, ``{"timeout": s}`` or ``{"error": ...}``, with
        ``wall_seconds``: the subprocess's whole life (interpreter start, imports, loading),
        the watchdog's figure, never a ranking one (those come from the cell itself).
    """
    t0 = time.perf_counter()
    try:
        p = subprocess.run([python, "-m", "peers.cell", json.dumps(spec)], cwd=cwd,
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


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def fmt_seconds(s: float | None) -> str:
    """``12.3 ms`` below a second, ``1.23 s`` above; ``-`` for None."""
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_error(e: float | None) -> str:
    """A relative error as ``1.2e-03``; ``inf``, or ``-`` for None."""
    return "-" if e is None else ("inf" if not math.isfinite(e) else f"{e:.1e}")


def markdown(meta: dict, cells: list[dict], summary: list[dict]) -> str:
    """The report: a header from ``meta`` (device, machine, date, commit, versions, settings,
    notes), the summary table (one row per workload and task) and every cell's row."""
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
        hf_s = (f"{fmt_seconds(hf['seconds'])}" + (f" ({hf['variant']})" if hf["variant"] else "")
                if hf else r["hessfast_status"])
        peer = r["peer"]
        peer_s = (f"{LABELS[peer['tool']]} {fmt_seconds(peer['seconds'])}" if peer
                  else "none correct")
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        met = {True: "yes", False: "**no**", None: "n/a"}[r["met"]]
        lines.append(f"| {CASE_LABELS.get(r['case'], r['case'])} | {meta['n'].get(r['case'])} "
                     f"| {r['task']} | {hf_s} | {fmt_seconds((hf or {}).get('setup_seconds'))} "
                     f"| {(hf or {}).get('num_matvecs') or '-'} "
                     f"| {peer_s} | {fmt_seconds((peer or {}).get('setup_seconds'))} "
                     f"| {r.get('arpack_matvecs') or '-'} | {sp} "
                     f"| >= {r['target']:g}x | {met} | {', '.join(r['peers_wrong']) or '-'} |")
    lines += ["", "| workload | task | tool | verdict | error | seconds | set-up | matvecs | "
              "passes | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        tool = LABELS[c["tool"]] + (f" ({c['variant']})" if c.get("variant") else "")
        notes = "; ".join(x for x in [c.get("detail", "")] + c.get("notes", [])[:2] if x)
        notes = notes.replace("|", "/")[:160]
        lines.append(
            f"| {c['case']} | {c['task']} | {tool} | {c['status']} | {fmt_error(c.get('error'))} "
            f"| {fmt_seconds(cell_seconds(c))} | {fmt_seconds(c.get('setup_seconds'))} | "
            f"{c.get('num_matvecs', '-')} | {c.get('num_passes', '-')} | {notes} |")
    return "\n".join(lines) + "\n"
