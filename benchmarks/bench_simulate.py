"""Benchmark of the synthetic cohort: generation speed and how much age it carries.

Speed: subjects per second writing the cohort, serially (the baseline) and with threads
(``--n-jobs``), in the same run. Learnability: cross-validated MAE of age models fitted on
features measured from the written maps (region means of the grey-matter maps, each
divided by the subject's mean outside the planted regions, which removes the global site
and sex factors), against
the baseline of predicting the mean age. Issue 4's goal for a CNN is a test MAE at most
0.3 x that baseline; region means are what a CNN can reach with little data, so the rows
show (i) the whole design is learnable well below that goal, (ii) no single region is,
(iii) the decoy and global grey matter carry no age.

Run: ``.venv/bin/python benchmarks/bench_simulate.py [--n-subjects 200] [--resolution 2]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def _features(root: Path, resolution: int):
    from brainage_xai.atlas import load_atlas
    from brainage_xai.utils.io import read_tsv

    table = read_tsv(root / "participants.tsv")
    planted = np.asarray(nib.load(root / "sourcedata/simulation/planted_dseg.nii.gz").dataobj)
    names = read_tsv(root / "sourcedata/simulation/planted_dseg.tsv")
    atlas = None
    planted_f, atlas_f, glob = [], [], []
    for pid in table["participant_id"]:
        img = nib.load(root / "derivatives/simulated" / pid / "anat"
                       / f"{pid}_space-MNI152NLin2009cAsym_res-{resolution}_label-GM_probseg.nii.gz")
        gm = np.asarray(img.get_fdata(dtype=np.float32))
        if atlas is None:
            atlas = np.asarray(load_atlas(img)[0].dataobj)
            # Reference: grey matter outside every planted region (insula, cingulate,
            # brainstem, unlabelled), so that dividing by it removes the global site and
            # sex factors without mixing the planted regions into each other.
            reference = (planted == 0) & (gm > 0)
        brain = gm[reference].mean()
        glob.append(gm[gm > 0].mean())
        planted_f.append([gm[planted == k].mean() / brain for k in names["index"]])
        atlas_f.append([gm[atlas == k].mean() / brain for k in range(1, 19)])
    return table, names, np.array(planted_f), np.array(atlas_f), np.array(glob)[:, None]


def _cv_mae(x, age, model, seed=0):
    from sklearn.model_selection import KFold, cross_val_predict

    cv = KFold(5, shuffle=True, random_state=seed)
    pred = cross_val_predict(model, x, age, cv=cv)
    return float(np.mean(np.abs(pred - age)))


def main(argv=None) -> int:
    from sklearn.dummy import DummyRegressor
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import LinearRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import SplineTransformer, StandardScaler

    from brainage_xai.simulate import simulate_cohort

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-subjects", type=int, default=200)
    p.add_argument("--resolution", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--skip-speed", action="store_true", help="one serial run only")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        runs = [("serial (baseline)", 1)] + ([] if args.skip_speed else [(f"{args.n_jobs} threads", args.n_jobs)])
        for name, jobs in runs:
            out = Path(tmp) / f"jobs{jobs}"
            t0 = time.perf_counter()
            simulate_cohort(out, n_subjects=args.n_subjects, resolution=args.resolution,
                            seed=args.seed, quiet=True, n_jobs=jobs)
            rows.append((name, time.perf_counter() - t0))
        print(f"\nGeneration: {args.n_subjects} subjects at {args.resolution} mm")
        print(f"{'run':<22}{'seconds':>10}{'subjects/s':>12}{'speed-up':>10}")
        for name, sec in rows:
            print(f"{name:<22}{sec:>10.1f}{args.n_subjects / sec:>12.2f}{rows[0][1] / sec:>10.2f}")

        table, names, planted, atlas, glob = _features(Path(tmp) / "jobs1", args.resolution)
    age = table["age"].to_numpy()
    lin = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    spline = make_pipeline(StandardScaler(), SplineTransformer(n_knots=6), LinearRegression())
    gbm = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, random_state=0)
    is_decoy = (names["trajectory"] == "decoy").to_numpy()
    models = [
        ("mean age (baseline)", np.zeros((len(age), 1)), DummyRegressor()),
        ("linear, planted regions", planted[:, ~is_decoy], lin),
        ("spline, planted regions", planted[:, ~is_decoy], make_pipeline(
            StandardScaler(), SplineTransformer(n_knots=6), RidgeCV(alphas=np.logspace(-3, 3, 13)))),
        ("linear, 18 atlas regions", atlas, lin),
        ("boosting, 18 atlas regions", atlas, gbm),
        ("spline, global GM mean", glob, spline),
    ]
    for k, row in names.iterrows():
        models.append((f"spline, {row['name']} only ({row['trajectory']})", planted[:, [k]], spline))
    print(f"\nAge from region means of the GM maps (5-fold CV, {len(age)} subjects)")
    print(f"{'model':<48}{'MAE (y)':>9}{'x baseline':>12}")
    base = None
    for name, x, model in models:
        mae = _cv_mae(x, age, model)
        base = base or mae
        print(f"{name:<48}{mae:>9.2f}{mae / base:>12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
