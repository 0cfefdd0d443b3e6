"""Rank and sparsity selection, and the linear model on the decomposition.

Paper sections 3.5 and 3.6 and Appendix A (Algorithms 1 and 2); see
``docs/selection.md``.
"""

from .lambda_sweep import choose_lambda, default_lambda_grid, lambda_scale, run_lambda_sweep
from .linear_model import (
    FinalModel,
    fit_final,
    fit_linear_model,
    head_from_torch,
    loadings_table,
    regression_metrics,
    roi_coefficients,
    roi_contributions,
)
from .rank_sweep import choose_ranks, run_rank_sweep
from .scree import compute_scree, scree_drop
from .tensor import (
    RELEVANCE_POWER,
    TENSORS,
    channel_scale,
    decomposed_nbytes,
    deviation_head,
    deviation_splits,
    deviation_tensor,
    relevance_weight,
)
from .workflow import run_selection, write_final, write_scree

__all__ = [
    "RELEVANCE_POWER",
    "TENSORS",
    "FinalModel",
    "channel_scale",
    "decomposed_nbytes",
    "deviation_head",
    "deviation_splits",
    "deviation_tensor",
    "relevance_weight",
    "choose_lambda",
    "choose_ranks",
    "compute_scree",
    "default_lambda_grid",
    "fit_final",
    "fit_linear_model",
    "head_from_torch",
    "lambda_scale",
    "loadings_table",
    "regression_metrics",
    "roi_coefficients",
    "roi_contributions",
    "run_lambda_sweep",
    "run_rank_sweep",
    "run_selection",
    "scree_drop",
    "write_final",
    "write_scree",
]
