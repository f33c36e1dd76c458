"""Real transformers out of the box (issue 9, section 1): GPT-2, a LLaMA-style model (RMSNorm,
rotary, SwiGLU, grouped-query attention) and BERT with a classification head, built from tiny
configs (no downloads) in float64, each with its own ``.loss`` through ``loss_fn(model,
batch)`` on dict batches with padding (``attention_mask`` 0, ``labels`` -100 there).

The oracles are dense float64 references from plain double backward (Hessian) and from an
explicit Jacobian and loss Hessian (GGN), computed under SDPA's math backend, the only one
autograd can differentiate twice. transformers runs pieces in float32 inside a float64 model
(LLaMA's RMSNorm, the causal-LM loss's ``logits.float()``), so tolerances follow the
operator's ``compute_dtype``, which the pre-flight measures.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from models import rel_err, seeded
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hessfast as hf
from hessfast import errors
from hessfast.testing import dense_hessian_reference


def _import_transformers():
    """transformers, or skip. A torchvision built for another torch (a CUDA wheel beside a
    CPU torch: "operator torchvision::nms does not exist") fails at import and takes
    transformers' model classes down with it; transformers treats an absent torchvision as
    optional, so a broken one is hidden from it (None in sys.modules reads as absent)."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - any failure: the package is unusable
        sys.modules["torchvision"] = None
    return pytest.importorskip("transformers")


transformers = _import_transformers()
transformers.logging.set_verbosity_error()

pytestmark = pytest.mark.usefixtures("single_thread", "no_leaking_global_state")

VOCAB, SEQ = 20, 6
ARCHS = ("gpt2", "llama", "bert")


def _batch(arch: str, size: int = 2, seed: int = 0) -> dict:
    """A tokenizer-style batch: the last sequence padded by 2 tokens (mask 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (size, SEQ), generator=g)
    mask = torch.ones(size, SEQ, dtype=torch.long)
    mask[-1, SEQ - 2 :] = 0
    ids[mask == 0] = 0
    if arch == "bert":
        labels = torch.arange(size) % 2
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _build(arch: str, attn: str = "sdpa", dtype: torch.dtype = torch.float64) -> nn.Module:
    common = {"vocab_size": VOCAB, "attn_implementation": attn, "bos_token_id": 0,
              "eos_token_id": 0, "pad_token_id": 0}
    with seeded(0):
        if arch == "gpt2":
            cfg = transformers.GPT2Config(
                n_positions=8, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
                embd_pdrop=0.0, attn_pdrop=0.0, **common,
            )
            model = transformers.GPT2LMHeadModel(cfg)
        elif arch == "llama":
            cfg = transformers.LlamaConfig(
                hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8,
                **common,
            )
            model = transformers.LlamaForCausalLM(cfg)
            with torch.no_grad():  # RMSNorm weights start at 1: make them count
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.add_(0.3 * torch.randn_like(p))
        else:
            cfg = transformers.BertConfig(
                hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=16, max_position_embeddings=8, num_labels=2,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common,
            )
            model = transformers.BertForSequenceClassification(cfg)
    return model.to(dtype)


def model_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's own loss (transformers shifts causal-LM labels and ignores -100)."""
    return model(**batch).loss


def _tol(dtype: torch.dtype) -> float:
    """Relative tolerance for two computations of the same curvature in ``dtype``."""
    return 1e-9 if dtype == torch.float64 else 1e-4


_REFS: dict = {}


def _hessian_ref(arch: str) -> torch.Tensor:
    """The dense Hessian of the model's own loss (built once per architecture)."""
    if arch not in _REFS:
        model, batch = _build(arch), _batch(arch)
        with sdpa_kernel(SDPBackend.MATH):
            # symmetric to float32's rounding only: float32 pieces inside (LLaMA's RMSNorm)
            _REFS[arch] = dense_hessian_reference(model, model_loss, batch,
                                                  loss_form="model", symmetry_rtol=1e-6)
    return _REFS[arch]


