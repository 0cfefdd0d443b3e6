"""Bad input: each gives a one-line message, a documented exit code, nothing half-written,
and BIDS_DIR untouched (``sim_bids`` is read-only and checked at session end)."""

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from brainage_xai.bids import load_targets
from brainage_xai.cli.run import main
from brainage_xai.errors import DataError, MissingInputError

ARGS = ["--skip-bids-validation", "--resolution", "4", "--quiet"]
SPACE = "MNI152NLin2009cAsym"


def _gm(bids, subject):
    return (bids / "derivatives" / "simulated" / f"sub-{subject}" / "anat"
            / f"sub-{subject}_space-{SPACE}_res-4_label-GM_probseg.nii.gz")


def _run(bids, out, *labels, extra=()):
    return main([str(bids), str(out), "participant", "--participant-label", *labels, *ARGS, *extra])


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("brainage-xai: error: "), err
    return err[0]


def _nothing_for(out, subject):
    return not (out / f"sub-{subject}").exists() and not (out / f"sub-{subject}.html").exists()


def _replace(path, img):
    path.unlink()
    nib.save(img, path)


def test_read_only_bids_dir_works(sim_bids, tmp_path):
    assert _run(sim_bids, tmp_path / "out", "010") == 0
    assert (tmp_path / "out" / "sub-010" / "anat").is_dir()


def test_map_in_another_space(sim_bids_copy, tmp_path, capsys):
    src = _gm(sim_bids_copy, "001")
    moved = src.with_name(src.name.replace(SPACE, "MNI152NLin6Asym"))
    src.rename(moved)
    src.with_name(src.name.replace(".nii.gz", ".json")).unlink()
    out = tmp_path / "out"
    assert _run(sim_bids_copy, out, "001") == 65
    line = _one_line_error(capsys)
    assert "MNI152NLin6Asym" in line and "--allow-resample" in line and "Dice" in line
    assert _nothing_for(out, "001")
    assert _run(sim_bids_copy, out, "001", extra=["--allow-resample"]) == 0
    meta = json.loads(next((out / "sub-001" / "anat").glob("*.json")).read_text())
    assert meta["RegistrationQC"]["DeclaredSpace"] == "MNI152NLin6Asym"


@pytest.mark.parametrize("change", ["shift", "flip"])
def test_shifted_or_flipped_affine(sim_bids_copy, tmp_path, capsys, change):
    path = _gm(sim_bids_copy, "002")
    img = nib.load(path)
    affine = img.affine.copy()
    if change == "shift":
        affine[2, 3] += 16
    else:  # superior-inferior flip of the header only
        affine[:3, 3] += affine[:3, 2] * (img.shape[2] - 1)
        affine[:3, 2] *= -1
    _replace(path, nib.Nifti1Image(np.asarray(img.dataobj), affine))
    out = tmp_path / "out"
    # The good subject is processed; the bad one is reported with its numbers.
    assert _run(sim_bids_copy, out, "002", "003") == 65
    line = _one_line_error(capsys)
    assert "sub-002" in line and "fails the MNI registration check" in line
    assert "centre offset" in line and "correlation" in line
    assert _nothing_for(out, "002")
    assert (out / "sub-003.html").is_file()


def test_subject_without_map(sim_bids_copy, tmp_path, capsys):
    _gm(sim_bids_copy, "004").unlink()
    out = tmp_path / "out"
    # Alone: the query matched no files.
    assert _run(sim_bids_copy, out, "004") == 18
    assert "matched no files" in _one_line_error(capsys)
    # With another subject: that one is done, the missing map is a missing input.
    assert _run(sim_bids_copy, out, "004", "005") == 66
    assert "sub-004 has no volume map" in _one_line_error(capsys)
    assert _nothing_for(out, "004") and (out / "sub-005.html").is_file()


def test_filters_match_no_files(sim_bids, tmp_path, capsys):
    filt = tmp_path / "f.json"
    filt.write_text(json.dumps({"desc": "doesnotexist"}))
    out = tmp_path / "out"
    assert _run(sim_bids, out, "001", extra=["--bids-filter-file", str(filt)]) == 18
    assert "doesnotexist" in _one_line_error(capsys)
    assert _nothing_for(out, "001")


@pytest.mark.parametrize("bad", ["nan", "inf", "4d", "truncated", "garbage"])
def test_unusable_image(sim_bids_copy, tmp_path, capsys, bad):
    path = _gm(sim_bids_copy, "006")
    if bad in ("truncated", "garbage"):
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 3] if bad == "truncated" else gzip.compress(b"\0" * 100))
        expected = "truncated or corrupt"
    else:
        img = nib.load(path)
        data = img.get_fdata().astype(np.float32)
        if bad == "4d":
            data = np.stack([data, data], axis=-1)
            expected = "must be a 3D map"
        else:
            data[20, 30, 20] = np.nan if bad == "nan" else np.inf
            expected = "NaN or infinite"
        _replace(path, nib.Nifti1Image(data, img.affine))
    out = tmp_path / "out"
    assert _run(sim_bids_copy, out, "006") == 65
    line = _one_line_error(capsys)
    assert expected in line and "sub-006: " in line and path.name in line
    assert _nothing_for(out, "006")


