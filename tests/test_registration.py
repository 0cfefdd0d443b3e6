"""The MNI registration check, map loading and intensity normalisation on real maps."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from brainage_xai.errors import DataError
from brainage_xai.imaging.registration import (
    MAX_CENTROID_OFFSET,
    check_registration,
    load_map,
    normalise_intensity,
)
from brainage_xai.imaging.templates import get_template

SPACE = "MNI152NLin2009cAsym"


@pytest.fixture(scope="module")
def template():
    return get_template(4)


def _map(sim_bids, kind="volume", subject="001"):
    suffix = "label-GM_probseg" if kind == "volume" else "desc-stiffness_mremap"
    return (sim_bids / "derivatives" / "simulated" / f"sub-{subject}" / "anat"
            / f"sub-{subject}_space-{SPACE}_res-4_{suffix}.nii.gz")


def _with_affine(img, affine):
    return nib.Nifti1Image(np.asarray(img.dataobj), affine)


@pytest.mark.parametrize("kind", ["volume", "stiffness"])
def test_simulated_maps_pass(sim_bids, template, kind):
    img = load_map(_map(sim_bids, kind))
    check, resampled = check_registration(img, template, declared_space=SPACE, map_name=kind)
    assert check.passed, check.summary()
    assert check.dice > 0.85 and check.correlation > 0.85
    assert check.centroid_offset < 3 and check.coverage == 1.0
    assert check.orientation == "RAS" and check.voxel_size == [4.0, 4.0, 4.0]
    assert resampled.shape == template.shape
    np.testing.assert_allclose(resampled.affine, template.affine)


def test_other_mni_grid_passes_world_coordinates(sim_bids, template):
    """A map resampled to TemplateFlow's 2 mm grid (another origin and shape) still passes."""
    from nilearn.image import resample_img

    affine = np.diag([2.0, 2, 2, 1])
    affine[:3, 3] = [-96, -132, -78]
    img = resample_img(load_map(_map(sim_bids)), target_affine=affine, target_shape=(97, 115, 97),
                       force_resample=True, copy_header=True)
    check, _ = check_registration(img, template, declared_space=SPACE)
    assert check.passed, check.summary()


def test_reoriented_map_passes(sim_bids, template):
    """LAS storage of the same data (flipped array and affine) is the same image in the world."""
    img = load_map(_map(sim_bids))
    affine = img.affine.copy()
    affine[:3, 3] += affine[:3, 0] * (img.shape[0] - 1)
    affine[:3, 0] *= -1
    las = nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), affine)
    check, _ = check_registration(las, template, declared_space=SPACE)
    assert check.orientation == "LAS"
    assert check.passed, check.summary()


@pytest.mark.parametrize("kind", ["volume", "stiffness"])
@pytest.mark.parametrize("axis, shift", [(1, 12.0), (2, -12.0)])
def test_shifted_affine_fails(sim_bids, template, kind, axis, shift):
    img = load_map(_map(sim_bids, kind))
    affine = img.affine.copy()
    affine[axis, 3] += shift
    check, _ = check_registration(_with_affine(img, affine), template, declared_space=SPACE, map_name=kind)
    assert not check.passed
    assert check.centroid_offset > MAX_CENTROID_OFFSET
    assert "centre offset" in "; ".join(check.failures)


@pytest.mark.parametrize("kind", ["volume", "stiffness"])
@pytest.mark.parametrize("axis", [1, 2])
def test_flipped_affine_fails(sim_bids, template, kind, axis):
    """Anterior-posterior or superior-inferior flip of the header (data unchanged)."""
    img = load_map(_map(sim_bids, kind))
    affine = img.affine.copy()
    n = img.shape[axis]
    affine[:3, 3] += affine[:3, axis] * (n - 1)
    affine[:3, axis] *= -1
    check, _ = check_registration(_with_affine(img, affine), template, declared_space=SPACE, map_name=kind)
    assert not check.passed, check.summary()


