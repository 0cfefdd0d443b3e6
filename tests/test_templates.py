"""Template lookup and the model grid: offline, TemplateFlow only when really on disk."""

import nibabel as nib
import numpy as np
import pytest

from brainage_xai.errors import UsageError
from brainage_xai.imaging.templates import TEMPLATE_NAME, get_template, model_grid


def test_model_grid_2mm_is_nilearns_grid():
    shape, affine = model_grid(2)
    assert shape == (99, 117, 95)
    np.testing.assert_allclose(affine[:3, 3], [-98, -134, -72])
    np.testing.assert_allclose(np.diag(affine)[:3], [2, 2, 2])


@pytest.mark.parametrize("resolution, shape", [(1, (197, 233, 189)), (3, (66, 78, 63)), (4, (50, 59, 48))])
def test_model_grid_other_resolutions_keep_the_bounding_box(resolution, shape):
    got, affine = model_grid(resolution)
    assert got == shape
    np.testing.assert_allclose(affine[:3, 3], [-98, -134, -72])
    last = affine @ np.array([*(np.array(got) - 1), 1])
    # The far corner stays inside the 2 mm grid's box (x 98, y 98, z 116).
    assert np.all(last[:3] <= [98, 98, 116]) and np.all(last[:3] > [98 - resolution, 98 - resolution, 116 - resolution])


@pytest.mark.parametrize("bad", [0, -2, 40, "two"])
def test_model_grid_rejects_bad_resolution(bad):
    with pytest.raises(UsageError, match="resolution"):
        model_grid(bad)


def test_offline_fallback_is_nilearns_template(tmp_path, monkeypatch):
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "empty"))
    tpl = get_template(4)
    assert tpl.source == "nilearn" and tpl.name == TEMPLATE_NAME
    shape, affine = model_grid(4)
    for img in (tpl.t1, tpl.mask, tpl.gm):
        assert img.shape == shape
        np.testing.assert_allclose(img.affine, affine)
    mask = np.asarray(tpl.mask.dataobj)
    assert set(np.unique(mask)) == {0, 1}
    gm = np.asarray(tpl.gm.dataobj)
    assert gm.min() >= 0 and gm.max() <= 1
    # Brain volume in mm^3 is the same at 4 mm as in nilearn's 2 mm mask (within 3 %).
    from nilearn.datasets import load_mni152_brain_mask

    ref = load_mni152_brain_mask(resolution=2).get_fdata().sum() * 8
    assert abs(mask.sum() * 64 - ref) / ref < 0.03
    # GM lies inside the brain mask.
    assert gm[mask == 0].sum() < 0.1 * gm.sum()


def test_templateflow_placeholders_are_not_used(tmp_path, monkeypatch):
    folder = tmp_path / "tf" / f"tpl-{TEMPLATE_NAME}"
    folder.mkdir(parents=True)
    for suffix in ("T1w", "desc-brain_mask", "label-GM_probseg"):
        (folder / f"tpl-{TEMPLATE_NAME}_res-02_{suffix}.nii.gz").touch()  # DataLad placeholder
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "tf"))
    assert get_template(4).source == "nilearn"


def test_templateflow_files_on_disk_are_used(tmp_path, monkeypatch):
    from nilearn import datasets

    folder = tmp_path / "tf" / f"tpl-{TEMPLATE_NAME}"
    folder.mkdir(parents=True)
    # A TemplateFlow-like grid (97 x 115 x 97, origin -96, -132, -78) built from real data.
    affine = np.diag([2.0, 2, 2, 1])
    affine[:3, 3] = [-96, -132, -78]
    from nilearn.image import resample_img

    for suffix, img in (
        ("T1w", datasets.load_mni152_template(resolution=2)),
        ("desc-brain_mask", datasets.load_mni152_brain_mask(resolution=2)),
        ("label-GM_probseg", datasets.load_mni152_gm_template(resolution=2)),
    ):
        img = nib.Nifti1Image(img.get_fdata().astype(np.float32), img.affine)
        out = resample_img(img, target_affine=affine, target_shape=(97, 115, 97),
                           interpolation="nearest", force_resample=True, copy_header=True)
        nib.save(out, folder / f"tpl-{TEMPLATE_NAME}_res-02_{suffix}.nii.gz")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "tf"))
    tpl = get_template(4)
    assert tpl.source == "templateflow"
    assert tpl.shape == model_grid(4)[0]
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "none"))
    fallback = get_template(4)
    # Same images on the same grid, whichever source (here one was made from the other).
    a, b = np.asarray(tpl.mask.dataobj), np.asarray(fallback.mask.dataobj)
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.95
