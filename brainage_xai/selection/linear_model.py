"""The linear model on the decomposition and the final fit with its test metrics.

The voxel average of the reconstruction is ``X = U1 diag(mean U3) W^T`` (n x c), so a
linear model on ``X`` (paper section 3.6) is a linear model on the R1 loadings:
``y ~ X beta + b = U1 gamma + b`` with ``gamma = diag(mean U3) W^T beta``. ``gamma[r]``
is RoI r's coefficient and ``U1[i, r] * gamma[r]`` its contribution to subject i's
prediction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..bids.derivatives import roi_names
from ._decomp import factors_numpy, relative_error, voxel_average
from .scree import _check_tensor, as_numpy
from .splits import Splits

__all__ = [
    "fit_linear_model",
    "roi_coefficients",
    "roi_contributions",
    "regression_metrics",
    "FinalModel",
    "fit_final",
]

LOG = logging.getLogger("brainage_xai.selection")


def _as_2d(y, name: str) -> np.ndarray:
    y = np.asarray(as_numpy(y), dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise ValueError(f"{name} must be (n,) or (n, targets); got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"{name} contains NaN or Inf values")
    return y


def fit_linear_model(U1, result, y):
    """Fit a linear model (scikit-learn) from the voxel-averaged reconstruction to ``y``.

    Parameters
    ----------
    U1 : array-like, shape (n, R1)
        Loadings of the subjects (training).
    result : decomposition result
        Gives ``W`` and ``U3``.
    y : array-like, shape (n,) or (n, t)
        Target(s).

    Returns
    -------
    sklearn.linear_model.LinearRegression
        Fitted on ``X = U1 diag(mean U3) W^T``; X has rank <= R1, and the least-squares
        solution of minimum norm is used.
    """
    from sklearn.linear_model import LinearRegression

    X = voxel_average(U1, result)
    y2 = _as_2d(y, "y")
    if X.shape[0] != y2.shape[0]:
        raise ValueError(f"U1 has {X.shape[0]} subjects but y has {y2.shape[0]}")
    return LinearRegression().fit(X, y2)


def predict(model, U1, result) -> np.ndarray:
    """Predictions (n, t) of :func:`fit_linear_model`'s model for loadings ``U1``."""
    return model.predict(voxel_average(U1, result))


def roi_coefficients(model, result) -> np.ndarray:
    """Per-RoI coefficients ``gamma = diag(mean U3) W^T beta`` (R1, t)."""
    _, W, U3 = factors_numpy(result)
    beta = np.atleast_2d(model.coef_)  # (t, c)
    return (U3.mean(axis=0)[:, None] * W.T) @ beta.T


def roi_contributions(U1, gamma) -> np.ndarray:
    """Contribution of each RoI to each prediction, ``U1[i, r] * gamma[r, t]`` (n, R1, t)."""
    return as_numpy(U1).astype(np.float64)[:, :, None] * np.asarray(gamma)[None, :, :]


def regression_metrics(y, pred) -> dict:
    """MAE and MSE, averaged over targets when there are several."""
    y2 = _as_2d(y, "y")
    p2 = _as_2d(pred, "predictions")
    err = p2 - y2
    return {"mae": float(np.mean(np.abs(err))), "mse": float(np.mean(err**2))}


@dataclass
class FinalModel:
    """The final decomposition, loadings, linear model and metrics.

    Attributes
    ----------
    result : decomposition result
        Fitted on the training subjects at ``rank`` and ``l1``.
    rank : tuple of int
    l1 : float
    loadings : dict
        ``{"train": U1, "val": U1, "test": U1}`` (held-out loadings refitted with the
        core, U2 and U3 fixed).
    errors : dict
        Relative reconstruction error per split.
    linear_model : sklearn.linear_model.LinearRegression
    roi_coefficients : numpy.ndarray, shape (R1, t)
    predictions : dict
        Per split, a dict of named predictions (n, t).
    metrics : dict
        Test MAE/MSE of the network (when given), of the linear model on the
        decomposition, of the network head on the reconstruction (when given) and of
        the mean predictor; also the same on validation.
    """

    result: object
    rank: tuple
    l1: float
    loadings: dict
    errors: dict
    linear_model: object
    roi_coefficients: np.ndarray
    predictions: dict
    metrics: dict
    seconds: float = 0.0
    extras: dict = field(default_factory=dict)


