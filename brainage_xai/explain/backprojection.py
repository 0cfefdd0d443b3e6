"""Where in the input each RoI's loadings come from: back-projection through the network.

An RoI is a column of ``U3`` on the decomposed layer's feature grid (:mod:`rois`): where
the layer's activations carry the component. A feature voxel sees a whole receptive
field of input (60 mm at ``block1``), so the input that makes subjects' loadings differ
can lie elsewhere than the RoI. This module follows each loading back to the input.

For subject ``a`` and component ``r`` the loading is, without the non-negativity, the
least-squares coefficient ``s_r(a) = Σ_{b,v} K[r, b, v] T_a[b, v]`` of the subject's
tensor slice ``T_a`` (the activations, or their scaled deviations from the training mean,
weighted for ``--tensor relevance``) on the components ``W_r ⊗ U3_r`` (``W = U2 Dᵀ``):
``K = P · [W_r ⊗ U3_r]`` with ``P`` the inverse of their Gram matrix
(:func:`loading_functional`). Its gradient ``g_a`` with respect to the input map gives each
input voxel's first-order contribution ``c_a = g_a · (x_a − x̄)`` (``x̄``: the training
mean input), and the map of component ``r`` is

    ``max(Cov_a(c_a(voxel), s_r(a)), 0)``

over the training subjects: each input voxel's share of the variance of the loading
(summed over voxels, the shares give ``Var(s_r)`` to first order), negative shares set to
zero. It is high where the input differs between subjects in the way the loading does,
and zero where the input varies but the loading does not follow.

On the simulated cohort (``benchmarks/bench_backprojection.py``; docs/benchmarks.md)
the back-projected maps of the deviations' RoIs lie closer to the planted regions than
the RoIs themselves (median best correlation +0.04 to +0.07), but not for the relevance
tensor's (-0.07); and they show an RoI whose loading is driven by input elsewhere, such
as an RoI in the cingulate gyrus that takes its loading from the deep grey matter, the
decoy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError

#: What the maps are, for the NIfTI sidecar and the report.
DESCRIPTION = (
    "RoIs back-projected to the input: for each RoI, each input voxel's first-order share "
    "of the variance over the training subjects of the RoI's loading (Cov(gradient x input "
    "deviation, loading), negative shares set to zero); one volume per RoI"
)

#: Columns that :func:`write_backprojection` adds to ``rois.tsv``.
BACKPROJECTION_SIDECAR = {
    "input_region": {"Description": "atlas region holding most of the RoI back-projected to the "
                     "input (thresholded as the RoI), i.e. where the RoI's loading comes from"},
    "input_overlap": {"Description": "largest atlas regions and their share of the thresholded "
                      "back-projected RoI"},
    "agreement": {"Description": "spatial correlation (within the brain mask) of the RoI with its "
                  "back-projection: low when the input that drives the loading lies elsewhere"},
}


def loading_functional(U2, D, U3) -> np.ndarray:
    """``K`` ``(R1, c, v)``: the least-squares loading of each component as a linear map.

    ``s = K · T`` (summed over channels and voxels) is the coefficient vector of the
    least-squares fit of a tensor slice ``T`` ``(c, v)`` by the components
    ``W_r ⊗ U3_r`` (``W = U2 Dᵀ``), i.e. the loadings without the non-negativity.
    """
    U2, D, U3 = (np.asarray(a, dtype=np.float64) for a in (U2, D, U3))
    if U2.ndim != 2 or U3.ndim != 2 or D.shape != (U3.shape[1], U2.shape[1]):
        raise DataError(f"U2 {U2.shape}, D {D.shape} and U3 {U3.shape} do not form a decomposition")
    W = U2 @ D.T
    P = np.linalg.pinv((W.T @ W) * (U3.T @ U3))
    return np.einsum("rq,bq,vq->rbv", P, W, U3, optimize=True).astype(np.float32)


@dataclass
class BackProjection:
    """The maps ``(R, *grid)`` (float64, >= 0) and the training loadings ``(n, R)``.

    With ``diagnostics=True``, ``extra`` holds two other maps for comparison:
    ``gradient`` (mean |g|: where the loading looks) and ``contribution`` (mean |c|).
    """

    maps: np.ndarray
    scores: np.ndarray
    extra: dict | None = None


def back_project(model, x, layer, U2, D, U3, *, tensor: str = "deviations", centre=None,
                 scale=None, weight=None, batch_size: int = 8, device="cpu",
                 progress: bool = False, signed: bool = False,
                 diagnostics: bool = False, dtype=None) -> BackProjection:
    """Back-project each component's loading to the input grid (see the module's notes).

    Parameters
    ----------
    model : torch.nn.Module
        The network (a :class:`~brainage_xai.model.network.PreActResNet3d` or an ensemble).
    x : torch.Tensor, shape (n, 1, *grid)
        The training subjects' standardised inputs.
    layer : str
        The decomposed layer.
    U2, D, U3 : array-like
        The final decomposition's channel factor, diagonal faces and spatial factor.
    tensor : {"activations", "deviations", "relevance"}
        What was decomposed; the deviations need ``centre`` ``(c, v)`` and ``scale``
        ``(c,)``, the relevance tensor also ``weight`` ``(c, v)``
        (:mod:`brainage_xai.selection.tensor`).
    diagnostics : bool
        Also return the mean absolute gradient and contribution maps (``extra``).
    signed : bool
        Keep the negative shares (the maps then sum over voxels to the loading's variance
        to first order, exactly when the layer is linear in the input).
    dtype : torch.dtype, optional
        Autocast precision of the network's forward and backward passes (e.g.
        ``torch.bfloat16``, what training uses on CPUs with AMX and on GPUs); the layer's
        activations, the loadings and the maps are computed in float32/float64 from there.
        On a CPU with AMX bf16 is 2.8 times faster, and its maps correlate at least 0.998
        with float32's (``benchmarks/bench_backprojection.py --speed``; docs/benchmarks.md).
    """
    import torch
    from tqdm.auto import tqdm

    from ..model.activations import layer_modules
    from ..model.network import model_mode
    from ..model.training import place

    if tensor not in ("activations", "deviations", "relevance"):
        raise DataError(f"unknown tensor {tensor!r}")
    if tensor != "activations" and (centre is None or scale is None):
        raise DataError(f"the {tensor} tensor needs the training centre and scale")
    if tensor == "relevance" and weight is None:
        raise DataError("the relevance tensor needs its weight")
    if x.shape[0] < 2:
        raise DataError("back-projection needs at least two training subjects")
    device = torch.device(device)
    K = torch.from_numpy(loading_functional(U2, D, U3))
    if tensor != "activations":
        c = np.asarray(centre).shape[0]
        factor = np.ones((c, K.shape[2]), np.float32) if weight is None else np.asarray(weight, np.float32)
        factor = factor / np.asarray(scale, np.float32).reshape(-1)[:, None]
        K = K * torch.from_numpy(np.concatenate([factor, factor]))[None]
        centre_t = torch.from_numpy(np.asarray(centre, np.float32)).to(device)
    K = K.to(device)
    R = K.shape[0]
    modules = layer_modules(model, layer)
    store: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, k=k: store.__setitem__(k, o))
             for k, m in enumerate(modules)]
    grid = tuple(x.shape[2:])
    xbar = x.mean(0, dtype=torch.float64)[0].numpy()
    keys = ("c", "cs") + (("gradient", "contribution") if diagnostics else ())
    acc = {k: np.zeros((R,) + grid) for k in keys}
    scores = np.zeros((x.shape[0], R))
    try:
        with model_mode(model):
            fmt = place(model, device, dtype)
            for start in tqdm(range(0, x.shape[0], batch_size), desc="back-projection",
                              unit="batch", disable=not progress):
                xb = x[start:start + batch_size].to(device).float().contiguous(memory_format=fmt).requires_grad_(True)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    model(xb)
                a = torch.cat([store[k] for k in range(len(modules))], 1).flatten(2).float()
                if tensor != "activations":
                    a = torch.cat([torch.relu(a - centre_t), torch.relu(centre_t - a)], 1)
                if a.shape[1:] != K.shape[1:]:
                    raise DataError(f"the layer gives {tuple(a.shape[1:])}, the decomposition "
                                    f"{tuple(K.shape[1:])}: not the same network, layer or tensor")
                s = torch.einsum("nbv,rbv->nr", a, K)
                s_np = s.detach().double().cpu().numpy()
                scores[start:start + len(xb)] = s_np
                dx = xb.detach()[:, 0].double().cpu().numpy() - xbar
                for r in range(R):
                    g, = torch.autograd.grad(s[:, r].sum(), xb, retain_graph=r < R - 1)
                    g = g[:, 0].double().cpu().numpy()
                    contrib = g * dx
                    if diagnostics:
                        acc["gradient"][r] += np.abs(g).sum(0)
                        acc["contribution"][r] += np.abs(contrib).sum(0)
                    acc["c"][r] += contrib.sum(0)
                    acc["cs"][r] += np.tensordot(s_np[:, r], contrib, axes=1)
    finally:
        for h in hooks:
            h.remove()
    n = x.shape[0]
    cov = acc["cs"] / n - (acc["c"] / n) * scores.mean(0)[:, None, None, None]
    extra = {k: acc[k] / n for k in ("gradient", "contribution")} if diagnostics else None
    return BackProjection(cov if signed else np.clip(cov, 0.0, None), scores, extra)


def backprojection_image(maps, template_img, mask=None):
    """The maps ``(R, *grid)`` as a 4D image on the template grid (zero outside ``mask``)."""
    import nibabel as nib

    maps = np.asarray(maps, dtype=np.float32)
    if mask is not None:
        maps = maps * np.asarray(mask, dtype=bool)[None]
    img = nib.Nifti1Image(np.moveaxis(maps, 0, -1), template_img.affine)
    img.header.set_xyzt_units("mm")
    return img


def backprojection_table(img, rois_img, *, mask=None, atlas_img=None, atlas_labels=None, atlases=None):
    """Per RoI: where its loading comes from in the input, and how far that is the RoI.

    The regions are those of ``atlas_img`` (named by ``atlas_labels``), or, with ``atlases``,
    named as :func:`brainage_xai.explain.rois.name_rois` names the RoIs.

    Returns
    -------
    pandas.DataFrame
        ``name``, ``input_region`` and ``input_overlap`` (the atlas regions of the
        thresholded back-projected map, as ``rois.tsv`` gives for the RoI) and
        ``agreement`` (the spatial correlation of the map with its RoI).
    """
    import pandas as pd

    from ..bids.derivatives import roi_names
    from ..imaging.geometry import spatial_correlation
    from .rois import atlas_overlap, name_rois

    maps = np.moveaxis(np.asarray(img.dataobj, dtype=float), -1, 0)
    overlap = name_rois(img, atlases) if atlases else atlas_overlap(img, atlas_img, atlas_labels)
    rois = np.asarray(rois_img.dataobj, dtype=float)
    return pd.DataFrame({
        "name": roi_names(maps.shape[0]),
        "input_region": overlap["region"].to_numpy(),
        "input_overlap": overlap["overlap"].to_numpy(),
        "agreement": [spatial_correlation(rois[..., r], maps[r], mask) for r in range(maps.shape[0])],
    })
