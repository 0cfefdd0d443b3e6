"""Where feature voxels sit on the input grid, and maps moved between the two grids."""

import numpy as np
import pytest
import torch
from _tiny import mni_affine, tiny_net
from torch import nn

from brainage_xai.errors import DataError
from brainage_xai.imaging import geometry
from brainage_xai.model.activations import feature_geometry

SHAPE = (21, 23, 19)


def _centroid_of_receptive_field(net, j):
    """Receptive-field centre of feature voxel j, measured with all-positive weights."""
    net = tiny_net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.fill_(1.0)
                m.bias.zero_()
    x = torch.ones((1, 1, *SHAPE), requires_grad=True)
    feats = {}
    net.features.register_forward_hook(lambda m, i, o: feats.setdefault("a", o))
    net(x)
    feats["a"][0, :, j[0], j[1], j[2]].sum().backward()
    g = x.grad[0, 0].numpy()
    idx = np.indices(SHAPE)
    return np.array([(idx[a] * g).sum() / g.sum() for a in range(3)])


def test_feature_geometry_matches_receptive_field_centre():
    net = tiny_net()
    geo = feature_geometry(net, "features", SHAPE)
    assert geo.feature_shape == (6, 6, 5)
    assert geo.stride == (4.0, 4.0, 4.0)
    assert geo.offset == (0.0, 0.0, 0.0)
    j = (2, 2, 2)
    measured = _centroid_of_receptive_field(net, j)
    np.testing.assert_allclose(measured, np.array(geo.stride) * j + geo.offset, atol=1e-6)


def test_feature_geometry_valid_padding_shifts_offset():
    net = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Conv3d(2, 2, 2, stride=2), nn.ReLU())
    geo = feature_geometry(net, "2", (16, 16, 16))
    # 3x3 valid conv: centre +1; 2x2 stride-2 conv: centre +0.5 at stride 1
    assert geo.stride == (2.0, 2.0, 2.0)
    assert geo.offset == (1.5, 1.5, 1.5)


def test_unknown_layer_is_a_clear_error():
    with pytest.raises(DataError, match="not a module"):
        feature_geometry(tiny_net(), "nope", SHAPE)


def test_upsample_places_feature_voxels_on_their_input_voxels():
    geo = geometry.FeatureGeometry(SHAPE, (6, 6, 5), (4.0, 4.0, 4.0), (1.0, 0.0, 2.0))
    fmap = np.zeros(geo.feature_shape)
    fmap[2, 3, 1] = 1.0
    up = geometry.upsample(fmap, geo)
    assert up.shape == SHAPE
    assert np.unravel_index(np.argmax(up), SHAPE) == (9, 12, 6)
    # trilinear: half way between two feature centres is half the value
    assert up[9, 12, 6] == pytest.approx(1.0)
    assert up[11, 12, 6] == pytest.approx(0.5)
    # beyond the last feature centre the edge value holds
    const = geometry.upsample(np.full(geo.feature_shape, 3.0), geo)
    np.testing.assert_allclose(const, 3.0)


