"""Constrained non-negative Tucker decomposition of activation tensors (paper eq. 2).

>>> from brainage_xai.decomposition import fit_constrained_tucker, ConstrainedTucker
"""

from .constrained_tucker import (
    CONSTRAINTS,
    ConstrainedTuckerResult,
    fit_constrained_tucker,
    relative_error,
)
from .estimator import ConstrainedTucker

__all__ = [
    "CONSTRAINTS",
    "ConstrainedTucker",
    "ConstrainedTuckerResult",
    "fit_constrained_tucker",
    "relative_error",
]
