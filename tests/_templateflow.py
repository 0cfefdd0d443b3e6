"""Tiny real TemplateFlow homes for the tests: real NIfTI files under TemplateFlow's own
names, on TemplateFlow's own res-02 grid, and the label table TemplateFlow ships."""

import importlib.util
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

TEMPLATE = "MNI152NLin2009cAsym"
#: TemplateFlow's res-02 grid of tpl-MNI152NLin2009cAsym, as its images carry it.
TF_AFFINE = np.array([[2.0, 0, 0, -96], [0, 2, 0, -132], [0, 0, 2, -78], [0, 0, 0, 1]])
TF_SHAPE = (97, 115, 97)
HOSPA_IMAGE = f"tpl-{TEMPLATE}_res-02_atlas-HOSPA_desc-th25_dseg.nii.gz"
HOSPA_TABLE = "tpl-MNI152NLin6Asym_atlas-HOSPA_dseg.tsv"


def templateflow_skeleton(member: str) -> bytes:
    """A file of the TemplateFlow index bundled with its client (read without importing
    the client, which would set up a TemplateFlow home)."""
    package = Path(importlib.util.find_spec("templateflow").submodule_search_locations[0])
    with zipfile.ZipFile(package / "conf" / "templateflow-skel.zip") as skeleton:
        return skeleton.read(member)


def _on_templateflow_grid(img, interpolation="nearest"):
    from nilearn.image import resample_img

    img = nib.Nifti1Image(np.asarray(img.get_fdata(), dtype=np.float32), img.affine)
    return resample_img(img, target_affine=TF_AFFINE, target_shape=TF_SHAPE,
                        interpolation=interpolation, force_resample=True, copy_header=True)


def write_template(home: Path, entities=("T1w", "desc-brain_mask", "label-GM_probseg")) -> Path:
    """The template's res-02 files: nilearn's MNI152 images on TemplateFlow's grid."""
    from nilearn import datasets

    folder = home / f"tpl-{TEMPLATE}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "template_description.json").write_bytes(
        templateflow_skeleton(f"tpl-{TEMPLATE}/template_description.json"))
    sources = {"T1w": datasets.load_mni152_template, "desc-brain_mask": datasets.load_mni152_brain_mask,
               "label-GM_probseg": datasets.load_mni152_gm_template}
    for entity in entities:
        nib.save(_on_templateflow_grid(sources[entity](resolution=2)),
                 folder / f"tpl-{TEMPLATE}_res-02_{entity}.nii.gz")
    return home


def write_hospa(home: Path, table: bool = True) -> Path:
    """A Harvard-Oxford subcortical label image under TemplateFlow's name, with TemplateFlow's
    own label table (from tpl-MNI152NLin6Asym, where TemplateFlow keeps it).

    The labels are drawn from the package's lobar atlas on TemplateFlow's grid: its deep grey
    matter is the thalamus of its side (4 left, 15 right), its brainstem the brainstem (8),
    the rest of each hemisphere its cerebral cortex (2 left, 13 right).
    """
    from brainage_xai.imaging.atlas import STRUCTURES, load_atlas

    keys = [key for key, _ in STRUCTURES]
    lobes = np.asarray(load_atlas(nib.Nifti1Image(np.zeros(TF_SHAPE, np.uint8), TF_AFFINE))[0].dataobj)
    labels = np.where(lobes % 2 == 1, 2, 13) * (lobes > 0)
    deep = 2 * keys.index("deepgrey") + 1
    labels[lobes == deep], labels[lobes == deep + 1] = 4, 15
    stem = 2 * keys.index("brainstem") + 1
    labels[(lobes == stem) | (lobes == stem + 1)] = 8
    folder = home / f"tpl-{TEMPLATE}"
    folder.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(labels.astype(np.uint8), TF_AFFINE)
    img.header.set_xyzt_units("mm")
    nib.save(img, folder / HOSPA_IMAGE)
    if table:
        other = home / "tpl-MNI152NLin6Asym"
        other.mkdir(parents=True, exist_ok=True)
        (other / HOSPA_TABLE).write_bytes(templateflow_skeleton(f"tpl-MNI152NLin6Asym/{HOSPA_TABLE}"))
    return home
