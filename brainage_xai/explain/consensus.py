"""Consensus RoIs: the components that come back across networks and resamples.

An RoI found by one trained network may be a property of that network (its seed, the
machine it trained on) rather than of the data. :func:`consensus_decomposition`
decomposes the same layer of ``K`` networks, each on ``B`` resamples of the training
subjects (the full set, then bootstrap resamples), at the same ranks, and clusters the
spatial components of all ``K·B`` fits (as consensus NMF and ICASSO do, Brunet et al.
2004, Himberg et al. 2004): average-linkage clustering on the spatial correlation,
refined by matching each fit's components one-to-one (Hungarian) to the cluster centres.
Each consensus RoI is the centre of its matched components and carries

- its **stability**: the share of the ``K·B`` fits that contain it (matched one-to-one
  with a spatial correlation of at least :data:`MATCH_THRESHOLD`);
- its **spread**: the median correlation of the matched components with the centre;
- the networks whose fits contain it.

The subjects' loadings on the consensus RoIs are fitted with the consensus spatial factor
fixed, on all networks' tensors at once (:func:`brainage_xai.decomposition.fixed.fit_fixed_spatial`:
one loading per subject and RoI, a channel profile per network), so that the linear model,
the loadings-against-age fits and the subject pages work as for one network.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..bids.derivatives import roi_names
from ..decomposition import fit_constrained_tucker
from ..decomposition.fixed import FixedSpatialFit, fit_fixed_spatial, project
from ..selection.splits import Splits

LOGGER = logging.getLogger("brainage_xai.explain")

#: Two components are the same RoI when their spatial correlation (feature grid) is at
#: least this. Fixed before any held-out cohort was looked at; it is the match rule of
#: the ground-truth benchmark too.
MATCH_THRESHOLD = 0.5
#: A cluster becomes a consensus RoI when this many fits contain it; fewer is one fit's
#: own component (reported by the fits table, not as an RoI).
MIN_FITS = 2
#: An RoI is robust when at least this share of the fits contain it.
ROBUST_STABILITY = 0.7


@dataclass
class Fit:
    """One decomposition of the consensus: network ``network`` on resample ``resample``."""

    network: int
    resample: int
    U3: np.ndarray  # (v, R1)


@dataclass
class Consensus:
    """The consensus RoIs of a set of fits (:func:`match_components`).

    Attributes
    ----------
    U3 : ndarray, shape (v, Q)
        One column per consensus RoI (unit norm), ordered by stability.
    stability, spread : ndarray, shape (Q,)
    networks : list of list of int
        Per RoI, the networks with at least one fit that contains it.
    matches : DataFrame
        One row per fit component: ``network``, ``resample``, ``component`` (1-based),
        ``roi`` (name, or ``n/a`` when matched to none) and ``correlation`` with the RoI.
    n_fits, n_networks : int
    """

    U3: np.ndarray
    stability: np.ndarray
    spread: np.ndarray
    networks: list
    matches: pd.DataFrame
    n_fits: int
    n_networks: int

    @property
    def names(self) -> list[str]:
        return roi_names(self.U3.shape[1])

    def table(self) -> pd.DataFrame:
        """``name``, ``stability``, ``spread``, ``robust`` and ``networks_with_roi`` per RoI."""
        return pd.DataFrame({
            "name": self.names,
            "stability": np.round(self.stability, 4),
            "spread": np.round(self.spread, 4),
            "robust": self.stability >= ROBUST_STABILITY,
            "networks_with_roi": [len(n) for n in self.networks],
        })


def _correlation(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Pearson correlation of every column of ``X`` with every column of ``Y``."""
    Xc = X - X.mean(axis=0)
    Yc = Y - Y.mean(axis=0)
    nx = np.linalg.norm(Xc, axis=0)
    ny = np.linalg.norm(Yc, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        C = (Xc.T @ Yc) / np.outer(np.where(nx > 0, nx, np.inf), np.where(ny > 0, ny, np.inf))
    return np.nan_to_num(C)


def _unit(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=0)
    return X / np.where(norms > 0, norms, 1.0)


def _initial_centres(columns: np.ndarray, owner: np.ndarray, threshold: float, min_fits: int):
    """Average-linkage clusters of all components, cut at correlation ``threshold``."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    if columns.shape[1] < 2:
        return columns[:, :0]
    dist = np.clip(1.0 - _correlation(columns, columns), 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    labels = fcluster(linkage(squareform(dist, checks=False), method="average"),
                      t=1.0 - threshold, criterion="distance")
    centres = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(set(owner[members])) >= min_fits:
            centres.append(_unit(columns[:, members]).mean(axis=1))
    return np.column_stack(centres) if centres else columns[:, :0]


def match_components(fits: list[Fit], *, threshold: float = MATCH_THRESHOLD,
                     min_fits: int = MIN_FITS, rounds: int = 3) -> Consensus:
    """Cluster the spatial components of ``fits`` into consensus RoIs.

    Parameters
    ----------
    fits : list of Fit
        The ``K·B`` decompositions (their ``U3``, ``v × R1`` each, on one feature grid).
    threshold : float
        Spatial correlation from which two components are the same RoI.
    min_fits : int
        Fits that must contain a cluster for it to be an RoI.
    rounds : int
        Refinements: each fit's components matched one-to-one to the centres
        (Hungarian, on the correlation), the centres recomputed from the matches.

    Returns
    -------
    Consensus
    """
    from scipy.optimize import linear_sum_assignment

    if not fits:
        raise ValueError("the consensus needs at least one fit")
    columns = np.concatenate([np.asarray(f.U3, dtype=np.float64) for f in fits], axis=1)
    owner = np.concatenate([[i] * f.U3.shape[1] for i, f in enumerate(fits)])
    centres = _initial_centres(columns, owner, threshold, min_fits)
    assignment = {}
    for _ in range(max(1, rounds)):
        if centres.shape[1] == 0:
            break
        assignment = {}
        for i, f in enumerate(fits):
            C = _correlation(np.asarray(f.U3, dtype=np.float64), centres)
            rows, cols = linear_sum_assignment(-C)
            for r, q in zip(rows, cols):
                if C[r, q] >= threshold:
                    assignment[(i, r)] = (q, float(C[r, q]))
        keep, new = [], []
        for q in range(centres.shape[1]):
            members = [(i, r) for (i, r), (qq, _) in assignment.items() if qq == q]
            if len({i for i, _ in members}) >= min_fits:
                keep.append(q)
                new.append(_unit(np.column_stack([fits[i].U3[:, r] for i, r in members])).mean(axis=1))
        centres = np.column_stack(new) if new else centres[:, :0]
        remap = {q: k for k, q in enumerate(keep)}
        assignment = {key: (remap[q], c) for key, (q, c) in assignment.items() if q in remap}
    Q = centres.shape[1]
    n_fits = len(fits)
    stability, spread, networks = np.zeros(Q), np.zeros(Q), []
    for q in range(Q):
        members = [(i, c) for (i, _), (qq, c) in assignment.items() if qq == q]
        stability[q] = len({i for i, _ in members}) / n_fits
        spread[q] = float(np.median([c for _, c in members])) if members else 0.0
        networks.append(sorted({fits[i].network for i, _ in members}))
    order = sorted(range(Q), key=lambda q: (-stability[q], -spread[q]))
    rank_of = {q: k for k, q in enumerate(order)}
    names = roi_names(Q)
    rows = []
    for i, f in enumerate(fits):
        for r in range(f.U3.shape[1]):
            q, c = assignment.get((i, r), (None, np.nan))
            rows.append({"network": f.network, "resample": f.resample, "component": r + 1,
                         "roi": "n/a" if q is None else names[rank_of[q]],
                         "correlation": round(c, 4) if q is not None else np.nan})
    U3 = _unit(np.clip(centres[:, order], 0.0, None)) if Q else centres
    return Consensus(U3=U3, stability=stability[order], spread=spread[order],
                     networks=[networks[q] for q in order], matches=pd.DataFrame(rows),
                     n_fits=n_fits, n_networks=len({f.network for f in fits}))


def resamples(n_train: int, n_resamples: int, seed: int) -> list[np.ndarray]:
    """Row indices of each resample of the training subjects: all of them first, then
    bootstrap resamples (drawn with replacement, seeded)."""
    rng = np.random.default_rng(seed)
    out = [np.arange(n_train)]
    for _ in range(max(0, n_resamples - 1)):
        out.append(np.sort(rng.integers(0, n_train, n_train)))
    return out


@dataclass
class ConsensusResult:
    """What :func:`consensus_decomposition` returns."""

    consensus: Consensus
    loadings: Splits  # of (n_split, Q)
    fixed: FixedSpatialFit
    channels: list  # per network, the rows of ``fixed.W`` that are its channel profiles
    errors: dict = field(default_factory=dict)
    own: dict = field(default_factory=dict)  # network -> its full-data fit's U3
    own_loadings: dict = field(default_factory=dict)  # network -> Splits of that fit's U1


def consensus_decomposition(tensors: Callable[[int], Splits], n_networks: int, rank, *,
                            l1: float = 0.0, n_resamples: int = 4, constraints: str = "nonneg",
                            random_state: int = 0, threshold: float = MATCH_THRESHOLD,
                            min_fits: int = MIN_FITS, progress: Callable | None = None,
                            n_iter_max: int = 300, tol: float = 1e-6) -> ConsensusResult:
    """Decompose ``n_networks`` networks' tensors on resamples and form the consensus.

    Parameters
    ----------
    tensors : callable
        ``tensors(k)`` returns network ``k``'s tensors per split (``Splits`` of
        ``(n_split, c_k, v)`` arrays, the same subjects and voxels for every network).
        Called twice per network (the fits, then the loadings), so that one network's
        tensors are in memory at a time.
    n_networks : int
    rank : (int, int)
        ``(R1, R2)`` of every fit.
    l1 : float
        Sparsity penalty on each fit's spatial factor.
    n_resamples : int
        Fits per network: the full training set, then bootstrap resamples of it.
    constraints : str
        As :func:`~brainage_xai.decomposition.fit_constrained_tucker`.
    random_state : int
        Seed of the resamples and of each fit.
    threshold, min_fits
        As :func:`match_components`.
    progress : callable, optional
        Called with a message after each fit.

    Returns
    -------
    ConsensusResult
    """
    rank = (int(rank[0]), int(rank[1]))
    fits, own, own_loadings = [], {}, {}
    for k in range(n_networks):
        A = tensors(k)
        n_train = A.train.shape[0]
        for b, idx in enumerate(resamples(n_train, n_resamples, random_state + 1000 * k)):
            res = fit_constrained_tucker(np.ascontiguousarray(A.train[idx]), rank, constraints=constraints,
                                         l1=float(l1), n_iter_max=n_iter_max, tol=tol,
                                         random_state=random_state)
            U3 = np.asarray(res.factors[2], dtype=np.float64)
            fits.append(Fit(k, b, U3))
            if b == 0:
                own[k] = U3
                own_loadings[k] = Splits(np.asarray(res.factors[0], dtype=np.float64),
                                         np.asarray(res.transform(A.val), dtype=np.float64),
                                         np.asarray(res.transform(A.test), dtype=np.float64))
            if progress is not None:
                progress(f"network {k + 1}/{n_networks}, resample {b + 1}/{n_resamples}")
        del A
    consensus = match_components(fits, threshold=threshold, min_fits=min_fits)
    if consensus.U3.shape[1] == 0:
        raise ValueError("no component came back in two fits or more: there is no consensus "
                         "at these ranks")
    projections, norms2, channels, start = {s: [] for s in ("train", "val", "test")}, {}, [], 0
    for k in range(n_networks):
        A = tensors(k)
        for split, a in A.items():
            projections[split].append(project(a, consensus.U3))
            norms2[split] = norms2.get(split, 0.0) + float(np.sum(np.asarray(a, dtype=np.float64) ** 2))
        c = A.train.shape[1]
        channels.append(list(range(start, start + c)))
        start += c
        del A
    fixed = fit_fixed_spatial(projections["train"], consensus.U3, norms2=norms2["train"],
                              random_state=random_state)
    loadings = Splits(fixed.U1, fixed.transform(projections["val"]), fixed.transform(projections["test"]))
    errors = {"train": fixed.rel_error}
    for split in ("val", "test"):
        Y = np.concatenate(projections[split], axis=1)
        U1 = loadings[split]
        inner = float(np.einsum("iq,cq,icq->", U1, fixed.W, Y))
        model = float(np.sum((U1.T @ U1) * (fixed.W.T @ fixed.W) * fixed.gram))
        errors[split] = float(np.sqrt(max(norms2[split] - 2 * inner + model, 0.0) / norms2[split]))
    return ConsensusResult(consensus=consensus, loadings=loadings, fixed=fixed, channels=channels,
                           errors=errors, own=own, own_loadings=own_loadings)


def linear_model(loadings: Splits, y: Splits):
    """A linear model of the target on the consensus loadings, and its predictions per split.

    The voxel average of the reconstruction is ``U1 diag(mean U3) Wᵀ``, a linear map of
    the loadings, so the paper's linear model on the reconstruction is a linear model on
    the loadings (``W`` has full column rank): fitted here directly on them.
    """
    from sklearn.linear_model import LinearRegression

    model = LinearRegression().fit(loadings.train, np.asarray(y.train))
    return model, loadings.map(model.predict)
