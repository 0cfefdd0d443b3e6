"""Benchmark of the synthetic cohort: generation speed and how much age it carries.

Speed: subjects per second writing the cohort, serially (the baseline) and with threads
(``--n-jobs``), in the same run. Learnability: cross-validated MAE of age models fitted on
features measured from the written maps (region means of the grey-matter maps, each
divided by the subject's mean outside the planted regions, which removes the global site
and sex factors), against
the baseline of predicting the mean age. The goal for a CNN is a test MAE at most 0.3 x
that baseline; region means are what a CNN can reach with little data, so the rows
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
    from brainage_xai.imaging.atlas import load_atlas
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


def _load_maps(root: Path, table, resolution: int) -> np.ndarray:
    maps = []
    for pid in table["participant_id"]:
        img = nib.load(root / "derivatives/simulated" / pid / "anat"
                       / f"{pid}_space-MNI152NLin2009cAsym_res-{resolution}_label-GM_probseg.nii.gz")
        gm = np.asarray(img.get_fdata(dtype=np.float32))
        maps.append(gm / gm[gm > 0].mean())  # proportional scaling, as the participant level
    return np.stack(maps)


def _small_cnn_mae(maps, age, epochs, seed=0):
    """Test MAE of a small plain 3D CNN (60/20/20 split, best validation epoch)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    order = np.argsort(age)
    # Stratified by age: every block of five consecutive ages gives 3 train, 1 val, 1 test.
    split = np.empty(len(age), dtype=int)
    for start in range(0, len(age), 5):
        block = order[start:start + 5]
        split[block] = rng.permutation([0, 0, 0, 1, 2])[: len(block)]
    x = torch.from_numpy(maps[:, None])
    mu, sd = age[split == 0].mean(), age[split == 0].std()
    y = torch.from_numpy(((age - mu) / sd).astype(np.float32))

    def block(cin, cout):
        return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(),
                             nn.MaxPool3d(2))

    net = nn.Sequential(block(1, 8), block(8, 16), block(16, 32), block(32, 32),
                        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(32, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    train = np.flatnonzero(split == 0)

    def predict(idx):
        net.eval()
        with torch.no_grad():
            return net(x[idx]).squeeze(1).numpy() * sd + mu

    best, best_test = np.inf, np.nan
    for _ in range(epochs):
        net.train()
        for batch in np.array_split(rng.permutation(train), max(1, len(train) // 16)):
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x[batch]).squeeze(1), y[batch])
            loss.backward()
            opt.step()
        sched.step()
        val = np.flatnonzero(split == 1)
        val_mae = np.mean(np.abs(predict(val) - age[val]))
        if val_mae < best:
            test = np.flatnonzero(split == 2)
            best, best_test = val_mae, np.mean(np.abs(predict(test) - age[test]))
    test = split == 2
    mean_mae = np.mean(np.abs(age[test] - age[split == 0].mean()))
    return best_test, mean_mae


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
    p.add_argument("--cnn-epochs", type=int, default=0,
                   help="also train a small plain 3D CNN on the maps for this many epochs (CPU)")
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
        maps = _load_maps(Path(tmp) / "jobs1", table, args.resolution) if args.cnn_epochs else None
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
    if args.cnn_epochs:
        t0 = time.perf_counter()
        cnn, mean_mae = _small_cnn_mae(maps, age, args.cnn_epochs, seed=args.seed)
        print(f"\nSmall 3D CNN on the GM maps ({args.cnn_epochs} epochs, "
              f"{time.perf_counter() - t0:.0f} s), test split")
        print(f"{'model':<48}{'MAE (y)':>9}{'x baseline':>12}")
        print(f"{'training-mean age (baseline)':<48}{mean_mae:>9.2f}{1.0:>12.2f}")
        print(f"{'4-block CNN, 8-32 channels':<48}{cnn:>9.2f}{cnn / mean_mae:>12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
