"""Method presets: each a constraint, a loss, an optimizer and the values of its paper."""

from __future__ import annotations

from typing import Any

from lipgan import constraints as C
from lipgan import models
from lipgan.errors import LipganError
from lipgan.train.config import TrainConfig
from lipgan.train.device import resolve_precision
from lipgan.train.losses import LOSSES, OPTIMIZERS

#: Gulrajani et al. (2017), official gan_mnist.py: Adam 1e-4, betas (0.5, 0.9), n_critic 5 with
#: the Wasserstein loss; the presets that compare ways of keeping the critic Lipschitz share it.


def setup(
    loss: str, optimizer: str, lr: tuple[float, float], betas: tuple[float, float], n_critic: int
) -> dict[str, Any]:
    """A preset's training setup as TrainConfig fields: ``lr`` is (critic, generator), ``betas``
    Adam's (beta1, beta2) or RMSProp's (momentum, alpha)."""
    return dict(loss=loss, optimizer=optimizer, lr_d=lr[0], lr_g=lr[1], beta1=betas[0],
                beta2=betas[1], n_critic=n_critic)  # fmt: skip


WGAN_GP_SETUP: dict[str, Any] = setup("wasserstein", "adam", (1e-4, 1e-4), (0.5, 0.9), 5)

#: Method presets. Every value fills a TrainConfig field the user left unset (flag or YAML).
PRESETS: dict[str, dict[str, Any]] = {
    # Arjovsky, Chintala & Bottou (2017), Algorithm 1 and official main.py: RMSProp lr 5e-5
    # (torch defaults: momentum 0, alpha 0.99), clip c = 0.01 (the constraint's default),
    # n_critic 5, and 100 critic steps for the first 25 generator steps and every 500th.
    "wgan-clip": {
        **setup("wasserstein", "rmsprop", (5e-5, 5e-5), (0.0, 0.99), 5),
        "constraint": "weight-clip",
        "burnin_steps": 25,
        "burnin_n_critic": 100,
        "burnin_every": 500,
    },
    # Gulrajani et al. (2017), official gan_mnist.py: Adam 1e-4, betas (0.5, 0.9), lambda 10 (the
    # constraint's default), n_critic 5.
    "wgan-gp": {**WGAN_GP_SETUP, "constraint": "gradient-penalty"},
    # Petzka, Fischer & Lukovnikov (2018): the one-sided penalty max(0, ||grad|| - 1)^2 with the
    # WGAN-GP training setup they compared against.
    "wgan-lp": {**WGAN_GP_SETUP, "constraint": "lipschitz-penalty"},
    # Miyato et al. (2018), setting C: Adam 2e-4, betas (0, 0.9), n_dis 5; the critic spectrally
    # normalized (one power iteration per forward, u kept) and trained with the Wasserstein loss.
    "sn": {
        **setup("wasserstein", "adam", (2e-4, 2e-4), (0.0, 0.9), 5),
        "constraint": "spectral-norm",
    },
    # Spectral norm regularization (Yoshida & Miyato 2017) made to hold a Wasserstein critic,
    # trained with the WGAN-GP setup so the methods differ only in how the critic is kept
    # Lipschitz. The paper's lambda/2 sum sigma_l^2 cannot: an L-layer critic's gain E[D(real)] -
    # E[D(fake)] grows like s^L when every weight is scaled by s, the penalty only like s^2, so
    # the critic's loss has no lower bound and the critic diverges (measured: W 1e6-1e7, see
    # docs/wgan.md). The preset penalizes the squared excess over 1 of the product of the
    # sigma_l instead, lam (prod_l sigma_l - 1)_+^2 (degree 2L), with WGAN-GP's lambda 10 (lipgan's
    # choice, measured in docs/wgan.md). `--constraint-option form=sum` gives the paper's form.
    "snr": {
        **WGAN_GP_SETUP,
        "constraint": "spectral-norm-reg",
        "constraint_options": {"form": "bound", "lam": 10.0},
    },
    # The study note's C(w) = prod_l ||W_l||_F, penalized like snr: lam (C(w) - 1)_+^2 with
    # lambda 10 (lipgan's choice; the sum form lambda sum ||W_l||_F^2 diverges like snr's).
    # Adam without momentum, betas (0, 0.9) as in Miyato et al. (2018): with WGAN-GP's beta1 0.5
    # the product of norms swung around 1 and the generator never made digits (18 595 steps,
    # FID 1019); with beta1 0 it gave digits in 20 minutes on one core (FID 480). The critic's
    # last layer goes rank 1 either way (docs/wgan.md §4).
    # Arjovsky et al. (2017) saw momentum destabilize a weight-constrained critic as well.
    "frobenius": {
        **WGAN_GP_SETUP,
        "constraint": "frobenius-reg",
        "constraint_options": {"form": "bound", "lam": 10.0},
        "beta1": 0.0,
    },
    # Weight decay on the critic (the note: L2 regularization is the Frobenius bound's penalty);
    # the constraint carries the decay, added to the critic optimizer's weight_decay.
    "l2": {**WGAN_GP_SETUP, "constraint": "l2"},
    # Zhang et al. (2019), SAGAN: spectral normalization in both networks, hinge loss, TTUR
    # (Heusel et al. 2017) lr_D 4e-4 / lr_G 1e-4, Adam betas (0, 0.9), one critic step per
    # generator step; the self-attention architecture. lipgan's one change: the generator's output
    # layer is left unnormalized (last_layer=False). With it normalized, the sagan preset collapsed
    # to one image on MNIST on seeds 0 and 1; without, it gives varied digits (docs/wgan.md).
    "sagan": {
        **setup("hinge", "adam", (4e-4, 1e-4), (0.0, 0.9), 1),
        "model": "sagan28",
        "constraint": "spectral-norm",
        "generator_constraint": "spectral-norm",
        "generator_constraint_options": {"last_layer": False},
    },
    # The control: non-saturating GAN, no constraint, DCGAN's Adam 2e-4, betas (0.5, 0.999)
    # (Radford et al. 2016), one critic step per generator step.
    "gan": {**setup("ns", "adam", (2e-4, 2e-4), (0.5, 0.999), 1), "constraint": "none"},
}