# ---------------------------------------------------------------------------------------
# the Hessian of the model's own loss
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_hessian_equals_dense_reference(arch, attn):
    """Both attention implementations, padding and -100 labels: the operator is the dense
    double-backward Hessian; tied parameters (GPT-2's wte and lm_head) count once."""
    model = _build(arch, attn)
    H = hf.hessian(model, model_loss, _batch(arch))
    unique = {id(p): p for p in model.parameters()}
    assert H.shape[0] == sum(p.numel() for p in unique.values())
    if arch == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight
        assert "transformer.wte.weight" in H.param_names
        assert "lm_head.weight" not in H.param_names
    # transformers upcasts the LM loss's logits and LLaMA's RMSNorm to float32
    expected = torch.float64 if arch == "bert" else torch.float32
    assert H.compute_dtype == expected
    D = H.to_dense()
    assert rel_err(D, _hessian_ref(arch)) <= _tol(H.compute_dtype)
    assert H.hvp_mode == "reuse_graph"


@pytest.mark.parametrize("mode", ["double_backward", "fwd_rev"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_product_path_equals_dense_reference(arch, mode):
    """Double backward and forward-over-reverse (torch.func through the math SDPA backend)
    agree with the reference to the precision the model computes in."""
    H = hf.hessian(_build(arch), model_loss, _batch(arch), hvp_mode=mode)
    V = torch.randn(3, H.shape[0], generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    assert rel_err(H.matmat(V), V @ _hessian_ref(arch)) <= _tol(H.compute_dtype)
    if arch != "bert":
        G = hf.ggn(_build(arch), None, _batch(arch), causal_lm=True, hvp_mode=mode)
        ref = hf.ggn(_build(arch), None, _batch(arch), causal_lm=True, hvp_mode="reuse_graph")
        assert rel_err(G.matmat(V), ref.matmat(V)) <= 1e-12


@pytest.mark.parametrize("arch", ARCHS)
def test_eigsh_top_k_matches_eigh(arch):
    H = hf.hessian(_build(arch), model_loss, _batch(arch))
    res = hf.eigsh(H, k=3, which="LA", tol=1e-6)
    assert bool(res.converged.all())
    expected = torch.linalg.eigvalsh(_hessian_ref(arch)).flip(0)[:3]
    scale = expected.abs().max()
    assert (res.eigenvalues - expected).abs().max() <= 1e-5 * scale


def test_float64_llama_with_float32_inside_is_accepted():
    """A float64 LLaMA runs its RMSNorm in float32: its products are symmetric to float32's
    rounding (u.(Hv) and v.(Hu) equal to about 7 digits), which the pre-flight used to
    refuse as "not symmetric" with float64 tolerances."""
    H = hf.hessian(_build("llama"), model_loss, _batch("llama"))
    assert H.param_dtype == torch.float64 and H.compute_dtype == torch.float32
    g = torch.Generator().manual_seed(3)
    V = torch.randn(2, H.shape[0], generator=g, dtype=torch.float64)
    HV = H.matmat(V)  # the first two vectors: the symmetry probe runs here
    assert H._symmetry is not None and H._symmetry.done
    u_hv, v_hu = float(V[0] @ HV[1]), float(V[1] @ HV[0])
    assert u_hv != v_hu and abs(u_hv - v_hu) <= 1e-5 * abs(u_hv)


_M = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 3.0]], dtype=torch.float64)


class _SkewedGradient(torch.autograd.Function):
    """Forward 0.5 ||w||^2, backward ``M w`` (not a gradient: its Jacobian is asymmetric)."""

    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return 0.5 * (w * w).sum()

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g * (_M.to(w.dtype) @ w)


class _Float32Inside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64))

    def forward(self, x):
        return _SkewedGradient.apply(self.w.float()).double() + 0.0 * x.sum()


