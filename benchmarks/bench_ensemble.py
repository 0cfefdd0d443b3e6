"""Do the RoIs of several networks, decomposed together, find the planted regions better?

A diagnostic on the simulated cohort. What the RoIs find depends on the trained network:
networks trained the same way with other seeds put their RoIs at 0.21-0.56 of the
resolution ceiling (docs/benchmarks.md). An ensemble of networks, the usual practice in
brain-age work, predicts with the mean of its members, a linear function of the
members' pooled features. So its activation at a layer is the members' activations side
by side along the channel axis, and the paper's method applied to the ensemble
decomposes that tensor: subjects x (members x channels) x voxels. The subject loadings
and RoIs are shared by all members.

This script takes the outputs of group runs on the same dataset and split (a network
each; nothing is retrained) and prints, per region, the best correlation of any RoI
with the planted mask for each network alone (the baseline) and for the ensemble, at
the given ranks (R1 = R2, λ 0). Each member's channel-scaled deviations
(``--tensor deviations``, the demo's; ``--tensor relevance`` weights them by the
output gradient) are computed from its own training subjects, as the group level does. Also printed:

- the median best correlation / resolution ceiling over the planted regions;
- the decoy's best RoI and the 95th percentile of the permutation null (``perm95``,
  as in ``bench_explanations.py``), so "matched" means the same thing;
- the test MAE of the linear model on the loadings, and of each network and the
  ensemble;
- with ``--selection``: the group level's automatic choice of ranks and λ
  (``run_selection`` with ``--rank-grid``) on the ensemble's tensor;
- with ``--occlusion N`` (N >= 20 draws): the occlusion test of the ensemble's RoIs with
  the ensemble's own predictor (the mean of the members' predictions): each RoI's
  test MAE increase against N random blobs of the same volume, for the last ensemble
  fit printed.

Run::

    python benchmarks/bench_ensemble.py --bids BIDS --runs OUT_A,OUT_B,OUT_C \\
        [--ranks 8,10,12] [--selection --rank-grid 2:12] [--occlusion 20]

``--save-ensemble PATH`` also writes the runs' networks as one ensemble file, which
``brainage-xai BIDS OUT group --model PATH`` explains as ``--ensemble`` would.

Each ``OUT`` is a group run's output directory with its ``group/model.safetensors``,
``group/split.tsv`` and the activation tensor its group level stored under
``.work/group/activations`` (recomputed from the network when it is missing).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _activations(out: Path, model, x, dev, layer: str | None):
    """The run's stored activation tensor ``(n, c, v)`` (memory-mapped), or recomputed."""
    import torch

    from brainage_xai.bids.derivatives import GroupOutputs
    from brainage_xai.model.activations import iter_activations, load_activation_tensor

    _, pattern = GroupOutputs(out / "group", out / ".work" / "group").activations("*")
    found = sorted(pattern.parent.glob(pattern.name))
    for path in found:
        act = load_activation_tensor(path)
        if layer is None or act.layer == layer:
            return act.layer, act.array, act.subjects
    if layer is None:
        raise SystemExit(f"{out}: no stored activation tensor; pass --layer")
    X = torch.from_numpy(np.ascontiguousarray(x[:, None]))
    A = np.concatenate(list(iter_activations(model, X, layer, batch_size=16, device=dev)))
    return layer, A.reshape(A.shape[0], A.shape[1], -1).astype(np.float32), None


def _save_ensemble(members, path: Path) -> None:
    """The members' networks as one ``EnsembleNet`` file, as ``--ensemble`` would write it."""
    from brainage_xai.model import EnsembleNet, save_model

    metas = [m["inputs"][2] for m in members]
    meta = {k: v for k, v in metas[0].items() if k not in ("stage_key", "architecture", "versions")}
    meta["training"] = {**metas[0]["training"], "members": [
        {"seed": m.get("seed"), "source": str(mem["out"]), "best_epoch": m["training"].get("best_epoch"),
         "best_val_mae": m["training"].get("best_val_mae")} for m, mem in zip(metas, members)]}
    save_model(path, EnsembleNet([m["inputs"][1].cpu() for m in members]), meta)
    print(f"ensemble of {len(members)} written to {path}")


