"""Every product of the solver that reads the tensor, as one pass over its subject chunks.

The solver touches ``A`` only through :class:`Passes`. An in-memory array (numpy or
torch) is one chunk, and each method evaluates the very expression the solver always
used on it; a :class:`~brainage_xai.decomposition.chunked.ChunkedTensor` is streamed
chunk by chunk (local, memory-mapped or dask), with results that are either cut by
subjects (concatenated) or summed over them. :attr:`Passes.count` counts the passes.
"""

from __future__ import annotations

import math

import numpy as np

from ._backend import namespace, sq_norm, to_numpy
from .chunked import ChunkedTensor, Rows, _split


class Passes:
    """Passes over ``A`` (``(n, c, v)``: an array, or a :class:`ChunkedTensor`)."""

    def __init__(self, bk, A, shape):
        self.bk = bk
        self.A = A
        self.shape = tuple(shape)
        self.chunked = isinstance(A, ChunkedTensor)
        self.count = 0

    def stream(self, func, *args):
        """``(rows, sums)`` of ``func(chunk, *args)`` over the chunks (one pass)."""
        self.count += 1
        if self.chunked:
            return self.A.stream(func, *args)
        return _split(func(self.A, *(a.array if isinstance(a, Rows) else a for a in args)))

    # ---------------------------------------------------------------- products
    def a3(self, Q):
        """``A_(3)^T Q``, i.e. ``A2 @ Q`` with ``A2 = A.reshape(n c, v)``: ``(n c, k)``."""
        v = self.shape[2]
        return self.stream(lambda a, Q: a.reshape(-1, v) @ Q, Q)[0]

    def mode3(self, U3):
        """``T = A x3 U3``, shape ``(n, c, R)``."""
        n, c, v = self.shape
        R = U3.shape[1]
        return self.stream(lambda a, U: (a.reshape(-1, v) @ U).reshape(-1, c, R), U3)[0]

    def t3(self, X):
        """``A2.T @ X`` for ``X`` of shape ``(n c, k)``: ``(v, k)``."""
        n, c, v = self.shape
        k = X.shape[1]
        return self.stream(lambda a, X: (None, (a.reshape(-1, v).T @ X.reshape(-1, k),)),
                           Rows(X.reshape(n, c, k)))[1][0]

    def mttkrp3(self, U1, W):
        """Mode-3 MTTKRP ``A2.T @ (U1 kr W)``: ``(v, R)``."""
        v = self.shape[2]

        def f(a, U1, W):
            KR = (U1[:, None, :] * W[None, :, :]).reshape(-1, U1.shape[1])
            return None, (a.reshape(-1, v).T @ KR,)

        return self.stream(f, Rows(U1), W)[1][0]

    def a1(self, X):
        """``A_(1) @ X`` with ``A_(1) = A.reshape(n, c v)``: ``(n, k)``."""
        c, v = self.shape[1:]
        return self.stream(lambda a, X: a.reshape(-1, c * v) @ X, X)[0]

    def t1(self, Q):
        """``A_(1).T @ Q`` for ``Q`` of shape ``(n, k)``: ``(c v, k)``."""
        c, v = self.shape[1:]
        return self.stream(lambda a, Q: (None, (a.reshape(-1, c * v).T @ Q,)), Rows(Q))[1][0]

    def mttkrp1(self, Oc, Ov):
        """``A_(1) (Ov kr Oc)``: ``(n, k)``."""
        c, v = self.shape[1:]
        return self.stream(
            lambda a, Oc, Ov: namespace(a).sum((a.reshape(-1, v) @ Ov).reshape(-1, c, Ov.shape[1])
                                               * Oc[None, :, :], axis=1), Oc, Ov)[0]

    def mttkrp2(self, Oa, Ov):
        """``A_(2) (Ov kr Oa)``: ``(c, k)``."""
        c, v = self.shape[1:]

        def f(a, Oa, Ov):
            k = Ov.shape[1]
            return None, (namespace(a).sum((a.reshape(-1, v) @ Ov).reshape(-1, c, k) * Oa[:, None, :], axis=0),)

        return self.stream(f, Rows(Oa), Ov)[1][0]

    def gram2(self):
        """``A_(2) A_(2)^T`` (``c x c``), subject by subject."""
        return self.stream(lambda a: (None, (_gram(a),)))[1][0]

    def sketch(self, Oa, Oc, stats=False):
        """One pass for the sketch start: ``A_(2) A_(2)^T`` and ``A_(3) (Oc kr Oa)``.

        Returns ``(G2, Y3, stats)``; with ``stats`` the pass also gives what
        :meth:`stats` gives (else ``None``), so the input check costs no pass of its own.
        """
        v = self.shape[2]

        def f(a, Oa, Oc):
            Om = (Oa[:, None, :] * Oc[None, :, :]).reshape(-1, Oc.shape[1])
            return (_stats(a) if stats else None), (_gram(a), a.reshape(-1, v).T @ Om)

        rows, (G2, Y3) = self.stream(f, Rows(Oa), Oc)
        return G2, Y3, (_reduce_stats(rows) if stats else None)

    def power3(self, Q):
        """``(A2.T @ (A2 @ Q), (A2 @ Q).T @ (A2 @ Q))`` in one pass: ``(v, k)``, ``(k, k)``.

        Subject chunks make the mode-3 subspace iteration a single pass: ``A2 @ Q`` for
        a chunk's rows is all that ``A2.T @ (.)`` needs from them.
        """
        v = self.shape[2]

        def f(a, Q):
            a2 = a.reshape(-1, v)
            Z = a2 @ Q
            return None, (a2.T @ Z, Z.T @ Z)

        Y, B = self.stream(f, Q)[1]
        return Y, B

    def stats(self):
        """``(||A||^2 in float64, smallest entry, number of NaNs)`` in one pass."""
        return _reduce_stats(self.stream(_stats)[0])


# The chunk functions take their namespace from the chunk and capture small things
# only: dask sends them to its workers.
def _gram(a):
    """``sum_i a_i a_i^T`` over the subjects of a chunk."""
    xp = namespace(a)
    return xp.sum(xp.matmul(a, xp.matrix_transpose(a)), axis=0)


def _stats(a):
    a = to_numpy(a)
    return np.array([[sq_norm(a), float(a.min()), float(np.isnan(a).sum())]])


def _reduce_stats(rows):
    return float(rows[:, 0].sum()), float(rows[:, 1].min()), int(rows[:, 2].sum())


def check_stats(stats, name, nonneg):
    """``||A||^2`` from :meth:`Passes.stats` after checking it is finite (and non-negative)."""
    normA2, amin, n_nan = stats
    if n_nan:
        raise ValueError(f"{name} must be finite; it contains {n_nan} NaN value(s)")
    if not math.isfinite(normA2):
        raise ValueError(f"{name} must be finite; it contains Inf or values too large to square")
    if nonneg and amin < 0:
        raise ValueError(
            f"constraints='nonneg' needs a non-negative {name}; its smallest entry is "
            f"{amin:g} (use constraints='paper' for signed data)"
        )
    return normA2
