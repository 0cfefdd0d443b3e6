"""The synthetic cohort: valid BIDS, deterministic, planted truth as documented."""

from __future__ import annotations

import json
import subprocess

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainage_xai.errors import OutputError, UsageError
from brainage_xai.imaging.templates import model_grid
from brainage_xai.simulate import PLANTED, draw_participants, main, simulate_cohort
from brainage_xai.utils.io import read_tsv

SPACE = "MNI152NLin2009cAsym"


def _maps(root, kind="label-GM_probseg"):
    table = read_tsv(root / "participants.tsv")
    out = []
    for pid in table["participant_id"]:
        path = root / "derivatives" / "simulated" / pid / "anat" / f"{pid}_space-{SPACE}_res-4_{kind}.nii.gz"
        out.append(np.asarray(nib.load(path).get_fdata(dtype=np.float32)))
    return table, np.stack(out)


def test_layout_and_tables(sim_bids):
    table = read_tsv(sim_bids / "participants.tsv")
    assert list(table.columns) == ["participant_id", "age", "sex", "site"]
    assert len(table) == 24 and table["participant_id"].is_unique
    assert table["age"].between(5, 81).all()
    assert set(table["sex"]) == {"F", "M"} and table["site"].nunique() == 3
    desc = json.loads((sim_bids / "derivatives" / "simulated" / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"]
    for pid in table["participant_id"]:
        assert (sim_bids / pid / "anat" / f"{pid}_T1w.nii.gz").is_file()
        anat = sim_bids / "derivatives" / "simulated" / pid / "anat"
        for kind in ("label-GM_probseg", "desc-stiffness_mremap"):
            img = nib.load(anat / f"{pid}_space-{SPACE}_res-4_{kind}.nii.gz")
            shape, affine = model_grid(4)
            assert img.shape == shape and np.allclose(img.affine, affine)
            assert (anat / f"{pid}_space-{SPACE}_res-4_{kind}.json").is_file()
    planted = read_tsv(sim_bids / "sourcedata" / "simulation" / "planted_dseg.tsv")
    assert (planted["trajectory"] == "decoy").sum() == 1
    assert (planted["trajectory"] != "decoy").sum() >= 5
    dseg = nib.load(sim_bids / "sourcedata" / "simulation" / "planted_dseg.nii.gz")
    assert dseg.shape == model_grid(4)[0] and np.allclose(dseg.affine, model_grid(4)[1])
    labels = np.asarray(dseg.dataobj)
    assert set(np.unique(labels)) == {0, *planted["index"]}
    traj = read_tsv(sim_bids / "sourcedata" / "simulation" / "trajectories.tsv")
    assert list(traj["participant_id"]) == list(table["participant_id"])
    assert np.allclose(traj["age"], table["age"])


def test_planted_regions_are_compact_and_named(sim_bids):
    # Most of the brain carries no age effect (so that occluding a region differs from
    # occluding a random blob), each region lies in its two balls and in its lobe.
    from brainage_xai.imaging.atlas import load_atlas
    from brainage_xai.imaging.templates import get_template

    tpl = get_template(4)
    brain = np.asarray(tpl.mask.dataobj) > 0
    dseg = nib.load(sim_bids / "sourcedata" / "simulation" / "planted_dseg.nii.gz")
    labels = np.asarray(dseg.dataobj)
    planted = read_tsv(sim_bids / "sourcedata" / "simulation" / "planted_dseg.tsv")
    atlas_img, table = load_atlas(tpl.t1)
    atlas = np.asarray(atlas_img.dataobj)
    xyz = nib.affines.apply_affine(dseg.affine, np.argwhere(labels > 0))
    values = labels[labels > 0]
    fractions = []
    for row, region in zip(planted.itertuples(), PLANTED):
        inside = labels == row.index
        fractions.append(inside.sum() / brain.sum())
        assert inside.sum() > 20, region.name
        lobe = np.isin(atlas, table.loc[table["structure"] == region.name, "index"])
        assert lobe[inside].all() and brain[inside].all(), region.name
        if region.centre is None:
            assert pd.isna(row.centre_mm) and pd.isna(row.radius_mm)  # n/a in the file
            continue
        assert [float(c) for c in row.centre_mm.split()] == list(region.centre)
        pts = xyz[values == row.index]
        d = np.minimum(np.linalg.norm(pts - region.centre, axis=1),
                       np.linalg.norm(pts - np.multiply(region.centre, (-1, 1, 1)), axis=1))
        assert d.max() <= row.radius_mm + 1e-6, region.name
        assert (pts[:, 0] > 0).any() and (pts[:, 0] < 0).any(), region.name  # both hemispheres
    assert 0.1 < sum(fractions) < 0.25, fractions


def test_bids_validator_no_errors(sim_bids, bids_validator):
    res = subprocess.run([bids_validator, "--format", "json", str(sim_bids)], capture_output=True,
                         text=True, timeout=300)
    report = json.loads(res.stdout)
    errors = [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    assert errors == [], [(e["code"], e.get("location")) for e in errors]
    assert res.returncode == 0
    assert report["summary"]["subjects"] and len(report["summary"]["subjects"]) == 24


def test_probseg_values_and_planted_effect(sim_bids):
    table, gm = _maps(sim_bids)
    assert gm.min() >= 0 and gm.max() <= 1 and np.isfinite(gm).all()
    truth = read_tsv(sim_bids / "sourcedata" / "simulation" / "trajectories.tsv")
    labels = np.asarray(nib.load(sim_bids / "sourcedata" / "simulation" / "planted_dseg.nii.gz").dataobj)
    # Each region's mean GM follows the planted effect (relative to the site's scale).
    for k, region in enumerate(PLANTED, start=1):
        mean = gm[:, labels == k].mean(axis=1) / truth["site_gm_scale"].to_numpy()
        r = np.corrcoef(mean, truth[region.name])[0, 1]
        assert r > 0.6, (region.name, r)


def test_deterministic(tmp_path, sim_bids):
    a = simulate_cohort(tmp_path / "a", n_subjects=3, resolution=8, seed=5, quiet=True, n_jobs=1)
    # Threads do not change the result: each subject has its own random stream.
    b = simulate_cohort(tmp_path / "b", n_subjects=3, resolution=8, seed=5, quiet=True, n_jobs=3)
    c = simulate_cohort(tmp_path / "c", n_subjects=3, resolution=8, seed=6, quiet=True, n_jobs=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        if rel.name.endswith(".nii.gz"):
            assert np.array_equal(nib.load(a / rel).get_fdata(), nib.load(b / rel).get_fdata()), rel
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    rel = files[[f.name.endswith("probseg.nii.gz") for f in files].index(True)]
    assert not np.array_equal(nib.load(a / rel).get_fdata(), nib.load(c / rel).get_fdata())


def test_decoy_unrelated_to_age_and_trajectories_complementary():
    table = draw_participants(3000, seed=1)
    age = table["age"].to_numpy()
    decoy = [r for r in PLANTED if r.trajectory == "decoy"][0]
    assert abs(np.corrcoef(age, table[decoy.name])[0, 1]) < 0.05
    assert table[decoy.name].std() > 2 * max(r.subject_sd for r in PLANTED if r is not decoy)
    # Each trajectory changes fastest in its own age band.
    grid = np.linspace(5, 81, 761)
    peaks = []
    for r in PLANTED:
        if r.trajectory in ("decoy", "lifespan-linear"):
            continue
        peaks.append(grid[np.argmax(np.abs(np.gradient(r.curve(grid))))])
    assert np.all(np.diff(peaks) > 8), peaks


def test_single_region_worse_than_all():
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import SplineTransformer

    table = draw_participants(1500, seed=2)
    names = [r.name for r in PLANTED if r.trajectory != "decoy"]
    age = table["age"].to_numpy()
    mean_mae = np.mean(np.abs(age - age.mean()))

    def mae(cols, model):
        pred = cross_val_predict(model, table[cols].to_numpy(), age, cv=3)
        return np.mean(np.abs(pred - age))

    all_mae = mae(names, LinearRegression())
    assert all_mae < 0.15 * mean_mae
    for name in names:
        # Even a flexible (spline) model of one region is far worse than a linear one of all.
        single = mae([name], make_pipeline(SplineTransformer(n_knots=8), LinearRegression()))
        assert single > 2.0 * all_mae, (name, single, all_mae)
        assert single > 0.3 * mean_mae, (name, single, mean_mae)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main([str(out), "--n-subjects", "2", "--resolution", "8", "--seed", "3", "--quiet"]) == 0
    assert (out / "sourcedata" / "simulation" / "simulation.json").is_file()
    assert capsys.readouterr().out == ""
    # The same call again leaves the finished dataset as it is.
    stamp = (out / "participants.tsv").stat().st_mtime_ns
    assert main([str(out), "--n-subjects", "2", "--resolution", "8", "--seed", "3", "--quiet"]) == 0
    assert (out / "participants.tsv").stat().st_mtime_ns == stamp
    # Other settings in the same folder, or a foreign folder, are refused.
    assert main([str(out), "--n-subjects", "3", "--resolution", "8", "--quiet"]) == OutputError.exit_code
    assert "other settings" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "x"), "--resolution", "2.5"])
    assert exc.value.code == 2
    with pytest.raises(UsageError, match="n_subjects"):
        simulate_cohort(tmp_path / "y", n_subjects=0)


def test_sites_differ_in_intensity(sim_bids):
    table, gm = _maps(sim_bids)
    labels = np.asarray(nib.load(sim_bids / "sourcedata" / "simulation" / "planted_dseg.nii.gz").dataobj)
    # Outside the planted regions only individual variation and noise remain.
    rest = (labels == 0) & (gm.mean(axis=0) > 0.3)
    means = pd.Series(gm[:, rest].mean(axis=1)).groupby(table["site"].to_numpy()).mean()
    assert means["site1"] > means["site2"] > means["site3"]
    assert means["site1"] / means["site3"] > 1.08


def test_stiffness_map(sim_bids):
    table, stiff = _maps(sim_bids, "desc-stiffness_mremap")
    _, gm = _maps(sim_bids)
    assert np.isfinite(stiff).all() and stiff.min() >= 0
    brain = stiff > 0
    assert 2.0 < np.median(stiff[brain]) < 4.0  # kPa
    truth = read_tsv(sim_bids / "sourcedata" / "simulation" / "trajectories.tsv")
    labels = np.asarray(nib.load(sim_bids / "sourcedata" / "simulation" / "planted_dseg.nii.gz").dataobj)
    for k, region in enumerate(PLANTED, start=1):
        mean = stiff[:, labels == k].mean(axis=1) / truth["site_stiffness_scale"].to_numpy()
        assert np.corrcoef(mean, truth[region.name])[0, 1] > 0.6, region.name
    side = json.loads(next((sim_bids / "derivatives" / "simulated").rglob("*_mremap.json")).read_text())
    assert side["Units"] == "kPa" and side["Resolution"]["4"]


def test_imperfect_registration(sim_bids):
    from brainage_xai.imaging.templates import get_template

    _, gm = _maps(sim_bids)
    template = np.asarray(get_template(4).gm.get_fdata())
    masks = gm > 0
    # Every subject is close to the template but warped a little, each differently.
    for subject in gm[:5]:
        assert 0.85 < np.corrcoef(subject.ravel(), template.ravel())[0, 1] < 0.995
    assert not np.array_equal(masks[0], masks[1])
    dice = 2 * (masks[0] & masks[1]).sum() / (masks[0].sum() + masks[1].sum())
    assert 0.85 < dice < 1.0


def test_unfinished_run_is_completed_and_foreign_folder_refused(tmp_path):
    out = simulate_cohort(tmp_path / "u", n_subjects=2, resolution=8, seed=1, quiet=True)
    marker = out / "sourcedata" / "simulation" / "simulation.json"
    victim = next((out / "derivatives").rglob("*_probseg.nii.gz"))
    expected = nib.load(victim).get_fdata()
    victim.unlink()
    marker.unlink()  # as if the run had died
    simulate_cohort(out, n_subjects=2, resolution=8, seed=1, quiet=True)
    assert marker.is_file() and np.array_equal(nib.load(victim).get_fdata(), expected)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="other files"):
        simulate_cohort(foreign, n_subjects=2, resolution=8, quiet=True)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_dataset_of_an_older_model_is_not_reused(tmp_path, monkeypatch):
    import brainage_xai.simulate.cohort as simulate

    out = simulate_cohort(tmp_path / "m", n_subjects=2, resolution=8, seed=1, quiet=True)
    params = json.loads((out / "sourcedata" / "simulation" / "simulation.json").read_text())
    assert params["parameters"]["model"] == simulate.model_fingerprint()
    monkeypatch.setattr(simulate, "GM_NOISE_SD", 0.05)
    with pytest.raises(OutputError, match=r"\(model differ\)"):
        simulate_cohort(out, n_subjects=2, resolution=8, seed=1, quiet=True)


