"""Do the RoIs land on the planted regions? Ground truth on the simulated cohort.

Evaluates the group outputs of an existing run (nothing is retrained) against
``sourcedata/simulation/planted_dseg.nii.gz`` of the simulated BIDS dataset and prints,
for each planted region and the decoy:

- ``roi`` / ``which``: the best spatial correlation (within the brain mask) of the
  region's mask with any RoI of ``*_desc-rois_components.nii.gz``, and which RoI;
- ``gradcam``: the same for the GradCAM average ``*_desc-gradcam_map.nii.gz`` (the
  baseline, from the same run and network);
- ``ceiling``: the resolution ceiling, the mask's correlation with itself taken down to
  the feature grid and back up (geometry from the components' JSON sidecar);
- ``rand95``: the issue's first null, the 95th percentile (over ``--random-networks``
  networks of the same architecture with random weights, PyTorch's initialisation) of
  the best correlation with the RoIs obtained by the same pipeline: activations of the
  same layer for the training subjects, scaled to the trained network's tensor norm so
  that the run's λ means the same, decomposed at the run's ranks and λ, upsampled. It
  keeps everything but the training: an RoI above it shows what the network learned,
  not what the architecture's receptive fields and the brain's shape give for free;
- ``perm95`` / ``shift95``: the 95th percentile of the best correlation with spatially
  permuted RoIs (the feature voxels of each column of U3 shuffled within the brain) and
  with randomly shifted RoIs (each RoI's feature map rolled by a random offset, keeping
  its size and smoothness). The goal is read against ``perm95`` (the issue's null);
  ``shift95`` is a stricter check: on fine grids (block2) shuffled maps lose their
  smoothness and any smooth map beats them, while a shifted region-sized map that keeps
  overlapping along the region's long axis can be too strict;
- ``own``: whether the best RoI is that region's own, i.e. correlates more with this
  region than with any other planted region or the decoy; otherwise the region it
  correlates with most. A region reached only by the tail of another region's RoI is
  "matched" by the numbers above but has no RoI of its own (a diagnostic; the goal does
  not use it);
- ``occl_gain`` / ``occl_p95``: the best RoI's test MAE increase when occluded and the
  95th percentile of its random same-volume blobs (``occlusion.tsv``);
- ``input`` / ``input_which``: the same for the RoIs back-projected to the input
  (``*_desc-backprojected_components.nii.gz``, when the run wrote it; a diagnostic beside
  the RoIs, not part of the goal); ``input_perm95`` their own permutation null (each
  map's voxels shuffled within the brain); ``input_related`` the same over the related
  RoIs (below);
- with ``--occlude-planted``, a positive control: the occlusion test run on the planted
  masks themselves with the run's network (``plant_gain`` / ``plant_p95``). If occluding
  the truth does not beat random blobs either, the test cannot tell at this setting.

Then the issue's goal: every planted region matched above the nulls (``rand95`` and
``perm95`` both) and above GradCAM,
the decoy by none, median best correlation >= 0.6 x ceiling, every matched RoI above its
occlusion null.

The same goal is then read on the RoIs related to the target only (``related``: the
target predicts at least ``brainage_xai.explain.loadings.RELATED_R2`` of the RoI's loadings'
variance, cross-validated, from ``loadings_vs_<target>.tsv``; the others are components
of other variation, which the report says): ``roi_related`` / ``which_related`` per region,
and ``goal_met_related`` with every related RoI (not only the matched ones) above its
occlusion null. The nulls are those of all RoIs, which can only be higher.
``goal_met_backprojected_related`` reads it once more with each related RoI placed by its
back-projected map (against ``input_perm95`` and GradCAM; the occlusion test stays on the
RoIs): a diagnostic of what the back-projection would change, not the issue's goal.

To measure another layer of the same trained network, run the group level with
``--model`` into a copy of the output directory (training is skipped), then evaluate it::

    brainage-xai-demo --subjects 200 --resolution 4 --output /tmp/demo   # or any run
    cp -r /tmp/demo/results /tmp/expl/results-block4
    brainage-xai /tmp/demo/bids /tmp/expl/results-block4 group --resolution 4 \\
        --model /tmp/expl/results-block4/group/model.safetensors --layer block4 \\
        --rank-grid 2:8
    python benchmarks/bench_explanations.py --bids /tmp/demo/bids \\
        --output /tmp/expl/results-block4 --layer block4 --occlude-planted
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"expected one {pattern} in {folder}; found {len(found)}")
    return found[0]


def _best(maps, target, within):
    from brainage_xai.explain.rois import spatial_correlation

    corrs = [spatial_correlation(m, target, within) for m in maps]
    k = int(np.argmax(corrs))
    return corrs[k], k


def _nulls(u3, geometry, masks, brain, rng, n_perm):
    """Per region: 95th percentiles of the best correlation with surrogate RoIs.

    ``permute`` shuffles the feature voxels of each column of U3 within the brain; it
    destroys the maps' smoothness, so on fine grids (block2) any smooth map beats it.
    ``shift`` rolls each RoI's feature map by a random offset per axis (wrapping), which
    keeps its size and smoothness and moves it elsewhere.
    """
    from brainage_xai.explain.rois import columns_to_feature_maps, downsample, upsample

    idx = np.flatnonzero(downsample(brain.astype(float), geometry).ravel() > 0.5)
    maps = columns_to_feature_maps(u3, geometry.feature_shape)
    best = {"permute": np.zeros((n_perm, len(masks))), "shift": np.zeros((n_perm, len(masks)))}
    for p in range(n_perm):
        perm = u3.copy()
        for r in range(u3.shape[1]):
            perm[idx, r] = u3[rng.permutation(idx), r]
        shifted = np.stack([
            np.roll(m, [int(rng.integers(n)) for n in geometry.feature_shape], axis=(0, 1, 2))
            for m in maps])
        for kind, fmaps in (("permute", columns_to_feature_maps(perm, geometry.feature_shape)),
                            ("shift", shifted)):
            up = np.clip(upsample(fmaps, geometry), 0, None) * brain
            for k, mask in enumerate(masks):
                best[kind][p, k] = _best(up, mask, brain)[0]
    return {k: np.percentile(v, 95, axis=0) for k, v in best.items()}


def input_grid_score(maps, masks, brain, rng, n_perm):
    """Maps on the input grid (back-projected RoIs): each region's correlation with each
    map ``(regions, maps)``, and per region the 95th percentile of the best correlation
    with the maps' voxels shuffled within the brain (their ``perm95``)."""
    from brainage_xai.explain.rois import spatial_correlation

    corr = np.array([[spatial_correlation(m, mask, brain) for m in maps] for mask in masks])
    inside = [m[brain] for m in maps]
    null = np.zeros((n_perm, len(masks)))
    for p in range(n_perm):
        perm = np.zeros_like(maps)
        for r, v in enumerate(inside):
            perm[r][brain] = rng.permutation(v)
        for k, mask in enumerate(masks):
            null[p, k] = max(spatial_correlation(m, mask, brain) for m in perm)
    return corr, np.percentile(null, 95, axis=0)


