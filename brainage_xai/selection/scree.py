"""Scree analysis: singular values of the three unfoldings of the activation tensor.

Paper section 3.5: a sudden drop in the singular values of an unfolding points to a
cut-off rank. Mode 1 (subjects) and mode 3 (voxels) bound R1, mode 2 (channels) bounds
R2.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["compute_scree", "scree_drop", "as_numpy"]

# When either side of an unfolding is at most this long, the exact Gram eigenproblem of
# that side is cheaper and more accurate than a randomised SVD; above it the Gram matrix
# (m x m, costing m^2 * N flops) becomes the bottleneck.
_EXACT_MAX_SIDE = 600


def as_numpy(A) -> np.ndarray:
    """Return ``A`` as a numpy array (torch tensors are moved to the host)."""
    if hasattr(A, "detach"):
        A = A.detach().cpu().numpy()
    return np.asarray(A)


def _check_tensor(A, name: str = "A"):
    """``A`` checked: 3-way and finite. A torch tensor stays a tensor, where it is (on a
    GPU for the selection on ``--device cuda``); anything else becomes a numpy array."""
    torch_tensor = hasattr(A, "detach")
    if not torch_tensor:
        A = np.asarray(A)
    if A.ndim != 3:
        raise ValueError(
            f"{name} must be a 3-way (subjects, channels, voxels) tensor; got shape {tuple(A.shape)}"
        )
    # One subject at a time: a mask of the whole tensor would be a quarter of its size.
    if not all(bool(A[i].isfinite().all()) if torch_tensor else np.isfinite(A[i]).all()
               for i in range(A.shape[0])):
        raise ValueError(f"{name} contains NaN or Inf values")
    return A


def _sum_of_squares(A) -> float:
    """``||A||^2`` in float64 without a float64 copy of ``A`` (the decomposition's own norm)."""
    from ..decomposition._backend import Backend

    return Backend(A).sq_norm(A)


def _gram(A: np.ndarray, mode: int) -> np.ndarray:
    """Gram matrix ``A_(mode) A_(mode)^T`` of an unfolding, in float64, without copying ``A``.

    Summing slice products keeps the temporaries at one slice instead of a transposed
    (and, for float32 input, up-cast) copy of the whole tensor.
    """
    size = A.shape[mode]
    G = np.zeros((size, size))
    if mode == 0:
        flat = A.reshape(size, -1)
        if flat.dtype == np.float64:
            return flat @ flat.T  # a view of A: no copy
        step = max(1, 2**22 // size)  # up-cast a few MB at a time
        for j in range(0, flat.shape[1], step):
            S = np.asarray(flat[:, j : j + step], dtype=np.float64)
            G += S @ S.T
        return G
    for i in range(A.shape[0]):
        S = np.asarray(A[i], dtype=np.float64)
        G += S @ S.T if mode == 1 else S.T @ S
    return G


def _singular_values(A: np.ndarray, mode: int, k: int, random_state) -> np.ndarray:
    size = A.shape[mode]
    other = A.size // size
    if size <= _EXACT_MAX_SIDE:
        evals = np.linalg.eigvalsh(_gram(A, mode))
    elif other <= _EXACT_MAX_SIDE:
        # The other side is short: its Gram matrix has the same non-zero eigenvalues,
        # and the unfolding is small enough (size x other) to form.
        unfolding = np.moveaxis(A, mode, 0).reshape(size, other).astype(np.float64)
        evals = np.linalg.eigvalsh(unfolding.T @ unfolding)
    else:
        from sklearn.utils.extmath import randomized_svd

        if mode == A.ndim - 1:
            # The transposed unfolding has the same singular values and is a view of a
            # C-ordered A; randomized_svd transposes it back (a view again), so the
            # tensor is not copied.
            unfolding = A.reshape(other, size)
        else:
            unfolding = np.moveaxis(A, mode, 0).reshape(size, other)
        _, s, _ = randomized_svd(unfolding, n_components=k, n_iter=7, random_state=random_state)
        return s
    return np.sqrt(np.clip(evals[::-1], 0.0, None))[:k]


def compute_scree(A_train, max_rank: int = 20, random_state=0) -> pd.DataFrame:
    """Singular values of the mode-1, mode-2 and mode-3 unfoldings of ``A_train``.

    Parameters
    ----------
    A_train : array-like, shape (n, c, v)
        Training activations (numpy array or torch tensor).
    max_rank : int
        Number of leading singular values kept per mode (fewer when a mode is shorter).
    random_state : int or None
        Seed of the randomised SVD, used for unfoldings with both sides longer than 600.

    Returns
    -------
    pandas.DataFrame
        One row per (mode, index): ``mode`` (1, 2, 3), ``index`` (1-based),
        ``singular_value``, ``explained`` (its share of ``||A||^2``) and
        ``cumulative_explained``.
    """
    A = _check_tensor(as_numpy(A_train), "A_train")  # on the host: small Gram matrices
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1; got {max_rank}")
    total = _sum_of_squares(A)
    rows = []
    for mode in range(3):
        k = min(max_rank, A.shape[mode])
        s = _singular_values(A, mode, k, random_state)
        explained = s**2 / total if total > 0 else np.zeros_like(s)
        for idx, (sv, ex, cum) in enumerate(zip(s, explained, np.cumsum(explained)), start=1):
            rows.append((mode + 1, idx, float(sv), float(ex), float(cum)))
    return pd.DataFrame(
        rows, columns=["mode", "index", "singular_value", "explained", "cumulative_explained"]
    )


def scree_drop(scree: pd.DataFrame, mode: int, candidates=None) -> int | None:
    """Rank after which the singular values of ``mode`` drop the most (log ratio).

    Parameters
    ----------
    scree : pandas.DataFrame
        The output of :func:`compute_scree`.
    mode : int
        1, 2 or 3.
    candidates : iterable of int, optional
        Ranks allowed as the answer (e.g. the rank grid); default every index that has
        a successor.

    Returns
    -------
    int or None
        The rank ``k`` maximising ``log s_k - log s_{k+1}``, or None when no candidate
        has a successor in the table.
    """
    s = scree.loc[scree["mode"] == mode].sort_values("index")["singular_value"].to_numpy()
    if s.size < 2:
        return None
    floor = np.finfo(float).tiny
    gaps = np.log(np.maximum(s[:-1], floor)) - np.log(np.maximum(s[1:], floor))
    ranks = np.arange(1, s.size)
    if candidates is not None:
        allowed = np.isin(ranks, np.asarray(list(candidates)))
        if not allowed.any():
            return None
        gaps = np.where(allowed, gaps, -np.inf)
    return int(ranks[int(np.argmax(gaps))])
