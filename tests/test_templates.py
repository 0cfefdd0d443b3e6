"""Template lookup and the model grid: offline, TemplateFlow through its client when its
files are really on disk, nilearn's stand-in otherwise, each on its own grid."""

import json
import socket

import nibabel as nib
import numpy as np
import pytest
from _templateflow import TF_AFFINE, TF_SHAPE, templateflow_skeleton
from _templateflow import write_template as write_templateflow_home

from brainage_xai.errors import MissingInputError, UsageError
from brainage_xai.imaging import templates
from brainage_xai.imaging.templates import TEMPLATE_NAME, get_template, grid_description, model_grid


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_templateflow_grid_is_templateflows_own():
    """At 1 and 2 mm the grid is TemplateFlow's res-01 / res-02 grid, and at 3 and 4 mm it has
    the shapes TemplateFlow's template description gives those resolutions."""
    described = json.loads(templateflow_skeleton(f"tpl-{TEMPLATE_NAME}/template_description.json"))["res"]
    for res in (1, 2, 3, 4):
        shape, affine = model_grid(res, "templateflow")
        assert list(shape) == described[f"{res:02d}"]["shape"]
        np.testing.assert_allclose(np.diag(affine)[:3], described[f"{res:02d}"]["zooms"])
        np.testing.assert_allclose(affine[:3, 3], [-96, -132, -78])
    np.testing.assert_allclose(model_grid(2, "templateflow")[1], TF_AFFINE)
    assert model_grid(2, "templateflow")[0] == TF_SHAPE


def test_model_grid_2mm_of_nilearn_is_nilearns_grid():
    shape, affine = model_grid(2, "nilearn")
    assert shape == (99, 117, 95)
    np.testing.assert_allclose(affine[:3, 3], [-98, -134, -72])
    np.testing.assert_allclose(np.diag(affine)[:3], [2, 2, 2])


@pytest.mark.parametrize("resolution, shape", [(1, (197, 233, 189)), (3, (66, 78, 63)), (4, (50, 59, 48))])
def test_model_grid_other_resolutions_keep_the_bounding_box(resolution, shape):
    got, affine = model_grid(resolution, "nilearn")
    assert got == shape
    np.testing.assert_allclose(affine[:3, 3], [-98, -134, -72])
    last = affine @ np.array([*(np.array(got) - 1), 1])
    # The far corner stays inside the 2 mm grid's box (x 98, y 98, z 116).
    assert np.all(last[:3] <= [98, 98, 116]) and np.all(last[:3] > [98 - resolution, 98 - resolution, 116 - resolution])


@pytest.mark.parametrize("bad", [0, -2, 40, "two"])
def test_model_grid_rejects_bad_resolution(bad):
    with pytest.raises(UsageError, match="resolution"):
        model_grid(bad)


def test_model_grid_rejects_unknown_source():
    with pytest.raises(ValueError, match=r"'source' must be one of \['templateflow', 'nilearn'\]"):
        model_grid(2, "fsl")


def test_grid_descriptions_say_whose_grid():
    assert grid_description(2, "templateflow").endswith(f"TemplateFlow's tpl-{TEMPLATE_NAME} res-02 grid")
    nilearn = grid_description(2, "nilearn")
    assert "99x117x95" in nilearn and "not TemplateFlow's 97x115x97 grid" in nilearn


def test_offline_fallback_is_nilearns_template(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "empty"))
    tpl = get_template(4)
    assert tpl.source == "nilearn" and tpl.name == TEMPLATE_NAME
    assert templates.template_source(4) == "nilearn"
    shape, affine = model_grid(4, "nilearn")
    assert model_grid(4)[0] == shape and np.allclose(model_grid(4)[1], affine)
    for img in (tpl.t1, tpl.mask, tpl.gm):
        assert img.shape == shape
        np.testing.assert_allclose(img.affine, affine)
    assert "nilearn's MNI152 grid" in tpl.grid
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
    # nothing was written into the empty home: TemplateFlow's client was never set up
    assert not (tmp_path / "empty").exists()