def run_rois(group: Path):
    """The run's RoI image, its feature geometry and the components' JSON sidecar."""
    import nibabel as nib

    from brainage_xai.explain import rois

    comps_path = _one(group, "*_desc-rois_components.nii.gz")
    sidecar = json.loads(comps_path.with_name(comps_path.name.replace(".nii.gz", ".json"))
                         .read_text())
    g = sidecar["FeatureGeometry"]
    geo = rois.FeatureGeometry(tuple(g["InputShape"]), tuple(g["FeatureShape"]),
                               tuple(g["Stride"]), tuple(g["Offset"]))
    return nib.load(str(comps_path)), geo, sidecar


def _related_rois(group: Path, n_rois: int) -> np.ndarray:
    """Which RoIs the target predicts at least RELATED_R2 of (bool per RoI).

    From ``loadings_vs_<target>.tsv``'s cross-validated RMSEs, so that runs written
    before its ``cv_r2`` column are read the same way.
    """
    from brainage_xai.explain.loadings import RELATED_R2
    from brainage_xai.utils.io import read_tsv

    fits = read_tsv(_one(group, "loadings_vs_*.tsv")).set_index("roi")
    best = fits[["cv_rmse_linear", "cv_rmse_piecewise", "cv_rmse_smooth"]].min(axis=1)
    floor = fits["cv_rmse_constant"]
    r2 = (1 - (best / floor.where(floor > 0)) ** 2).clip(lower=0).fillna(0)
    return np.array([r2.get(f"RoI {r + 1}", 0.0) >= RELATED_R2 for r in range(n_rois)])


