"""Choosing the ranks from the rank sweep (the knee of the validation error, and the
fewest components whose linear model carries the prediction)."""

from __future__ import annotations

import numpy as np
import pandas as pd

#: R1 is at least the smallest rank whose linear model's validation MAE (best over R2)
#: is within this share of the best over the grid (:func:`choose_ranks`).
PREDICTION_TOLERANCE = 0.10


def _knee(x, y) -> int | None:
    """Kneedle knee of a decreasing, convex curve, or None."""
    from kneed import KneeLocator

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(y) <= 0:
        return None
    import warnings

    with warnings.catch_warnings():
        # kneed warns (and returns None) when it finds no knee; None says that here.
        warnings.simplefilter("ignore")
        knee = KneeLocator(x, y, curve="convex", direction="decreasing").knee
    return None if knee is None else int(round(float(knee)))


def _parsimonious(candidates: dict, curve: dict, tolerance: float):
    """The smallest candidate rank within ``tolerance`` of the best candidate's error."""
    valid = {name: r for name, r in candidates.items() if r is not None and r in curve}
    if not valid:
        return None, None
    best = min(curve[r] for r in valid.values())
    rank = min(r for r in valid.values() if curve[r] <= best * (1 + tolerance))
    return rank, sorted(name for name, r in valid.items() if r == rank)


