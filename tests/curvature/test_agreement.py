"""RankGroup.settle: what the ranks of a data-parallel curvature operator agree on at
construction, as a frozen Agreement, driven here by a fake communicator (no process group):
the global counts, one loss reading for all ranks, the least precise compute dtype."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from hessfast.curvature.dataparallel import Agreement, RankGroup
from hessfast.errors import DistributedError, EmptyDataError


class FakeComm:
    """Sums this rank's votes with the other ranks' given ones (what the all-reduce does)."""

    def __init__(self, others: list[list[int]]) -> None:
        self.others = others

    def allreduce_ints(self, votes: list[int], what: str) -> list[int]:
        return [sum(col) for col in zip(votes, *self.others, strict=True)]


def _votes(samples, batches, form, reduction, dtype):
    has = samples > 0
    return ([samples, batches]
            + [int(has and form == f) for f in ("criterion", "model")]
            + [int(has and reduction == r) for r in ("mean", "sum")]
            + [int(has and dtype == d)
               for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)])


def _group(others: list[list[int]] | None) -> RankGroup:
    group = RankGroup(nn.Linear(2, 1), [], None)
    if others is not None:
        group.comm = FakeComm(others)  # type: ignore[assignment]
        group.world_size = 1 + len(others)
    return group


def test_one_process_agrees_with_itself():
    group = _group(None)
    agreed = group.settle(10, 2, "criterion", "sum", torch.float64)
    assert agreed == Agreement(10, 2, "criterion", "sum", torch.float64)
    assert group.scale == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        agreed.num_samples = 3  # type: ignore[misc]


def test_an_empty_rank_takes_the_others_reading_and_the_least_precise_dtype():
    others = [_votes(6, 2, "model", "sum", torch.float64),
              _votes(4, 1, "model", "sum", torch.float32)]
    group = _group(others)
    agreed = group.settle(0, 0, "criterion", "mean", torch.float64)
    assert agreed == Agreement(10, 3, "model", "sum", torch.float32)
    assert group.scale == 0.0
    group = _group(others[:1])
    agreed = group.settle(4, 1, "model", "sum", torch.float64)
    assert (agreed.num_samples, agreed.compute_dtype) == (10, torch.float64)
    assert group.scale == pytest.approx(0.4)


def test_disagreeing_or_empty_ranks_raise():
    with pytest.raises(DistributedError, match="read loss_fn differently"):
        _group([_votes(4, 1, "criterion", "sum", torch.float64)]).settle(
            4, 1, "criterion", "mean", torch.float64)
    with pytest.raises(EmptyDataError, match="no rank of the 2"):
        _group([_votes(0, 0, "criterion", "mean", torch.float64)]).settle(
            0, 0, "criterion", "mean", torch.float64)