def _inputs(out: Path, group: Path, resolution: float, device: str):
    """The run's network, its standardised inputs ``(n, X, Y, Z)``, splits and targets."""
    from brainage_xai.bids.derivatives import collect_preprocessed
    from brainage_xai.model.data import load_maps, standardise_inputs
    from brainage_xai.model.io import load_model
    from brainage_xai.model.training import resolve_device
    from brainage_xai.utils.io import read_tsv

    dev = resolve_device(device)
    model, meta = load_model(group / "model.safetensors", device=str(dev))
    model.eval()
    found = collect_preprocessed(out, meta.get("map", "volume"), resolution=resolution)
    split = read_tsv(group / "split.tsv").set_index("participant_id")["split"]
    preds = read_tsv(group / "predictions.tsv").set_index("participant_id")
    subjects = ["sub-" + s for s, _ in found]
    which = split.loc[subjects].to_numpy()
    x = standardise_inputs(load_maps([p for _, p in found])[0], meta["normalisation"]).numpy()[:, 0]
    y = preds.loc[subjects, meta["targets"][0]].to_numpy(float)
    return dev, model, meta, x, which, y


def _random_network_null(inputs, layer, geometry, masks, brain, dec, n_nets, seed,
                         tensor="activations"):
    """Per region: the best correlation with the RoIs of ``n_nets`` untrained networks.

    Returns an ``(n_nets, regions)`` array. Each network gets PyTorch's default
    initialisation under its own seed and is used in eval mode (unit BN statistics);
    its training-set activations of ``layer`` (or their channel-scaled deviations, as
    the run's ``--tensor``; with ``relevance``, weighted by that network's own output
    gradient) are scaled to the trained tensor's norm, then decomposed at the run's
    ranks and λ exactly as the run's final fit.
    """
    import torch

    from brainage_xai.decomposition import fit_constrained_tucker
    from brainage_xai.explain.rois import roi_maps
    from brainage_xai.model.activations import gradient_rms, iter_activations
    from brainage_xai.model.network import build_network
    from brainage_xai.selection import channel_scale, deviation_tensor, relevance_weight

    dev, model, meta, x, which, _ = inputs
    train = torch.from_numpy(np.ascontiguousarray(x[which == "train"][:, None]))

    def tensor_of(net):
        act = np.concatenate(list(iter_activations(net, train, layer, device=dev)))
        act = act.reshape(act.shape[0], act.shape[1], -1).astype(np.float32)
        if tensor == "activations":
            return act
        scale, weight = channel_scale(act), None
        if tensor == "relevance":
            g = gradient_rms(net, train, layer, device=dev)
            weight = relevance_weight(g.reshape(g.shape[0], -1), scale)
        return deviation_tensor(act, act.mean(axis=0), scale, weight)

    norm = float(np.linalg.norm(tensor_of(model)))
    r1, r2 = (int(r) for r in dec["rank"])
    best = np.zeros((n_nets, len(masks)))
    for i in range(n_nets):
        torch.manual_seed(seed + 1000 + i)
        act = tensor_of(build_network(meta["architecture"]).to(dev).eval())
        act *= norm / max(float(np.linalg.norm(act)), 1e-12)
        fit = fit_constrained_tucker(act, (r1, r2), l1=float(dec["l1"]), random_state=seed)
        u3 = fit.factors[2]
        up = roi_maps(u3, geometry, brain)
        for k, mask in enumerate(masks):
            best[i, k] = _best(up, mask, brain)[0]
    return best


