"""Rank sweep (paper Algorithm 1): train and validation error over a grid of (R1, R2).

Work saved by the structure of the model (DESIGN.md): with ``R2 >= R1`` the mode-2
constraint is inactive, so every such cell has the optimum of the rank-R1 fit at
``R2 = R1``; it is fitted once and the other cells say so (``shared_optimum``). Each row
``R1`` of the grid is then walked down in ``R2``, every fit warm-started from the one
above it. Cells of equal distance from the diagonal are independent and run in parallel
(joblib; a Dask cluster through joblib's dask backend). Finished cells are appended to
the TSV as they complete, and a re-run reads them back instead of refitting them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UsageError
from ..utils.io import atomic_path, read_tsv, write_tsv
from ._decomp import relative_error
from .linear_model import _as_2d, fit_linear_model, predict, regression_metrics
from .scree import _check_tensor

__all__ = ["run_rank_sweep", "SWEEP_COLUMNS", "SWEEP_SIDECAR", "tensor_fingerprint"]

LOG = logging.getLogger("brainage_xai.selection")

SWEEP_COLUMNS = [
    "R1", "R2", "train_error", "val_error", "val_mae", "n_iter", "seconds", "shared_optimum",
    "fitted",
]
SWEEP_SIDECAR = {
    "R1": {"Description": "Rank of modes 1 and 3 (number of RoIs)."},
    "R2": {"Description": "Rank of mode 2 (channels)."},
    "train_error": {
        "Description": "Relative reconstruction error ||A - Ahat|| / ||A|| on the training subjects."
    },
    "val_error": {
        "Description": "Relative reconstruction error on the validation subjects, their "
        "loadings U1 refitted with the core, U2 and U3 of the training fit held fixed."
    },
    "val_mae": {
        "Description": "Validation MAE of the linear model on the voxel-averaged "
        "reconstruction (fitted on the training subjects, as in the lambda sweep); n/a when "
        "the sweep was run without targets. Breaks ties between R2 candidates that "
        "reconstruct equally well: R2 caps the rank of that model's inputs, not the RoIs."
    },
    "n_iter": {"Description": "Iterations of the solver for the fit that gave this row."},
    "seconds": {
        "Description": "Wall time of the fit and the validation refit; 0 where the row was "
        "not fitted itself (shared_optimum and fitted false).",
        "Units": "s",
    },
    "shared_optimum": {
        "Description": "True where R2 >= R1: the mode-2 rank constraint is inactive and the "
        "cell has the same optimum as the rank-R1 fit at R2 = R1, which is fitted once."
    },
    "fitted": {
        "Description": "True where this row's numbers come from its own fit; false where they "
        "are copied from the cell R2 = R1 of the same R1."
    },
}


def tensor_fingerprint(*arrays) -> str:
    """A short content hash of the tensors (shape, dtype and bytes).

    A sweep table is only resumed when it was computed on the same data.
    """
    h = hashlib.blake2b(digest_size=12)
    for arr in arrays:
        if hasattr(arr, "detach"):
            # A torch tensor (on a GPU, say) hashes as the same numpy array would, so that a
            # sweep resumes across devices; its bytes come to the host a row at a time.
            h.update(f"{tuple(arr.shape)}{str(arr.dtype).removeprefix('torch.')}".encode())
            for row in arr.detach().reshape(len(arr), -1) if arr.ndim else [arr.detach()]:
                h.update(memoryview(np.ascontiguousarray(row.cpu().numpy())).cast("B"))
            continue
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def _check_grid(rank_grid, shape) -> list[int]:
    try:
        grid = sorted({int(r) for r in rank_grid})
    except (TypeError, ValueError) as exc:
        raise UsageError(f"rank grid must be integers; got {rank_grid!r}") from exc
    if not grid:
        raise UsageError("rank grid is empty")
    n, c, v = shape
    if grid[0] < 1:
        raise UsageError(f"ranks must be >= 1; the rank grid has {grid[0]}")
    if grid[-1] > c:
        raise UsageError(
            f"R2 up to {grid[-1]} needs at least that many channels; the activations have {c}"
        )
    if grid[-1] > min(n, v):
        raise UsageError(
            f"R1 up to {grid[-1]} needs at least that many training subjects and voxels; "
            f"the training tensor has {n} subjects and {v} voxels"
        )
    return grid


def _fit_cell(A_train, A_val, R1, R2, init, settings, y_train=None, y_val=None):
    """Fit one cell; runs in a worker. Returns the table row and the result."""
    from ..decomposition import fit_constrained_tucker

    t0 = time.perf_counter()
    res = fit_constrained_tucker(A_train, rank=(R1, R2), init=init, **settings)
    U1_val = res.transform(A_val)
    val_error = relative_error(A_val, res, U1_val)
    val_mae = float("nan")
    if y_train is not None:
        model = fit_linear_model(res.factors[0], res, y_train)
        val_mae = regression_metrics(y_val, predict(model, U1_val, res))["mae"]
    seconds = time.perf_counter() - t0
    row = {
        "R1": R1,
        "R2": R2,
        "train_error": float(res.rel_error),
        "val_error": val_error,
        "val_mae": val_mae,
        "n_iter": int(res.n_iter),
        "seconds": seconds,
        "shared_optimum": R2 >= R1,
        "fitted": True,
    }
    return row, res


def _check_targets(y_train, y_val, n_train: int, n_val: int):
    """Both targets or neither, as float arrays with one row per subject."""
    if (y_train is None) != (y_val is None):
        raise ValueError("give both y_train and y_val, or neither")
    if y_train is None:
        return None, None
    out = []
    for name, y, n in (("y_train", y_train, n_train), ("y_val", y_val, n_val)):
        y = _as_2d(y, name)  # shape and finiteness, as the linear model checks them
        if y.shape[0] != n:
            raise ValueError(f"{name} must have one row per subject ({n}); got shape {y.shape}")
        out.append(y)
    return out[0], out[1]


def _cache_file(cache_dir: Path, R1: int, R2: int) -> Path:
    return cache_dir / f"cell_R1-{R1:02d}_R2-{R2:02d}.npz"


def _save_cache(cache_dir: Path | None, R1: int, R2: int, res) -> None:
    """Keep a finished cell's factors so that a resumed sweep can warm-start from them."""
    if cache_dir is None:
        return
    from .scree import as_numpy

    with atomic_path(_cache_file(cache_dir, R1, R2)) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            core=as_numpy(res.core),
            U1=as_numpy(res.factors[0]),
            U2=as_numpy(res.factors[1]),
            U3=as_numpy(res.factors[2]),
            faces=as_numpy(res.faces),
            rel_error=float(res.rel_error),
            n_iter=int(res.n_iter),
            constraints=str(res.constraints),
        )


