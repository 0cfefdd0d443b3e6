"""Faults and bad input: signals, killed runs, damaged outputs, one bad subject, hostile
names and environments. Each gives one clear line and the documented exit code, leaves
no temporary file behind, and a rerun completes with the outputs of an uninterrupted run.

The cohort is tiny (12 subjects, 8 mm, narrow network, 2 epochs) so that the runs killed
and resumed here take seconds each.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainage_xai.cli.run import main
from brainage_xai.utils.io import TEMP_MARK, _host, damage, read_tsv

N_SUBJECTS, RES = 12, 8
COMMON = ["--skip-bids-validation", "--resolution", str(RES), "--n-cpus", "1"]
GROUP = ["--widths", "4", "6", "8", "--depths", "1", "1", "1", "--epochs", "2", "--rank-grid", "2:3",
         "--ensemble", "1", "--resamples", "1", "--layer", "block3", "--tensor", "activations"]
SPACE = f"space-MNI152NLin2009cAsym_res-{RES}"
#: JSON keys and TSV columns that hold wall times or keys that depend on the folder's path.
VOLATILE = {"seconds", "subjects_per_second", "stage_key"}


def _cli(bids, out, level, *extra):
    return [sys.executable, "-m", "brainage_xai", str(bids), str(out), level, *COMMON,
            *(GROUP if level == "group" else []), *extra]


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TEMP_MARK in p.name]


def _lines(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()]


def _logs(out: Path, level: str) -> str:
    return "\n".join(p.read_text() for p in sorted((out / "logs").glob(f"brainage-xai_{level}_*.log")))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from brainage_xai.simulate import simulate_cohort

    root = tmp_path_factory.mktemp("faults") / "bids"
    return simulate_cohort(root, n_subjects=N_SUBJECTS, resolution=RES, seed=0, quiet=True, n_jobs=1)


@pytest.fixture
def cohort_copy(cohort, tmp_path) -> Path:
    return Path(shutil.copytree(cohort, tmp_path / "bids", symlinks=True))


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory) -> dict:
    """Uninterrupted runs: the participant level, then the group level on a copy of it."""
    root = tmp_path_factory.mktemp("reference")
    prepared = root / "prepared"
    done = subprocess.run(_cli(cohort, prepared, "participant", "--quiet"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    finished = root / "finished"
    shutil.copytree(prepared, finished)
    done = subprocess.run(_cli(cohort, finished, "group", "--quiet"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return {"prepared": prepared, "finished": finished,
            "participant_lines": _log_lines(prepared, "participant"), "group_lines": _log_lines(finished, "group")}


def _log_lines(out: Path, level: str) -> int:
    return sum(len(p.read_text().splitlines()) for p in (out / "logs").glob(f"brainage-xai_{level}_*.log"))


# -- comparing two runs' outputs ----------------------------------------------------------


def _normalised(value):
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    return value


def _files(out: Path, under: str = "") -> set[str]:
    root = out / under if under else out
    return {str(p.relative_to(out)) for p in root.rglob("*")
            if p.is_file() and p.relative_to(out).parts[0] not in ("logs", ".work")}


def assert_same_outputs(out: Path, ref: Path, under: str = "") -> None:
    """Same files; equal JSON and TSV contents (wall times left out); equal image data."""
    files = _files(out, under)
    assert files == _files(ref, under)
    assert not _temporaries(out)
    for name in sorted(files):
        a, b = out / name, ref / name
        if name.endswith(".json"):
            assert _normalised(json.loads(a.read_text())) == _normalised(json.loads(b.read_text())), name
        elif name.endswith(".tsv"):
            ta, tb = (read_tsv(p).drop(columns=list(VOLATILE), errors="ignore") for p in (a, b))
            pd.testing.assert_frame_equal(ta, tb, obj=name)
        elif name.endswith(".nii.gz"):
            np.testing.assert_array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj))
        else:
            assert damage(a) is None, name


# -- signals and killed runs --------------------------------------------------------------


def _start_and_stop(cmd, out: Path, level: str, sig: int, seed: int, lines: int, group: bool = False):
    """Start ``cmd`` and send ``sig`` at a random point of the run: once its log has a
    random share (10-80 %) of the ``lines`` an uninterrupted run logs, and a random
    fraction of a second later. A point counted in log lines, not seconds, falls inside
    the run however busy the machine is. ``group``: to every process of the run (as
    Ctrl-C in a terminal or ``scancel`` send it), not only to the run's own."""
    rng = random.Random(seed)
    point = max(1, int(rng.uniform(0.1, 0.8) * lines))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=group)
    while proc.poll() is None and (not (out / "logs").is_dir() or _log_lines(out, level) < point):
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))
    assert proc.poll() is None, f"the run ended before the stop point (log line {point} of {lines})"
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


