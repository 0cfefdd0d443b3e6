"""Planted models for tests and benchmarks of the decomposition.

A planted activation tensor follows the structured model exactly (known subject
loadings ``U1``, channel factor ``W = U2 D.T`` of rank ``R2``, sparse non-negative
spatial maps ``U3``) plus clipped Gaussian noise, so that recovery can be scored.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def make_planted(shape, rank, *, noise=0.05, density=0.2, dtype=np.float64, random_state=0,
                 block=64):
    """A non-negative tensor ``sum_r U1[:, r] o W[:, r] o U3[:, r] + noise``.

    Parameters
    ----------
    shape : (n, c, v)
    rank : (R1, R2)
        ``R2 >= R1`` gives a generic rank-``R1`` channel factor.
    noise : float
        Standard deviation of the Gaussian noise relative to the RMS of the clean
        tensor; the noisy tensor is clipped at 0 (activations after a ReLU).
    density : float
        Fraction of voxels in each spatial map's support.
    dtype : numpy dtype
    random_state : int
    block : int
        Subjects generated at a time, so that large float32 tensors are built
        without float64 temporaries of their size.

    Returns
    -------
    A : ndarray, shape (n, c, v)
    truth : dict
        ``U1``, ``U2``, ``D``, ``W``, ``U3`` (float64).
    """
    n, c, v = shape
    R1, R2 = rank
    rng = np.random.default_rng(random_state)
    U1 = 0.5 + rng.random((n, R1))
    k = min(R1, R2)
    U2 = rng.random((c, k)) * (rng.random((c, k)) < 0.5) + 0.01
    if R2 >= R1:
        D = np.eye(R1)
    else:
        D = 0.2 + rng.random((R1, k))
    W = U2 @ D.T
    U3 = rng.random((v, R1)) * (rng.random((v, R1)) < density)
    for r in range(R1):  # no empty map
        U3[rng.integers(v), r] += 1.0
    rms = None
    A = np.empty(shape, dtype=dtype)
    for start in range(0, n, block):
        clean = np.einsum("ar,br,cr->abc", U1[start:start + block], W, U3)
        if rms is None:
            rms = float(np.sqrt(np.mean(clean**2)))
        A[start:start + block] = np.maximum(clean + noise * rms * rng.standard_normal(clean.shape), 0)
    return A, {"U1": U1, "U2": U2, "D": D, "W": W, "U3": U3}


def factor_match_score(true, est):
    """Factor match score of two CP models, up to permutation and scale.

    Parameters
    ----------
    true, est : list of (dim_k, R) arrays
        Factors of each model (numpy), one per mode.

    Returns
    -------
    score : float
        Mean over matched components of the product over modes of
        ``|cos(true_r, est_perm(r))|``; 1 is a perfect match.
    perm : ndarray
        ``perm[r]`` is the estimated component matched to true component ``r``.
    """
    R = true[0].shape[1]
    sim = np.ones((R, est[0].shape[1]))
    for T, E in zip(true, est):
        Tn = T / np.maximum(np.linalg.norm(T, axis=0), 1e-300)
        En = E / np.maximum(np.linalg.norm(E, axis=0), 1e-300)
        sim *= np.abs(Tn.T @ En)
    rows, cols = linear_sum_assignment(-sim)
    perm = np.empty(R, dtype=int)
    perm[rows] = cols
    return float(sim[rows, cols].mean()), perm
