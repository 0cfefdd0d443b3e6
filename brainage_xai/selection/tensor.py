"""What is decomposed: the activations themselves (the paper) or their deviations.

The paper decomposes the activation tensor ``A`` (subjects × channels × voxels) as it
is. Most of its energy is the part every subject shares (the average brain seen by the
network), so the non-negative factors mostly describe where activations are large, not
where subjects differ. ``--tensor deviations`` decomposes instead how each subject's
activations deviate from the training subjects' mean ``M`` (channels × voxels), split
into a positive and a negative part so that the tensor stays non-negative (the usual
way to give signed data to a non-negative factorisation)::

    D = [ max(A - M, 0) , max(M - A, 0) ] / s    (subjects × 2 channels × voxels)

where ``s`` is each channel's standard deviation over the training subjects and voxels
(:func:`channel_scale`): a channel's scale after BN-ReLU says nothing about how much it
matters, so each channel enters the least-squares fit in units of its own spread rather
than with its arbitrary size. ``A = M + s (D[:, :c] - D[:, c:])`` exactly, so the
network's head still applies to the reconstruction (:func:`deviation_head`). The RoIs (U3) are then where subjects differ
in a way the decomposition shares across subjects, and the loadings (U1) how strongly
each subject shows that difference.

``--tensor relevance`` weights the same deviations by how much the network's prediction
depends on each channel and voxel: ``D * w`` with::

    w[c, v] = (g[c, v] * s[c]) ** RELEVANCE_POWER      (normalised to mean 1)

where ``g`` is the root mean square over the training subjects of the output's gradient
with respect to the activation (:func:`brainage_xai.model.activations.gradient_rms`), so that
``g * s`` is how far the prediction moves for a one-spread change of that activation
(:func:`relevance_weight`). Tissue that varies between subjects but that the network
ignores (the simulated cohort's decoy) then stays out of the decomposition, which the
plain deviations spend components on. With power 1 the tensor is each deviation's
expected contribution to the prediction; the square root (0.5) keeps more of the
deviations' spatial coherence (gradients are noisy voxel by voxel): on the simulated
cohort it kept the planted regions about as well placed as the plain deviations, where
power 1 placed two of them worse (docs/benchmarks.md). See docs/decomposition.md and docs/report.md.
"""

from __future__ import annotations

import numpy as np

from ..config import TENSORS

#: Exponent of the relevance weight (:func:`relevance_weight`).
RELEVANCE_POWER = 0.5


def channel_scale(A) -> np.ndarray:
    """Each channel's standard deviation over subjects and voxels, shape ``(c,)``.

    Computed on the training subjects' activations ``A`` (n, c, v), in float64, one
    channel at a time (a float64 copy of one channel, not of ``A``). A channel that never
    varies (a dead ReLU) gets scale 1, so that it stays zero instead of being divided by
    zero.
    """
    A = np.asarray(A)
    if A.ndim != 3:
        raise ValueError(f"A must be (n, c, v); got shape {A.shape}")
    scale = np.array([A[:, k].std(dtype=np.float64) for k in range(A.shape[1])])
    tiny = 1e-6 * scale.max() if scale.max() > 0 else 1.0
    scale[scale <= tiny] = 1.0
    return scale