#: what every fast recipe shares (trials t6 and t8 of docs/recipes.md): batch norm in the
#: dcgan28 generator (Radford et al. 2016), batch 32 (more quality per CPU second than 64, t5
#: against t6), and the EMA ramp 0.02 (the half-life stays 10,000 images; t4: in short runs the
#: ramp sets it)
FAST_COMMON: dict[str, Any] = {"generator_norm": "batch", "batch_size": 32, "ema_rampup": 0.02}
#: sn's fast optimizer settings (two time scales, betas (0, 0.9), one critic step) with the
#: Wasserstein loss, for the methods whose mechanism is a penalty on the Wasserstein critic
WASSERSTEIN_FAST: dict[str, Any] = {
    **setup("wasserstein", "adam", (8e-4, 4e-4), (0.0, 0.9), 1), **FAST_COMMON,
}

#: ``--recipe fast``: per-method overrides of the paper preset for quality per CPU second on a
#: small machine (issue 19). Each keeps the method's Lipschitz mechanism (its constraint); only
#: the training setup around it changes. Every value is measured in docs/recipes.md.
FAST: dict[str, dict[str, Any]] = {
    # docs/recipes.md trial t8 (FID 67.4, recall 0.80, 10 classes at 3000 steps of 32 images,
    # 453 CPU s at one thread): the SN critic with hinge loss (Lim & Ye 2017) and one critic
    # step (Miyato et al. 2018), two time scales lr_d 8e-4 / lr_g 4e-4 with betas (0, 0.9)
    # (Heusel et al. 2017; Zhang et al. 2019's ratio, twice their rates: t8 against t6's
    # 4e-4 / 2e-4, FID 67.4 against 135.6 at 3000 steps), and FAST_COMMON.
    "sn": {
        **setup("hinge", "adam", (8e-4, 4e-4), (0.0, 0.9), 1),
        **FAST_COMMON,
    },
    # docs/recipes.md trial gpA: sn's optimizer settings with the Wasserstein loss (the
    # penalty's own objective), one critic step, and the penalty on every 4th critic step with
    # weight 4 lambda (lazy regularization, Karras et al. 2020): FID 255.5 after 274 CPU s
    # (1337 steps) where n_critic 2 at 4e-4 / 2e-4 (gpB) scored 536.3 at the same cost.
    "wgan-gp": {**WASSERSTEIN_FAST, "penalty_every": 4},
    # the one-sided penalty is the gradient penalty's sibling: the same recipe (not tuned apart)
    "wgan-lp": {**WASSERSTEIN_FAST, "penalty_every": 4},
    # trial snrA: the same setup (the bound-form penalty is cheap: on every step), FID 240.6
    # after 341 CPU s; its critic's largest input gradient 1.6 (the paper setting's: 11)
    "snr": dict(WASSERSTEIN_FAST),
    # trials frobA-frobE (300 CPU s) and U1-U3, R1 (600 CPU s), docs/recipes.md: the
    # product-of-Frobenius-norms critic is the weakest (the bound is loose, so the penalty holds
    # the critic far below 1-Lipschitz) and gains most from faster rates, lr 1.6e-3 / 8e-4
    # (frobE). At torch's init the product is about 12: the penalty's first steps then crush
    # every weight and the critic never recovers, and a one-sided penalty lets the product fall
    # far below 1 (a dead critic: largest input gradient 0.002 after 10 minutes). So the fast
    # recipe starts the weights at product 1 (``rescale``) and holds it there with the
    # two-sided ``unit`` form, lam (prod - 1)^2, the same penalty on the same norms: FID 170.3
    # after 600 CPU s (U2) against 317.3 one-sided (R1) and 7614 / 1843 without the rescale
    # (U1 / U3). beta1 0 as in its paper preset.
    "frobenius": {
        **WASSERSTEIN_FAST, "lr_d": 1.6e-3, "lr_g": 8e-4,
        "constraint_options": {"form": "unit", "lam": 10.0, "rescale": True},
    },  # fmt: skip
    # trials clipA-clipF: clipping at the paper's c = 0.01 with RMSProp (Arjovsky et al. 2017:
    # no momentum for a clipped critic), one critic step at lr 1e-3 / 4e-4 (clipF: FID 604.4
    # after 349 CPU s, against 1055.7 for two steps at 2e-4 / 2e-4, clipA, and 748.9 for two at
    # 1e-3 / 2e-4, clipE), no 100-step burn-in phases. A wider clip box was worse (c 0.05:
    # FID 2067, c 0.1: 2354 at clipA's rates; the critic's largest gradient grew to 88 and 368).
    "wgan-clip": {
        **setup("wasserstein", "rmsprop", (1e-3, 4e-4), (0.0, 0.99), 1), **FAST_COMMON,
        "burnin_steps": 0, "burnin_every": 0,
    },  # fmt: skip
}

