"""Typed configurations: one validation style, YAML that reads numbers as numbers, CLI flags.

A configuration is a dataclass deriving from :class:`Config` whose fields are made with
:func:`option`: a default, a help line and the value's checks (``low``/``high`` inclusive,
``above``/``below`` exclusive, ``choices``). Every value is checked when the object is made (type,
range, finite), so a bad value is a one-line :class:`LipganError` before anything is written:

- ``int`` fields take integers only (``steps: 1.5`` is refused, never rounded), ``bool`` fields
  ``true``/``false`` only, ``float`` fields numbers (also numeric strings such as ``"1e-4"``, which
  YAML 1.1 loaders return as strings), always finite;
- ``X | None`` fields also take ``None`` (for :class:`TrainConfig`: "the method preset's value").

:func:`add_flags` makes one ``--flag`` per field of any such dataclass and :func:`from_args`
reads them back (a bad value's message names its flag: ``--lr-d must be above 0``), so every
command's flags come from its dataclass (``--lr-d`` sets ``lr_d``; a ``dict`` field becomes a
repeatable ``--NAME-option KEY=VALUE``). :func:`load_yaml` reads YAML
with YAML 1.2's numbers (``1e-4`` is a float) and refuses duplicate keys.

This module imports no torch, so a command's parser stays cheap to build.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lipgan.errors import LipganError

T = TypeVar("T", bound="Config")

# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats (``1e-4``, ``1E5``) and no duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 needs a dot in a float; YAML 1.2 (and every user) reads 1e-4 as a number.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping read from ``path``; every failure is a one-line LipganError naming it."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise LipganError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise LipganError(f"{path}: not a UTF-8 text file") from None
    try:
        loaded = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise LipganError(f"{path}: not valid YAML ({first})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        kind = type(loaded).__name__
        raise LipganError(f"{path}: expected a mapping of config fields, got a {kind}")
    return loaded


def parse_value(text: str) -> Any:
    """One YAML scalar or list from a command line (``5`` -> 5, ``1e-4`` -> 0.0001, ``false``)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506
    except yaml.YAMLError:
        return text


# --------------------------------------------------------------------------- fields


