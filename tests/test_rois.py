"""RoI maps: the columns of U3 on the template grid, the combined map, atlas naming, and
the loadings against age."""

import nibabel as nib
import numpy as np
import pytest
from _tiny import mni_affine

from brainage_xai.errors import DataError
from brainage_xai.explain import rois
from brainage_xai.imaging.geometry import FeatureGeometry

SHAPE = (21, 23, 19)


def test_roi_components_dseg_and_atlas_on_template_grid(rng):
    geo = FeatureGeometry(SHAPE, (6, 6, 5), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
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
    comps = rois.roi_components(u3, geo, template)
    assert comps.shape == (*SHAPE, 2)
    np.testing.assert_allclose(comps.affine, affine)
    dseg, dseg_table = rois.combined_dseg(comps)
    np.testing.assert_allclose(dseg.affine, affine)
    labels = np.asarray(dseg.dataobj)
    assert set(np.unique(labels)) == {0, 1, 2}
    # each RoI's peak voxel carries its own label, regardless of column scale
    for r in range(2):
        peak = np.unravel_index(np.argmax(comps.get_fdata()[..., r]), SHAPE)
        assert labels[peak] == r + 1
    table = rois.atlas_overlap(comps, atlas_img, {1: "left <hemisphere>", 2: "right"})
    assert list(table["name"]) == ["RoI 1", "RoI 2"]
    assert list(table["region"]) == ["left <hemisphere>", "right"]
    assert table.loc[0, "overlap"].startswith("left <hemisphere> 100%")
    assert list(dseg_table.columns[:2]) == ["index", "name"]
    assert list(dseg_table["name"]) == ["RoI 1", "RoI 2"]


def test_a_bilateral_roi_is_named_by_both_sides_of_its_structure():
    """On the package's lobe atlas: an RoI on both temporal lobes (its peak on the right,
    slightly more of it on the left) is "temporal lobe, both sides"; one on the right
    temporal lobe only keeps its hemisphere."""
    from brainage_xai.imaging.atlas import load_atlas

    atlas_img, table = load_atlas(6)
    atlas = np.asarray(atlas_img.dataobj)
    labels = dict(zip(table["index"], table["name"]))
    index = {name: i for i, name in labels.items()}
    both = (atlas == index["left temporal lobe"]) | (atlas == index["right temporal lobe"])
    data = np.zeros((*atlas.shape, 2), np.float32)
    data[..., 0] = both * 0.9
    right = np.argwhere(atlas == index["right temporal lobe"])[0]
    data[tuple(right) + (0,)] = 1.0  # the peak on the right
    data[..., 1] = atlas == index["right temporal lobe"]
    comps = nib.Nifti1Image(data, atlas_img.affine)
    table = rois.atlas_overlap(comps, atlas_img, labels)
    assert table.loc[0, "region"] == "temporal lobe, both sides"
    assert table.loc[0, "peak_x"] > 0
    assert table.loc[1, "region"] == "right temporal lobe"
    assert table.loc[1, "overlap"] == "right temporal lobe 100%"


def test_wrong_u3_shape_is_reported():
    geo = FeatureGeometry(SHAPE, (6, 6, 5), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    with pytest.raises(DataError, match=r"expected \(180, R\)"):
        rois.columns_to_feature_maps(np.ones((100, 3)), geo.feature_shape)


# --- loadings against age -------------------------------------------------------------

from brainage_xai.explain import loadings as ld  # noqa: E402
from brainage_xai.report.figures import plot_loadings  # noqa: E402


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
    curves = ld.trajectory_curves(table, age, ["RoI 1", "RoI 2"])
    assert curves["RoI 1"]["relation"] == "linear" and curves["grid"].shape == (200,)
    fig = plot_loadings(table, age, curves, split)
    assert len([a for a in fig.axes if a.get_visible()]) == 2
    assert len(fig.axes[0].collections) == 3  # one scatter per split


def test_fit_trajectory_needs_enough_subjects():
    with pytest.raises(DataError, match="at least 10 subjects"):
        ld.fit_trajectory([1, 2, 3], [1, 2, 3])


# --- the project's network and the one entry point -------------------------------------




def test_templateflow_hospa_names_rois_and_both_sides(tmp_path, monkeypatch):
    """With TemplateFlow's Harvard-Oxford subcortical atlas on disk, RoIs are named by its
    labels, and the bilateral rule reads its names: an RoI on both thalami is "thalamus, both
    sides", one on the right thalamus only "right thalamus"."""
    from _templateflow import write_hospa

    from brainage_xai.imaging.atlas import naming_atlas
    from brainage_xai.imaging.templates import model_grid

    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(write_hospa(tmp_path / "tf")))
    shape, affine = model_grid(4, "nilearn")
    atlas = naming_atlas(nib.Nifti1Image(np.zeros(shape, np.float32), affine))
    assert atlas.name == "HOSPA"
    labels = np.asarray(atlas.img.dataobj)
    data = np.zeros((*shape, 2), np.float32)
    data[..., 0] = np.isin(labels, (4, 15)) * 0.9
    data[tuple(np.argwhere(labels == 15)[0]) + (0,)] = 1.0  # peak on the right
    data[..., 1] = labels == 15
    table = rois.atlas_overlap(nib.Nifti1Image(data, affine), atlas.img, atlas.labels)
    assert table.loc[0, "region"] == "thalamus, both sides"
    assert table.loc[1, "region"] == "right thalamus"
    assert table.loc[1, "overlap"] == "right thalamus 100%"


def test_rois_are_named_by_the_finest_atlas_that_names_them(tmp_path, monkeypatch):
    """HOSPA then the lobe atlas: an RoI on the thalami is HOSPA's, an RoI in the left frontal
    lobe (HOSPA's "left cerebral cortex") the lobe atlas's, and rois.tsv says which."""
    from _templateflow import write_hospa

    from brainage_xai.imaging.atlas import load_atlas, naming_atlases
    from brainage_xai.imaging.templates import model_grid

    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(write_hospa(tmp_path / "tf")))
    shape, affine = model_grid(4, "nilearn")
    atlases = naming_atlases(nib.Nifti1Image(np.zeros(shape, np.float32), affine))
    assert [a.name for a in atlases] == ["HOSPA", "Lobes"]
    hospa = np.asarray(atlases[0].img.dataobj)
    lobes_img, lobes_table = load_atlas(4)
    frontal_left = int(lobes_table.loc[lobes_table["name"] == "left frontal lobe", "index"].iloc[0])
    data = np.zeros((*shape, 2), np.float32)
    data[..., 0] = np.isin(hospa, (4, 15))
    data[..., 1] = (np.asarray(atlases[1].img.dataobj) == frontal_left) & (hospa == 2)
    table = rois.name_rois(nib.Nifti1Image(data, affine), atlases)
    assert list(table["atlas"]) == ["HOSPA", "Lobes"]
    assert list(table["region"]) == ["thalamus, both sides", "left frontal lobe"]
    assert table.loc[1, "overlap"] == "left frontal lobe 100%" and table.loc[1, "fraction_in_atlas"] == 1.0
    assert list(table.columns).index("atlas") == list(table.columns).index("fraction_in_atlas") + 1
    # without TemplateFlow's atlas the lobe atlas names both
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "none"))
    alone = rois.name_rois(nib.Nifti1Image(data, affine), naming_atlases(4))
    assert list(alone["atlas"]) == ["Lobes", "Lobes"] and alone.loc[1, "region"] == "left frontal lobe"
