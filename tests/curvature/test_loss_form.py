"""How hessfast reads ``loss_fn`` and ``data`` (hessfast/curvature/lossform.py, data.py):

* loss form: ``loss_form=`` wins; a torch loss is a criterion; a first parameter annotated
  ``nn.Module``/``Tensor`` or named model/module/net/network decides; otherwise one trial call
  with a stand-in for the model (never the model itself); with no evidence, a criterion for
  ``(inputs, targets)`` pairs and the model form for any other batch. The decision and its
  reason are on the operator.
* batches: a tensor, tuple or dict is ONE batch; a list, DataLoader or other iterable is a
  sequence of batches. Errors say what was assumed and name the override.
"""

from __future__ import annotations

import functools
from collections import UserDict

import pytest
import torch
import torch.nn.functional as F
from models import (
    assert_same_state,
    lm_loss,
    make_lm,
    make_mlp,
    rel_err,
    snapshot,
)
from torch import nn

import hessfast as hf
from hessfast import errors

pytestmark = pytest.mark.usefixtures("single_thread", "no_leaking_global_state")

TOL = 1e-12


def _V(n: int, k: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, n, generator=g, dtype=torch.float64)


def _same_operator(A, B) -> None:
    V = _V(A.shape[0])
    assert rel_err(A.matmat(V), B.matmat(V)) <= TOL


# ---------------------------------------------------------------------------------------
# loss_fn(model, batch) in many spellings
# ---------------------------------------------------------------------------------------
def _lm_loss_scaled(net, batch, scale=1.0):
    return scale * lm_loss(net, batch)


class _LossHolder:
    def loss(self, m, batch):
        return lm_loss(m, batch)

    def __call__(self, m, batch):
        return lm_loss(m, batch)


def _annotated(x: nn.Module, b):
    return lm_loss(x, b)


def _renamed(m, batch):
    return lm_loss(m, batch)


MODEL_FORMS = {
    "renamed": (_renamed, "trial"),
    "lambda": (lambda m, b: lm_loss(m, b), "trial"),
    "partial": (functools.partial(_lm_loss_scaled, scale=1.0), "named 'net'"),
    "bound method": (_LossHolder().loss, "trial"),
    "callable object": (_LossHolder(), "trial"),
    "annotated": (_annotated, "annotated"),
}


@pytest.mark.parametrize("name", list(MODEL_FORMS))
def test_model_form_on_dict_batches(name):
    loss_fn, why = MODEL_FORMS[name]
    model, _, batches = make_lm()
    H = hf.hessian(model, loss_fn, batches)
    assert H.loss_form == "model"
    assert why in H.loss_form_reason, H.loss_form_reason
    _same_operator(H, hf.hessian(model, lm_loss, batches))


def _pair_loss(m, batch):
    x, y = batch
    return F.cross_entropy(m(x), y)


class _PairLoss:
    def step(self, m, batch):
        return _pair_loss(m, batch)


@pytest.mark.parametrize(
    "loss_fn",
    [_pair_loss, lambda m, b: F.cross_entropy(m(b[0]), b[1]), _PairLoss().step,
     functools.partial(_pair_loss)],
    ids=["function", "lambda", "bound method", "partial"],
)
def test_model_form_on_pair_batches(loss_fn):
    """(inputs, targets) batches with a loss_fn(model, batch) whose names say nothing: the
    trial call sees it call the model."""
    model, ce, batches = make_mlp()
    H = hf.hessian(model, loss_fn, batches)
    assert H.loss_form == "model"
    assert "calls its first argument" in H.loss_form_reason
    _same_operator(H, hf.hessian(model, ce, batches))


def _model_params_loss(m, batch):
    return 0.5 * sum(p.pow(2).sum() for p in m.parameters()) + 0.0 * batch[0].sum()


def test_model_form_that_reads_parameters_only():
    model, _, batches = make_mlp()
    H = hf.hessian(model, _model_params_loss, batches)
    assert H.loss_form == "model" and ".parameters" in H.loss_form_reason
    assert rel_err(H.to_dense(), torch.eye(H.shape[0], dtype=torch.float64)) <= 1e-14


# ---------------------------------------------------------------------------------------
# criteria in many spellings
# ---------------------------------------------------------------------------------------
class _Criterion(nn.Module):
    def forward(self, logits, y):
        return F.cross_entropy(logits, y)


def _typed_criterion(a: torch.Tensor, b):
    return F.cross_entropy(a, b)


def _float_criterion(out, y):
    return F.cross_entropy(out.double(), y)  # .double(): a model has it too


