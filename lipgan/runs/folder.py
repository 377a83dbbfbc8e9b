"""One run folder, for every reader and every writer: :class:`RunFolder`.

Layout::

    RUN/config.yaml          resolved config, every field
    RUN/status.json          {"state", "reason", "step", "steps", "wall_s"}
    RUN/metrics.csv          one row per logged generator step (columns: METRIC_COLUMNS)
    RUN/layer_norms.csv      step, layer, operator_norm, reshaped_norm
    RUN/eval.json            sample-quality metrics of the last export (`lipgan eval`)
    RUN/tb/                  TensorBoard event files
    RUN/samples/step_XXXXXX.png, RUN/samples/last.png
    RUN/checkpoints/last.pt, RUN/checkpoints/step_XXXXXX.pt
    RUN/generator.safetensors, RUN/critic.safetensors
    RUN/manifest.json        sha256 of every checkpoint and export (lipgan.runs.manifest)
    RUN/.lock                the advisory lock of the one writer

Promises (docs/design.md, "Run folders"): a new run never reuses a folder that holds anything;
one writer at a time (``fcntl.flock`` on ``.lock``, taken at the first write); every file but
the CSVs is written atomically (temporary file, fsync, rename), the CSVs are appended row by row
and repaired on resume (:class:`lipgan.runs.logs.RunLogs`); exports are written before the
checkpoint that names them; every OS error is one line naming the path. No torch import here:
the report reads folders without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from lipgan.errors import LipganError
from lipgan.runs.files import (
    FolderLock,
    atomic_write_bytes,
    atomic_write_text,
    make_dirs,
    os_error,
    read_bytes,
    read_text,
    remove_partials,
    sha256_bytes,
    sha256_file,
)
from lipgan.runs.logs import RunLogs
from lipgan.runs.manifest import Manifest, tracked_write

# One lock per folder per process, shared by every RunFolder of that process on that folder: the
# lock keeps *other* processes out (a second `--resume`, two sweeps), while a sweep that trains in
# process and then writes the status of the same run is one writer.
_HELD: dict[str, list] = {}


def _yaml_error(path: Path, exc: yaml.YAMLError) -> LipganError:
    first = " ".join(str(exc).split())  # PyYAML's message spans lines; the CLI prints one
    return LipganError(f"{path}: not valid YAML ({first[:200]}); fix or restore the file")


class RunFolder(RunLogs):
    """One run folder. ``RunFolder(path)`` touches nothing and reading never writes.

    One writer: :meth:`create`, :meth:`lock` and the training writers (CSV logs, samples,
    TensorBoard, :meth:`save_checkpoint`) take the folder's lock and hold it until
    :meth:`close`; a single status, config or eval.json update holds it for that write only.
    Another process writing meanwhile gets a one-line LipganError naming the holder's pid."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._metrics_fh = None
        self._layers_fh = None
        self._tb = None
        self._locked = False

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ------------------------------------------------------------------ paths
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
    def eval_path(self) -> Path:
        return self.path / "eval.json"

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

    def export_path(self, kind: str) -> Path:
        return self.path / f"{kind}.safetensors"

    @property
    def manifest(self) -> Manifest:
        return Manifest(self.path)

    def exists(self) -> bool:
        """True when the folder already holds a run (a config or a checkpoint)."""
        return self.config_path.is_file() or self.last_checkpoint.is_file()

    def is_run(self) -> bool:
        """True when ``path`` looks like a run folder to a reader (status.json or config.yaml)."""
        return self.status_path.is_file() or self.config_path.is_file()

    # ------------------------------------------------------------------ one writer
    def lock(self) -> RunFolder:
        """Take the folder's advisory lock (idempotent). LipganError when another process holds
        it, or when the folder cannot be made or written."""
        if self._locked:
            return self
        make_dirs(self.path)
        key = os.path.realpath(self.path)
        held = _HELD.get(key)
        if held is None:
            held = _HELD[key] = [FolderLock(self.path).acquire(), 0]
        held[1] += 1
        self._locked = True
        return self

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the lock for one write: the folder's own, if :meth:`lock` (or :meth:`create`,
        or a training writer: CSV logs, samples, checkpoints) took it, else only for this write,
        so a handle used for one status update does not keep other processes out."""
        if self._locked:
            yield
            return
        self.lock()
        try:
            yield
        finally:
            self.unlock()

    def unlock(self) -> None:
        if not self._locked:
            return
        self._locked = False
        key = os.path.realpath(self.path)
        held = _HELD.get(key)
        if held is not None:
            held[1] -= 1
            if held[1] <= 0:
                del _HELD[key]
                held[0].release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.unlock()
        except Exception:  # interpreter shutdown: the kernel drops the lock with the process
            pass

    def _refuse_reuse(self, reuse: bool) -> None:
        if self.exists():
            raise LipganError(
                f"{self.path} already holds a run; continue it with `lipgan train --resume "
                f"{self.path}` or choose another --out"
            )
        if not self.path.is_dir() or reuse:
            return
        try:
            others = sorted(
                p.name
                for p in self.path.iterdir()
                if p.name != FolderLock.NAME and not p.name.endswith(".part")
            )
        except OSError as exc:
            raise os_error(exc, self.path) from None
        if others:
            raise LipganError(
                f"{self.path} exists and holds files that are not a lipgan run "
                f"({', '.join(others[:3])}{', …' if len(others) > 3 else ''}); choose "
                "another --out (nothing was changed)"
            )

    def create(self, config: Mapping[str, Any], *, reuse: bool = False) -> RunFolder:
        """Make the folder for a new run, lock it and write its config.

        Refused, with nothing changed, when the folder holds a run, or (unless ``reuse``) any
        file at all: an existing empty folder is fine, someone's notes are not."""
        self._refuse_reuse(reuse)  # before the lock: a refused folder gets no .lock file
        self.lock()
        try:
            self._refuse_reuse(reuse)  # again under the lock: another creator may have won
        except LipganError:
            self.unlock()
            raise
        self.write_config(config)
        return self

    # ------------------------------------------------------------------ config and status
    def write_config(self, config: Mapping[str, Any]) -> None:
        with self._writing():
            atomic_write_text(self.config_path, yaml.safe_dump(dict(config), sort_keys=False))

    def read_config(self) -> dict:
        """config.yaml as a dict; LipganError when missing, unreadable or not a mapping."""
        if not self.config_path.is_file():
            raise LipganError(f"{self.path}: no config.yaml; is this a lipgan run folder?")
        try:
            cfg = yaml.safe_load(read_text(self.config_path))
        except yaml.YAMLError as exc:
            raise _yaml_error(self.config_path, exc) from None
        if not isinstance(cfg, dict):
            raise LipganError(f"{self.config_path}: expected a mapping of config fields")
        return cfg

    def write_status(
        self,
        state: str,
        step: int,
        steps: int,
        wall_s: float,
        reason: str | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Write status.json: the five core keys, then the keys of ``extra`` (JSON values, e.g.
        CPU seconds or a measurement budget) that are not core keys (those always win)."""
        status = {
            "state": state,
            "reason": reason,
            "step": int(step),
            "steps": int(steps),
            "wall_s": round(float(wall_s), 3),
        }
        status.update({k: v for k, v in (extra or {}).items() if k not in status})
        with self._writing():
            atomic_write_text(self.status_path, json.dumps(status, indent=1) + "\n")

    def _read_json(self, path: Path) -> Any:
        if not path.is_file():
            return None
        try:
            return json.loads(read_text(path))
        except ValueError as exc:
            raise LipganError(f"{path} is not valid JSON ({exc}); rewrite or delete it") from None

    def read_status(self) -> dict | None:
        """status.json as a dict; None when there is none (or it is not an object)."""
        value = self._read_json(self.status_path)
        return value if isinstance(value, dict) else None

    # ------------------------------------------------------------------ eval.json
    def write_eval(self, result: Mapping[str, Any]) -> Path:
        """Write eval.json (the one writer of it: `lipgan eval` and `lipgan compare`)."""
        text = json.dumps(dict(result), indent=2, allow_nan=True) + "\n"
        with self._writing():
            return atomic_write_text(self.eval_path, text)

    def read_eval(self) -> dict | None:
        value = self._read_json(self.eval_path)
        return value if isinstance(value, dict) else None

    # ------------------------------------------------------------------ partial files
    def remove_partials(self) -> None:
        """Delete temporary files a killed writer left behind (``.NAME.*.part``)."""
        with self._writing():  # never another live writer's temporary file
            remove_partials(self.path, self.checkpoints_dir, self.samples_dir)

    # ------------------------------------------------------------------ TensorBoard
    def tensorboard(self, purge_step: int | None = None):
        """A lazily made ``SummaryWriter`` on RUN/tb (``purge_step``: drop later events, resume)."""
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self.lock()
            self._tb = SummaryWriter(log_dir=str(self.path / "tb"), purge_step=purge_step)
        return self._tb

    def close(self) -> None:
        """Close the logs and give the lock back (the folder can then be reopened)."""
        self.close_logs()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.unlock()

    # ------------------------------------------------------------------ samples
    def save_samples(self, step: int, images, nrow: int | None = None) -> Path:
        """Write the grid as samples/step_XXXXXX.png and samples/last.png; images in [-1, 1]."""
        from lipgan.image import encode_png, make_grid  # torch: only writers need it

        self.lock()
        data = encode_png(make_grid(images, nrow=nrow))
        path = atomic_write_bytes(self.samples_dir / f"step_{step:06d}.png", data)
        atomic_write_bytes(self.samples_dir / "last.png", data)
        return path

    def samples_png(self) -> bytes | None:
        """The bytes of samples/last.png, or None."""
        last = self.samples_dir / "last.png"
        return read_bytes(last) if last.is_file() else None

    # ------------------------------------------------------------------ checkpoints, exports
    def write_exports(self, exports: Mapping[str, Any]) -> dict[str, str]:
        """Write ``exports`` (kind -> :class:`lipgan.runs.Export`) as RUN/<kind>.safetensors,
        recorded in the manifest. Returns file name -> sha256."""
        from lipgan.runs.checkpoint import export_bytes  # torch: only writers need it

        files = {
            self.export_path(kind): export_bytes(e.module, kind, e.model, e.kwargs)
            for kind, e in exports.items()
        }
        with self._writing():
            return tracked_write(self.path, files) if files else {}

    def save_checkpoint(
        self,
        state: Mapping[str, Any],
        exports: Mapping[str, Any] | None = None,
        *,
        keep: bool = False,
    ) -> Path:
        """Write the exports first, then checkpoints/last.pt naming them (``state["exports"]``:
        file name -> sha256), and with ``keep`` also checkpoints/step_XXXXXX.pt.

        The order is the point: a process killed between the two leaves the old last.pt with
        new exports, and resuming it trains past that step and exports again; never a final
        last.pt beside stale exports. Every file is atomic and in manifest.json.
        """
        from lipgan.runs.checkpoint import checkpoint_bytes, export_bytes, validate_checkpoint

        validate_checkpoint(state, self.last_checkpoint)
        blobs = {
            self.export_path(kind): export_bytes(e.module, kind, e.model, e.kwargs)
            for kind, e in (exports or {}).items()
        }
        names = {p.name: sha256_bytes(b) for p, b in blobs.items()}
        data = checkpoint_bytes({**state, "exports": names} if names else dict(state))
        blobs[self.last_checkpoint] = data  # last: after the exports it names
        if keep:
            blobs[self.checkpoint_path(int(state["step"]))] = data
        self.lock()  # a training writer: held until close()
        tracked_write(self.path, blobs)  # one manifest write, then the files in this order
        return self.last_checkpoint

    def load_checkpoint(self, path: str | os.PathLike | None = None, map_location="cpu") -> dict:
        """checkpoints/last.pt (or ``path``), checked against the manifest and validated."""
        from lipgan.runs.checkpoint import load_checkpoint

        return load_checkpoint(self.last_checkpoint if path is None else path, map_location)

    def load_export(self, kind: str = "generator"):
        """RUN/<kind>.safetensors as a network in eval mode, checked against the manifest."""
        from lipgan.runs.checkpoint import load_network

        return load_network(self.path, kind)

    def stale_exports(self, state: Mapping[str, Any]) -> list[str]:
        """Export files that are not the ones ``state`` (a loaded checkpoint) names: all of them
        for a checkpoint written before checkpoints named their exports. Resume rewrites these."""
        named = state.get("exports")
        kinds = ("generator", "critic", "classifier")
        present = [self.export_path(k).name for k in kinds if self.export_path(k).is_file()]
        if not isinstance(named, dict):
            return present or [f"{k}.safetensors" for k in ("generator", "critic")]
        stale = []
        for name, sha in named.items():
            file = self.path / name
            if not file.is_file() or sha256_file(file) != sha:
                stale.append(name)
        return stale


def scored_generator(evaluation: Mapping[str, Any]) -> str:
    """Which generator an eval.json scored: ``"ema"`` (the moving average) or ``"raw"`` (the
    last iterate; also an eval.json written before eval.json said which)."""
    return str(evaluation.get("generator", "raw"))


def is_run_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` holds status.json or config.yaml."""
    return RunFolder(path).is_run()


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run folders named by ``paths``: a run folder stands for itself; a folder that is not one
    (a ``lipgan compare`` output, or any parent) stands for the run folders in it and in its
    ``runs/`` subfolder, sorted by name. Duplicates are dropped."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise LipganError(f"{p} does not exist; pass run folders written by `lipgan train`")
        if is_run_folder(p):
            out.append(p)
            continue
        try:
            found = [
                child
                for parent in (p, p / "runs")
                if parent.is_dir()
                for child in sorted(parent.iterdir())
                if child.is_dir() and is_run_folder(child)
            ]
        except OSError as exc:
            raise os_error(exc, p) from None
        if not found:
            raise LipganError(
                f"{p} is neither a run folder nor holds any (no status.json or config.yaml); "
                "pass folders written by `lipgan train` or `lipgan compare`"
            )
        out.extend(found)
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique
