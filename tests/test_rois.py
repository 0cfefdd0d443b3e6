"""RoI maps: stride geometry, upsampling, combined map, atlas naming, files on disk."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from _tiny import mni_affine, tiny_net
from torch import nn

from brainage_xai import rois
from brainage_xai.errors import DataError

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
    geo = rois.feature_geometry(net, "features", SHAPE)
    assert geo.feature_shape == (6, 6, 5)
    assert geo.stride == (4.0, 4.0, 4.0)
    assert geo.offset == (0.0, 0.0, 0.0)
    j = (2, 2, 2)
    measured = _centroid_of_receptive_field(net, j)
    np.testing.assert_allclose(measured, np.array(geo.stride) * j + geo.offset, atol=1e-6)


def test_feature_geometry_valid_padding_shifts_offset():
    net = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Conv3d(2, 2, 2, stride=2), nn.ReLU())
    geo = rois.feature_geometry(net, "2", (16, 16, 16))
    # 3x3 valid conv: centre +1; 2x2 stride-2 conv: centre +0.5 at stride 1
    assert geo.stride == (2.0, 2.0, 2.0)
    assert geo.offset == (1.5, 1.5, 1.5)


def test_unknown_layer_is_a_clear_error():
    with pytest.raises(DataError, match="not a module"):
        rois.feature_geometry(tiny_net(), "nope", SHAPE)


def test_upsample_places_feature_voxels_on_their_input_voxels():
    geo = rois.FeatureGeometry(SHAPE, (6, 6, 5), (4.0, 4.0, 4.0), (1.0, 0.0, 2.0))
    fmap = np.zeros(geo.feature_shape)
    fmap[2, 3, 1] = 1.0
    up = rois.upsample(fmap, geo)
    assert up.shape == SHAPE
    assert np.unravel_index(np.argmax(up), SHAPE) == (9, 12, 6)
    # trilinear: half way between two feature centres is half the value
    assert up[9, 12, 6] == pytest.approx(1.0)
    assert up[11, 12, 6] == pytest.approx(0.5)
    # beyond the last feature centre the edge value holds
    const = rois.upsample(np.full(geo.feature_shape, 3.0), geo)
    np.testing.assert_allclose(const, 3.0)


def test_downsample_then_upsample_and_resolution_ceiling():
    geo = rois.FeatureGeometry(SHAPE, (6, 6, 5), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    const = np.full(SHAPE, 2.0)
    np.testing.assert_allclose(rois.downsample(const, geo), 2.0)
    big = np.zeros(SHAPE, bool)
    big[2:14, 4:18, 3:15] = True
    small = np.zeros(SHAPE, bool)
    small[9:11, 9:11, 9:11] = True
    ceil_big = rois.resolution_ceiling(big, geo)
    ceil_small = rois.resolution_ceiling(small, geo)
    assert 0.8 < ceil_big <= 1.0
    assert ceil_small < ceil_big


def test_upsampling_operator_is_upsample(rng):
    geo = rois.FeatureGeometry(SHAPE, (6, 6, 5), (4.0, 4.0, 4.0), (1.0, 0.0, 2.0))
    fmap = rng.random(geo.feature_shape)
    op = rois.upsampling_operator(geo)
    np.testing.assert_allclose(op @ fmap.ravel(), rois.upsample(fmap, geo).ravel(), atol=1e-12)
    within = np.zeros(SHAPE, bool)
    within[3:15, 2:20, 4:12] = True
    np.testing.assert_allclose(rois.upsampling_operator(geo, within) @ fmap.ravel(),
                               rois.upsample(fmap, geo)[within], atol=1e-12)


@pytest.mark.parametrize("dense_max", [4000, 10])  # the dense NNLS path; lsq_linear's
def test_resolution_ceiling_is_the_full_nonnegative_fit(rng, monkeypatch, dense_max):
    # The ceiling fits only the feature voxels whose footprint touches the region; the
    # optimum of the fit over every feature voxel, solved here independently, is the same.
    from scipy.optimize import nnls

    monkeypatch.setattr(rois, "_DENSE_CEILING_MAX", dense_max)
    geo = rois.FeatureGeometry(SHAPE, (11, 12, 10), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    within = np.zeros(SHAPE, bool)
    within[1:-1, 2:-1, 1:-2] = True
    op = rois.upsampling_operator(geo, within)
    blob = rois.upsample(rng.random(geo.feature_shape) < 0.01, geo) * rng.random(SHAPE)
    for region in (blob > 0.2, blob):  # a mask, and a graded non-negative target
        coef = nnls(op.toarray(), region[within].astype(float), maxiter=10_000)[0]
        full = rois.spatial_correlation(region[within], op @ coef)
        assert 0.5 < full < 1.0
        touching = np.count_nonzero(op.T @ region[within].astype(float) > 0)
        assert 0 < touching < op.shape[1] / 2  # the restriction leaves out most unknowns
        tol = 1e-6 if dense_max > touching else 1e-3  # lsq_linear stops at its tolerance
        assert rois.resolution_ceiling(region, geo, within) == pytest.approx(full, abs=tol)
    outside = np.zeros(SHAPE, bool)
    outside[0, 0, 0] = True  # the region has no voxel in `within`: nothing reaches it
    assert rois.resolution_ceiling(outside, geo, within) == 0.0


def test_resolution_ceiling_bounds_every_feature_grid_map(rng):
    # what an RoI can reach: no non-negative feature map, upsampled, correlates better
    geo = rois.FeatureGeometry(SHAPE, (6, 6, 5), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    within = np.zeros(SHAPE, bool)
    within[1:20, 1:22, 1:18] = True
    region = np.zeros(SHAPE, bool)
    region[5:12, 7:13, 6:11] = True
    ceiling = rois.resolution_ceiling(region, geo, within)
    footprint = rois.upsample(rois.downsample(region.astype(float), geo), geo)
    assert ceiling >= rois.spatial_correlation(region, footprint, within) + 0.01
    exact = np.zeros(geo.feature_shape)
    exact[1:3, 2:3, 2:3] = 1.0  # a feature-grid region is reached exactly
    assert rois.resolution_ceiling(rois.upsample(exact, geo) > 0.999, geo) < 1.0
    assert rois.resolution_ceiling(rois.upsample(exact, geo), geo) == pytest.approx(1.0, abs=1e-6)
    for _ in range(20):
        fmap = rng.random(geo.feature_shape) * (rng.random(geo.feature_shape) < 0.2)
        corr = rois.spatial_correlation(region, rois.upsample(fmap, geo), within)
        assert corr <= ceiling + 1e-9


def test_roi_components_dseg_and_atlas_on_template_grid(tmp_path, rng):
    geo = rois.FeatureGeometry(SHAPE, (6, 6, 5), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    affine = mni_affine(4.0)
    template = nib.Nifti1Image(rng.random(SHAPE).astype(np.float32), affine)
    u3 = np.zeros((int(np.prod(geo.feature_shape)), 2))
    left = np.zeros(geo.feature_shape)
    left[0:2, 1:5, 1:4] = 1.0
    right = np.zeros(geo.feature_shape)
    right[4:6, 1:5, 1:4] = 2.0  # column scale is arbitrary
    u3[:, 0] = left.ravel()
    u3[:, 1] = right.ravel()
    atlas = np.zeros(SHAPE, np.int16)
    atlas[: SHAPE[0] // 2] = 1
    atlas[SHAPE[0] // 2 :] = 2
    atlas_img = nib.Nifti1Image(atlas, affine)
    out = rois.write_rois(
        tmp_path, u3, geo, template, prefix="space-MNI152NLin2009cAsym_res-4",
        atlas_img=atlas_img, atlas_labels={1: "left <hemisphere>", 2: "right"},
    )
    comps = nib.load(out["components"])
    assert comps.shape == (*SHAPE, 2)
    np.testing.assert_allclose(comps.affine, affine)
    assert out["components"].name == "space-MNI152NLin2009cAsym_res-4_desc-rois_components.nii.gz"
    dseg = nib.load(out["dseg"])
    np.testing.assert_allclose(dseg.affine, affine)
    labels = np.asarray(dseg.dataobj)
    assert set(np.unique(labels)) == {0, 1, 2}
    # each RoI's peak voxel carries its own label, regardless of column scale
    for r in range(2):
        peak = np.unravel_index(np.argmax(comps.get_fdata()[..., r]), SHAPE)
        assert labels[peak] == r + 1
    table = out["rois_table"]
    assert list(table["region"]) == ["left <hemisphere>", "right"]
    assert table.loc[0, "overlap"].startswith("left <hemisphere> 100%")
    assert (tmp_path / "rois.json").exists()
    dseg_tsv = (tmp_path / "space-MNI152NLin2009cAsym_res-4_desc-rois_dseg.tsv").read_text()
    assert dseg_tsv.splitlines()[0].split("\t")[:2] == ["index", "name"]


def test_wrong_u3_shape_is_reported():
    geo = rois.FeatureGeometry(SHAPE, (6, 6, 5), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    with pytest.raises(DataError, match=r"expected \(180, R\)"):
        rois.columns_to_feature_maps(np.ones((100, 3)), geo.feature_shape)


# --- loadings against age -------------------------------------------------------------

from brainage_xai import loadings as ld  # noqa: E402


@pytest.mark.parametrize(
    "shape, expected",
    [
        ("line", "linear"),
        ("hinge", "piecewise-linear"),
        ("wave", "non-linear"),
        ("noise", "none"),
    ],
)
def test_fit_trajectory_names_the_relation(rng, shape, expected):
    age = rng.uniform(8, 80, 240).round()
    noise = rng.normal(0, 0.05, age.size)
    y = {
        "line": 0.02 * age,
        "hinge": np.where(age < 45, 1.0, 1.0 - 0.04 * (age - 45)),
        "wave": np.sin(age / 72 * 3 * np.pi),
        "noise": np.zeros_like(age),
    }[shape] + noise
    fit = ld.fit_trajectory(age, y)
    assert fit["relation"] == expected
    if shape == "hinge":
        assert 38 <= fit["breakpoint"] <= 52
        assert fit["slope_after"] < -0.03 and abs(fit["slope_before"]) < 0.01


@pytest.mark.parametrize("noise_sd", [0.05, 0.4, 2.0])
def test_fit_trajectory_says_how_much_of_the_loading_is_age(rng, noise_sd):
    # a clear shape is not the same as a component made of age: the cross-validated R²
    # is the share of the loadings' variance that age predicts, near its true value
    age = rng.uniform(8, 80, 400).round()
    signal = 0.02 * age
    y = signal + rng.normal(0, noise_sd, age.size)
    share = signal.var() / (signal.var() + noise_sd**2)
    fit = ld.fit_trajectory(age, y)
    assert 0.0 <= fit["cv_r2"] <= 1.0
    assert fit["cv_r2"] == pytest.approx(share, abs=0.08)
    pure_noise = ld.fit_trajectory(age, rng.normal(0, 1, age.size))
    assert pure_noise["cv_r2"] < 0.03


def test_describe_and_plot_loadings(rng):
    import pandas as pd

    age = rng.uniform(10, 70, 90)
    table = pd.DataFrame({"RoI 1": 0.1 * age + rng.normal(0, 0.5, 90),
                          "RoI 2": rng.normal(0, 1, 90)})
    out = ld.describe_loadings(table, age, coefficients=[1.5, -0.2])
    assert list(out["roi"]) == ["RoI 1", "RoI 2"]
    assert out.loc[0, "relation"] == "linear" and "rise linearly" in out.loc[0, "statement"]
    assert out.loc[0, "cv_r2"] > 0.9
    assert f"age explains {out.loc[0, 'cv_r2']:.0%} of the loadings' variance" in out.loc[0, "statement"]
    assert out.loc[1, "relation"] == "none" and out.loc[1, "cv_r2"] < 0.1
    assert out["coefficient"].tolist() == [1.5, -0.2]
    split = np.array(["train"] * 60 + ["validation"] * 15 + ["test"] * 15)
    fig = ld.plot_loadings(table, age, split)
    assert len([a for a in fig.axes if a.get_visible()]) == 2
    assert len(fig.axes[0].collections) == 3  # one scatter per split


def test_fit_trajectory_needs_enough_subjects():
    with pytest.raises(DataError, match="at least 10 subjects"):
        ld.fit_trajectory([1, 2, 3], [1, 2, 3])


# --- the project's network and the one entry point -------------------------------------


def test_geometry_agrees_with_the_resnet_feature_grid():
    from brainage_xai.model.network import PreActResNet3d

    torch.manual_seed(0)
    net = PreActResNet3d(widths=(2, 3, 4), depths=(1, 1, 1)).eval()
    affine = mni_affine(4.0)
    for layer in net.layers:
        geo = rois.feature_geometry(net, net.activation_module(layer), SHAPE)
        assert geo.feature_shape == net.feature_shape(SHAPE, layer)
        np.testing.assert_allclose(geo.feature_affine(affine), net.feature_affine(affine, layer))


def test_write_explanations_writes_every_output(tmp_path, rng):
    import pandas as pd

    from brainage_xai.model.network import PreActResNet3d

    torch.manual_seed(0)
    net = PreActResNet3d(widths=(2, 3, 4), depths=(1, 1, 1)).eval()
    n = 16
    x = rng.random((n, *SHAPE)).astype(np.float32)
    template = nib.Nifti1Image(np.zeros(SHAPE, np.float32), mni_affine(4.0))
    fshape = net.feature_shape(SHAPE, "block2")
    u3 = rng.random((int(np.prod(fshape)), 2)) ** 4
    age = rng.uniform(10, 80, n)
    table = pd.DataFrame({"participant_id": [f"sub-{i}" for i in range(n)],
                          "split": ["train"] * 10 + ["validation"] * 3 + ["test"] * 3,
                          "age": age})
    u1 = np.column_stack([age / 80, rng.random(n)])
    mask = np.zeros(SHAPE, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    out = rois.write_explanations(tmp_path, model=net, layer="block2", u3=u3, u1=u1,
                                  inputs=x, table=table, template_img=template, mask=mask,
                                  prefix="space-MNI152NLin2009cAsym_res-4", scale=10, shift=40)
    for key in ("components", "dseg", "dseg_tsv", "rois_tsv", "loadings", "loading_fits",
                "gradcam", "occlusion", "occlusion_null"):
        assert out["paths"][key].exists(), key
    assert out["geometry"].stride == (2.0, 2.0, 2.0)
    sidecar = json.loads(out["paths"]["components"].with_name(
        "space-MNI152NLin2009cAsym_res-4_desc-rois_components.json").read_text())
    assert sidecar["Layer"] == "block2"
    assert sidecar["FeatureGeometry"]["Stride"] == [2.0, 2.0, 2.0]
    assert nib.load(out["paths"]["gradcam"]).shape == SHAPE
    np.testing.assert_allclose(nib.load(out["paths"]["gradcam"]).affine, template.affine)
    assert list(out["loadings"].columns) == ["participant_id", "split", "age", "RoI 1", "RoI 2"]
    assert len(out["occlusion"][0]) == 2 and len(out["occlusion"][1]) == 40
    assert not (nib.load(out["paths"]["components"]).get_fdata()[~mask] > 0).any()


def test_resolution_ceiling_sparse_fit_agrees_with_dense(monkeypatch):
    # fine feature grids take the sparse bounded least-squares route
    geo = rois.FeatureGeometry(SHAPE, (6, 6, 5), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    region = np.zeros(SHAPE, bool)
    region[5:12, 7:13, 6:11] = True
    dense = rois.resolution_ceiling(region, geo)
    monkeypatch.setattr(rois, "_DENSE_CEILING_MAX", 10)
    assert rois.resolution_ceiling(region, geo) == pytest.approx(dense, abs=1e-3)