def _occlude_planted(inputs, masks, names, brain, resolution: float, draws: int, seed: int):
    """The occlusion test with the planted masks as RoIs (positive control)."""
    from brainage_xai.explain import occlusion
    from brainage_xai.model.training import resolve_precision

    dev, model, meta, x, which, y = inputs
    norm = meta["normalisation"]
    predict = occlusion.torch_predictor(
        model, device=dev, batch_size=16, scale=float(norm["target_std"][0]),
        shift=float(norm["target_mean"][0]), dtype=resolve_precision("auto", dev))
    zooms = (float(resolution),) * 3
    table, _ = occlusion.occlusion_test(
        predict, x[which == "test"], y[which == "test"], np.stack(masks),
        x[which == "train"].mean(axis=0), brain, n_random=draws, seed=seed, zooms=zooms,
        roi_names=names)
    return table


def evaluate(args) -> tuple[pd.DataFrame, dict]:
    import nibabel as nib

    from brainage_xai.explain import rois
    from brainage_xai.imaging.templates import get_template
    from brainage_xai.utils.io import read_tsv

    bids, out = Path(args.bids), Path(args.output)
    group = out / "group"
    comps, geo, sidecar = run_rois(group)
    layer = args.layer or sidecar.get("Layer", "unknown")
    roi_maps = np.moveaxis(np.asarray(comps.dataobj, dtype=float), -1, 0)
    cam = np.asarray(nib.load(str(_one(group, "*_desc-gradcam_map.nii.gz"))).dataobj, float)
    truth_img = nib.load(str(bids / "sourcedata" / "simulation" / "planted_dseg.nii.gz"))
    truth_tsv = read_tsv(bids / "sourcedata" / "simulation" / "planted_dseg.tsv")
    truth = np.asarray(truth_img.dataobj).astype(int)
    if truth.shape != tuple(geo.input_shape) or not np.allclose(truth_img.affine, comps.affine):
        raise SystemExit(f"planted_dseg grid {truth.shape} differs from the RoIs' grid "
                         f"{geo.input_shape}: evaluate a run at the simulation's resolution")
    resolution = float(abs(comps.affine[0, 0]))
    brain = np.asarray(get_template(resolution).mask.dataobj) > 0
    dec = np.load(group / "decomposition.npz")
    u3 = dec["U3"]
    occ = read_tsv(group / "occlusion.tsv").set_index("roi")
    metrics = json.loads((group / "metrics.json").read_text())

    labels = truth_tsv["index"].astype(int).tolist()
    names = [f"{n} ({t})" for n, t in zip(truth_tsv["name"], truth_tsv["trajectory"])]
    masks = [truth == k for k in labels]
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    nulls = _nulls(u3, geo, masks, brain, rng, args.permutations)
    t_null = time.perf_counter() - t0
    inputs = None
    if args.occlude_planted or args.random_networks:
        inputs = _inputs(out, group, resolution, args.device)
    rand = None
    t_rand = 0.0
    if args.random_networks:
        t0 = time.perf_counter()
        dec_json = json.loads((group / "decomposition.json").read_text())
        rand = np.percentile(
            _random_network_null(inputs, layer, geo, masks, brain, dec_json, args.random_networks,
                                 args.seed, metrics.get("decomposition", {}).get("tensor", "activations")),
            95, axis=0)
        t_rand = time.perf_counter() - t0
    plant = None
    t_plant = 0.0
    if args.occlude_planted:
        t0 = time.perf_counter()
        plant = _occlude_planted(inputs, masks, names, brain, resolution, args.draws,
                                 args.seed).set_index("roi")
        t_plant = time.perf_counter() - t0
    t0 = time.perf_counter()
    ceilings = [rois.resolution_ceiling(mask, geo, brain) for mask in masks]
    t_ceiling = time.perf_counter() - t0
    # The RoIs back-projected to the input, when the run wrote them (runs made before do not).
    bp_found = sorted(group.glob("*_desc-backprojected_components.nii.gz"))
    bp_maps = (np.moveaxis(np.asarray(nib.load(str(bp_found[0])).dataobj, dtype=float), -1, 0)
               if bp_found else None)
    rows = []
    if bp_maps is not None:
        c_in, in_p95 = input_grid_score(bp_maps * brain, masks, brain, rng, args.permutations)
    # corr[k, r]: region k with RoI r, for the "own" diagnostic.
    corr = np.array([[rois.spatial_correlation(m, mask, brain) for m in roi_maps] for mask in masks])
    for k, (name, mask) in enumerate(zip(names, masks)):
        which = int(np.argmax(corr[k]))
        best = float(corr[k, which])
        roi = f"RoI {which + 1}"
        owner = names[int(np.argmax(corr[:, which]))]
        row = {
            "region": name, "voxels": int(mask.sum()), "roi": round(best, 3), "which": roi,
            "own": "yes" if owner == name else owner.split(" (")[0],
            "gradcam": round(rois.spatial_correlation(cam, mask, brain), 3),
            "ceiling": round(ceilings[k], 3),
            "perm95": round(float(nulls["permute"][len(rows)]), 3),
            "shift95": round(float(nulls["shift"][len(rows)]), 3),
            "rand95": round(float(rand[len(rows)]), 3) if rand is not None else float("nan"),
            "occl_gain": round(float(occ.loc[roi, "mae_increase"]), 3),
            "occl_p95": round(float(occ.loc[roi, "null_p95"]), 3),
        }
        if bp_maps is not None:
            row["input"] = round(float(c_in[k].max()), 3)
            row["input_which"] = f"RoI {int(c_in[k].argmax()) + 1}"
            row["input_perm95"] = round(float(in_p95[k]), 3)
        if plant is not None:
            row["plant_gain"] = round(float(plant.loc[name, "mae_increase"]), 3)
            row["plant_p95"] = round(float(plant.loc[name, "null_p95"]), 3)
        rows.append(row)
    related = _related_rois(group, u3.shape[1])
    for k, row in enumerate(rows):
        c_rel = np.where(related, corr[k], -np.inf)
        r_rel = int(np.argmax(c_rel))
        row["roi_related"] = round(float(c_rel[r_rel]), 3) if related.any() else float("nan")
        row["which_related"] = f"RoI {r_rel + 1}" if related.any() else "none"
        if bp_maps is not None:
            row["input_related"] = (round(float(c_in[k][related].max()), 3)
                                    if related.any() else float("nan"))
    tab = pd.DataFrame(rows)
    is_decoy = tab["region"].str.contains("decoy")
    planted, decoy = tab[~is_decoy], tab[is_decoy]
    above = planted["roi"] > planted["perm95"]
    decoy_matched = (decoy["roi"] > decoy["perm95"]).any()
    if rand is not None:
        above &= planted["roi"] > planted["rand95"]
        decoy_matched = decoy_matched and (decoy["roi"] > decoy["rand95"]).any()
    summary = {
        "layer": layer, "grid": "x".join(map(str, geo.feature_shape)),
        "stride_mm": geo.stride[0] * resolution, "R1": int(u3.shape[1]),
        "tensor": metrics.get("decomposition", {}).get("tensor", "activations"),
        "test_mae": _test_mae(metrics),
        "planted_above_null": f"{int(above.sum())}/{len(planted)}"
        + (" (perm95 and rand95)" if rand is not None else " (perm95 only)"),
        "planted_above_perm_null": f"{int((planted['roi'] > planted['perm95']).sum())}/{len(planted)}",
        "planted_above_random_net_null": (f"{int((planted['roi'] > planted['rand95']).sum())}/{len(planted)}"
                                          if rand is not None else "not run"),
        "planted_above_gradcam": f"{int((planted['roi'] > planted['gradcam']).sum())}/{len(planted)}",
        "planted_above_shift_null": f"{int((planted['roi'] > planted['shift95']).sum())}/{len(planted)}",
        "decoy_matched": bool(decoy_matched),
        "planted_with_own_roi": f"{int(planted['own'].eq('yes').sum())}/{len(planted)}",
        "decoy_with_own_roi": bool(decoy["own"].eq("yes").any()),
        "median_best_over_ceiling": round(float(np.median(planted["roi"] / planted["ceiling"])), 3),
        "matched_occlusion_above_null": int(((planted["occl_gain"] > planted["occl_p95"]) & above).sum()),
        "rois_occlusion_above_null": f"{int(occ['above_null'].astype(str).eq('True').sum())}/{len(occ)}",
        "null_s": round(t_null, 1),
        "ceilings_s": round(t_ceiling, 1),
    }
    # the goal read on the RoIs related to the target (the others are said to be other
    # variation in rois.tsv and the report); every related RoI must beat its occlusion null
    occ_ok = occ["above_null"].astype(str).eq("True").to_numpy()
    above_rel = planted["roi_related"] > planted["perm95"]
    decoy_rel = (decoy["roi_related"] > decoy["perm95"]).any()
    if rand is not None:
        above_rel &= planted["roi_related"] > planted["rand95"]
        decoy_rel = decoy_rel and (decoy["roi_related"] > decoy["rand95"]).any()
    summary["related_rois"] = f"{int(related.sum())}/{len(related)}"
    summary["related_rois_occlusion_above_null"] = f"{int(occ_ok[related].sum())}/{int(related.sum())}"
    summary["planted_above_null_related"] = f"{int(above_rel.sum())}/{len(planted)}"
    summary["decoy_matched_related"] = bool(decoy_rel)
    summary["median_best_over_ceiling_related"] = round(
        float(np.median(planted["roi_related"] / planted["ceiling"])), 3)
    summary["goal_met_related"] = bool(
        related.any() and above_rel.all() and (planted["roi_related"] > planted["gradcam"]).all()
        and not decoy_rel and summary["median_best_over_ceiling_related"] >= 0.6
        and occ_ok[related].all())
    if bp_maps is not None:
        # input-grid maps: resolution ceiling 1
        summary["median_best_backprojected"] = round(float(np.median(planted["input"])), 3)
        summary["decoy_best_backprojected"] = round(float(decoy["input"].max()), 3)
        summary["median_best_backprojected_related"] = round(float(np.median(planted["input_related"])), 3)
        summary["decoy_best_backprojected_related"] = round(float(decoy["input_related"].max()), 3)
        # the goal read once more: the related RoIs placed by their back-projected maps
        # (against those maps' own perm95), occluded as RoIs
        summary["goal_met_backprojected_related"] = bool(
            related.any() and (planted["input_related"] > planted["input_perm95"]).all()
            and (planted["input_related"] > planted["gradcam"]).all()
            and not (decoy["input_related"] > decoy["input_perm95"]).any()
            and summary["median_best_backprojected_related"] >= 0.6 and occ_ok[related].all())
    if rand is not None:
        summary["random_networks_s"] = round(t_rand, 1)
    if plant is not None:
        summary["planted_occlusion_above_null"] = (
            f"{int((planted['plant_gain'] > planted['plant_p95']).sum())}/{len(planted)}")
        summary["occlude_planted_s"] = round(t_plant, 1)
    summary["goal_met"] = bool(
        above.all() and (planted["roi"] > planted["gradcam"]).all()
        and not summary["decoy_matched"] and summary["median_best_over_ceiling"] >= 0.6
        and summary["matched_occlusion_above_null"] == len(planted))
    return tab, summary


