"""scikit-learn style estimator around :func:`fit_constrained_tucker`."""

from __future__ import annotations

from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from . import constrained_tucker as _ct


class ConstrainedTucker(TransformerMixin, BaseEstimator):
    """Constrained non-negative Tucker decomposition with diagonal core faces.

    Thin wrapper: ``fit`` forwards every parameter by keyword to
    :func:`~brainage_xai.decomposition.fit_constrained_tucker`.

    Parameters
    ----------
    %(params)s

    Attributes
    ----------
    result_ : ConstrainedTuckerResult
    core_ : array, shape (R1, R2, R1)
    factors_ : list of arrays ``[U1, U2, U3]``
    errors_ : list of float
        Objective per iteration (see ``ConstrainedTuckerResult.errors``).
    rel_error_ : float
    n_iter_ : int

    Examples
    --------
    >>> import numpy as np
    >>> A = np.random.default_rng(0).random((12, 8, 30))
    >>> est = ConstrainedTucker(rank=(3, 2)).fit(A)
    >>> est.core_.shape
    (3, 2, 3)
    """

    def __init__(self, rank=(2, 2), *, constraints="nonneg", l1=0.0, n_iter_max=500,
                 tol=1e-6, init="svd", random_state=0, verbose=False, callback=None):
        self.rank = rank
        self.constraints = constraints
        self.l1 = l1
        self.n_iter_max = n_iter_max
        self.tol = tol
        self.init = init
        self.random_state = random_state
        self.verbose = verbose
        self.callback = callback

    def fit(self, X, y=None):
        """Fit the model to ``X`` (subjects x channels x voxels); ``y`` is ignored."""
        params = self.get_params(deep=False)
        rank = params.pop("rank")
        self.result_ = _ct.fit_constrained_tucker(X, rank, **params)
        self.core_ = self.result_.core
        self.factors_ = self.result_.factors
        self.errors_ = self.result_.errors
        self.rel_error_ = self.result_.rel_error
        self.n_iter_ = self.result_.n_iter
        return self

    def transform(self, X):
        """Loadings ``U1`` of (new) subjects with the core, ``U2``, ``U3`` fixed."""
        check_is_fitted(self, "result_")
        return self.result_.transform(X)

    def fit_transform(self, X, y=None):
        """Fit and return the training loadings ``U1`` (``factors_[0]``)."""
        return self.fit(X, y).factors_[0]

    def error_on(self, X, U1=None):
        """Relative error on ``X`` (see ``ConstrainedTuckerResult.error_on``)."""
        check_is_fitted(self, "result_")
        return self.result_.error_on(X, U1)


ConstrainedTucker.__doc__ = ConstrainedTucker.__doc__.replace(
    "    %(params)s\n", _ct._PARAMS_DOC.lstrip("\n")
)
