"""Gradient penalties: the critic's input gradients pulled towards norm 1 (WGAN-GP, WGAN-LP)."""

from __future__ import annotations

import torch

from lipgan.constraints.base import Constraint, Shard, _check_positive, per_sample_rand, register
from lipgan.errors import LipganError


@register("gradient-penalty")
class GradientPenalty(Constraint):
    """WGAN-GP (Gulrajani et al. 2017): ``lam * mean_i (||grad_x D(x_i)||_2 - 1)^2``.

    ``x_i = a_i real_i + (1 - a_i) fake_i`` with one ``a_i ~ U[0, 1]`` per sample (not per
    pixel), the norm over all non-batch dimensions of sample ``i`` (not element-wise). ``real``
    and ``fake``: ``(B, ...)`` of one shape (images or flat vectors). ``lam = 10`` as in the
    paper and the official ``gan_mnist.py``.

    Both inputs are detached before interpolating, so the generator's graph is never part of
    the critic's step even when ``fake`` still carries it. The gradient is taken with
    ``torch.autograd.grad`` with respect to the interpolates only, with ``create_graph=True``
    for the double backward (one backward of the whole loss afterwards: DDP-safe). The norm is
    computed in float32 (also under bf16 autocast). ``fake=None`` (classifier trainers)
    penalizes at the real points. A critic with several outputs per sample is probed along one
    random unit direction ``r_i`` per sample: the norm of ``J_i^T r_i``, a lower estimate of the
    local Lipschitz constant. Sets ``last_grad_norm`` to the per-sample norms, shape ``(B,)``.
    """

    name = "gradient-penalty"
    needs_input_grad = True

    def __init__(self, lam: float = 10.0) -> None:
        super().__init__()
        _check_positive("lam", lam)
        self.lam = float(lam)

    def _shape_penalty(self, norm: torch.Tensor) -> torch.Tensor:
        return (norm - 1.0).square()

    def interpolate(
        self,
        real: torch.Tensor,
        fake: torch.Tensor | None,
        *,
        generator: torch.Generator | None = None,
        shard: Shard | None = None,
    ) -> torch.Tensor:
        """``a_i real_i + (1 - a_i) fake_i``, one ``a_i`` per sample; detached inputs."""
        real = real.detach()
        if fake is None:
            return real.clone()
        fake = fake.detach()
        if fake.shape != real.shape:
            raise LipganError(
                f"real and fake batches must have one shape for the penalty; got "
                f"{tuple(real.shape)} and {tuple(fake.shape)}"
            )
        alpha = per_sample_rand(
            real.shape[0], generator=generator, shard=shard, device=real.device, dtype=real.dtype
        )
        return torch.lerp(fake, real, alpha.view((-1,) + (1,) * (real.dim() - 1)))

    def penalty(self, critic, real, fake=None, *, generator=None, shard=None):
        x = self.interpolate(real, fake, generator=generator, shard=shard).requires_grad_(True)
        batch = x.shape[0]
        with torch.enable_grad():
            out = critic(x)
            if out.dim() == 0 or out.shape[0] != batch:
                raise LipganError(
                    "the critic must return one score per sample, shape (B,) or (B, 1); got "
                    f"{tuple(out.shape)} for a batch of {batch} (do not average inside the model)"
                )
            out = out.reshape(batch, -1)
            if out.shape[1] == 1:
                probe = torch.ones_like(out)
            else:
                noise = torch.randn(
                    out.shape, device=out.device, dtype=torch.float32, generator=generator
                )
                probe = torch.nn.functional.normalize(noise)
                probe = probe.to(out.dtype)
            (grad,) = torch.autograd.grad(out, x, grad_outputs=probe, create_graph=True)
        with torch.autocast(device_type=grad.device.type, enabled=False):
            # at least float32 (bf16 gradients lose the norm's precision); float64 stays
            wide = torch.promote_types(grad.dtype, torch.float32)
            norm = torch.linalg.vector_norm(grad.reshape(batch, -1).to(wide), dim=1)
            result = self.lam * self._shape_penalty(norm).mean()
        self.last_grad_norm = norm.detach()
        return result


@register("lipschitz-penalty")
class LipschitzPenalty(GradientPenalty):
    """WGAN-LP (Petzka et al. 2018): the one-sided ``lam * mean_i max(0, ||grad||_2 - 1)^2``.

    Same sampling and norm as :class:`GradientPenalty`; only gradients above 1 are penalized.
    ``lam = 10`` (the paper keeps WGAN-GP's value).
    """

    name = "lipschitz-penalty"

    def _shape_penalty(self, norm: torch.Tensor) -> torch.Tensor:
        return torch.relu(norm - 1.0).square()
