"""Array namespaces, so that one solver runs on numpy arrays and torch tensors.

The solver calls the Python array API standard: :func:`namespace` gives the namespace
of an array (numpy itself for numpy arrays, array-api-compat's wrapper for torch
tensors), chosen per array, without global state, so that fits on numpy and on torch
inputs can run side by side in threads. :class:`Backend` adds only what the standard
lacks: creation in a reference array's dtype and device, the symmetric
pseudo-inverse, column selection by host indices, host copies of small ``R x R`` /
``R``-sized quantities, the float64 squared norm, and the cheaper of ``maximum`` and
``clip`` for the inner loops. Nothing large leaves the device.
"""

from __future__ import annotations

import numpy as np
from array_api_compat import array_namespace, device, is_numpy_array, is_torch_array

#: Floor for divisions by norms and Gram diagonals: zero columns stay zero.
TINY = 1e-30


#: numpy >= 2.1 implements the standard in its main namespace (``clip(min=)`` came in 2.1).
_NUMPY_IS_STANDARD = np.lib.NumpyVersion(np.__version__) >= "2.1.0"


def namespace(x):
    """The array API namespace of ``x``.

    numpy's own namespace where it is standard: its functions are several times
    cheaper per call than the compatibility wrapper's, and the solver makes hundreds
    of small calls per iteration.
    """
    use_compat = False if _NUMPY_IS_STANDARD and is_numpy_array(x) else None
    return array_namespace(x, use_compat=use_compat)


def to_numpy(x) -> np.ndarray:
    """Host copy of a (small) array."""
    if is_torch_array(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def item(x) -> float:
    return float(x.item()) if hasattr(x, "item") else float(x)


def sq_norm(x, chunk: int = 1 << 20) -> float:
    """Squared Frobenius norm accumulated in double precision.

    Summed chunk by chunk over the first axis so that float32 tensors with hundreds
    of millions of entries keep their precision and no temporary the size of ``x``
    is made.
    """
    xp = namespace(x)
    per = max(1, chunk // max(1, int(np.prod(x.shape[1:]))))
    total = 0.0
    for start in range(0, x.shape[0], per):
        # float32 dot products lose ~1e-5 over millions of terms, which the Gram
        # identity for the error (a difference of near-equal numbers) cannot afford:
        # square and sum each chunk in float64.
        block = xp.astype(x[start : start + per], xp.float64)
        total += item(xp.sum(xp.square(block)))
    return total


class Backend:
    """The namespace, dtype and device of a reference array.

    Parameters
    ----------
    like : numpy.ndarray or torch.Tensor
        Arrays created by this backend get its type, dtype and device.
    """

    def __init__(self, like):
        self.xp = namespace(like)
        self.is_torch = is_torch_array(like)
        self.dtype = like.dtype
        self.device = device(like)

    to_numpy = staticmethod(to_numpy)
    item = staticmethod(item)
    sq_norm = staticmethod(sq_norm)

    def at_least(self, x, lo):
        """``max(x, lo)`` entrywise, for the solver's inner loops.

        The standard's ``clip(x, min=lo)`` costs numpy three times its ``maximum``
        per call, and array-api-compat's torch ``maximum`` twice its ``clip``; the
        HALS sweeps make thousands of these calls on short vectors per fit.
        """
        if self.is_torch:
            return self.xp.clip(x, min=lo)
        return self.xp.maximum(x, lo)

    def asarray(self, x):
        """Convert ``x`` (numpy, torch or nested lists) to this backend."""
        if is_torch_array(x) and not self.is_torch:
            x = to_numpy(x)
        elif self.is_torch and not is_torch_array(x):
            x = np.asarray(x)
        return self.xp.asarray(x, dtype=self.dtype, device=self.device)

    def zeros(self, shape):
        return self.xp.zeros(shape, dtype=self.dtype, device=self.device)

    def eye(self, n):
        return self.xp.eye(n, dtype=self.dtype, device=self.device)

    def pinvh(self, x):
        """Pseudo-inverse of a symmetric positive semi-definite matrix.

        ``hermitian`` is not in the standard; numpy and torch both take it (an
        eigendecomposition instead of an SVD).
        """
        return self.xp.linalg.pinv(x, hermitian=True)

    def take(self, x, order, axis=1):
        """Entries of ``x`` along ``axis`` in the given (host integer) order."""
        idx = self.xp.asarray(np.asarray(order, dtype=np.int64), device=self.device)
        return self.xp.take(x, idx, axis=axis)

    def diag_matrix(self, d):
        """Square matrix with ``d`` on the diagonal."""
        return d[:, None] * self.eye(d.shape[0])
