"""The group report: self-contained, renders in headless Chromium, escapes dataset text."""

import json
import re
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from _tiny import tiny_net

from brainage_xai.explain import backprojection, gradcam, occlusion, rois
from brainage_xai.model.activations import feature_geometry
from brainage_xai.report import group as report
from brainage_xai.report.figures import file_uri
from brainage_xai.report.subject import subject_rois

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EVIL_LABEL = '<img src=x onerror="alert(1)">'
EVIL_COLUMN = "<b>MAE</b>"

CHECKER = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  window.__errors.push(String(e.message || (e.target && (e.target.src || e.target.outerHTML))));
}, true);
var __oe = console.error;
console.error = function () { window.__errors.push([].join.call(arguments, ' ')); __oe.apply(console, arguments); };
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                .map(function (i) { return i.alt; });
  var frames = 0, frameImgs = 0, frameBad = [];
  document.querySelectorAll('iframe').forEach(function (f) {
    try {
      var d = f.contentDocument; frames++;
      Array.prototype.forEach.call(d.images, function (i) {
        frameImgs++;
        if (!(i.complete && i.naturalWidth > 0)) frameBad.push(f.title);
      });
    } catch (err) { frameBad.push('inaccessible ' + f.title); }
  });
  var out = document.createElement('pre'); out.id = '__check';
  out.textContent = JSON.stringify({n: imgs.length, bad: bad, frames: frames,
    frameImgs: frameImgs, frameBad: frameBad, errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    """A full report context from real small images, a real tiny network and real fits.

    The predictions, scree, rank-sweep and lambda-sweep figures are drawn by the modules
    that own them (the report embeds their files) from real tables.
    """
    from nilearn.datasets import load_mni152_template

    from brainage_xai.model.prediction import compute_metrics
    from brainage_xai.report.figures import (
        plot_lambda_sweep,
        plot_loadings,
        plot_occlusion,
        plot_rank_sweep,
        plot_scree,
        save_figure,
    )
    from brainage_xai.report.figures import plot_predictions as draw_predictions
    from brainage_xai.selection import compute_scree

    rng = np.random.default_rng(0)
    template = load_mni152_template(resolution=8)
    shape = template.shape
    brain = template.get_fdata() > 0.2 * template.get_fdata().max()
    net = tiny_net()
    geo = feature_geometry(net, "features", shape)
    n_rois = 3
    u3 = np.zeros((int(np.prod(geo.feature_shape)), n_rois))
    for r, centre in enumerate([(2, 3, 3), (4, 4, 3), (3, 5, 4)]):
        fmap = np.zeros(geo.feature_shape)
        fmap[centre] = 1.0
        fmap[tuple(np.clip(np.array(centre) + 1, 0, np.array(geo.feature_shape) - 1))] = 0.5
        u3[:, r] = fmap.ravel()
    atlas = np.where(np.indices(shape)[0] < shape[0] // 2, 1, 2) * brain
    comps = rois.roi_components(u3, geo, template, mask=brain)
    dseg, _ = rois.combined_dseg(comps)
    atlas_img = nib.Nifti1Image(atlas.astype(np.int16), template.affine)
    labels = {1: "left <hemisphere>", 2: "right"}
    table = rois.atlas_overlap(comps, atlas_img, labels)
    # each RoI "back-projected to the input": here the RoI moved by two voxels
    moved = np.roll(np.moveaxis(comps.get_fdata(), -1, 0), 2, axis=1)
    bp_img = backprojection.backprojection_image(moved, template, brain)
    bp_table = backprojection.backprojection_table(bp_img, comps, mask=brain, atlas_img=atlas_img,
                                                   atlas_labels=labels)
    table = table.merge(bp_table, on="name")
    n = 30
    age = rng.uniform(10, 80, n)
    ids = [f"sub-{i:02d}" for i in range(n)]
    ids[0] = EVIL_LABEL
    split = np.array(["train"] * 18 + ["validation"] * 6 + ["test"] * 6)
    predictions = pd.DataFrame({"participant_id": ids, "split": split, "age": age,
                                "predicted_age": age + rng.normal(0, 4, n)})
    loadings = predictions[["participant_id", "split", "age"]].copy()
    loadings["RoI 1"] = 0.02 * age + rng.normal(0, 0.1, n)
    loadings["RoI 2"] = np.maximum(age - 45, 0) * 0.05 + rng.normal(0, 0.1, n)
    loadings["RoI 3"] = rng.normal(0, 1, n)
    # how much of each RoI is age, as the explanations stage adds it to rois.tsv
    from brainage_xai.explain.loadings import RELATED_R2, describe_loadings, trajectory_curves

    fits = describe_loadings(loadings, age, roi_columns=["RoI 1", "RoI 2", "RoI 3"])
    table["cv_r2"] = fits["cv_r2"].to_numpy()
    table["target_related"] = table["cv_r2"] >= RELATED_R2
    inputs = [rng.random(shape).astype(np.float32) for _ in range(6)]
    cam_img, _ = gradcam.average_gradcam(net, "features", inputs, geo, template, mask=brain)
    occ = occlusion.occlusion_test(
        occlusion.torch_predictor(net, scale=10, shift=40), np.stack(inputs), age[-6:],
        rois.roi_masks(comps), np.mean(inputs, axis=0), brain, n_random=20,
        zooms=(8.0, 8.0, 8.0))
    figures = tmp_path_factory.mktemp("figures")
    predictions["predicted_age_corrected"] = predictions["predicted_age"]
    draw_predictions(predictions, "age", compute_metrics(predictions, ["age"], {}),
                     figures / "predictions.svg")
    scree = compute_scree(rng.random((12, 8, 30)), max_rank=8)
    plot_scree(scree, figures / "scree.png", {"R1": 3, "R2": 4})
    r12 = [(a, b, 0.5 / a + 0.01 * b, 0.6 / a + 0.02 * b + 0.05) for a in range(2, 7)
           for b in range(2, 7)]
    plot_rank_sweep(pd.DataFrame(r12, columns=["R1", "R2", "train_error", "val_error"]),
                    figures / "rank_sweep.png", {"R1": 3, "R2": 4})
    plot_lambda_sweep(pd.DataFrame({"lambda": [0.0, 0.01, 0.1, 1.0],
                                    "train_mae": [4.0, 4.1, 4.3, 5.5],
                                    "val_mae": [5.0, 4.8, 4.6, 6.0],
                                    "sparsity": [0.0, 0.2, 0.5, 0.9]}),
                      figures / "lambda_sweep.png", {"lambda": 0.1})
    roi_cols = ["RoI 1", "RoI 2", "RoI 3"]
    save_figure(plot_loadings(loadings, age, trajectory_curves(loadings, age, roi_cols), split),
                figures / "loadings.svg")
    save_figure(plot_occlusion(*occ), figures / "occlusion.svg")
    return {
        "title": "Group report <test>",
        "summary": {"Subjects": n, "Map": "volume", "Dataset <name>": "sim & co"},
        "metrics": pd.DataFrame({"predictor": ["network", "mean predictor"],
                                 "split": ["test", "test"], EVIL_COLUMN: [4.2, 15.1]}),
        "predictions": predictions,
        "figures": {name: figures / f"{name}.{'svg' if name in ('predictions', 'loadings', 'occlusion') else 'png'}"
                    for name in ("predictions", "scree", "rank_sweep", "lambda_sweep", "loadings",
                                 "occlusion")},
        "ranks": (3, 4), "rank_reason": "knee of the validation error",
        "lambda": 0.1, "lambda_reason": "smallest validation MAE",
        "rois_img": comps, "dseg_img": dseg, "rois_table": table,
        "background_img": template, "mask_img": nib.Nifti1Image(brain.astype(np.uint8),
                                                                 template.affine),
        "loadings": loadings, "loading_fits": fits, "gradcam_img": cam_img, "occlusion": occ,
        "backprojected_img": bp_img,
        "subjects": [{"label": i, "href": f"{i}.html", "split": str(sp), "true": float(a), "predicted": float(pa)}
                     for i, sp, a, pa in zip(ids, split, age, predictions["predicted_age"])],
    }


@pytest.fixture(scope="module")
def rendered(context, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    report.render_group_report(context, out)
    return out


def test_report_is_self_contained_and_escapes_dataset_text(rendered, context):
    html = rendered.read_text()
    # no request leaves the file: every src is a data URI, no remote link or script
    assert not re.findall(r"""(?:src|href)=["'](?:https?:)?//""", html)
    srcs = re.findall(r"""<img[^>]*\ssrc=["']([^"']+)""", html)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert EVIL_LABEL not in html and "&lt;img src=x onerror=" in html
    assert "<b>MAE</b>" not in html and "&lt;b&gt;MAE&lt;/b&gt;" in html
    assert "Group report &lt;test&gt;" in html
    assert "left &lt;hemisphere&gt;" in html
    for section in ("summary", "ranks", "rois", "loadings", "gradcam", "occlusion", "methods"):
        assert f'id="{section}"' in html
    assert "equals CAM" in html and "Selvaraju" in html
    # the stage figures are the owners' files, embedded byte for byte
    for name, alt in (("scree", "scree plots"), ("rank_sweep", "rank sweep"),
                      ("lambda_sweep", "lambda sweep"), ("predictions", "predicted vs true age"),
                      ("loadings", "loadings vs age"), ("occlusion", "occlusion test")):
        path = context["figures"][name]
        uri = file_uri(path)
        assert f'src="{uri}" alt="{alt}"' in html, name
    assert "smallest validation MAE" in html
    assert "RoI 1: loadings rise linearly" in html
    # one viewer, and a selector with every RoI
    assert html.count('class="viewer"') == 1
    assert re.findall(r'<option value="\d">([^<]*)</option>', html) == ["RoI 1", "RoI 2", "RoI 3"]
    # each RoI's back-projection under it, with the region it comes from (escaped)
    assert html.count("Back-projected to the input") == 3
    assert html.count('back-projected, glass brain"') == 3
    assert re.search(r"mostly (left &lt;hemisphere&gt;|right); spatial correlation\s+with the RoI", html)
    # how much of each RoI is age; the noise RoI is said to be mostly other variation
    assert len(re.findall(r"Age predicts \d+&nbsp;% of\s+this RoI's loadings", html)) == 3
    assert "<h3>RoI 3 (mostly not age)</h3>" in html and html.count("(mostly not age)") == 1
    assert "it does not explain age" in html
    # the summary's RoIs at a glance: each RoI's two readings, as the tables give them
    assert "<h3>RoIs at a glance</h3>" in html and "<th>loading comes from</th>" in html
    occ_table = context["occlusion"][0].set_index("roi")
    for _, row in context["rois_table"].iterrows():
        relied = bool(occ_table.loc[row["name"], "above_null"])
        reading = report.READINGS[(bool(row["target_related"]), relied)].format(target="age")
        share = f"{100 * row['cv_r2']:.0f} %"
        assert re.search(rf"<td>{row['name']}</td><td>[^<]*</td><td>[^<]*</td><td>{share}</td>"
                         rf"<td>[^<]*</td><td>{re.escape(reading)}</td>", html), row["name"]
    assert re.search(r"Of the 3 RoIs, \d follows? age and the network relies on (it|them)", html)


def test_roi_findings_combine_the_two_readings():
    rois_table = pd.DataFrame({
        "name": [f"RoI {r}" for r in range(1, 6)],
        "region": ["left frontal lobe", "right <b>parietal</b> lobe", "cerebellum", "deep grey", "n/a"],
        "cv_r2": [0.91, 0.62, 0.10, 0.0, np.nan],
        "target_related": ["True", "True", "False", "False", "False"],  # as read from rois.tsv
    })
    occ = pd.DataFrame({
        "roi": [f"RoI {r}" for r in range(1, 6)],
        "mae_increase": [0.8, 0.01, 1.2, 0.02, np.nan],  # RoI 5: empty after thresholding
        "null_p95": [0.2, 0.05, 0.1, 0.04, np.nan],
        "above_null": [True, False, True, False, False],
    })
    f = report.roi_findings(rois_table, occ, target="age")
    assert list(f.columns) == ["RoI", "region", "age share", "occlusion", "reading"]
    assert f["reading"].tolist() == [
        "follows age; the network relies on it",
        "follows age; the network relies on it no more than on random blobs",
        "mostly other variation, yet the network relies on it",
        "mostly other variation",
        "empty after thresholding",
    ]
    assert f["age share"].tolist()[:2] == ["91 %", "62 %"] and f.loc[4, "occlusion"] == "n/a"
    assert f.loc[0, "occlusion"] == "0.80 vs 0.20 years"
    # The sentence accounts for every RoI, by reading.
    assert report.findings_sentence(f) == (
        "Of the 5 RoIs, 1 follows age and the network relies on it (RoI 1); "
        "1 follows age, but the network relies on it no more than on random blobs (RoI 2); "
        "1 is mostly other variation, yet the network relies on it (RoI 3); "
        "1 is mostly other variation (RoI 4); 1 is empty after thresholding (RoI 5).")
    # none supported by both readings: said, with where the others stand (the H200's run)
    g = f.assign(reading=["follows age; the network relies on it no more than on random blobs"] * 3
                 + ["empty after thresholding"] * 2)
    assert report.findings_sentence(g) == (
        "Of the 5 RoIs, 0 follow age and the network relies on them; 3 follow age, but the "
        "network relies on them no more than on random blobs (RoI 1, RoI 2, RoI 3); "
        "2 are empty after thresholding (RoI 4, RoI 5).")
    # one reading alone: no claim about the other
    assert report.findings_sentence(report.roi_findings(rois_table, None)) == (
        "Of the 5 RoIs, 2 follow age (RoI 1, RoI 2); 3 are mostly other variation (RoI 3, RoI 4, RoI 5).")
    assert report.findings_sentence(report.roi_findings(rois_table[["name", "region"]], occ)) == (
        "Of the 5 RoIs, the network relies on 2 (RoI 1, RoI 3); the network relies on 2 no more "
        "than on random blobs (RoI 2, RoI 4); 1 is empty after thresholding (RoI 5).")
    # one reading alone (a run without the occlusion test, or a rois.tsv without cv_r2)
    assert report.roi_findings(rois_table, None)["reading"].tolist()[:3] == [
        "follows age", "follows age", "mostly other variation"]
    assert report.roi_findings(rois_table[["name", "region"]], occ)["reading"].tolist()[:2] == [
        "the network relies on it", "the network relies on it no more than on random blobs"]
    assert report.roi_findings(None, None) is None
    # with the back-projection's region, where each loading comes from
    back = report.roi_findings(rois_table.assign(input_region=["left frontal lobe", "deep grey", np.nan,
                                                               "deep grey", np.nan]), occ)
    assert list(back.columns) == ["RoI", "region", "loading comes from", "age share", "occlusion", "reading"]
    assert back["loading comes from"].tolist() == ["left frontal lobe", "deep grey", "n/a", "deep grey", "n/a"]


def _chromium(args, cwd):
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--allow-file-access-from-files", "--hide-scrollbars", "--enable-logging=stderr",
         "--v=0", "--virtual-time-budget=15000", f"--user-data-dir={cwd}/profile", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd,
    )


def test_report_renders_in_headless_chromium(rendered, tmp_path):
    assert CHROMIUM, "Debian's chromium is missing: apt-get install chromium (.ci/run does)"
    html = rendered.read_text()
    checked = tmp_path / "checked.html"
    checked.write_text(html.replace("<head>", "<head>\n" + CHECKER, 1))
    dom = _chromium(["--dump-dom", checked.as_uri()], tmp_path)
    match = re.search(r'<pre id="__check">(.*?)</pre>', dom.stdout, re.S)
    assert match, dom.stderr[-2000:]
    result = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["n"] >= 16 and result["bad"] == []
    assert result["frames"] == 1 and result["frameImgs"] >= 3 and result["frameBad"] == []
    assert result["errors"] == []
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line
               and re.search(r"Uncaught|Error|Failed to load", line)]
    assert console == []
    # the escaped label is text on the page, not an element
    assert "&lt;img src=x onerror=" in dom.stdout and 'onerror="alert(1)">' not in dom.stdout

    shot = tmp_path / "shot.png"
    run = _chromium([f"--screenshot={shot}", "--window-size=1200,1600", rendered.as_uri()],
                    tmp_path)
    assert shot.exists(), run.stderr[-2000:]
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 0.05
    assert len(np.unique((pixels.reshape(-1, 3) * 255).astype(np.uint8), axis=0)) > 50


def test_subject_partial_renders_loadings(context):
    info = subject_rois(EVIL_LABEL, context["predictions"], context["loadings"])
    assert [roi for roi, _, _ in info["loadings"]] == ["RoI 1", "RoI 2", "RoI 3"]
    from brainage_xai.report import render

    html = render("group_subject_rois.html", subject=info)
    assert "predicted age" in html and "RoI 3" in html
    assert info["gap"] == pytest.approx(info["predicted"] - info["true"])


def test_missing_figures_are_dropped(context, tmp_path):
    # --ranks and --lambda given: no sweep figures exist, the page still renders
    figures = dict(context["figures"], rank_sweep=None, lambda_sweep=tmp_path / "absent.png")
    small = {k: context[k] for k in ("title", "predictions", "ranks", "lambda")}
    out = report.render_group_report({**small, "figures": figures}, tmp_path / "r.html")
    html = out.read_text()
    assert 'alt="scree plots"' in html and 'alt="rank sweep"' not in html
    assert 'alt="lambda sweep"' not in html


def _subject_page_context() -> dict:
    """What :func:`brainage_xai.report.subject.subject_page` gives ``subject.html``."""
    qc = {"DeclaredSpace": "MNI152NLin2009cAsym", "Orientation": "RAS", "VoxelSize": [8.0] * 3,
          "Dice": 0.9, "Correlation": 0.9, "CentroidOffsetMM": 1.0, "Coverage": 1.0,
          "Passed": True, "Thresholds": {"Dice": 0.7, "Correlation": 0.5,
                                         "CentroidOffsetMM": 10, "Coverage": 0.9}}
    return dict(subject="01", map_name="volume", source="bids:raw:x.nii.gz",
                template={"name": "MNI152NLin2009cAsym", "source": "nilearn",
                          "description": "ICBM 2009"},
                resolution=8, grid_shape=[1, 2, 3], qc=qc,
                normalisation={"Method": "mean", "Factor": 1.0, "OriginalMean": 1.0,
                               "ReferenceMean": 1.0},
                interpolation="spline", figure="f.svg",
                outputs={"map": "m", "sidecar": "s", "activations": None})


def test_subject_page_carries_the_group_section(context):
    from brainage_xai import report as reports

    info = subject_rois(EVIL_LABEL, context["predictions"], context["loadings"])
    page = _subject_page_context()
    plain = reports.render("subject.html", **page)
    assert 'id="subject-rois"' not in plain and 'id="registration"' in plain
    with_group = reports.render("subject.html", **page, group_rois=info)
    assert 'id="subject-rois"' in with_group and "RoI 2" in with_group
    assert f"{info['predicted']:.2f}" in with_group and "sub-01" in with_group
    assert EVIL_LABEL not in with_group


PROBE = """<script>
window.addEventListener('load', function () {
  function done(result) {
    var out = document.createElement('pre'); out.id = '__probe';
    out.textContent = JSON.stringify(result);
    document.body.appendChild(out);
  }
  (%s)(done);
});
</script>"""


def _probe(page, js, tmp_path, name="probed.html", size="1300,2000"):
    """Open ``page`` in headless Chromium with ``js`` (a function of ``done``) run after load;
    return what it passed to ``done``."""
    probed = page.parent / name
    probed.write_text(page.read_text().replace("<head>", "<head>\n" + PROBE % js, 1))
    dom = _chromium([f"--window-size={size}", "--dump-dom", probed.as_uri()], tmp_path)
    match = re.search(r'<pre id="__probe">(.*?)</pre>', dom.stdout, re.S)
    assert match, dom.stderr[-2000:]
    return json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&")
                      .replace("&lt;", "<").replace("&gt;", ">"))


CAPTIONS = """function (done) {
  var figures = Array.prototype.slice.call(document.querySelectorAll('figure'));
  var media = Array.prototype.slice.call(document.querySelectorAll('img, iframe'));
  done({
    figures: figures.length,
    uncaptioned: figures.filter(function (f) {
      var c = f.querySelector('figcaption'); return !c || c.textContent.trim().length < 40;
    }).map(function (f) { var i = f.querySelector('img, iframe'); return i && (i.alt || i.title); }),
    outside: media.filter(function (m) { return !m.closest('figure'); }).map(function (m) { return m.alt || m.title; }),
    width: document.documentElement.scrollWidth,
    wide: Array.prototype.slice.call(document.querySelectorAll('body *')).filter(function (e) {
      return e.getBoundingClientRect().right > 1300 && !e.closest('.table-wrap');
    }).map(function (e) { return e.tagName + '#' + e.id; }).slice(0, 5)
  });
}"""


def test_every_figure_has_a_caption_and_the_page_fits_1300_pixels(rendered, tmp_path):
    assert CHROMIUM, "Debian's chromium is missing: apt-get install chromium (.ci/run does)"
    result = _probe(rendered, CAPTIONS, tmp_path)
    # figures: 6 stage figures, the combined map, GradCAM, 2 per RoI, the viewer
    assert result["figures"] >= 6 + 2 + 2 * 3 + 1
    assert result["uncaptioned"] == [] and result["outside"] == []
    assert result["width"] <= 1300 and result["wide"] == []


VIEWER = """function (done) {
  var select = document.getElementById('roi-select'), frame = document.getElementById('roi-viewer');
  var data = JSON.parse(document.getElementById('roi-viewer-data').textContent);
  function overlay() { return frame.contentDocument.querySelector('img[alt="overlay"]').src; }
  function drawn() {
    var c = frame.contentDocument.querySelector('canvas'), px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    var seen = {}; for (var i = 0; i < px.length; i += 4 * 97) { seen[px[i] + ',' + px[i + 1] + ',' + px[i + 2]] = 1; }
    return Object.keys(seen).length;
  }
  var before = {roi: frame.getAttribute('data-roi'), overlay: overlay() === 'data:image/png;base64,' + data.rois[0].overlay,
                colours: drawn()};
  frame.addEventListener('load', function () {
    setTimeout(function () {
      done({before: before, after: {roi: frame.getAttribute('data-roi'), options: select.options.length,
            overlay: overlay() === 'data:image/png;base64,' + data.rois[2].overlay, colours: drawn(),
            title: JSON.parse(data.rois[2].params).title}});
    }, 500);
  }, {once: true});
  select.value = '2';
  select.dispatchEvent(new Event('change'));
}"""


def test_roi_selector_switches_the_one_viewer(rendered, tmp_path):
    assert CHROMIUM
    result = _probe(rendered, VIEWER, tmp_path)
    before, after = result["before"], result["after"]
    assert before["roi"] == "RoI 1" and before["overlay"] and before["colours"] > 5
    assert after["options"] == 3 and after["roi"] == "RoI 3" and after["title"] == "RoI 3"
    assert after["overlay"] and after["colours"] > 5


FILTER = """function (done) {
  var input = document.getElementById('subject-filter');
  var rows = function () { return Array.prototype.filter.call(document.querySelectorAll('#subject-table tbody tr'),
                                                              function (r) { return !r.hidden; }).length; };
  var all = rows();
  input.value = 'sub-05'; input.dispatchEvent(new Event('input'));
  var one = rows();
  input.value = 'test'; input.dispatchEvent(new Event('input'));
  done({all: all, one: one, test: rows()});
}"""


def test_subject_index_is_compact_and_searchable(rendered, tmp_path):
    html = rendered.read_text()
    index = html[html.index('<details id="subject-index">'):html.index("</details>", html.index('id="subject-index"'))]
    assert index.count("<tr>") == 31 and 'href="sub-05.html"' in index
    assert CHROMIUM
    assert _probe(rendered, FILTER, tmp_path) == {"all": 30, "one": 1, "test": 6}


LINK = """function (done) {
  var link = document.querySelector('%s');
  var frame = document.createElement('iframe');
  frame.onload = function () { done({href: link.getAttribute('href'), title: frame.contentDocument.title}); };
  frame.src = link.href;
  document.body.appendChild(frame);
}"""


def test_subject_page_and_group_report_link_each_other(context, tmp_path):
    assert CHROMIUM
    from brainage_xai import report as reports

    out = tmp_path / "out"
    (out / "group").mkdir(parents=True)
    subjects = [{"label": "sub-01", "href": "../sub-01.html", "split": "test", "true": 40.0, "predicted": 42.0}]
    small = {k: context[k] for k in ("title", "predictions", "figures")}
    group_report = report.render_group_report({**small, "subjects": subjects}, out / "group" / "report.html")
    info = subject_rois("sub-01", context["predictions"], context["loadings"], report_href="group/report.html")
    page = out / "sub-01.html"
    page.write_text(reports.render("subject.html", **_subject_page_context(), group_rois=info))
    there = _probe(page, LINK % "#group-report-link a", tmp_path)
    assert there == {"href": "group/report.html", "title": "Group report <test>"}
    back = _probe(group_report, LINK % "#subject-table a", tmp_path)
    assert back == {"href": "../sub-01.html", "title": "sub-01 · brainage-xai"}


def test_numbers_read_for_people_and_an_empty_roi_is_said_empty(context, tmp_path):
    from brainage_xai.report.tables import cell, roi_tables

    assert cell("volume_mm3", 18880.0) == "18,880\u00a0mm³" and cell("volume_mm3", 0) == "0\u00a0mm³"
    assert cell("pearson_r", -0.12345) == "-0.12" and cell("agreement", -0.001) == "0.00"
    assert cell("cv_r2", 0.617) == "62\u00a0%" and cell("target_related", "True") == "yes"
    assert cell("mae_increase", float("nan")) == "n/a" and cell("slope", 0.00393) == "0.00393"
    rois_table = context["rois_table"].copy()
    rois_table.loc[2, ["volume_mm3", "peak_x", "peak_y", "peak_z"]] = [0.0, -96.0, -132.0, -78.0]
    main, full = roi_tables(rois_table)
    assert len(main["columns"]) <= 10 < len(full["columns"])
    assert main["columns"][:4] == ["RoI", "region (most of it)", "peak (x, y, z mm)", "volume"]
    empty = dict(zip(main["columns"], main["rows"][2]))
    assert empty["region (most of it)"] == empty["peak (x, y, z mm)"] == "empty after thresholding"
    assert "-96" not in " ".join(full["rows"][2])
    assert all(re.fullmatch(r"\d{1,3}(,\d{3})*\u00a0mm³", row[3]) for row in main["rows"])
    html = report.render_group_report({**context, "rois_table": rois_table}, tmp_path / "r.html").read_text()
    assert "RoI 3 is empty after thresholding" in re.sub(r"\s+", " ", html)
    assert '<details id="roi-table-all">' in html
    # no number in scientific notation where people read it (the tables and the text)
    text = re.sub(r'(src|srcdoc)="[^"]*"|<script.*?</script>', "", html, flags=re.S)
    assert not re.search(r"\d\.\d+e[+-]\d", text)


def test_about_this_run_shows_the_command_configuration_and_logged_warnings(context, tmp_path):
    from brainage_xai.bids.derivatives import run_log_path
    from brainage_xai.config import Config
    from brainage_xai.report.run_info import about_run

    out = tmp_path / "out"
    config = Config(bids_dir=tmp_path / "bids", output_dir=out, analysis_level="group", layer="block3")
    config.write_toml(["brainage-xai", str(tmp_path / "bids"), str(out), "group", "--layer", "block3",
                       "--target", EVIL_LABEL])
    log = run_log_path(out, "group", config.run_uuid)
    log.write_text(
        "2026-01-01 10:00:00,001 brainage_xai INFO started\n"
        "2026-01-01 10:00:01,002 brainage_xai.group WARNING explanations: the maps' grid differs\n"
        "2026-01-01 10:00:02,003 py.warnings WARNING /x/rois.py:10: UserWarning: RoI 3 is empty\n"
        "  warnings.warn(msg)\n"
        "2026-01-01 10:00:03,004 py.warnings WARNING /x/rois.py:10: UserWarning: RoI 3 is empty\n"
        "  warnings.warn(msg)\n"
        "2026-01-01 10:00:04,005 brainage_xai.group DEBUG not shown\n"
        f"2026-01-01 10:00:05,006 brainage_xai ERROR label {EVIL_LABEL} failed\n"
        "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad\n")
    about = about_run(out, config.run_uuid)
    assert [(m["level"], m["count"]) for m in about["messages"]] == [("WARNING", 1), ("WARNING", 2), ("ERROR", 1)]
    assert about["messages"][2]["text"].endswith("ValueError: bad")
    assert ("layer", "block3") in about["settings"] and about["config_file"].startswith("logs/config-")
    assert about["command"].startswith("brainage-xai ") and "--layer block3" in about["command"]
    html = report.render_group_report({**context, "about": about}, tmp_path / "r.html").read_text()
    about_html = html[html.index('<section id="about">'):html.index('<section id="methods">')]
    assert "--layer block3" in about_html and "(×2)" in about_html and "RoI 3 is empty" in about_html
    assert "maps&#39; grid differs" in about_html and "ValueError: bad" in about_html
    assert EVIL_LABEL not in html and "&lt;img src=x onerror=" in about_html
    assert f"--config-file {out}/logs/config-{config.run_uuid}.toml" in about_html
    # started from Python: no command line, said so
    plain = Config(bids_dir=tmp_path / "bids", output_dir=tmp_path / "o2", analysis_level="group")
    plain.write_toml()
    assert about_run(plain.output_dir, plain.run_uuid)["command"] is None
    assert about_run(plain.output_dir, plain.run_uuid)["messages"] is None


def test_citation_boilerplate_cites_what_ran():
    from brainage_xai.report import methods

    participant = methods.participant_methods(map_name="volume", resolution="2", space="MNI152NLin2009cAsym",
                                              template_source="templateflow", grid_shape=(97, 115, 97))
    run = {"target": "<b>age</b>", "subjects": {"train": 60, "val": 20, "test": 20}, "networks": 3, "tuned": 20,
           "layer": "block4", "channels": 64, "grid": [6, 7, 6], "tensor": "deviations", "ranks": (4, 6),
           "lambda": 0.01, "method": "consensus", "consensus": {"networks": 3, "resamples": 4},
           "atlases": ["HOSPA", "Lobes"]}
    bp = methods.boilerplate(participant, {"methods": methods.methods_text(target="age", tensor="deviations"),
                                           "settings": methods.settings_sentence(run), "consensus": True,
                                           "tuned": True, "atlases": run["atlases"]})
    md = bp.markdown()
    for said in ("block4 (64 channels on a 6 x 7 x 6 feature grid)", "R1 = 4", "λ = 0.01", "--method consensus",
                 "3 networks x 4 resamples", "Interpreting age predictions from brain maps via deep neural",
                 "MNI152NLin2009cAsym", "TemplateFlow (Ciric et al., 2022)", "Optuna", "PyTorch", "scikit-learn",
                 "PyBIDS", "NiBabel", "nilearn", "U1", "proportional scaling",
                 "Harvard-Oxford subcortical atlas (Makris et al., 2006"):
        assert said in md, said
    bib = bp.bibtex()
    for key in ("brainagexai_method", "paszke2019pytorch", "pedregosa2011sklearn", "ciric2022templateflow",
                "yarkoni2019pybids", "brett_nibabel", "abraham2014nilearn", "akiba2019optuna", "fonov2011",
                "brunet2004consensus", "makris2006harvardoxford", "desikan2006"):
        assert bib.count("{" + key + ",") == 1, key
    assert bib.count("\n@") + 1 == len(bp.references) == md.count("\n- ")
    html = bp.html()
    assert "<b>age</b>" not in html and "&lt;b&gt;age&lt;/b&gt;" in html
    # the paper's method, no tuning, the template nilearn ships: said and cited so
    paper = methods.boilerplate(
        methods.participant_methods(map_name="stiffness", resolution="2", space="MNI152NLin2009cAsym"),
        {"methods": methods.methods_text(target="age", tensor="activations", method="paper"),
         "settings": methods.settings_sentence({"method": "paper", "layer": "block5", "atlases": ["Lobes"]}),
         "tuned": False, "atlases": ["Lobes"]})
    md = paper.markdown()
    assert "--method paper" in md and "As in the original method" in md and "stiffness" in md
    assert "Optuna" not in md and "Ciric" not in md and "Brunet" not in md
    assert "lobe atlas that ships with brainage-xai" in md and "Harvard-Oxford" not in md and "Makris" not in md
