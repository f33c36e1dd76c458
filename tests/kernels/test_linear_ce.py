"""The chunked linear-head cross-entropy GGN block (:mod:`hessfast.kernels.linear_ce`) against
the float64 GGN ``J^T H J`` from plain autograd: J of the logits w.r.t. (body parameters, W, b)
by double vjp, H the CE Hessian w.r.t. the logits by double backward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hessfast.errors import BackendUnavailableError, ConfigurationError
from hessfast.kernels.ce_curvature import ce_hessian_product_reference
from hessfast.kernels.linear_ce import choose_chunk_tokens, linear_ce_ggn_product

IGN = -100
VIN, D0, D, V = 11, 5, 4, 7


def _problem(n: int, seed: int, bias: bool = True, ignore_all: bool = False):
    """A body (Embedding -> Linear -> Tanh) giving h [N, D], a head W [V, D], b [V], targets."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(VIN, D0, generator=g, dtype=torch.float64, requires_grad=True)
    w1 = (torch.randn(D, D0, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
    b1 = torch.randn(D, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    tokens = torch.randint(0, VIN, (n,), generator=g)
    targets = torch.randint(0, V, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.3] = IGN
    targets[0] = IGN if ignore_all else 1
    if ignore_all:
        targets[:] = IGN
    body = [emb, w1, b1]
    head = [W] + ([b] if bias else [])

    def h_fn() -> torch.Tensor:
        return torch.tanh(F.linear(emb[tokens], w1, b1))          # [N, D]
    return body, head, h_fn, targets, g


def _directions(params, k, g):
    return [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
            for _ in range(k)]


def _jvp(out, params, vs):
    """J v by the double-vjp trick (plain autograd)."""
    w = torch.zeros_like(out, requires_grad=True)
    gs = torch.autograd.grad(out, params, w, create_graph=True)
    return torch.autograd.grad(gs, w, vs)[0]


def _reference(body, head, h_fn, targets, dirs, reduction):
    """J^T H J v per direction, J of the logits w.r.t. body + head parameters."""
    params = body + head
    out = []
    for v in dirs:
        logits = F.linear(h_fn(), *head)
        u = _jvp(logits, params, v)
        z = logits.detach().requires_grad_()
        gz = torch.autograd.grad(F.cross_entropy(z, targets, ignore_index=IGN,
                                                 reduction=reduction), z, create_graph=True)[0]
        q = torch.autograd.grad(gz, z, u)[0]
        out.append([x.detach() for x in torch.autograd.grad(logits, params, q)])
    return out


def _ours(body, head, h_fn, targets, dirs, reduction, **kw):
    """The head block from linear_ce_ggn_product, gh pulled back through the body's J^T."""
    h = h_fn()
    nb = len(body)
    dh = torch.stack([_jvp(h, body, v[:nb]) for v in dirs])
    dW = torch.stack([v[nb] for v in dirs])
    db = torch.stack([v[nb + 1] for v in dirs]) if len(head) == 2 else None
    bias = head[1].detach() if len(head) == 2 else None
    gh, gW, gb = linear_ce_ggn_product(h.detach(), head[0].detach(), bias, targets, dh, dW, db,
                                       ignore_index=IGN, reduction=reduction, **kw)
    out = []
    for j in range(len(dirs)):
        gbody = torch.autograd.grad(h, body, gh[j], retain_graph=True)
        out.append(list(gbody) + [gW[j]] + ([gb[j]] if gb is not None else []))
    return out


def _max_err(a, b) -> float:
    pairs = [(x, y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True)]
    return max((x - y).abs().max().item() for x, y in pairs)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("chunk", [1, 5, 100, None])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_autograd_ggn(k: int, chunk: int | None, reduction: str) -> None:
    body, head, h_fn, targets, g = _problem(13, seed=k + 7 * (chunk or 0))
    dirs = _directions(body + head, k, g)
    ref = _reference(body, head, h_fn, targets, dirs, reduction)
    got = _ours(body, head, h_fn, targets, dirs, reduction, chunk_tokens=chunk)
    scale = max(x.abs().max().item() for xs in ref for x in xs)
    assert scale > 1e-3
    assert _max_err(got, ref) <= 1e-12 * scale


@pytest.mark.parametrize("chunk", [2, 6])
def test_no_bias(chunk: int) -> None:
    body, head, h_fn, targets, g = _problem(11, seed=3, bias=False)
    dirs = _directions(body + head, 2, g)
    ref = _reference(body, head, h_fn, targets, dirs, "mean")
    got = _ours(body, head, h_fn, targets, dirs, "mean", chunk_tokens=chunk)
    assert all(len(x) == 4 for x in got)
    assert _max_err(got, ref) <= 1e-12 * max(x.abs().max().item() for xs in ref for x in xs)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_rows_ignored_gives_zeros(reduction: str) -> None:
    body, head, h_fn, targets, g = _problem(6, seed=4, ignore_all=True)
    dirs = _directions(body + head, 2, g)
    h = h_fn().detach()
    dh = torch.randn(2, 6, D, generator=g, dtype=torch.float64)
    gh, gW, gb, loss = linear_ce_ggn_product(
        h, head[0].detach(), head[1].detach(), targets, dh, torch.stack([v[3] for v in dirs]),
        torch.stack([v[4] for v in dirs]), ignore_index=IGN, reduction=reduction,
        chunk_tokens=4, return_loss=True)
    for t in (gh, gW, gb, loss):
        assert torch.isfinite(t).all() and bool((t == 0).all())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_matches_cross_entropy(reduction: str) -> None:
    body, head, h_fn, targets, g = _problem(13, seed=5)
    h = h_fn().detach()
    W, b = head[0].detach(), head[1].detach()
    out = linear_ce_ggn_product(h, W, b, targets, torch.zeros(1, 13, D, dtype=torch.float64),
                                torch.zeros(1, V, D, dtype=torch.float64), ignore_index=IGN,
                                reduction=reduction, chunk_tokens=4, return_loss=True)
    ref = F.cross_entropy(F.linear(h, W, b), targets, ignore_index=IGN, reduction=reduction)
    assert len(out) == 4 and abs(out[3].item() - ref.item()) <= 1e-13 * abs(ref.item())


def test_symmetric_and_psd() -> None:
    body, head, h_fn, targets, g = _problem(17, seed=6)
    dirs = _directions(body + head, 3, g)
    G = _ours(body, head, h_fn, targets, dirs, "mean", chunk_tokens=5)

    def dot(a, b):
        return sum((x * y).sum() for x, y in zip(a, b, strict=True)).item()
    size = max(abs(dot(dirs[i], G[i])) for i in range(3))
    for i in range(3):
        assert dot(dirs[i], G[i]) >= -1e-12 * size
        for j in range(i):
            assert abs(dot(dirs[i], G[j]) - dot(dirs[j], G[i])) <= 1e-12 * size


def _head_case(n, v, d, k, dt, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dt)  # noqa: E731
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::4] = IGN
    return mk(n, d), mk(v, d) * 0.5, mk(v), targets, mk(k, n, d), mk(k, v, d), mk(k, v)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_torch_composition(dt: torch.dtype) -> None:
    h, W, b, targets, dh, dW, db = _head_case(40, 50, 16, 2, dt, seed=8)
    mask = targets != IGN
    scale = 1.0 / mask.sum().double()
    f64 = [t.double() for t in (h, W, b, dh, dW, db)]
    # the fp64 oracle: the unchunked formula on the same (rounded) values
    u = f64[3] @ f64[1].T + f64[0] @ f64[4].mT + f64[5][:, None]
    q = ce_hessian_product_reference(F.linear(*f64[:3]), u, mask=mask, scale=scale)
    oracle = (q @ f64[1], q.mT @ f64[0], q.sum(1))
    # the same-dtype torch composition
    u = dh @ W.T + h @ dW.mT + db[:, None]
    q = ce_hessian_product_reference(F.linear(h, W, b), u, mask=mask, scale=scale)
    same = (q @ W, q.mT @ h, q.sum(1))
    got = linear_ce_ggn_product(h, W, b, targets, dh, dW, db, ignore_index=IGN, chunk_tokens=7)
    for name, o, s, x in zip(("gh", "gW", "gb"), oracle, same, got, strict=True):
        assert x.dtype == dt
        tol = 2 * torch.finfo(dt).eps * o.abs().max().item()
        err = (x.double() - o).abs().max().item()
        err_same = (s.double() - o).abs().max().item()
        assert err <= err_same + tol, f"{name}: {err:.3g} > {err_same:.3g} + {tol:.3g}"


class _Outputs(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_flatten(out)[0]
                        if isinstance(t, torch.Tensor)]
        return out


def _largest_intermediate(n: int, k: int, v: int, d: int, **kw) -> tuple[int, list]:
    h, W, b, targets, dh, dW, db = _head_case(n, v, d, k, torch.float64, seed=n)
    rec = _Outputs()
    with rec:
        linear_ce_ggn_product(h, W, b, targets, dh, dW, db, ignore_index=IGN,
                              return_loss=True, **kw)
    inner = [s for s in rec.shapes if s != (k, n, d)]        # all but the gh allocation
    return max(torch.Size(s).numel() for s in inner), rec.shapes


@pytest.mark.parametrize("kw,c", [({"chunk_tokens": 4}, 4),
                                  ({"chunk_bytes": 2 * 3 * 50 * 8}, 3)])
def test_extra_memory_independent_of_n(kw: dict, c: int) -> None:
    k, v, d = 2, 50, 3
    assert choose_chunk_tokens(1000, k, v, torch.float64, 2 * 3 * 50 * 8) == 3
    small, shapes = _largest_intermediate(30, k, v, d, **kw)
    large, shapes_large = _largest_intermediate(120, k, v, d, **kw)
    assert small == large                                      # nothing grows with N
    assert large <= max(k * c * v, k * v * d)                  # one chunk's [k, c, V] at most
    assert (k, c, v) in shapes_large                           # the chunk really is c rows
    assert not any(120 in s and v in s for s in shapes_large)  # never an [N, V] or [k, N, V]


@pytest.mark.parametrize("bad,match", [
    ({"h": torch.zeros(3, 4, 1)}, "h must be"),
    ({"weight": torch.zeros(7, 5)}, "weight must be"),
    ({"bias": torch.zeros(6)}, "bias must be"),
    ({"targets": torch.zeros(3)}, "targets must be"),
    ({"dh": torch.zeros(3, 4)}, "dh must be"),
    ({"dW": torch.zeros(2, 7, 4)}, "dW must be"),
    ({"db": torch.zeros(1, 6)}, "db must be"),
    ({"dh": torch.zeros(1, 3, 4, dtype=torch.float64)}, "dh has dtype"),
    ({"reduction": "none"}, "reduction"),
    ({"chunk_tokens": 0}, "chunk_tokens"),
    ({"backend": "cuda"}, "backend"),
    ({"bias": None}, "db was given"),
    ({"targets": torch.tensor([0, 9, 1]), "return_loss": True}, r"\[0, V\)"),
])
def test_bad_input_raises(bad: dict, match: str) -> None:
    args = dict(h=torch.zeros(3, 4), weight=torch.zeros(7, 4), bias=torch.zeros(7),
                targets=torch.tensor([0, 1, 2]), dh=torch.zeros(1, 3, 4),
                dW=torch.zeros(1, 7, 4), db=torch.zeros(1, 7))
    args.update(bad)
    with pytest.raises(ConfigurationError, match=match):
        linear_ce_ggn_product(**args)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        linear_ce_ggn_product(torch.zeros(3, 4), torch.zeros(7, 4), None,
                              torch.tensor([0, 1, 2]), torch.zeros(1, 3, 4),
                              torch.zeros(1, 7, 4), backend="triton")


INTERP_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    from hessfast.kernels.linear_ce import linear_ce_ggn_product as f

    failures, cases = [], 0
    g = torch.Generator().manual_seed(0)
    for dt, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        for k, chunk, bias, red in ((1, 3, True, "mean"), (3, 2, False, "sum"),
                                    (2, 100, True, "sum")):
            N, V, d = 7, 20, 5
            mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dt)
            t = torch.randint(0, V, (N,), generator=g)
            t[1::3] = -100
            args = (mk(N, d), mk(V, d), mk(V) if bias else None, t, mk(k, N, d), mk(k, V, d),
                    mk(k, V) if bias else None)
            kw = dict(reduction=red, chunk_tokens=chunk)
            tri = f(*args, backend="triton", **kw)
            ref = f(*[a.double() if a is not None and a.is_floating_point() else a
                      for a in args], backend="torch", **kw)
            for name, x, y in zip(("gh", "gW", "gb"), tri, ref):
                cases += 1
                if y is None:
                    if x is not None:
                        failures.append(f"{name} should be None")
                    continue
                err = (x.double() - y).abs().max().item()
                if x.dtype != dt or not err <= rtol * y.abs().max().item():
                    failures.append(f"{dt} k={k} chunk={chunk} {name}: err {err:.3g}")
    print(json.dumps({"cases": cases, "failures": failures}))
    """
)


def test_triton_row_kernel_under_interpreter() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", INTERP_SCRIPT], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cases"] == 18
    assert result["failures"] == [], "\n".join(result["failures"])
