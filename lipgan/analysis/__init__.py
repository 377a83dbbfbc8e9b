"""Lipschitz analysis of PyTorch models: per-layer operator norms, certified whole-network bounds
composed along the computation graph, attained lower bounds, and the iterations behind them.

- ``operators``, ``conv``, ``activations``, ``iteration``: per-layer bounds (``layer_bound``);
- ``certify``: the dense (float64) and block-sparse (float32) Cholesky certificates of lambda_max;
- ``leaves``: which module is which leaf, declared constants, the per-leaf consistency check;
- ``functional``: functional calls (``F.relu``, ``F.pad``, ...) as the modules that compute them;
- ``tracing``: torch.fx tracing; ``nodes``: the leaf of one graph node;
- ``graph``: composition of bounds along the graph;
- ``chain``: merged segments and LipSDP partitions on a chain; ``lipsdp``: LipSDP-Neuron;
- ``lower``: attained lower bounds; ``report``: ``layer_table``, ``upper_bounds``, ``estimate``.

See docs/analysis.md. Submodules are imported on use (``from lipgan.analysis import graph``).
"""