CRITERIA = {
    "torch module": (nn.CrossEntropyLoss(), "torch's CrossEntropyLoss"),
    "torch function": (F.cross_entropy, "torch's cross_entropy"),
    "partial of a torch function": (functools.partial(F.cross_entropy, reduction="mean"),
                                    "annotated Tensor"),
    "lambda": (lambda out, y: F.cross_entropy(out, y), "trial"),
    "arithmetic": (lambda a, b: (a.log_softmax(1) * -F.one_hot(b, 3)).sum(1).mean(), "trial"),
    "custom module": (_Criterion(), "trial"),
    "annotated": (_typed_criterion, "annotated"),
    "ambiguous method first": (_float_criterion, "pair"),
}


@pytest.mark.parametrize("name", list(CRITERIA))
def test_criterion_forms(name):
    loss_fn, why = CRITERIA[name]
    model, ce, batches = make_mlp()
    H = hf.hessian(model, loss_fn, batches)
    assert H.loss_form == "criterion"
    assert why in H.loss_form_reason, H.loss_form_reason
    _same_operator(H, hf.hessian(model, ce, batches))


def test_explicit_loss_form_wins():
    model, ce, batches = make_mlp()

    def criterion(model, target):  # a criterion that names its outputs `model`
        return ce(model, target)

    H = hf.hessian(model, criterion, batches, loss_form="criterion")
    assert (H.loss_form, H.loss_form_reason) == ("criterion", "loss_form='criterion' given")
    _same_operator(H, hf.hessian(model, ce, batches))
    with pytest.raises(errors.LossCallError, match="loss_form='criterion'"):
        hf.hessian(model, ce, batches, loss_form="model")


def test_trial_call_never_touches_the_model_or_the_rng():
    """The decision passes a stand-in, not the model: no forward, no state change, and a
    loss that draws random numbers before using the model leaves the global RNG as it was."""
    model, _, batches = make_mlp()
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))

    def noisy(m, batch):
        noise = torch.randn(())
        return F.cross_entropy(m(batch[0]), batch[1]) + 0.0 * noise

    before = snapshot(model)
    try:
        H = hf.hessian(model, noisy, batches, check=False)
    finally:
        handle.remove()
    assert H.loss_form == "model" and calls == []
    assert_same_state(model, before)


def test_a_criterion_cannot_take_batches_that_are_not_pairs():
    model, _, batches = make_lm()
    for loss_fn in (nn.CrossEntropyLoss(), lambda out, y: F.cross_entropy(out, y)):
        with pytest.raises(errors.BatchError) as ei:
            hf.hessian(model, loss_fn, batches)
        msg = str(ei.value)
        assert "not an (inputs, targets) pair" in msg and "loss_form='model'" in msg, msg
    with pytest.raises(errors.BatchError, match="loss_form='model'"):
        hf.hessian(model, lm_loss, batches, loss_form="criterion")


def test_later_batch_of_another_kind_names_the_reading():
    model, ce, batches = make_mlp()
    x, y = batches[2]
    batches[2] = {"x": x, "y": y}
    with pytest.raises(errors.BatchError) as ei:
        hf.hessian(model, ce, batches).matmat(_V(69, 1))
    msg = str(ei.value)
    assert "batch 2" in msg and "SEQUENCE of 3 batches" in msg and "loss_form=" in msg, msg


def test_loss_that_raises_names_the_reading():
    model, _, batches = make_lm()

    def loss(m, batch):
        return lm_loss(m, {"input_ids": batch["input_ids"], "labels": batch["target"]})

    with pytest.raises(errors.LossCallError) as ei:
        hf.hessian(model, loss, batches)
    msg = str(ei.value)
    assert "KeyError" in msg and "loss_form='criterion'" in msg and "batch 0" in msg, msg
    assert isinstance(ei.value.__cause__, KeyError)


def test_ggn_needs_a_criterion_and_says_why():
    model, ce, batches = make_mlp()
    with pytest.raises(errors.ConfigurationError) as ei:
        hf.ggn(model, _pair_loss, batches)
    msg = str(ei.value)
    assert "calls its first argument" in msg and "loss_form='criterion'" in msg, msg
    with pytest.raises(errors.ConfigurationError, match="loss_form='model'"):
        hf.ggn(model, ce, batches, loss_form="model")

    def named_model(model, target):  # a criterion after all
        return ce(model, target)

    G = hf.ggn(model, named_model, batches, loss_form="criterion")
    _same_operator(G, hf.ggn(model, ce, batches))


