"""Rank and sparsity selection, and the linear model on the decomposition.

Paper sections 3.5 and 3.6 and Appendix A (Algorithms 1 and 2); see
``docs/selection.md``.
"""

from .lambda_sweep import choose_lambda, default_lambda_grid, lambda_scale, run_lambda_sweep
from .linear_model import (
    FinalModel,
    fit_final,
    fit_linear_model,
    loadings_table,
    regression_metrics,
    roi_coefficients,
    roi_contributions,
    target_metrics,
)
from .rank_choice import choose_ranks
from .rank_sweep import MAX_RANK, default_rank_grid, run_rank_sweep
from .scree import compute_scree, scree_drop
from .splits import SPLIT_NAMES, Splits
from .tensor import (
    RELEVANCE_POWER,
    TENSORS,
    channel_scale,
    decomposed_nbytes,
    deviation_head,
    deviation_splits,
    deviation_tensor,
    prepare_tensor,
    relevance_weight,
)
from .workflow import SelectionFiles, run_selection, write_final

__all__ = [
    "MAX_RANK",
    "RELEVANCE_POWER",
    "SPLIT_NAMES",
    "TENSORS",
    "FinalModel",
    "SelectionFiles",
    "Splits",
    "channel_scale",
    "choose_lambda",
    "choose_ranks",
    "compute_scree",
    "decomposed_nbytes",
    "default_lambda_grid",
    "default_rank_grid",
    "deviation_head",
    "deviation_splits",
    "deviation_tensor",
    "fit_final",
    "fit_linear_model",
    "lambda_scale",
    "loadings_table",
    "prepare_tensor",
    "regression_metrics",
    "relevance_weight",
    "roi_coefficients",
    "roi_contributions",
    "run_lambda_sweep",
    "run_rank_sweep",
    "run_selection",
    "scree_drop",
    "target_metrics",
    "write_final",
]
