"""Back-projection of each RoI's loading to the input (brainage_xai.explain.backprojection)."""

import nibabel as nib
import numpy as np
import pytest
import torch
from _tiny import mni_affine
from torch import nn

from brainage_xai.errors import DataError
from brainage_xai.explain.backprojection import (
    back_project,
    backprojection_image,
    backprojection_table,
    loading_functional,
)
from brainage_xai.model.network import PreActResNet3d
from brainage_xai.selection import channel_scale, deviation_tensor, relevance_weight


class LinearLayerNet(nn.Module):
    """A convolution (linear in the input) as the decomposed layer, GAP and a head."""

    def __init__(self, weight=None, channels=2):
        super().__init__()
        self.conv = nn.Conv3d(1, channels, 3, padding=1, bias=weight is None)
        if weight is not None:
            with torch.no_grad():
                self.conv.weight.copy_(weight)
        self.features = nn.Identity()
        self.head = nn.Linear(channels, 1)

    def activation_module(self, layer):
        return self.features

    def forward(self, x):
        return self.head(self.features(self.conv(x)).mean(dim=(2, 3, 4)))


def _factors(rng, c, v, r, r2=None):
    r2 = r2 or r
    return rng.random((c, r2)) + 0.1, rng.random((r, r2)) + 0.1, rng.random((v, r)) + 0.1