def test_templateflow_placeholders_are_not_used(tmp_path, monkeypatch):
    folder = tmp_path / "tf" / f"tpl-{TEMPLATE_NAME}"
    folder.mkdir(parents=True)
    for suffix in ("T1w", "desc-brain_mask", "label-GM_probseg"):
        (folder / f"tpl-{TEMPLATE_NAME}_res-02_{suffix}.nii.gz").touch()  # DataLad placeholder
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "tf"))
    assert get_template(4).source == "nilearn"


def test_templateflow_files_are_found_through_templateflows_client(tmp_path, monkeypatch, no_network):
    """Real res-02 files under TemplateFlow's names: TemplateFlow's client selects them, the
    template is on TemplateFlow's res-02 grid (the images as they are), and res-2 is that grid."""
    from templateflow.client import TemplateFlowClient

    asked = []
    real_get = TemplateFlowClient.get

    def spy(self, template, *args, **kwargs):
        asked.append((template, kwargs))
        return real_get(self, template, *args, **kwargs)

    monkeypatch.setattr(TemplateFlowClient, "get", spy)
    home = write_templateflow_home(tmp_path / "tf")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    tpl = get_template(2)
    assert tpl.source == "templateflow"
    assert tpl.shape == TF_SHAPE and np.allclose(tpl.affine, TF_AFFINE)
    assert model_grid(2)[0] == TF_SHAPE and np.allclose(model_grid(2)[1], TF_AFFINE)
    assert tpl.grid.endswith("TemplateFlow's tpl-MNI152NLin2009cAsym res-02 grid")
    assert f"tpl-{TEMPLATE_NAME}_res-02_T1w.nii.gz" in tpl.description
    # the file's own voxels: on its own grid nothing is interpolated
    on_disk = nib.load(home / f"tpl-{TEMPLATE_NAME}" / f"tpl-{TEMPLATE_NAME}_res-02_T1w.nii.gz")
    np.testing.assert_allclose(tpl.t1.get_fdata(), on_disk.get_fdata(), atol=1e-4)
    assert {(t, k.get("suffix"), k.get("resolution")) for t, k in asked} == {
        (TEMPLATE_NAME, "T1w", 2), (TEMPLATE_NAME, "mask", 2), (TEMPLATE_NAME, "probseg", 2)}

    # Coarser grids keep TemplateFlow's box; nilearn's stand-in is on its own grid.
    coarse = get_template(4)
    assert coarse.source == "templateflow" and coarse.shape == (49, 58, 49)
    assert get_template(4, source="nilearn").shape == (50, 59, 48)
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "none"))
    fallback = get_template(4)
    assert fallback.source == "nilearn" and fallback.shape == (50, 59, 48)
    # Same brain, whichever source (here one was made from the other): volumes agree.
    a, b = np.asarray(coarse.mask.dataobj).sum(), np.asarray(fallback.mask.dataobj).sum()
    assert abs(a - b) / b < 0.03


def test_incomplete_templateflow_home_is_a_clear_error(tmp_path, monkeypatch, no_network):
    home = write_templateflow_home(tmp_path / "tf", entities=("T1w", "label-GM_probseg"))
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    with pytest.raises(MissingInputError, match=r"incomplete \(missing res-02_desc-brain_mask"):
        get_template(2)


def test_templateflow_source_is_refused_when_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "none"))
    with pytest.raises(MissingInputError, match="is not in"):
        get_template(4, source="templateflow")


def test_every_file_read_is_a_query_for_the_image():
    """The files the code reads are the ones the image fetches (docker/fetch_templates.py
    takes this list): the template at 1 and 2 mm, the atlas and its labels."""
    queries = templates.templateflow_queries()
    assert len(queries) == 9
    assert (templates.ATLAS_LABELS[0], templates.ATLAS_LABELS[1]) in queries
    for res in templates.TEMPLATEFLOW_RESOLUTIONS:
        for query in (*templates.TEMPLATE_QUERIES.values(), templates.ATLAS_QUERY):
            assert (TEMPLATE_NAME, {"resolution": res, **query}) in queries
