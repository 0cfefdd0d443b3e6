"""The participant level end to end on the simulated cohort (read-only BIDS_DIR)."""

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import nibabel as nib
import numpy as np
import pytest

from brainage_xai.bids.derivatives import (
    collect_preprocessed,
    preproc_path,
    qc_figure_path,
    report_path,
    sidecar_path,
)
from brainage_xai.cli.run import main
from brainage_xai.imaging.templates import get_template, model_grid

ARGS = ["--skip-bids-validation", "--resolution", "4", "--quiet"]


@pytest.fixture(scope="module")
def volume_run(sim_bids, tmp_path_factory):
    out = tmp_path_factory.mktemp("participant") / "out"
    code = main([str(sim_bids), str(out), "participant", "--participant-label", "001", "sub-002", *ARGS])
    return code, out


def test_outputs_of_two_subjects(volume_run, sim_bids):
    code, out = volume_run
    assert code == 0
    shape, affine = model_grid(4)
    assert [s for s, _ in collect_preprocessed(out, "volume")] == ["001", "002"]
    tpl = get_template(4)
    brain = np.asarray(tpl.mask.dataobj) > 0
    for subject in ("001", "002"):
        path = preproc_path(out, subject, "volume", 4)
        assert path.name == f"sub-{subject}_space-MNI152NLin2009cAsym_res-4_label-GM_desc-preproc_probseg.nii.gz"
        img = nib.load(path)
        assert img.shape == shape
        np.testing.assert_allclose(img.affine, affine)
        data = img.get_fdata()
        assert data.min() >= 0 and np.isfinite(data).all()
        meta = json.loads(sidecar_path(path).read_text())
        assert meta["Sources"] == [
            f"bids:raw:derivatives/simulated/sub-{subject}/anat/"
            f"sub-{subject}_space-MNI152NLin2009cAsym_res-4_label-GM_probseg.nii.gz"
        ]
        assert meta["SkullStripped"] is True
        assert "4 mm" in meta["Resolution"] and "50x59x48" in meta["Resolution"]
        norm = meta["IntensityNormalization"]
        assert norm["Factor"] > 0
        assert data[brain].mean() == pytest.approx(norm["ReferenceMean"], rel=1e-3)
        assert meta["RegistrationQC"]["Passed"] is True and meta["RegistrationQC"]["Dice"] > 0.8
        # The normalised map still correlates with the source after resampling.
        src = nib.load(sim_bids / meta["Sources"][0].split(":", 2)[2])
        assert src.get_fdata().mean() * norm["Factor"] == pytest.approx(data.mean(), rel=0.1)

        figure = qc_figure_path(out, subject, "volume", 4)
        root = ET.parse(figure).getroot()
        assert root.tag.endswith("svg")
        html = report_path(out, subject).read_text()
        assert f"sub-{subject}" in html and "registration check" in html.lower()
        assert os.path.relpath(figure, out) in html
        assert f"{meta['RegistrationQC']['Dice']:.3g}" in html
    assert not (out / "sub-003").exists()


def test_dataset_level_files(volume_run, sim_bids):
    _, out = volume_run
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    gen = desc["GeneratedBy"][0]
    assert gen["Name"] == "brainage-xai" and gen["Version"] and gen["CodeURL"].startswith("https://")
    assert "Tucker" in gen["Description"]
    # every input dataset: BIDS_DIR and the derivatives the maps came from (here the
    # default, BIDS_DIR/derivatives/simulated), each resolvable through DatasetLinks
    assert desc["SourceDatasets"] == [{"URL": "bids:raw:"}, {"URL": "bids:simulated:"}]
    assert desc["DatasetLinks"] == {
        "raw": sim_bids.as_uri(),
        "simulated": (sim_bids / "derivatives" / "simulated").as_uri(),
    }
    # the raw cohort is CC0, its simulated maps declare no licence
    assert desc["License"] == "The terms of the source datasets apply (raw: CC0; simulated: no licence declared)"
    assert "logs/CITATION.md" in desc["HowToAcknowledge"]
    ignore = (out / ".bidsignore").read_text().split()
    assert "*.html" in ignore and "logs" in ignore and "sub-*/figures" in ignore
    # the participant level's boilerplate: what it did, with the works it names
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "proportional scaling" in citation and "(group level)" not in citation
    assert "PyBIDS (Yarkoni et al., 2019)" in citation and "MNI152NLin2009cAsym" in citation
    assert "@article{yarkoni2019pybids," in (out / "logs" / "CITATION.bib").read_text()
    assert not (out / "CITATION.md").exists()


