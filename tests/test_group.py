"""Group level part 1 end to end: simulated cohort -> participant level -> group level.

The cohort is the session's ``sim_bids`` (24 subjects, 4 mm); the network is narrow and
trains for a few epochs, which is enough to check the plumbing, not the accuracy (that is
``benchmarks/bench_training.py``'s job).
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from brainage_xai.activations import load_activation_tensor, write_participant_activations
from brainage_xai.cli.parser import parse_args
from brainage_xai.cli.run import main, run
from brainage_xai.errors import EX_DATAERR, DataError
from brainage_xai.model import load_model, model_sha256, save_model
from brainage_xai.utils.io import read_tsv

WIDTHS, DEPTHS = [4, 6, 8], [1, 1, 1]
COMMON = ["--resolution", "4", "--skip-bids-validation", "--quiet", "--n-cpus", "1"]


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def group(bids, out, *extra):
    """Run the group level with the narrow test network; returns the Config."""
    config = parse_args([str(bids), str(out), "group", *COMMON, "--epochs", "3", *extra])
    config.widths, config.depths = WIDTHS, DEPTHS
    assert run(config) == 0
    return config


@pytest.fixture(scope="module")
def first_run(sim_bids, tmp_path_factory):
    out = tmp_path_factory.mktemp("group") / "out"
    assert main([str(sim_bids), str(out), "participant", *COMMON]) == 0
    config = group(sim_bids, out)
    return {"bids": sim_bids, "out": out, "group": out / "group", "config": config}


def test_outputs_are_complete_and_consistent(first_run):
    g = first_run["group"]
    pred = read_tsv(g / "predictions.tsv")
    subjects = sorted(p.name for p in first_run["out"].glob("sub-*") if p.is_dir())
    assert sorted(pred["participant_id"]) == subjects and pred["participant_id"].is_unique
    assert pred["split"].value_counts().to_dict() == {"train": 14, "val": 5, "test": 5}
    split = read_tsv(g / "split.tsv")
    assert dict(zip(split["participant_id"], split["split"])) == dict(zip(pred["participant_id"], pred["split"]))
    for col in ("age", "predicted_age", "brain_age_gap", "brain_age_gap_corrected"):
        assert pred[col].notna().all(), col
    np.testing.assert_allclose(pred["brain_age_gap"], pred["predicted_age"] - pred["age"], atol=1e-4)
    # The corrected gap carries no linear age trend on the subjects it was fitted on.
    fit = pred["split"].isin(["train", "val"])
    slope = np.polyfit(pred.loc[fit, "age"], pred.loc[fit, "brain_age_gap_corrected"], 1)[0]
    assert abs(slope) < 1e-6
    dictionary = json.loads((g / "predictions.json").read_text())
    assert {"brain_age_gap_corrected", "split", "age"} <= set(dictionary)

    metrics = json.loads((g / "metrics.json").read_text())
    test = metrics["metrics"]["age"]["test"]
    rows = pred[pred["split"] == "test"]
    assert test["n"] == 5
    assert test["mae"] == pytest.approx(np.abs(rows["brain_age_gap"]).mean(), rel=1e-4)
    train_mean = pred.loc[pred["split"] == "train", "age"].mean()
    assert test["mean_predictor_mae"] == pytest.approx(np.abs(rows["age"] - train_mean).mean())
    assert {"mse", "r", "mae_corrected"} <= set(test)
    assert metrics["bias_correction"]["age"]["fitted_on"] == ["train", "val"]
    assert (g / "figures" / "target-age_desc-predictions_scatter.svg").read_text().lstrip().startswith("<?xml")

    model, meta = load_model(g / "model.safetensors")
    assert meta["architecture"]["widths"] == WIDTHS and meta["targets"] == ["age"]
    preproc = next(first_run["out"].glob("sub-*/anat/*_desc-preproc_probseg.nii.gz"))
    img = nib.load(str(preproc))
    assert meta["input_grid"]["shape"] == list(img.shape) and np.allclose(meta["input_grid"]["affine"], img.affine)
    assert len(meta["training"]["history"]) == 3 and meta["seed"] == 0
    assert "metrics" in json.loads((g / "model.json").read_text())

    # The activation tensor: every subject, non-negative, and the head applied to its
    # voxel mean gives back the predictions.
    act = load_activation_tensor(first_run["config"].work / "group" / "activations" / "layer-block3_activations.json")
    assert act.subjects == [s[4:] for s in pred["participant_id"]]
    assert act.array.shape == (24, 8, int(np.prod(model.feature_shape(img.shape))))
    assert act.array.min() >= 0 and act.layer == "block3" and act.module == "final"
    np.testing.assert_allclose(act.affine, model.feature_affine(img.affine))
    norm = meta["normalisation"]
    with torch.no_grad():
        head = model.head(torch.from_numpy(np.asarray(act.array).mean(axis=2))).numpy()[:, 0]
    np.testing.assert_allclose(head * norm["target_std"][0] + norm["target_mean"][0], pred["predicted_age"], atol=1e-3)


def test_rerun_reuses_split_model_and_outputs(first_run):
    g = first_run["group"]
    files = ["split.tsv", "model.safetensors", "predictions.tsv", "metrics.json"]
    before = {f: (g / f).stat().st_mtime_ns for f in files}
    sha = model_sha256(g / "model.safetensors")
    group(first_run["bids"], first_run["out"])
    assert {f: (g / f).stat().st_mtime_ns for f in files} == before
    assert model_sha256(g / "model.safetensors") == sha


def test_given_model_skips_training_and_reuses_participant_activations(first_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out, ignore=shutil.ignore_patterns("group", ".work"))
    model_path = first_run["group"] / "model.safetensors"
    assert main([str(first_run["bids"]), str(out), "participant", *COMMON, "--model", str(model_path)]) == 0
    model, meta = load_model(model_path)
    nifti = sorted(out.glob("sub-*/anat/*_desc-block3_activations.nii.gz"))
    assert len(nifti) == 24
    img = nib.load(str(nifti[0]))
    preproc = nib.load(str(next(out.glob("sub-*/anat/*_desc-preproc_probseg.nii.gz"))))
    assert img.shape == (*model.feature_shape(preproc.shape), 8)
    np.testing.assert_allclose(img.affine, model.feature_affine(preproc.affine))

    config = group(first_run["bids"], out, "--model", str(model_path))
    assert not list(config.work.glob("group/train-*")), "trained although --model was given"
    assert model_sha256(out / "group" / "model.safetensors") == model_sha256(model_path)
    ours = read_tsv(out / "group" / "predictions.tsv")
    theirs = read_tsv(first_run["group"] / "predictions.tsv")
    np.testing.assert_allclose(ours["predicted_age"], theirs["predicted_age"], atol=1e-4)
    a = load_activation_tensor(config.work / "group" / "activations" / "layer-block3_activations.json")
    b = load_activation_tensor(first_run["config"].work / "group" / "activations" / "layer-block3_activations.json")
    np.testing.assert_allclose(a.array, b.array, atol=1e-5)


def test_model_on_another_grid_is_a_data_error(first_run, tmp_path, capsys):
    model, meta = load_model(first_run["group"] / "model.safetensors")
    meta["input_grid"]["affine"][0][3] += 8.0  # the same shape, shifted by two voxels
    other = save_model(tmp_path / "shifted" / "model.safetensors", model, meta)
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out, ignore=shutil.ignore_patterns("group", ".work"))
    code = main([str(first_run["bids"]), str(out), "group", *COMMON, "--model", str(other)])
    assert code == EX_DATAERR
    err = capsys.readouterr().err
    assert "origin [-98.0" in err and "the model expects grid" in err and "\n" not in err.strip()
    config = parse_args([str(first_run["bids"]), str(out), "participant", *COMMON, "--model", str(other)])
    preproc = next(out.glob("sub-*/anat/*_desc-preproc_probseg.nii.gz"))
    with pytest.raises(DataError, match="the model expects grid"):
        write_participant_activations(config, preproc.name.split("_")[0][4:], preproc)