def _test_mae(metrics: dict) -> str:
    """Test MAE of the network, the linear model on the loadings and the mean predictor."""
    dec = metrics.get("decomposition", {}).get("metrics", {})
    test = next(iter(dec.values()), {}).get("test", {})
    return "; ".join(f"{k} {v['mae']:.2f}" for k, v in test.items()
                     if k != "network_head_on_reconstruction")


def print_result(title: str, tab: pd.DataFrame, summary: dict, key_width: int = 32) -> None:
    """The per-region table, then the summary one line per entry."""
    pd.set_option("display.width", 220)
    pd.set_option("display.max_columns", 30)
    print(title)
    print(tab.to_string(index=False))
    print()
    for k, v in summary.items():
        print(f"{k:{key_width}s} {v}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bids", required=True, help="simulated BIDS dataset (planted_dseg)")
    parser.add_argument("--output", required=True, help="output directory of a group run")
    parser.add_argument("--layer", help="label of the decomposed layer (default: the one "
                        "recorded in the RoI components' JSON sidecar)")
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--random-networks", type=int, default=10, metavar="N",
                        help="untrained networks for the rand95 null (0: skip it)")
    parser.add_argument("--occlude-planted", action="store_true",
                        help="positive control: occlusion test on the planted masks")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the tables here")
    args = parser.parse_args(argv)
    tab, summary = evaluate(args)
    print_result(f"{args.output}; baseline: GradCAM average of the same network", tab, summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": tab.to_dict(orient="records"),
                                               "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