def test_output_passes_the_bids_validator(volume_run, bids_validator):
    _, out = volume_run
    proc = subprocess.run([bids_validator, "--format", "json", str(out)], capture_output=True,
                          text=True, timeout=300, check=False)
    issues = json.loads(proc.stdout)["issues"]["issues"]
    errors = [(i["code"], i.get("location")) for i in issues if i["severity"] == "error"]
    assert errors == [] and proc.returncode == 0
    # what is left are hints about the dataset as a whole, none about a file
    assert {i["code"] for i in issues} <= {"README_FILE_MISSING", "TOO_FEW_AUTHORS"}


def test_source_datasets_carry_their_doi_version_and_licence(sim_bids, tmp_path):
    from brainage_xai.bids.derivatives import write_dataset_description

    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "dataset_description.json").write_text(json.dumps({
        "Name": "maps", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "License": "CC0",
        "DatasetDOI": "10.18112/openneuro.ds000001.v1.0.0", "DatasetVersion": "1.0.0",
    }))
    desc = json.loads(write_dataset_description(tmp_path / "out", sim_bids, {"mre": maps}).read_text())
    assert desc["SourceDatasets"][1] == {
        "URL": "bids:mre:", "DOI": "doi:10.18112/openneuro.ds000001.v1.0.0", "Version": "1.0.0",
    }
    assert desc["License"] == "CC0"  # both inputs are CC0
    assert desc["DatasetLinks"]["mre"] == maps.as_uri()


def test_container_in_generated_by(sim_bids, tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINAGE_XAI_CONTAINER", "docker")
    monkeypatch.setenv("DOCKER_IMAGE", "brainage-xai:1.2.3")
    out = tmp_path / "out"
    assert main([str(sim_bids), str(out), "participant", "--participant-label", "005", *ARGS]) == 0
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": "brainage-xai:1.2.3"}


def test_rerun_skips_up_to_date_subjects(volume_run, sim_bids):
    _, out = volume_run
    path = preproc_path(out, "001", "volume", 4)
    before = {p: p.stat().st_mtime_ns for p in (path, sidecar_path(path), report_path(out, "001"))}
    assert main([str(sim_bids), str(out), "participant", "--participant-label", "001", *ARGS]) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    log = sorted((out / "logs").glob("*.log"))[-1].read_text()
    assert "up to date" in log


def test_stiffness_map(sim_bids, tmp_path):
    out = tmp_path / "out"
    code = main([str(sim_bids), str(out), "participant", "--map", "stiffness",
                 "--participant-label", "006", *ARGS])
    assert code == 0
    path = preproc_path(out, "006", "stiffness", 4)
    assert path.name.endswith("_res-4_desc-preproc_mremap.nii.gz")
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["IntensityNormalization"]["ReferenceMean"] == 1.0
    brain = np.asarray(get_template(4).mask.dataobj) > 0
    assert nib.load(path).get_fdata()[brain].mean() == pytest.approx(1.0, rel=1e-3)
    assert collect_preprocessed(out, "volume") == []


def test_explicit_derivatives_and_filter_file(sim_bids, tmp_path):
    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"volume": {"space": "MNI152NLin2009cAsym", "res": "4"}}))
    out = tmp_path / "out"
    code = main([str(sim_bids), str(out), "participant", "--participant-label", "007",
                 "--derivatives", f"sim={sim_bids / 'derivatives' / 'simulated'}",
                 "--bids-filter-file", str(filt), *ARGS])
    assert code == 0
    meta = json.loads(sidecar_path(preproc_path(out, "007", "volume", 4)).read_text())
    assert meta["Sources"][0].startswith("bids:sim:sub-007/anat/")
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetLinks"]["sim"].endswith("derivatives/simulated")


