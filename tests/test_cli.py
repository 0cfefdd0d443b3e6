"""The command line: parsing, the exit code of each kind of wrong call, logs, dispatch."""

import json

import pytest

from brainage_xai import __version__
from brainage_xai.cli.parser import parse_args
from brainage_xai.cli.run import main


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--participant-label", "--derivatives", "--bids-filter-file", "--map",
                   "--target", "--work-dir", "--n-cpus", "--device", "--random-seed",
                   "--skip-bids-validation", "--model", "--ranks", "--lambda", "--rank-grid",
                   "--lambda-grid", "--resolution", "--allow-resample", "--quiet", "Exit codes"):
        assert option in out


ADVANCED = ("--widths", "--depths", "--dask-scheduler")


def test_help_shows_what_users_need_and_help_all_the_rest(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for option in ADVANCED:
        assert option not in out
    assert "--help-all" in out
    # no default printed for a flag, none printed twice
    assert "(default: True)" not in out and "(default: 0)" not in out.split("--verbose")[1]
    assert "(default 1" not in out and "(default: 1)" not in out  # --ensemble says its own
    assert out.count("Default: 3 on a CPU") == 1
    assert "-vv" not in out and "mps" not in out
    assert main(["--help-all"]) == 0
    full = capsys.readouterr().out
    for option in ADVANCED:
        assert option in full
    assert len(full) > len(out)


def test_advanced_options_are_accepted_while_hidden(sim_bids, tmp_path):
    cfg = parse_args([str(sim_bids), str(tmp_path / "out"), "group",
                      "--widths", "4", "6", "--depths", "1", "1"])
    assert cfg.widths == [4, 6] and cfg.depths == [1, 1]


@pytest.mark.parametrize("option, module, extra", [
    (["--tune", "3"], "optuna", "tune"),
    (["--dask-scheduler", "tcp://127.0.0.1:8786"], "dask", "dask"),
])
def test_option_without_its_extra_is_one_line_exit_2(sim_bids, tmp_path, capsys, monkeypatch,
                                                    option, module, extra):
    import sys

    # A None entry in sys.modules makes the import fail as if the package were absent.
    for name in (module, f"{module}.distributed"):
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "out"
    assert main([str(sim_bids), str(out), "group", *option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("brainage-xai: error: "), err
    assert f"pip install 'brainage-xai[{extra}]'" in err[0] and module in err[0]
    assert not out.exists()


def test_python_dash_m(tmp_path):
    """``python -m brainage_xai`` is the same command, and says its name, without warnings."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-W", "error", "-m", "brainage_xai", "--version"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"brainage-xai {__version__}"
    assert proc.stderr == ""
    proc = subprocess.run([sys.executable, "-m", "brainage_xai", str(tmp_path / "missing"),
                           str(tmp_path / "out"), "group"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2  # a usage error, as for the console script (docs/usage.md)
    assert "brainage-xai: error:" in proc.stderr and "does not exist" in proc.stderr


def test_parse_full_call(sim_bids, tmp_path):
    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"desc": "modulated"}))
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    cfg = parse_args([
        str(sim_bids), str(tmp_path / "out"), "group",
        "--participant-label", "sub-001", "002", "001",
        "--derivatives", f"sim={sim_bids / 'derivatives' / 'simulated'}",
        "--bids-filter-file", str(filt), "--map", "stiffness",
        "--target", "age", "--target", "height",
        "-w", str(tmp_path / "work"), "--n-cpus", "2", "--device", "cuda:1",
        "--random-seed", "7", "--skip-bids-validation", "--resolution", "4", "--allow-resample",
        "--model", str(model), "--layer", "block4", "--ranks", "5", "3", "--lambda", "0.1",
        "--rank-grid", "2:6", "--lambda-grid", "0", "0.01", "0.1", "--tune", "3", "--epochs", "2",
        "-vv", "--quiet",
    ])
    assert cfg.participant_label == ["001", "002"]
    assert cfg.derivatives == {"sim": sim_bids / "derivatives" / "simulated"}
    assert cfg.bids_filters == {"desc": "modulated"}
    assert cfg.map == "stiffness" and cfg.target == ["age", "height"]
    assert cfg.n_cpus == 2 and cfg.device == "cuda:1" and cfg.random_seed == 7
    assert cfg.resolution == 4 and cfg.allow_resample and cfg.skip_bids_validation
    assert cfg.model == model and cfg.layer == "block4"
    assert cfg.ranks == (5, 3) and cfg.l1 == 0.1
    assert cfg.rank_grid == [2, 3, 4, 5, 6] and cfg.lambda_grid == [0, 0.01, 0.1]
    assert cfg.tune == 3 and cfg.epochs == 2 and cfg.verbose == 2 and cfg.quiet
    assert cfg.work_dir == tmp_path / "work"


def test_defaults(sim_bids, tmp_path):
    cfg = parse_args([str(sim_bids), str(tmp_path / "out"), "participant"])
    assert cfg.target == ["age"] and cfg.map == "volume" and cfg.resolution == 2
    assert cfg.participant_label is None and cfg.device == "auto"
    assert cfg.bids_dir.is_absolute() and cfg.output_dir.is_absolute()


@pytest.mark.parametrize("args, message", [
    ([], "required"),
    (["{bids}", "{out}", "both"], "invalid choice"),
    (["{bids}/nowhere", "{out}", "participant"], "does not exist"),
    (["{bids}", "{bids}", "participant"], "inside"),
    (["{bids}", "{bids}/derivatives", "participant"], "BIDS_DIR/derivatives/<name>"),
    (["{bids}", "{bids}/derivatives/out/deeper", "participant"], "inside"),
    (["{bids}", "{bids}/sub-001/out", "participant"], "inside"),
    (["{bids}", "{bids}/derivatives/simulated", "participant"], "brainage-xai-simulate"),
    (["{bids}", "{bids}/derivatives/simulated", "participant", "--derivatives",
      "maps={bids}/derivatives/simulated"], "--derivatives input maps"),
    (["{bids}", "{bids}/derivatives/out", "participant", "-w", "{bids}/work"], "inside BIDS_DIR"),
    (["{bids}", "{out}", "participant", "-w", "{bids}/work"], "inside BIDS_DIR"),
    (["{bids}", "{out}", "participant", "--participant-label", "0/../1"], "not a BIDS label"),
    (["{bids}", "{out}", "participant", "--participant-label", "sub-"], "not a BIDS label"),
    (["{bids}", "{out}", "participant", "--device", "gpu"], "auto (CUDA when present), cpu, cuda"),
    (["{bids}", "{out}", "participant", "--device", "mps"], "cuda or cuda:N"),
    (["{bids}", "{out}", "participant", "--resolution", "2.5"], "whole number"),
    (["{bids}", "{out}", "participant", "--map", "thickness"], "invalid choice"),
    (["{bids}", "{out}", "participant", "--n-cpus", "0"], "positive integer"),
    (["{bids}", "{out}", "participant", "--ranks", "3"], "expected 2 arguments"),
    (["{bids}", "{out}", "participant", "--lambda", "-1"], ">= 0"),
    (["{bids}", "{out}", "participant", "--rank-grid", "a:b"], "ranks"),
    (["{bids}", "{out}", "participant", "--bids-filter-file", "{out}/none.json"], "does not exist"),
    (["{bids}", "{out}", "participant", "--bids-filter-file", "{bad_json}"], "not valid JSON"),
    (["{bids}", "{out}", "participant", "--derivatives", "x={out}/none"], "does not exist"),
    (["{bids}", "{out}", "group", "--model", "{out}/none.safetensors"], "does not exist"),
])
def test_usage_errors_exit_2(sim_bids, tmp_path, capsys, args, message):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    argv = [a.format(bids=sim_bids, out=tmp_path / "out", bad_json=bad_json) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_symlinked_output_inside_bids_dir_is_refused(sim_bids, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(sim_bids / "sourcedata", target_is_directory=True)
    assert main([str(sim_bids), str(link / "out"), "participant"]) == 2
    assert "inside" in capsys.readouterr().err


def test_output_in_bids_dir_derivatives_is_accepted(sim_bids, tmp_path):
    out = sim_bids / "derivatives" / "brainage-xai"
    cfg = parse_args([str(sim_bids), str(out), "participant", "-w", str(out / "work")])
    assert cfg.output_dir == out and cfg.work_dir == out / "work"
    link = tmp_path / "link"  # also through a symbolic link
    link.symlink_to(sim_bids / "derivatives", target_is_directory=True)
    assert parse_args([str(sim_bids), str(link / "brainage-xai"), "participant"]).output_dir


def test_unknown_label_is_usage_error(sim_bids, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([str(sim_bids), str(out), "participant", "--skip-bids-validation",
                 "--participant-label", "001", "sub-999", "--resolution", "4", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("brainage-xai: error:") and "999" in err and len(err.strip().splitlines()) == 1
    assert not list(out.glob("sub-*"))


def test_logs_and_config_written(sim_bids, tmp_path):
    out = tmp_path / "out"
    code = main([str(sim_bids), str(out), "participant", "--skip-bids-validation",
                 "--participant-label", "003", "--resolution", "4", "--quiet", "--random-seed", "5"])
    assert code == 0
    tomls = list((out / "logs").glob("config-*.toml"))
    logs = list((out / "logs").glob("brainage-xai_participant_*.log"))
    assert len(tomls) == 1 and len(logs) == 1
    toml = tomls[0].read_text()
    assert "random_seed = 5" in toml and 'participant_label = [\n    "003",\n]' in toml
    assert f'bids_dir = "{sim_bids}"' in toml
    text = logs[0].read_text()
    assert "sub-003" in text and "registration check passed" in text


def test_bids_validation_runs_and_passes(sim_bids, tmp_path, bids_validator):
    out = tmp_path / "out"
    code = main([str(sim_bids), str(out), "participant", "--participant-label", "004",
                 "--resolution", "4", "--quiet"])
    assert code == 0
    log = next((out / "logs").glob("*.log")).read_text()
    assert "BIDS validation passed" in log


def test_python_warnings_go_to_the_log(sim_bids, tmp_path, capsys):
    import warnings

    from brainage_xai.cli.run import _close_logging, setup_logging

    config = parse_args([str(sim_bids), str(tmp_path / "out"), "participant", "--quiet"])
    log_file = setup_logging(config)
    try:
        warnings.warn("RoI 6 is empty after thresholding; not occluded", UserWarning, stacklevel=1)
    finally:
        _close_logging()
    assert "WARNING" in log_file.read_text() and "RoI 6 is empty" in log_file.read_text()
    err = capsys.readouterr().err
    assert "RoI 6 is empty" in err and "WARNING" in err  # formatted like the app's own messages
    assert not logging_captures_warnings()


def logging_captures_warnings() -> bool:
    import warnings

    return warnings.showwarning.__module__ == "logging"


def _written_config(sim_bids, out, *options):
    cfg = parse_args([str(sim_bids), str(out), "group", *options])
    out.mkdir(parents=True)
    return cfg, cfg.write_toml()


def test_config_file_gives_back_every_setting(sim_bids, tmp_path):
    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"desc": None}))
    cfg, toml = _written_config(
        sim_bids, tmp_path / "out",
        "--participant-label", "001", "002", "--derivatives", f"sim={sim_bids / 'derivatives' / 'simulated'}",
        "--bids-filter-file", str(filt), "--map", "stiffness", "--target", "age", "--resolution", "4",
        "-w", str(tmp_path / "work"), "--n-cpus", "2", "--device", "cpu", "--random-seed", "7",
        "--skip-bids-validation", "--allow-resample", "--layer", "block4", "--tensor", "deviations",
        "--ranks", "5", "3", "--lambda", "0.1", "--rank-grid", "2:6", "--lambda-grid", "0", "0.015",
        "--tune", "2", "--epochs", "3", "--ensemble", "2", "--no-backprojection",
        "--widths", "4", "6", "--depths", "1", "1", "-vv", "--quiet",
    )
    again = parse_args([str(sim_bids), str(tmp_path / "out2"), "group", "--config-file", str(toml)])
    first, second = cfg.to_dict(), again.to_dict()
    for key in ("run_uuid", "output_dir"):
        assert first.pop(key) != second.pop(key)
    assert first == second
    assert again.bids_filters == {"desc": None} and again.backprojection is False


def test_command_line_overrides_the_config_file(sim_bids, tmp_path):
    _, toml = _written_config(sim_bids, tmp_path / "out", "--participant-label", "001",
                              "--target", "age", "--random-seed", "7", "--ranks", "3", "2")
    cfg = parse_args([str(sim_bids), str(tmp_path / "out2"), "participant", "--config-file", str(toml),
                      "--participant-label", "003", "--target", "sex", "--ranks", "4", "4"])
    assert cfg.participant_label == ["003"] and cfg.target == ["sex"] and cfg.ranks == (4, 4)
    assert cfg.random_seed == 7 and cfg.analysis_level == "participant"


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("[run]\n", "[run]\nbogus = 1\n"), "unknown setting 'bogus'"),
    (lambda t: t.replace("random_seed = 7", "random_seed = -1"), "--random-seed: expected an integer >= 0"),
    (lambda t: t.replace("random_seed = 7", 'random_seed = "x"'), "--random-seed: expected an integer >= 0"),
    (lambda t: t.replace("quiet = false", "quiet = 3"), "quiet = 3 is not a valid setting"),
    (lambda t: t.replace("[run", "[nothing"), "no [run] table"),
    (lambda t: t + "[[[", "cannot be read"),
])
def test_bad_config_file_is_a_usage_error(sim_bids, tmp_path, capsys, edit, message):
    _, toml = _written_config(sim_bids, tmp_path / "out", "--random-seed", "7")
    toml.write_text(edit(toml.read_text()))
    assert main([str(sim_bids), str(tmp_path / "out2"), "group", "--config-file", str(toml)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_config_file_refuses_a_changed_filter_file(sim_bids, tmp_path, capsys):
    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"desc": "modulated"}))
    _, toml = _written_config(sim_bids, tmp_path / "out", "--bids-filter-file", str(filt))
    filt.write_text(json.dumps({"desc": "other"}))
    assert main([str(sim_bids), str(tmp_path / "out2"), "group", "--config-file", str(toml)]) == 2
    assert "has changed since the run" in capsys.readouterr().err
    cfg = parse_args([str(sim_bids), str(tmp_path / "out2"), "group", "--config-file", str(toml),
                      "--bids-filter-file", str(filt)])
    assert cfg.bids_filters == {"desc": "other"}


def test_log_lines_never_break_a_progress_bar(sim_bids, tmp_path, capsys):
    import re

    args = [str(sim_bids), str(tmp_path / "out"), "participant", "--participant-label",
            "014", "015", "--skip-bids-validation", "--resolution", "4"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "participants:" in err and "100%" in err  # the bar was drawn
    # Each message begins a line of its own: after a newline or the bar's carriage return
    # that tqdm writes to clear it, never after the bar's text.
    messages = [seg for seg in re.split(r"[\r\n]", err) if "registration check passed" in seg]
    assert len(messages) == 2
    assert all(re.match(r"\d\d:\d\d:\d\d INFO sub-01[45]: registration", m) for m in messages), messages
    assert main([*args, "--quiet"]) == 0  # outputs up to date: nothing to say
    assert capsys.readouterr().err == ""
