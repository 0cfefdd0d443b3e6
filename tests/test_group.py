"""The whole group level end to end: simulated cohort -> participant level -> every stage.

The cohort is the session's ``sim_bids`` (24 subjects, 4 mm); the network is narrow
(``--widths``/``--depths``) and trains for a few epochs, and the rank grid is small, which
is enough to check the data flow and the consistency of the outputs, not the accuracy
(that is the benchmarks' job).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brainage_xai.cli.parser import parse_args
from brainage_xai.cli.run import main, run
from brainage_xai.errors import EX_DATAERR, DataError
from brainage_xai.imaging.templates import get_template
from brainage_xai.model import load_model, model_sha256, save_model
from brainage_xai.model.activations import load_activation_tensor, write_participant_activations
from brainage_xai.utils.io import read_tsv

WIDTHS, DEPTHS = [4, 6, 8], [1, 1, 1]
COMMON = ["--resolution", "4", "--skip-bids-validation", "--quiet", "--n-cpus", "1"]
NETWORK = ["--widths", *map(str, WIDTHS), "--depths", *map(str, DEPTHS)]
RANK_GRID = [2, 3, 4]
PREFIX = "space-MNI152NLin2009cAsym_res-4"
#: One network, one fit, the last layer's activations: the single-fit path most tests check.
SINGLE = ["--ensemble", "1", "--resamples", "1", "--layer", "block3", "--tensor", "activations"]


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def group(bids, out, *extra, consensus=False):
    """Run the group level with the narrow test network (one network, one fit, unless
    ``consensus``); returns the Config."""
    config = parse_args([str(bids), str(out), "group", *COMMON, "--epochs", "3", *NETWORK,
                         "--rank-grid", "2:4", *(SINGLE if not consensus else []), *extra])
    assert config.widths == WIDTHS and config.depths == DEPTHS
    assert run(config) == 0
    return config


@pytest.fixture(scope="module")
def first_run(sim_bids, tmp_path_factory):
    out = tmp_path_factory.mktemp("group") / "out"
    assert main([str(sim_bids), str(out), "participant", *COMMON]) == 0
    config = group(sim_bids, out)
    return {"bids": sim_bids, "out": out, "group": out / "group", "config": config}


def _outputs(g, work):
    """Every file of the group and work folders and the subject pages, with mtimes."""
    files = [p for d in (g, work) for p in d.rglob("*") if p.is_file()]
    files += sorted(g.parent.glob("sub-*.html"))
    return {str(p): p.stat().st_mtime_ns for p in files}


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


def test_rerun_skips_every_stage(first_run):
    # Every stage writes files (outputs, activations, stamps): none is touched again.
    g, work = first_run["group"], first_run["config"].work
    before = _outputs(g, work)
    stamps = sorted(p.stem for p in (work / "group" / "stamps").glob("*.json"))
    assert stamps == sorted(["predictions", "layer", "activations", "selection", "explanations", "report"])
    assert len(before) > 40
    group(first_run["bids"], first_run["out"])
    assert _outputs(g, work) == before


def test_work_of_another_version_is_not_reused(first_run, tmp_path, monkeypatch):
    # A work directory left by another release is not trusted: every stage runs again,
    # the network is retrained (the log says how to reuse it) and metrics.json is rewritten.
    import brainage_xai._version

    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    g, work = out / "group", out / ".work" / "group"
    keys = {p.stem: json.loads(p.read_text())["key"] for p in (work / "stamps").glob("*.json")}
    old_metrics = json.loads((g / "metrics.json").read_text())
    before = {p.name: p.stat().st_mtime_ns for p in g.glob("*") if p.is_file()}
    trained = sorted(p.name for p in work.glob("train-*"))
    ours = brainage_xai._version.__version__
    monkeypatch.setattr(brainage_xai._version, "__version__", "99.0")
    group(first_run["bids"], out)
    after = {p.stem: json.loads(p.read_text())["key"] for p in (work / "stamps").glob("*.json")}
    assert set(after) == set(keys) and all(after[k] != keys[k] for k in keys)
    assert len(sorted(p.name for p in work.glob("train-*"))) == len(trained) + 1
    assert load_model(g / "model.safetensors")[1]["versions"]["brainage_xai"] == "99.0"
    for name in ("metrics.json", "selection.json", "decomposition.npz", "report.html", "rois.tsv"):
        assert (g / name).stat().st_mtime_ns > before[name], name
    metrics = json.loads((g / "metrics.json").read_text())
    assert metrics["decomposition"]["stage_key"] != old_metrics["decomposition"]["stage_key"]
    log = max((out / "logs").glob("brainage-xai_group_*.log"), key=lambda p: p.stat().st_mtime_ns).read_text()
    assert f"trained by brainage-xai {ours} (this is 99.0); training again" in log


def test_selection_run_again_rewrites_metrics(first_run, tmp_path):
    # With its stamp gone the selection runs again under the same key: metrics.json must
    # carry what that run computed, not be left as it was.
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    g = out / "group"
    (out / ".work" / "group" / "stamps" / "selection.json").unlink()
    metrics = json.loads((g / "metrics.json").read_text())
    metrics["decomposition"]["rank"] = [99, 99]
    (g / "metrics.json").write_text(json.dumps(metrics))
    group(first_run["bids"], out)
    assert json.loads((g / "metrics.json").read_text())["decomposition"]["rank"] != [99, 99]


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

    # --ranks and --lambda: no sweeps; the rest of the group level as usual
    config = group(first_run["bids"], out, "--model", str(model_path), "--ranks", "2", "2",
                   "--lambda", "0")
    assert not (out / "group" / "rank_sweep.tsv").exists()
    assert not (out / "group" / "lambda_sweep.tsv").exists()
    choice = json.loads((out / "group" / "selection.json").read_text())
    assert choice["ranks"]["R1"] == 2 and choice["lambda"]["lambda"] == 0
    assert "given" in choice["ranks"]["rule"] and "given" in choice["lambda"]["rule"]
    assert (out / "group" / "report.html").is_file()
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


def test_selection_metrics_compare_the_four_predictors(first_run):
    g = first_run["group"]
    pred = read_tsv(g / "predictions.tsv")
    choice = json.loads((g / "selection.json").read_text())
    r1, r2 = choice["ranks"]["R1"], choice["ranks"]["R2"]
    assert r1 in RANK_GRID and r2 in RANK_GRID and choice["ranks"]["rule"]
    sweep = read_tsv(g / "rank_sweep.tsv")
    assert sorted(set(sweep["R1"])) == RANK_GRID and len(sweep) == len(RANK_GRID) ** 2
    lam = read_tsv(g / "lambda_sweep.tsv")
    assert choice["lambda"]["lambda"] == pytest.approx(lam.loc[lam["val_mae"].idxmin(), "lambda"])
    for name in ("scree", "rank_sweep", "lambda_sweep"):
        assert (g / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name

    metrics = json.loads((g / "metrics.json").read_text())
    # the training metrics are still there, beside the decomposition's
    network = metrics["metrics"]["age"]
    decomposition = metrics["decomposition"]
    assert decomposition["rank"] == [r1, r2] and decomposition["l1"] == choice["lambda"]["lambda"]
    for split in ("val", "test"):
        m = decomposition["metrics"]["age"][split]
        assert set(m) == {"network", "linear_model_on_decomposition",
                          "network_head_on_reconstruction", "mean_predictor"}
        # (a) is the network's own prediction and (d) the training mean, in years
        assert m["network"]["mae"] == pytest.approx(network[split]["mae"], rel=1e-4)
        assert m["mean_predictor"]["mae"] == pytest.approx(network[split]["mean_predictor_mae"], rel=1e-6)
        rows = pred[pred["split"] == split]
        assert m["network"]["mse"] == pytest.approx((rows["brain_age_gap"] ** 2).mean(), rel=1e-4)
        assert all(np.isfinite(v["mae"]) and v["mse"] >= v["mae"] ** 2 - 1e-9 for v in m.values())
    # the same numbers on the standardised target, as the selection wrote them
    std = load_model(g / "model.safetensors")[1]["normalisation"]["target_std"][0]
    raw = decomposition["standardised"]["test"]["linear_model_on_decomposition"]["mae"]
    assert raw * std == pytest.approx(decomposition["metrics"]["age"]["test"]["linear_model_on_decomposition"]["mae"])

    loadings = read_tsv(g / "loadings.tsv")
    assert sorted(loadings["participant_id"]) == sorted(pred["participant_id"])
    merged = loadings.merge(pred, on="participant_id", suffixes=("", "_pred"))
    assert (merged["split"] == merged["split_pred"]).all()
    assert [c for c in loadings.columns if c.startswith("RoI ")] == [f"RoI {r + 1}" for r in range(r1)]
    with np.load(g / "decomposition.npz") as npz:
        act = load_activation_tensor(first_run["config"].work / "group" / "activations" / "layer-block3_activations.json")
        assert npz["U3"].shape == (act.array.shape[2], r1) and (npz["U3"] >= 0).all()
        assert npz["U1"].shape == (14, r1) and npz["U1_test"].shape == (5, r1)


def test_explanations_are_on_the_template_grid(first_run):
    g = first_run["group"]
    r1 = json.loads((g / "selection.json").read_text())["ranks"]["R1"]
    preproc = nib.load(str(next(first_run["out"].glob("sub-*/anat/*_desc-preproc_probseg.nii.gz"))))
    comps = nib.load(str(g / f"{PREFIX}_desc-rois_components.nii.gz"))
    assert comps.shape == (*preproc.shape, r1)
    np.testing.assert_allclose(comps.affine, preproc.affine)
    data = comps.get_fdata()
    assert data.min() >= 0 and (data.reshape(-1, r1).max(axis=0) > 0).any()
    dseg = nib.load(str(g / f"{PREFIX}_desc-rois_dseg.nii.gz"))
    np.testing.assert_allclose(dseg.affine, preproc.affine)
    assert set(np.unique(dseg.get_fdata()).astype(int)) <= set(range(r1 + 1))
    assert len(read_tsv(g / f"{PREFIX}_desc-rois_dseg.tsv")) == r1
    rois = read_tsv(g / "rois.tsv")
    assert list(rois["index"]) == list(range(1, r1 + 1))
    # no TemplateFlow atlas in the tests' TemplateFlow home: the lobe atlas named every row
    assert set(rois["atlas"]) == {"Lobes"} and "atlas" in json.loads((g / "rois.json").read_text())
    # each RoI back-projected to the input (where its loading comes from)
    bp = nib.load(str(g / f"{PREFIX}_desc-backprojected_components.nii.gz"))
    assert bp.shape == (*preproc.shape, r1)
    np.testing.assert_allclose(bp.affine, preproc.affine)
    bp_data = bp.get_fdata()
    assert bp_data.min() >= 0 and np.isfinite(bp_data).all() and bp_data.max() > 0
    assert rois["input_region"].notna().all() and rois["agreement"].between(-1, 1).all()
    assert "input_region" in json.loads((g / "rois.json").read_text())
    cam = nib.load(str(g / f"{PREFIX}_desc-gradcam_map.nii.gz"))
    assert cam.shape == preproc.shape and np.allclose(cam.affine, preproc.affine)
    fits = read_tsv(g / "loadings_vs_age.tsv")
    assert len(fits) == r1 and fits["statement"].str.startswith("RoI").all()
    assert fits["coefficient"].notna().all()
    assert fits["cv_r2"].between(0, 1).all()
    assert set(fits.columns) <= set(json.loads((g / "loadings_vs_age.json").read_text()))
    # rois.tsv says how much of each RoI is age, as the fits do, and whether that is most of it
    np.testing.assert_allclose(rois["cv_r2"], fits["cv_r2"])
    assert (rois["target_related"].astype(str).eq("True") == (fits["cv_r2"] >= 0.5)).all()
    assert {"cv_r2", "target_related"} <= set(json.loads((g / "rois.json").read_text()))
    occ = read_tsv(g / "occlusion.tsv")
    null = read_tsv(g / "occlusion_null.tsv")
    assert len(occ) == r1 and len(null) == 20 * r1
    # the baseline MAE of the occlusion test is the network's test MAE, in years (up to
    # the training's precision, bf16 on CPUs with AMX, which the test's passes use)
    test_mae = json.loads((g / "metrics.json").read_text())["metrics"]["age"]["test"]["mae"]
    assert occ["mae_baseline"].iloc[0] == pytest.approx(test_mae, rel=0.02)
    # the feature geometry and layer beside the RoIs, so that they can be read without the log
    sidecar = json.loads((g / f"{PREFIX}_desc-rois_components.json").read_text())
    assert sidecar["Layer"] == "block3" and sidecar["FeatureGeometry"]["Stride"] == [4.0, 4.0, 4.0]
    brain = np.asarray(get_template(4).mask.dataobj) > 0
    assert not (data[~brain] > 0).any()  # RoIs live in the brain mask
    # the figures of the numbers, drawn by the stage that made them
    for name in ("target-age_desc-loadings_scatter.svg", "desc-occlusion_plot.svg"):
        assert (g / "figures" / name).read_text().lstrip().startswith("<?xml"), name


def test_report_and_subject_pages(first_run):
    g, out = first_run["group"], first_run["out"]
    html = (g / "report.html").read_text()
    for section in ("summary", "predictions", "ranks", "rois", "loadings", "gradcam", "occlusion"):
        assert f'id="{section}"' in html, section
    for alt in ("predicted vs true age", "scree plots", "rank sweep", "lambda sweep",
                "combined RoI map", "loadings vs age", "GradCAM average", "occlusion test"):
        assert f'alt="{alt}"' in html, alt
    assert "network head on the reconstruction" in html and "training-mean predictor" in html
    r1 = json.loads((g / "selection.json").read_text())["ranks"]["R1"]
    assert html.count('class="viewer"') == 1 and html.count('<option value="') == r1
    assert html.count("Back-projected to the input") == r1
    assert 'alt="RoI 1 back-projected, glass brain"' in html and "share of the loading" in html
    assert 'href="../sub-' in html
    # about this run: the configuration the run wrote, started from Python (no command line)
    assert '<section id="about">' in html and "not recorded in the configuration (a run started from Python" in html
    assert f"logs/config-{first_run['config'].run_uuid}.toml" in html
    # the boilerplate of what ran: the layer, the method, the paper, both levels
    logs = out / "logs"
    citation = (logs / "CITATION.md").read_text()
    assert "The decomposed layer was block3" in citation and "--method consensus" in citation
    assert "Interpreting age predictions from brain maps via deep neural activations" in citation
    assert "Preprocessing (participant level)" in citation and "proportional scaling" in citation
    assert "@unpublished{brainagexai_method," in (logs / "CITATION.bib").read_text()
    assert "The decomposed layer was block3" in (logs / "CITATION.html").read_text()
    assert not (out / "CITATION.md").exists()

    pred = read_tsv(g / "predictions.tsv").set_index("participant_id")
    pages = sorted(out.glob("sub-*.html"))
    assert len(pages) == 24
    for page in pages[:3]:
        text = page.read_text()
        row = pred.loc[page.stem]
        assert 'id="subject-rois"' in text and 'id="registration"' in text
        assert f"{row['predicted_age']:.2f}" in text and f"{row['brain_age_gap']:+.2f}" in text
        assert "RoI 1" in text and 'href="group/report.html">group report</a>' in text


def test_participant_rerun_then_group_restores_subject_sections(first_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    page = out / f"{sorted(p.stem for p in out.glob('sub-*.html'))[0]}.html"
    # A participant re-run that rewrites a page (its map changed) drops the group section ...
    sidecar = next((out / page.stem / "anat").glob("*_desc-preproc_probseg.json"))
    meta = json.loads(sidecar.read_text())
    meta["InputFingerprint"] = "changed"
    sidecar.write_text(json.dumps(meta))
    assert main([str(first_run["bids"]), str(out), "participant", *COMMON,
                 "--participant-label", page.stem]) == 0
    assert 'id="subject-rois"' not in page.read_text()
    # ... and the group level puts it back without redoing the stages before the report.
    before = _outputs(out / "group", out / ".work" / "group" / "activations")
    group(first_run["bids"], out)
    assert 'id="subject-rois"' in page.read_text()
    after = _outputs(out / "group", out / ".work" / "group" / "activations")
    changed = {Path(k).name for k in before if after[k] != before[k]}
    assert changed == {"report.html"} | {p.name for p in out.glob("sub-*.html")}


def test_widths_and_depths_go_together(sim_bids, tmp_path, capsys):
    for extra in (["--widths", "4", "6"], ["--widths", "4", "6", "--depths", "1"]):
        with pytest.raises(SystemExit) as exc:
            parse_args([str(sim_bids), str(tmp_path / "out"), "group", *extra])
        assert exc.value.code == 2
        assert "--widths and --depths go together" in capsys.readouterr().err


def test_earlier_layer_has_no_head_metric(first_run, tmp_path):
    # The head reads the last layer's pooled channels: for block2 metric (c) is left out.
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    group(first_run["bids"], out, "--layer", "block2", "--ranks", "2", "2", "--lambda", "0")
    g = out / "group"
    test = json.loads((g / "metrics.json").read_text())["decomposition"]["metrics"]["age"]["test"]
    assert set(test) == {"network", "linear_model_on_decomposition", "mean_predictor"}
    act = load_activation_tensor(out / ".work" / "group" / "activations" / "layer-block2_activations.json")
    with np.load(g / "decomposition.npz") as npz:
        assert npz["U3"].shape == (act.array.shape[2], 2)
    comps = nib.load(str(g / f"{PREFIX}_desc-rois_components.nii.gz"))
    assert comps.shape[3] == 2
    assert "Decomposed layer</th><td>block2" in (g / "report.html").read_text()


def test_deviations_tensor_and_auto_layer(first_run, tmp_path, monkeypatch):
    # --tensor deviations decomposes [max(A - M, 0), max(M - A, 0)] / s (2c channels); the
    # head still applies to the reconstruction, which is exact at full rank. --layer auto
    # at 4 mm is block1 (4 mm apart).
    import brainage_xai.utils.env

    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    # Less memory than the selection's estimate: a warning, and the run goes on.
    monkeypatch.setattr(brainage_xai.utils.env, "available_memory", lambda: 10**6)
    group(first_run["bids"], out, "--layer", "auto", "--tensor", "deviations", "--ranks", "3", "3", "--lambda", "0")
    monkeypatch.undo()
    g = out / "group"
    act = load_activation_tensor(out / ".work" / "group" / "activations" / "layer-block1_activations.json")
    n, c, v = act.array.shape
    text = sorted((out / "logs").glob("brainage-xai_group_*.log"))[-1].read_text()  # this run's
    size = n * 2 * c * v * 4 / 1e9
    assert f"selection: the deviations tensor takes {size:.1f} GB" in text
    assert "WARNING the selection needs about" in text and "0.0 GB is available (layer block1" in text
    with np.load(g / "decomposition.npz") as npz:
        assert npz["U2"].shape == (2 * act.array.shape[1], 3) and npz["U3"].shape == (act.array.shape[2], 3)
    metrics = json.loads((g / "metrics.json").read_text())["decomposition"]
    assert metrics["tensor"] == "deviations"
    page = (g / "report.html").read_text()
    assert "Decomposed layer</th><td>block1" in page and "deviations from the training mean" in page
    assert "Unlike the original method" in page
    bp = nib.load(str(g / f"{PREFIX}_desc-backprojected_components.nii.gz"))
    assert bp.shape[-1] == 3 and bp.get_fdata().max() > 0
    # the back-projection rebuilt the tensor from the selection's own centre and scale
    with np.load(out / ".work" / "group" / "selection" / "tensor_parameters.npz") as npz:
        train = np.asarray(act.array)[np.asarray(act.split) == "train"]
        np.testing.assert_allclose(npz["centre"], train.mean(axis=0), rtol=1e-5, atol=1e-6)
        assert npz["scale"].shape == (c,) and "weight" not in npz.files
    # The last layer keeps the head metric, through the deviation head.
    group(first_run["bids"], out, "--tensor", "deviations", "--ranks", "2", "2", "--lambda", "0")
    test = json.loads((g / "metrics.json").read_text())["decomposition"]["metrics"]["age"]["test"]
    assert np.isfinite(test["network_head_on_reconstruction"]["mae"])



def test_relevance_tensor(first_run, tmp_path):
    # --tensor relevance: the deviations weighted by the training subjects' output
    # gradient. The weight varies over voxels, so the head cannot be applied to the
    # voxel average of the reconstruction: that metric is left out, with a log line.
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    group(first_run["bids"], out, "--tensor", "relevance", "--ranks", "2", "2", "--lambda", "0")
    g = out / "group"
    act = load_activation_tensor(out / ".work" / "group" / "activations" / "layer-block3_activations.json")
    n_train = int((np.asarray(act.split) == "train").sum())
    text = sorted((out / "logs").glob("brainage-xai_group_*.log"))[-1].read_text()
    assert f"selection: output gradient (age) at block3 over {n_train} training subjects" in text
    assert "the network head on the reconstruction is not computed" in text
    with np.load(g / "decomposition.npz") as npz:
        assert npz["U2"].shape == (2 * act.array.shape[1], 2)
    metrics = json.loads((g / "metrics.json").read_text())["decomposition"]
    assert metrics["tensor"] == "relevance"
    assert set(metrics["metrics"]["age"]["test"]) == {"network", "linear_model_on_decomposition", "mean_predictor"}
    page = (g / "report.html").read_text()
    assert "weighted by the network&#39;s output gradient" in page or "weighted by the network's output gradient" in page
    assert "Unlike the original method" in page and "the network ignores does not form RoIs" in page
    bp = nib.load(str(g / f"{PREFIX}_desc-backprojected_components.nii.gz"))
    assert bp.shape[-1] == 2 and bp.get_fdata().max() > 0
    with np.load(out / ".work" / "group" / "selection" / "tensor_parameters.npz") as npz:
        assert npz["weight"].shape == (act.array.shape[1], act.array.shape[2])


def test_no_backprojection_leaves_it_out(first_run, tmp_path):
    # --no-backprojection: the explanations are redone without it, and the earlier run's
    # maps (which would no longer belong to these RoIs) are removed.
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    g = out / "group"
    bp = g / f"{PREFIX}_desc-backprojected_components.nii.gz"
    assert bp.is_file()
    config = group(first_run["bids"], out, "--no-backprojection")
    assert config.backprojection is False
    assert not bp.exists() and not bp.with_name(bp.name.replace(".nii.gz", ".json")).exists()
    rois = read_tsv(g / "rois.tsv")
    assert "input_region" not in rois and "input_region" not in json.loads((g / "rois.json").read_text())
    html = (g / "report.html").read_text()
    assert "Back-projected to the input" not in html and 'id="rois"' in html
    assert "followed back to the input" not in html  # nor in the methods
    # and back on: the maps are written again
    group(first_run["bids"], out)
    assert bp.is_file() and "input_region" in read_tsv(g / "rois.tsv")


def test_too_few_subjects_is_a_data_error_before_any_work(first_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out, ignore=shutil.ignore_patterns("group", ".work"))
    labels = sorted(p.name[4:] for p in out.glob("sub-*") if p.is_dir())[:6]
    code = main([str(first_run["bids"]), str(out), "group", *COMMON, "--participant-label", *labels])
    assert code == EX_DATAERR
    err = capsys.readouterr().err.strip()
    assert "at least 10 subjects" in err and "found 6" in err and "\n" not in err
    assert not (out / "group" / "split.tsv").exists()


def test_ranks_beyond_the_layer_are_refused_before_training(first_run, tmp_path, capsys):
    from brainage_xai.errors import EX_USAGE

    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out, ignore=shutil.ignore_patterns("group", ".work"))
    # block1 of the test network has 4 channels: 8 in the deviations tensor, 4 in the activations
    cases = [(["--layer", "block1", "--tensor", "deviations", "--rank-grid", "2:9"], "--rank-grid: R2 up to 9", "has 8"),
             (["--layer", "block1", "--tensor", "activations", "--ranks", "3", "5"], "--ranks: R2 up to 5",
              "activations tensor of block1 has 4")]
    for extra, first, second in cases:
        code = main([str(first_run["bids"]), str(out), "group", *COMMON, *NETWORK, "--epochs", "3", *extra])
        assert code == EX_USAGE
        err = capsys.readouterr().err.strip()
        assert first in err and second in err and "\n" not in err
        assert not (out / "group" / "model.safetensors").exists()
        assert not list(out.glob(".work/group/train-*"))


def test_consensus_over_networks_and_resamples(first_run, tmp_path, capsys):
    # The default method: K networks (seeds 0, 1), each decomposed on B resamples of the
    # training subjects; the first network is the one a single run trains; the ranks are
    # chosen on it; the RoIs are the consensus, with their stability and the networks
    # that rely on them; the report shows how the networks agree.
    from brainage_xai.model.network import EnsembleNet
    from brainage_xai.model.training import predict_batches

    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out, ignore=shutil.ignore_patterns("group", ".work"))
    args = ("--ensemble", "2", "--resamples", "2", "--layer", "block3", "--ranks", "2", "2", "--lambda", "0")
    group(first_run["bids"], out, *args, consensus=True)
    g = out / "group"
    ens, meta = load_model(g / "model.safetensors")
    single, _ = load_model(first_run["group"] / "model.safetensors")
    assert isinstance(ens, EnsembleNet) and ens.n_members == 2 and meta["architecture"]["ensemble"] == 2
    assert [m["seed"] for m in meta["training"]["members"]] == [0, 1]
    for name, value in single.state_dict().items():  # member 0 is the single run's network
        torch.testing.assert_close(ens.members[0].state_dict()[name], value)
    assert not torch.equal(ens.members[0].stem.weight, ens.members[1].stem.weight)
    # The predictions are the mean of the two networks'.
    from brainage_xai.model.data import load_maps, standardise_inputs

    norm = meta["normalisation"]
    x = standardise_inputs(load_maps(sorted(out.glob("sub-*/anat/*_desc-preproc_probseg.nii.gz")))[0], norm)
    each = [predict_batches(m, x, batch_size=8)[:, 0] * norm["target_std"][0] + norm["target_mean"][0]
            for m in ens.members]
    preds = read_tsv(g / "predictions.tsv")
    np.testing.assert_allclose(preds["predicted_age"].to_numpy(), (each[0] + each[1]) / 2, rtol=1e-4)
    act = load_activation_tensor(out / ".work" / "group" / "activations" / "layer-block3_activations.json")
    assert act.array.shape[1] == 2 * WIDTHS[-1] and act.module == "members.0.final"
    # the selection chose on the first network's channels (deviations: 2 x its channels)
    with np.load(g / "decomposition.npz") as npz:
        assert npz["U2"].shape[0] == 2 * WIDTHS[-1]
    # the consensus: 2 x 2 fits, every fit's components listed with the RoI they matched
    about = json.loads((g / "consensus.json").read_text())
    assert about["networks"] == 2 and about["resamples"] == 2 and about["fits"] == 4
    fits = read_tsv(g / "consensus_fits.tsv")
    assert len(fits) == 4 * 2 and set(fits["network"]) == {0, 1} and set(fits["resample"]) == {0, 1}
    rois = read_tsv(g / "rois.tsv")
    q = len(rois)
    assert q >= 1 and set(rois["name"]) == set(about["rois"])
    assert rois["stability"].between(0.5, 1.0).all()  # two fits at least
    assert (rois["robust"].astype(str).eq("True") == (rois["stability"] >= 0.7)).all()
    assert rois["networks_relying"].between(0, 2).all() and (rois["networks"] == 2).all()
    assert {"stability", "networks_relying"} <= set(json.loads((g / "rois.json").read_text()))
    comps = nib.load(str(g / f"{PREFIX}_desc-rois_components.nii.gz"))
    assert comps.shape[-1] == q
    with np.load(g / "consensus.npz") as npz:
        assert npz["U3"].shape[1] == q and npz["W"].shape == (2 * 2 * WIDTHS[-1], q)
        assert npz["own_0"].shape == npz["own_1"].shape == (act.array.shape[2], 2)
    # the consensus' loadings (the selection's loadings.tsv is the first network's fit)
    loadings = read_tsv(g / "consensus_loadings.tsv")
    assert list(loadings.columns) == ["participant_id", "split", *[f"RoI {r + 1}" for r in range(q)], "predicted_age"]
    fits_age = read_tsv(g / "loadings_vs_age.tsv")
    assert len(fits_age) == q and len(loadings) == len(preds)
    with np.load(g / "consensus.npz") as npz:
        assert npz["own_loadings_0"].shape == (len(preds), 2)
    # each network's occlusion test on the same RoIs
    occ = read_tsv(g / "occlusion.tsv")
    assert set(occ["network"]) == {"network 1", "network 2"} and len(occ) == 2 * q
    assert (g / "figures" / "desc-consensus_plot.png").read_bytes()[:4] == b"\x89PNG"
    page = (g / "report.html").read_text()
    assert "consensus of 2 networks x 2 resamples" in page and "networks&#39; RoIs matched to the consensus" in page
    assert "Of the " + str(q) + " RoIs" in page and "networks relying" in page
    assert "ICASSO" in page
    # A re-run reloads the ensemble from its file and redoes nothing.
    before = {p: p.stat().st_mtime_ns for p in g.rglob("*") if p.is_file()}
    group(first_run["bids"], out, *args, consensus=True)
    assert {p: p.stat().st_mtime_ns for p in g.rglob("*") if p.is_file()} == before
    log = sorted((out / "logs").glob("brainage-xai_group_*.log"))[-1].read_text()
    assert "model: up to date" in log and "training:" not in log
    # An ensemble is trained here or given, not both.
    with pytest.raises(SystemExit) as exc:
        parse_args([str(first_run["bids"]), str(out), "group", "--ensemble", "2", "--model", str(g)])
    assert exc.value.code == 2
    assert "--ensemble trains networks and --model gives a trained one" in capsys.readouterr().err


def test_method_paper_runs_the_papers_setting(first_run, tmp_path, capsys):
    # --method paper: one network, the last layer's activations, eq. 2's constraints (U1
    # and U2 free), the ranks by the knee and scree rules alone, no consensus.
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out, ignore=shutil.ignore_patterns("group", ".work"))
    config = parse_args([str(first_run["bids"]), str(out), "group", *COMMON, "--epochs", "3", *NETWORK,
                         "--rank-grid", "2:4", "--method", "paper"])
    assert config.method == "paper" and config.layer is None and config.tensor is None
    assert run(config) == 0
    g = out / "group"
    about = json.loads((g / "decomposition.json").read_text())
    assert about["method"] == "paper" and about["constraints"] == "paper" and about["networks"] == 1
    assert about["layer"] == "block3" and about["tensor"] == "activations"
    choice = read_tsv(g / "layer_choice.tsv")
    assert list(choice["status"]) == ["the paper's: the last layer"]
    rule = json.loads((g / "selection.json").read_text())["ranks"]
    assert "validation MAE" not in rule["rule"]  # the knee and scree rules only
    assert not (g / "consensus.json").exists() and "stability" not in read_tsv(g / "rois.tsv")
    # one network of seed 0: the single-fit run's network
    np.testing.assert_allclose(read_tsv(g / "predictions.tsv")["predicted_age"],
                               read_tsv(first_run["group"] / "predictions.tsv")["predicted_age"], atol=1e-4)
    page = (g / "report.html").read_text()
    assert "the paper&#39;s: one network, its last layer&#39;s activations" in page
    assert "As in the original method" in page
    assert "--method paper" in (out / "logs" / "CITATION.md").read_text()
    with pytest.raises(SystemExit) as exc:
        parse_args([str(first_run["bids"]), str(out), "group", "--method", "paper", "--ensemble", "2"])
    assert exc.value.code == 2 and "--method paper explains one network" in capsys.readouterr().err
