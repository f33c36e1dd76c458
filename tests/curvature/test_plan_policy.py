"""The product planner (hessfast.curvature.plan.Planner) is pure policy: driven here by fake
timings, with no model, it must pick the fastest usable path and chunk, time only what the
policy says, and drop the graphs only when a timed race chose a path that does not keep them."""

from __future__ import annotations

import pytest
import torch

from hessfast.curvature.plan import Planner
from hessfast.errors import UnsupportedModelError


class FakeTimer:
    """``time(modes, k, chunks)`` answering from a table of seconds per vector."""

    def __init__(self, table: dict[tuple[str, int], float], planner: Planner | None = None,
                 fails: tuple[str, ...] = ()) -> None:
        self.table, self.planner, self.fails = table, planner, fails
        self.calls: list[tuple[list[str], int, list[int]]] = []

    def __call__(self, modes: list[str], k: int, chunks: list[int]) -> dict:
        self.calls.append((list(modes), k, list(chunks)))
        out = {}
        for m in modes:
            if m in self.fails:  # what the products do when a path raises while timed
                assert self.planner is not None
                self.planner.path_failed(m, RuntimeError(f"{m} cannot run"))
                continue
            out.update({(m, c): self.table[(m, c)] for c in chunks if (m, c) in self.table})
        return out


def test_auto_race_without_reuse_picks_the_fastest_mode_and_chunk():
    planner = Planner("auto", None, False, num_batches=3)  # reuse_graph=False: no reuse
    timer = FakeTimer({("double_backward", 1): 3.0, ("double_backward", 4): 1.0,
                       ("double_backward", 16): 1.5, ("fwd_rev", 1): 2.0,
                       ("fwd_rev", 4): 0.5, ("fwd_rev", 16): 0.7})
    released = []
    plan = planner.plan_for(16, time=timer, timed_on=2, release=lambda: released.append(1))
    assert (plan.mode, plan.chunk) == ("fwd_rev", 4)
    assert timer.calls == [(["double_backward", "fwd_rev"], 16, [1, 4, 16])]
    assert plan.seconds_per_vector["double_backward/chunk=4"] == 1.0
    assert "timed on batch 2" in plan.reason and "reuse_graph set by the caller" in plan.reason
    assert released == [1]  # the race chose a path that keeps no graph
    # decided once per block size: a second ask does not time again
    assert planner.plan_for(16, time=timer) is plan and len(timer.calls) == 1


def test_auto_race_keeps_graphs_when_double_backward_wins():
    planner = Planner("auto", None, False, num_batches=3)
    timer = FakeTimer({("double_backward", 1): 1.0, ("double_backward", 4): 0.9,
                       ("double_backward", 8): 2.0, ("fwd_rev", 1): 5.0,
                       ("fwd_rev", 4): 4.0, ("fwd_rev", 8): 3.0})
    released = []
    plan = planner.plan_for(8, time=timer, release=lambda: released.append(1))
    assert (plan.mode, plan.chunk) == ("double_backward", 4)
    assert timer.calls[0][2] == [1, 4]  # candidate chunks up to k
    assert released == [1]  # double backward keeps no graph either


def test_small_block_with_reuse_times_only_its_chunks():
    planner = Planner("auto", None, True, num_batches=2)
    timer = FakeTimer({("reuse_graph", 1): 1.0, ("reuse_graph", 3): 2.0})
    released = []
    plan = planner.plan_for(3, time=timer, release=lambda: released.append(1))
    assert (plan.mode, plan.chunk) == ("reuse_graph", 1)
    assert timer.calls == [(["reuse_graph"], 3, [1, 3])]
    assert plan.seconds_per_vector == {"reuse_graph/chunk=1": 1.0, "reuse_graph/chunk=3": 2.0}
    assert released == []
    # k = 1: untimed
    assert planner.plan_for(1, time=timer).chunk == 1 and len(timer.calls) == 1


def test_a_path_failing_while_timed_falls_back_to_the_next():
    planner = Planner("auto", None, False, num_batches=3)
    timer = FakeTimer({("fwd_rev", 1): 2.0, ("fwd_rev", 4): 1.0}, planner,
                      fails=("double_backward",))
    plan = planner.plan_for(4 + 4, time=timer)
    assert plan.mode == "fwd_rev"
    assert "double_backward" in planner.unavailable and "reuse_graph" in planner.unavailable


def test_explicit_mode_is_never_timed_and_auto_needs_the_graph_size():
    def no_timing(*args):
        raise AssertionError("an explicit hvp_mode is not timed")

    plan = Planner("double_backward", 8, None, 4).plan_for(64, time=no_timing)
    assert (plan.mode, plan.chunk, plan.reason) == ("double_backward", 8, "requested")
    auto = Planner("auto", None, None, num_batches=4)
    assert auto.needs_graph_size
    with pytest.raises(RuntimeError, match="graph size"):
        auto.plan_for(2, time=no_timing)
    auto.record_graph_size(1 << 60, 4, torch.device("cpu"))  # far too large to keep
    assert auto.fits is not None and not auto.fits[0]
    plan = auto.plan_for(2, time=no_timing)
    assert plan.mode == "double_backward" and "exceed a quarter" in plan.reason


def test_no_path_left_raises():
    planner = Planner("auto", None, False, num_batches=3)
    timer = FakeTimer({}, planner, fails=("double_backward", "fwd_rev"))
    with pytest.raises(UnsupportedModelError, match="neither double backward"):
        planner.plan_for(16, time=timer)
