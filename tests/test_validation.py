"""The BIDS validator (PyPI ``bids-validator-deno``) as the app runs it: where it is
found, how its report is read, and what a run says when it fails or cannot finish."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from brainage_xai.bids import validation
from brainage_xai.cli.run import main
from brainage_xai.errors import BIDSValidationError


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("brainage-xai: error: "), err
    return err[0]


def test_validator_is_the_one_installed_with_the_app(bids_validator):
    assert Path(bids_validator).parent == Path(sys.prefix) / "bin"
    assert Path(bids_validator).name == "bids-validator-deno"


def test_validator_is_never_taken_from_the_current_directory(tmp_path, monkeypatch):
    here = tmp_path / "cwd"
    here.mkdir()
    planted = here / validation.VALIDATOR
    planted.write_text("#!/bin/sh\necho planted\n")
    planted.chmod(0o755)
    monkeypatch.chdir(here)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "no-env"))
    monkeypatch.setenv("PATH", os.pathsep.join(["", ".", "cwd", "/nonexistent"]))
    assert validation.find_validator() is None
    # an absolute PATH entry is used
    monkeypatch.setenv("PATH", os.pathsep.join([".", str(here)]))
    assert validation.find_validator() == str(planted)


def test_errors_of_subjects_not_selected_do_not_stop_the_run(sim_bids_copy):
    bad = sim_bids_copy / "sub-002" / "anat" / "sub-002_T1w.json"
    bad.write_text("{")
    assert validation.validate_dataset(sim_bids_copy, ["001", "003"]) is True
    with pytest.raises(BIDSValidationError, match="1 error") as info:
        validation.validate_dataset(sim_bids_copy, ["001", "002"])
    assert info.value.exit_code == 16
    assert "JSON_INVALID" in str(info.value) and "/sub-002/anat/sub-002_T1w.json" in str(info.value)
    with pytest.raises(BIDSValidationError, match="JSON_INVALID"):
        validation.validate_dataset(sim_bids_copy)  # every subject


def test_dataset_wide_errors_stop_every_run(sim_bids_copy):
    (sim_bids_copy / "participants.json").write_text("not json")
    with pytest.raises(BIDSValidationError, match="JSON_INVALID at /participants.json"):
        validation.validate_dataset(sim_bids_copy, ["001"])


def test_symlink_cycle_gives_one_short_line(sim_bids_copy, tmp_path, capsys):
    anat = sim_bids_copy / "sub-004" / "anat"
    (anat / "loop").symlink_to(sim_bids_copy / "sub-004")
    assert validation.validate_dataset(sim_bids_copy, ["001"]) is True
    code = main([str(sim_bids_copy), str(tmp_path / "out"), "participant",
                 "--participant-label", "004", "--resolution", "4", "--quiet"])
    # The run refuses the cycle before the validator (or PyBIDS) walks into it.
    assert code == 65
    line = _one_line_error(capsys)
    assert "link cycle" in line and "sub-004/anat/loop" in line
    assert len(line) < 600


def test_validator_crash_is_one_line_exit_16(sim_bids_copy, tmp_path, capsys):
    # A folder where dataset_description.json should be crashes bids-validator-deno
    # 3.0 with a Deno stack trace on stderr.
    desc = sim_bids_copy / "dataset_description.json"
    desc.unlink()
    desc.mkdir()
    code = main([str(sim_bids_copy), str(tmp_path / "out"), "participant",
                 "--participant-label", "001", "--resolution", "4", "--quiet"])
    assert code == 16
    line = _one_line_error(capsys)
    assert "BIDS validator" in line and "--skip-bids-validation" in line
    assert "\x1b" not in line and "file://" not in line


def test_validator_is_stopped_after_its_timeout(sim_bids):
    with pytest.raises(BIDSValidationError, match="did not finish .* within 0.01 s") as info:
        validation.validate_dataset(sim_bids, ["001"], timeout=0.01)
    assert info.value.exit_code == 16