# ---------------------------------------------------------------------------------------
# one batch or a sequence of batches
# ---------------------------------------------------------------------------------------
def _lm_ids(n_batches: int = 3):
    model, _, batches = make_lm()
    ids = [torch.cat([b["input_ids"], b["labels"][:, -1:]], dim=1) for b in batches]
    assert all(torch.equal(i[:, 1:], b["labels"]) for i, b in zip(ids, batches, strict=True))
    return model, batches, ids[:n_batches]


def _ids_loss(m, ids):
    return lm_loss(m, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})


def test_list_of_token_tensors_is_a_sequence_of_batches():
    """[ids_0, ids_1, ids_2]: three batches of token ids for a language model."""
    model, batches, ids = _lm_ids()
    H = hf.hessian(model, _ids_loss, ids)
    assert H.num_batches == 3 and H.num_samples == 11
    assert H.loss_form == "model" and "calls its first argument" in H.loss_form_reason
    _same_operator(H, hf.hessian(model, lm_loss, batches))


def test_a_tensor_is_one_batch():
    model, batches, ids = _lm_ids(1)
    H = hf.hessian(model, _ids_loss, ids[0])
    assert H.num_batches == 1 and H.num_samples == 4
    _same_operator(H, hf.hessian(model, lm_loss, batches[0]))


def test_list_of_token_tensors_with_a_criterion_says_what_was_assumed():
    model, _, ids = _lm_ids()
    with pytest.raises(errors.BatchError) as ei:
        hf.hessian(model, lambda logits, y: F.cross_entropy(logits, y), ids)
    msg = str(ei.value)
    assert "SEQUENCE of 3 batches" in msg and "data=(inputs, targets)" in msg, msg


def test_tuple_is_one_batch_and_list_of_two_tensors_is_two():
    model, ce, batches = make_mlp()
    X = torch.cat([b[0] for b in batches])
    Y = torch.cat([b[1] for b in batches])
    H = hf.hessian(model, ce, (X, Y))
    assert H.num_batches == 1 and H.num_samples == 21
    _same_operator(H, hf.hessian(model, ce, batches))
    with pytest.raises(errors.BatchError) as ei:
        hf.hessian(model, ce, [X, Y])
    msg = str(ei.value)
    assert "SEQUENCE of 2 batches" in msg and "data=(inputs, targets)" in msg, msg


def test_tuple_of_batches_is_one_batch_and_the_error_says_so():
    model, ce, batches = make_mlp()
    with pytest.raises(errors.HessfastError) as ei:
        hf.hessian(model, ce, tuple(batches[:2]))
    msg = str(ei.value)
    assert "ONE batch" in msg and "list" in msg, msg
    H = hf.hessian(model, ce, list(batches[:2]))  # the fix the message names
    assert H.num_batches == 2


def test_mapping_batches():
    model, _, batches = make_lm()
    wrapped = [UserDict(b) for b in batches]
    _same_operator(hf.hessian(model, lm_loss, wrapped), hf.hessian(model, lm_loss, batches))
    H = hf.hessian(model, lm_loss, UserDict(batches[0]))
    assert H.num_batches == 1
    loader = torch.utils.data.DataLoader(
        [{"input_ids": b["input_ids"][i], "labels": b["labels"][i]}
         for b in batches for i in range(len(b["labels"]))],
        batch_size=4,
    )
    _same_operator(hf.hessian(model, lm_loss, loader), hf.hessian(model, lm_loss, batches))


class _Batch:
    """A batch type hessfast does not look inside."""

    def __init__(self, x, y):
        self.x, self.y = x, y


def test_other_batch_types_need_a_size_and_a_wrapper():
    model, ce, batches = make_mlp()
    custom = [_Batch(*b) for b in batches]

    def loss(m, batch):
        return ce(m(batch.x), batch.y)

    with pytest.raises(errors.BatchError, match="batch_size_fn"):
        hf.hessian(model, loss, custom)
    H = hf.hessian(model, loss, custom, batch_size_fn=lambda b: len(b.y))
    _same_operator(H, hf.hessian(model, ce, batches))
    with pytest.raises(errors.BatchError, match=r"data=\[batch\]"):
        hf.hessian(model, loss, custom[0], batch_size_fn=lambda b: len(b.y))
    one = hf.hessian(model, loss, [custom[0]], batch_size_fn=lambda b: len(b.y))
    _same_operator(one, hf.hessian(model, ce, batches[0]))


def test_data_that_is_neither_raises_batch_error():
    model, ce, _ = make_mlp()
    with pytest.raises(errors.BatchError, match="iterable"):
        hf.hessian(model, ce, 3)
