"""The model with its spatial factor fixed: loadings and channel profiles for given RoIs.

With ``U3`` (``v × Q``) fixed, the model ``A ≈ Σ_q U1[:, q] ∘ W[:, q] ∘ U3[:, q]`` depends
on the tensor only through its projection ``Y = A ×3 U3ᵀ`` (``n × c × Q``, one pass over
``A``) and the Gram matrix ``U3ᵀ U3``: ``<A, Â> = Σ_{i,c,q} U1[i,q] W[c,q] Y[i,c,q]``. So
several tensors that share the voxels (the same layer of several networks) are fitted
together by stacking their projections along the channels: one ``U1`` for all of them
(the subjects' loadings on the shared RoIs) and a ``W`` with each tensor's channel
profiles. Both are non-negative and found by HALS (Cichocki et al. 2007), as the full
model's factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._backend import TINY, Backend
from ._solver import hals

#: HALS sweeps per factor and outer iteration.
SWEEPS = 5


def project(A, U3) -> np.ndarray:
    """``Y[i, c, q] = Σ_v A[i, c, v] U3[v, q]`` (float64), one pass over ``A``.

    Parameters
    ----------
    A : array, shape (n, c, v)
    U3 : array, shape (v, Q)
    """
    A = np.asarray(A)
    n, c, v = A.shape
    U3 = np.asarray(U3, dtype=A.dtype if A.dtype in (np.float32, np.float64) else np.float64)
    if U3.ndim != 2 or U3.shape[0] != v:
        raise ValueError(f"U3 has shape {U3.shape}, expected ({v}, Q) for a tensor with {v} voxels")
    return (A.reshape(n * c, v) @ U3).reshape(n, c, U3.shape[1]).astype(np.float64)


@dataclass
class FixedSpatialFit:
    """``U1`` (n × Q) and ``W`` (Σc × Q) for a fixed ``U3``; ``W`` has unit-norm columns.

    ``rel_error`` is ``||A - Â|| / ||A||`` over the stacked tensors (when their squared
    norms were given).
    """

    U1: np.ndarray
    W: np.ndarray
    gram: np.ndarray
    n_iter: int
    rel_error: float = float("nan")

    def transform(self, Y_new, n_iter_max: int = 200, tol: float = 1e-10) -> np.ndarray:
        """Loadings of new subjects from their projections ``(m, Σc, Q)``, ``W`` fixed."""
        Y_new = _stack(Y_new, self.W.shape[0])
        bk = Backend(Y_new)
        M = np.einsum("icq,cq->iq", Y_new, self.W)
        H = (self.W.T @ self.W) * self.gram
        U1 = np.clip(M @ np.linalg.pinv(H), 0.0, None)
        for _ in range(0, n_iter_max, 10):
            new = hals(bk, U1, M, H, 10)
            change = float(np.abs(new - U1).max())
            U1 = new
            if change <= tol * max(float(np.abs(U1).max()), TINY):
                break
        return U1


def _stack(Y, channels: int | None = None) -> np.ndarray:
    Y = np.concatenate([np.asarray(y, dtype=np.float64) for y in Y], axis=1) if isinstance(Y, list | tuple) \
        else np.asarray(Y, dtype=np.float64)
    if Y.ndim != 3 or (channels is not None and Y.shape[1] != channels):
        raise ValueError(f"projections have shape {Y.shape}, expected (m, {channels or 'c'}, Q)")
    return Y


def fit_fixed_spatial(Y, U3, *, norms2=None, n_iter_max: int = 500, tol: float = 1e-7,
                      random_state=0) -> FixedSpatialFit:
    """Fit ``U1`` and ``W`` (both ≥ 0) to tensors whose spatial factor is ``U3``.

    Parameters
    ----------
    Y : array (n, c, Q) or list of them
        :func:`project` of each tensor on ``U3`` (the same subjects in each); a list is
        stacked along the channels.
    U3 : array, shape (v, Q)
        The fixed spatial factor.
    norms2 : float, optional
        ``Σ ||A_k||²`` of the tensors, for the relative error.
    n_iter_max, tol
        Outer iterations, and the relative decrease of the objective below which they stop.
    random_state : int
        Seed of the initial loadings.

    Returns
    -------
    FixedSpatialFit
    """
    Y = _stack(Y)
    U3 = np.asarray(U3, dtype=np.float64)
    n, c, Q = Y.shape
    if U3.shape[1] != Q:
        raise ValueError(f"U3 has {U3.shape[1]} columns, the projections {Q}")
    bk = Backend(Y)
    G = U3.T @ U3
    rng = np.random.default_rng(random_state)
    U1 = rng.uniform(0.5, 1.5, (n, Q))
    W = np.zeros((c, Q))
    previous, n_iter = np.inf, 0
    while n_iter < n_iter_max:
        n_iter += 1
        M_W = np.einsum("icq,iq->cq", Y, U1)
        W = hals(bk, W, M_W, (U1.T @ U1) * G, SWEEPS)
        scale = np.linalg.norm(W, axis=0)
        W, U1 = W / np.where(scale > TINY, scale, 1.0), U1 * scale
        M_U = np.einsum("icq,cq->iq", Y, W)
        H_U = (W.T @ W) * G
        U1 = hals(bk, U1, M_U, H_U, SWEEPS)
        # 1/2 ||A - Â||² up to the constant ||A||²/2
        objective = 0.5 * float(np.sum((U1.T @ U1) * H_U)) - float(np.sum(U1 * M_U))
        if abs(previous - objective) <= tol * max(abs(objective), TINY):
            break
        previous = objective
    rel = float("nan")
    if norms2 is not None and norms2 > 0:
        rel = float(np.sqrt(max(norms2 + 2 * objective, 0.0) / norms2))
    return FixedSpatialFit(U1=U1, W=W, gram=G, n_iter=n_iter, rel_error=rel)
