"""Do the RoIs land on the planted regions? Ground truth on the simulated cohort.

For each setting (input resolution x decomposed layer) this script simulates a cohort
(:func:`brainage_xai.simulate.simulate_cohort`), trains the network, decomposes the
chosen layer's training activations, builds the RoIs with the stride geometry and prints,
for each planted region and the decoy of ``sourcedata/simulation/planted_dseg.nii.gz``:

- ``roi``: the best spatial correlation (within the brain) of the region's mask with any
  RoI, and which RoI;
- ``gradcam``: the same for the GradCAM average (the baseline, measured in the same run);
- ``ceiling``: the resolution ceiling, the mask's correlation with itself taken down to
  the feature grid and back up;
- ``null95``: the 95th percentile of the best correlation with spatially permuted RoIs
  (feature voxels of each U3 column shuffled within the brain), and ``rand``: the best
  correlation with the RoIs of the same architecture with random weights;
- the occlusion test per RoI (test MAE increase vs 95th percentile of random blobs).

Then it checks the issue's goal: every planted region matched above the null and above
GradCAM, the decoy by none, median best correlation >= 0.6 x ceiling, every matched RoI
above its occlusion null.

Usage::

    python benchmarks/bench_explanations.py --resolution 4 --layers block5 block4 \\
        --subjects 200 --epochs 40 --ranks 6 6 --work /tmp/bench-expl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def _activations(model, module, x, device, batch_size=8):
    import torch

    store = {}
    handle = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for s in range(0, x.shape[0], batch_size):
                model(x[s : s + batch_size].to(device))
                a = store["a"].float()
                out.append(a.reshape(a.shape[0], a.shape[1], -1).cpu().numpy())
    finally:
        handle.remove()
    return np.concatenate(out)


def _decompose(A_train, ranks, l1, seed):
    from brainage_xai.decomposition.constrained_tucker import fit_constrained_tucker

    res = fit_constrained_tucker(A_train, tuple(ranks), l1=l1, random_state=seed,
                                 n_iter_max=300)
    return [np.asarray(f) for f in res.factors], res


def _best(maps, target, within):
    from brainage_xai.rois import spatial_correlation

    corrs = [spatial_correlation(m, target, within) for m in maps]
    k = int(np.argmax(corrs))
    return corrs[k], k


def _permuted_null(u3, geometry, masks, brain, feat_brain, rng, n_perm):
    """Per region: best correlation with RoIs whose feature voxels are shuffled."""
    from brainage_xai.rois import columns_to_feature_maps, upsample

    best = np.zeros((n_perm, len(masks)))
    idx = np.flatnonzero(feat_brain.ravel())
    for p in range(n_perm):
        perm = u3.copy()
        for r in range(u3.shape[1]):
            perm[idx, r] = u3[rng.permutation(idx), r]
        maps = upsample(columns_to_feature_maps(perm, geometry.feature_shape), geometry)
        for k, mask in enumerate(masks):
            best[p, k] = _best(maps, mask, brain)[0]
    return np.percentile(best, 95, axis=0)


def run_setting(args, resolution, layers, device):
    import nibabel as nib
    import torch

    from brainage_xai import gradcam, occlusion, rois
    from brainage_xai.model.data import input_normalisation, load_maps, standardise_inputs
    from brainage_xai.model.network import PreActResNet3d
    from brainage_xai.model.training import TrainSettings, fit, stratified_split
    from brainage_xai.simulate import simulate_cohort
    from brainage_xai.utils.io import read_tsv

    t0 = time.perf_counter()
    root = simulate_cohort(Path(args.work) / f"sim-res{resolution}", n_subjects=args.subjects,
                           resolution=resolution, seed=args.seed, quiet=True,
                           n_jobs=args.jobs)
    t_sim = time.perf_counter() - t0
    parts = read_tsv(root / "participants.tsv")
    paths = [next((root / "derivatives" / "simulated" / p / "anat").glob(
        f"{p}_*_res-{resolution}_label-GM_probseg.nii.gz")) for p in parts["participant_id"]]
    maps, affine = load_maps(paths)
    truth_img = nib.load(root / "sourcedata" / "simulation" / "planted_dseg.nii.gz")
    truth_tsv = read_tsv(root / "sourcedata" / "simulation" / "planted_dseg.tsv")
    truth = np.asarray(truth_img.dataobj).astype(int)
    if truth.shape != maps.shape[2:]:
        raise SystemExit(f"planted_dseg grid {truth.shape} != maps {maps.shape[2:]}")
    brain = maps.mean(axis=(0, 1)) > 0.1
    split = stratified_split(list(parts["participant_id"]), parts["age"].to_numpy(),
                             seed=args.seed)
    split_col = split.set_index("participant_id").loc[parts["participant_id"], "split"]
    split_arr = split_col.to_numpy()
    tr, va, te = (split_arr == s for s in ("train", "val", "test"))
    norm = input_normalisation(maps[tr])
    x = standardise_inputs(maps, norm)
    age = parts["age"].to_numpy(dtype=float)
    y_mean, y_std = age[tr].mean(), age[tr].std()
    y = torch.from_numpy(((age - y_mean) / y_std).astype(np.float32))[:, None]
    torch.manual_seed(args.seed)
    net = PreActResNet3d(widths=args.widths, depths=args.depths)
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    t0 = time.perf_counter()
    fit(net, x[tr], y[tr], x[va], y[va], settings, y_scale=[y_std], device=device, quiet=True)
    t_train = time.perf_counter() - t0
    net.to(device).eval()
    predict = occlusion.torch_predictor(net, device=device, scale=y_std, shift=y_mean)
    x_np = x[:, 0].numpy()
    pred = predict(x_np)
    test_mae = float(np.mean(np.abs(pred[te] - age[te])))
    mean_mae = float(np.mean(np.abs(y_mean - age[te])))
    torch.manual_seed(args.seed + 1)
    rand_net = PreActResNet3d(widths=args.widths, depths=args.depths).to(device).eval()
    template = nib.Nifti1Image(np.zeros(maps.shape[2:], np.float32), affine)
    labels = truth_tsv["index"].astype(int).tolist()
    names = [f"{n} ({t})" for n, t in zip(truth_tsv["name"], truth_tsv["trajectory"])]
    masks = [(truth == k) for k in labels]
    rng = np.random.default_rng(args.seed)
    rows, summaries = [], []
    for layer in layers:
        module = net.activation_module(layer)
        geo = rois.feature_geometry(net, module, maps.shape[2:])
        A = _activations(net, module, x, device)
        (u1, _, u3), res = _decompose(A[tr], args.ranks, args.l1, args.seed)
        comps = rois.roi_components(u3, geo, template, mask=brain)
        roi_maps = np.moveaxis(comps.get_fdata(), -1, 0)
        cam_img, _ = gradcam.average_gradcam(net, module, list(x_np), geo, template,
                                             mask=brain, device=device)
        cam = cam_img.get_fdata()
        A_r = _activations(rand_net, rand_net.activation_module(layer), x, device)
        (_, _, u3_r), _ = _decompose(A_r[tr], args.ranks, args.l1, args.seed)
        rand_maps = np.moveaxis(rois.roi_components(u3_r, geo, template, mask=brain)
                                .get_fdata(), -1, 0)
        feat_brain = rois.downsample(brain.astype(float), geo) > 0.5
        null95 = _permuted_null(u3, geo, masks, brain, feat_brain, rng, args.permutations)
        occ, _ = occlusion.occlusion_test(
            predict, x_np[te], age[te], rois.roi_masks(comps), x_np[tr].mean(axis=0), brain,
            n_random=args.draws, seed=args.seed,
            zooms=tuple(float(z) for z in np.abs(np.diag(affine))[:3]))
        for k, (name, mask) in enumerate(zip(names, masks)):
            best, which = _best(roi_maps, mask, brain)
            rows.append({
                "res": resolution, "layer": layer, "grid": "x".join(map(str, geo.feature_shape)),
                "region": name, "roi": round(best, 3), "which": f"RoI {which + 1}",
                "gradcam": round(rois.spatial_correlation(cam, mask, brain), 3),
                "ceiling": round(rois.resolution_ceiling(mask, geo, brain), 3),
                "null95": round(float(null95[k]), 3),
                "rand": round(_best(rand_maps, mask, brain)[0], 3),
                "occl_gain": round(float(occ.loc[which, "mae_increase"]), 3),
                "occl_p95": round(float(occ.loc[which, "null_p95"]), 3),
            })
        tab = pd.DataFrame([r for r in rows if r["layer"] == layer and r["res"] == resolution])
        planted = tab[~tab["region"].str.contains("decoy")]
        decoy = tab[tab["region"].str.contains("decoy")]
        summaries.append({
            "res": resolution, "layer": layer, "test_mae": round(test_mae, 2),
            "mean_predictor_mae": round(mean_mae, 2), "rel_error": round(float(res.rel_error), 3),
            "planted_above_null": int((planted["roi"] > planted["null95"]).sum()),
            "planted_above_gradcam": int((planted["roi"] > planted["gradcam"]).sum()),
            "n_planted": len(planted),
            "decoy_matched": bool((decoy["roi"] > decoy["null95"]).any()),
            "median_best_over_ceiling": round(float(np.median(planted["roi"] / planted["ceiling"])), 3),
            "matched_occlusion_above_null": int((planted["occl_gain"] > planted["occl_p95"]).sum()),
            "rois_occlusion_above_null": f"{int(occ['above_null'].sum())}/{len(occ)}",
            "sim_s": round(t_sim, 1), "train_s": round(t_train, 1),
        })
    return rows, summaries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench-explanations-work")
    parser.add_argument("--resolution", type=int, nargs="+", default=[4])
    parser.add_argument("--layers", nargs="+", default=["block5", "block4"])
    parser.add_argument("--subjects", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--depths", type=int, nargs="+", default=[3, 4, 6, 4, 3])
    parser.add_argument("--ranks", type=int, nargs=2, default=[6, 6])
    parser.add_argument("--l1", type=float, default=0.0)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--permutations", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the tables here")
    args = parser.parse_args(argv)
    from brainage_xai.model.training import resolve_device

    device = resolve_device(args.device)
    rows, summaries = [], []
    for res in args.resolution:
        r, s = run_setting(args, res, args.layers, device)
        rows += r
        summaries += s
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 30)
    print(f"device: {device}; subjects {args.subjects}; epochs {args.epochs}; ranks "
          f"{args.ranks}; l1 {args.l1}; baseline: GradCAM average of the same network")
    print(pd.DataFrame(rows).to_string(index=False))
    print()
    print(pd.DataFrame(summaries).to_string(index=False))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summaries}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
