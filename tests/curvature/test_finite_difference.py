"""``hvp_mode="finite_difference"`` (issue 18, part 2): central differences of two ordinary
gradients per vector, against the dense float64 Hessian by plain double backward.

* the step rule (:func:`hessfast.curvature.finitediff.fd_step`) and the error estimate;
* an MLP, a small CNN and tiny transformers GPT-2 and LLaMA from configs, float32 and float64:
  each product's relative error is within the recorded estimate ``H.fd_error``, which is
  small; ``lambda_max`` and a small SLQ density agree with the exact path's;
* the user's parameters bit for bit unchanged, ``.grad`` untouched;
* auto mode's fallback for custom ``autograd.Function`` s without a second derivative (a
  warning, ``H.hvp_mode_reason``), ``exact=True``'s refusal, the GGN's refusal;
* GPT-2 with its default SDPA attention: the finite-difference products run the fused CPU
  kernel (not the math backend) and agree with the exact Hessian within the estimate.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings

import pytest
import torch
from models import assert_same_state, make_cnn, make_mlp, rel_err, seeded, snapshot
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import hessfast as hf
from hessfast import errors
from hessfast.curvature.finitediff import (
    FD_STEP_CONSTANT,
    fd_error,
    fd_error_from_norms,
    fd_step,
)
from hessfast.testing import dense_hessian_reference

pytestmark = pytest.mark.usefixtures("single_thread", "no_leaking_global_state")

FD = "finite_difference"


# ---------------------------------------------------------------------------------------
# the step rule and the error estimate
# ---------------------------------------------------------------------------------------
def test_fd_step_scales_with_the_norms_and_the_dtype():
    e = fd_step(10.0, 1.0, torch.float32)
    assert e == pytest.approx(FD_STEP_CONSTANT * torch.finfo(torch.float32).eps ** (1 / 3) * 10)
    assert fd_step(10.0, 4.0, torch.float32) == pytest.approx(e / 4)  # e ||v|| is fixed
    assert fd_step(20.0, 1.0, torch.float32) == pytest.approx(2 * e)  # relative to ||theta||
    # a model at (or near) the origin: the floor, a finite positive step
    assert fd_step(0.0, 1.0, torch.float32) == fd_step(0.5, 1.0, torch.float32) > 0
    assert fd_step(0.0, 1.0, torch.float32) == pytest.approx(e / 10)
    # eps^(1/3): float64's step is (eps64 / eps32)^(1/3) ~ 1.2e-3 times float32's
    ratio = fd_step(10.0, 1.0, torch.float64) / e
    assert ratio == pytest.approx((2.0**-52 / 2.0**-23) ** (1 / 3))
    for low in (torch.bfloat16, torch.float16):  # coarse dtypes: larger, finite steps
        assert e < fd_step(10.0, 1.0, low) < 10.0
    assert fd_step(10.0, 1.0, torch.bfloat16) > fd_step(10.0, 1.0, torch.float16)


@pytest.mark.parametrize("args, match", [
    ((1.0, 0.0, torch.float32), "v_norm"),
    ((-1.0, 1.0, torch.float32), "theta_norm"),
    ((math.nan, 1.0, torch.float32), "theta_norm"),
    ((1.0, math.inf, torch.float32), "v_norm"),
    ((1.0, 1.0, torch.int64), "floating"),
])
def test_fd_step_refuses_bad_input(args, match):
    with pytest.raises(errors.ConfigurationError, match=match):
        fd_step(*args)


def test_fd_error_bounds_a_pure_truncation_and_a_pure_rounding_error():
    g = torch.Generator().manual_seed(0)
    exact, w = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g,
                                                                           dtype=torch.float64)
    e = 1e-2
    # truncation a e^2 w: the step-doubled difference is 3 a e^2 ||w||
    at_e, at_2e = exact + e**2 * w, exact + 4 * e**2 * w
    est = fd_error(at_e, at_2e, e, 0.0, torch.float64)
    truth = rel_err(at_e, exact)
    assert truth <= est <= 8 * truth
    # rounding-like noise k / e, independent at the two steps
    n1, n2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g,
                                                                            dtype=torch.float64)
    at_e, at_2e = exact + 1e-6 * n1, exact + 0.5e-6 * n2
    assert rel_err(at_e, exact) <= fd_error(at_e, at_2e, e, 0.0, torch.float64)
    # the gradient's rounding is a floor
    assert fd_error_from_norms(0.0, 1.0, 1e-3, 2.0, torch.float32) == pytest.approx(
        torch.finfo(torch.float32).eps * 2.0 / 1e-3)
    with pytest.raises(errors.ConfigurationError, match="shapes"):
        fd_error(exact, exact[:3], e, 1.0, torch.float64)


# ---------------------------------------------------------------------------------------
# models: MLP, CNN, tiny GPT-2 and LLaMA from configs
# ---------------------------------------------------------------------------------------
def _transformers():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - a broken torchvision: hide it from transformers
        sys.modules["torchvision"] = None
    tr = pytest.importorskip("transformers")
    tr.logging.set_verbosity_error()
    return tr


VOCAB, SEQ = 20, 6


def _lm_batch(size: int = 2, seed: int = 0, pad: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (size, SEQ), generator=g)
    mask = torch.ones(size, SEQ, dtype=torch.long)
    if pad:
        mask[-1, SEQ - 2:] = 0
        ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _build_lm(arch: str, dtype: torch.dtype, attn: str = "sdpa") -> nn.Module:
    tr = _transformers()
    common = {"vocab_size": VOCAB, "attn_implementation": attn, "bos_token_id": 0,
              "eos_token_id": 0, "pad_token_id": 0}
    with seeded(0):
        if arch == "gpt2":
            cfg = tr.GPT2Config(n_positions=8, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
                                embd_pdrop=0.0, attn_pdrop=0.0, **common)
            model = tr.GPT2LMHeadModel(cfg)
        else:
            cfg = tr.LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=8, **common)
            model = tr.LlamaForCausalLM(cfg)
            with torch.no_grad():  # RMSNorm weights start at 1: make them count
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.add_(0.3 * torch.randn_like(p))
    return model.to(dtype)


def model_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def _case(name: str, dtype: torch.dtype):
    """(model, loss_fn, data, float64 dense Hessian of the same parameters)."""
    if name == "mlp":
        model, loss_fn, data = make_mlp(dtype=dtype)
    elif name == "cnn":
        model, loss_fn, data = make_cnn(dtype=dtype)
    else:
        model, loss_fn, data = _build_lm(name, dtype), model_loss, [_lm_batch(), _lm_batch(3, 1)]
    # the same parameters and data in float64
    twin = copy.deepcopy(model).double()
    data64 = [b if isinstance(b, dict) else tuple(t.double() if t.is_floating_point() else t
                                                  for t in b) for b in data]
    # the transformers are initialised in float32 and cast: one reference serves both dtypes
    key = name if name in ("gpt2", "llama") else (name, dtype)
    if key not in _REFS:
        with sdpa_kernel(SDPBackend.MATH):
            _REFS[key] = dense_hessian_reference(twin, loss_fn, data64, symmetry_rtol=1e-5)
    return model, loss_fn, data, _REFS[key]


_REFS: dict = {}


_CASES: dict = {}


def _cached_case(name: str, dtype: torch.dtype):
    if (name, dtype) not in _CASES:
        _CASES[(name, dtype)] = _case(name, dtype)
    return _CASES[(name, dtype)]


# float64 models that compute in float64 throughout get float64's step and error
# (<= 1e-6); transformers upcast their LM loss (and LLaMA its RMSNorm) to float32, so their
# float64 models compute to float32's rounding (H.compute_dtype), as the float32 ones do.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt2", "llama"])
def test_products_within_the_recorded_error(name, dtype):
    model, loss_fn, data, ref = _cached_case(name, dtype)
    before = snapshot(model)
    H = hf.hessian(model, loss_fn, data, hvp_mode=FD)
    assert H.hvp_mode == FD and H.hvp_mode_reason == "requested"
    assert H.fd_step is not None and H.fd_error is not None  # measured at construction
    assert H.fd_kinks == []  # tanh, GELU, SiLU, softmax: no kinked function ran
    # measured: float64 ~1e-10, float32 2e-4 to 1.6e-3 (the estimate is conservative: the
    # products' true errors below were 1e-4 to 9e-4)
    bound = 1e-6 if H.compute_dtype == torch.float64 else 3e-3
    assert 0 < H.fd_error <= bound
    g = torch.Generator().manual_seed(7)
    V = torch.randn(3, H.shape[0], generator=g, dtype=torch.float64).to(H.dtype)
    HV = H.matmat(V)
    exact = V.double() @ ref
    for row, want in zip(HV, exact, strict=True):
        assert rel_err(row, want) <= H.fd_error
    assert H.num_matvecs == 3
    assert_same_state(model, before)


def test_kinked_functions_are_named_and_warned():
    """ReLU (as a module, a functional and a method) and max-pooling are seen in the loss's
    first finite-difference gradient: their kinks bias the products in a way ``fd_error``
    cannot see, so the operator lists them and warns; the exact path says nothing."""

    class Kinked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.act = nn.ReLU()
            self.fc = nn.Linear(12, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = nn.functional.max_pool2d(self.act(self.conv(x)), 2)
            return self.fc(h.flatten(1)).relu_() + self.fc(h.flatten(1))

    with seeded(3):
        model = Kinked().double()
        data = [(torch.randn(6, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,)))]
    before = snapshot(model)
    with pytest.warns(UserWarning, match=r"hessfast: the Hessian's loss runs max_pool2d, relu, "
                                         r"relu_, whose gradient jumps at a kink.*fd_kinks"):
        H = hf.hessian(model, nn.CrossEntropyLoss(), data, hvp_mode=FD)
    assert H.fd_kinks == ["max_pool2d", "relu", "relu_"]
    assert_same_state(model, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        E = hf.hessian(model, nn.CrossEntropyLoss(), data)
        E.matmat(torch.ones(1, E.shape[0], dtype=torch.float64))
    assert E.hvp_mode != FD and E.fd_kinks is None


@pytest.mark.parametrize("name, dtype", [("mlp", torch.float64), ("gpt2", torch.float32)])
def test_lambda_max_and_density_agree_with_the_exact_path(name, dtype):
    model, loss_fn, data, ref = _cached_case(name, dtype)
    H = hf.hessian(model, loss_fn, data, hvp_mode=FD)
    E = hf.hessian(model, loss_fn, data)
    assert E.hvp_mode != FD
    top = float(torch.linalg.eigvalsh(ref)[-1])
    tol = 1e-6 if H.compute_dtype == torch.float64 else 1e-3
    assert abs(hf.lambda_max(H, tol=tol, progress=False) - top) <= 4 * tol * abs(top)
    # the same probes on both operators: the densities' moments differ by the FD error
    kw = {"num_probes": 2, "num_steps": 12, "seed": 3, "progress": False}
    fd_sd, ex_sd = hf.spectral_density(H, **kw), hf.spectral_density(E, **kw)
    for p in (1, 2, 3):
        a, b = fd_sd.moments(p), ex_sd.moments(p)
        assert abs(a - b) <= 10 * H.fd_error * p * abs(b) + 1e-12, (p, a, b)


def test_parameters_and_grads_bit_for_bit_unchanged():
    model, loss_fn, data = make_mlp(dtype=torch.float32)
    with seeded(5):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
    grads = [p.grad for p in model.parameters()]
    V = torch.randn(4, sum(p.numel() for p in model.parameters()))
    before = snapshot(model)
    bits = [p.detach().clone().view(torch.int32) for p in model.parameters()]
    versions = [p._version for p in model.parameters()]
    H = hf.hessian(model, loss_fn, data, hvp_mode=FD)
    H.matmat(V)
    assert_same_state(model, before)
    for p, b, ver, gr in zip(model.parameters(), bits, versions, grads, strict=True):
        assert torch.equal(p.detach().view(torch.int32), b)
        assert p._version == ver  # never written in place (not even added to and restored)
        assert p.grad is gr


def test_zero_rows_and_the_symmetry_check_within_the_error():
    model, loss_fn, data = make_mlp(dtype=torch.float64)
    H = hf.hessian(model, loss_fn, data, hvp_mode=FD)
    V = torch.zeros(2, H.shape[0], dtype=torch.float64)
    V[1, 0] = 1.0
    HV = H.matmat(V)
    assert torch.equal(HV[0], torch.zeros_like(HV[0]))
    assert H._symmetry is not None and H._symmetry.relative_error == H.fd_error


# ---------------------------------------------------------------------------------------
# auto mode: finite differences only when no exact second derivative exists
# ---------------------------------------------------------------------------------------
class _OnceTanh(torch.autograd.Function):
    """tanh whose backward is marked ``once_differentiable`` (no double backward)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _FlatTanh(torch.autograd.Function):
    """tanh whose backward is computed outside autograd (a fused kernel's backward)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        with torch.no_grad():
            return g * (1 - y * y)


class _Act(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return torch.tanh(x) if self.fn is None else self.fn.apply(x)


def _custom_mlp(fn, dtype=torch.float64):
    with seeded(11):
        model = nn.Sequential(nn.Linear(4, 6), _Act(fn), nn.Linear(6, 3)).to(dtype)
        X, Y = torch.randn(12, 4, dtype=dtype), torch.randint(0, 3, (12,))
    return model, nn.CrossEntropyLoss(), [(X[:7], Y[:7]), (X[7:], Y[7:])]


@pytest.mark.parametrize("fn", [_OnceTanh, _FlatTanh], ids=["once_differentiable", "flat"])
def test_auto_falls_back_to_finite_differences_without_a_second_derivative(fn):
    model, loss_fn, data = _custom_mlp(fn)
    plain, _, _ = _custom_mlp(None)  # the same function with torch.tanh: the reference
    ref = dense_hessian_reference(plain, loss_fn, data)
    before = snapshot(model)
    with pytest.warns(UserWarning, match=r"^hessfast: .*no exact second derivative"):
        H = hf.hessian(model, loss_fn, data)
        HV = H.matmat(torch.eye(H.shape[0], dtype=torch.float64)[:3])
    assert H.hvp_mode == FD
    assert "no exact second derivative" in H.hvp_mode_reason
    assert fn.__name__ in H.hvp_mode_reason or "once_differentiable" in H.hvp_mode_reason
    assert H.fd_error is not None and H.fd_error <= 1e-6
    assert rel_err(HV, ref[:3]) <= H.fd_error
    assert_same_state(model, before)
    # explicitly: the same products, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F = hf.hessian(model, loss_fn, data, hvp_mode=FD)
        assert rel_err(F.matmat(torch.eye(F.shape[0], dtype=torch.float64)[:3]), ref[:3]) \
            <= F.fd_error


@pytest.mark.parametrize("fn", [_OnceTanh, _FlatTanh], ids=["once_differentiable", "flat"])
def test_exact_true_refuses_instead_of_falling_back(fn):
    model, loss_fn, data = _custom_mlp(fn)
    with pytest.raises(errors.UnsupportedModelError, match="exact=True"):
        H = hf.hessian(model, loss_fn, data, exact=True)
        H.matmat(torch.eye(H.shape[0], dtype=torch.float64)[:1])
    if fn is _OnceTanh:  # the GGN has no finite-difference path: auto refuses
        with pytest.raises(errors.UnsupportedModelError, match="no usable second derivative"):
            hf.ggn(model, loss_fn, data)


def test_auto_stays_exact_where_an_exact_path_works():
    model, loss_fn, data = make_mlp(dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        H = hf.hessian(model, loss_fn, data)
        H.matmat(torch.randn(2, H.shape[0]))
    assert H.hvp_mode != FD and H.fd_error is None


def test_configuration_errors():
    model, loss_fn, data = make_mlp(dtype=torch.float64)
    with pytest.raises(errors.ConfigurationError, match="exact=True"):
        hf.hessian(model, loss_fn, data, hvp_mode=FD, exact=True)
    with pytest.raises(errors.ConfigurationError, match="a finite difference of gradients"):
        hf.ggn(model, loss_fn, data, hvp_mode=FD)
    with pytest.raises(errors.ConfigurationError, match="exact must be True or False"):
        hf.hessian(model, loss_fn, data, exact="yes")


def test_an_asymmetric_backward_is_still_caught():
    """A custom Function whose backward is not a gradient (M w with M asymmetric): its
    finite differences are M, and the symmetry check, widened by fd_error only, refuses."""
    M = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 3.0]], dtype=torch.float64)

    class Skewed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            ctx.save_for_backward(w)
            return 0.5 * (w * w).sum()

        @staticmethod
        def backward(ctx, g):
            (w,) = ctx.saved_tensors
            return g * (M @ w)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64))

        def forward(self, x):
            return Skewed.apply(self.w) + 0.0 * x.sum()

    H = hf.hessian(Model(), lambda model, x: model(x), torch.zeros(2, 1, dtype=torch.float64),
                   hvp_mode=FD)
    with pytest.raises(errors.AsymmetricOperatorError):
        H.matmat(torch.eye(3, dtype=torch.float64)[:2])


# ---------------------------------------------------------------------------------------
# fused attention runs on this path
# ---------------------------------------------------------------------------------------
class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def test_gpt2_with_default_sdpa_runs_the_fused_kernel():
    model = _build_lm("gpt2", torch.float32)
    data = [_lm_batch(2, 0, pad=False), _lm_batch(3, 1, pad=False)]
    with _Ops() as setup_ops:  # the pre-flight and the error's measurement: fused, too
        H = hf.hessian(model, model_loss, data, hvp_mode=FD)
    assert any("flash" in n for n in setup_ops.names)
    assert not any("math" in n for n in setup_ops.names if "scaled_dot_product" in n)
    E = hf.hessian(model, model_loss, data, hvp_mode="double_backward")
    V = torch.randn(2, H.shape[0], generator=torch.Generator().manual_seed(1))
    with _Ops() as fd_ops:
        HV = H.matmat(V)
    with _Ops() as exact_ops:
        EV = E.matmat(V)
    fused = {n for n in fd_ops.names if "scaled_dot_product" in n and "math" not in n}
    assert fused, sorted(n for n in fd_ops.names if "attention" in n)
    assert not {n for n in exact_ops.names if "flash" in n or "efficient" in n}
    for a, b in zip(HV, EV, strict=True):
        assert rel_err(a, b) <= H.fd_error


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Linear head + cross-entropy in one Function, as Liger's and Cut Cross-Entropy's fused
    losses: the gradients are computed in the forward (no second derivative through them)."""

    @staticmethod
    def forward(ctx, h, weight, labels):
        logits = h @ weight.T
        keep = labels != -100
        loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
        g = torch.softmax(logits, dim=-1)
        g[keep, labels[keep]] -= 1
        g = g * keep.unsqueeze(1) / keep.sum()
        ctx.save_for_backward(g @ weight, g.T @ h)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_weight = ctx.saved_tensors
        return grad_loss * grad_h, grad_loss * grad_weight, None