def fit_final(
    A: Splits,
    y: Splits,
    rank,
    l1: float = 0.0,
    head=None,
    *,
    network_pred=None,
    init="svd",
    constraints: str = "nonneg",
    n_iter_max: int = 500,
    tol: float = 1e-7,
    random_state=0,
) -> FinalModel:
    """Fit the final decomposition and report how much of the prediction it carries.

    Parameters
    ----------
    A : Splits of array-like, shape (n_split, c, v)
        Activations per split; the decomposition is fitted on the training split only.
    y : Splits of array-like, shape (n_split,) or (n_split, t)
        Targets.
    rank : tuple of int
        ``(R1, R2)``.
    l1 : float
        Sparsity penalty on U3.
    head : callable, optional
        The network's head: maps voxel-averaged activations (m, c) to predictions
        (m,) or (m, t), e.g. the trained network's final linear layer. Applied to the
        reconstruction (metric ``network_head_on_reconstruction``) and, when
        ``network_pred`` is not given, to the voxel averages of the activations
        themselves (metric ``network``; exact for a network that ends in global average
        pooling and a linear head).
    network_pred : dict, optional
        The network's own predictions per split (``{"val": ..., "test": ...}``).
    init, constraints, n_iter_max, tol, random_state
        Passed to :func:`brainage_xai.decomposition.fit_constrained_tucker`; ``init`` may
        be a previous result (e.g. from the λ sweep).

    Returns
    -------
    FinalModel
    """
    from ..decomposition import fit_constrained_tucker

    t0 = time.perf_counter()
    A = {split: _check_tensor(a, f"A_{split}") for split, a in A.items()}
    y = {split: _as_2d(t, f"y_{split}") for split, t in y.items()}
    for split in A:
        if A[split].shape[0] != y[split].shape[0]:
            raise ValueError(
                f"A_{split} has {A[split].shape[0]} subjects but y_{split} has {y[split].shape[0]}"
            )
    rank = (int(rank[0]), int(rank[1]))
    res = fit_constrained_tucker(
        A["train"], rank=rank, constraints=constraints, l1=float(l1), n_iter_max=n_iter_max,
        tol=tol, init=init, random_state=random_state,
    )
    loadings = {"train": as_numpy(res.factors[0]).astype(np.float64)}
    for split in ("val", "test"):
        loadings[split] = as_numpy(res.transform(A[split])).astype(np.float64)
    errors = {split: relative_error(A[split], res, loadings[split]) for split in A}
    model = fit_linear_model(loadings["train"], res, y["train"])
    gamma = roi_coefficients(model, res)
    mean_y = y["train"].mean(axis=0)

    predictions = {}
    metrics: dict = {}
    for split in A:
        pred = {
            "linear_model_on_decomposition": model.predict(voxel_average(loadings[split], res)),
            "mean_predictor": np.broadcast_to(mean_y, y[split].shape).copy(),
        }
        if network_pred is not None and split in network_pred:
            pred["network"] = _as_2d(network_pred[split], f"network_pred[{split!r}]")
        elif head is not None:
            pred["network"] = _as_2d(head(as_numpy(A[split].mean(2))), "head output")
        if head is not None:
            pred["network_head_on_reconstruction"] = _as_2d(
                head(voxel_average(loadings[split], res)), "head output"
            )
        predictions[split] = pred
        if split != "train":
            metrics[split] = {name: regression_metrics(y[split], p) for name, p in pred.items()}
    metrics["reconstruction_error"] = errors
    final = FinalModel(
        result=res, rank=rank, l1=float(l1), loadings=loadings, errors=errors,
        linear_model=model, roi_coefficients=gamma, predictions=predictions, metrics=metrics,
        seconds=time.perf_counter() - t0,
    )
    LOG.info(
        "final decomposition %s, l1=%g: test MAE linear model %.3f, mean predictor %.3f",
        rank, l1, metrics["test"]["linear_model_on_decomposition"]["mae"],
        metrics["test"]["mean_predictor"]["mae"],
    )
    return final


def loadings_table(final: FinalModel, participant_ids: dict | None = None, target_names=None) -> pd.DataFrame:
    """Per-subject loadings (one column per RoI) and the linear model's prediction."""
    frames = []
    for split in ("train", "val", "test"):
        U1 = final.loadings[split]
        ids = None if participant_ids is None else participant_ids.get(split)
        if ids is None:
            ids = [f"{split}-{i}" for i in range(U1.shape[0])]
        if len(ids) != U1.shape[0]:
            raise ValueError(f"{len(ids)} participant ids for {U1.shape[0]} {split} subjects")
        df = pd.DataFrame({"participant_id": [str(i) for i in ids], "split": split})
        for r, name in enumerate(roi_names(U1.shape[1])):
            df[name] = U1[:, r]
        pred = final.predictions[split]["linear_model_on_decomposition"]
        names = list(target_names) if target_names is not None else (
            ["target"] if pred.shape[1] == 1 else [f"target_{t + 1}" for t in range(pred.shape[1])]
        )
        for t, name in enumerate(names):
            df[f"predicted_{name}"] = pred[:, t]
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


#: The held-out splits that metrics are reported on.
HELD_OUT = ("val", "test")
#: The predictors of :func:`fit_final`, in the order they are reported.
PREDICTOR_NAMES = ("network", "linear_model_on_decomposition", "network_head_on_reconstruction",
                   "mean_predictor")


def target_metrics(final: FinalModel, y_true: Splits, mean, std, targets, key: str) -> dict:
    """The final fit's metrics per target and held-out split, in the target's own units.

    ``final`` was fitted on targets standardised with ``mean`` and ``std`` (as the network
    was trained); ``y_true`` holds the targets in their units. The predictors are those of
    :func:`fit_final`: (a) the network, (b) the linear model on the decomposition, (c) the
    network's head on the voxel-averaged reconstruction (when it applies), (d) the
    training-mean predictor.
    """
    out: dict = {}
    for j, target in enumerate(targets):
        out[target] = {}
        for split in HELD_OUT:
            true = np.asarray(y_true[split])[:, j]
            out[target][split] = {}
            for name in PREDICTOR_NAMES:
                if name not in final.predictions[split]:
                    continue
                pred = np.asarray(final.predictions[split][name])[:, j] * std[j] + mean[j]
                err = pred - true
                out[target][split][name] = {"mae": float(np.mean(np.abs(err))), "mse": float(np.mean(err**2))}
    return {
        "Description": "Test and validation MAE/MSE, in the target's units, of (a) the network, (b) the "
        "linear model on the decomposition (voxel-averaged reconstruction), (c) the network's head "
        "applied to the voxel-averaged reconstruction (only when the decomposed layer is the last "
        "one, which the head reads), (d) the training-mean predictor. 'standardised' holds the same "
        "from the selection stage, on the standardised target the network was trained on.",
        "rank": list(final.rank),
        "l1": final.l1,
        "metrics": out,
        "reconstruction_error": final.errors,
        "stage_key": key,
    }