def _load_cache(cache_dir: Path | None, R1: int, R2: int):
    """A cached cell as a decomposition result (usable as ``init``), or None."""
    if cache_dir is None:
        return None
    path = _cache_file(cache_dir, R1, R2)
    if not path.exists():
        return None
    from ..decomposition import ConstrainedTuckerResult

    try:
        with np.load(path, allow_pickle=False) as z:
            return ConstrainedTuckerResult(
                z["core"], [z["U1"], z["U2"], z["U3"]], z["faces"], float(z["rel_error"]),
                [], int(z["n_iter"]), 0, True, (R1, R2), str(z["constraints"]), 0.0,
            )
    except (OSError, KeyError, ValueError) as exc:
        LOG.warning("ignoring unreadable cache %s (%s)", path, exc)
        return None


def _read_finished(out_tsv: Path, fingerprint: str, grid: list[int]) -> dict:
    """Rows already in ``out_tsv`` for this data and grid, keyed by (R1, R2)."""
    if not out_tsv.exists():
        return {}
    sidecar = Path(str(out_tsv)[: -len(".tsv")] + ".json")
    stamp = None
    if sidecar.exists():
        import json

        try:
            stamp = json.loads(sidecar.read_text()).get("DataFingerprint")
        except (OSError, ValueError):
            stamp = None
    if stamp != fingerprint:
        LOG.warning("%s was computed on other data or settings; recomputing the rank sweep", out_tsv)
        return {}
    try:
        table = read_tsv(out_tsv)
    except (OSError, ValueError, pd.errors.ParserError):
        LOG.warning("%s is unreadable; recomputing the rank sweep", out_tsv)
        return {}
    if list(table.columns) != SWEEP_COLUMNS:
        LOG.warning("%s has other columns than expected; recomputing the rank sweep", out_tsv)
        return {}
    done = {}
    for rec in table.to_dict("records"):
        if bool(rec["fitted"]) and rec["R1"] in grid and rec["R2"] in grid:
            rec["shared_optimum"] = bool(rec["shared_optimum"])
            rec["fitted"] = True
            done[(int(rec["R1"]), int(rec["R2"]))] = rec
    return done


