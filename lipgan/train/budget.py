"""The measurement budget of a run: seconds in training steps against seconds in measurements.

A run measures itself (gradient norms, layer tables, FID, sample grids, checkpoints); issue 19
asks that this take at most ``measure_budget`` (default 5 %) of its wall time. :class:`Budget`
keeps the seconds of each kind and decides whether a due measurement fits:

    run it  iff  measure_s + c_k <= budget * (wall_s + c_k)

with ``c_k`` the kind's last measured cost (its first time: :meth:`Budget.prior`). A measurement
that does not fit is postponed (tried again after every step); one still pending at the run's end
is skipped and counted. Checkpoints are counted but never postponed (they are what a kill or a
resume needs), nor is the final sample grid. Everything is also kept in CPU seconds
(``time.process_time``), and both clocks continue across resumes through the checkpoint.
See docs/design.md, "Measurement budget".
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

from lipgan.errors import LipganError

#: measurement kinds, as reported in status.json
KINDS = ("gradient_norms", "layers", "fid", "samples", "checkpoint")


class Budget:
    """Seconds spent in training steps and in each kind of measurement, with the budget rule.

    ``share``: the budget, a fraction of the wall time (``1``: never postpone). ``state``: a
    :meth:`state_dict` of earlier segments (resume), or ``None``.
    """

    def __init__(self, share: float, state: dict | None = None) -> None:
        self.share = float(share)
        self.train_s = 0.0  # seconds inside train_step
        self.steps = 0  # train_step calls counted in train_s
        self.cpu_before = 0.0  # CPU seconds of earlier segments
        self.spent = dict.fromkeys(KINDS, 0.0)  # seconds per kind
        self.count = dict.fromkeys(KINDS, 0)
        self.cost: dict[str, float] = {}  # last cost per kind
        self.postponed = dict.fromkeys(KINDS, 0)  # due-but-postponed decisions
        self.skipped = dict.fromkeys(KINDS, 0)  # still pending at the end
        self.eval_s: float | None = None  # evaluation after training (not in the budget)
        if state:
            self.load_state_dict(state)
        self.cpu0 = time.process_time()

    # ------------------------------------------------------------------ clocks
    @property
    def measure_s(self) -> float:
        return sum(self.spent.values())

    def cpu(self) -> float:
        """CPU seconds of this process since the session started, plus earlier segments."""
        return self.cpu_before + time.process_time() - self.cpu0

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.train_s += time.perf_counter() - t
            self.steps += 1

    @contextlib.contextmanager
    def measuring(self, kind: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            self.spent[kind] += dt
            self.count[kind] += 1
            self.cost[kind] = dt

    @contextlib.contextmanager
    def probe(self, kind: str, scale: float) -> Iterator[None]:
        """Time a small version of a measurement (e.g. FID on 64 samples) and take ``scale``
        times its seconds as the kind's cost estimate; the probe's seconds count as spent."""
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            self.spent[kind] += dt
            self.cost[kind] = dt * scale

    # ------------------------------------------------------------------ the rule
    def step_s(self) -> float:
        """Mean seconds per training step so far (0 before the first)."""
        return self.train_s / self.steps if self.steps else 0.0

    def prior(self, kind: str) -> float:
        """A kind's cost before it was ever measured: gradient norms about one training step
        (three critic forward-backward passes on one batch), a layer table ten (lipgan's
        certified bounds take seconds: issue 17), the rest nothing until :meth:`probe`."""
        return {"gradient_norms": 1.0, "layers": 10.0}.get(kind, 0.0) * self.step_s()

    def fits(self, kind: str, wall_s: float, cost: float | None = None) -> bool:
        """Whether measuring ``kind`` now keeps the share within the budget."""
        if self.share >= 1.0:
            return True
        c = self.cost.get(kind, self.prior(kind) if cost is None else cost)
        return self.measure_s + c <= self.share * (wall_s + c)

    # ------------------------------------------------------------------ state and report
    def state_dict(self) -> dict:
        return {
            "train_s": self.train_s,
            "steps": self.steps,
            "cpu_s": self.cpu(),
            "spent": dict(self.spent),
            "count": dict(self.count),
            "cost": dict(self.cost),
            "postponed": dict(self.postponed),
        }

    def load_state_dict(self, state: Any, source: str = "checkpoint") -> None:
        """Restore :meth:`state_dict`; a malformed one is a LipganError naming ``source``."""

        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
                and v >= 0

        def table(v: Any) -> bool:
            return isinstance(v, dict) and all(
                isinstance(k, str) and number(x) for k, x in v.items()
            )

        ok = (
            isinstance(state, dict)
            and all(number(state.get(k)) for k in ("train_s", "steps", "cpu_s"))
            and all(table(state.get(k)) for k in ("spent", "count", "cost", "postponed"))
        )
        if not ok:
            raise LipganError(
                f"{source}: checkpoint field 'timing' is not a mapping of seconds and counts; the "
                "file is damaged or not written by lipgan"
            )
        self.train_s, self.steps = float(state["train_s"]), int(state["steps"])
        self.cpu_before = float(state["cpu_s"])
        for name in ("spent", "count", "postponed"):
            getattr(self, name).update({k: v for k, v in state[name].items() if k in KINDS})
        self.cost = {k: float(v) for k, v in state["cost"].items() if k in KINDS}

    def report(self, wall_s: float) -> dict:
        """What status.json records: seconds, shares of the wall time, per-kind seconds and
        counts, postponed and skipped measurements, the budget."""
        wall = max(float(wall_s), 1e-9)
        out = {
            "budget": self.share,
            "wall_s": round(wall_s, 3),
            "cpu_s": round(self.cpu(), 3),
            "train_s": round(self.train_s, 3),
            "measure_s": round(self.measure_s, 3),
            "measure_share": round(self.measure_s / wall, 4),
            "outside_train_share": round(1.0 - self.train_s / wall, 4),
            "seconds": {k: round(v, 3) for k, v in self.spent.items() if v},  # probes too
            "count": {k: v for k, v in self.count.items() if v},
            "postponed": {k: v for k, v in self.postponed.items() if v},
            "skipped": {k: v for k, v in self.skipped.items() if v},
        }
        if self.eval_s is not None:
            out["eval_after_training_s"] = round(self.eval_s, 3)
        return out

    def line(self, wall_s: float) -> str:
        """One line for the end of a run."""
        r = self.report(wall_s)
        text = (
            f"measurement took {100 * r['measure_share']:.1f} % of the wall time "
            f"({r['measure_s']:.1f} s of {r['wall_s']:.1f} s, budget {100 * self.share:g} %); "
            f"training steps {r['train_s']:.1f} s"
        )
        if r["skipped"]:
            names = ", ".join(r["skipped"])
            text += f"; skipped at the end to keep the budget: {names} (see --measure-budget)"
        return text