def main(argv=None) -> int:
    import nibabel as nib
    import torch
    from bench_explanations import _inputs, _nulls

    from brainage_xai.bids.derivatives import GroupOutputs
    from brainage_xai.explain import occlusion, rois
    from brainage_xai.imaging.geometry import resolution_ceiling, spatial_correlation
    from brainage_xai.imaging.templates import get_template
    from brainage_xai.model.activations import feature_geometry, gradient_rms
    from brainage_xai.model.training import resolve_precision
    from brainage_xai.selection import (
        SelectionFiles,
        Splits,
        deviation_splits,
        fit_final,
        run_selection,
    )
    from brainage_xai.utils.io import read_tsv

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bids", required=True, help="simulated BIDS dataset")
    p.add_argument("--runs", required=True, help="comma-separated output directories of group runs (2 or more)")
    p.add_argument("--ranks", default="8,10,12", help="comma-separated R (R1 = R2 = R, λ 0); '' for none")
    p.add_argument("--layer", default=None, help="default: the layer of the runs' stored tensors")
    p.add_argument("--selection", action="store_true",
                   help="also run the automatic choice of ranks and λ on the ensemble's tensor")
    p.add_argument("--rank-grid", default="2:12", help="LO:HI for --selection (the demo's 2:12)")
    p.add_argument("--occlusion", type=int, default=0, metavar="N",
                   help="random blobs per RoI for the ensemble's occlusion test (0: skip; else >= 20)")
    p.add_argument("--permutations", type=int, default=20, help="draws of the permutation null")
    p.add_argument("--tensor", choices=("deviations", "relevance"), default="deviations",
                   help="each member's tensor, as the group level's --tensor (relevance: weighted by "
                   "the ensemble's output gradient, 1/K of the member's own)")
    p.add_argument("--save-ensemble", metavar="PATH", default=None,
                   help="also write the runs' networks as one ensemble (.safetensors) for "
                   "`brainage-xai ... group --model PATH`")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    runs = [Path(r) for r in args.runs.split(",")]
    if len(runs) < 2:
        p.error("--runs needs at least two output directories")
    if args.occlusion and args.occlusion < occlusion.MIN_DRAWS:
        p.error(f"--occlusion needs at least {occlusion.MIN_DRAWS} draws")
    try:
        ranks = [int(r) for r in args.ranks.split(",") if r.strip()]  # "": no fixed-rank fits
        lo, hi = (int(v) for v in args.rank_grid.split(":"))
    except ValueError:
        p.error(f"--ranks must be integers and --rank-grid LO:HI; got {args.ranks!r}, {args.rank_grid!r}")
    if args.occlusion and not ranks and not args.selection:
        p.error("--occlusion needs a fit: give --ranks or --selection")

    bids = Path(args.bids)
    truth_img = nib.load(bids / "sourcedata/simulation/planted_dseg.nii.gz")
    resolution = float(abs(truth_img.affine[0, 0]))
    table = read_tsv(bids / "sourcedata/simulation/planted_dseg.tsv")
    truth = np.asarray(truth_img.dataobj).astype(int)
    template = get_template(resolution)
    brain = np.asarray(template.mask.dataobj) > 0
    names = table["name"].tolist()
    masks = [truth == k for k in table["index"].astype(int)]
    planted = np.array([t != "decoy" for t in table["trajectory"]])

    members, layer = [], args.layer
    for out in runs:
        inputs = _inputs(out, out / "group", resolution, args.device)
        dev, model, meta, x, which, y = inputs
        layer, A, subjects = _activations(out, model, x, dev, layer)
        preds = read_tsv(out / "group" / "predictions.tsv").set_index("participant_id")
        members.append({"out": out, "inputs": inputs, "A": A, "subjects": subjects, "preds": preds})
    first = members[0]
    dev, model, meta, x, which, y = first["inputs"]
    for m in members[1:]:
        if not np.array_equal(m["inputs"][4], which) or not np.allclose(m["inputs"][5], y):
            raise SystemExit(f"{m['out']} has another split or other subjects than {first['out']}: "
                             "an ensemble's members share the training subjects")
    if args.save_ensemble:
        _save_ensemble(members, Path(args.save_ensemble))
    rows = {s: np.flatnonzero(which == s) for s in ("train", "val", "test")}
    ages = Splits.from_dict({s: y[r] for s, r in rows.items()})
    geo = feature_geometry(model, model.activation_module_name(layer), x.shape[1:])
    ceiling = np.array([resolution_ceiling(mk, geo, brain) for mk in masks])
    target = meta["targets"][0]

    def network_mae(member_list):
        pred = np.mean([m["preds"].loc[m["preds"]["split"] == "test", f"predicted_{target}"].to_numpy(float)
                        for m in member_list], axis=0)
        true = first["preds"].loc[first["preds"]["split"] == "test", target].to_numpy(float)
        return float(np.mean(np.abs(pred - true)))

    print(f"{len(runs)} networks on {bids}, layer {layer}, tensor {args.tensor} ({'x'.join(map(str, geo.feature_shape))}); "
          f"baseline: each network alone at the same ranks")
    print("networks' test MAE: " + ", ".join(f"{m['out'].name} {network_mae([m]):.2f}" for m in members)
          + f"; ensemble (mean prediction) {network_mae(members):.2f}")
    if not ranks and not args.selection:
        return 0
    tensors = []
    for m in members:
        grad = None
        if args.tensor == "relevance":
            # The ensemble's output is the members' mean: its gradient is 1/K of each member's;
            # relevance_weight divides by the mean weight, so the factor drops out.
            X = torch.from_numpy(np.ascontiguousarray(x[rows["train"], None]))
            grad = gradient_rms(m["inputs"][1], X, layer, batch_size=16, device=dev)
            grad = grad.reshape(grad.shape[0], -1)
        T, _, _ = deviation_splits(m["A"], rows, gradient_rms=grad)
        tensors.append(T)
        m.pop("A")
    rng = np.random.default_rng(0)
    header = f"{'tensor':<22s} {'rank':<10s} " + " ".join(f"{n[:10]:>10s}" for n in names)
    print("\n" + header + "  median/ceil  decoy>perm95  linear MAE")

    def score(label, rank, T, l1=0.0):
        t0 = time.perf_counter()
        fit = fit_final(Splits.from_dict(T), ages, rank, l1)
        u3 = np.asarray(fit.result.factors[2])
        up = rois.roi_maps(u3, geo, brain)
        best = np.array([max(spatial_correlation(u, mk, brain) for u in up) for mk in masks])
        null = _nulls(u3, geo, masks, brain, rng, args.permutations)["permute"]
        median = float(np.median((best / ceiling)[planted]))
        decoy = bool(np.any(best[~planted] > null[~planted]))
        mae = fit.metrics["test"]["linear_model_on_decomposition"]["mae"]
        r = f"{rank[0]}x{rank[1]}" + (f" l1 {l1:.3g}" if l1 else "")
        print(f"{label:<22s} {r:<10s} " + " ".join(f"{b:10.2f}" for b in best)
              + f"  {median:11.2f}  {str(decoy):>12s}  {mae:10.2f}  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        return u3

    pooled = {s: np.ascontiguousarray(np.concatenate([T[s] for T in tensors], axis=1)) for s in rows}
    for R in ranks:
        for m, T in zip(members, tensors):
            score(m["out"].name, (R, R), T)
        last = score(f"ensemble of {len(members)}", (R, R), pooled)
    del tensors
    if args.selection:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            paths = GroupOutputs(Path(tmp), Path(tmp) / "work")
            files = SelectionFiles(
                scree=paths.scree, rank_sweep=paths.rank_sweep, lambda_sweep=paths.lambda_sweep,
                selection=paths.selection, decomposition=paths.decomposition,
                decomposition_json=paths.decomposition_json, loadings=paths.loadings)
            out = run_selection(Splits.from_dict(pooled), ages, files, rank_grid=list(range(lo, hi + 1)),
                                n_jobs=-1, quiet=True)
            rank = (out["ranks"]["R1"], out["ranks"]["R2"])
            print(f"automatic selection on the ensemble's tensor: ranks {rank}, λ {out['lambda']['lambda']:.3g} "
                  f"({time.perf_counter() - t0:.0f} s)")
            last = score(f"ensemble of {len(members)}", rank, pooled, out["lambda"]["lambda"])
    if args.occlusion:
        norm = [m["inputs"][2]["normalisation"] for m in members]
        predictors = [occlusion.torch_predictor(
            m["inputs"][1], device=dev, batch_size=16, scale=float(n["target_std"][0]),
            shift=float(n["target_mean"][0]), dtype=resolve_precision("auto", dev))
            for m, n in zip(members, norm)]
        xs = [m["inputs"][3] for m in members]  # each member's own input standardisation
        if not all(np.allclose(a, xs[0]) for a in xs[1:]):
            raise SystemExit("the members standardise their inputs differently; occlusion needs one input")

        def predict(batch):
            return np.mean([f(batch) for f in predictors], axis=0)

        t0 = time.perf_counter()
        comp = rois.roi_components(last, geo, template.t1, brain)
        occ, _ = occlusion.occlusion_test(
            predict, x[rows["test"]], y[rows["test"]], rois.roi_masks(comp), x[rows["train"]].mean(axis=0),
            brain, n_random=args.occlusion, seed=0, zooms=(resolution,) * 3)
        up = rois.roi_maps(last, geo, brain)
        matched = {int(np.argmax([spatial_correlation(u, mk, brain) for u in up])) for mk, k
                   in zip(masks, planted) if k}
        print(f"\nocclusion of the last ensemble fit's RoIs with the ensemble's predictor "
              f"({args.occlusion} blobs each, {time.perf_counter() - t0:.0f} s):")
        print(occ[["roi", "voxels", "mae_increase", "null_p95", "above_null"]].to_string(index=False))
        print(f"RoIs above the null: {int(occ['above_null'].sum())}/{len(occ)}; matched RoIs above it: "
              f"{int(occ['above_null'].iloc[sorted(matched)].sum())}/{len(matched)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