def test_unknown_participant_label(sim_bids, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(sim_bids, out, "001", "abc") == 2
    line = _one_line_error(capsys)
    assert "abc" in line and "not found" in line
    assert _nothing_for(out, "001")


def test_unwritable_output_dir(sim_bids, tmp_path, capsys):
    # A folder below a regular file cannot be created, even by root (tests may run as root,
    # for whom permission bits do not stop writes).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _run(sim_bids, blocker / "out", "001") == 73
    assert "cannot create output folder" in _one_line_error(capsys)


def test_read_only_output_dir(sim_bids, tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        # Root writes through permission bits; a read-only bind mount needs privileges
        # the suite does not have, so test the same check with a read-only file system
        # path that always exists.
        out = "/proc/brainage-xai-out"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "out"
    assert _run(sim_bids, out, "001") == 73
    assert "brainage-xai: error:" in _one_line_error(capsys)


def test_participants_tsv_problems(sim_bids_copy):
    tsv = sim_bids_copy / "participants.tsv"
    with pytest.raises(MissingInputError, match="no column 'height'"):
        load_targets(sim_bids_copy, ["age", "height"])
    targets = load_targets(sim_bids_copy, "age", ["sub-001", "002"])
    assert list(targets.index) == ["001", "002"] and targets["age"].dtype == float
    lines = tsv.read_text().splitlines()
    header = lines[0].split("\t")
    age = header.index("age")
    row = lines[2].split("\t")
    row[age] = "n/a"
    lines[2] = "\t".join(row)
    row = lines[3].split("\t")
    row[age] = "old"
    lines[3] = "\t".join(row)
    tsv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"2 subject\(s\): sub-002, sub-003"):
        load_targets(sim_bids_copy, ["age"])
    # Subjects that are not selected do not matter.
    assert load_targets(sim_bids_copy, ["age"], ["001", "004"]).shape == (2, 1)
    with pytest.raises(DataError, match="no row for sub-999"):
        load_targets(sim_bids_copy, ["age"], ["999"])
    tsv.unlink()
    with pytest.raises(MissingInputError, match="participants.tsv not found"):
        load_targets(sim_bids_copy, ["age"])


def test_bids_validation_failure_exit_16(sim_bids_copy, tmp_path, capsys, bids_validator):
    (sim_bids_copy / "dataset_description.json").write_text("{}")
    out = tmp_path / "out"
    code = main([str(sim_bids_copy), str(out), "participant", "--participant-label", "001",
                 "--resolution", "4", "--quiet"])
    assert code == 16
    line = _one_line_error(capsys)
    assert "failed BIDS validation" in line and "--skip-bids-validation" in line
    assert "dataset_description.json" in line
    assert _nothing_for(out, "001")


def test_validator_absent_is_one_line_exit_1(sim_bids, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "elsewhere"))
    out = tmp_path / "out"
    code = main([str(sim_bids), str(out), "participant", "--participant-label", "011",
                 "--resolution", "4", "--quiet"])
    assert code == 1
    line = _one_line_error(capsys)
    assert "bids-validator-deno" in line and "--skip-bids-validation" in line
    assert _nothing_for(out, "011")


def test_missing_derivatives_description(sim_bids_copy, tmp_path, capsys):
    deriv = tmp_path / "maps"
    shutil.copytree(sim_bids_copy / "derivatives" / "simulated", deriv)
    (deriv / "dataset_description.json").unlink()
    assert main([str(sim_bids_copy), str(tmp_path / "out"), "participant",
                 "--derivatives", f"maps={deriv}", *ARGS]) == 66
    assert "no dataset_description.json" in _one_line_error(capsys)


def test_participant_level_checks_targets_before_any_work(sim_bids_copy, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(sim_bids_copy, out, "001", extra=["--target", "height"]) == 66
    assert "no column 'height'" in _one_line_error(capsys)
    tsv = sim_bids_copy / "participants.tsv"
    lines = tsv.read_text().splitlines()
    age = lines[0].split("\t").index("age")
    row = lines[1].split("\t")
    row[age] = "n/a"
    lines[1] = "\t".join(row)
    tsv.write_text("\n".join(lines) + "\n")
    assert _run(sim_bids_copy, out, row[0][4:]) == 65
    assert f"n/a or non-numeric values for 1 subject(s): {row[0]}" in _one_line_error(capsys)
    assert not list(out.glob("sub-*"))
