"""Typed configs: YAML numbers, one validation style, generated CLI flags, bounds before work."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from lipgan import cli
from lipgan.errors import LipganError
from lipgan.train import config as K
from lipgan.train.config import TrainConfig


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def _yaml(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# --------------------------------------------------------------------------- YAML


def test_yaml_reads_scientific_notation_as_numbers(tmp_path):
    # PyYAML's YAML 1.1 reads `1e-4` (no dot) as a string, which crashed in torch's Adam.
    cfg = TrainConfig.from_yaml(_yaml(tmp_path, "lr_d: 1e-4\nlr_g: 2E-4\nsteps: 10\n"))
    assert cfg.lr_d == 1e-4 and cfg.lr_g == 2e-4 and isinstance(cfg.lr_d, float)
    assert K.parse_value("1e-3") == 1e-3 and K.parse_value("false") is False
    assert K.parse_options(["lam=1e-3", "form=sum"], "--constraint-option") == {
        "lam": 1e-3, "form": "sum"
    }  # fmt: skip


@pytest.mark.parametrize(
    "text, words",
    [
        ("steps: 1.5\n", "steps must be an integer"),
        ("steps: abc\n", "steps must be an integer"),
        ("steps: [3]\n", "steps must be an integer"),
        ("width: '8'\n", "width must be an integer"),
        ("checkpoint_every: 2.5\n", "checkpoint_every must be an integer"),
        ("threads: 1.5\n", "threads must be an integer"),
        ("quiet: no thanks\n", "quiet must be true or false"),
        ("tensorboard: 7\n", "tensorboard must be true or false"),
        ("n_critic: .inf\n", "n_critic must be an integer"),
        ("seed: zero\n", "seed must be an integer"),
        ("method: [1, 2]\n", "method must be a string"),
        ("out: 123\n", "out must be a string"),
        ("data_dir: [a, b]\n", "data_dir must be a string"),
        ("log_every: ten\n", "log_every must be an integer"),
        ("max_time_s: .nan\n", "max_time_s must be a finite number"),
        ("lr_d: 1e-4\nlr_d: 2e-4\n", "duplicate key 'lr_d'"),
        ("- 1\n- 2\n", "expected a mapping"),
        (b"steps: \xff\xfe\n", "not a UTF-8 text file"),
        ("bogus: 1\n", "unknown config keys ['bogus']"),
    ],
)
def test_wrong_types_in_yaml_are_one_line_errors(tmp_path, text, words):
    with pytest.raises(LipganError) as exc:
        TrainConfig.from_yaml(_yaml(tmp_path, text))
    assert words in _one_line(exc)


# --------------------------------------------------------------------------- value checks


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("lr_d", -1.0, "lr_d must be above 0"),
        ("lr_d", math.nan, "lr_d must be a finite number"),
        ("lr_g", -0.5, "lr_g must be above 0"),
        ("lr_g", math.inf, "lr_g must be a finite number"),
        ("beta1", 2.0, "beta1 must be below 1"),
        ("beta1", 1.0, "beta1 must be below 1"),
        ("beta2", math.nan, "beta2 must be a finite number"),
        ("beta2", -0.1, "beta2 must be at least 0"),
        ("weight_decay", -1.0, "weight_decay must be at least 0"),
        ("nan_lr_factor", 0.0, "nan_lr_factor must be above 0"),
        ("nan_lr_factor", -1e-34, "nan_lr_factor must be above 0"),
        ("nan_lr_factor", math.nan, "nan_lr_factor must be a finite number"),
        ("nan_lr_factor", 1.5, "nan_lr_factor must be at most 1"),
        ("batch_size", 100_000_000, "batch_size must be at most"),
        ("batch_size", 0, "batch_size must be at least 1"),
        ("width", 10_000_000, "width must be at most"),
        ("seed", 99999999999999999999999, "seed must be at most"),
        ("seed", -1, "seed must be at least 0"),
        ("fid_n", -5, "fid_n must be at least 2"),
        ("log_every", -1, "log_every must be at least 0"),
        ("keep_every", -1, "keep_every must be at least 0"),
        ("steps", 0, "steps must be at least 1"),
        ("on_nan", "maybe", "on_nan must be one of stop, rollback"),
        ("precision", "fp16", "precision must be one of auto, fp32, bf16"),
    ],
)
def test_out_of_range_values_are_refused_when_the_config_is_made(field, value, words):
    with pytest.raises(LipganError) as exc:
        TrainConfig(**{field: value})
    assert words in _one_line(exc)


#: "command flags" -> what the one-line error says: each bad value named by its flag.
BAD_FLAGS = {
    "train --lr-d nan": "--lr-d must be a finite number",
    "train --lr-d -1": "--lr-d must be above 0",
    "train --beta1 2": "--beta1 must be below 1",
    "train --weight-decay -1": "--weight-decay must be at least 0",
    "train --nan-lr-factor 0": "--nan-lr-factor must be above 0",
    "train --batch-size 1e8": "--batch-size must be at most",
    "train --width 10000000": "--width must be at most",
    "train --seed 99999999999999999999999": "--seed must be at most",
    "train --steps 1.5": "--steps must be an integer",
    "train --constraint-option lam=-1": "lam must be positive",
    "train --method no-such": "unknown method 'no-such'",
    "sample --n 0": "--n must be at least 1",
    "sample --n 1e9": "--n must be at most 200000",
    "sample --n 2.5": "--n must be an integer",
    "sample --seed -1": "--seed must be at least 0",
    "sample --nrow 0": "--nrow must be at least 1",
}


@pytest.mark.parametrize("line", BAD_FLAGS)
def test_cli_refuses_bad_values_before_anything_is_written(tmp_path, capsys, line):
    command, *flags = line.split()
    out = tmp_path / "out"  # the run folder (train) or the grid (sample)
    head = {"train": ["--width", "4", "--steps", "2", "--quiet", "--out", str(out)],
            "sample": [str(tmp_path / "no-run"), "--out", str(out)]}[command]  # fmt: skip
    assert cli.main([command, *head, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lipgan: error: ") and BAD_FLAGS[line] in err and "\n" not in err
    assert not out.exists()


def test_sample_flags_come_from_sample_config():
    from lipgan.train.config import SampleConfig

    bare = cli.build_parser().parse_args(["sample", "r"])
    assert K.given_flags(bare, SampleConfig) == {}  # unset flags: the dataclass's defaults
    args = cli.build_parser().parse_args(["sample", "r", "--n", "6", "--raw", "--interpolate"])
    cfg = K.from_args(args, SampleConfig)
    assert (cfg.n, cfg.raw, cfg.interpolate, cfg.out, cfg.seed) == (6, True, True, "grid.png", 0)


def test_yaml_config_through_the_cli(tmp_path):
    path = _yaml(tmp_path, "lr_d: 1e-4\nconstraint_options: {lam: 1e-3}\n")
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--config", str(path), "--lr-g", "3e-4"])
    from lipgan.cli.train import config_from_args

    cfg = config_from_args(args)
    assert (cfg.lr_d, cfg.lr_g, cfg.constraint_options) == (1e-4, 3e-4, {"lam": 1e-3})


# --------------------------------------------------------------------------- generic flags


@dataclass
class Toy(K.Config):
    n: int = K.option(3, "how many", low=1)
    rate: float | None = K.option(None, "a rate", above=0.0)
    fast: bool = K.option(False, "go fast")
    extra: dict = K.option({}, "KEY=VALUE extra")
    hidden: str = K.option("x", "not a flag", flag=False)


def test_add_flags_makes_one_flag_per_field_and_from_args_reads_back_only_given_ones():
    p = argparse.ArgumentParser()
    K.add_flags(p, Toy)
    helps = p.format_help()
    assert "--n N" in helps and "how many (default 3)" in helps and "--no-fast" in helps
    assert "--extra KEY=VALUE" in helps and "--hidden" not in helps
    args = p.parse_args(["--rate", "1e-2", "--fast", "--extra", "a=1"])
    assert K.given_flags(args, Toy) == {"rate": 0.01, "fast": True, "extra": {"a": 1}}
    toy = K.from_args(args, Toy, base={"n": 5})
    assert (toy.n, toy.rate, toy.fast, toy.extra, toy.hidden) == (5, 0.01, True, {"a": 1}, "x")
    with pytest.raises(LipganError, match="^--n must be at least 1"):  # named by its flag
        K.from_args(p.parse_args(["--n", "0"]), Toy)
    assert Toy().extra is not Toy().extra  # mutable defaults are per instance
