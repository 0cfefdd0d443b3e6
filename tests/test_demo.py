"""``brainage-xai-demo`` on a tiny cohort: simulate, both levels, where the results are."""

import json

import pytest

from brainage_xai.demo import main


@pytest.mark.slow
def test_demo_tiny_cohort(tmp_path, capsys):
    out = tmp_path / "demo"
    # Options after "--" go to both brainage-xai calls: one epoch, fixed ranks, no sweeps.
    code = main([str(out), "--n-subjects", "10", "--resolution", "8", "--quiet",
                 "--", "--epochs", "1", "--ranks", "2", "2", "--lambda", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    bids, results = out / "bids", out / "results"
    assert f"Synthetic dataset:    {bids}" in printed
    assert f"Participant results:  {results}" in printed
    assert (bids / "participants.tsv").is_file()
    subjects = sorted(p.name for p in bids.glob("sub-*") if p.is_dir())
    assert len(subjects) == 10
    assert sorted(p.stem for p in results.glob("sub-*.html")) == subjects
    for subject in subjects:
        maps = list((results / subject / "anat").glob("*_res-8_label-GM_desc-preproc_probseg.nii.gz"))
        assert len(maps) == 1
    desc = json.loads((results / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert f"Group results:        {results / 'group'}" in printed
    report = results / "group" / "report.html"
    assert f"Group report:         {report}" in printed
    assert 'id="rois"' in report.read_text()
    page = (results / f"{subjects[0]}.html").read_text()
    assert 'id="subject-rois"' in page and "RoI 2" in page

def test_demo_bad_arguments(tmp_path, capsys):
    assert main([str(tmp_path / "demo"), "--n-subjects", "0", "--quiet"]) == 2
    assert "n_subjects must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "demo" / "results").exists()