def _fused_lm_loss(model, batch):
    h = model.transformer(input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"]).last_hidden_state
    h = h[:, :-1].reshape(-1, h.shape[-1])
    return _FusedLinearCrossEntropy.apply(h, model.lm_head.weight,
                                          batch["labels"][:, 1:].reshape(-1))


def test_fused_linear_cross_entropy_falls_back_to_the_right_hessian():
    """A fused LM loss (its Hessian silently wrong by double backward, refused by the
    pre-flight) gets the true Hessian in auto mode, by finite differences."""
    _, _, data, ref = _cached_case("gpt2", torch.float32)
    model = _build_lm("gpt2", torch.float32)
    with pytest.warns(UserWarning, match="hessfast: .*_FusedLinearCrossEntropy"):
        H = hf.hessian(model, _fused_lm_loss, data)
        V = torch.randn(2, H.shape[0], generator=torch.Generator().manual_seed(2))
        HV = H.matmat(V)
    assert H.hvp_mode == FD and "_FusedLinearCrossEntropy" in H.hvp_mode_reason
    for row, want in zip(HV, V.double() @ ref, strict=True):
        assert rel_err(row, want) <= H.fd_error <= 3e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_parameters_are_coarse_and_say_so(dtype):
    """Rounding theta +- e v to bf16/fp16 costs about eps^(2/3) / c relative: the products
    stay within the recorded error, which is large, and a warning says so (measured on
    this MLP: bf16 errors 0.32-0.47 against an estimate of 1.8; fp16 0.08-0.15 against 0.58)."""
    model, loss_fn, data = make_mlp(dtype=torch.float32)
    ref = dense_hessian_reference(copy.deepcopy(model).double(), loss_fn,
                                  [(x.double(), y) for x, y in data])
    low = copy.deepcopy(model).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float16's own warning
        with pytest.warns(UserWarning, match=f"hessfast: the finite-difference.*{dtype}"):
            H = hf.hessian(low, loss_fn, [(x.to(dtype), y) for x, y in data], hvp_mode=FD)
        V = torch.randn(3, H.shape[0], generator=torch.Generator().manual_seed(0))
        HV = H.matmat(V)
    assert HV.dtype == torch.float32 and H.fd_error > 0.05
    for row, want in zip(HV, V.double() @ ref, strict=True):
        assert rel_err(row, want) <= H.fd_error


class _Distances(nn.Module):
    """Distances to 4 centres, then a linear layer: by ``torch.cdist`` (whose backward has
    no derivative, nor its forward a forward-mode one, in torch 2.13) or written out."""

    def __init__(self, cdist: bool) -> None:
        super().__init__()
        with seeded(4):
            self.centres = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
            self.head = nn.Linear(4, 2).double()
        self.cdist = cdist

    def forward(self, x):
        if self.cdist:
            d = torch.cdist(x, self.centres)
        else:
            d = (x[:, None, :] - self.centres[None]).pow(2).sum(-1).sqrt()
        return self.head(d)


def _cdist_twice_differentiable() -> bool:
    """Whether this torch differentiates ``cdist``'s backward (torch 2.13 raises
    "derivative for aten::_cdist_backward is not implemented"; 2.14 does not)."""
    a = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(torch.cdist(a, a.detach() + 1.0).sum(), a, create_graph=True)
    try:
        torch.autograd.grad(g.sum(), a)
    except RuntimeError:
        return False
    return True


def test_a_kernel_without_double_backward_falls_back_at_the_first_product():
    if _cdist_twice_differentiable():
        pytest.skip("this torch differentiates cdist twice: the exact path runs, nothing to "
                    "fall back from (the once_differentiable tests cover the fallback)")
    with seeded(6):
        x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    ref = dense_hessian_reference(_Distances(cdist=False), nn.CrossEntropyLoss(), (x, y))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*")  # torch's own
        H = hf.hessian(_Distances(cdist=True), nn.CrossEntropyLoss(), (x, y))
        assert H.fd_error is None  # the pre-flight's graph builds: the products tell
        with pytest.warns(UserWarning, match="hessfast: .*_cdist_backward"):
            HV = H.matmat(torch.eye(H.shape[0], dtype=torch.float64)[:4])
        assert H.hvp_mode == FD and "_cdist_backward" in H.hvp_mode_reason
        assert rel_err(HV, ref[:4]) <= H.fd_error <= 1e-6
        E = hf.hessian(_Distances(cdist=True), nn.CrossEntropyLoss(), (x, y), exact=True)
        with pytest.raises(errors.UnsupportedModelError, match=r"(?s)_cdist_backward.*exact=True"):
            E.matmat(torch.eye(E.shape[0], dtype=torch.float64)[:1])


# -- the symmetry probe of coarse products keeps its pair in bfloat16 -------------------------
@pytest.mark.parametrize("error, kept", [(0.0, torch.float32), (1e-4, torch.float32),
                                         (0.02, torch.bfloat16)])
def test_symmetry_probe_keeps_coarse_products_in_bfloat16_and_still_catches_asymmetry(
        error, kept):
    from hessfast.curvature.preflight import SymmetryProbe

    gen = torch.Generator().manual_seed(0)
    n = 40
    B = torch.randn(n, n, generator=gen)
    S = B + B.T  # symmetric
    # an antisymmetric part as large as S: beyond even the coarse products' tolerance
    # (4 x 0.02 of ||u|| ||Hv||, against |u.Hv - v.Hu| ~ ||u|| ||Hv|| / sqrt(n) here)
    skew = (B - B.T) * 2.0
    u, v = torch.randn(2, n, generator=gen)
    for M, ok in ((S, True), (S + skew, False)):
        probe = SymmetryProbe("Hessian", torch.float32)
        probe.relative_error = error
        probe.observe(u[None], (M @ u)[None])
        assert probe._first is not None and probe._first[0].dtype == kept
        if ok:
            probe.observe(v[None], (M @ v)[None])
            assert probe.done
        else:
            with pytest.raises(errors.AsymmetricOperatorError):
                probe.observe(v[None], (M @ v)[None])