def _table(rows: dict, grid: list[int]) -> pd.DataFrame:
    """All rows: fitted cells and, for R2 > R1, copies of the cell (R1, R1)."""
    out = []
    for R1 in grid:
        for R2 in grid:
            if R2 > R1:
                src = rows.get((R1, R1))
                if src is None:
                    continue
                out.append({**src, "R2": R2, "seconds": 0.0, "shared_optimum": True, "fitted": False})
            elif (R1, R2) in rows:
                out.append(rows[(R1, R2)])
    table = pd.DataFrame(out, columns=SWEEP_COLUMNS)
    return table.astype({"R1": int, "R2": int, "n_iter": int}).reset_index(drop=True)


def _write(out_tsv: Path, rows: dict, grid: list[int], fingerprint: str) -> pd.DataFrame:
    table = _table(rows, grid)
    write_tsv(out_tsv, table, sidecar={**SWEEP_SIDECAR, "DataFingerprint": fingerprint})
    return table


def _require_dask(dask_scheduler):
    """``dask.distributed.Client``, or a usage error saying what to install."""
    try:
        from dask.distributed import Client
    except ImportError as exc:
        raise UsageError(
            f"--dask-scheduler {dask_scheduler} needs the optional packages dask and "
            "distributed (pip install 'dask[distributed]'), which are not installed"
        ) from exc
    return Client


def _parallel_backend(dask_scheduler):
    """A context manager selecting joblib's backend (Dask when a scheduler is given)."""
    import contextlib

    if dask_scheduler is None:
        return contextlib.nullcontext()
    Client = _require_dask(dask_scheduler)
    import joblib

    stack = contextlib.ExitStack()
    client = stack.enter_context(Client(dask_scheduler))
    stack.enter_context(joblib.parallel_config(backend="dask", wait_for_workers_timeout=60))
    LOG.info("rank sweep on the Dask cluster at %s (%s)", dask_scheduler, client)
    return stack


def _parallel(n_jobs):
    """A joblib ``Parallel`` that yields results as they finish, where the backend can.

    Results one by one let each finished cell reach the TSV at once; a backend without
    that ability (``multiprocessing``) returns a whole wave at a time instead.
    """
    from joblib import Parallel

    try:
        return Parallel(n_jobs=n_jobs, return_as="generator_unordered")
    except ValueError:
        return Parallel(n_jobs=n_jobs, return_as="list")


def sweep_chains(grid) -> dict:
    """The sweep's warm-start chains: ``{R1: [R2, ...]}``, each row of the grid walked down
    from R2 = R1 (R2 <= R1), every fit starting from the one before it in its chain.

    :func:`run_rank_sweep` fits them in waves: wave ``k`` is the ``k``-th cell of every
    chain, so a wave lasts as long as its slowest cell (usually the largest R1).
    """
    return {R1: [R2 for R2 in reversed(grid) if R2 <= R1] for R1 in grid}


