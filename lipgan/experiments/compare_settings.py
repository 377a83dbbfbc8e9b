"""What ``lipgan compare`` is asked to do, checked before anything is written.

:class:`CompareConfig` (the variants, seeds, budget and training flags), durations, each
variant's TrainConfig fields, :func:`check` (every setting and every run's resolved TrainConfig
before a file is written) and compare.json (what a folder was started with: a rerun with other
flags is refused, not mixed into one table). :mod:`lipgan.compare` runs what this describes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lipgan.errors import LipganError
from lipgan.experiments import sweep
from lipgan.experiments.sweep import Variant
from lipgan.runs import atomic_write_text, make_dirs
from lipgan.runs.files import read_text

#: The methods compared by default: one per way of making the critic Lipschitz, plus the
#: unconstrained non-saturating GAN as the control (sagan differs in architecture and loss too,
#: and l2 is weight decay; both can be added with ``methods``).
DEFAULT_METHODS = ("wgan-clip", "wgan-gp", "wgan-lp", "sn", "snr", "frobenius", "gan")

#: Training flags passed on to every run unchanged (None: the trainer's default).
TRAIN_FLAGS = ("model", "width", "batch_size", "device", "precision", "dataset")

#: TrainConfig fields compare sets itself for every run
_OWN_FIELDS = {"method", "seed", "steps", "out", "quiet"}


@dataclass
class CompareConfig:
    """What to compare. Exactly one of ``budget_s`` and ``steps`` bounds each run;
    ``budget_clock`` says whether ``budget_s`` counts wall seconds or the run's CPU seconds."""

    out: str
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: int = 2
    budget_s: float | None = None
    budget_clock: str = "wall"
    steps: int | None = None
    model: str | None = None
    width: int | None = None
    batch_size: int | None = None
    device: str | None = None
    precision: str | None = None
    dataset: str | None = None
    #: other TrainConfig fields for every run (e.g. {"threads": 1, "fid_every": 500})
    train_options: dict = field(default_factory=dict)
    #: config variants compared after ``methods``: each a name and TrainConfig fields (``method``
    #: among them unless the name is a method), on top of the training flags
    variants: list[Variant] = field(default_factory=list)
    eval_n: int = 10000
    evaluate: bool = True
    #: score each run's last iterate instead of its moving average (``lipgan eval --raw``)
    raw: bool = False
    retry_failed: bool = False
    quiet: bool = False
    #: runs trained at the same time, each in its own process (1: one after the other, in-process)
    jobs: int = 1

    def train_flags(self) -> dict:
        """Every TrainConfig field compare sets the same for all runs."""
        flags = {k: getattr(self, k) for k in TRAIN_FLAGS if getattr(self, k) is not None}
        return {**flags, **self.train_options}

    def all_variants(self) -> list[Variant]:
        """``methods`` as variants, then ``variants``."""
        return [Variant(m, {}) for m in self.methods] + list(self.variants)


