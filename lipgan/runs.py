"""Run folders: resolved config, status, metrics CSVs, TensorBoard events, samples, checkpoints.

Layout (a contract other commands read; see ``/work/notes/CONTRACTS.md``)::

    RUN/config.yaml          resolved TrainConfig, every field
    RUN/status.json          {"state", "reason", "step", "steps", "wall_s"}
    RUN/metrics.csv          one row per logged generator step (columns: METRIC_COLUMNS)
    RUN/layer_norms.csv      step, layer, operator_norm, reshaped_norm
    RUN/tb/                  TensorBoard event files
    RUN/samples/step_XXXXXX.png, RUN/samples/last.png
    RUN/checkpoints/last.pt, RUN/checkpoints/step_XXXXXX.pt
    RUN/generator.safetensors, RUN/critic.safetensors

Every file that a crash could leave half-written is written to a temporary file in the same
folder and renamed over the target (``os.replace`` is atomic on POSIX), except the CSVs, which are
appended row by row and repaired on resume (a torn last row is dropped).

Checkpoints hold only tensors, numbers, strings, lists, tuples and dicts, so
``torch.load(path, weights_only=True)`` reads them and a pickle that would run code is refused.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lipgan.errors import LipganError
from lipgan.schema import LAYER_COLUMNS, METRIC_COLUMNS

CHECKPOINT_FORMAT = "lipgan-checkpoint"
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------- atomic writes


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Serialize ``state`` with ``torch.save`` into memory, then write it atomically to ``path``.

    A reader never sees a half-written file: either the old checkpoint or the new one.
    """
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a lipgan checkpoint with ``weights_only=True``; every failure is a one-line LipganError.

    Truncated or corrupt files, pickles that reference Python callables (which would run code
    under a plain ``pickle.load``; here nothing is executed), and files that are not lipgan
    checkpoints are refused. Nothing is written anywhere.
    """
    path = Path(path)
    if not path.is_file():
        raise LipganError(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "pickle protocol" notes on foreign files
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights only" in str(exc).lower() or "unsupported global" in str(exc).lower():
            raise LipganError(
                f"{path}: refused to load: the file asks to run Python code or build objects "
                f"other than tensors ({first[:160]}); it is not a lipgan checkpoint and nothing "
                "from it was executed. Use a checkpoint written by lipgan"
            ) from None
        raise LipganError(
            f"{path}: corrupt checkpoint ({first[:160]}); use another file in checkpoints/"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LipganError(
            f"{path}: truncated or corrupt checkpoint ({msg[:160]}); "
            "resume from another file in checkpoints/ or start the run again"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise LipganError(f"{path}: not a lipgan checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    if state.get("version") != CHECKPOINT_VERSION:
        raise LipganError(
            f"{path}: checkpoint version {state.get('version')} is not supported by this lipgan "
            f"(reads version {CHECKPOINT_VERSION})"
        )
    return state


# --------------------------------------------------------------------------- safetensors export


def plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights with weight reparametrizations (spectral norm, ...) folded in.

    ``W_eff = W / sigma`` for spectral normalization, computed with the kept power-iteration
    vectors in eval mode (no iteration), so the exported network is the plain architecture
    computing the same function as the trained one in eval mode. The module is not changed
    (``remove_parametrizations`` on a deep copy would edit the class the copy shares).
    """
    from torch.nn.utils import parametrize

    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            state = dict(module.state_dict())
            for prefix, sub in module.named_modules():
                pre = f"{prefix}." if prefix else ""
                names: list[str] = []
                if parametrize.is_parametrized(sub):
                    names = list(sub.parametrizations.keys())
                    for key in [k for k in state if k.startswith(f"{pre}parametrizations.")]:
                        del state[key]
                for hook in sub._forward_pre_hooks.values():
                    # Old-style torch.nn.utils.spectral_norm / weight_norm hooks.
                    hname = getattr(hook, "name", None)
                    if type(hook).__name__ in ("SpectralNorm", "WeightNorm") and hname:
                        names.append(hname)
                        for suffix in ("_orig", "_u", "_v", "_g"):
                            state.pop(f"{pre}{hname}{suffix}", None)
                        if type(hook).__name__ == "SpectralNorm":
                            setattr(sub, hname, hook.compute_weight(sub, do_power_iteration=False))
                        else:
                            setattr(sub, hname, hook.compute_weight(sub))
                for name in names:
                    state[f"{pre}{name}"] = getattr(sub, name)
    finally:
        for m, was in modes.items():
            m.training = was
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def export_network(
    module: nn.Module, path: str | Path, kind: str, name: str, kwargs: dict[str, Any]
) -> Path:
    """Write ``module`` as a self-describing safetensors file (atomically).

    Metadata: ``lipgan_kind`` (generator / critic / classifier), ``lipgan_model`` (the registry
    name) and ``lipgan_kwargs`` (JSON of the builder's keyword arguments), which is all
    :func:`load_network` needs to rebuild it.
    """
    from safetensors.torch import save

    from lipgan import models

    state = plain_state_dict(module)
    try:  # keep only what the plain architecture holds (a constraint may add buffers)
        want = models.build(kind, name, **kwargs).state_dict().keys()
        if set(want) <= set(state):
            state = {k: state[k] for k in want}
    except LipganError:
        pass
    meta = {
        "lipgan_kind": kind,
        "lipgan_model": name,
        "lipgan_kwargs": json.dumps(kwargs, sort_keys=True),
    }
    return atomic_write_bytes(path, save(state, metadata=meta))


