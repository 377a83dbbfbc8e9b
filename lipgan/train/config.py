"""The run configuration: :class:`TrainConfig` and its resolution against the presets."""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field, fields
from typing import Any

from lipgan import models
from lipgan.errors import LipganError
from lipgan.train.device import resolve_precision
from lipgan.train.losses import _OPTIMIZERS, LOSSES
from lipgan.train.presets import _PRESET_FALLBACK, PRESETS


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` fields are filled from the method's preset.

    Each field is one ``lipgan train`` flag (``--lr-d`` for ``lr_d``) and one YAML key.
    """

    # what to train
    method: str = "wgan-gp"  # preset name, see PRESETS
    model: str | None = None  # architecture in lipgan.models (preset or dcgan28)
    width: int | None = None  # base width D (None: the architecture's default, 64 for dcgan28)
    z_dim: int = 128
    dataset: str = "mnist"  # mnist, fashion-mnist or a folder of IDX files
    data_dir: str | None = None
    steps: int = 2000  # generator steps
    # Stop once the run's training wall time (summed over resumes) reaches this many seconds, and
    # end it as if it had reached `steps` (0: no limit). `lipgan compare --budget` uses it.
    max_time_s: float = 0.0
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto | fp32 | bf16 (autocast; penalties' gradient norms stay fp32). auto: bf16 where the
    # device computes it natively (CUDA with bf16, a CPU with AVX512-BF16 or AMX), else fp32.
    precision: str = "auto"
    out: str | None = None  # run folder (default runs/<method>-<model>-<time>)
    # the method (preset values unless set)
    constraint: str | None = None  # name in lipgan.constraints, or comma-separated names
    constraint_options: dict = field(default_factory=dict)  # keyword overrides for it
    generator_constraint: str | None = None  # e.g. spectral-norm for SAGAN
    generator_constraint_options: dict = field(default_factory=dict)  # keyword overrides for it
    loss: str | None = None  # wasserstein | hinge | ns
    optimizer: str | None = None  # adam | rmsprop
    lr_d: float | None = None
    lr_g: float | None = None
    beta1: float | None = None  # Adam beta1; RMSProp momentum
    beta2: float | None = None  # Adam beta2; RMSProp smoothing constant alpha
    weight_decay: float | None = None  # critic, added to the constraint's own weight_decay
    n_critic: int | None = None
    burnin_steps: int | None = None  # WGAN: burnin_n_critic critic steps for the first ...
    burnin_n_critic: int | None = None
    burnin_every: int | None = None  # ... and at every burnin_every-th generator step (0: never)
    # recording
    log_every: int = 10  # metrics.csv row every N generator steps
    lip_every: int = 100  # gradient norms at real/fake/interpolates (0: off)
    layer_every: int = 1000  # layer_norms.csv and product_bound (0: off; costs seconds to minutes)
    sample_every: int = 500  # sample grid (always at the end)
    checkpoint_every: int = 200  # checkpoints/last.pt (always at the end)
    keep_every: int = 1000  # checkpoints/step_XXXXXX.pt kept (0: never)
    fid_every: int = 0  # FID from lipgan.metrics when available (0: only at the end; -1: never)
    fid_n: int = 2000
    n_samples: int = 64
    tensorboard: bool = True
    quiet: bool = False
    # robustness and speed
    on_nan: str = "stop"  # stop | rollback
    nan_lr_factor: float = 0.5
    max_rollbacks: int = 3
    threads: int = 0  # torch.set_num_threads when > 0 (CPU); 0 leaves torch's default
    compile: bool = False  # torch.compile, never on a critic whose penalty needs double backward
    channels_last: bool | None = None  # None: on for bf16 on a CPU (faster oneDNN convs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a mapping (YAML); unknown keys are a LipganError naming the valid ones."""
        names = {f.name for f in fields(cls)}
        d = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LipganError(
                f"unknown config keys {unknown}; valid keys: {', '.join(sorted(names))}"
            )
        return cls(**d)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _builder_default(kind: str, name: str, arg: str) -> Any:
    models.names(kind)  # make sure every model module is imported
    fn = models._REGISTRY.get((kind, name))
    if fn is None:
        raise LipganError(f"unknown {kind} model {name!r}; choose one of: {models.names(kind)}")
    p = inspect.signature(fn).parameters.get(arg)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill every ``None`` preset field from ``PRESETS[cfg.method]`` and check the values."""
    if cfg.method not in PRESETS:
        raise LipganError(f"unknown method {cfg.method!r}; choose one of: {', '.join(PRESETS)}")
    preset = {**_PRESET_FALLBACK, **PRESETS[cfg.method]}
    options = {
        key: (preset.pop(f"{key}_options", {}), getattr(cfg, key))
        for key in ("constraint", "generator_constraint")
    }
    changes = {k: v for k, v in preset.items() if getattr(cfg, k) is None}
    cfg = cfg.replace(**changes)
    for key, (preset_options, user_choice) in options.items():
        if not isinstance(getattr(cfg, f"{key}_options"), dict):
            raise LipganError(f"{key}_options must be a mapping of option names to values")
        if not preset_options or user_choice is not None:
            continue
        # The preset's options go with the constraint it picks: only when this call fills the
        # constraint in (a config read back from a run folder names its constraints and keeps
        # its own options). The user's options win; a user's other `form` takes the
        # constraint's own defaults for the rest (the preset's lam belongs to its form).
        mine = getattr(cfg, f"{key}_options")
        if "form" in mine and mine["form"] != preset_options.get("form"):
            merged = dict(mine)
        else:
            merged = {**preset_options, **mine}
        cfg = cfg.replace(**{f"{key}_options": merged})
    if cfg.width is None:
        cfg = cfg.replace(width=_builder_default("critic", cfg.model, "width"))
    if cfg.loss not in LOSSES:
        raise LipganError(f"unknown loss {cfg.loss!r}; choose one of: {', '.join(LOSSES)}")
    if cfg.optimizer not in _OPTIMIZERS:
        raise LipganError(f"unknown optimizer {cfg.optimizer!r}; use adam or rmsprop")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise LipganError(f"unknown precision {cfg.precision!r}; use auto, fp32 or bf16")
    if cfg.precision == "auto" or cfg.channels_last is None:
        cfg = resolve_precision(cfg)
    if cfg.on_nan not in ("stop", "rollback"):
        raise LipganError(f"unknown --on-nan {cfg.on_nan!r}; use stop or rollback")
    try:
        limit = float(cfg.max_time_s)
    except (TypeError, ValueError):
        limit = math.nan
    if not (limit >= 0 and math.isfinite(limit)):
        raise LipganError(
            f"max_time_s must be a number of seconds >= 0 (0: no limit), got {cfg.max_time_s!r}"
        )
    for name in ("steps", "batch_size", "n_critic", "width", "z_dim", "n_samples"):
        if int(getattr(cfg, name)) < 1:
            raise LipganError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    return cfg
