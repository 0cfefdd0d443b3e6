"""Subject loadings (U1) against age: linear, piecewise-linear or non-linear?

The paper reads the shape of each RoI's loading-vs-age scatter by eye (sections 4.2.2 and
4.3.2). Here three fits are compared by cross-validated error so that the statement is
reproducible: a straight line, a line with one breakpoint (hinge) and a smoothing spline
(penalty chosen by generalised cross-validation). A constant is the floor: a loading
that no fit predicts better than its mean has no clear relation with age.

How much of a loading is age is reported beside its shape: ``cv_r2``, the share of the
loadings' variance across subjects that the best fit predicts for held-out subjects
(cross-validated R², 0 when no fit beats the mean). A component can have a clear shape and
still be mostly something else: on the simulated cohort the component whose loading comes
from the age-independent decoy region has a "non-linear" relation that explains 8 % of
its variance, where the components of the planted regions reach 47-98 %.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import DataError

#: One-standard-error rule: a fit whose cross-validated squared error exceeds the best
#: fit's by less than this many standard errors of the paired difference is as good as
#: the best, and the simplest such fit names the relation (constant < linear <
#: piecewise-linear < smooth).
N_SE = 1.0

#: An RoI is called related to the target when the target predicts at least this share of
#: its loadings' variance (``cv_r2``): most of the component is the target. A threshold
#: on the effect, not a test: with 200 subjects an 8 % share is already significant. On
#: the simulated cohort the components of the age-independent decoy and of noise fall
#: well below it (0-29 %), those of the planted regions above it (77-98 %); few fall
#: between (47 % for one that mixes two planted regions with the decoy's tail, which the
#: occlusion test finds the network relies on). Below it, a component is other variation that the
#: linear model may still use as a correction for the others.
RELATED_R2 = 0.5

#: Column descriptions of ``loadings_vs_<target>.tsv`` (its JSON sidecar).
FITS_SIDECAR = {
    "roi": {"Description": "RoI name (column of U1, the subject loadings)"},
    "n": {"Description": "subjects fitted (all splits)"},
    "pearson_r": {"Description": "Pearson correlation of the loadings with the target"},
    "cv_rmse_constant": {"Description": "5-fold cross-validated RMSE of the loadings' mean (the floor)"},
    "cv_rmse_linear": {"Description": "the same for a straight line in the target"},
    "slope": {"Description": "slope of the line, loading per unit of the target"},
    "cv_rmse_piecewise": {"Description": "the same for a line with one breakpoint (hinge)"},
    "breakpoint": {"Description": "the hinge's breakpoint, in the target's units"},
    "slope_before": {"Description": "the hinge's slope before the breakpoint"},
    "slope_after": {"Description": "the hinge's slope after the breakpoint"},
    "cv_rmse_smooth": {"Description": "the same for a smoothing spline (penalty by generalised cross-validation)"},
    "relation": {"Description": "the simplest fit as good as the best (one-standard-error rule)",
                 "Levels": {"none": "no fit beats the mean", "linear": "a line",
                            "piecewise-linear": "a line with one breakpoint",
                            "non-linear": "only the smooth fit"}},
    "cv_r2": {"Description": "share of the loadings' variance across subjects that the best fit "
               "predicts for held-out subjects (1 - MSE_best / MSE_constant, cross-validated, clipped "
               "at 0): how much of the component is the target; low values mark a component of "
               "other variation, however clear its shape"},
    "coefficient": {"Description": "the linear model's weight on the RoI: target units per unit loading"},
    "statement": {"Description": "the relation in words"},
}


def _linear(x, y):
    coef = np.polyfit(x, y, 1)
    return lambda t: np.polyval(coef, t), {"slope": coef[0], "intercept": coef[1]}


def _hinge(x, y, n_knots: int = 15):
    """Least-squares ``a + b x + c max(x - k, 0)`` over a grid of breakpoints ``k``."""
    knots = np.unique(np.quantile(x, np.linspace(0.15, 0.85, n_knots)))
    best = None
    for k in knots:
        design = np.column_stack([np.ones_like(x), x, np.maximum(x - k, 0.0)])
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        sse = float(np.sum((design @ coef - y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, k, coef)
    _, k, coef = best

    def predict(t):
        t = np.asarray(t, dtype=float)
        return coef[0] + coef[1] * t + coef[2] * np.maximum(t - k, 0.0)

    return predict, {"breakpoint": k, "slope_before": coef[1], "slope_after": coef[1] + coef[2]}


def _smooth(x, y):
    """Smoothing spline on the distinct x values (ties averaged, weighted by count)."""
    from scipy.interpolate import make_smoothing_spline

    ux, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    if ux.size < 5:
        return _linear(x, y)
    uy = np.bincount(inverse, weights=y) / counts
    spline = make_smoothing_spline(ux, uy, w=counts.astype(float))
    return (lambda t: spline(np.asarray(t, dtype=float))), {}


FITS = {"linear": _linear, "piecewise": _hinge, "smooth": _smooth}


def _cv_errors(x, y, fitter, n_splits: int, seed: int) -> np.ndarray:
    """Held-out squared error of every subject (same folds for every fit)."""
    from sklearn.model_selection import KFold

    errors = np.empty_like(y)
    for train, test in KFold(n_splits, shuffle=True, random_state=seed).split(x):
        predict, _ = fitter(x[train], y[train])
        errors[test] = (predict(x[test]) - y[test]) ** 2
    return errors


def _constant(x, y):
    mean = float(np.mean(y))
    return (lambda t: np.full(np.shape(t), mean)), {}


def _as_good(errors: np.ndarray, best: np.ndarray) -> bool:
    diff = errors - best
    se = diff.std(ddof=1) / np.sqrt(diff.size) if diff.size > 1 else 0.0
    return bool(diff.mean() <= N_SE * se)


def fit_trajectory(age, loading, *, n_splits: int = 5, seed: int = 0) -> dict:
    """Compare linear, piecewise-linear and smooth fits of one RoI's loadings on age.

    Parameters
    ----------
    age, loading : array-like, shape (n,)
    n_splits : int
        Folds of the cross-validation.
    seed : int
        Seed of the fold assignment.

    Returns
    -------
    dict
        ``relation`` (``"linear"``, ``"piecewise-linear"``, ``"non-linear"`` or
        ``"none"``), ``pearson_r``, ``slope`` (per unit of age), ``breakpoint``,
        ``slope_before``, ``slope_after``, ``cv_rmse_<constant|linear|piecewise|smooth>``,
        ``cv_r2`` (cross-validated share of the loadings' variance predicted by the best
        of the three fits, clipped at 0) and ``curves`` (callables of age for plotting, fitted on all subjects).
    """
    x = np.asarray(age, dtype=float)
    y = np.asarray(loading, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2 * n_splits or np.unique(x).size < 4:
        raise DataError(
            f"need at least {2 * n_splits} subjects with 4 distinct ages to fit loadings "
            f"on age; got {x.size} subjects with {np.unique(x).size} distinct ages"
        )
    out: dict = {"n": int(x.size)}
    out["pearson_r"] = float(np.corrcoef(x, y)[0, 1]) if y.std() > 0 else 0.0
    curves, errors = {}, {}
    for name, fitter in {"constant": _constant, **FITS}.items():
        errors[name] = _cv_errors(x, y, fitter, n_splits, seed)
        out[f"cv_rmse_{name}"] = float(np.sqrt(errors[name].mean()))
        curves[name], params = fitter(x, y)
        if name == "linear":
            out["slope"] = float(params["slope"])
        elif name == "piecewise":
            out.update({k: float(v) for k, v in params.items()})
    out["curves"] = curves
    best = errors[min(errors, key=lambda k: errors[k].mean())]
    names = {"constant": "none", "linear": "linear", "piecewise": "piecewise-linear",
             "smooth": "non-linear"}
    out["relation"] = next(names[k] for k in names if _as_good(errors[k], best))
    floor = errors["constant"].mean()
    fitted = min(errors[k].mean() for k in FITS)
    out["cv_r2"] = float(max(0.0, 1.0 - fitted / floor)) if floor > 0 else 0.0
    return out


def _statement(name: str, fit: dict, unit: str) -> str:
    text = _shape(name, fit, unit)
    if fit["relation"] == "none":
        return text
    return (f"{text[:-1]}; {unit} explains {fit['cv_r2']:.0%} of the loadings' variance "
            "across subjects (cross-validated).")


def _shape(name: str, fit: dict, unit: str) -> str:
    r = fit["pearson_r"]
    if fit["relation"] == "none":
        return (
            f"{name}: no clear relation with {unit}: no fit predicts the loadings better than "
            f"their mean (r = {r:.2f})."
        )
    if fit["relation"] == "linear":
        direction = "rise" if fit["slope"] > 0 else "fall"
        return (
            f"{name}: loadings {direction} linearly with {unit} (r = {r:.2f}; a line fits as "
            f"well as the curved fits, CV RMSE {fit['cv_rmse_linear']:.3g})."
        )
    if fit["relation"] == "piecewise-linear":
        return (
            f"{name}: piecewise-linear in {unit}: slope {fit['slope_before']:+.3g} per unit "
            f"before {fit['breakpoint']:.3g}, {fit['slope_after']:+.3g} after (CV RMSE "
            f"{fit['cv_rmse_piecewise']:.3g} vs {fit['cv_rmse_linear']:.3g} for a line)."
        )
    return (
        f"{name}: non-linear in {unit}: a smooth curve fits better than a line or one "
        f"breakpoint (CV RMSE {fit['cv_rmse_smooth']:.3g} vs {fit['cv_rmse_linear']:.3g} "
        f"linear, {fit['cv_rmse_piecewise']:.3g} piecewise)."
    )


def describe_loadings(loadings: pd.DataFrame, age, *, roi_columns=None,
                      coefficients=None, target: str = "age", seed: int = 0) -> pd.DataFrame:
    """One row per RoI: the fits compared and a plain-language statement.

    Parameters
    ----------
    loadings : DataFrame
        One column per RoI (U1), one row per subject.
    age : array-like, shape (n,)
        The target of each row of ``loadings``.
    roi_columns : list of str, optional
        Columns of ``loadings`` to describe (default: all numeric ones).
    coefficients : array-like or dict, optional
        The linear model's per-RoI coefficients, added as a column.
    target : str
        Name of the target in the statements.

    Returns
    -------
    pandas.DataFrame
    """
    if roi_columns is None:
        roi_columns = [c for c in loadings.columns if pd.api.types.is_numeric_dtype(loadings[c])]
    rows = []
    for i, col in enumerate(roi_columns):
        fit = fit_trajectory(age, loadings[col].to_numpy(), seed=seed)
        row = {"roi": col, **{k: v for k, v in fit.items() if k != "curves"}}
        row.setdefault("breakpoint", np.nan)
        if coefficients is not None:
            coef = coefficients[col] if isinstance(coefficients, dict) else coefficients[i]
            row["coefficient"] = float(coef)
        row["statement"] = _statement(str(col), fit, target)
        rows.append(row)
    return pd.DataFrame(rows)


def trajectory_curves(loadings: pd.DataFrame, age, roi_columns, *, seed: int = 0,
                      points: int = 200) -> dict:
    """Each RoI's fitted curves on a grid of the target, for the loadings figure.

    Returns
    -------
    dict
        ``grid`` (``points`` values of the target) and, per RoI column, ``relation`` and
        the ``linear``, ``piecewise`` and ``smooth`` fits evaluated on the grid
        (:func:`fit_trajectory`, fitted on all subjects).
    """
    x = np.asarray(age, dtype=float)
    grid = np.linspace(np.nanmin(x), np.nanmax(x), points)
    out: dict = {"grid": grid}
    for col in roi_columns:
        fit = fit_trajectory(x, loadings[col].to_numpy(dtype=float), seed=seed)
        out[col] = {"relation": fit["relation"],
                    **{name: np.asarray(curve(grid), dtype=float) for name, curve in fit["curves"].items()}}
    return out