def load_network(path: str | Path, which: str = "critic") -> nn.Module:
    """Rebuild a network from a run folder (``RUN/<which>.safetensors``) or a safetensors file.

    ``which`` is ``"critic"``, ``"generator"`` or ``"classifier"``; the file's metadata names the
    architecture and its options. Returns the module in eval mode on the CPU.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from lipgan import models

    path = Path(path)
    if path.is_dir():
        file = path / f"{which}.safetensors"
        if not file.is_file():
            raise LipganError(
                f"{path}: no {which}.safetensors in this run folder (it is written at each "
                "checkpoint and at the end of training)"
            )
    else:
        file = path
        if not file.is_file():
            raise LipganError(f"{path}: no such file or run folder")
    try:
        with safe_open(str(file), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LipganError(f"{file}: not a readable safetensors file ({exc})") from None
    if "lipgan_model" not in meta or "lipgan_kind" not in meta:
        raise LipganError(f"{file}: no lipgan metadata; export it with lipgan.runs.export_network")
    kind = meta["lipgan_kind"]
    if not path.is_dir() and which != kind and which in ("critic", "generator", "classifier"):
        # An explicit file: trust its metadata, but say so when the caller expected another kind.
        if which != "critic":  # "critic" is the default; a classifier file is fine then
            raise LipganError(f"{file} holds a {kind}, not a {which}")
    kwargs = json.loads(meta.get("lipgan_kwargs") or "{}")
    net = models.build(kind, meta["lipgan_model"], **kwargs)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise LipganError(
            f"{file}: weights do not fit {kind} {meta['lipgan_model']} {kwargs}: {first}"
        ) from None
    return net.eval()


# --------------------------------------------------------------------------- run folder


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


class Run:
    """One run folder. Creating the object touches nothing; :meth:`create` makes the folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._metrics_fh = None
        self._layers_fh = None
        self._tb = None

    # paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def layer_norms_path(self) -> Path:
        return self.path / "layer_norms.csv"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints_dir / "last.pt"

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"step_{step:06d}.pt"

    def exists(self) -> bool:
        """True when the folder already holds a run (a config or a checkpoint)."""
        return self.config_path.is_file() or self.last_checkpoint.is_file()

    def create(self, config: dict) -> Run:
        """Make the folder for a new run and write its resolved config; refuse to clobber a run."""
        if self.exists():
            raise LipganError(
                f"{self.path} already holds a run; continue it with `lipgan train --resume "
                f"{self.path}` or choose another --out"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(config)
        return self

    # config and status
    def write_config(self, config: dict) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict:
        if not self.config_path.is_file():
            raise LipganError(f"{self.path}: no config.yaml; is this a lipgan run folder?")
        try:
            cfg = yaml.safe_load(self.config_path.read_text())
        except yaml.YAMLError as exc:
            raise LipganError(f"{self.config_path}: not valid YAML ({exc})") from None
        if not isinstance(cfg, dict):
            raise LipganError(f"{self.config_path}: expected a mapping of config fields")
        return cfg

    def write_status(
        self, state: str, step: int, steps: int, wall_s: float, reason: str | None = None
    ) -> None:
        status = {
            "state": state,
            "reason": reason,
            "step": int(step),
            "steps": int(steps),
            "wall_s": round(float(wall_s), 3),
        }
        atomic_write_text(self.status_path, json.dumps(status, indent=1) + "\n")

    def read_status(self) -> dict | None:
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return None

    # CSV logs
    def _open_csv(self, path: Path, columns: Iterable[str]):
        new = not path.is_file() or path.stat().st_size == 0
        fh = open(path, "a", newline="")
        if new:
            csv.writer(fh).writerow(columns)
            fh.flush()
        return fh

    def log_metrics(self, row: dict[str, Any]) -> None:
        """Append one row to metrics.csv (unknown keys are an error; missing ones stay empty)."""
        extra = set(row) - set(METRIC_COLUMNS)
        if extra:
            raise ValueError(f"unknown metrics columns {sorted(extra)}")
        if self._metrics_fh is None:
            self._metrics_fh = self._open_csv(self.metrics_path, METRIC_COLUMNS)
        csv.writer(self._metrics_fh).writerow([_fmt(row.get(c)) for c in METRIC_COLUMNS])
        self._metrics_fh.flush()

    def log_layer_norms(self, step: int, rows: Iterable[tuple[str, Any, Any]]) -> None:
        """Append ``(layer, operator_norm, reshaped_norm)`` rows for ``step`` to layer_norms.csv."""
        if self._layers_fh is None:
            self._layers_fh = self._open_csv(self.layer_norms_path, LAYER_COLUMNS)
        w = csv.writer(self._layers_fh)
        for layer, op, reshaped in rows:
            w.writerow([step, layer, _fmt(op), _fmt(reshaped)])
        self._layers_fh.flush()

    def truncate_logs(self, after_step: int) -> None:
        """Drop CSV rows with ``step > after_step`` and torn rows (resume, rollback)."""
        self.close_logs()
        for path, columns in (
            (self.metrics_path, METRIC_COLUMNS),
            (self.layer_norms_path, LAYER_COLUMNS),
        ):
            if not path.is_file():
                continue
            with open(path, newline="") as fh:
                rows = list(csv.reader(fh))
            keep = [list(columns)]
            for r in rows[1:]:
                if len(r) != len(columns):
                    continue
                try:
                    if int(r[0]) <= after_step:
                        keep.append(r)
                except ValueError:
                    continue
            buf = io.StringIO()
            csv.writer(buf).writerows(keep)
            atomic_write_text(path, buf.getvalue())

    def remove_partials(self) -> None:
        """Delete temporary files a killed writer left behind (``.NAME.*.part``)."""
        for folder in (self.path, self.checkpoints_dir, self.samples_dir):
            if folder.is_dir():
                for f in folder.glob(".*.part"):
                    f.unlink(missing_ok=True)

    def read_metrics(self) -> list[dict[str, float | None]]:
        """metrics.csv as a list of dicts (empty cells -> None)."""
        if not self.metrics_path.is_file():
            return []
        with open(self.metrics_path, newline="") as fh:
            return [
                {k: (float(v) if v not in ("", None) else None) for k, v in r.items()}
                for r in csv.DictReader(fh)
            ]

    # TensorBoard
    def tensorboard(self, purge_step: int | None = None):
        """A lazily made ``SummaryWriter`` on RUN/tb (``purge_step``: drop later events, resume)."""
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.path / "tb"), purge_step=purge_step)
        return self._tb

    def close_logs(self) -> None:
        for attr in ("_metrics_fh", "_layers_fh"):
            fh = getattr(self, attr)
            if fh is not None:
                fh.close()
                setattr(self, attr, None)

    def close(self) -> None:
        self.close_logs()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    # samples
    def save_samples(self, step: int, images: torch.Tensor, nrow: int | None = None) -> Path:
        """Write the grid as samples/step_XXXXXX.png and samples/last.png; images in [-1, 1]."""
        from lipgan.image import encode_png, make_grid

        data = encode_png(make_grid(images, nrow=nrow))
        path = atomic_write_bytes(self.samples_dir / f"step_{step:06d}.png", data)
        atomic_write_bytes(self.samples_dir / "last.png", data)
        return path
