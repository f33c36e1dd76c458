"""Issue 8 part B: data, loss and pre-flight — nothing silently wrong, every error names its
cause. Each test asserts the error type and a fragment of its message, or the operator
against a dense float64 double-backward reference, and the user's state untouched."""

from __future__ import annotations

import functools
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import assert_same_state, make_cnn, make_mlp, rel_err, seeded, snapshot
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, IterableDataset

import hessfast as hf
from hessfast import errors
from hessfast.curvature import data as data_module
from hessfast.testing import dense_ggn_reference, dense_hessian_reference

pytestmark = pytest.mark.usefixtures("single_thread", "no_leaking_global_state")

TOL = 1e-12


def dense(H: hf.LinearOperator) -> torch.Tensor:
    """The operator as a dense ``[n, n]`` matrix (n products)."""
    n = H.shape[0]
    return H.matmat(torch.eye(n, dtype=torch.float64))


# -- 1. the loss's reduction decides the batch weights -----------------------------------


def _summed_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="sum")


_summed_ce.reduction = "sum"  # type: ignore[attr-defined]  # declared to hessfast


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(),
        nn.CrossEntropyLoss(reduction="sum"),
        functools.partial(F.cross_entropy, reduction="sum"),
        _summed_ce,
    ],
    ids=["mean", "sum", "partial-sum", "callable-attribute-sum"],
)
def test_mean_and_sum_criteria_give_the_mean_loss_hessian(loss_fn):
    model, mean_ce, batches = make_mlp(sizes=(8, 8, 5))
    ref = dense_hessian_reference(model, mean_ce, batches)
    before = snapshot(model)
    H = hf.hessian(model, loss_fn, batches)
    assert rel_err(dense(H), ref) < TOL
    assert_same_state(model, before)


def test_sum_criterion_ggn_is_the_mean_loss_ggn():
    model, mean_ce, batches = make_mlp(sizes=(8, 8, 5))
    ref = dense_ggn_reference(model, mean_ce, batches)
    G = hf.ggn(model, nn.CrossEntropyLoss(reduction="sum"), batches)
    assert rel_err(dense(G), ref) < TOL


def _plain_summed_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="sum")


def test_loss_reduction_argument_declares_a_sum():
    """A callable that returns the batch sum, declared by loss_reduction="sum", gives the
    mean-loss Hessian; undeclared it is read as a mean and the reason says so."""
    model, mean_ce, batches = make_mlp(sizes=(8, 8, 5))
    ref = dense_hessian_reference(model, mean_ce, batches)
    H = hf.hessian(model, _plain_summed_ce, batches, loss_reduction="sum")
    assert rel_err(dense(H), ref) < TOL
    assert H.loss_reduction == "sum" and "loss_reduction='sum'" in H.loss_reduction_reason
    H2 = hf.hessian(model, _plain_summed_ce, batches)
    assert H2.loss_reduction == "mean" and "assumed" in H2.loss_reduction_reason
    assert rel_err(dense(H2), ref) > 1.0  # the undeclared sum is (wrongly) weighted n_b/N


def test_loss_reduction_argument_contradicting_the_criterion_raises():
    model, _, batches = make_mlp()
    with pytest.raises(errors.ConfigurationError, match="loss_reduction='sum' was given"):
        hf.hessian(model, nn.CrossEntropyLoss(), batches, loss_reduction="sum")
    with pytest.raises(errors.ConfigurationError, match="loss_reduction must be one of"):
        hf.hessian(model, nn.CrossEntropyLoss(), batches, loss_reduction="batchmean")


def test_reduction_none_is_refused_naming_the_fix():
    model, _, batches = make_mlp()
    with pytest.raises(errors.LossError, match="reduction is 'none'.*reduction='mean'"):
        hf.hessian(model, nn.CrossEntropyLoss(reduction="none"), batches)


# -- 2. batch sizes ------------------------------------------------------------------------


def _dict_batches(sizes=(8, 8, 5), extra=None):
    model, _, batches = make_mlp(sizes=sizes)
    out = []
    for x, y in batches:
        b = {"temperature": torch.tensor(1.5, dtype=torch.float64), "x": x, "y": y}
        if extra is not None:
            b["mask"] = extra
        out.append(b)
    return model, out


def _tempered_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(batch["x"]) / batch["temperature"]
    if "mask" in batch:
        logits = logits + 0.1 * batch["mask"].sum()
    return F.cross_entropy(logits, batch["y"])