def test_site_effects_give_sites_their_own_ages_and_smoothness(tmp_path):
    from brainage_xai.simulate import draw_participants

    table = draw_participants(300, seed=1, site_effects=True)
    means = table.groupby("site_index")["age"].mean().to_numpy()
    assert means[0] + 15 < means[1] < means[2] - 10  # the sites differ in age distribution
    plain = draw_participants(300, seed=1)
    assert np.ptp(plain.groupby("site_index")["age"].mean().to_numpy()) < 10
    # the same subjects' maps: smoother at the later sites (less voxel-to-voxel variation)
    out = simulate_cohort(tmp_path / "sites", n_subjects=6, resolution=8, seed=2, quiet=True,
                          site_effects=True, n_jobs=1)
    params = json.loads((out / "sourcedata" / "simulation" / "simulation.json").read_text())["parameters"]
    assert params["site_effects"] is True
    rows = read_tsv(out / "participants.tsv")
    roughness = {}
    for _, row in rows.iterrows():
        path = next((out / "derivatives" / "simulated" / row["participant_id"] / "anat").glob("*_probseg.nii.gz"))
        data = np.asarray(nib.load(str(path)).dataobj, dtype=float)
        inside = data > 0.05
        roughness.setdefault(int(row["site"][4:]), []).append(np.abs(np.diff(data, axis=0))[inside[1:]].mean())
    sites = sorted(roughness)
    assert len(sites) >= 2
    assert np.mean(roughness[sites[0]]) > np.mean(roughness[sites[-1]])
