"""Experiments over many runs: one sweep driver (:mod:`lipgan.experiments.sweep`) behind
``lipgan compare`` (GAN config variants x seeds) and ``lipgan study`` (classifier cells)."""