def test_downsample_then_upsample_and_resolution_ceiling():
    geo = geometry.FeatureGeometry(SHAPE, (6, 6, 5), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    const = np.full(SHAPE, 2.0)
    np.testing.assert_allclose(geometry.downsample(const, geo), 2.0)
    big = np.zeros(SHAPE, bool)
    big[2:14, 4:18, 3:15] = True
    small = np.zeros(SHAPE, bool)
    small[9:11, 9:11, 9:11] = True
    ceil_big = geometry.resolution_ceiling(big, geo)
    ceil_small = geometry.resolution_ceiling(small, geo)
    assert 0.8 < ceil_big <= 1.0
    assert ceil_small < ceil_big


def test_upsampling_operator_is_upsample(rng):
    geo = geometry.FeatureGeometry(SHAPE, (6, 6, 5), (4.0, 4.0, 4.0), (1.0, 0.0, 2.0))
    fmap = rng.random(geo.feature_shape)
    op = geometry.upsampling_operator(geo)
    np.testing.assert_allclose(op @ fmap.ravel(), geometry.upsample(fmap, geo).ravel(), atol=1e-12)
    within = np.zeros(SHAPE, bool)
    within[3:15, 2:20, 4:12] = True
    np.testing.assert_allclose(geometry.upsampling_operator(geo, within) @ fmap.ravel(),
                               geometry.upsample(fmap, geo)[within], atol=1e-12)


@pytest.mark.parametrize("dense_max", [4000, 10])  # the dense NNLS path; lsq_linear's
def test_resolution_ceiling_is_the_full_nonnegative_fit(rng, monkeypatch, dense_max):
    # The ceiling fits only the feature voxels whose footprint touches the region; the
    # optimum of the fit over every feature voxel, solved here independently, is the same.
    from scipy.optimize import nnls

    monkeypatch.setattr(geometry, "_DENSE_CEILING_MAX", dense_max)
    geo = geometry.FeatureGeometry(SHAPE, (11, 12, 10), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    within = np.zeros(SHAPE, bool)
    within[1:-1, 2:-1, 1:-2] = True
    op = geometry.upsampling_operator(geo, within)
    blob = geometry.upsample(rng.random(geo.feature_shape) < 0.01, geo) * rng.random(SHAPE)
    for region in (blob > 0.2, blob):  # a mask, and a graded non-negative target
        coef = nnls(op.toarray(), region[within].astype(float), maxiter=10_000)[0]
        full = geometry.spatial_correlation(region[within], op @ coef)
        assert 0.5 < full < 1.0
        touching = np.count_nonzero(op.T @ region[within].astype(float) > 0)
        assert 0 < touching < op.shape[1] / 2  # the restriction leaves out most unknowns
        tol = 1e-6 if dense_max > touching else 1e-3  # lsq_linear stops at its tolerance
        assert geometry.resolution_ceiling(region, geo, within) == pytest.approx(full, abs=tol)
    outside = np.zeros(SHAPE, bool)
    outside[0, 0, 0] = True  # the region has no voxel in `within`: nothing reaches it
    assert geometry.resolution_ceiling(outside, geo, within) == 0.0


def test_resolution_ceiling_bounds_every_feature_grid_map(rng):
    # what an RoI can reach: no non-negative feature map, upsampled, correlates better
    geo = geometry.FeatureGeometry(SHAPE, (6, 6, 5), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    within = np.zeros(SHAPE, bool)
    within[1:20, 1:22, 1:18] = True
    region = np.zeros(SHAPE, bool)
    region[5:12, 7:13, 6:11] = True
    ceiling = geometry.resolution_ceiling(region, geo, within)
    footprint = geometry.upsample(geometry.downsample(region.astype(float), geo), geo)
    assert ceiling >= geometry.spatial_correlation(region, footprint, within) + 0.01
    exact = np.zeros(geo.feature_shape)
    exact[1:3, 2:3, 2:3] = 1.0  # a feature-grid region is reached exactly
    assert geometry.resolution_ceiling(geometry.upsample(exact, geo) > 0.999, geo) < 1.0
    assert geometry.resolution_ceiling(geometry.upsample(exact, geo), geo) == pytest.approx(1.0, abs=1e-6)
    for _ in range(20):
        fmap = rng.random(geo.feature_shape) * (rng.random(geo.feature_shape) < 0.2)
        corr = geometry.spatial_correlation(region, geometry.upsample(fmap, geo), within)
        assert corr <= ceiling + 1e-9


def test_geometry_agrees_with_the_resnet_feature_grid():
    from brainage_xai.model.network import PreActResNet3d

    torch.manual_seed(0)
    net = PreActResNet3d(widths=(2, 3, 4), depths=(1, 1, 1)).eval()
    affine = mni_affine(4.0)
    for layer in net.layers:
        geo = feature_geometry(net, net.activation_module(layer), SHAPE)
        assert geo.feature_shape == net.feature_shape(SHAPE, layer)
        np.testing.assert_allclose(geo.feature_affine(affine), net.feature_affine(affine, layer))


def test_resolution_ceiling_sparse_fit_agrees_with_dense(monkeypatch):
    # fine feature grids take the sparse bounded least-squares route
    geo = geometry.FeatureGeometry(SHAPE, (6, 6, 5), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    region = np.zeros(SHAPE, bool)
    region[5:12, 7:13, 6:11] = True
    dense = geometry.resolution_ceiling(region, geo)
    monkeypatch.setattr(geometry, "_DENSE_CEILING_MAX", 10)
    assert geometry.resolution_ceiling(region, geo) == pytest.approx(dense, abs=1e-3)
