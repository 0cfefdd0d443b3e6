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


#: The largest rank of the default grid.
MAX_RANK = 20


def default_rank_grid(shape) -> list[int]:
    """The rank sweep's grid unless given: 2 to :data:`MAX_RANK`, capped by the tensor.

    ``shape`` is the training tensor's ``(n, c, v)``: R1 cannot exceed the subjects or
    voxels, nor R2 the channels.
    """
    n, c, v = shape
    return list(range(2, min(MAX_RANK, n, c, v) + 1))


def check_ranks(shape, r1_max: int, r2_max: int, *, tensor: str = "the activations") -> None:
    """The one rule for ranks a tensor ``(n, c, v)`` can hold: R2 <= c, R1 <= min(n, v).

    Used on the training tensor by the sweep and, before any training, on the shape the
    network will give (``tensor`` says which, for the message).
    """
    n, c, v = shape
    if min(r1_max, r2_max) < 1:
        raise UsageError(f"ranks must be >= 1; {min(r1_max, r2_max)} was provided")
    if r2_max > c:
        raise UsageError(f"R2 up to {r2_max} needs at least that many channels; {tensor} has {c}")
    if r1_max > min(n, v):
        raise UsageError(
            f"R1 up to {r1_max} needs at least that many training subjects and voxels; "
            f"{tensor} has {n} subjects and {v} voxels"
        )


def _check_grid(rank_grid, shape) -> list[int]:
    try:
        grid = sorted({int(r) for r in rank_grid})
    except (TypeError, ValueError) as exc:
        raise UsageError(f"rank grid must be integers; got {rank_grid!r}") from exc
    if not grid:
        raise UsageError("rank grid is empty")
    if grid[0] < 1:
        raise UsageError(f"ranks must be >= 1; the rank grid has {grid[0]}")
    check_ranks(shape, grid[-1], grid[-1], tensor="the training tensor")
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
    rank_grid=None,
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
        Values tried for both R1 and R2; default :func:`default_rank_grid` (the
        paper's 2..20, capped by the tensor).
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
    grid = _check_grid(default_rank_grid(A_train.shape) if rank_grid is None else rank_grid, A_train.shape)
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


