"""The selection from activations to the final decomposition, with its tables.

:func:`run_selection` is what the selection stage calls: scree, rank sweep and choice (or
given ranks), λ sweep and choice (or a given λ), the final fit and its metrics, every
table and JSON written atomically to the paths of a :class:`SelectionFiles` (the caller
names them; the stage draws the figures from what this returns).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bids.derivatives import roi_names
from ..utils.io import atomic_path, write_json, write_tsv
from ._decomp import diagonal_faces
from .lambda_sweep import choose_lambda, run_lambda_sweep
from .linear_model import FinalModel, fit_final, loadings_table, roi_contributions
from .rank_choice import choose_ranks
from .rank_sweep import default_rank_grid, run_rank_sweep
from .scree import as_numpy, compute_scree
from .splits import Splits

__all__ = ["SelectionFiles", "run_selection", "write_final"]


@dataclass(frozen=True)
class SelectionFiles:
    """Where :func:`run_selection` writes (``rank_sweep_cache``: warm starts on resume)."""

    scree: Path
    rank_sweep: Path
    lambda_sweep: Path
    selection: Path
    decomposition: Path
    decomposition_json: Path
    loadings: Path
    rank_sweep_cache: Path | None = None

LOG = logging.getLogger("brainage_xai.selection")

SCREE_SIDECAR = {
    "mode": {"Description": "Unfolding: 1 subjects, 2 channels, 3 voxels."},
    "index": {"Description": "Rank of the singular value (1 = largest)."},
    "singular_value": {"Description": "Singular value of the unfolding of the training activations."},
    "explained": {"Description": "Share of the squared Frobenius norm of the tensor."},
    "cumulative_explained": {"Description": "Cumulative share up to this index."},
}


def write_final(final: FinalModel, files: SelectionFiles, participant_ids: dict | None = None,
                target_names=None, about: dict | None = None) -> None:
    """``decomposition.npz`` + JSON (with the metrics) and ``loadings.tsv`` + JSON.

    The metrics go into ``decomposition.json``, in the units of the targets given (the
    group level passes standardised targets and writes ``metrics.json`` in years itself);
    ``about`` (what was decomposed: layer, tensor, grid) goes there too.
    """
    res = final.result
    U1, U2, U3 = (as_numpy(f) for f in res.factors)
    core = as_numpy(res.core)
    with atomic_path(files.decomposition) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(
            fh, core=core, U1=U1, U2=U2, U3=U3, D=diagonal_faces(core),
            U1_val=final.loadings["val"], U1_test=final.loadings["test"],
            roi_coefficients=final.roi_coefficients,
        )
    names = list(target_names) if target_names is not None else None
    write_json(
        files.decomposition_json,
        {
            **(about or {}),
            "Description": "Constrained non-negative Tucker decomposition of the training "
            "activations, A ~ G x1 U1 x2 U2 x3 U3 with diagonal faces G[r, j, r] = D[r, j].",
            "rank": list(final.rank),
            "l1": final.l1,
            "n_iter": int(res.n_iter),
            "relative_error": final.errors,
            "arrays": {
                "core": f"G, shape {list(core.shape)}",
                "U1": f"training loadings, shape {list(U1.shape)}",
                "U2": f"channel factor, shape {list(U2.shape)}",
                "U3": f"spatial factor (one RoI per column), shape {list(U3.shape)}",
                "D": "diagonal faces of G, shape [R1, R2]",
                "U1_val": "validation loadings (refitted, G, U2, U3 fixed)",
                "U1_test": "test loadings (refitted, G, U2, U3 fixed)",
                "roi_coefficients": "linear-model coefficient per RoI and target, shape [R1, targets]",
            },
            "targets": names,
            "roi_coefficients": final.roi_coefficients.tolist(),
            "roi_mean_contribution_train": roi_contributions(
                final.loadings["train"], final.roi_coefficients
            ).mean(axis=0).tolist(),
            "linear_model_intercept": np.atleast_1d(final.linear_model.intercept_).tolist(),
            "metrics": {
                "Description": "MAE and MSE (averaged over targets, in the units of the "
                "targets given) of: the network; the linear model on the voxel-averaged "
                "reconstruction; the network's head applied to the voxel-averaged "
                "reconstruction; the training-mean predictor.",
                **final.metrics,
            },
        },
    )
    table = loadings_table(final, participant_ids, target_names)
    sidecar = {
        "participant_id": {"Description": "Participant (or row) identifier."},
        "split": {"Description": "Data split: train, val or test."},
    }
    for r, name in enumerate(roi_names(final.rank[0])):
        sidecar[name] = {
            "Description": f"Loading of {name} (column {r + 1} of U1; refitted for val/test)."
        }
    for col in table.columns:
        if col.startswith("predicted_"):
            sidecar[col] = {"Description": "Prediction of the linear model on the decomposition."}
    write_tsv(files.loadings, table, sidecar=sidecar)


#: GPU memory kept free beside the three split tensors when they go to the GPU: the
#: solver allocates little besides its input (docs/decomposition.md), the transforms of
#: held-out subjects and the cached warm starts are (subjects or voxels) x rank.
_DEVICE_HEADROOM = (0.25, 512 * 2**20)  # share of the tensors' size, plus bytes


def _to_device(arrays, device, dask_scheduler=None):
    """The split tensors as torch tensors on ``device``, or as numpy arrays on the host.

    Returns ``(arrays, on_device)``. They stay on the host when ``device`` is None, when
    a Dask cluster runs the sweeps, or when a GPU has too little free memory for them
    (with a warning: the selection then runs as it would on the CPU).
    """
    host = [as_numpy(a) for a in arrays]
    if device is None:
        return host, False
    import torch

    device = torch.device(device)
    if dask_scheduler is not None:
        LOG.info("selection: the sweeps run on the Dask cluster, not on %s", device)
        return host, False
    size = sum(a.nbytes for a in host)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        share, extra = _DEVICE_HEADROOM
        if size * (1 + share) + extra > free:
            LOG.warning(
                "selection: the tensors (%.1f GB) do not fit in the free memory of %s "
                "(%.1f GB); the sweeps run on the CPU", size / 1e9, device, free / 1e9,
            )
            return host, False
    moved = [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in host]
    LOG.info(
        "selection: sweeps and final fit on %s, one fit at a time (%.1f GB of tensors there)",
        device, size / 1e9,
    )
    return moved, True


def run_selection(
    A: Splits,
    y: Splits,
    files: SelectionFiles,
    *,
    ranks=None,
    l1=None,
    rank_grid=None,
    lambda_grid=None,
    head=None,
    network_pred=None,
    participant_ids: dict | None = None,
    target_names=None,
    n_jobs: int | None = 1,
    dask_scheduler: str | None = None,
    random_state=0,
    quiet: bool = False,
    constraints: str = "nonneg",
    device=None,
    about: dict | None = None,
    rank_rule: str = "prediction",
) -> dict:
    """Run the whole selection stage and write its outputs into ``group_dir``.

    Parameters
    ----------
    A : Splits of array-like, shape (n_split, c, v)
        Activations per split.
    y : Splits of array-like
        Targets per split, (n_split,) or (n_split, t).
    files : SelectionFiles
        Where the tables go.
    ranks : (int, int), optional
        ``--ranks R1 R2``: skip the rank sweep (the scree is still computed).
    l1 : float, optional
        ``--lambda L``: skip the λ sweep.
    rank_grid, lambda_grid : list, optional
        Grids of the sweeps; default :func:`~brainage_xai.selection.default_rank_grid`
        and :func:`~brainage_xai.selection.default_lambda_grid`.
    head, network_pred
        See :func:`~brainage_xai.selection.fit_final`.
    participant_ids : dict, optional
        ``{"train": [...], "val": [...], "test": [...]}`` for ``loadings.tsv``.
    target_names : list of str, optional
    n_jobs, dask_scheduler, random_state, quiet, constraints
        As in :func:`~brainage_xai.selection.run_rank_sweep`.
    device : str or torch.device, optional
        Where the sweeps and the final fit run. None (default): on the host, numpy, with
        ``n_jobs`` workers. A torch device (``"cuda"``): the three tensors are moved there
        and the fits run one at a time on it; the scree is computed on the host first.
        They stay on the host if the GPU lacks the memory, or with ``dask_scheduler``.
    about : dict, optional
        What was decomposed (layer, tensor, grid), recorded in ``decomposition.json``.
    rank_rule : {"prediction", "paper"}
        ``prediction``: :func:`~brainage_xai.selection.choose_ranks` with the linear model's
        validation MAE (R1 raised until the RoIs predict the target, R2 by prediction);
        ``paper``: the knee and scree rules on the reconstruction error alone, as the
        paper chose its ranks.

    Returns
    -------
    dict
        ``scree``, ``rank_sweep`` (None when given), ``ranks`` (the choice),
        ``lambda_sweep`` (None when given), ``lambda`` (the choice) and ``final``.
    """
    A_train = as_numpy(A.train)
    n, c, v = A_train.shape
    scree = compute_scree(A_train, max_rank=20, random_state=random_state)
    moved, on_device = _to_device((A_train, A.val, A.test), device, dask_scheduler)
    A = Splits(*moved)
    if on_device:
        n_jobs = 1  # workers would each need the tensors; the GPU runs one fit at a time

    sweep = None
    if ranks is not None:
        choice = {"R1": int(ranks[0]), "R2": int(ranks[1]), "rule": "given (--ranks)", "numbers": {}}
    else:
        sweep = run_rank_sweep(
            A.train, A.val, rank_grid if rank_grid is not None else default_rank_grid((n, c, v)),
            out_tsv=files.rank_sweep, n_jobs=n_jobs, dask_scheduler=dask_scheduler,
            random_state=random_state, quiet=quiet, constraints=constraints,
            cache_dir=files.rank_sweep_cache, y_train=y.train, y_val=y.val,
        )
        if rank_rule == "paper":
            choice = choose_ranks(sweep.drop(columns=["val_mae"], errors="ignore"), scree)
        else:
            choice = choose_ranks(sweep, scree)
    write_tsv(files.scree, scree, sidecar=SCREE_SIDECAR)
    rank = (choice["R1"], choice["R2"])

    lam_table = None
    if l1 is not None:
        lam_choice = {"lambda": float(l1), "rule": "given (--lambda)", "numbers": {}}
    else:
        lam_table = run_lambda_sweep(
            A.train, A.val, y.train, y.val, rank, lambda_grid, out_tsv=files.lambda_sweep,
            n_jobs=n_jobs, dask_scheduler=dask_scheduler, random_state=random_state,
            quiet=quiet, constraints=constraints,
        )
        lam_choice = choose_lambda(lam_table)
    write_json(files.selection, {"ranks": choice, "lambda": lam_choice})

    final = fit_final(
        A, y, rank, lam_choice["lambda"], head,
        network_pred=network_pred, constraints=constraints, random_state=random_state,
    )
    write_final(final, files, participant_ids, target_names, about)
    return {
        "scree": scree,
        "rank_sweep": sweep,
        "ranks": choice,
        "lambda_sweep": lam_table,
        "lambda": lam_choice,
        "final": final,
    }
