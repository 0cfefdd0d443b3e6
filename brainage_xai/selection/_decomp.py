"""The few things selection needs from a decomposition result, in one place.

Everything here reads a :mod:`brainage_xai.decomposition` result (``core``, ``factors``);
nothing fits a model. The dataset-level quantities the selection stage works with follow
from the diagonal-faces structure: with ``D[r, j] = G[r, j, r]`` and ``W = U2 D^T`` the
model is ``A ~ sum_r U1[:, r] o W[:, r] o U3[:, r]``.
"""

from __future__ import annotations

import numpy as np

from .scree import _sum_of_squares, as_numpy


def diagonal_faces(core) -> np.ndarray:
    """``D[r, j] = G[r, j, r]``, shape (R1, R2)."""
    G = as_numpy(core)
    r1 = G.shape[0]
    return G[np.arange(r1), :, np.arange(r1)]


def channel_factor(result) -> np.ndarray:
    """``W = U2 D^T`` (c, R1): the channel profile of each RoI, scale included."""
    U2 = as_numpy(result.factors[1])
    return U2 @ diagonal_faces(result.core).T


def factors_numpy(result) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(U1, W, U3)`` of a result as float64 numpy arrays."""
    U1 = as_numpy(result.factors[0]).astype(np.float64)
    U3 = as_numpy(result.factors[2]).astype(np.float64)
    return U1, channel_factor(result).astype(np.float64), U3


def relative_error(A, result, U1=None) -> float:
    """``||A - [[U1, W, U3]]|| / ||A||`` from Gram identities (no dense reconstruction).

    Parameters
    ----------
    A : array-like, shape (m, c, v)
        Activations; held-out subjects when ``U1`` is their refitted loadings.
    result : decomposition result
        Supplies ``W`` and ``U3`` (and ``U1`` when not given).
    U1 : array-like, shape (m, R1), optional
        Loadings of the subjects in ``A``; default the result's own.
    """
    if hasattr(result, "error_on"):
        return float(result.error_on(A, U1))
    A = as_numpy(A)
    U1r, W, U3 = factors_numpy(result)
    U1 = U1r if U1 is None else as_numpy(U1).astype(np.float64)
    # <A, X> = sum_r U1[:, r] . (A x3 U3 x2 W)[:, r]; one pass over A.
    Y = np.einsum("icv,vr->icr", A, U3.astype(A.dtype, copy=False), optimize=True)
    inner = float(np.einsum("icr,cr,ir->", Y.astype(np.float64), W, U1))
    norm_x2 = float(np.sum((U1.T @ U1) * (W.T @ W) * (U3.T @ U3)))
    norm_a2 = _sum_of_squares(A)
    if norm_a2 == 0:
        return float("nan")
    return float(np.sqrt(max(norm_a2 - 2 * inner + norm_x2, 0.0) / norm_a2))


def voxel_average(U1, result) -> np.ndarray:
    """Voxel average of the reconstruction, ``U1 diag(mean U3) W^T`` (m, c)."""
    _, W, U3 = factors_numpy(result)
    return (as_numpy(U1).astype(np.float64) * U3.mean(axis=0)) @ W.T
