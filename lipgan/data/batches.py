"""Float batches drawn by random index from a split held as one uint8 tensor."""

from __future__ import annotations

import torch

from lipgan.errors import LipganError


class BatchSource:
    """A whole split held as one uint8 tensor, giving float batches drawn by random index.

    ``sample(b)`` draws ``b`` indices with replacement from ``generator`` and returns images scaled
    to ``[-1, 1]`` (``scale="tanh"``) or ``[0, 1]`` (``scale="unit"``), plus their labels.
    ``epoch(b)`` yields a random permutation in batches, for classifier training.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        scale: str = "tanh",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise LipganError("BatchSource takes uint8 images of shape (N, C, H, W)")
        if images.shape[0] == 0:
            raise LipganError("BatchSource got an empty set of images")
        if scale not in ("tanh", "unit"):
            raise LipganError(f"unknown scale {scale!r}; use 'tanh' ([-1, 1]) or 'unit' ([0, 1])")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = None if labels is None else labels.to(self.device)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.scale = scale
        self.dtype = dtype

    def __len__(self) -> int:
        return self.images.shape[0]

    def to_float(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.scale == "tanh":
            return x.mul_(2.0 / 255.0).sub_(1.0)
        return x.mul_(1.0 / 255.0)

    def indices(self, batch_size: int) -> torch.Tensor:
        return torch.randint(len(self), (batch_size,), generator=self.generator)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = idx.to(self.device)
        y = None if self.labels is None else self.labels[idx]
        return self.to_float(self.images[idx]), y

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.take(self.indices(batch_size))

    def epoch(self, batch_size: int, shuffle: bool = True):
        order = (
            torch.randperm(len(self), generator=self.generator)
            if shuffle
            else torch.arange(len(self))
        )
        for start in range(0, len(self), batch_size):
            yield self.take(order[start : start + batch_size])