def _tree(root, skip=None):
    """Every file's size and modification time, every folder's name (a new entry in
    ``derivatives/`` changes that folder's time)."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if skip is None or not (p == skip or skip in p.parents)
    }


def test_output_in_bids_dir_derivatives(sim_bids_copy, bids_validator):
    """``BIDS_DIR/derivatives/<name>`` is the usual place: accepted, not indexed as an
    input, and the rest of BIDS_DIR stays as it was."""
    out = sim_bids_copy / "derivatives" / "brainage-xai"
    before = _tree(sim_bids_copy)
    args = ["participant", "--participant-label", "001", "--resolution", "4", "--quiet"]
    assert main([str(sim_bids_copy), str(out), *args]) == 0  # validated, too
    assert preproc_path(out, "001", "volume", 4).is_file()
    assert _tree(sim_bids_copy, skip=out) == before
    # the second run neither indexes the first one's maps as inputs nor fails on them
    from brainage_xai.bids import build_layout, default_derivatives

    assert list(default_derivatives(sim_bids_copy, exclude=[out])) == ["simulated"]
    assert "brainage-xai" in default_derivatives(sim_bids_copy)
    layout = build_layout(sim_bids_copy, exclude=[out])
    assert not [f for f in layout.get(scope="all") if str(out) in f.path]
    assert main([str(sim_bids_copy), str(out), *args[:2], "001", "002", *args[3:]]) == 0
    assert _tree(sim_bids_copy, skip=out) == before
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Name"] == "brainage-xai"


def _outputs(root):
    """Every output file's bytes, the logs left out (they name the run) and the minute a
    page was generated at (two runs may straddle a minute)."""
    stamp = re.compile(rb"(<footer>Generated by [^<]* on )[0-9: -]+(\.</footer>)")
    return {
        str(p.relative_to(root)): stamp.sub(rb"\1\2", p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file() and "logs" not in p.relative_to(root).parts
    }


def test_config_file_repeats_the_run(sim_bids, tmp_path):
    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"volume": {"res": "4"}}))
    first, second = tmp_path / "first", tmp_path / "second"
    assert main([str(sim_bids), str(first), "participant", "--participant-label", "012", "013",
                 "--derivatives", f"sim={sim_bids / 'derivatives' / 'simulated'}",
                 "--bids-filter-file", str(filt), "--random-seed", "3", *ARGS]) == 0
    (config,) = (first / "logs").glob("config-*.toml")
    assert main([str(sim_bids), str(second), "participant", "--config-file", str(config)]) == 0

    made = _outputs(first)
    assert len([k for k in made if k.endswith("desc-preproc_probseg.nii.gz")]) == 2
    assert _outputs(second) == made  # byte for byte, figures included
    from brainage_xai.config import read_toml

    (again,) = (second / "logs").glob("config-*.toml")
    settings = [{k: v for k, v in read_toml(p).items() if k not in ("output_dir", "run_uuid")}
                for p in (config, again)]
    assert settings[0] == settings[1]


@pytest.mark.slow
def test_concurrent_jobs_share_one_output_dir(sim_bids, tmp_path):
    """Two participant jobs (as a SLURM array) write into one OUTPUT_DIR at once."""
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "brainage_xai.cli.run", str(sim_bids), str(out), "participant",
             "--participant-label", label, *ARGS],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for label in ("008", "009")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert [s for s, _ in collect_preprocessed(out, "volume")] == ["008", "009"]
    json.loads((out / "dataset_description.json").read_text())
    assert len(list((out / "logs").glob("config-*.toml"))) == 2
    # No temporary files left behind by the atomic writes.
    assert not [p for p in out.rglob(".*") if p.is_file() and p.name != ".bidsignore"]


def test_with_model_writes_activations(sim_bids, tmp_path):
    """``--model`` at the participant level: the subject's activations are written too."""
    import torch

    from brainage_xai.model.io import save_model
    from brainage_xai.model.network import PreActResNet3d

    torch.manual_seed(0)
    net = PreActResNet3d(widths=(2, 4), depths=(1, 1))
    shape, affine = model_grid(4)
    model = save_model(tmp_path / "model.safetensors", net, {
        "input_grid": {"shape": list(shape), "affine": affine.tolist()},
        "normalisation": {"input_mean": 0.0, "input_std": 1.0},
    })
    out = tmp_path / "out"
    code = main([str(sim_bids), str(out), "participant", "--participant-label", "012",
                 "--model", str(model), *ARGS])
    assert code == 0
    activations = [p for p in (out / "sub-012" / "anat").glob("*.nii.gz") if "desc-preproc" not in p.name]
    assert len(activations) == 1
    img = nib.load(activations[0])
    assert img.ndim == 4 and img.shape[-1] == 4 and np.isfinite(img.get_fdata()).all()