def test_asymmetric_operator_still_caught_at_float32_precision():
    """Looser tolerances for a model computing in float32 still catch a real asymmetry, and
    the error says which precision it allowed for."""
    model = _Float32Inside()
    H = hf.hessian(model, lambda model, x: model(x), torch.zeros(2, 1, dtype=torch.float64))
    assert H.compute_dtype == torch.float32
    with pytest.raises(errors.AsymmetricOperatorError, match="rounding of torch.float32"):
        H.matmat(torch.eye(3, dtype=torch.float64)[:2])


# ---------------------------------------------------------------------------------------
# the GGN of a language model in one call, and of a classifier
# ---------------------------------------------------------------------------------------
def _dense_ggn(model, batches, outputs, targets, criterion) -> torch.Tensor:
    """``sum_b (B_b / N) J_b^T H_b J_b`` by hand: J the explicit Jacobian of the flattened
    outputs (one backward per entry), H the explicit Hessian of the criterion."""
    params = list(model.parameters())  # tied parameters once, in named_parameters order
    sizes = [len(b["input_ids"]) for b in batches]
    total = sum(sizes)
    n = sum(p.numel() for p in params)
    G = torch.zeros(n, n, dtype=torch.float64)
    model.eval()
    with sdpa_kernel(SDPBackend.MATH):
        for batch, size in zip(batches, sizes, strict=True):
            out = outputs(model, batch)
            flat = out.reshape(-1)
            J = torch.stack([
                torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in
                           zip(torch.autograd.grad(flat[j], params, retain_graph=True,
                                                   allow_unused=True), params, strict=True)])
                for j in range(flat.numel())
            ]).double()
            o = out.detach().requires_grad_(True)
            (go,) = torch.autograd.grad(criterion(o, targets(batch)), o, create_graph=True)
            go = go.reshape(-1)
            Ho = torch.stack([torch.autograd.grad(go[j], o, retain_graph=True)[0].reshape(-1)
                              for j in range(go.numel())]).double()
            G += (size / total) * (J.T @ Ho @ J)
    return G


def _next_token_logits(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1].reshape(-1, logits.shape[-1])


def _next_token_labels(batch):
    return batch["labels"][:, 1:].reshape(-1)