def choose_ranks(sweep: pd.DataFrame, scree: pd.DataFrame | None = None, tolerance: float = 0.01) -> dict:
    """Choose ``(R1, R2)`` from the rank sweep and the scree, as paper section 3.5 reasons.

    R1: the candidates are the knee (Kneedle) of the validation error as a function of R1
    (best R2 for each R1) and the rank after the largest scree drop of modes 1 and 3; the
    smallest candidate whose validation error is within ``tolerance`` (relative) of the
    best candidate's is chosen, so that a knee and a scree drop that disagree are settled
    by held-out error, in favour of fewer RoIs when they fit equally well. When the
    sweep has ``val_mae``, R1 is then raised, if need be, to the smallest rank whose
    linear model's validation MAE (best over R2) is within :data:`PREDICTION_TOLERANCE`
    of the best over the grid: RoIs that cannot predict the target do not explain the
    network's prediction. R2: likewise
    on the validation error along R2 at the chosen R1 (knee, mode-2 scree drop, and R2 =
    R1, where the mode-2 constraint becomes inactive); when the sweep has ``val_mae``,
    instead every R2 up to R1 whose validation error is within ``tolerance`` of the best
    at R1 is a candidate, and the one whose linear model on the voxel-averaged
    reconstruction has the smallest validation MAE is chosen (ties: the smaller). R2 does
    not change the RoIs (the spatial factor has R1 columns) but caps the rank of that
    model's inputs, so a smaller R2 that reconstructs as well can still predict worse.

    Parameters
    ----------
    sweep : pandas.DataFrame
        Output of :func:`run_rank_sweep`.
    scree : pandas.DataFrame, optional
        Output of :func:`~brainage_xai.selection.compute_scree`.
    tolerance : float
        Relative validation-error margin within which a smaller rank is preferred.

    Returns
    -------
    dict
        ``R1``, ``R2``, ``rule`` (a sentence) and ``numbers`` (the knees, scree drops,
        validation errors of the candidates and the curves they came from).
    """
    from .scree import scree_drop

    if sweep.empty:
        raise ValueError("the rank sweep table is empty; nothing to choose from")
    by_r1 = sweep.groupby("R1")["val_error"].min()
    grid1 = [int(r) for r in by_r1.index]
    curve1 = {int(r): float(e) for r, e in by_r1.items()}
    drops = {}
    if scree is not None:
        for mode in (1, 2, 3):
            drops[mode] = scree_drop(scree, mode, candidates=sorted(set(sweep["R2"] if mode == 2 else grid1)))
    cands1 = {
        "knee of the validation error": _knee(grid1, [curve1[r] for r in grid1]),
        "scree drop, mode 1": drops.get(1),
        "scree drop, mode 3": drops.get(3),
    }
    R1, why1 = _parsimonious(cands1, curve1, tolerance)
    if R1 is None:
        R1 = min(curve1, key=curve1.get)
        why1 = ["smallest validation error (no knee, no scree)"]
    R1_reconstruction, mae1, R1_prediction = R1, None, None
    if "val_mae" in sweep and sweep["val_mae"].notna().all():
        # The RoIs are there to explain the prediction: R1 is raised to the smallest rank
        # whose linear model predicts about as well as the best (within
        # PREDICTION_TOLERANCE, about one standard error of a validation MAE over ~40
        # subjects). Without it a knee or scree drop at 3 or 5 gave 10-year linear models
        # against the networks' 3-5 years (docs/selection.md).
        mae1 = {int(r): float(e) for r, e in sweep.groupby("R1")["val_mae"].min().items()}
        best1 = min(mae1.values())
        R1_prediction = min(r for r in grid1 if mae1[r] <= best1 * (1 + PREDICTION_TOLERANCE))
        if R1_prediction > R1:
            why1 = [f"raised from {R1} ({' and '.join(why1)}): the smallest R1 whose linear model's "
                    f"validation MAE is within {PREDICTION_TOLERANCE:.0%} of the best"]
            R1 = R1_prediction

    at = sweep.loc[sweep["R1"] == R1].sort_values("R2")
    curve2 = {int(r): float(e) for r, e in zip(at["R2"], at["val_error"])}
    mae2 = None
    if "val_mae" in at and at["val_mae"].notna().all():
        mae2 = {int(r): float(e) for r, e in zip(at["R2"], at["val_mae"])}
    lower = [r for r in sorted(curve2) if r <= R1]
    cands2 = {
        "knee of the validation error": _knee(lower, [curve2[r] for r in lower]),
        "scree drop, mode 2": drops.get(2) if drops.get(2) in lower else None,
        "R2 = R1 (constraint inactive)": R1 if R1 in curve2 else None,
    }
    within = f"within {tolerance:.0%} of the best candidate's validation error"
    if mae2 is not None and lower and all(np.isfinite(mae2.get(r, np.nan)) for r in lower):
        # Every R2 up to R1 that reconstructs as well is a candidate, named by a rule or
        # not: the knee can land on a rank whose linear model is far worse than its
        # neighbour's (R2 = 3 against 5 on a GPU-trained demo network: validation MAE
        # 0.77 vs 0.29, validation errors 0.8027 vs 0.8024).
        best2 = min(curve2[r] for r in lower)
        ok = [r for r in lower if curve2[r] <= best2 * (1 + tolerance)]
        R2 = min(ok, key=lambda r: (mae2[r], r))
        why2 = sorted(name for name, r in cands2.items() if r == R2) or ["smallest validation MAE"]
        how = (
            f"R1 the smallest candidate {within} (fewer RoIs); R2 the rank up to R1 within "
            f"{tolerance:.0%} of the best validation error at R1 whose linear model has the "
            "smallest validation MAE"
        )
    else:
        R2, why2 = _parsimonious(cands2, curve2, tolerance)
        if R2 is None:
            R2 = min(curve2, key=curve2.get)
            why2 = ["smallest validation error"]
        how = f"each the smallest candidate {within}"
    rule = f"R1 = {R1}: {' and '.join(why1)}; R2 = {R2}: {' and '.join(why2)} ({how})"
    return {
        "R1": int(R1),
        "R2": int(R2),
        "rule": rule,
        "numbers": {
            "tolerance": tolerance,
            "R1_candidates": cands1,
            "R2_candidates": cands2,
            "val_error_by_R1": curve1,
            "val_mae_by_R1": mae1,
            "R1_by_reconstruction": int(R1_reconstruction),
            "R1_by_prediction": None if R1_prediction is None else int(R1_prediction),
            "prediction_tolerance": PREDICTION_TOLERANCE,
            "val_error_by_R2_at_R1": curve2,
            "val_mae_by_R2_at_R1": mae2,
            "val_error": curve2.get(R2),
            "train_error": float(at.loc[at["R2"] == R2, "train_error"].iloc[0]),
        },
    }
