"""Scoring a run: sample its generator and write ``RUN/eval.json`` (the one writer of it).

``generate(gen, n)`` draws ``z ~ N(0, I)`` with a fixed seed and returns ``(n, 1, 28, 28)``
samples; :func:`evaluate_run` loads the run's generator (checked against the run folder's
manifest), scores ``n`` samples with :func:`lipgan.metrics.evaluate` and writes eval.json through
:class:`lipgan.runs.RunFolder`. Sizes are bounded before any work starts.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lipgan.errors import LipganError
from lipgan.runs import RunFolder, load_network
from lipgan.runs.files import check_writable

#: the most samples generated and scored (FID is compared at a fixed N; the docs use 10000)
MAX_N = 200_000
#: the largest generation batch
MAX_BATCH = 65_536
#: seeds accepted by every generator lipgan seeds (torch's and NumPy's)
MAX_SEED = 2**63 - 1


def check_range(flag: str, value: int, lo: int, hi: int) -> int:
    """``value`` when ``lo <= value <= hi``, else a one-line LipganError naming ``flag``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise LipganError(f"{flag} must be an integer from {lo} to {hi}, got {value}")
    return value


def check_sizes(n: int, batch_size: int = 500, seed: int = 0, *, min_n: int = 1) -> None:
    """Refuse absurd sizes before any work: ``min_n <= n <= MAX_N``, ``1 <= batch_size <=
    MAX_BATCH`` and ``0 <= seed <= MAX_SEED``."""
    check_range("--n", n, min_n, MAX_N)
    check_range("--batch-size", batch_size, 1, MAX_BATCH)
    check_range("--seed", seed, 0, MAX_SEED)


def generate(
    gen: torch.nn.Module,
    n: int,
    *,
    seed: int = 0,
    batch_size: int = 500,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """``n`` samples ``(n, 1, 28, 28)`` of ``gen`` from ``z ~ N(0, I)`` drawn on the CPU with
    ``seed`` (the same draws on every device), in eval mode, returned on the CPU as float32."""
    check_sizes(n, batch_size, seed)
    z_dim = getattr(gen, "z_dim", None)
    if not isinstance(z_dim, int):
        raise LipganError("the generator has no integer attribute z_dim; cannot sample it")
    if device is not None:
        gen = gen.to(device)
    first = next(iter(gen.parameters()), None)
    dev = first.device if first is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    gen.eval()
    out = torch.empty(n, 1, 28, 28)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            z = torch.randn(min(batch_size, n - start), z_dim, generator=g)
            x = gen(z.to(dev)).float().cpu()
            out[start : start + x.shape[0]] = x.reshape(x.shape[0], 1, 28, 28)
    return out


def run_dataset(path: str | os.PathLike) -> str | None:
    """The dataset named in a run folder's config.yaml (None for a file or no config)."""
    folder = RunFolder(path)
    if not folder.path.is_dir() or not folder.config_path.is_file():
        return None
    value = folder.read_config().get("dataset")
    return value if value in ("mnist", "fashion-mnist") else None


#: the moving average of a run's generator (lipgan.train.ema), beside RUN/generator.safetensors
EMA_FILE = "generator_ema.safetensors"


def generator_source(path: str | os.PathLike, raw: bool = False) -> tuple[Path, str]:
    """Which generator a run folder is sampled and scored with: ``(file, "ema")`` for its moving
    average where the run keeps one (issue 19: averaged weights sample better, Yazici et al.
    2019), unless ``raw``; else ``(folder, "raw")``, the last iterate. A file is itself
    (``"file"``)."""
    path = Path(path)
    if not path.is_dir():
        if raw and path.exists():
            raise LipganError(
                f"{path}: --raw picks a run folder's last iterate; give the run folder (a file "
                "is scored as it is)"
            )
        return path, "file"
    if not raw and (path / EMA_FILE).is_file():
        return path / EMA_FILE, "ema"
    return path, "raw"


def evaluate_run(
    path: str | os.PathLike,
    *,
    n: int = 10000,
    dataset: str | None = None,
    seed: int = 0,
    batch_size: int = 500,
    device: str | torch.device | None = None,
    details: bool = False,
    raw: bool = False,
) -> dict:
    """Score a run folder's (or an exported .safetensors) generator on ``n`` samples.

    A run folder is scored with its EMA generator where it keeps one (``raw=True``: the last
    iterate), see :func:`generator_source`. Returns :func:`lipgan.metrics.evaluate`'s dict
    plus ``generator`` (``"ema"``, ``"raw"`` or ``"file"``); for a run folder, its eval.json
    keys and ``generator`` are written to ``RUN/eval.json`` atomically. ``dataset`` defaults
    to the run's own."""
    from lipgan import metrics

    check_sizes(n, batch_size, seed, min_n=metrics.FEATURE_DIM)
    path = Path(path)
    if not path.exists():
        raise LipganError(f"{path}: no such run folder or file")
    if path.is_dir():
        check_writable(path)  # eval.json is written after the work: fail before it
    dataset = dataset or run_dataset(path) or "mnist"
    source, which = generator_source(path, raw)
    gen = load_network(source, "generator")
    x = generate(gen, n, seed=seed, batch_size=batch_size, device=device)
    res = {**metrics.evaluate(x, dataset=dataset, n=n, details=details, seed=seed),
           "generator": which}  # fmt: skip
    if path.is_dir():
        folder = RunFolder(path)
        try:
            folder.write_eval({**{k: res[k] for k in metrics.EVAL_KEYS}, "generator": which})
        finally:
            folder.close()
    return res