# Values used for preset fields a preset does not mention.
PRESET_FALLBACK: dict[str, Any] = dict(
    model="dcgan28",
    generator_norm="none",
    penalty_every=1,
    batch_size=64,
    ema_rampup=0.05,
    generator_constraint="none",
    weight_decay=0.0,
    burnin_steps=0,
    burnin_n_critic=100,
    burnin_every=0,
)


def methods() -> list[str]:
    """Every method name a command accepts: the presets, then the constraint registry's names
    (a registry name trains with WGAN-GP's setup, see :func:`preset_for`)."""
    return [*PRESETS, *(n for n in C.available() if n not in PRESETS)]


def preset_for(method: str) -> dict[str, Any]:
    """The preset of a method name: ``PRESETS[method]``, or for a constraint-registry name
    (``bjorck``, a user's registered constraint) the WGAN-GP setup with that constraint."""
    if method in PRESETS:
        return dict(PRESETS[method])
    if method in C.available():
        return {**WGAN_GP_SETUP, "constraint": method}
    raise LipganError(f"unknown method {method!r}; choose one of: {', '.join(methods())}")


def recipe_for(method: str, recipe: str) -> dict[str, Any]:
    """The overrides of ``recipe`` for ``method``: none for ``paper`` (the preset as published),
    :data:`FAST` ``[method]`` for ``fast``; a method without a fast recipe is a LipganError."""
    if recipe == "paper":
        return {}
    if method not in FAST:
        raise LipganError(
            f"method {method!r} has no fast recipe yet (those that do: {', '.join(FAST)}); "
            "use --recipe paper"
        )
    return dict(FAST[method])


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill every ``None`` field from the method's preset and check the choices: the one place
    a run's configuration is completed (the CLI, compare, study and resume all call it)."""
    preset = {**PRESET_FALLBACK, **preset_for(cfg.method), **recipe_for(cfg.method, cfg.recipe)}
    options = {
        key: (preset.pop(f"{key}_options", {}), getattr(cfg, key))
        for key in ("constraint", "generator_constraint")
    }
    changes = {k: v for k, v in preset.items() if getattr(cfg, k) is None}
    cfg = cfg.replace(**changes)
    for key, (preset_options, user_choice) in options.items():
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
        cfg = cfg.replace(width=models.default_option("critic", cfg.model, "width"))
    else:
        models.default_option("critic", cfg.model, "width")  # an unknown model is refused here
    norm_ok = models.default_option("generator", cfg.model, "norm") is not None
    if cfg.generator_norm != "none" and not norm_ok:
        raise LipganError(
            f"generator_norm {cfg.generator_norm!r}: the {cfg.model} generator has no norm option "
            "(use --model dcgan28, or --generator-norm none)"
        )
    if cfg.loss not in LOSSES:
        raise LipganError(f"unknown loss {cfg.loss!r}; choose one of: {', '.join(LOSSES)}")
    if cfg.optimizer not in OPTIMIZERS:
        raise LipganError(f"unknown optimizer {cfg.optimizer!r}; use {' or '.join(OPTIMIZERS)}")
    if cfg.precision == "auto" or cfg.channels_last is None:
        cfg = resolve_precision(cfg)
    return cfg
