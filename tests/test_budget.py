"""The measurement budget: the rule that postpones a measurement, its clocks and its state."""

import time

import pytest

from lipgan.errors import LipganError
from lipgan.train.budget import Budget


def _spend(b: Budget, kind: str, seconds: float) -> None:
    b.spent[kind] += seconds
    b.count[kind] += 1
    b.cost[kind] = seconds


def test_a_measurement_runs_only_while_the_share_stays_within_the_budget():
    b = Budget(0.05)
    b.train_s, b.steps = 10.0, 100
    # never measured: gradient norms cost about one step (0.1 s), the layer table ten (1 s)
    assert b.fits("gradient_norms", wall_s=10.0)  # 0.1 <= 0.05 * 10.1
    assert not b.fits("layers", wall_s=10.0)  # 1.0 > 0.05 * 11
    assert b.fits("layers", wall_s=19.0)  # 1.0 <= 0.05 * 20
    _spend(b, "fid", 2.0)  # measured once: its last cost is the estimate
    assert not b.fits("fid", wall_s=50.0)  # 4 > 0.05 * 52
    assert b.fits("fid", wall_s=78.0)  # 4 <= 0.05 * 80
    assert Budget(1.0).fits("layers", wall_s=0.0)  # budget 1: never postponed


def test_training_and_measuring_clocks_add_up():
    b = Budget(0.05)
    with b.training():
        time.sleep(0.02)
    with b.measuring("samples"):
        time.sleep(0.01)
    assert b.train_s >= 0.02 and b.steps == 1
    assert b.spent["samples"] >= 0.01 and b.count["samples"] == 1
    r = b.report(wall_s=b.train_s + b.measure_s)
    assert r["measure_share"] == pytest.approx(b.measure_s / (b.train_s + b.measure_s), abs=1e-3)
    assert r["outside_train_share"] == pytest.approx(r["measure_share"], abs=1e-3)
    assert "samples" in r["seconds"] and "fid" not in r["seconds"]


def test_state_continues_across_a_resume_and_bad_state_is_refused():
    a = Budget(0.05)
    a.train_s, a.steps = 3.0, 30
    _spend(a, "checkpoint", 0.5)
    state = a.state_dict()
    b = Budget(0.05, state)
    assert (b.train_s, b.steps, b.spent["checkpoint"], b.cost) == (3.0, 30, 0.5, a.cost)
    assert b.cpu() >= state["cpu_s"]  # CPU seconds go on from the checkpoint's
    for bad in ({**state, "train_s": -1.0}, {**state, "spent": {"fid": "x"}}, "x",
                {k: v for k, v in state.items() if k != "cost"}):  # fmt: skip
        with pytest.raises(LipganError, match="'timing'"):
            Budget(0.05, bad)