def relevance_weight(gradient_rms, scale, power: float = RELEVANCE_POWER) -> np.ndarray:
    """The weight of each channel and voxel in ``--tensor relevance``, shape ``(c, v)``.

    ``(gradient_rms * scale[:, None]) ** power``, divided by its mean so that the
    weighted tensor keeps the size of the deviations. ``gradient_rms`` ``(c, v)`` is
    :func:`brainage_xai.model.activations.gradient_rms` of the training subjects and ``scale``
    ``(c,)`` is :func:`channel_scale` of the same subjects: their product is how far the
    prediction moves for a one-spread change of the activation.
    """
    g = np.asarray(gradient_rms, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    if g.ndim != 2 or scale.shape != (g.shape[0],):
        raise ValueError(f"gradient_rms must be (c, v) and scale (c,); got {g.shape} and {scale.shape}")
    if not (np.all(np.isfinite(g)) and np.all(g >= 0)) or power <= 0:
        raise ValueError("gradient_rms must be finite and non-negative, and power positive")
    w = (g * scale[:, None]) ** power
    mean = w.mean()
    if mean <= 0:
        raise ValueError("the network's output does not depend on this layer (zero gradient everywhere)")
    return (w / mean).astype(np.float32)


def deviation_tensor(A, centre, scale=None, weight=None) -> np.ndarray:
    """``[max(A - centre, 0), max(centre - A, 0)] / scale * weight`` along the channel axis.

    Parameters
    ----------
    A : array-like, shape (n, c, v)
    centre : array-like, shape (c, v)
        The training subjects' mean activation.
    scale : array-like, shape (c,), optional
        Per-channel divisor (:func:`channel_scale` of the training subjects); none
        when omitted.
    weight : array-like, shape (c, v), optional
        Per channel and voxel multiplier (:func:`relevance_weight`), applied to both
        parts; none when omitted.

    Returns
    -------
    numpy.ndarray, shape (n, 2 c, v), float32, C-contiguous
    """
    A = np.asarray(A, dtype=np.float32)
    centre = np.asarray(centre, dtype=np.float32)
    if A.ndim != 3 or centre.shape != A.shape[1:]:
        raise ValueError(f"A must be (n, c, v) and centre (c, v); got {A.shape} and {centre.shape}")
    c = A.shape[1]
    if scale is not None:
        scale = np.asarray(scale, dtype=np.float64).reshape(-1)
        if scale.shape != (c,) or not np.all(scale > 0):
            raise ValueError(f"scale must hold {c} positive values; got shape {scale.shape}")
    if weight is not None:
        weight = np.asarray(weight, dtype=np.float32)
        if weight.shape != centre.shape:
            raise ValueError(f"weight must be (c, v) = {centre.shape}; got {weight.shape}")
    out = np.empty((A.shape[0], 2 * c, A.shape[2]), dtype=np.float32)
    np.subtract(A, centre, out=out[:, :c])
    if scale is not None:
        out[:, :c] *= (1.0 / scale).astype(np.float32)[None, :, None]
    if weight is not None:
        out[:, :c] *= weight[None]
    np.negative(out[:, :c], out=out[:, c:])
    np.maximum(out, 0.0, out=out)
    return out


def decomposed_nbytes(shape, tensor: str) -> int:
    """Bytes of the float32 tensor the selection decomposes for activations of ``shape``.

    ``(n, c, v)`` activations give an ``(n, c, v)`` tensor, or ``(n, 2 c, v)`` as
    ``"deviations"`` or ``"relevance"`` (:func:`deviation_tensor`).
    """
    if tensor not in TENSORS:
        raise ValueError(f"tensor must be one of {TENSORS}; got {tensor!r}")
    n, c, v = shape
    return n * (c if tensor == "activations" else 2 * c) * v * np.dtype(np.float32).itemsize


def deviation_splits(array, rows: dict, gradient_rms=None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Deviation tensors of every split, centred and scaled by the training split.

    Parameters
    ----------
    array : array-like, shape (n, c, v)
        Activations of all subjects, typically memory-mapped.
    rows : dict
        Row indices per split; must hold ``"train"``.
    gradient_rms : array-like, shape (c, v), optional
        The training subjects' output gradient (``--tensor relevance``): the deviations
        are then weighted by :func:`relevance_weight`.

    Returns
    -------
    tensors : dict
        ``{split: deviation_tensor(...)}`` in the order of ``rows``.
    centre, scale : numpy.ndarray
        The training mean (c, v) and :func:`channel_scale` (c,).

    Notes
    -----
    One split's activations are read at a time and dropped once converted, so the
    activations and their (twice as large) deviations are never both held for every
    subject.
    """
    train = np.asarray(array[rows["train"]])
    centre, scale = train.mean(axis=0), channel_scale(train)
    weight = None if gradient_rms is None else relevance_weight(gradient_rms, scale)
    tensors = {"train": deviation_tensor(train, centre, scale, weight)}
    del train
    for split, r in rows.items():
        if split != "train":
            tensors[split] = deviation_tensor(np.asarray(array[r]), centre, scale, weight)
    return {s: tensors[s] for s in rows}, centre, scale


def deviation_head(head, centre_average, scale=None):
    """The network's head on a reconstruction of deviations.

    ``head`` maps voxel-averaged activations ``(m, c)`` to predictions; the returned
    function maps voxel-averaged deviations ``(m, 2 c)`` to the same predictions, through
    ``centre_average + scale * (z[:, :c] - z[:, c:])`` (voxel averaging is linear, so this
    is the head on the voxel average of the reconstructed activations). ``scale`` is the
    one :func:`deviation_tensor` divided by (none when omitted).
    """
    centre_average = np.asarray(centre_average, dtype=np.float64)
    c = centre_average.shape[0]
    scale = np.ones(c) if scale is None else np.asarray(scale, dtype=np.float64).reshape(c)

    def on_deviations(z):
        z = np.asarray(z, dtype=np.float64)
        return head(centre_average[None] + scale[None] * (z[:, :c] - z[:, c:]))

    return on_deviations


def prepare_tensor(array, rows, tensor: str, *, gradient_rms=None, head=None):
    """The tensor the selection decomposes, per split, and what it was built with.

    Parameters
    ----------
    array : array-like, shape (n, c, v)
        Activations of all subjects (typically memory-mapped).
    rows : Splits of array of int
        Rows of each split.
    tensor : {"activations", "deviations", "relevance"}
    gradient_rms : array-like, shape (c, v), optional
        The training subjects' output gradient; needed for ``"relevance"``.
    head : callable, optional
        The network's head on voxel-averaged activations (last layer only).

    Returns
    -------
    A : Splits of numpy.ndarray
    parameters : dict
        ``centre`` and ``scale`` (and ``weight`` for ``"relevance"``): what the
        back-projection needs to build the same tensor; empty for ``"activations"``.
    head : callable or None
        The head on the voxel average of the reconstruction of this tensor, or None where
        that is not the head's input (the relevance weight varies over voxels).
    """
    from .splits import Splits

    if tensor not in TENSORS:
        raise ValueError(f"tensor must be one of {TENSORS}; got {tensor!r}")
    if tensor == "activations":
        return rows.map(lambda r: np.asarray(array[r])), {}, head
    if tensor == "relevance" and gradient_rms is None:
        raise ValueError("the relevance tensor needs the output gradient")
    tensors, centre, scale = deviation_splits(array, rows.to_dict(),
                                              gradient_rms=gradient_rms if tensor == "relevance" else None)
    parameters = {"centre": centre, "scale": scale}
    if tensor == "relevance":
        parameters["weight"] = relevance_weight(gradient_rms, scale)
        head = None
    elif head is not None:
        head = deviation_head(head, centre.mean(axis=1), scale)
    return Splits.from_dict(tensors), parameters, head