def _stop_and_rerun(cohort, out: Path, level: str, sig: int, seed: int, lines: int) -> str:
    """Stop a run of ``level`` with ``sig`` at a random point, check how it stopped, rerun
    it to the end; returns the stopped run's stderr."""
    code, stderr = _start_and_stop(_cli(cohort, out, level, "--quiet"), out, level, sig, seed, lines)
    if sig == signal.SIGTERM:
        assert code == 143, stderr
        assert _lines(stderr)[-1].startswith("brainage-xai: stopped by SIGTERM"), stderr
        assert "stopped by SIGTERM" in _logs(out, level)
        assert not _temporaries(out)
    else:
        assert code == -signal.SIGKILL, stderr
    done = subprocess.run(_cli(cohort, out, level, "--quiet"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return stderr


@pytest.mark.parametrize("sig, seed", [(signal.SIGTERM, 0), (signal.SIGKILL, 1)])
def test_participant_run_killed_and_rerun(cohort, reference, tmp_path, sig, seed):
    out = tmp_path / "out"
    _stop_and_rerun(cohort, out, "participant", sig, seed, reference["participant_lines"])
    assert_same_outputs(out, reference["prepared"])


@pytest.mark.parametrize("sig, seed", [(signal.SIGTERM, 0), (signal.SIGKILL, 1), (signal.SIGTERM, 2)])
def test_group_run_killed_and_rerun(cohort, reference, tmp_path, sig, seed):
    out = tmp_path / "out"
    shutil.copytree(reference["prepared"], out)
    stderr = _stop_and_rerun(cohort, out, "group", sig, seed, reference["group_lines"])
    if sig == signal.SIGTERM:  # the group level's console says nothing else with --quiet
        assert len(_lines(stderr)) == 1, stderr
    assert_same_outputs(out, reference["finished"], "group")
    assert not _temporaries(out / ".work")


@pytest.mark.parametrize("sig, group, seed", [(signal.SIGTERM, False, 4), (signal.SIGINT, True, 5)])
def test_participant_pool_stopped_and_rerun(cohort, reference, tmp_path, sig, group, seed):
    """Subjects on two worker processes, stopped by a signal to the run (``docker stop``)
    or to every process (Ctrl-C): the workers stop too, no temporary file is left, and a
    rerun gives the outputs of the uninterrupted serial run."""
    out = tmp_path / "out"
    cmd = _cli(cohort, out, "participant", "--quiet", "--n-cpus", "2")
    code, stderr = _start_and_stop(cmd, out, "participant", sig, seed, reference["participant_lines"], group)
    assert code == 128 + sig, stderr
    assert _lines(stderr)[-1].startswith(f"brainage-xai: stopped by {signal.Signals(sig).name}"), stderr
    assert "Traceback" not in stderr
    assert not _temporaries(out)
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_outputs(out, reference["prepared"])


def test_sigint_is_130_with_one_line(cohort, reference, tmp_path):
    out = tmp_path / "out"
    code, stderr = _start_and_stop(_cli(cohort, out, "participant"), out, "participant",
                                   signal.SIGINT, 3, reference["participant_lines"])
    assert code == 130, stderr
    assert _lines(stderr)[-1].startswith("brainage-xai: stopped by SIGINT")
    assert "Traceback" not in stderr
    assert "stopped by SIGINT" in _logs(out, "participant")
    assert not _temporaries(out)


def test_stale_temporaries_are_removed_on_the_next_run(cohort, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference["prepared"], out)
    anat = out / "sub-001" / "anat"
    finished = subprocess.Popen(["true"])  # a process id that no longer runs
    finished.wait()
    host = _host()
    name = f".sub-001_{SPACE}_label-GM_desc-preproc_probseg.nii.gz{TEMP_MARK}"
    dead = anat / f"{name}{finished.pid}@{host}.abcd1234.nii.gz"
    alive = anat / f"{name}{os.getpid()}@{host}.efgh5678.nii.gz"  # a concurrent job's
    elsewhere = anat / f"{name}4242@otherhost.ijkl9012.nii.gz"  # another node's, recent
    old = anat / f"{name}4343@otherhost.mnop3456.nii.gz"  # another node's, 2 days old
    for path in (dead, alive, elsewhere, old):
        path.write_bytes(b"\x1f\x8b partial")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    assert main([str(cohort), str(out), "participant", "--participant-label", "001", *COMMON, "--quiet"]) == 0
    assert not dead.exists() and not old.exists()
    assert alive.exists() and elsewhere.exists()
    assert "removed 2 temporary file(s) left by an interrupted run" in _logs(out, "participant")


# -- damaged outputs are redone -----------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_damaged_group_outputs_are_redone(cohort, reference, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference["finished"], out)
    g = out / "group"
    argv = [str(cohort), str(out), "group", *COMMON, *GROUP, "--quiet"]
    # Outputs of each later stage (and a work file) at once: each stage notices its own.
    damaged = {
        "predictions": [g / "predictions.tsv"],
        "layer": [g / "layer_choice.tsv"],
        "activations": [out / ".work" / "group" / "activations" / "layer-block3_activations.npy"],
        "selection": [g / "decomposition.npz", g / "rank_sweep.tsv", g / "figures" / "scree.png"],
        "explanations": [g / f"{SPACE}_desc-rois_dseg.nii.gz", g / "occlusion_null.tsv"],
        "report": [g / "report.html"],
    }
    for path in (p for paths in damaged.values() for p in paths):
        assert damage(path) is None, path
        _truncate(path)
    assert main(argv) == 0
    lines = _lines(capsys.readouterr().err)
    for stage, paths in damaged.items():
        names = [f"{stage}: {p.relative_to(out)} " for p in paths]
        assert any(n in line and line.endswith("running the stage again") for line in lines for n in names), (
            stage, lines)
    assert_same_outputs(out, reference["finished"], "group")
    # The model and the split: the model is trained again (the same, by the seed).
    _truncate(g / "model.safetensors")
    _truncate(g / "split.tsv")
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "training again" in err
    assert "split.tsv" in err and "writing the split again" in err
    assert_same_outputs(out, reference["finished"], "group")
    # Nothing damaged: every stage skipped.
    assert main(argv) == 0
    assert "running the stage again" not in capsys.readouterr().err


def test_damaged_preprocessed_map_is_one_line_and_redone(cohort, reference, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference["finished"], out)
    preproc = out / "sub-003" / "anat" / f"sub-003_{SPACE}_label-GM_desc-preproc_probseg.nii.gz"
    _truncate(preproc)
    argv = [str(cohort), str(out), "group", *COMMON, *GROUP, "--quiet"]
    assert main(argv) == 65
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "sub-003" in err[0] and "participant level" in err[0], err
    log = _logs(out, "group")
    assert "Traceback" in log and "cannot be read" in log  # the details are in the log file
    # The participant level sees the damage and writes the map again.
    assert main([str(cohort), str(out), "participant", "--participant-label", "003", *COMMON, "--quiet"]) == 0
    assert "writing the subject's outputs again" in capsys.readouterr().err
    assert main(argv) == 0
    assert_same_outputs(out, reference["finished"], "group")


def test_every_roi_empty_and_a_map_without_sidecar(cohort, reference, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference["prepared"], out)
    # An unfinished participant run: the map is there, its sidecar (written last) is not.
    (out / "sub-012" / "anat" / f"sub-012_{SPACE}_label-GM_desc-preproc_probseg.json").unlink()
    argv = [str(cohort), str(out), "group", *COMMON, *GROUP, "--lambda", "1e9", "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "sub-012" in err and "no JSON sidecar" in err
    assert len(read_tsv(out / "group" / "predictions.tsv")) == N_SUBJECTS - 1
    occlusion = read_tsv(out / "group" / "occlusion.tsv")
    assert (occlusion["voxels"] == 0).all()  # every RoI empty after thresholding
    null = read_tsv(out / "group" / "occlusion_null.tsv")
    assert list(null.columns) == ["roi", "draw", "mae_increase"] and null.empty
    assert (out / "group" / "report.html").read_text().rstrip().endswith("</html>")
    # The warnings are one line each, without the source line Python appends.
    warnings = [line for line in _lines(err) if "is empty after thresholding" in line]
    assert warnings and not any("occlusion_test(" in line for line in _lines(err))
    assert main(argv) == 0
    assert "running the stage again" not in capsys.readouterr().err


# -- one bad subject, bad datasets and calls ------------------------------------------------


def test_one_subject_with_two_maps_fails_alone(cohort_copy, tmp_path, capsys):
    anat = cohort_copy / "derivatives" / "simulated" / "sub-001" / "anat"
    src = anat / f"sub-001_{SPACE}_label-GM_probseg.nii.gz"
    shutil.copy(src, anat / f"sub-001_{SPACE}_label-GM_desc-smooth_probseg.nii.gz")
    out = tmp_path / "out"
    code = main([str(cohort_copy), str(out), "participant", "--participant-label", "001", "002", "003",
                 *COMMON, "--quiet"])
    assert code == 65
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("brainage-xai: error: 1 of 3 subject(s) failed: sub-001 has 2"), err
    assert "--bids-filter-file" in err[0]
    assert not (out / "sub-001").exists()
    assert (out / "sub-002" / "anat").is_dir() and (out / "sub-003" / "anat").is_dir()


@pytest.mark.parametrize("validate", [False, True])
def test_symlink_cycle_is_refused(cohort_copy, tmp_path, capsys, validate):
    (cohort_copy / "sub-002" / "anat" / "loop").symlink_to(cohort_copy / "sub-002", target_is_directory=True)
    argv = [str(cohort_copy), str(tmp_path / "out"), "participant", "--resolution", str(RES), "--quiet"]
    tic = time.monotonic()
    assert main(argv + ([] if validate else ["--skip-bids-validation"])) == 65
    assert time.monotonic() - tic < 30
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "sub-002/anat/loop" in err[0] and "link cycle" in err[0], err


def test_validator_in_the_current_folder_is_not_run(cohort, tmp_path, monkeypatch):
    planted = tmp_path / "cwd"
    marker = tmp_path / "planted-validator-ran"
    for where in (planted / ".tools" / "node_modules" / ".bin" / "bids-validator",
                  planted / "bids-validator-deno"):
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_text(f"#!/bin/sh\ntouch {marker}\necho '{{\"issues\": {{\"issues\": []}}}}'\n")
        where.chmod(0o755)
    monkeypatch.chdir(planted)
    monkeypatch.setenv("PATH", os.pathsep.join([".", "", ".tools/node_modules/.bin", os.environ["PATH"]]))
    out = tmp_path / "out"
    assert main([str(cohort), str(out), "participant", "--participant-label", "001",
                 "--resolution", str(RES), "--quiet"]) == 0
    assert not marker.exists()
    assert "BIDS validation passed" in _logs(out, "participant")


@pytest.mark.parametrize("target", ["../../../X", "age/x", "a-b", "a b"])
def test_target_names_that_are_not_file_names_are_refused(cohort, tmp_path, capsys, target):
    out = tmp_path / "out"
    assert main([str(cohort), str(out), "group", *COMMON, "--target", target]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 2 and err[0].startswith("usage: brainage-xai BIDS_DIR OUTPUT_DIR") and "--help" in err[0]
    assert err[1].startswith("brainage-xai: error: --target") and "[0-9A-Za-z_]+" in err[1]
    assert not out.exists()


def test_usage_error_is_two_lines(cohort, tmp_path, capsys):
    assert main([str(cohort), str(tmp_path / "out"), "participant", "--resolution", "2.5"]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 2 and "whole number" in err[1]


def test_unknown_label_creates_nothing(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(cohort), str(out), "participant", "--participant-label", "999", *COMMON]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "999" in err[0]
    assert not out.exists()


def test_participants_table_and_folders_that_disagree_warn(cohort_copy, tmp_path, capsys):
    table = read_tsv(cohort_copy / "participants.tsv")
    extra = table.iloc[[0]].assign(participant_id="sub-999")
    table = pd.concat([table[table["participant_id"] != "sub-012"], extra])
    table.to_csv(cohort_copy / "participants.tsv", sep="\t", index=False, na_rep="n/a")
    out = tmp_path / "out"
    assert main([str(cohort_copy), str(out), "participant", "--participant-label", "001", *COMMON, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "participants.tsv rows without a subject folder: sub-999" in err
    assert "subject folders without a participants.tsv row: sub-012" in err


def test_missing_home_is_not_created_and_umask_is_kept(cohort, tmp_path):
    home = tmp_path / "nonexistent"
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME",
                                                            "MPLCONFIGDIR", "TORCH_HOME")}
    env["HOME"] = str(home)
    out = tmp_path / "out"
    done = subprocess.run(_cli(cohort, out, "participant", "--participant-label", "001", "--quiet"),
                          capture_output=True, text=True, env=env, preexec_fn=lambda: os.umask(0o027))
    assert done.returncode == 0, done.stderr
    assert not home.exists()
    assert (out / ".work" / "cache" / "matplotlib").is_dir()
    written = [p for p in out.rglob("*") if p.is_file() and ".work" not in p.parts]
    assert written and {p.stat().st_mode & 0o777 for p in written} == {0o640}