def test_subjects_in_parallel_give_the_serial_outputs(sim_bids_copy, tmp_path, capsys):
    """``--n-cpus 2``: the same files byte for byte as ``--n-cpus 1``, the same failure and
    exit code for a bad subject, and the workers' messages in the log and on the console."""
    anat = sim_bids_copy / "derivatives" / "simulated" / "sub-003" / "anat"
    bad = next(anat.glob("*_label-GM_probseg.nii.gz"))
    img = nib.load(bad)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine, img.header), bad)
    labels = ["--participant-label", "001", "002", "003", "004", "005"]
    args = ["--skip-bids-validation", "--resolution", "4"]
    runs, errors = {}, {}
    for n in (1, 2):
        out = tmp_path / f"n{n}"
        capsys.readouterr()
        assert main([str(sim_bids_copy), str(out), "participant", *labels, *args, "--n-cpus", str(n)]) == 65
        errors[n] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        runs[n] = out
    assert errors[1] == errors[2] and len(errors[2]) == 1
    assert errors[2][0].startswith("brainage-xai: error: 1 of 5 subject(s) failed: sub-003")
    made = _outputs(runs[1])
    assert len([k for k in made if k.endswith("desc-preproc_probseg.nii.gz")]) == 4
    assert _outputs(runs[2]) == made
    (log,) = (runs[2] / "logs").glob("brainage-xai_participant_*.log")
    text = log.read_text()
    assert "5 subjects on 2 worker processes" in text
    for subject in ("001", "002", "004", "005"):
        assert f"sub-{subject}: registration check passed" in text
        assert f"sub-{subject}: wrote sub-{subject}/anat/" in text
    assert "failed: sub-003" in text
    # A rerun on the pool skips every finished subject, and says so on the console.
    capsys.readouterr()
    assert main([str(sim_bids_copy), str(runs[2]), "participant", *labels[:3], *args, "--n-cpus", "2"]) == 0
    err = capsys.readouterr().err
    assert "sub-001: outputs up to date, skipped" in err and "sub-002: outputs up to date, skipped" in err
    assert not [p for p in runs[2].rglob(".*") if p.is_file() and p.name != ".bidsignore"]


def test_n_cpus_defaults_to_the_available_cpus(sim_bids, tmp_path, monkeypatch):
    """Without ``--n-cpus`` the subjects share the CPUs the job may use (as fMRIPrep's
    ``--nprocs``), never more workers than subjects."""
    from brainage_xai.workflows import pool

    monkeypatch.setattr(pool, "available_cpus", lambda: 3)
    out = tmp_path / "out"
    assert main([str(sim_bids), str(out), "participant", "--participant-label", "010", "011", *ARGS]) == 0
    (log,) = (out / "logs").glob("brainage-xai_participant_*.log")
    assert "2 subjects on 2 worker processes" in log.read_text()
    assert [s for s, _ in collect_preprocessed(out, "volume")] == ["010", "011"]
