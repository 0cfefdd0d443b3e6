"""Are the RoIs where their loadings come from? Back-projection to the input grid.

An RoI is a column of U3 on the feature grid, upsampled (``explain.rois``): where the layer's
activations carry the component. A feature voxel of ``block1`` sees 60 mm of input, so
the input that drives a component's loadings can lie elsewhere than its U3 map. This
benchmark takes an existing group run (nothing is retrained) and, for every component
``r``, back-projects its loading through the network to the input grid with
:func:`brainage_xai.explain.backprojection.back_project` (what the group level writes as
``*_desc-backprojected_components.nii.gz``; this also scores runs made without it):

- the loading functional ``s_r = P[r] · M^T vec(T)`` of the subject's decomposed tensor
  ``T`` (deviations from the training mean, scaled per channel, weighted for
  ``--tensor relevance``), with ``M`` the components ``W_r ⊗ U3_r`` (``W = U2 Dᵀ``) and
  ``P = (MᵀM)⁻¹``: the least-squares loading without the non-negativity (printed:
  its correlation with the run's U1, ~0.99);
- its gradient ``g`` with respect to the input map, for every training subject, and the
  first-order contribution of each input voxel ``c = g · (x − x̄)``;
- three maps per component: ``grad`` = mean |g| (where the loading looks), ``contrib`` =
  mean |c|, and ``cov`` = max(Cov_subjects(c, s_r), 0) (the input voxels whose
  contribution moves with the loading; the group level's map).

It prints, per planted region and the decoy, the best correlation (within the brain
mask) with any component's map and which, for the run's own RoIs (``u3``, the baseline)
and for each back-projected kind, each with its ``perm95`` (the 95th percentile of the
best correlation with the maps' voxels shuffled within the brain), the median over the
planted regions, and the time taken. ``cov`` is each input voxel's (first-order) share
of the loading's variance over subjects: summed over voxels it is Var(s_r), so it shows
where the loading's differences between subjects come from. With ``--occlusion N`` the
back-projected maps, thresholded as the RoIs are (``explain.rois.DEFAULT_THRESHOLD`` of the
peak), also go through the occlusion test with N random blobs each, beside the run's own
``occlusion.tsv``::

    python benchmarks/bench_backprojection.py --bids DEMO/bids --output DEMO/results

With ``--speed N`` it only times the group level's back-projection over N training
subjects, in float32 (the baseline) and in the precision the group level uses (bf16 on
CPUs with AMX and on GPUs), and prints how far their maps agree::

    python benchmarks/bench_backprojection.py --bids DEMO/bids --output DEMO/results \
        --speed 40 --repeats 3

A map on the input grid has resolution ceiling 1; the ``u3`` median is divided by the
run's resolution ceilings (1.00 at ``block1`` on 4 mm inputs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_explanations import (  # noqa: E402
    _inputs,
    _occlude_planted,
    input_grid_score,
    print_result,
    run_rois,
)

KINDS = ("grad", "contrib", "cov")


def _tensor_parts(model, X, layer, tensor):
    """The training centre, scale and relevance weight, from a forward pass over ``X``
    (the group level reads them from its stored activations)."""
    from brainage_xai.model.activations import gradient_rms, iter_activations
    from brainage_xai.selection import channel_scale, relevance_weight

    A = np.concatenate(list(iter_activations(model, X, layer, batch_size=16)))
    A = A.reshape(A.shape[0], A.shape[1], -1)
    centre, scale = A.mean(0), channel_scale(A)
    del A
    weight = None
    if tensor == "relevance":
        g = gradient_rms(model, X, layer)
        weight = relevance_weight(g.reshape(g.shape[0], -1), scale)
    return {"centre": centre, "scale": scale, "weight": weight}


def back_project(model, x, train, layer, dec, tensor, batch_size=8, quiet=False, dtype=None):
    """``{kind: (R, *grid)}`` maps and the training loadings ``S`` (n_train, R).

    The package's :func:`brainage_xai.explain.backprojection.back_project` with its diagnostic
    maps.
    """
    import torch

    from brainage_xai.explain import backprojection

    X = torch.from_numpy(np.ascontiguousarray(x[train][:, None])).float()
    bp = backprojection.back_project(model, X, layer, dec["U2"], dec["D"], dec["U3"], tensor=tensor,
                                     **_tensor_parts(model, X, layer, tensor), batch_size=batch_size,
                                     progress=not quiet, diagnostics=True, dtype=dtype)
    return {"grad": bp.extra["gradient"], "contrib": bp.extra["contribution"], "cov": bp.maps}, bp.scores


def speed(args) -> int:
    """Time the group level's back-projection in float32 (the baseline) against the
    autocast precision the group level uses (``resolve_precision("auto")``),
    on the first ``--speed`` training subjects, ``--repeats`` times each in turn; print the
    medians, their ratio, and how far the maps and loadings agree."""
    import torch

    from brainage_xai.explain import backprojection
    from brainage_xai.model.training import resolve_device, resolve_precision

    out = Path(args.output)
    group = out / "group"
    metrics = json.loads((group / "metrics.json").read_text())
    tensor = (metrics.get("decomposition") or {}).get("tensor", "activations")
    layer = run_rois(group)[2].get("Layer")
    dec = dict(np.load(group / "decomposition.npz"))
    resolution = float(json.loads((group / "analysis.json").read_text())["resolution"])
    _, model, _, x, which, _ = _inputs(out, group, resolution, args.device)
    dev = resolve_device(args.device)
    auto = resolve_precision("auto", dev)
    if auto is None:
        print("the group level back-projects in float32 on this machine (no AMX, no GPU); "
              "timing bf16 against it anyway")
        auto = torch.bfloat16
    X = torch.from_numpy(np.ascontiguousarray(x[which == "train"][: args.speed, None])).float()
    parts = _tensor_parts(model, X, layer, tensor)
    times = {"float32": [], str(auto).replace("torch.", ""): []}
    maps = {}
    for _ in range(args.repeats):
        for name, dtype in zip(times, (None, auto)):
            t0 = time.perf_counter()
            bp = backprojection.back_project(model, X, layer, dec["U2"], dec["D"], dec["U3"],
                                             tensor=tensor, **parts, batch_size=args.batch_size,
                                             device=dev, dtype=dtype)
            times[name].append(time.perf_counter() - t0)
            maps[name] = bp
    base, new = (maps[k] for k in times)
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(base.maps, new.maps) if a.any()]
    score_corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(base.scores.T, new.scores.T)]
    rows = [{"precision": k, "median_s": round(float(np.median(v)), 2),
             "runs_s": " ".join(f"{t:.1f}" for t in v),
             "speed-up vs float32": round(float(np.median(times["float32"]) / np.median(v)), 2)}
            for k, v in times.items()]
    print(f"{args.output}: back-projection of {base.maps.shape[0]} RoIs over {len(X)} training "
          f"subjects ({layer}, {tensor}, {torch.get_num_threads()} threads, {dev})")
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"maps: lowest correlation with float32's over the RoIs {min(corr):.4f}; "
          f"loadings: lowest correlation {min(score_corr):.5f}")
    return 0


def evaluate(args):
    import nibabel as nib

    from brainage_xai.bids.derivatives import roi_names
    from brainage_xai.explain.rois import DEFAULT_THRESHOLD
    from brainage_xai.imaging.geometry import resolution_ceiling
    from brainage_xai.imaging.templates import get_template
    from brainage_xai.utils.io import read_tsv

    bids, out = Path(args.bids), Path(args.output)
    group = out / "group"
    comps, geo, sidecar = run_rois(group)
    layer = sidecar.get("Layer")
    u3_maps = np.moveaxis(np.asarray(comps.dataobj, dtype=float), -1, 0)
    truth_img = nib.load(str(bids / "sourcedata" / "simulation" / "planted_dseg.nii.gz"))
    truth = np.asarray(truth_img.dataobj).astype(int)
    table = read_tsv(bids / "sourcedata" / "simulation" / "planted_dseg.tsv")
    resolution = float(abs(truth_img.affine[0, 0]))
    brain = np.asarray(get_template(resolution).mask.dataobj) > 0
    masks = [truth == k for k in table["index"].astype(int)]
    planted = np.array([t != "decoy" for t in table["trajectory"]])
    metrics = json.loads((group / "metrics.json").read_text())
    tensor = (metrics.get("decomposition") or {}).get("tensor", "activations")
    if tensor not in ("deviations", "relevance"):
        raise SystemExit(f"the run decomposed {tensor!r}; this benchmark back-projects "
                         "the deviations and relevance tensors only")
    dec = dict(np.load(group / "decomposition.npz"))
    inputs = _inputs(out, group, resolution, args.device)
    _, model, _, x, which, _ = inputs
    train = which == "train"
    t0 = time.perf_counter()
    from brainage_xai.model.training import resolve_device, resolve_precision

    # in the group level's precision, so that the maps are the ones it writes
    dtype = resolve_precision("auto", resolve_device(args.device))
    maps, S = back_project(model, x, train, layer, dec, tensor, args.batch_size, args.quiet, dtype)
    t_bp = time.perf_counter() - t0
    fit = [float(np.corrcoef(S[:, r], dec["U1"][:, r])[0, 1]) for r in range(S.shape[1])]
    if args.save:
        np.savez_compressed(args.save, **{k: v.astype(np.float32) for k, v in maps.items()})
    ceilings = np.array([resolution_ceiling(m, geo, brain) for m in masks])
    rng = np.random.default_rng(args.seed)
    rows = {"region": [f"{n} ({t})" for n, t in zip(table["name"], table["trajectory"])]}
    medians = {}
    decoy = {}
    for kind, m in [("u3", u3_maps)] + [(k, maps[k]) for k in KINDS]:
        corr, p95 = input_grid_score(m * brain, masks, brain, rng, args.permutations)
        best, arg = corr.max(axis=1), corr.argmax(axis=1)
        rows[kind] = [f"{b:.2f} (RoI {a + 1})" for b, a in zip(best, arg)]
        rows[f"{kind}_perm95"] = np.round(p95, 3)
        ceil = ceilings if kind == "u3" else np.ones(len(masks))
        medians[kind] = float(np.median(best[planted] / ceil[planted]))
        decoy[kind] = (float(best[~planted].max()), bool(np.all(best[~planted] <= p95[~planted])))
    summary = {"run": str(out), "layer": layer, "tensor": tensor,
               "ranks": [int(v) for v in dec["U1"].shape[1:]] + [int(dec["U2"].shape[1])],
               "loading functional vs U1 (corr, min)": round(min(fit), 3),
               "back-projection_s": round(t_bp, 1),
               "training subjects": int(train.sum())}
    for kind in medians:
        summary[f"median / ceiling, {kind}"] = round(medians[kind], 3)
        summary[f"decoy best, {kind} (below perm95?)"] = f"{decoy[kind][0]:.2f} ({'yes' if decoy[kind][1] else 'no'})"
    if args.occlusion:
        # u3: the run's own occlusion test; the others: each map thresholded as
        # explain.rois.roi_masks does (DEFAULT_THRESHOLD of its peak), same test subjects.
        occ = {"u3": read_tsv(group / "occlusion.tsv")}
        for kind in args.occlusion_kinds.split(","):
            m = maps[kind] * brain
            peak = m.reshape(len(m), -1).max(1)[:, None, None, None]
            masks_k = (m >= DEFAULT_THRESHOLD * peak) & (m > 0)
            occ[kind] = _occlude_planted(inputs, list(masks_k), roi_names(len(m)),
                                         brain, resolution, args.occlusion, args.seed)
        for kind, t in occ.items():
            gains = ", ".join(f"{g:.2f}{'*' if a else ''}" for g, a in zip(t["mae_increase"], t["above_null"]))
            summary[f"occlusion, {kind} (* above p95)"] = f"{int(t['above_null'].sum())}/{len(t)}: {gains}"
            summary[f"occluded voxels, {kind}"] = ", ".join(str(int(v)) for v in t["voxels"])
    return pd.DataFrame(rows), summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bids", required=True, help="simulated BIDS dataset (planted_dseg)")
    parser.add_argument("--output", required=True, help="output directory of a group run")
    parser.add_argument("--permutations", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save", help="write the back-projected maps (npz) here")
    parser.add_argument("--occlusion", type=int, default=0, metavar="N",
                        help="also run the occlusion test on the thresholded back-projected "
                             "maps, N random blobs each (0: skip; the run's RoIs: occlusion.tsv)")
    parser.add_argument("--occlusion-kinds", default="cov", help="which maps to occlude")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--speed", type=int, default=0, metavar="N",
                        help="only time the back-projection, float32 against the group level's "
                             "precision, over the first N training subjects")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each precision (--speed)")
    args = parser.parse_args(argv)
    if args.speed:
        return speed(args)
    tab, summary = evaluate(args)
    print_result(f"{args.output}; baseline: the run's RoIs (u3)", tab, summary, key_width=40)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
