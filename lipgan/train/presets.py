"""Method presets: each a constraint, a loss, an optimizer and the values of its paper."""

from __future__ import annotations

from typing import Any

#: Method presets. Every value fills a TrainConfig field the user left unset (flag or YAML).
PRESETS: dict[str, dict[str, Any]] = {
    # Arjovsky, Chintala & Bottou (2017), Algorithm 1 and official main.py: RMSProp lr 5e-5
    # (torch defaults: momentum 0, alpha 0.99), clip c = 0.01 (the constraint's default),
    # n_critic 5, and 100 critic steps for the first 25 generator steps and every 500th.
    "wgan-clip": dict(
        constraint="weight-clip",
        loss="wasserstein",
        optimizer="rmsprop",
        lr_d=5e-5,
        lr_g=5e-5,
        beta1=0.0,
        beta2=0.99,
        n_critic=5,
        burnin_steps=25,
        burnin_n_critic=100,
        burnin_every=500,
    ),
    # Gulrajani et al. (2017), official gan_mnist.py: Adam 1e-4, betas (0.5, 0.9), lambda 10 (the
    # constraint's default), n_critic 5.
    "wgan-gp": dict(
        constraint="gradient-penalty",
        loss="wasserstein",
        optimizer="adam",
        lr_d=1e-4,
        lr_g=1e-4,
        beta1=0.5,
        beta2=0.9,
        n_critic=5,
    ),
    # Petzka, Fischer & Lukovnikov (2018): the one-sided penalty max(0, ||grad|| - 1)^2 with the
    # WGAN-GP training setup they compared against.
    "wgan-lp": dict(
        constraint="lipschitz-penalty",
        loss="wasserstein",
        optimizer="adam",
        lr_d=1e-4,
        lr_g=1e-4,
        beta1=0.5,
        beta2=0.9,
        n_critic=5,
    ),
    # Miyato et al. (2018), setting C: Adam 2e-4, betas (0, 0.9), n_dis 5; the critic spectrally
    # normalized (one power iteration per forward, u kept) and trained with the Wasserstein loss.
    "sn": dict(
        constraint="spectral-norm",
        loss="wasserstein",
        optimizer="adam",
        lr_d=2e-4,
        lr_g=2e-4,
        beta1=0.0,
        beta2=0.9,
        n_critic=5,
    ),
    # Spectral norm regularization (Yoshida & Miyato 2017) made to hold a Wasserstein critic,
    # trained with the WGAN-GP setup so the methods differ only in how the critic is kept
    # Lipschitz. The paper's lambda/2 sum sigma_l^2 cannot: an L-layer critic's gain E[D(real)] -
    # E[D(fake)] grows like s^L when every weight is scaled by s, the penalty only like s^2, so
    # the critic's loss has no lower bound and the critic diverges (measured: W 1e6-1e7, see
    # docs/wgan.md). The preset penalizes the squared excess over 1 of the product of the
    # sigma_l instead, lam (prod_l sigma_l - 1)_+^2 (degree 2L), with WGAN-GP's lambda 10 (lipgan's
    # choice, measured in docs/wgan.md). `--constraint-option form=sum` gives the paper's form.
    "snr": dict(
        constraint="spectral-norm-reg",
        constraint_options={"form": "bound", "lam": 10.0},
        loss="wasserstein",
        optimizer="adam",
        lr_d=1e-4,
        lr_g=1e-4,
        beta1=0.5,
        beta2=0.9,
        n_critic=5,
    ),
    # The study note's C(w) = prod_l ||W_l||_F, penalized like snr: lam (C(w) - 1)_+^2 with
    # lambda 10 (lipgan's choice; the sum form lambda sum ||W_l||_F^2 diverges like snr's).
    # Adam without momentum, betas (0, 0.9) as in Miyato et al. (2018): with WGAN-GP's beta1 0.5
    # the product of norms swung around 1 and the generator never made digits (18 595 steps,
    # FID 1019); with beta1 0 it gave digits in 20 minutes on one core (FID 480). The critic's
    # last layer goes rank 1 either way (docs/wgan.md §4).
    # Arjovsky et al. (2017) saw momentum destabilize a weight-constrained critic as well.
    "frobenius": dict(
        constraint="frobenius-reg",
        constraint_options={"form": "bound", "lam": 10.0},
        loss="wasserstein",
        optimizer="adam",
        lr_d=1e-4,
        lr_g=1e-4,
        beta1=0.0,
        beta2=0.9,
        n_critic=5,
    ),
    # Weight decay on the critic (the note: L2 regularization is the Frobenius bound's penalty);
    # the constraint carries the decay, added to the critic optimizer's weight_decay.
    "l2": dict(
        constraint="l2",
        loss="wasserstein",
        optimizer="adam",
        lr_d=1e-4,
        lr_g=1e-4,
        beta1=0.5,
        beta2=0.9,
        n_critic=5,
    ),
    # Zhang et al. (2019), SAGAN: spectral normalization in both networks, hinge loss, TTUR
    # (Heusel et al. 2017) lr_D 4e-4 / lr_G 1e-4, Adam betas (0, 0.9), one critic step per
    # generator step; the self-attention architecture. lipgan's one change: the generator's output
    # layer is left unnormalized (last_layer=False). With it normalized, the sagan preset collapsed
    # to one image on MNIST on seeds 0 and 1; without, it gives varied digits (docs/wgan.md).
    "sagan": dict(
        model="sagan28",
        constraint="spectral-norm",
        generator_constraint="spectral-norm",
        generator_constraint_options={"last_layer": False},
        loss="hinge",
        optimizer="adam",
        lr_d=4e-4,
        lr_g=1e-4,
        beta1=0.0,
        beta2=0.9,
        n_critic=1,
    ),
    # The control: non-saturating GAN, no constraint, DCGAN's Adam 2e-4, betas (0.5, 0.999)
    # (Radford et al. 2016), one critic step per generator step.
    "gan": dict(
        constraint="none",
        loss="ns",
        optimizer="adam",
        lr_d=2e-4,
        lr_g=2e-4,
        beta1=0.5,
        beta2=0.999,
        n_critic=1,
    ),
}

# Values used for preset fields a preset does not mention.
_PRESET_FALLBACK: dict[str, Any] = dict(
    model="dcgan28",
    generator_constraint="none",
    weight_decay=0.0,
    burnin_steps=0,
    burnin_n_critic=100,
    burnin_every=0,
)