def run_rank_sweep(
    A_train,
    A_val,
    rank_grid=range(2, 21),
    out_tsv=None,
    n_jobs: int | None = 1,
    dask_scheduler: str | None = None,
    random_state=0,
    quiet: bool = False,
    *,
    constraints: str = "nonneg",
    n_iter_max: int = 100,
    tol: float = 1e-4,
    cache_dir=None,
    y_train=None,
    y_val=None,
) -> pd.DataFrame:
    """Train and validation relative error of the decomposition over a rank grid.

    Parameters
    ----------
    A_train, A_val : array-like, shape (n, c, v) and (m, c, v)
        Activations of the training and validation subjects.
    rank_grid : iterable of int
        Values tried for both R1 and R2 (paper: 2..20).
    out_tsv : path-like, optional
        ``rank_sweep.tsv``; rows are appended as cells finish and read back on a re-run
        (only when computed on the same data and settings, checked by a content hash and
        the settings in the sidecar's ``DataFingerprint``).
    n_jobs : int or None
        Parallel workers (joblib; ``-1`` all cores). With ``dask_scheduler`` the Dask
        cluster's workers are used instead.
    dask_scheduler : str, optional
        Address of a Dask scheduler (``tcp://host:8786``); needs ``dask.distributed``.
    random_state : int
        Seed passed to every fit.
    quiet : bool
        Silence the progress bar.
    constraints, n_iter_max, tol
        Passed to :func:`brainage_xai.decomposition.fit_constrained_tucker`.
    cache_dir : path-like, optional
        Where the factors of finished cells are kept (a work folder), so that a resumed
        sweep warm-starts from them; without it, a resumed chain restarts cold.
    y_train, y_val : array-like, shape (n,) or (n, t), optional
        Targets of the training and validation subjects. With them every cell also gets
        ``val_mae``, the validation MAE of the linear model on its voxel-averaged
        reconstruction, which :func:`choose_ranks` uses to choose among R2 candidates.

    Returns
    -------
    pandas.DataFrame
        Columns ``R1, R2, train_error, val_error, val_mae, n_iter, seconds, shared_optimum,
        fitted``, one row per grid cell. ``table.attrs`` holds ``n_fitted`` (cells fitted
        in this call) and ``n_resumed`` (cells read back from ``out_tsv``).
    """
    from joblib import delayed
    from tqdm.auto import tqdm

    if dask_scheduler is not None:
        _require_dask(dask_scheduler)  # before any work
    A_train = _check_tensor(A_train, "A_train")
    A_val = _check_tensor(A_val, "A_val")
    if A_val.shape[1:] != A_train.shape[1:]:
        raise ValueError(
            f"A_val must have the channels and voxels of A_train {A_train.shape[1:]}; "
            f"got {A_val.shape[1:]}"
        )
    grid = _check_grid(rank_grid, A_train.shape)
    y_train, y_val = _check_targets(y_train, y_val, len(A_train), len(A_val))
    out_tsv = Path(out_tsv) if out_tsv is not None else None
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    # The settings are part of the stamp: a table fitted otherwise is not resumed.
    targets = "none" if y_train is None else tensor_fingerprint(y_train, y_val)
    fingerprint = (
        f"{tensor_fingerprint(A_train, A_val)}-{constraints}-tol{tol:g}-it{n_iter_max}"
        f"-seed{random_state}-y{targets}"
    )
    rows = _read_finished(out_tsv, fingerprint, grid) if out_tsv is not None else {}
    n_resumed = len(rows)

    chains = sweep_chains(grid)
    todo = sum(1 for R1, ch in chains.items() for R2 in ch if (R1, R2) not in rows)
    settings = {
        "constraints": constraints,
        "l1": 0.0,
        "n_iter_max": n_iter_max,
        "tol": tol,
        "random_state": random_state,
    }
    results: dict = {}
    n_fitted = 0
    if n_jobs is None:
        n_jobs = 1
    if dask_scheduler is not None:
        n_jobs = -1
    depth = max(len(ch) for ch in chains.values())
    with _parallel_backend(dask_scheduler), tqdm(
        total=todo, desc="rank sweep", unit="fit", disable=quiet or todo == 0
    ) as bar, _parallel(n_jobs) as parallel:
        for wave in range(depth):
            tasks = []
            for R1, chain in chains.items():
                if wave >= len(chain) or (R1, chain[wave]) in rows:
                    continue
                R2 = chain[wave]
                init = "svd"
                if wave > 0:
                    above = chain[wave - 1]
                    init = results.get((R1, above))
                    if init is None:
                        init = _load_cache(cache_dir, R1, above)
                    if init is None:
                        init = "svd"
                tasks.append(
                    delayed(_fit_cell)(A_train, A_val, R1, R2, init, settings, y_train, y_val)
                )
            if not tasks:
                continue
            for row, res in parallel(tasks):
                key = (row["R1"], row["R2"])
                rows[key] = row
                results[key] = res
                _save_cache(cache_dir, *key, res)
                n_fitted += 1
                if out_tsv is not None:
                    _write(out_tsv, rows, grid, fingerprint)
                bar.update(1)
    table = _table(rows, grid)
    if out_tsv is not None and (n_fitted or not out_tsv.exists()):
        table = _write(out_tsv, rows, grid, fingerprint)
    table.attrs.update(n_fitted=n_fitted, n_resumed=n_resumed)
    LOG.info("rank sweep: %d cells fitted, %d resumed", n_fitted, n_resumed)
    return table


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
