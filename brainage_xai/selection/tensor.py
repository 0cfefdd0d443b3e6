"""What is decomposed: the activations themselves (the paper) or their deviations.

The paper decomposes the activation tensor ``A`` (subjects × channels × voxels) as it
is. Most of its energy is the part every subject shares (the average brain seen by the
network), so the non-negative factors mostly describe where activations are large, not
where subjects differ. ``--tensor deviations`` decomposes instead how each subject's
activations deviate from the training subjects' mean ``M`` (channels × voxels), split
into a positive and a negative part so that the tensor stays non-negative (the usual
way to give signed data to a non-negative factorisation)::

    D = [ max(A - M, 0) , max(M - A, 0) ]    (subjects × 2 channels × voxels)

``A = M + D[:, :c] - D[:, c:]`` exactly, so the network's head still applies to the
reconstruction (:func:`deviation_head`). The RoIs (U3) are then where subjects differ
in a way the decomposition shares across subjects, and the loadings (U1) how strongly
each subject shows that difference. See docs/decomposition.md and docs/report.md.
"""

from __future__ import annotations

import numpy as np

TENSORS = ("activations", "deviations")


def deviation_tensor(A, centre) -> np.ndarray:
    """``[max(A - centre, 0), max(centre - A, 0)]`` along the channel axis.

    Parameters
    ----------
    A : array-like, shape (n, c, v)
    centre : array-like, shape (c, v)
        The training subjects' mean activation.

    Returns
    -------
    numpy.ndarray, shape (n, 2 c, v), float32, C-contiguous
    """
    A = np.asarray(A, dtype=np.float32)
    centre = np.asarray(centre, dtype=np.float32)
    if A.ndim != 3 or centre.shape != A.shape[1:]:
        raise ValueError(f"A must be (n, c, v) and centre (c, v); got {A.shape} and {centre.shape}")
    out = np.empty((A.shape[0], 2 * A.shape[1], A.shape[2]), dtype=np.float32)
    c = A.shape[1]
    np.subtract(A, centre, out=out[:, :c])
    np.negative(out[:, :c], out=out[:, c:])
    np.maximum(out, 0.0, out=out)
    return out


def deviation_head(head, centre_average):
    """The network's head on a reconstruction of deviations.

    ``head`` maps voxel-averaged activations ``(m, c)`` to predictions; the returned
    function maps voxel-averaged deviations ``(m, 2 c)`` to the same predictions, through
    ``centre_average + z[:, :c] - z[:, c:]`` (voxel averaging is linear, so this is the
    head on the voxel average of the reconstructed activations).
    """
    centre_average = np.asarray(centre_average, dtype=np.float64)
    c = centre_average.shape[0]

    def on_deviations(z):
        z = np.asarray(z, dtype=np.float64)
        return head(centre_average[None] + z[:, :c] - z[:, c:])

    return on_deviations