def option(default: Any = None, help: str = "", **checks: Any) -> Any:
    """A config field: ``option(64, "samples per batch", low=1, high=65536)``.

    ``checks``: ``low``/``high`` (inclusive), ``above``/``below`` (exclusive), ``choices`` (a
    tuple), ``flag=False`` (no CLI flag). A mutable default (``{}``) is copied per instance.
    """
    meta = {"help": help, **checks}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _base(tp: Any) -> tuple[Any, bool]:
    """``(type, optional)`` of an annotation: ``int | None`` -> ``(int, True)``."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    origin = typing.get_origin(tp)
    return (origin or tp), False


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """``value`` as a ``tp`` (int, float, bool, str, dict, list), or a LipganError."""
    what = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping", list: "a list"}.get(tp)  # fmt: skip
    if what is None:
        return value
    if tp is float:
        if isinstance(value, str):  # "1e-4" from a YAML 1.1 loader, "nan" from a flag
            with contextlib.suppress(ValueError):
                value = float(value.strip().lower().replace(".inf", "inf").replace(".nan", "nan"))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):
                raise LipganError(f"{name} must be a finite number, got {value}")
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    elif isinstance(value, tp):
        return value
    raise LipganError(f"{name} must be {what}, got {value!r}")


def check_value(name: str, value: Any, tp: Any, meta: typing.Mapping) -> Any:
    """Type and range check of one field value (see :func:`option`); returns it coerced."""
    base, optional = _base(tp)
    if value is None:
        if optional:
            return None
        raise LipganError(f"{name} must be set (it has no preset value)")
    value = _coerce(name, value, base)
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise LipganError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    for key, ok, word in (
        ("low", lambda v, b: v >= b, "at least"),
        ("high", lambda v, b: v <= b, "at most"),
        ("above", lambda v, b: v > b, "above"),
        ("below", lambda v, b: v < b, "below"),
    ):
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise LipganError(f"{name} must be {word} {bound:g}, got {value!r}")
    return value


@dataclass
class Config:
    """Base of lipgan's configurations: checked fields, dict and YAML round trips."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = check_value(f.name, getattr(self, f.name), hints[f.name], f.metadata)
            object.__setattr__(self, f.name, value)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], d: typing.Mapping) -> T:
        """Build from a mapping (YAML); unknown keys are a LipganError naming the valid ones."""
        if not isinstance(d, typing.Mapping):
            raise LipganError(f"expected a mapping of {cls.__name__} fields, got {d!r}")
        names = {f.name for f in fields(cls)}
        d = {str(k).replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LipganError(
                f"unknown config keys {unknown}; valid keys: {', '.join(sorted(names))}"
            )
        return cls(**d)

    @classmethod
    def from_yaml(cls: type[T], path: str | Path) -> T:
        return cls.from_dict(load_yaml(path))

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- CLI flags


def option_flag(name: str) -> str:
    """The repeatable flag of a ``dict`` field: ``constraint_options`` -> ``--constraint-option``.
    """
    return "--" + name.removesuffix("s").replace("_", "-")


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type[Config],
    *,
    exclude: typing.Iterable[str] = (),
    defaults: typing.Mapping[str, Any] | None = None,
) -> None:
    """Add one flag per field of ``cls`` (``--lr-d`` for ``lr_d``) with the field's help.

    Flags not given stay out of the namespace (``argparse.SUPPRESS``), so :func:`from_args`
    knows what the user set. A ``dict`` field is ``--NAME-option KEY=VALUE`` (repeatable), a
    ``bool`` field ``--NAME`` / ``--no-NAME``. Values are checked by the dataclass itself.
    ``defaults``: shown in the help instead of the dataclass's (a command's own defaults).
    """
    hints = typing.get_type_hints(cls)
    skip = set(exclude)
    for f in fields(cls):
        if f.name in skip or not f.metadata.get("flag", True):
            continue
        base, _ = _base(hints[f.name])
        default = (defaults or {}).get(f.name, f.default)
        help_ = f.metadata.get("help", "") or f.name
        if default not in (None, dataclasses.MISSING) and base is not dict:
            help_ += f" (default {default})"
        help_ = help_.replace("%", "%%")  # argparse formats help with %
        if base is dict:
            parser.add_argument(
                option_flag(f.name), dest=f.name, action="append", metavar="KEY=VALUE",
                default=argparse.SUPPRESS, help=help_,
            )  # fmt: skip
        elif base is bool:
            parser.add_argument(
                "--" + f.name.replace("_", "-"), dest=f.name,
                action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_,
            )  # fmt: skip
        else:
            parser.add_argument(
                "--" + f.name.replace("_", "-"), dest=f.name, type=_flag_type(base),
                default=argparse.SUPPRESS, help=help_, metavar=f.name.upper(),
            )  # fmt: skip


def _flag_type(base: Any):
    """A flag's text as the field's type; ``--steps 1e3`` is 1000, the dataclass checks ranges."""

    def convert(text: str) -> Any:
        if base is str or base is Any:
            return text
        value = parse_value(text)
        if base is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if base is list and not isinstance(value, list):  # --fid-at-s 60,120 (or one value)
            value = [parse_value(t) for t in str(text).split(",") if t.strip()]
        return value

    convert.__name__ = getattr(base, "__name__", "value")
    return convert