# --------------------------------------------------------------------------- parsing

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|m|min|h|hr)?\s*$", re.IGNORECASE)


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``"20m"``, ``"90s"``, ``"1.5h"`` or a plain number of seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        m = _DURATION.match(str(text))
        if not m:
            raise LipganError(
                f"cannot read the duration {text!r}; write it like 20m, 90s, 1.5h or 300"
            )
        unit = (m.group(2) or "s").lower()[0]
        seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[unit]
    if not seconds > 0 or not math.isfinite(seconds):
        raise LipganError(f"the budget must be a positive duration, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# --------------------------------------------------------------------------- checks


def variant_fields(variant: Variant) -> dict:
    """A variant's TrainConfig fields: ``method`` (its name when the variant is a bare method
    name), then its own options. Methods are :func:`lipgan.train.presets.methods`: the presets
    and the constraint registry's names."""
    from lipgan.train import presets

    options = dict(variant.options)
    method = options.pop("method", None)
    if method is None and variant.name not in presets.methods():
        raise LipganError(
            f"variant {variant.name}: name the method it trains, e.g. "
            f"{variant.name}:method=frobenius,width=64"
            if options
            else f"unknown method {variant.name!r}; choose from {', '.join(presets.methods())}"
        )
    if method is not None and method not in presets.methods():
        raise LipganError(
            f"variant {variant.name}: unknown method {method!r}; choose from "
            f"{', '.join(presets.methods())}"
        )
    return {"method": method or variant.name, **options}


def check(cfg: CompareConfig) -> list[Variant]:
    """Every setting checked, and every run's TrainConfig resolved, before anything is written;
    returns the variants."""
    if (cfg.budget_s is None) == (cfg.steps is None):
        raise LipganError("give exactly one of --budget (wall time per run) and --steps")
    if cfg.budget_clock not in ("wall", "cpu"):
        raise LipganError(f"--budget-clock must be wall or cpu, got {cfg.budget_clock!r}")
    if cfg.steps is not None and (isinstance(cfg.steps, bool) or cfg.steps < 1):
        raise LipganError(f"--steps must be at least 1, got {cfg.steps}")
    sweep.check_jobs(cfg.jobs)
    if not cfg.methods and not cfg.variants:
        raise LipganError("no methods to compare; pass --methods wgan-gp,sn,... or --variant")
    variants = cfg.all_variants()
    sweep.grid(variants, cfg.seeds, ".")  # names, duplicates and seeds
    own = sorted(set(cfg.train_options) & _OWN_FIELDS)
    if own:
        raise LipganError(
            f"train option(s) {', '.join(own)} are set by compare itself; use --methods, "
            "--seeds, --steps or --budget, --out, --quiet"
        )
    for v in variants:
        own = sorted(set(v.options) & (_OWN_FIELDS - {"method"}))
        if own:
            raise LipganError(f"variant {v.name}: {', '.join(own)} are set by compare itself")
    # Bad training flags fail here (type, range, choices), before anything is written.
    from lipgan.train import TrainConfig, device, presets

    for v in variants:
        tc = presets.resolve(TrainConfig.from_dict({**cfg.train_flags(), **variant_fields(v)}))
        if cfg.jobs > 1:
            from lipgan.constraints import base

            base.check_for_workers([tc.constraint, tc.generator_constraint])
    device.resolve_device(cfg.device or "auto")
    return variants


#: generator steps a budget run may take at most (its bound is the time): more than any reaches
BUDGET_STEP_CAP = 10**8


def budget_used(status: dict, cfg: CompareConfig) -> float:
    """Seconds of ``cfg``'s budget clock a run (its status.json) has used."""
    return float(status.get("cpu_s" if cfg.budget_clock == "cpu" else "wall_s") or 0.0)


def budget_slack(budget_s: float) -> float:
    """Time left under which a budget run counts as complete: 3% of the budget, at least 0.5 s."""
    return max(0.03 * budget_s, 0.5)


# --------------------------------------------------------------------------- compare.json

SETTINGS_FILE = "compare.json"


def settings(cfg: CompareConfig, variants: Sequence[Variant]) -> dict:
    return {
        "budget_s": cfg.budget_s,
        "budget_clock": cfg.budget_clock,
        "steps": cfg.steps,
        "train": cfg.train_flags(),
        "eval_n": cfg.eval_n if cfg.evaluate else None,
        # the variants that are more than a method's name (older folders have none)
        "variants": {v.name: v.options for v in variants if v.options},
    }


def check_settings(cfg: CompareConfig, variants: Sequence[Variant], out: Path) -> None:
    """Resuming with other training flags, another budget or another variant under the same
    name would mix unlike runs in one table: refuse, and say how to proceed. Variants and seeds
    may grow (only new runs are trained)."""
    fixed = settings(cfg, variants)
    path = out / SETTINGS_FILE
    before: dict = {}
    if path.is_file():
        try:
            before = json.loads(read_text(path))
        except ValueError:
            before = {}
        before.setdefault("budget_clock", "wall")  # folders from before the CPU clock
        diffs = [
            k for k in ("budget_s", "budget_clock", "steps", "train") if before.get(k) != fixed[k]
        ]
        old_v, new_v = before.get("variants") or {}, fixed["variants"]
        if any(old_v[n] != new_v[n] for n in set(old_v) & set(new_v)):
            diffs.append("variants")
        if diffs:
            old = {k: before.get(k) for k in diffs}
            new = {k: fixed[k] for k in diffs}
            raise LipganError(
                f"{out} was started with {json.dumps(old)}, now {json.dumps(new)}; rerun with "
                "the same flags to resume, or choose a new --out"
            )
    names = [v.name for v in variants]
    record = {
        **fixed,
        "variants": {**(before.get("variants") or {}), **fixed["variants"]},
        "methods": list(dict.fromkeys([*before.get("methods", []), *names])),
        "seeds": max(int(before.get("seeds", 0)), cfg.seeds),
        "config": asdict(cfg),
    }
    make_dirs(out)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