def test_dict_batches_with_a_0d_tensor_first_are_sized_by_their_samples():
    model, batches = _dict_batches()
    ref = dense_hessian_reference(
        model, _tempered_loss, batches, batch_size_fn=lambda b: len(b["y"])
    )
    H = hf.hessian(model, _tempered_loss, batches)
    assert H.batch_sizes == (8, 8, 5)
    assert rel_err(dense(H), ref) < TOL


def test_ambiguous_batch_size_raises_naming_the_candidates():
    mask = torch.ones(16, dtype=torch.float64)
    model, batches = _dict_batches(extra=mask)
    with pytest.raises(errors.BatchError, match=r"batch\['mask'\] has 16.*batch_size_fn="):
        hf.hessian(model, _tempered_loss, batches)
    # declared: fine, and right
    fn = lambda b: len(b["y"])  # noqa: E731
    ref = dense_hessian_reference(model, _tempered_loss, batches, batch_size_fn=fn)
    assert rel_err(dense(hf.hessian(model, _tempered_loss, batches, batch_size_fn=fn)), ref) < TOL


def test_ambiguous_size_is_accepted_when_the_weights_do_not_depend_on_it():
    mask = torch.ones(16, dtype=torch.float64)
    model, even = _dict_batches(sizes=(7, 7, 7), extra=mask)
    hf.hessian(model, _tempered_loss, even)  # equal batches: equal weights either way
    hf.hessian(model, _tempered_loss, even[2])  # one batch of a mean loss: weight 1


# -- 3. endless data -----------------------------------------------------------------------


class _Stream(IterableDataset):
    def __init__(self, length: int | None) -> None:
        self.length = length
        self.yielded = 0  # batches handed out so far (the loader's single process)
        with seeded(3):
            self.x = torch.randn(4, 5, dtype=torch.float64)
            self.y = torch.randint(0, 3, (4,))

    def __iter__(self):
        steps = itertools.count() if self.length is None else range(self.length)
        for _ in steps:
            self.yielded += 1
            yield self.x, self.y


def test_endless_iterable_dataset_raises_instead_of_hanging(monkeypatch):
    monkeypatch.setattr(data_module, "MAX_UNSIZED_BATCHES", 50)
    model, loss_fn, _ = make_mlp()
    before = snapshot(model)
    stream = _Stream(None)
    with pytest.raises(errors.UnboundedDataError, match=r"more than 50 batches.*islice"):
        hf.hessian(model, loss_fn, DataLoader(stream, batch_size=None))
    # the first pass stopped at the limit: a bound on work, not on this machine's speed
    assert stream.yielded <= 51
    assert_same_state(model, before)


def test_max_batches_argument_bounds_the_first_pass():
    model, loss_fn, _ = make_mlp()
    with pytest.raises(errors.UnboundedDataError, match="more than 7 batches"):
        hf.hessian(model, loss_fn, DataLoader(_Stream(None), batch_size=None), max_batches=7)
    with pytest.raises(errors.ConfigurationError, match="max_batches must be a positive"):
        hf.hessian(model, loss_fn, DataLoader(_Stream(3), batch_size=None), max_batches=0)


def test_finite_unsized_data_within_the_limit_works(monkeypatch):
    monkeypatch.setattr(data_module, "MAX_UNSIZED_BATCHES", 50)
    model, loss_fn, _ = make_mlp()
    stream = _Stream(3)
    ref = dense_hessian_reference(model, loss_fn, [(stream.x, stream.y)])
    H = hf.hessian(model, loss_fn, DataLoader(stream, batch_size=None))
    assert H.num_batches == 3
    assert rel_err(dense(H), ref) < TOL


# -- 4. reentrant checkpoint -----------------------------------------------------------------