def _token_mean_ce(logits, labels):
    return F.cross_entropy(logits, labels, ignore_index=-100)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_lm_ggn_equals_dense_ggn_and_is_psd(arch):
    """``hf.ggn(model, None, batches, causal_lm=True)``: next-token cross-entropy, the shift
    and ignore_index=-100 honoured, two batches of unequal size weighted by sequences."""
    model = _build(arch)
    batches = [_batch(arch), _batch(arch, size=1, seed=1)]
    G = hf.ggn(model, None, batches, causal_lm=True)
    D = G.to_dense()
    ref = _dense_ggn(model, batches, _next_token_logits, _next_token_labels, _token_mean_ce)
    assert rel_err(D, ref) <= _tol(G.compute_dtype)
    evals = torch.linalg.eigvalsh(0.5 * (D + D.T))
    assert evals[0] >= -1e-6 * evals[-1]
    # the same operator, spelled out with the documented lambdas
    spelled = hf.ggn(model, nn.CrossEntropyLoss(), batches, outputs=_next_token_logits,
                     targets=_next_token_labels)
    V = torch.randn(3, G.shape[0], generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    assert rel_err(spelled.matmat(V), G.matmat(V)) <= 1e-12


def test_causal_lm_hessian_is_the_model_loss_hessian():
    """``causal_lm=True`` computes the loss transformers' GPT-2 computes (the shift, -100
    ignored, the mean over tokens), in float64 where transformers upcasts to float32."""
    model, batch = _build("gpt2"), _batch("gpt2")
    H = hf.hessian(model, None, batch, causal_lm=True)
    assert H.compute_dtype == torch.float64  # no upcast in hessfast's criterion
    assert rel_err(H.to_dense(), _hessian_ref("gpt2")) <= 1e-5


def test_classifier_ggn_names_the_targets():
    """BERT with a classification head: the GGN with the default outputs (the logits of
    the model called without its labels) and the labels as targets."""
    model, batch = _build("bert"), _batch("bert")
    G = hf.ggn(model, nn.CrossEntropyLoss(), batch, targets=lambda b: b["labels"])
    assert G.loss_form == "criterion" and "targets=" in G.loss_form_reason
    D = G.to_dense()

    def logits(model, b):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    ref = _dense_ggn(model, [batch], logits, lambda b: b["labels"], F.cross_entropy)
    assert rel_err(D, ref) <= 1e-9
    evals = torch.linalg.eigvalsh(0.5 * (D + D.T))
    assert evals[0] >= -1e-9 * evals[-1]


def test_named_outputs_errors():
    model, batch = _build("gpt2"), _batch("gpt2")
    with pytest.raises(errors.ArgumentTypeError, match="causal_lm=True"):
        hf.ggn(model, None, batch)
    with pytest.raises(errors.ConfigurationError, match="loss_form='model'"):
        hf.ggn(model, nn.CrossEntropyLoss(), batch, loss_form="model", causal_lm=True)
    with pytest.raises(errors.ConfigurationError, match="causal_lm=True"):
        hf.ggn(model, model_loss, batch)  # a loss_fn(model, batch) cannot be split
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(errors.BatchError, match="targets="):
        hf.ggn(model, nn.CrossEntropyLoss(), no_labels, causal_lm=True)


# ---------------------------------------------------------------------------------------
# checkpointing, bfloat16, torch.compile
# ---------------------------------------------------------------------------------------
def test_activation_checkpointing_non_reentrant():
    """transformers' activation checkpointing (use_reentrant=False; active in training mode
    only, so bn_mode="as_is" on a model in train() with dropout 0): the same operator."""
    batch = _batch("gpt2")
    ref = hf.hessian(_build("gpt2"), model_loss, batch).to_dense()
    model = _build("gpt2")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the new name)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    calls = Counter()
    for layer in model.transformer.h:  # count that the checkpoint really runs
        inner = layer._gradient_checkpointing_func

        def counted(*args, _inner=inner, **kwargs):
            calls["checkpoint"] += 1
            return _inner(*args, **kwargs)

        layer._gradient_checkpointing_func = counted
    model.train()
    for mode in ("auto", "double_backward"):
        H = hf.hessian(model, model_loss, batch, bn_mode="as_is", hvp_mode=mode)
        assert rel_err(H.to_dense(), ref) <= 1e-12
    assert calls["checkpoint"] > 0


def test_bfloat16_gpt2_eigsh_close_to_float32():
    """A bfloat16 model: products in bfloat16, the basis and coefficients in float32; the
    top eigenvalue is finite and within bfloat16's accuracy of the float32 model's (with
    the same, bfloat16-rounded, parameters)."""
    batch = _batch("gpt2")
    model16 = _build("gpt2", dtype=torch.float32).to(torch.bfloat16)
    model32 = _build("gpt2", dtype=torch.float32)
    model32.load_state_dict({k: v.float() for k, v in model16.state_dict().items()})
    H16 = hf.hessian(model16, model_loss, batch)
    assert H16.dtype == torch.float32 and H16.compute_dtype == torch.bfloat16
    top16 = hf.eigsh(H16, k=1, tol=1e-2, seed=0)
    top32 = hf.eigsh(hf.hessian(model32, model_loss, batch), k=1, tol=1e-4, seed=0)
    assert top16.eigenvectors.dtype == torch.float32
    lam16, lam32 = float(top16.eigenvalues[0]), float(top32.eigenvalues[0])
    assert torch.isfinite(torch.tensor(lam16))
    assert abs(lam16 - lam32) <= 0.05 * abs(lam32)


