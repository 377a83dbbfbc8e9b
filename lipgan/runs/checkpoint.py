"""Checkpoints and safetensors exports: serialization, validation, integrity checks.

Checkpoints hold only tensors, numbers, strings, lists, tuples and dicts, so
``torch.load(path, weights_only=True)`` reads them and a pickle that would run code is refused.
Every load reads the file's bytes once, checks them against the run folder's ``manifest.json``
(see :mod:`lipgan.runs.manifest`) and validates the structure (the type of every field) before
the caller touches anything; each failure is one ``LipganError`` line.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from lipgan.errors import LipganError
from lipgan.runs.files import atomic_write_bytes
from lipgan.runs.manifest import Manifest, run_root, tracked_write, verified_read

CHECKPOINT_FORMAT = "lipgan-checkpoint"
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------- checkpoints


def checkpoint_bytes(state: Mapping[str, Any]) -> bytes:
    """``torch.save`` of ``{"format", "version", **state}`` into memory."""
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, buf)
    return buf.getvalue()


def _in_run_folder(path: Path) -> bool:
    root = run_root(path)
    return (root / "config.yaml").is_file() or Manifest(root).exists()


def write_file(path: str | Path, data: bytes) -> Path:
    """Write a checkpoint or export atomically; inside a run folder, record it in the manifest."""
    path = Path(path)
    if _in_run_folder(path):
        from lipgan.runs.folder import RunFolder

        with RunFolder(run_root(path))._writing():  # refused while another process writes
            tracked_write(run_root(path), {path: data})
    else:
        atomic_write_bytes(path, data)
    return path


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Serialize ``state`` in memory, then write it atomically (and into the manifest).

    A reader never sees a half-written file: either the old checkpoint or the new one.
    """
    return write_file(path, checkpoint_bytes(state))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a lipgan checkpoint with ``weights_only=True``; every failure is a one-line LipganError.

    The bytes are checked against the run folder's manifest (a flipped bit is "checksum
    mismatch"); truncated or corrupt files, pickles that reference Python callables (which would
    run code under a plain ``pickle.load``; here nothing is executed), files that are not lipgan
    checkpoints and fields of the wrong type are refused. Nothing is written anywhere.
    """
    path = Path(path)
    if not path.is_file():
        raise LipganError(f"{path}: no such checkpoint")
    # Checked before parsing: a changed file is never unpickled, not even under weights_only.
    data = verified_read(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "pickle protocol" notes on foreign files
            state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
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
    validate_checkpoint(state, path)
    return state


# --------------------------------------------------------------------------- structure


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62


def _is_finite(v: Any, positive: bool = False) -> bool:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return ok and (v > 0 if positive else v >= 0)


def _is_tensors(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()
    )


def _is_optimizer(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and isinstance(v.get("state"), dict)
        and isinstance(v.get("param_groups"), list)
        and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in v["param_groups"]
        )
        and all(isinstance(s, dict) for s in v["state"].values())
    )


def _is_byte_state(v: Any) -> bool:
    size = torch.get_rng_state().numel()  # every CPU generator's state has this size
    return isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.numel() == size


def _is_python_rng(v: Any) -> bool:
    return (
        isinstance(v, (list, tuple))
        and len(v) == 3
        and isinstance(v[0], int)
        and isinstance(v[1], (list, tuple))
        and len(v[1]) == 625
        and all(isinstance(x, int) for x in v[1])
        and (v[2] is None or isinstance(v[2], float))
    )


def _is_numpy_rng(v: Any) -> bool:
    return (
        isinstance(v, (list, tuple))
        and len(v) == 5
        and v[0] == "MT19937"
        and isinstance(v[1], (list, tuple))
        and len(v[1]) == 624
        and isinstance(v[2], int)
        and 0 <= v[2] <= 624
        and isinstance(v[3], int)
        and isinstance(v[4], float)
    )


def _is_rng(v: Any) -> bool:
    if not isinstance(v, dict):
        return False
    need = ("torch", "data", "noise", "measure")
    return (
        all(_is_byte_state(v.get(k)) for k in need)
        and _is_python_rng(v.get("python"))
        and ("numpy" not in v or _is_numpy_rng(v["numpy"]))
        and ("cuda" not in v or isinstance(v["cuda"], (list, tuple)))
    )


def _is_extra(v: Any) -> bool:
    return isinstance(v, dict) and all(x is None or isinstance(x, dict) for x in v.values())


#: a trainer checkpoint's fields: (what it must be, check). Every one is required in a trainer
#: checkpoint (one holding "generator" and "opt_g"); other checkpoints are checked field by field.
TRAINER_FIELDS: dict[str, tuple[str, Any]] = {
    "step": ("a count >= 0", _is_count),
    "critic_steps": ("a count >= 0", _is_count),
    "lr_scale": ("a finite number > 0", lambda v: _is_finite(v, positive=True)),
    "models": ("a mapping", lambda v: isinstance(v, dict)),
    "generator": ("a mapping of tensors", _is_tensors),
    "critic": ("a mapping of tensors", _is_tensors),
    "opt_g": ("an optimizer state", _is_optimizer),
    "opt_d": ("an optimizer state", _is_optimizer),
    "rng": ("the RNG states of torch, data, noise, measure and python", _is_rng),
    "extra": ("a mapping of constraint states", _is_extra),
}
#: optional fields, checked when present
OPTIONAL_FIELDS: dict[str, tuple[str, Any]] = {
    "wall_s": ("a finite number >= 0", _is_finite),
    "config": ("a mapping", lambda v: isinstance(v, dict)),
    "exports": ("a mapping of file name to sha256", lambda v: isinstance(v, dict)),
}


def validate_checkpoint(state: Mapping[str, Any], path: str | Path = "checkpoint") -> None:
    """LipganError naming the first field of ``state`` that has the wrong type or range.

    A trainer checkpoint (it holds ``generator`` and ``opt_g``) must have every field of
    :data:`TRAINER_FIELDS`; the optimizer states must cover the networks' parameters (as many
    entries as parameter tensors, each of the same shape)."""
    trainer = "generator" in state and "opt_g" in state
    for name, (what, ok) in {**TRAINER_FIELDS, **OPTIONAL_FIELDS}.items():
        if name not in state:
            if trainer and name in TRAINER_FIELDS:
                raise LipganError(
                    f"{path}: checkpoint has no '{name}'; it is damaged or not written by lipgan"
                )
            continue
        if name in TRAINER_FIELDS and not trainer and name not in ("step", "wall_s"):
            continue
        if not ok(state[name]):
            raise LipganError(
                f"{path}: checkpoint field '{name}' is not {what} (got "
                f"{type(state[name]).__name__}); the file is damaged or not written by lipgan"
            )
    if trainer:
        for opt, net in (("opt_g", "generator"), ("opt_d", "critic")):
            _check_moments(state[opt], state[net], f"{path}: checkpoint field '{opt}'")


def _check_moments(opt: dict, weights: dict[str, torch.Tensor], where: str) -> None:
    """Each optimizer moment must have the shape of some tensor of the network it steps."""
    shapes = {tuple(t.shape) for t in weights.values()}
    for idx, entry in opt["state"].items():
        for key, value in entry.items():
            if key == "step" or not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            if tuple(value.shape) not in shapes:
                raise LipganError(
                    f"{where} holds a {key} of shape {tuple(value.shape)} (parameter {idx}), "
                    "which no weight of its network has; the file is damaged or mixed up"
                )


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


class Export(NamedTuple):
    """A network to export: the module, its registry name and the builder's keyword options.

    ``RunFolder.save_checkpoint(state, {key: Export(...)})`` writes it as RUN/<key>.safetensors,
    named with its sha256 in last.pt and the manifest. The key is the network's kind
    (``generator``, ``critic``, ``classifier``) or ``<kind>_<name>`` for a second network of
    that kind (``generator_ema``: the generator's moving average; see :func:`export_kind`).
    """

    module: nn.Module
    model: str
    kwargs: dict[str, Any]


#: the kinds of network a run exports (models.build's first argument)
NETWORK_KINDS = ("generator", "critic", "classifier")


def export_kind(key: str) -> str:
    """The network kind an export named ``key`` holds: ``key`` itself, or ``<kind>`` for
    ``<kind>_<name>`` (``generator_ema`` -> ``generator``); another name is refused."""
    kind = key if key in NETWORK_KINDS else key.split("_", 1)[0]
    if kind not in NETWORK_KINDS or (kind != key and not key[len(kind) + 1 :]):
        raise LipganError(
            f"export name {key!r}: use a network kind ({', '.join(NETWORK_KINDS)}) or "
            "<kind>_<name>, e.g. generator_ema"
        )
    return kind


def export_bytes(module: nn.Module, kind: str, name: str, kwargs: Mapping[str, Any]) -> bytes:
    """``module`` as a self-describing safetensors file, in memory.

    Metadata: ``lipgan_kind`` (generator / critic / classifier; ``kind`` may be an export name
    such as ``generator_ema``, see :func:`export_kind`), ``lipgan_model`` (the registry name) and
    ``lipgan_kwargs`` (JSON of the builder's keyword arguments), which is all
    :func:`load_network` needs to rebuild it. The header is written in sorted order, so two
    equal networks give byte-equal files (and equal sha256).
    """
    from safetensors.torch import save

    from lipgan import models

    kind = export_kind(kind)
    state = plain_state_dict(module)
    try:  # keep only what the plain architecture holds (a constraint may add buffers)
        want = models.build(kind, name, **kwargs).state_dict().keys()
        if set(want) <= set(state):
            state = {k: state[k] for k in want}
    except LipganError:
        pass
    meta = {
        "lipgan_kind": kind,
        "lipgan_kwargs": json.dumps(dict(kwargs), sort_keys=True),
        "lipgan_model": name,
    }
    return _canonical(save(state, metadata=meta))


def _canonical(data: bytes) -> bytes:
    """The same safetensors file with its JSON header in sorted key order (safetensors writes
    the metadata from a hash map, in an order that changes from call to call), padded with
    spaces to 8 bytes as the format asks. Offsets are relative to the data, so they stay."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":"))
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def export_network(
    module: nn.Module, path: str | Path, kind: str, name: str, kwargs: dict[str, Any]
) -> Path:
    """Write ``module`` as a self-describing safetensors file (atomically; see
    :func:`export_bytes`), recorded in the run folder's manifest when ``path`` is in one."""
    return write_file(path, export_bytes(module, kind, name, kwargs))


#: the largest safetensors header accepted (lipgan's own are a few kB)
MAX_HEADER_BYTES = 1 << 24


def _safetensors_metadata(data: bytes, file: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file: an 8-byte little-endian header length, then
    that many bytes of JSON."""
    if len(data) < 8:
        raise LipganError(f"{file}: not a readable safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(MAX_HEADER_BYTES, len(data) - 8):
        raise LipganError(
            f"{file}: not a readable safetensors file (header length {n} does not fit the file)"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as exc:
        raise LipganError(f"{file}: not a readable safetensors file (header: {exc})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _kwargs(meta: Mapping[str, str], file: Path) -> dict[str, Any]:
    try:
        kwargs = json.loads(meta.get("lipgan_kwargs") or "{}")
    except (TypeError, ValueError) as exc:
        raise LipganError(f"{file}: metadata lipgan_kwargs is not JSON ({exc})") from None
    if not isinstance(kwargs, dict):
        raise LipganError(
            f"{file}: metadata lipgan_kwargs must be a JSON object of builder options, got "
            f"{type(kwargs).__name__}"
        )
    return kwargs


def _check_tensors(net: nn.Module, state: Mapping[str, torch.Tensor], file: Path, what: str):
    """Names, shapes, kinds of dtype (float vs integer) and finiteness, before any weight is
    loaded (``net`` lives on the meta device: nothing was allocated)."""
    want = net.state_dict()
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        raise LipganError(
            f"{file}: weights do not fit {what}: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for key, ref in want.items():
        t = state[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise LipganError(
                f"{file}: weights do not fit {what}: {key} has shape {tuple(t.shape)}, "
                f"the network's is {tuple(ref.shape)}"
            )
        if t.dtype.is_floating_point != ref.dtype.is_floating_point or t.is_complex():
            raise LipganError(
                f"{file}: tensor {key} is {t.dtype}, the network's is {ref.dtype}; export the "
                "network with lipgan.runs.export_network"
            )
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise LipganError(
                f"{file}: tensor {key} holds NaN or inf; the network cannot be used (the run "
                "diverged, or the file is damaged)"
            )


def load_network(path: str | Path, which: str = "critic") -> nn.Module:
    """Rebuild a network from a run folder (``RUN/<which>.safetensors``) or a safetensors file.

    ``which`` is ``"critic"``, ``"generator"``, ``"classifier"`` or another export's name
    (``"generator_ema"``, written when the run keeps a moving average); the file's metadata
    names the architecture and its options. The bytes are checked against the run folder's
    manifest, and names, shapes, dtypes and finiteness against the architecture (built on the
    meta device first, so absurd metadata allocates nothing). Returns the module in eval mode
    on the CPU.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

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
    data = verified_read(file)
    meta = _safetensors_metadata(data, file)
    try:
        state = load_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise LipganError(f"{file}: not a readable safetensors file ({exc})") from None
    if "lipgan_model" not in meta or "lipgan_kind" not in meta:
        raise LipganError(f"{file}: no lipgan metadata; export it with lipgan.runs.export_network")
    kind = meta["lipgan_kind"]
    if not path.is_dir() and which != kind and which in ("critic", "generator", "classifier"):
        # An explicit file: trust its metadata, but say so when the caller expected another kind.
        if which != "critic":  # "critic" is the default; a classifier file is fine then
            raise LipganError(f"{file} holds a {kind}, not a {which}")
    kwargs = _kwargs(meta, file)
    what = f"{kind} {meta['lipgan_model']} {kwargs}"
    try:
        with torch.device("meta"):
            shape_only = models.build(kind, meta["lipgan_model"], **kwargs)
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LipganError(f"{file}: metadata does not describe a network ({first})") from None
    _check_tensors(shape_only, state, file, what)
    net = models.build(kind, meta["lipgan_model"], **kwargs)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise LipganError(f"{file}: weights do not fit {what}: {first}") from None
    return net.eval()