def parse_options(items: typing.Iterable[str], flag: str) -> dict:
    """``["lam=5", "form=sum"]`` -> ``{"lam": 5, "form": "sum"}`` (YAML 1.2 values)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise LipganError(f"{flag} {item!r}: write KEY=VALUE, e.g. lam=5")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = parse_value(v)
    return out


def given_flags(args: argparse.Namespace, cls: type[Config]) -> dict:
    """The fields of ``cls`` the command line set (``dict`` fields parsed from KEY=VALUE)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        if f.name not in vars(args):
            continue
        value = getattr(args, f.name)
        if _base(hints[f.name])[0] is dict:
            value = parse_options(value, option_flag(f.name))
        out[f.name] = value
    return out


def check_flags(flags: typing.Mapping[str, Any], cls: type[Config]) -> dict:
    """``flags`` (from :func:`given_flags`) checked as ``cls`` checks its fields, so a bad value's
    message names the flag the user typed (``--lr-d must be above 0``), not the field."""
    hints, meta = typing.get_type_hints(cls), {f.name: f.metadata for f in fields(cls)}
    out = dict(flags)
    for name, value in flags.items():
        if _base(hints[name])[0] is not dict:  # parse_options already names its flag
            out[name] = check_value("--" + name.replace("_", "-"), value, hints[name], meta[name])
    return out


def from_args(args: argparse.Namespace, cls: type[T], base: typing.Mapping | None = None) -> T:
    """``cls`` from ``base`` (e.g. a YAML file's mapping) with the flags the user gave on top."""
    return cls.from_dict({**dict(base or {}), **check_flags(given_flags(args, cls), cls)})


# --------------------------------------------------------------------------- lipgan sample


@dataclass
class SampleConfig(Config):
    """`lipgan sample`: a grid of images (or of interpolations) from a trained generator."""

    n: int = option(64, "number of images", low=1, high=200_000)
    out: str = option("grid.png", "PNG to write")
    seed: int = option(0, "seed of the latent draws", low=0, high=2**63 - 1)
    nrow: int | None = option(None, "images per row", low=1, high=200_000)
    interpolate: bool = option(
        False, "rows of spherical interpolations between two random latents"
    )
    device: str = option("cpu", "cpu, cuda or auto")
    raw: bool = option(
        False, "sample a run folder's raw generator (the last iterate); without it, its moving "
        "average generator_ema.safetensors where the run keeps one",
    )  # fmt: skip


# --------------------------------------------------------------------------- the GAN run

#: Upper bounds on sizes, checked before any work starts: each is far above any run this
#: toolkit makes on 28x28 images, and far below what would exhaust memory in one allocation.
MAX_BATCH = 65536
MAX_WIDTH = 4096
MAX_STEPS = 10**9
MAX_SAMPLES = 1_000_000
MAX_SEED = 2**32 - 1


@dataclass
class TrainConfig(Config):
    """Everything a training run depends on. ``None`` fields are filled from the method's preset
    (:func:`lipgan.train.presets.resolve`).

    Each field is one ``lipgan train`` flag (``--lr-d`` for ``lr_d``) and one YAML key.
    """

    # what to train
    method: str = option("wgan-gp", "method preset (see `lipgan.train.presets.methods()`)")
    model: str | None = option(None, "architecture: dcgan28 (WGAN-GP paper), mlp (WGAN paper), "
                               "sagan28; default the preset's, else dcgan28")  # fmt: skip
    width: int | None = option(
        None, "base width D of both networks (default: the model's, 64 for dcgan28)",
        low=1, high=MAX_WIDTH,
    )  # fmt: skip
    z_dim: int = option(128, "latent size", low=1, high=MAX_WIDTH)
    dataset: str = option("mnist", "mnist, fashion-mnist, or a folder holding the four IDX files")
    data_dir: str | None = option(None, "read the dataset's IDX files from this folder")
    steps: int = option(2000, "generator steps to train (the total, also when resuming)",
                        low=1, high=MAX_STEPS)  # fmt: skip
    max_time_s: float = option(
        0.0, "stop when the run has trained this many seconds (summed over resumes) and end it as "
        "at --steps; 0: no limit (`lipgan compare --budget` uses it)", low=0.0,
    )  # fmt: skip
    max_cpu_s: float = option(
        0.0, "stop when the run's process has used this many CPU seconds (all threads, training "
        "and measurement, summed over resumes) and end it as at --steps: an equal CPU budget "
        "whatever the machine's load; 0: no limit (`lipgan compare --budget-clock cpu`)", low=0.0,
    )  # fmt: skip
    batch_size: int | None = option(
        None, "samples per batch (real and fake each; default the recipe's, else 64)",
        low=1, high=MAX_BATCH,
    )  # fmt: skip
    seed: int = option(0, "seed of every random stream (weights, batches, noise)",
                       low=0, high=MAX_SEED)  # fmt: skip
    device: str = option("auto", "auto (cuda when available), cpu, cuda or cuda:N")
    precision: str = option(
        "auto", "auto (bf16 where the device computes it natively, else fp32), fp32, or bf16 "
        "autocast (gradient-penalty norms stay float32)", choices=("auto", "fp32", "bf16"),
    )  # fmt: skip
    out: str | None = option(None, "run folder (default runs/<method>-<model>-<time>)")
    recipe: str = option(
        "paper", "paper: the method's published settings; fast: lipgan's recipe for quality per "
        "CPU second (lipgan.train.presets.FAST, docs/recipes.md)", choices=("paper", "fast"),
    )  # fmt: skip
    generator_norm: str | None = option(
        None, "normalization in the generator before each hidden ReLU: none, or batch (DCGAN, "
        "Radford et al. 2016); dcgan28 only", choices=("none", "batch"),
    )  # fmt: skip
    # the method (preset values unless set)
    constraint: str | None = option(
        None, "Lipschitz method of the critic: a lipgan.constraints name, or comma-separated names"
    )
    constraint_options: dict = option({}, "KEY=VALUE option of the constraint, e.g. lam=5 "
                                      "(repeatable)")  # fmt: skip
    generator_constraint: str | None = option(None, "constraint on the generator, e.g. "
                                              "spectral-norm (sagan)")  # fmt: skip
    generator_constraint_options: dict = option(
        {}, "KEY=VALUE option of the generator's constraint, e.g. last_layer=false (repeatable)"
    )
    loss: str | None = option(None, "wasserstein, hinge or ns (non-saturating)")
    optimizer: str | None = option(None, "adam or rmsprop")
    lr_d: float | None = option(None, "critic learning rate", above=0.0)
    lr_g: float | None = option(None, "generator learning rate", above=0.0)
    beta1: float | None = option(None, "Adam beta1 (RMSProp: momentum)", low=0.0, below=1.0)
    beta2: float | None = option(None, "Adam beta2 (RMSProp: smoothing constant alpha)",
                                 low=0.0, below=1.0)  # fmt: skip
    weight_decay: float | None = option(None, "critic weight decay, added to the constraint's own",
                                        low=0.0)  # fmt: skip
    n_critic: int | None = option(None, "critic steps per generator step", low=1, high=10_000)
    penalty_every: int | None = option(
        None, "lazy penalty (Karras et al. 2020): the constraint's penalty on every k-th critic "
        "step only, weighted k (default 1: every step)", low=1, high=10_000,
    )  # fmt: skip
    burnin_steps: int | None = option(
        None, "WGAN schedule: --burnin-n-critic critic steps for the first N generator steps",
        low=0,
    )  # fmt: skip
    burnin_n_critic: int | None = option(None, "critic steps during burn-in (WGAN: 100)",
                                         low=1, high=10_000)  # fmt: skip
    burnin_every: int | None = option(None, "and at every N-th generator step (WGAN: 500; 0: "
                                      "never)", low=0)  # fmt: skip
    # recording
    log_every: int = option(10, "metrics.csv/TensorBoard row every N generator steps (0: off)",
                            low=0)  # fmt: skip
    lip_every: int = option(100, "gradient norms at real/fake/interpolates every N steps (0: off)",
                            low=0)  # fmt: skip
    layer_every: int = option(
        1000, "per-layer operator norms and product bound every N steps (0: off; seconds to "
        "minutes each)", low=0,
    )  # fmt: skip
    sample_every: int = option(500, "sample grid every N steps (and at the end; 0: end only)",
                               low=0)  # fmt: skip
    checkpoint_every: int = option(200, "write checkpoints/last.pt every N steps (and at the "
                                   "end; 0: end only)", low=0)  # fmt: skip
    keep_every: int = option(1000, "keep checkpoints/step_XXXXXX.pt every N steps (0: never)",
                             low=0)  # fmt: skip
    fid_every: int = option(0, "FID every N steps (0: at the end only; -1: never)", low=-1)
    fid_n: int = option(2000, "samples per FID", low=2, high=MAX_SAMPLES)
    n_samples: int = option(64, "images in each sample grid", low=1, high=4096)
    ema: float = option(
        10_000.0, "half-life in training images of the generator's moving average, exported as "
        "generator_ema.safetensors (0: none); ramped up over the first --ema-rampup of training",
        low=0.0, high=1e12,
    )  # fmt: skip
    ema_rampup: float | None = option(
        None, "EMA ramp (StyleGAN2-ADA): half-life min(ema, ema_rampup * images seen); 0: no ramp "
        "(default the recipe's, else 0.05; docs/recipes.md: in short runs the ramp, not the "
        "half-life, sets the average)", low=0.0, high=1.0,
    )  # fmt: skip
    fid_at_s: list = option(
        [60.0, 120.0, 300.0, 600.0], "FID (EMA generator, --fid-n samples) when the run's wall "
        "time (its CPU time with --max-cpu-s) passes each of these seconds, e.g. 60,120,300 "
        "(empty or --fid-every -1: none); within the budget",
    )  # fmt: skip
    measure_budget: float = option(
        0.05, "largest share of the run's wall time for measurements (gradient norms, layer "
        "tables, FID, samples, checkpoints); a due one that would exceed it is postponed "
        "(1: never postpone)", low=0.0, high=1.0,
    )  # fmt: skip
    summary_eval_n: int = option(
        0, "after training: score N EMA samples with `lipgan eval`'s metrics, write eval.json "
        "and print a summary (0: summary from the logs only)", low=0, high=MAX_SAMPLES,
    )  # fmt: skip
    summary_report: bool = option(False, "after training: write RUN/report.html (lipgan.report) "
                                  "and name it in the summary")  # fmt: skip
    tensorboard: bool = option(True, "write TensorBoard events to RUN/tb")
    quiet: bool = option(False, "no progress bar")
    # robustness and speed
    on_nan: str = option("stop", "on a non-finite loss: stop, or rollback to the last checkpoint "
                         "with lower learning rates", choices=("stop", "rollback"))  # fmt: skip
    nan_lr_factor: float = option(0.5, "learning-rate factor applied at each rollback, in (0, 1]",
                                  above=0.0, high=1.0)  # fmt: skip
    max_rollbacks: int = option(3, "rollbacks before giving up", low=0, high=1000)
    threads: int = option(0, "torch CPU threads (0: torch's default)", low=0, high=4096)
    compile: bool = option(False, "torch.compile the networks (a critic only where its "
                           "constraint's needs_input_grad is false)")  # fmt: skip
    channels_last: bool | None = option(None, "channels-last memory format for the convolutions "
                                        "(default: on with bf16 on a CPU)")  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        marks = []
        for v in self.fid_at_s:
            mark = _coerce("fid_at_s", v, float)
            if not mark > 0:
                raise LipganError(f"fid_at_s must hold seconds above 0, got {v!r}")
            marks.append(mark)
        object.__setattr__(self, "fid_at_s", sorted(set(marks)))

