"""Bad input and faults: each raises its specific hessfast error with a message that names
the cause (research/reliability.md, section 4.3)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from models import lm_loss, make_cnn, make_lm, make_mlp, seeded
from torch import nn

import hessfast as hf
from hessfast import errors

pytestmark = pytest.mark.usefixtures("single_thread", "no_leaking_global_state")


def _build_and_multiply(*args, **kwargs):
    """Construct the operator and multiply once: an error may surface in either step."""
    H = hf.hessian(*args, **kwargs)
    g = torch.Generator().manual_seed(0)
    H.matmat(torch.randn(2, H.shape[0], generator=g, dtype=H.dtype))
    return H


# ---------------------------------------------------------------------------------------
# hierarchy
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,builtin",
    [
        ("EmptyDataError", ValueError),
        ("NotReiterableError", TypeError),
        ("DataChangedError", RuntimeError),
        ("NonDeterministicError", RuntimeError),
        ("AsymmetricOperatorError", RuntimeError),
        ("NonFiniteError", FloatingPointError),
        ("LossError", ValueError),
        ("NoParametersError", ValueError),
        ("ConfigurationError", ValueError),
    ],
)
def test_error_hierarchy(name, builtin):
    cls = getattr(errors, name)
    assert issubclass(cls, errors.HessfastError)
    assert issubclass(cls, builtin)


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------


def test_empty_list_of_batches():
    model, loss_fn, _ = make_mlp()
    with pytest.raises(errors.EmptyDataError, match=r"(?i)sample|empty|no batch"):
        hf.hessian(model, loss_fn, [])


def test_only_zero_size_batches():
    model, loss_fn, batches = make_mlp()
    x, y = batches[0]
    empty = (x[:0], y[:0])
    with pytest.raises(errors.EmptyDataError, match=r"(?i)sample|empty"):
        hf.hessian(model, loss_fn, [empty, empty])


def test_empty_dataloader():
    model, loss_fn, batches = make_mlp()
    x, y = batches[0]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:0], y[:0]), batch_size=4)
    with pytest.raises(errors.EmptyDataError):
        hf.hessian(model, loss_fn, loader)


def test_generator_is_not_reiterable():
    model, loss_fn, batches = make_mlp()
    gen = (b for b in batches)
    with pytest.raises(errors.NotReiterableError, match=r"(?i)re-?iterable|iterator|generator"):
        hf.hessian(model, loss_fn, gen)


def test_iterator_is_not_reiterable():
    model, loss_fn, batches = make_mlp()
    with pytest.raises(errors.NotReiterableError):
        hf.hessian(model, loss_fn, iter(batches))


def _shuffled_loader(generator=None):
    model, loss_fn, batches = make_mlp()
    X = torch.cat([b[0] for b in batches])
    Y = torch.cat([b[1] for b in batches])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, Y), batch_size=8, shuffle=True, generator=generator
    )
    return model, loss_fn, loader


def test_shuffled_dataloader_with_own_generator():
    model, loss_fn, loader = _shuffled_loader(torch.Generator().manual_seed(0))
    with pytest.raises(errors.DataChangedError, match=r"(?i)shuffl"):
        _build_and_multiply(model, loss_fn, loader)


def test_shuffled_dataloader_global_rng():
    """shuffle=True without a generator draws its seed from the global RNG; the operator must
    still see that the batches change between passes."""
    model, loss_fn, loader = _shuffled_loader()
    with pytest.raises(errors.DataChangedError, match=r"(?i)shuffl"):
        _build_and_multiply(model, loss_fn, loader)


def test_shuffled_dataloader_check_false_runs():
    model, loss_fn, loader = _shuffled_loader(torch.Generator().manual_seed(0))
    H = hf.hessian(model, loss_fn, loader, check=False)
    assert H.shape[0] == 69


# ---------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------


def test_as_is_with_active_dropout_raises_naming_dropout():
    model, loss_fn, batches = make_cnn(p_drop=0.5)
    model.train()
    with pytest.raises(errors.NonDeterministicError) as ei:
        hf.hessian(model, loss_fn, batches, bn_mode="as_is")
    msg = str(ei.value)
    assert re.search(r"Dropout|\bdrop\b", msg), msg  # the class or the module's name


def test_as_is_with_dropout_check_false_skips_preflight():
    model, loss_fn, batches = make_cnn(p_drop=0.5)
    model.train()
    H = hf.hessian(model, loss_fn, batches, bn_mode="as_is", check=False)
    assert H.shape[0] == 102


def test_as_is_with_dropout_check_deterministic_false():
    model, loss_fn, batches = make_cnn(p_drop=0.5)
    model.train()
    H = hf.hessian(model, loss_fn, batches, bn_mode="as_is", check_deterministic=False)
    assert H.shape[0] == 102


def test_as_is_on_eval_model_is_fine():
    model, loss_fn, batches = make_cnn()
    model.eval()
    H = hf.hessian(model, loss_fn, batches, bn_mode="as_is")
    E = hf.hessian(model, loss_fn, batches, bn_mode="eval")
    g = torch.Generator().manual_seed(1)
    V = torch.randn(2, H.shape[0], generator=g, dtype=torch.float64)
    assert torch.allclose(H.matmat(V), E.matmat(V), rtol=1e-12, atol=0)


def test_dropout_model_default_eval_mode_is_deterministic():
    """Default bn_mode="eval" switches dropout off, so a train-mode dropout model works."""
    model, loss_fn, batches = make_cnn(p_drop=0.5)
    model.train()
    hf.hessian(model, loss_fn, batches)


# ---------------------------------------------------------------------------------------
# non-finite values
# ---------------------------------------------------------------------------------------


def _nan_in_batch(index: int = 1):
    model, loss_fn, batches = make_mlp()
    x, y = batches[index]
    x = x.clone()
    x[0, 0] = float("nan")
    batches[index] = (x, y)
    return model, loss_fn, batches


_BATCH1 = re.compile(r"(?i)batch\D{0,12}1\b")


def test_nan_loss_raises_naming_batch():
    model, loss_fn, batches = _nan_in_batch(1)
    with pytest.raises(errors.NonFiniteError) as ei:
        _build_and_multiply(model, loss_fn, batches)
    assert _BATCH1.search(str(ei.value)), str(ei.value)


def test_nan_loss_raises_in_matmat_with_check_false():
    model, loss_fn, batches = _nan_in_batch(1)
    H = hf.hessian(model, loss_fn, batches, check=False)
    with pytest.raises(errors.NonFiniteError) as ei:
        H.matmat(torch.ones(1, H.shape[0], dtype=torch.float64))
    assert _BATCH1.search(str(ei.value)), str(ei.value)


def test_inf_loss_raises():
    model, _, batches = make_mlp()

    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y) + (float("inf") if x.shape[0] == 5 else 0.0)

    with pytest.raises(errors.NonFiniteError, match=r"(?i)batch\D{0,12}2\b"):
        _build_and_multiply(model, loss_fn, batches)


@pytest.mark.parametrize("hvp_mode", ["reuse_graph", "double_backward", "fwd_rev"])
def test_nan_hvp_with_finite_loss_raises(hvp_mode):
    """sqrt(||w||^2) at w = 0: the loss is 0, its gradient and HVP are NaN."""
    with seeded(3):
        model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    batches = [(torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))]

    def loss_fn(model, batch):
        return torch.sqrt(model.weight.pow(2).sum())

    with pytest.raises(errors.NonFiniteError):
        _build_and_multiply(model, loss_fn, batches, hvp_mode=hvp_mode)


# ---------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------


def test_non_scalar_loss():
    model, _, batches = make_mlp()

    def loss_fn(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none")

    with pytest.raises(errors.LossError, match=r"(?i)scalar"):
        hf.hessian(model, loss_fn, batches)


def test_integer_loss():
    model, _, batches = make_mlp()

    def loss_fn(outputs, targets):
        return (outputs.argmax(dim=1) == targets).sum()

    with pytest.raises(errors.LossError, match=r"(?i)float|dtype|int"):
        hf.hessian(model, loss_fn, batches)


def test_detached_loss():
    model, _, batches = make_mlp()

    def loss_fn(outputs, targets):
        return F.cross_entropy(outputs, targets).detach()

    with pytest.raises(errors.LossError, match=r"(?i)grad"):
        hf.hessian(model, loss_fn, batches)


def test_loss_computed_under_no_grad():
    model, _, batches = make_lm()

    def loss_fn(model, batch):
        with torch.no_grad():
            return lm_loss(model, batch)

    with pytest.raises(errors.LossError):
        hf.hessian(model, loss_fn, batches)


def test_python_float_loss():
    model, _, batches = make_mlp()

    def loss_fn(outputs, targets):
        return F.cross_entropy(outputs, targets).item()

    with pytest.raises(errors.LossError):
        hf.hessian(model, loss_fn, batches)


def test_loss_not_depending_on_selected_params():
    """The loss has a grad_fn, but not through the selected parameters."""
    model, _, batches = make_mlp()

    def loss_fn(model, batch):
        x, y = batch
        return model[3](torch.tanh(x[:, :1].expand(-1, 6))).pow(2).mean()

    with pytest.raises(errors.LossError):
        hf.hessian(model, loss_fn, batches, params=["0.weight"])


# ---------------------------------------------------------------------------------------
# parameters and configuration
# ---------------------------------------------------------------------------------------


def test_all_params_frozen():
    model, loss_fn, batches = make_mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(errors.NoParametersError, match=r"(?i)param"):
        hf.hessian(model, loss_fn, batches)
    assert all(not p.requires_grad for p in model.parameters())


def test_empty_params_list():
    model, loss_fn, batches = make_mlp()
    with pytest.raises(errors.NoParametersError):
        hf.hessian(model, loss_fn, batches, params=[])


def test_unknown_param_name():
    model, loss_fn, batches = make_mlp()
    with pytest.raises(errors.HessfastError, match=r"nope\.weight"):
        hf.hessian(model, loss_fn, batches, params=["nope.weight"])


@pytest.mark.parametrize("fn", ["hessian", "ggn"])
def test_bad_hvp_mode(fn):
    model, loss_fn, batches = make_mlp()
    with pytest.raises(errors.ConfigurationError, match="fastest"):
        getattr(hf, fn)(model, loss_fn, batches, hvp_mode="fastest")


@pytest.mark.parametrize("fn", ["hessian", "ggn"])
def test_bad_bn_mode(fn):
    model, loss_fn, batches = make_cnn()
    with pytest.raises(errors.ConfigurationError, match="frozen"):
        getattr(hf, fn)(model, loss_fn, batches, bn_mode="frozen")


def test_bad_loss_form():
    model, loss_fn, batches = make_mlp()
    with pytest.raises(errors.ConfigurationError, match="bogus"):
        hf.hessian(model, loss_fn, batches, loss_form="bogus")


def test_ggn_with_callable_loss():
    model, loss_fn, batches = make_lm()
    with pytest.raises(errors.ConfigurationError, match=r"(?i)criterion|callable|outputs"):
        hf.ggn(model, loss_fn, batches)


def test_check_false_skips_preflight_but_still_computes():
    model, loss_fn, batches = make_mlp()
    A = hf.hessian(model, loss_fn, batches, check=False)
    B = hf.hessian(model, loss_fn, batches)
    g = torch.Generator().manual_seed(2)
    V = torch.randn(2, A.shape[0], generator=g, dtype=torch.float64)
    assert torch.allclose(A.matmat(V), B.matmat(V), rtol=1e-12, atol=0)
