"""Names shared by the writers and readers of run folders (no torch import: report stays light)."""

#: metrics.csv columns, one row per logged generator step (empty cell: not measured then).
#: time_s: wall seconds of the run (summed over resumes); cpu_s: CPU seconds of the training
#: process (time.process_time, all threads, summed over resumes); fid_mark_s: the ``fid_at_s``
#: mark this row's FID was taken for (empty for other FID rows). Folders written before a column
#: existed lack it; readers go by the header's names.
METRIC_COLUMNS = (
    "step",
    "time_s",
    "cpu_s",
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
    "fid_mark_s",
    "ms_per_step",
)
#: layer_norms.csv columns.
LAYER_COLUMNS = ("step", "layer", "operator_norm", "reshaped_norm")