def test_declared_space(sim_bids, template):
    img = load_map(_map(sim_bids))
    check, _ = check_registration(img, template, declared_space="MNI152NLin6Asym")
    assert not check.passed and "--allow-resample" in check.failures[0]
    check, _ = check_registration(img, template, declared_space="MNI152NLin6Asym", allow_other_mni=True)
    assert check.passed
    for space in ("T1w", None):
        check, _ = check_registration(img, template, declared_space=space, allow_other_mni=True)
        assert not check.passed


def test_summary_and_sidecar_carry_numbers(sim_bids, template):
    check, _ = check_registration(load_map(_map(sim_bids)), template, declared_space=SPACE)
    d = check.to_dict()
    assert d["Passed"] is True and 0 < d["Dice"] <= 1 and d["Thresholds"]["CentroidOffsetMM"] == MAX_CENTROID_OFFSET
    assert f"Dice {check.dice:.2f}" in check.summary()


# --- load_map: unusable files --------------------------------------------------------


def test_load_map_refuses_4d(sim_bids, tmp_path):
    img = load_map(_map(sim_bids))
    data = np.asarray(img.dataobj)
    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data] * 3, axis=-1), img.affine), path)
    with pytest.raises(DataError, match=r"must be a 3D map; it has shape \(50, 59, 48, 3\)"):
        load_map(path)
    # One volume in a 4D file is a 3D map.
    nib.save(nib.Nifti1Image(data[..., None], img.affine), path)
    assert load_map(path).shape == data.shape


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_load_map_refuses_non_finite(sim_bids, tmp_path, value):
    img = load_map(_map(sim_bids))
    data = np.asarray(img.dataobj).copy()
    data[10:12, 20, 20] = value
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), path)
    with pytest.raises(DataError, match="2 NaN or infinite voxel"):
        load_map(path)


def test_load_map_refuses_truncated(sim_bids, tmp_path):
    raw = _map(sim_bids).read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_map(path)
    path.write_bytes(gzip.compress(b"not a nifti file at all"))
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_map(path)


def test_load_map_refuses_empty(sim_bids, tmp_path):
    img = load_map(_map(sim_bids))
    path = tmp_path / "zero.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), path)
    with pytest.raises(DataError, match="all zeros"):
        load_map(path)


# --- normalisation ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["volume", "stiffness"])
def test_normalisation_removes_global_scale(sim_bids, template, kind):
    img = load_map(_map(sim_bids, kind))
    _, resampled = check_registration(img, template, declared_space=SPACE, map_name=kind)
    out, info = normalise_intensity(resampled, template, kind)
    scaled = nib.Nifti1Image(np.asarray(resampled.dataobj) * 2.5, resampled.affine)
    out2, info2 = normalise_intensity(scaled, template, kind)
    np.testing.assert_allclose(np.asarray(out.dataobj), np.asarray(out2.dataobj), rtol=1e-5, atol=1e-6)
    assert info2["Factor"] == pytest.approx(info["Factor"] / 2.5, rel=1e-5)
    data = np.asarray(out.dataobj)
    brain = np.asarray(template.mask.dataobj) > 0
    assert data.min() >= 0
    assert data[brain].mean() == pytest.approx(info["ReferenceMean"], rel=1e-4)
    if kind == "stiffness":
        assert info["ReferenceMean"] == 1.0


def test_site_differences_removed(sim_bids, template):
    """Subjects of different sites have closer brain means after normalisation."""
    from brainage_xai.utils.io import read_tsv

    table = read_tsv(sim_bids / "participants.tsv")
    brain = np.asarray(template.mask.dataobj) > 0
    before, after = {}, {}
    for pid, site in zip(table["participant_id"][:12], table["site"][:12]):
        img = load_map(_map(sim_bids, "stiffness", pid[4:]))
        _, res = check_registration(img, template, declared_space=SPACE, map_name="stiffness")
        out, info = normalise_intensity(res, template, "stiffness")
        before.setdefault(site, []).append(info["OriginalMean"])
        after.setdefault(site, []).append(float(np.asarray(out.dataobj)[brain].mean()))
    means_before = [np.mean(v) for v in before.values()]
    means_after = [np.mean(v) for v in after.values()]
    assert len(means_before) > 1
    spread_before = np.ptp(means_before) / np.mean(means_before)
    spread_after = np.ptp(means_after) / np.mean(means_after)
    assert spread_after < 1e-4 < spread_before