def test_compiled_models_run_eagerly():
    """A torch.compile'd model is unwrapped to its _orig_mod (one warning, names without
    the prefix); compiled submodules and Module.compile() run eagerly; same operator."""
    model, batch = _build("gpt2"), _batch("gpt2")
    V = torch.randn(2, sum(p.numel() for p in model.parameters()),
                    generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = hf.hessian(model, model_loss, batch).matmat(V)
    with pytest.warns(UserWarning, match="torch.compile'd"):
        H = hf.hessian(torch.compile(model), model_loss, batch)
    assert not any("_orig_mod" in name for name in H.param_names)
    assert rel_err(H.matmat(V), expected) <= 1e-12

    model.transformer.h[0].mlp = torch.compile(model.transformer.h[0].mlp)
    H = hf.hessian(model, model_loss, batch)
    assert rel_err(H.matmat(V), expected) <= 1e-12
    other = _build("gpt2")
    other.compile()
    assert rel_err(hf.hessian(other, model_loss, batch).matmat(V), expected) <= 1e-12


# ---------------------------------------------------------------------------------------
# fused losses and kernels without a second derivative
# ---------------------------------------------------------------------------------------
class FusedLinearCrossEntropy(torch.autograd.Function):
    """Linear head + cross-entropy in one Function, as Liger's and Cut Cross-Entropy's
    fused losses: the gradients are computed in the forward, the backward only rescales
    them, so they carry no graph and a second backward sees constants."""

    @staticmethod
    def forward(ctx, h, weight, labels):
        logits = h @ weight.T
        keep = labels != -100
        loss = F.cross_entropy(logits, labels, ignore_index=-100)
        g = torch.softmax(logits, dim=-1)
        g[keep, labels[keep]] -= 1
        g = g * keep.unsqueeze(1) / keep.sum()
        ctx.save_for_backward(g @ weight, g.T @ h)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_weight = ctx.saved_tensors
        return grad_loss * grad_h, grad_loss * grad_weight, None


def fused_lm_loss(model, batch):
    """GPT-2's loss with its lm_head patched by the fused loss (what a Liger patch does)."""
    h = model.transformer(input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"]).last_hidden_state
    h = h[:, :-1].reshape(-1, h.shape[-1])
    return FusedLinearCrossEntropy.apply(h, model.lm_head.weight, _next_token_labels(batch))


def test_fused_linear_cross_entropy_refused():
    model, batch = _build("gpt2"), _batch("gpt2")
    # the fused loss has the right value and gradient: only its curvature is wrong
    with torch.no_grad():
        assert float(fused_lm_loss(model, batch)) == pytest.approx(
            float(model_loss(model, batch)), rel=1e-6
        )
    unchecked = hf.hessian(model, fused_lm_loss, batch, check=False)
    V = torch.randn(2, unchecked.shape[0], generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    assert rel_err(unchecked.matmat(V), V @ _hessian_ref("gpt2")) > 0.1  # silently wrong
    with pytest.raises(errors.UnsupportedModelError,
                       match=r"FusedLinearCrossEntropy.*(?s:.*)linear-cross-entropy"
                             r"(?s:.*)plain head"):
        # exact=True: auto mode would fall back to finite differences (issue 18)
        hf.hessian(model, fused_lm_loss, batch, exact=True)
    with pytest.raises(errors.UnsupportedModelError, match="FusedLinearCrossEntropy"):
        hf.hessian(model, fused_lm_loss, batch, hvp_mode="double_backward")


class _DetachedTanh(torch.autograd.Function):
    """tanh whose backward is computed outside autograd, as a fused kernel's is."""

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


class _RoundGrad(torch.autograd.Function):
    """Rounding with a zero derivative: constant (zero) gradients are right here."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g)


def test_custom_function_with_a_non_differentiable_backward_refused():
    with seeded(0):
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))

    def loss(model, batch):
        x, y = batch
        return F.cross_entropy(model[1](_DetachedTanh.apply(model[0](x))), y)

    with pytest.raises(errors.UnsupportedModelError, match="_DetachedTanh.*fused"):
        hf.hessian(model, loss, (x, y), loss_form="model", exact=True)

    def rounded(model, batch):  # a zero derivative is not a missing one
        x, y = batch
        h = model[0](x)
        return F.cross_entropy(model[1](torch.tanh(h) + _RoundGrad.apply(h)), y)

    H = hf.hessian(model, rounded, (x, y), loss_form="model")
    assert H.shape[0] == 26


class _LossModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, batch):
        x, y = batch
        return F.cross_entropy(torch.tanh(self.lin(x)), y)


def test_full_backward_hook_on_the_loss_is_not_refused():
    """A full backward hook wraps the module's output in torch's BackwardHookFunction, whose
    backward passes the (here constant) gradient through unchanged: the identity, whose
    second derivative is zero, not a missing one."""
    with seeded(0):
        model, plain_model = _LossModel(), _LossModel()
    plain_model.load_state_dict(model.state_dict())
    model.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: the hook fires on outputs only
        H = hf.hessian(model, lambda model, batch: model(batch), (x, y))
        plain = hf.hessian(plain_model, lambda model, batch: model(batch), (x, y))
        eye = torch.eye(H.shape[0], dtype=torch.float64)
        assert rel_err(H.matmat(eye), plain.matmat(eye)) <= 1e-14


# ---------------------------------------------------------------------------------------
# set-up cost on a transformers GPT-2, counted
# ---------------------------------------------------------------------------------------
def test_setup_cost_counts(monkeypatch):
    """Construction and the first product on a GPT-2 cost two forwards (batch 0's graph,
    the determinism probe) and two backward passes (the first-order one with
    create_graph, the product's double backward): about 3 gradients, and no
    forward-over-reverse (no torch.func initialisation, no failed path)."""
    model, batch = _build("gpt2"), _batch("gpt2")
    counts: Counter = Counter()
    handle = model.register_forward_hook(lambda *args: counts.update(["forward"]))
    grad = torch.autograd.grad
    depth = [0]

    def counting_grad(*args, **kwargs):
        depth[0] += 1  # the pre-flight's watch calls it again inside: count once
        try:
            if depth[0] == 1:
                counts["backward"] += 1
            return grad(*args, **kwargs)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)

    def no_fwd_rev(*args, **kwargs):
        raise AssertionError("forward-over-reverse was used")

    monkeypatch.setattr(hf.HessianOperator, "_fwd_rev_product", no_fwd_rev)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning on a plain transformers model
            H = hf.hessian(model, model_loss, batch)
        assert dict(counts) == {"forward": 2, "backward": 1}
        H.matmat(torch.ones(1, H.shape[0], dtype=torch.float64))
        assert dict(counts) == {"forward": 2, "backward": 2}
        assert H.hvp_mode == "reuse_graph"
    finally:
        handle.remove()


def test_small_block_chunk_is_timed():
    """Graph reuse at 1 < k <= 4: one batched double backward or k single ones, whichever
    timed faster (a large-vocabulary LM on a CPU loses with the batched one); the same
    numbers either way."""
    model, batch = _build("gpt2"), _batch("gpt2")
    H = hf.hessian(model, model_loss, batch)
    V = torch.randn(3, H.shape[0], generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    out = H.matmat(V)
    plan = H.plans[3]
    assert plan.mode == "reuse_graph"
    assert set(plan.seconds_per_vector) == {"reuse_graph/chunk=1", "reuse_graph/chunk=3"}
    assert plan.chunk == (1 if plan.seconds_per_vector["reuse_graph/chunk=1"]
                          <= plan.seconds_per_vector["reuse_graph/chunk=3"] else 3)
    assert rel_err(out, V @ _hessian_ref("gpt2")) <= 1e-5