class _Checkpointed(nn.Module):
    """Linear-Tanh-Linear-Tanh-Linear with layer ``where`` (1 or 2; 0: none) checkpointed."""

    def __init__(self, where: int, reentrant: bool) -> None:
        super().__init__()
        with seeded(5):
            self.l1, self.l2, self.l3 = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.where, self.reentrant = where, reentrant

    def _layer(self, i: int, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if self.where == i:
            return checkpoint(layer, h, use_reentrant=self.reentrant)
        return layer(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self._layer(1, self.l1, x))
        h = torch.tanh(self._layer(2, self.l2, h))
        return self.l3(h)


@pytest.mark.parametrize("where", [1, 2])
def test_reentrant_checkpoint_is_refused_naming_the_fix(where):
    _, loss_fn, batches = make_mlp()
    model = _Checkpointed(where, reentrant=True).double()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own "inputs have requires_grad=False"
        with pytest.raises(errors.UnsupportedModelError, match="use_reentrant=False"):
            hf.hessian(model, loss_fn, batches)
    assert_same_state(model, before)


@pytest.mark.parametrize("where", [1, 2])
def test_non_reentrant_checkpoint_matches_the_dense_reference(where):
    _, loss_fn, batches = make_mlp()
    ref = dense_hessian_reference(_Checkpointed(0, reentrant=False).double(), loss_fn, batches)
    H = hf.hessian(_Checkpointed(where, reentrant=False).double(), loss_fn, batches)
    assert rel_err(dense(H), ref) < TOL


# -- 5. errors in the user's forward or loss --------------------------------------------------


class _WithAux(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.lin(x)
        return out, out.pow(2).mean()


def _bn_mlp() -> nn.Module:
    with seeded(2):
        return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))


@pytest.mark.parametrize(
    "case, match, cause",
    [
        ("fp32 data", "cast the data", RuntimeError),
        ("tuple output", "model returns a tuple.*loss_form='model'", TypeError),
        ("short targets", "one target per input", ValueError),
        ("bn batch of one", "bn_mode='eval'", ValueError),
    ],
)
def test_forward_errors_are_reported_as_what_they_are(case, match, cause):
    model, loss_fn, batches = make_mlp()
    x, y = batches[0]
    kwargs = {}
    if case == "fp32 data":
        data = (x.float(), y)
    elif case == "tuple output":
        model, data = _WithAux().double(), (x, y)
    elif case == "short targets":
        data = (x, y[:5])
    else:
        model, data, kwargs = _bn_mlp().double(), (x[:1], y[:1]), {"bn_mode": "train"}
    before = snapshot(model)
    with pytest.raises(errors.LossCallError, match=match) as info:
        hf.hessian(model, loss_fn, data, **kwargs)
    assert isinstance(info.value.__cause__, cause)
    assert "differentiate" not in str(info.value)
    assert_same_state(model, before)


@pytest.mark.parametrize("bn_mode", ["train", "as_is"])
def test_a_last_batch_of_one_with_batch_statistics_is_refused_at_construction(bn_mode):
    _, loss_fn, batches = make_mlp(sizes=(8, 8, 1))
    model = _bn_mlp().double().train()
    before = snapshot(model)
    with pytest.raises(errors.ConfigurationError, match="batch 2 holds 1 sample.*bn_mode='eval'"):
        hf.hessian(model, loss_fn, batches, bn_mode=bn_mode)
    assert_same_state(model, before)
    hf.hessian(model, loss_fn, batches)  # running statistics (eval): fine


def test_a_batch_of_one_image_with_batch_statistics_is_fine():
    model, loss_fn, batches = make_cnn(sizes=(8, 1))  # BatchNorm2d: statistics over 4x4
    ref = dense_hessian_reference(model, loss_fn, batches, bn_mode="train")
    H = hf.hessian(model, loss_fn, batches, bn_mode="train")
    assert rel_err(dense(H), ref) < 1e-10


# -- 6. warnings -----------------------------------------------------------------------------


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with seeded(4):
            self.body, self.head, self.aux_head = nn.Linear(5, 4), nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def test_unused_parameters_warn_with_their_names():
    _, loss_fn, batches = make_mlp()
    model = _TwoHeads().double()
    with pytest.warns(UserWarning, match=r"hessfast: parameters \['aux_head.weight'") as rec:
        H = hf.hessian(model, loss_fn, batches)
    assert len([w for w in rec if "no gradient" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        H.matmat(torch.ones(2, H.shape[0], dtype=torch.float64))  # once, at construction


def test_a_loss_linear_in_the_parameters_warns_and_does_not_raise():
    with seeded(6):
        model = nn.Linear(5, 3).double()
        x = torch.randn(8, 5, dtype=torch.float64)

    def loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch).mean()

    with pytest.warns(UserWarning, match="hessfast: the Hessian is identically zero"):
        H = hf.hessian(model, loss, x)
    assert torch.count_nonzero(dense(H)) == 0


def test_an_ordinary_mlp_gives_no_warning():
    model, loss_fn, batches = make_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.hessian(model, loss_fn, batches)
        hf.ggn(model, loss_fn, batches)
