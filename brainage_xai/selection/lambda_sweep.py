"""Sparsity sweep (paper Algorithm 2): choose the ℓ1 penalty λ on U3 by validation MAE.

For each λ the decomposition is fitted on the training subjects, the validation
loadings are refitted with the core, U2 and U3 fixed, the reconstruction is averaged over
voxels (``U1 diag(mean U3) W^T``), a linear model is fitted to the training target(s)
and evaluated on validation. Every λ is warm-started from the same unpenalised fit, so
the fits are independent (parallel) and their result does not depend on the order.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..utils.io import read_tsv, write_tsv
from ._decomp import factors_numpy, relative_error
from .linear_model import _as_2d, fit_linear_model, predict, regression_metrics
from .rank_sweep import _parallel, _parallel_backend, _require_dask, tensor_fingerprint
from .scree import _check_tensor

__all__ = [
    "run_lambda_sweep",
    "choose_lambda",
    "default_lambda_grid",
    "lambda_scale",
    "LAMBDA_COLUMNS",
]

LOG = logging.getLogger("brainage_xai.selection")

LAMBDA_COLUMNS = [
    "lambda", "train_error", "val_error", "train_mae", "val_mae", "val_mse",
    "sparsity", "n_active_rois", "n_iter", "seconds",
]
LAMBDA_SIDECAR = {
    "lambda": {"Description": "ℓ1 penalty on the spatial factor U3."},
    "train_error": {"Description": "Relative reconstruction error on the training subjects."},
    "val_error": {
        "Description": "Relative reconstruction error on the validation subjects (U1 refitted)."
    },
    "train_mae": {
        "Description": "MAE on training of the linear model on the voxel-averaged reconstruction."
    },
    "val_mae": {"Description": "MAE of that linear model on the validation subjects (the criterion)."},
    "val_mse": {"Description": "MSE of that linear model on the validation subjects."},
    "sparsity": {"Description": "Fraction of exactly zero entries of U3."},
    "n_active_rois": {"Description": "Columns of U3 with at least one non-zero voxel."},
    "n_iter": {"Description": "Solver iterations."},
    "seconds": {"Description": "Wall time of the fit and its evaluation.", "Units": "s"},
}


def lambda_scale(A, result) -> float:
    """The penalty at which HALS would zero every entry of U3 from a zero start.

    It is the largest entry of the mode-3 MTTKRP ``A_(3) (W ⊙ U1)`` at ``result``, with
    the columns of U1 and W scaled to unit norm as the solver's penalty
    ``l1 * ||U3||_1`` assumes: the ℓ1 shrinkage subtracts λ from exactly that quantity,
    so penalties are meaningful as fractions of it whatever the scale of the activations.
    """
    A = _check_tensor(A, "A")
    U1, W, _ = factors_numpy(result)
    U1 = U1 / np.maximum(np.linalg.norm(U1, axis=0), 1e-300)
    W = W / np.maximum(np.linalg.norm(W, axis=0), 1e-300)
    if hasattr(A, "detach"):
        # A torch tensor (a GPU's): one subject at a time, as (R1 x c) @ (c x v) products,
        # where torch.einsum could form an (n, c, v, R1) intermediate.
        import torch

        U1t = torch.as_tensor(U1, dtype=A.dtype, device=A.device)
        Wt = torch.as_tensor(W, dtype=A.dtype, device=A.device)
        M3 = torch.zeros((Wt.shape[1], A.shape[2]), dtype=A.dtype, device=A.device)
        for i in range(A.shape[0]):
            M3 += U1t[i, :, None] * (Wt.T @ A[i])
        return float(M3.max())
    M3 = np.einsum("icv,ir,cr->vr", A, U1.astype(A.dtype), W.astype(A.dtype), optimize=True)
    return float(np.max(M3))


def default_lambda_grid(A, result, n: int = 8, low: float = 1e-3, high: float = 0.3) -> list[float]:
    """``0`` and ``n`` log-spaced penalties from ``low`` to ``high`` times :func:`lambda_scale`."""
    scale = lambda_scale(A, result)
    return [0.0] + [float(f"{x:.6g}") for x in scale * np.logspace(np.log10(low), np.log10(high), n)]


def _check_grid(lambda_grid) -> list[float]:
    try:
        grid = sorted({float(x) for x in lambda_grid})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"lambda grid must be numbers; got {lambda_grid!r}") from exc
    if not grid:
        raise ValueError("lambda grid is empty")
    if grid[0] < 0 or not np.all(np.isfinite(grid)):
        raise ValueError(f"lambda values must be finite and >= 0; got {grid}")
    return grid


def _fit_lambda(A_train, A_val, y_train, y_val, rank, lam, init, settings):
    from ..decomposition import fit_constrained_tucker

    t0 = time.perf_counter()
    res = fit_constrained_tucker(A_train, rank=rank, l1=lam, init=init, **settings)
    return _evaluate(A_train, A_val, y_train, y_val, lam, res, t0)


def _evaluate(A_train, A_val, y_train, y_val, lam, res, t0):
    U1_val = res.transform(A_val)
    model = fit_linear_model(res.factors[0], res, y_train)
    train = regression_metrics(y_train, predict(model, res.factors[0], res))
    val = regression_metrics(y_val, predict(model, U1_val, res))
    _, _, U3 = factors_numpy(res)
    row = {
        "lambda": lam,
        "train_error": float(res.rel_error),
        "val_error": relative_error(A_val, res, U1_val),
        "train_mae": train["mae"],
        "val_mae": val["mae"],
        "val_mse": val["mse"],
        "sparsity": float(np.mean(U3 == 0)),
        "n_active_rois": int(np.sum(np.any(U3 > 0, axis=0))),
        "n_iter": int(res.n_iter),
        "seconds": time.perf_counter() - t0,
    }
    return row, res


def _read_finished(out_tsv: Path, fingerprint: str) -> dict:
    if not out_tsv.exists():
        return {}
    import json

    sidecar = Path(str(out_tsv)[: -len(".tsv")] + ".json")
    try:
        stamp = json.loads(sidecar.read_text()).get("DataFingerprint")
        table = read_tsv(out_tsv)
    except (OSError, ValueError, pd.errors.ParserError):
        return {}
    if stamp != fingerprint or list(table.columns) != LAMBDA_COLUMNS:
        LOG.warning("%s was computed on other data or settings; recomputing the λ sweep", out_tsv)
        return {}
    return {float(rec["lambda"]): rec for rec in table.to_dict("records")}


def _found(lam: float, done: dict):
    """The key of ``done`` equal to ``lam`` up to float formatting, or None."""
    for key in done:
        if np.isclose(key, lam, rtol=1e-9, atol=0):
            return key
    return None


def run_lambda_sweep(
    A_train,
    A_val,
    y_train,
    y_val,
    rank,
    lambda_grid=None,
    out_tsv=None,
    *,
    init="svd",
    n_jobs: int | None = 1,
    dask_scheduler: str | None = None,
    random_state=0,
    quiet: bool = False,
    constraints: str = "nonneg",
    n_iter_max: int = 200,
    tol: float = 1e-5,
) -> pd.DataFrame:
    """Validation MAE of the linear model on the decomposition over a grid of λ.

    Parameters
    ----------
    A_train, A_val : array-like, shape (n, c, v), (m, c, v)
        Activations of the training and validation subjects.
    y_train, y_val : array-like, shape (n,) / (m,) or with a second axis of targets
        Targets; with several, MAE and MSE are averaged over them.
    rank : tuple of int
        ``(R1, R2)``.
    lambda_grid : iterable of float, optional
        Penalties; default :func:`default_lambda_grid` (0 and 8 log-spaced values).
    out_tsv : path-like, optional
        ``lambda_sweep.tsv``; finished λ are read back on a re-run (same data only).
    init : "svd" or decomposition result
        Start of the unpenalised fit every λ is warm-started from (e.g. the rank sweep's
        result at the chosen rank).
    n_jobs : int or None
        Parallel workers (joblib).
    dask_scheduler : str, optional
        Address of a Dask scheduler: the λ fits run there (joblib's dask backend).
    random_state, quiet, constraints, n_iter_max, tol
        As in :func:`~brainage_xai.selection.run_rank_sweep`.

    Returns
    -------
    pandas.DataFrame
        Columns ``lambda, train_error, val_error, train_mae, val_mae, val_mse, sparsity,
        n_active_rois, n_iter, seconds`` sorted by λ; ``attrs`` has ``n_fitted``,
        ``n_resumed`` and ``base`` (the unpenalised result).
    """
    from joblib import delayed
    from tqdm.auto import tqdm

    from ..decomposition import fit_constrained_tucker

    if dask_scheduler is not None:
        _require_dask(dask_scheduler)  # before any fitting
    A_train = _check_tensor(A_train, "A_train")
    A_val = _check_tensor(A_val, "A_val")
    y_train = _as_2d(y_train, "y_train")
    y_val = _as_2d(y_val, "y_val")
    if y_train.shape[0] != A_train.shape[0] or y_val.shape[0] != A_val.shape[0]:
        raise ValueError(
            f"targets for {y_train.shape[0]} training and {y_val.shape[0]} validation subjects; "
            f"activations for {A_train.shape[0]} and {A_val.shape[0]}"
        )
    rank = (int(rank[0]), int(rank[1]))
    settings = {
        "constraints": constraints, "n_iter_max": n_iter_max, "tol": tol,
        "random_state": random_state,
    }
    out_tsv = Path(out_tsv) if out_tsv is not None else None
    fingerprint = tensor_fingerprint(A_train, A_val, y_train, y_val) + f"-R{rank[0]}x{rank[1]}"
    done = _read_finished(out_tsv, fingerprint) if out_tsv is not None else {}
    base = None
    t0 = time.perf_counter()
    if lambda_grid is None or any(_found(lam, done) is None for lam in _check_grid(lambda_grid)):
        base = fit_constrained_tucker(A_train, rank=rank, l1=0.0, init=init, **settings)
    grid = _check_grid(lambda_grid if lambda_grid is not None else default_lambda_grid(A_train, base))
    rows = {lam: done[k] for lam in grid if (k := _found(lam, done)) is not None}
    n_resumed = len(rows)

    def write():
        table = pd.DataFrame([rows[k] for k in sorted(rows)], columns=LAMBDA_COLUMNS)
        if out_tsv is not None:
            write_tsv(out_tsv, table, sidecar={**LAMBDA_SIDECAR, "DataFingerprint": fingerprint})
        return table

    n_fitted = 0
    todo = [lam for lam in grid if lam not in rows]
    with tqdm(total=len(todo), desc="λ sweep", unit="fit", disable=quiet or not todo) as bar:
        if 0.0 in todo:
            rows[0.0], _ = _evaluate(A_train, A_val, y_train, y_val, 0.0, base, t0)
            todo.remove(0.0)
            n_fitted += 1
            write()
            bar.update(1)
        tasks = [
            delayed(_fit_lambda)(A_train, A_val, y_train, y_val, rank, lam, base, settings)
            for lam in todo
        ]
        with _parallel_backend(dask_scheduler):
            results = _parallel(-1 if dask_scheduler else (n_jobs or 1))(tasks)
            for row, _ in results:
                rows[row["lambda"]] = row
                n_fitted += 1
                write()
                bar.update(1)
    table = write() if (n_fitted or out_tsv is None or not out_tsv.exists()) else pd.DataFrame(
        [rows[k] for k in sorted(rows)], columns=LAMBDA_COLUMNS
    )
    table.attrs.update(n_fitted=n_fitted, n_resumed=n_resumed, base=base)
    return table


def choose_lambda(table: pd.DataFrame) -> dict:
    """The λ with the smallest validation MAE (ties: the larger λ, i.e. the sparser RoIs).

    A λ that leaves no RoI (every column of the spatial factor zero) is not a candidate:
    its linear model is the mean, and it explains nothing.
    """
    if table.empty:
        raise ValueError("the λ sweep table is empty; nothing to choose from")
    if "n_active_rois" in table and (table["n_active_rois"] > 0).any():
        table = table[table["n_active_rois"] > 0]
    best = table["val_mae"].min()
    tied = table.loc[np.isclose(table["val_mae"], best, rtol=1e-12, atol=0)]
    row = tied.sort_values("lambda").iloc[-1]
    return {
        "lambda": float(row["lambda"]),
        "rule": "smallest validation MAE of the linear model on the voxel-averaged reconstruction",
        "numbers": {
            "val_mae": float(row["val_mae"]),
            "val_mse": float(row["val_mse"]),
            "val_mae_at_lambda_0": (
                float(table.loc[table["lambda"] == 0, "val_mae"].iloc[0])
                if (table["lambda"] == 0).any() else None
            ),
            "sparsity": float(row["sparsity"]),
            "n_active_rois": int(row["n_active_rois"]),
        },
    }
