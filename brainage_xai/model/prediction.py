"""Predictions, brain-age gap with age-bias correction, metrics and a plot.

Age-bias correction (Smith et al. 2019, the simple model; the linear correction of Cole
and colleagues): brain-age models regress towards the mean, so the raw gap ``delta =
predicted - age`` correlates negatively with age. On the training and validation subjects
only (never the test subjects) we fit ``delta = slope * age + intercept`` and report
``delta_corrected = delta - (slope * age + intercept)`` and ``predicted_corrected = age +
delta_corrected``. The corrected gap has no linear age trend on the fitted subjects. The
variant of de Lange & Cole (2020), which fits ``predicted = a * age + b`` and divides by
``a``, gives the same corrected gap divided by ``a = 1 + slope``; we avoid the division
because it explodes for a model whose predictions barely vary. The uncorrected gap and
metrics are always reported too: the correction uses the true age, so corrected metrics
flatter.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..bids.derivatives import prediction_columns
from .training import SPLITS

LOGGER = logging.getLogger("brainage_xai.prediction")

#: Splits on which the bias correction is fitted.
CORRECTION_SPLITS = ("train", "val")





def fit_bias_correction(true, predicted) -> dict:
    """Fit the gap's age trend ``predicted - true = slope * true + intercept``."""
    true, predicted = np.asarray(true, float), np.asarray(predicted, float)
    slope, intercept = np.polyfit(true, predicted - true, 1)
    return {"slope": float(slope), "intercept": float(intercept)}


def apply_bias_correction(true, predicted, correction: dict) -> tuple[np.ndarray, np.ndarray]:
    """Corrected prediction and corrected gap (the gap minus its fitted age trend)."""
    true, predicted = np.asarray(true, float), np.asarray(predicted, float)
    gap = predicted - true - (correction["slope"] * true + correction["intercept"])
    return true + gap, gap


def regression_metrics(true, predicted, train_mean: float) -> dict:
    """MAE, MSE, Pearson r and the MAE of always predicting ``train_mean``."""
    true, predicted = np.asarray(true, float), np.asarray(predicted, float)
    err = predicted - true
    r = float(np.corrcoef(true, predicted)[0, 1]) if len(true) > 1 and np.std(predicted) > 0 else float("nan")
    return {
        "n": int(len(true)),
        "mae": float(np.mean(np.abs(err))),
        "mse": float(np.mean(err**2)),
        "r": r,
        "mean_predictor_mae": float(np.mean(np.abs(true - train_mean))),
    }


def prediction_table(split: pd.Series, targets: pd.DataFrame, predicted: np.ndarray):
    """Build ``predictions.tsv`` and fit the bias correction.

    Parameters
    ----------
    split : pandas.Series
        Split (``train``/``val``/``test``) indexed by participant label.
    targets : pandas.DataFrame
        True values, indexed by participant label, one column per target.
    predicted : numpy.ndarray
        ``(n, n_targets)`` in the order of ``targets``' rows and columns.

    Returns
    -------
    table : pandas.DataFrame
    corrections : dict
        Per target: slope, intercept and the splits they were fitted on.
    """
    predicted = np.asarray(predicted, float).reshape(len(targets), -1)
    labels = list(targets.index)
    table = pd.DataFrame({"participant_id": [f"sub-{s}" for s in labels], "split": split.loc[labels].to_numpy()})
    fit_on = table["split"].isin(CORRECTION_SPLITS).to_numpy()
    corrections = {}
    for j, target in enumerate(targets.columns):
        col = prediction_columns(target)
        true = targets[target].to_numpy(float)
        corr = fit_bias_correction(true[fit_on], predicted[fit_on, j])
        corrected, gap_corrected = apply_bias_correction(true, predicted[:, j], corr)
        table[col["true"]] = true
        table[col["predicted"]] = predicted[:, j]
        table[col["gap"]] = predicted[:, j] - true
        table[col["gap_corrected"]] = gap_corrected
        table[col["predicted_corrected"]] = corrected
        corrections[target] = {**corr, "fitted_on": list(CORRECTION_SPLITS), "method": "Smith et al. 2019 (gap regressed on age)"}
    return table, corrections


def data_dictionary(targets) -> dict:
    """JSON sidecar of ``predictions.tsv``."""
    doc = {
        "participant_id": {"Description": "Participant label"},
        "split": {
            "Description": "Data split of the participant",
            "Levels": {"train": "training set", "val": "validation set (early stopping, "
                       "tuning)", "test": "held-out test set"},
        },  # fmt: skip
    }
    for target in targets:
        col = prediction_columns(target)
        doc[col["true"]] = {"Description": f"True {target} (participants.tsv)"}
        doc[col["predicted"]] = {"Description": f"{target} predicted by the network"}
        doc[col["gap"]] = {"Description": f"Uncorrected gap: predicted minus true {target}"}
        doc[col["gap_corrected"]] = {
            "Description": f"Gap after linear age-bias correction (Smith et al. 2019): the gap minus "
            f"its linear trend in {target}, fitted on the train and val subjects only"
        }
        doc[col["predicted_corrected"]] = {"Description": f"True {target} plus the corrected gap"}
        if target == "age":
            for key in ("true", "predicted", "gap", "gap_corrected", "predicted_corrected"):
                doc[col[key]]["Units"] = "years"
    return doc


def compute_metrics(table: pd.DataFrame, targets, corrections: dict) -> dict:
    """``metrics.json``: per target and split, uncorrected and corrected metrics."""
    out = {"targets": list(targets), "splits": list(SPLITS), "metrics": {}, "bias_correction": corrections}
    train = table["split"] == "train"
    for target in targets:
        col = prediction_columns(target)
        train_mean = float(table.loc[train, col["true"]].mean())
        per_split = {}
        for name in SPLITS:
            rows = table[table["split"] == name]
            if rows.empty:
                continue
            m = regression_metrics(rows[col["true"]], rows[col["predicted"]], train_mean)
            corrected = rows[col["predicted_corrected"]].to_numpy(float)
            m["mae_corrected"] = float(np.mean(np.abs(corrected - rows[col["true"]].to_numpy(float))))
            m["mae_ratio_to_mean_predictor"] = m["mae"] / m["mean_predictor_mae"] if m["mean_predictor_mae"] else None
            per_split[name] = m
        out["metrics"][target] = per_split
    return out


def evaluate_predictions(split: pd.Series, targets: pd.DataFrame, predicted) -> tuple[pd.DataFrame, dict]:
    """``predictions.tsv``'s table and ``metrics.json``'s content, logged per target.

    Returns
    -------
    table : pandas.DataFrame
    metrics : dict
    """
    table, corrections = prediction_table(split, targets, predicted)
    metrics = compute_metrics(table, targets.columns, corrections)
    for target in targets.columns:
        test = metrics["metrics"][target].get("test")
        if test:
            LOGGER.info(
                "%s: test MAE %.2f (mean predictor %.2f), r %.2f",
                target, test["mae"], test["mean_predictor_mae"], test["r"],
            )  # fmt: skip
    return table, metrics
