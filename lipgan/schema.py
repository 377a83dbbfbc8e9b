"""Names shared by the writers and readers of run folders (no torch import: report stays light)."""

#: metrics.csv columns, one row per logged generator step (empty cell: not measured then).
METRIC_COLUMNS = (
    "step",
    "time_s",
    "wasserstein",
    "loss_d",
    "loss_g",
    "penalty",
    "gnorm_real_mean",
    "gnorm_real_max",
    "gnorm_fake_mean",
    "gnorm_fake_max",
    "gnorm_interp_mean",
    "gnorm_interp_max",
    "product_bound",
    "fid",
    "ms_per_step",
)
#: layer_norms.csv columns.
LAYER_COLUMNS = ("step", "layer", "operator_norm", "reshaped_norm")
