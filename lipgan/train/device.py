"""Where a run computes: the device and the precision policy."""

from __future__ import annotations

import torch

from lipgan.errors import LipganError


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16, or a CPU with
    AVX512-BF16 or AMX (where oneDNN's bf16 convolutions beat fp32 by 2-4x)."""
    if device.type == "cuda":
        # compute capability 8 (Ampere) and later; torch.cuda.is_bf16_supported() also says
        # True for the emulated bf16 of older GPUs, which is slower than fp32
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).major >= 8
    if device.type == "cpu":
        try:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except AttributeError:  # an older torch without the probes: assume not
            return False
    return False


def resolve_precision(cfg):
    """Turn ``precision="auto"`` and ``channels_last=None`` into concrete values for the run's
    device, so config.yaml records what ran (and a resume elsewhere runs the same)."""
    dev = resolve_device(cfg.device)
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if native_bf16(dev) else "fp32"
    channels_last = cfg.channels_last
    if channels_last is None:
        channels_last = precision == "bf16" and dev.type == "cpu"
    return cfg.replace(precision=precision, channels_last=bool(channels_last))


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an unavailable cuda is a LipganError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LipganError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LipganError("--device cuda asked for, but torch sees no CUDA device; use cpu")
    return dev


def device_for_rank(name: str, local_rank: int, world: int) -> torch.device:
    """The device of one process of ``world``: ``cuda`` -> ``cuda:LOCAL_RANK`` (set as the
    current device), ``cpu`` -> cpu; a card or device that does not fit is a LipganError."""
    asked = name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LipganError("--device cuda asked for, but torch sees no CUDA device; use cpu")
        if name != "cuda" and world > 1:
            raise LipganError(
                f"--device {name} with {world} processes: use --device cuda (each process "
                "takes cuda:LOCAL_RANK; choose the cards with CUDA_VISIBLE_DEVICES)"
            )
        index = local_rank if name == "cuda" else torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            raise LipganError(
                f"process with local rank {local_rank} has no CUDA device (torch sees "
                f"{torch.cuda.device_count()}); start at most that many processes per machine"
            )
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
        return dev
    if name != "cpu":
        raise LipganError(f"unknown device {asked!r}; use auto, cpu or cuda")
    return torch.device("cpu")