def test_loading_functional_is_the_least_squares_loading(rng):
    c, v, r = 5, 40, 3
    U2, D, U3 = _factors(rng, c, v, r, r2=2)
    W = U2 @ D.T
    M = np.stack([np.outer(W[:, q], U3[:, q]).ravel() for q in range(r)], axis=1)
    T = rng.normal(size=(4, c, v))
    want = np.linalg.lstsq(M, T.reshape(4, -1).T, rcond=None)[0].T
    K = loading_functional(U2, D, U3)
    assert K.shape == (r, c, v)
    np.testing.assert_allclose(np.einsum("nbv,rbv->nr", T, K), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(DataError, match="do not form a decomposition"):
        loading_functional(U2, D[:, :1], U3)


def test_signed_shares_sum_to_the_loadings_variance_for_a_linear_layer(rng):
    # With a layer linear in the input the first-order contributions are exact: summed
    # over voxels they are s - s(mean input), so the shares sum to Var(s).
    torch.manual_seed(0)
    net = LinearLayerNet().eval()
    grid = (6, 7, 5)
    v = int(np.prod(grid))
    x = torch.from_numpy(rng.normal(size=(9, 1, *grid)).astype(np.float32))
    U2, D, U3 = _factors(rng, 2, v, 3)
    bp = back_project(net, x, "features", U2, D, U3, tensor="activations", batch_size=4, signed=True)
    assert bp.maps.shape == (3, *grid) and bp.scores.shape == (9, 3)
    with torch.no_grad():
        A = net.conv(x).flatten(2).double().numpy()
    np.testing.assert_allclose(bp.scores, np.einsum("nbv,rbv->nr", A, loading_functional(U2, D, U3)),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bp.maps.reshape(3, -1).sum(axis=1), bp.scores.var(axis=0), rtol=1e-3)
    clipped = back_project(net, x, "features", U2, D, U3, tensor="activations", batch_size=5)
    np.testing.assert_allclose(clipped.maps, np.clip(bp.maps, 0, None), rtol=1e-6, atol=1e-9)


def test_the_map_lies_where_the_input_varies_not_where_the_rois_voxel_is(rng):
    # A 3x3x3 box filter: the RoI is one feature voxel at x = 4; its receptive field
    # covers x = 3..5. Subjects differ only in a block at x = 2..3, so the loading
    # comes from the block's voxels inside the receptive field (x = 3), none from x = 4.
    net = LinearLayerNet(torch.full((1, 1, 3, 3, 3), 1 / 27), channels=1).eval()
    grid = (9, 9, 9)
    x = np.zeros((12, 1, *grid), np.float32)
    x[:, 0, 2:4, 3:6, 3:6] = rng.normal(size=(12, 2, 3, 3))
    U3 = np.zeros((int(np.prod(grid)), 1))
    U3[np.ravel_multi_index((4, 4, 4), grid), 0] = 1.0
    bp = back_project(net, torch.from_numpy(x), "features", np.ones((1, 1)), np.ones((1, 1)), U3,
                      tensor="activations")
    m = bp.maps[0]
    assert m[3, 3:6, 3:6].min() > 0
    assert m.sum() == pytest.approx(m[3, 3:6, 3:6].sum())
    assert m[4, 4, 4] == 0


@pytest.mark.parametrize("tensor", ["deviations", "relevance"])
def test_scores_follow_the_selections_tensor(rng, tensor):
    # The loadings that are back-projected are those of the tensor the selection builds
    # (deviation_tensor: positive then negative parts, per-channel scale, relevance weight).
    from brainage_xai.model.activations import gradient_rms, iter_activations

    torch.manual_seed(1)
    net = PreActResNet3d(widths=(3, 4), depths=(1, 1)).eval()
    x = torch.from_numpy(rng.normal(size=(6, 1, 8, 8, 8)).astype(np.float32))
    A = np.concatenate(list(iter_activations(net, x, "block1")))
    A = A.reshape(A.shape[0], A.shape[1], -1)
    centre, scale = A.mean(axis=0), channel_scale(A)
    weight = None
    if tensor == "relevance":
        g = gradient_rms(net, x, "block1")
        weight = relevance_weight(g.reshape(g.shape[0], -1), scale)
    T = deviation_tensor(A, centre, scale, weight)
    U2, D, U3 = _factors(rng, T.shape[1], T.shape[2], 2)
    bp = back_project(net, x, "block1", U2, D, U3, tensor=tensor, centre=centre, scale=scale,
                      weight=weight, batch_size=4)
    np.testing.assert_allclose(bp.scores, np.einsum("nbv,rbv->nr", T, loading_functional(U2, D, U3)),
                               rtol=1e-3, atol=1e-3)
    assert np.all(bp.maps >= 0) and np.all(np.isfinite(bp.maps)) and bp.maps.max() > 0


def test_bfloat16_gives_the_float32_maps(rng):
    # The group level back-projects in the training's precision (bf16 on CPUs with AMX and
    # on GPUs); the deviations, loadings and maps stay in float32/float64 from the layer on.
    torch.manual_seed(2)
    net = PreActResNet3d(widths=(4, 6), depths=(1, 1)).eval()
    x = torch.from_numpy(rng.normal(size=(10, 1, 10, 10, 10)).astype(np.float32))
    from brainage_xai.model.activations import iter_activations

    A = np.concatenate(list(iter_activations(net, x, "block1")))
    A = A.reshape(A.shape[0], A.shape[1], -1)
    parts = {"centre": A.mean(axis=0), "scale": channel_scale(A)}
    U2, D, U3 = _factors(rng, 2 * A.shape[1], A.shape[2], 3)
    fp32 = back_project(net, x, "block1", U2, D, U3, tensor="deviations", **parts, batch_size=4)
    bf16 = back_project(net, x, "block1", U2, D, U3, tensor="deviations", **parts, batch_size=4,
                        dtype=torch.bfloat16)
    assert bf16.maps.dtype == np.float64 and bf16.maps.shape == fp32.maps.shape
    for a, b in zip(fp32.scores.T, bf16.scores.T):
        assert np.corrcoef(a, b)[0, 1] > 0.99
    for a, b in zip(fp32.maps, bf16.maps):
        assert a.max() > 0 and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_missing_parts_and_another_layer_are_clear_errors(rng):
    net = LinearLayerNet().eval()
    x = torch.zeros((3, 1, 4, 4, 4))
    U2, D, U3 = _factors(rng, 4, 64, 2)
    with pytest.raises(DataError, match="needs the training centre and scale"):
        back_project(net, x, "features", U2, D, U3, tensor="deviations")
    with pytest.raises(DataError, match="needs its weight"):
        back_project(net, x, "features", U2, D, U3, tensor="relevance", centre=np.zeros((2, 64)),
                     scale=np.ones(2))
    with pytest.raises(DataError, match="not the same network, layer or tensor"):
        back_project(net, x, "features", U2, D, U3, tensor="activations")  # 4 channels vs 2


def test_backprojection_image_and_table_on_the_template_grid(rng):
    affine = mni_affine(4.0)
    maps = rng.random((2, 5, 6, 4))
    rois = nib.Nifti1Image(np.moveaxis(maps, 0, -1).astype(np.float32), affine)
    mask = np.ones((5, 6, 4), bool)
    mask[0] = False
    template = nib.Nifti1Image(np.zeros((5, 6, 4), np.float32), affine)
    back = backprojection_image(maps, template, mask)
    table = backprojection_table(back, rois, mask=mask)
    np.testing.assert_allclose(back.affine, affine)
    assert back.shape == (5, 6, 4, 2) and np.all(back.get_fdata()[0] == 0)
    assert list(table["name"]) == ["RoI 1", "RoI 2"]
    assert set(table.columns) >= {"input_region", "input_overlap", "agreement"}
    # here the RoIs are the maps themselves: full agreement within the mask
    np.testing.assert_allclose(table["agreement"], 1.0, atol=1e-6)
