"""Which layer keeps each planted region's signal in place, and which tensor finds it?

A diagnostic on the simulated cohort, from an existing run's trained network
(nothing is retrained). For each layer of the network it prints:

- ``signal``: where each planted region's *subject-level* signal lives in the
  activations. The region's realised effect minus its noise-free trajectory
  (``trajectories.tsv``) is independent of age and of the other regions, so the voxels
  whose activations correlate with it (best channel's r², upsampled) are where the
  network carries that region's own information. Shown as its spatial correlation with
  the region's mask / the resolution ceiling. An explanation at that layer cannot be
  better placed than this;
- ``variance``: how strongly the layer responds to each region: the activations'
  variance over subjects, summed over channels, averaged over the region (upsampled),
  relative to the brain's average; ``input`` is the same for the network's input. A
  least-squares decomposition fits the strongest responses first;
- for the baseline (``activations``, the paper's tensor) and ``deviations`` (each
  subject's deviation from the training mean, each channel in units of its spread,
  ``--tensor deviations``; ``deviations-unscaled`` leaves the channels in their own
  units; ``relevance``, the deviations weighted by the network's
  output gradient, ``--tensor relevance``; ``relevance-full`` the same with the weight's
  power 1 instead of 0.5: each deviation's expected contribution), at each rank (``R`` for R1 = R2, or ``R1xR2``) and
  λ (``--lambdas``, default 0; in the units of the group run's own sweep, which
  decomposes the same tensor): the best correlation of any RoI with each region, the median
  best / ceiling over the planted regions, and the test MAE of the linear model on the
  loadings; then the same read on the RoIs related to age only (``related k/R1``: the RoIs
  whose loadings, all subjects, age predicts at least ``loadings.RELATED_R2`` of, as
  ``rois.tsv``'s ``target_related``), with the decoy's best related RoI.

``--seeds`` refits each cell with several random states and ``--svd-power-iter`` with
other numbers of subspace iterations in the SVD start (default: the package's,
``SVD_POWER_ITER``; 0: none, the plain randomised start), printing the training error: whether
the fit, and so the RoIs, depend on the seed (docs/decomposition.md, "Initialisation").

Run::

    python benchmarks/bench_layers.py --bids BIDS --output OUT [--layers block1,...] [--ranks 5,8x6] \
        [--lambdas 0,0.1] [--tensors activations,deviations,deviations-unscaled,relevance,relevance-full] \\
        [--seeds 0,1,2,3] [--svd-power-iter 0,4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    import nibabel as nib
    import torch
    from bench_explanations import _inputs

    from brainage_xai.decomposition import _solver
    from brainage_xai.explain.loadings import RELATED_R2, fit_trajectory
    from brainage_xai.explain.rois import columns_to_feature_maps, roi_maps
    from brainage_xai.imaging.geometry import resolution_ceiling, spatial_correlation, upsample
    from brainage_xai.imaging.templates import get_template
    from brainage_xai.model.activations import feature_geometry, gradient_rms, iter_activations
    from brainage_xai.selection import (
        RELEVANCE_POWER,
        Splits,
        channel_scale,
        deviation_tensor,
        fit_final,
        relevance_weight,
    )
    from brainage_xai.utils.io import read_tsv

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bids", required=True, help="simulated BIDS dataset")
    p.add_argument("--output", required=True, help="output directory of a group run (its model)")
    p.add_argument("--layers", default=None, help="comma-separated (default: all)")
    p.add_argument("--ranks", default="5,8",
                   help="comma-separated: R (R1 = R2 = R) or R1xR2")
    p.add_argument("--lambdas", default="0", help="comma-separated l1 penalties on U3")
    p.add_argument("--tensors", default="activations,deviations",
                   help="comma-separated: activations, deviations, deviations-unscaled, "
                   "relevance, relevance-full")
    p.add_argument("--seeds", default="0", help="comma-separated random states of the fit")
    p.add_argument("--svd-power-iter", default=None,
                   help="comma-separated subspace iterations of the SVD start (default: the package's)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    tensors = args.tensors.split(",")
    unknown = set(tensors) - {"activations", "deviations", "deviations-unscaled", "relevance", "relevance-full"}
    if unknown:
        p.error(f"--tensors: unknown {', '.join(sorted(unknown))}")
    try:
        ranks = [tuple(int(v) for v in r.split("x")) * (2 if "x" not in r else 1)
                 for r in args.ranks.split(",")]
        lambdas = [float(v) for v in args.lambdas.split(",")]
        seeds = [int(v) for v in args.seeds.split(",")]
        powers = [None] if args.svd_power_iter is None else [int(v) for v in args.svd_power_iter.split(",")]
    except ValueError:
        p.error(f"--ranks must be R or R1xR2, --lambdas numbers, --seeds and --svd-power-iter integers; "
                f"got {args.ranks!r}, {args.lambdas!r}, {args.seeds!r}, {args.svd_power_iter!r}")
    if any(len(r) != 2 for r in ranks):
        p.error(f"--ranks: each entry is R or R1xR2; got {args.ranks!r}")

    default_power = _solver.SVD_POWER_ITER
    bids, out = Path(args.bids), Path(args.output)
    truth_img = nib.load(bids / "sourcedata/simulation/planted_dseg.nii.gz")
    resolution = float(abs(truth_img.affine[0, 0]))
    dev, model, meta, x, which, _ = _inputs(out, out / "group", resolution, args.device)
    subjects = sorted(p.name for p in out.glob("sub-*") if p.is_dir())
    traj = read_tsv(bids / "sourcedata/simulation/trajectories.tsv").set_index("participant_id").loc[subjects]
    table = read_tsv(bids / "sourcedata/simulation/planted_dseg.tsv")
    truth = np.asarray(truth_img.dataobj).astype(int)
    brain = np.asarray(get_template(resolution).mask.dataobj) > 0
    names = table["name"].tolist()
    masks = [truth == k for k in table["index"].astype(int)]
    planted = [t != "decoy" for t in table["trajectory"]]
    age = traj["age"].to_numpy(float)
    X = torch.from_numpy(np.ascontiguousarray(x[:, None]))
    layers = args.layers.split(",") if args.layers else list(model.layers)
    print(f"{out}: {len(subjects)} subjects at {resolution:g} mm; baseline: tensor 'activations' (the paper's)")
    xvar = x.var(axis=0)
    print("input variance (/ brain):  " + "  ".join(
        f"{n[:10]} {xvar[m].mean() / xvar[brain].mean():.1f}" for n, m in zip(names, masks)))
    for layer in layers:
        A = np.concatenate(list(iter_activations(model, X, layer, batch_size=16, device=dev)))
        geo = feature_geometry(model, model.activation_module_name(layer), x.shape[1:])
        A = A.reshape(A.shape[0], A.shape[1], -1).astype(np.float32)
        ceiling = [resolution_ceiling(m, geo, brain) for m in masks]
        Z = (A - A.mean(0)) / (A.std(0) + 1e-9)
        cells = []
        for name, mask, ceil in zip(names, masks, ceiling):
            e = (traj[name] - traj[f"{name}_trajectory"]).to_numpy(float)
            e = (e - e.mean()) / e.std()
            r2 = ((np.einsum("n,ncv->cv", e, Z) / len(e)) ** 2).max(axis=0)
            up = upsample(columns_to_feature_maps(r2[:, None], geo.feature_shape), geo)[0] * brain
            cells.append(f"{name[:10]} {spatial_correlation(up, mask, brain):.2f}/{ceil:.2f}")
        grid = "x".join(map(str, geo.feature_shape))
        print(f"\n{layer} ({A.shape[1]} channels, {grid}, {geo.stride[0] * resolution:g} mm)")
        print("  signal (corr / ceiling): " + "  ".join(cells))
        var = A.var(axis=0).sum(axis=0)
        up = upsample(columns_to_feature_maps(var[:, None], geo.feature_shape), geo)[0]
        print("  variance (/ brain):      " + "  ".join(
            f"{n[:10]} {up[m].mean() / up[brain].mean():.1f}" for n, m in zip(names, masks)))
        centre = A[which == "train"].mean(axis=0)
        ages = Splits.from_dict({s: age[which == s] for s in ("train", "val", "test")})
        grad = None  # the training subjects' output gradient, once per layer
        for tensor in tensors:
            T = {s: np.ascontiguousarray(A[which == s]) for s in ("train", "val", "test")}
            if tensor != "activations":
                scale = None if tensor == "deviations-unscaled" else channel_scale(T["train"])
                weight = None
                if tensor.startswith("relevance"):
                    if grad is None:
                        grad = gradient_rms(model, X[which == "train"], layer, batch_size=16, device=dev)
                    weight = relevance_weight(grad.reshape(grad.shape[0], -1), scale,
                                              power=1.0 if tensor == "relevance-full" else RELEVANCE_POWER)
                T = {s: deviation_tensor(a, centre, scale, weight) for s, a in T.items()}
            cells = [(r, v, q, k) for r in ranks for v in lambdas for q in powers for k in seeds]
            for (R1, R2), lam, power, seed in cells:
                t0 = time.perf_counter()
                _solver.SVD_POWER_ITER = default_power if power is None else power
                try:
                    fit = fit_final(Splits.from_dict(T), ages, (R1, R2), lam, random_state=seed)
                finally:
                    _solver.SVD_POWER_ITER = default_power
                u3 = np.asarray(fit.result.factors[2])
                up = roi_maps(u3, geo, brain)
                corr = np.array([[spatial_correlation(u, m, brain) for u in up] for m in masks])
                best = corr.max(axis=1)
                ratio = np.median([b / c for b, c, k in zip(best, ceiling, planted) if k])
                mae = fit.metrics["test"]["linear_model_on_decomposition"]["mae"]
                # the RoIs related to age, as the group level marks them in rois.tsv
                u1 = np.concatenate([np.asarray(fit.loadings[s]) for s in ("train", "val", "test")])
                a1 = np.concatenate([age[which == s] for s in ("train", "val", "test")])
                related = np.array([u1[:, r].std() > 0 and fit_trajectory(a1, u1[:, r])["cv_r2"] >= RELATED_R2
                                    for r in range(u1.shape[1])])
                best_rel = np.where(related[None], corr, -np.inf).max(axis=1) if related.any() else None
                label = f"R{R1}" if R1 == R2 else f"R{R1}x{R2}"
                label += f" l1 {lam:g}" if len(lambdas) > 1 or lam else ""
                label += f" svd-power {power}" if power is not None else ""
                label += f" seed {seed} (train error {fit.errors['train']:.5f})" if len(seeds) > 1 else ""
                print(f"  {tensor:19s} {label:<4s} " + "  ".join(f"{n[:10]} {b:.2f}" for n, b in zip(names, best))
                      + f"  | median/ceiling {ratio:.2f} | linear model test MAE {mae:.2f}"
                      + f" | {time.perf_counter() - t0:.0f} s")
                if best_rel is not None:
                    ratio_rel = np.median([b / c for b, c, k in zip(best_rel, ceiling, planted) if k])
                    print(f"  {'':19s} {'':<4s} related {int(related.sum())}/{len(related)}: "
                          + "  ".join(f"{n[:10]} {b:.2f}" for n, b in zip(names, best_rel))
                          + f"  | median/ceiling {ratio_rel:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
