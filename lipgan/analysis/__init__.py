"""Lipschitz analysis of PyTorch models: per-layer operator norms, certified whole-network bounds
composed along the computation graph, attained lower bounds, and the iterations behind them."""
