"""A tiny array shim so that one solver runs on numpy arrays and torch tensors.

The solver needs a dozen operations. numpy and torch agree on ``@``, ``.T``,
``.reshape``, slicing and arithmetic; the few calls whose names differ live here.
Everything stays on the input's device and in its dtype: only small
``R x R`` / ``R``-sized quantities and scalars are ever moved to the host.
"""

from __future__ import annotations

import numpy as np

#: Floor for divisions by norms and Gram diagonals: zero columns stay zero.
TINY = 1e-30


def is_torch(x) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch for numpy input."""
    return type(x).__module__.split(".")[0] == "torch"


class Backend:
    """Array operations bound to the dtype (and device) of a reference array.

    Parameters
    ----------
    like : numpy.ndarray or torch.Tensor
        Arrays created by this backend get its type, dtype and device.
    """

    def __init__(self, like):
        self.is_torch = is_torch(like)
        self.dtype = like.dtype
        if self.is_torch:
            import torch

            self.torch = torch
            self.device = like.device
        else:
            self.device = None

    # -- creation and transfer -------------------------------------------------
    def asarray(self, x):
        """Convert ``x`` (numpy, torch or nested lists) to this backend."""
        if self.is_torch:
            if is_torch(x):
                return x.to(device=self.device, dtype=self.dtype)
            return self.torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)
        if is_torch(x):
            x = x.detach().cpu().numpy()
        return np.asarray(x, dtype=self.dtype)

    @staticmethod
    def to_numpy(x) -> np.ndarray:
        """Host copy of a (small) array."""
        if is_torch(x):
            return x.detach().cpu().numpy()
        return np.asarray(x)

    def zeros(self, shape):
        if self.is_torch:
            return self.torch.zeros(shape, dtype=self.dtype, device=self.device)
        return np.zeros(shape, dtype=self.dtype)

    def eye(self, n):
        if self.is_torch:
            return self.torch.eye(n, dtype=self.dtype, device=self.device)
        return np.eye(n, dtype=self.dtype)

    def copy(self, x):
        return x.clone() if self.is_torch else x.copy()

    # -- elementwise -----------------------------------------------------------
    def clip0(self, x):
        """Positive part."""
        return self.torch.clamp(x, min=0) if self.is_torch else np.maximum(x, 0)

    def clamp_min(self, x, value):
        return self.torch.clamp(x, min=value) if self.is_torch else np.maximum(x, value)

    def abs(self, x):
        return self.torch.abs(x) if self.is_torch else np.abs(x)

    def sqrt(self, x):
        return self.torch.sqrt(x) if self.is_torch else np.sqrt(x)

    def where(self, cond, a, b):
        return self.torch.where(cond, a, b) if self.is_torch else np.where(cond, a, b)

    # -- reductions ------------------------------------------------------------
    def sum(self, x, axis=None):
        if self.is_torch:
            return x.sum() if axis is None else x.sum(dim=axis)
        return x.sum(axis=axis)

    def sum64(self, x):
        """Sum of all entries accumulated in float64 (a 0-d array on the device)."""
        if self.is_torch:
            return x.sum(dtype=self.torch.float64)
        return x.sum(dtype=np.float64)

    def col_norms(self, x):
        """Euclidean norm of each column of a matrix."""
        if self.is_torch:
            return self.torch.linalg.vector_norm(x, dim=0)
        return np.sqrt(np.einsum("ij,ij->j", x, x))

    def col_l1(self, x):
        """l1 norm of each column of a matrix."""
        return self.sum(self.abs(x), axis=0)

    @staticmethod
    def item(x) -> float:
        return float(x.item()) if hasattr(x, "item") else float(x)

    def sq_norm(self, x, chunk: int = 1 << 20) -> float:
        """Squared Frobenius norm accumulated in double precision.

        Summed chunk by chunk over the first axis so that float32 tensors with
        hundreds of millions of entries keep their precision and no temporary the
        size of ``x`` is made.
        """
        per = max(1, chunk // max(1, int(np.prod(x.shape[1:]))))
        total = 0.0
        for start in range(0, x.shape[0], per):
            # float32 dot products lose ~1e-5 over millions of terms, which the Gram
            # identity for the error (a difference of near-equal numbers) cannot
            # afford: square and sum each chunk in float64.
            block = x[start : start + per]
            if self.is_torch:
                total += float(block.to(self.torch.float64).square().sum().item())
            else:
                total += float(np.square(block, dtype=np.float64).sum())
        return total

    # -- small linear algebra --------------------------------------------------
    def einsum(self, eq, *ops):
        return self.torch.einsum(eq, *ops) if self.is_torch else np.einsum(eq, *ops, optimize=False)

    def diag(self, x):
        return self.torch.diagonal(x) if self.is_torch else np.diagonal(x)

    def pinvh(self, x):
        """Pseudo-inverse of a symmetric positive semi-definite matrix."""
        if self.is_torch:
            return self.torch.linalg.pinv(x, hermitian=True)
        return np.linalg.pinv(x, hermitian=True)

    def eigh(self, x):
        if self.is_torch:
            return self.torch.linalg.eigh(x)
        return np.linalg.eigh(x)

    def max_eig(self, x):
        """Largest eigenvalue of a symmetric matrix (kept on the device)."""
        if self.is_torch:
            return self.torch.linalg.eigvalsh(x)[-1]
        return np.linalg.eigvalsh(x)[-1]

    def qr_q(self, x):
        if self.is_torch:
            return self.torch.linalg.qr(x, mode="reduced")[0]
        return np.linalg.qr(x, mode="reduced")[0]

    def batched_matmul(self, a, b):
        return self.torch.matmul(a, b) if self.is_torch else np.matmul(a, b)

    def swap_last(self, x):
        """View with the last two axes swapped."""
        return x.transpose(-1, -2) if self.is_torch else np.swapaxes(x, -1, -2)

    def take_cols(self, x, order):
        """Columns of ``x`` in the given (host integer) order."""
        if self.is_torch:
            idx = self.torch.as_tensor(np.asarray(order, dtype=np.int64), device=self.device)
            return x.index_select(1, idx)
        return x[:, np.asarray(order, dtype=np.int64)]

    def take_rows(self, x, order):
        if self.is_torch:
            idx = self.torch.as_tensor(np.asarray(order, dtype=np.int64), device=self.device)
            return x.index_select(0, idx)
        return x[np.asarray(order, dtype=np.int64)]
