"""Benchmark: the selection stage on a GPU against the host, on one run's tensor.

The group level on ``--device cuda`` moves the split tensors to the GPU and runs the rank
sweep, the λ sweep and the final fit there, one fit at a time
(:func:`brainage_xai.selection.run_selection`, ``device``). The baseline is what it does
on the CPU: numpy, with joblib workers on every core.

This takes the decomposed layer's activations of an existing group run (its work
folder; nothing is retrained), builds the deviation tensor as the group level does
(``--tensor deviations``, the demo's), standardises age by the training subjects, and runs
the whole selection stage on both, with the same rank grid, into two temporary folders.
It prints the wall time of each, what each chose (ranks, λ), the linear model's test MAE
(standardised units) and how alike the two sets of RoIs are (the correlation of each of
the device's RoIs with the host's, matched by the Hungarian algorithm).

Run::

    python benchmarks/bench_selection_device.py --bids BIDS --output RUN --device cuda \\
        [--rank-grid 2:12] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def load_run(bids: Path, output: Path):
    """``(A, y)``: the deviation tensors and standardised ages per split of a group run."""
    from brainage_xai.bids.derivatives import GroupOutputs
    from brainage_xai.model.activations import load_activation_tensor
    from brainage_xai.selection import deviation_splits

    _, pattern = GroupOutputs(output / "group", output / ".work" / "group").activations("*")
    found = sorted(pattern.parent.glob(pattern.name))
    if not found:
        raise SystemExit(f"no activation tensor under {pattern.parent}: run the group level first")
    act = load_activation_tensor(found[0])
    rows = {s: act.rows(s) for s in ("train", "val", "test")}
    A, _, _ = deviation_splits(act.array, rows)
    ages = pd.read_csv(bids / "participants.tsv", sep="\t").set_index("participant_id")["age"]
    age = ages.loc[["sub-" + s for s in act.subjects]].to_numpy(np.float64)
    mean, std = age[rows["train"]].mean(), age[rows["train"]].std()
    y = {s: (age[r] - mean) / std for s, r in rows.items()}
    return act.layer, A, y


def run_once(A, y, grid, device, n_jobs, quiet):
    from brainage_xai.bids.derivatives import GroupOutputs
    from brainage_xai.selection import SelectionFiles, Splits, run_selection
    from brainage_xai.selection.scree import as_numpy

    with tempfile.TemporaryDirectory() as tmp:
        names = GroupOutputs(Path(tmp) / "group", Path(tmp) / "work")
        files = SelectionFiles(
            scree=names.scree, rank_sweep=names.rank_sweep, lambda_sweep=names.lambda_sweep,
            selection=names.selection, decomposition=names.decomposition,
            decomposition_json=names.decomposition_json, loadings=names.loadings,
        )
        t0 = time.perf_counter()
        out = run_selection(
            Splits.from_dict(A), Splits.from_dict(y), files,
            rank_grid=grid, n_jobs=n_jobs, quiet=quiet, device=device,
        )
        if device is not None and str(device).startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    final = out["final"]
    return {
        "seconds": seconds,
        "ranks": (out["ranks"]["R1"], out["ranks"]["R2"]),
        "lambda": out["lambda"]["lambda"],
        "test_mae": final.metrics["test"]["linear_model_on_decomposition"]["mae"],
        "U3": as_numpy(final.result.factors[2]).astype(np.float64),
    }


def roi_agreement(U3a, U3b) -> float:
    """Lowest correlation over the RoIs of ``U3b`` with their Hungarian-matched RoI of ``U3a``."""
    from scipy.optimize import linear_sum_assignment

    k = min(U3a.shape[1], U3b.shape[1])
    C = np.nan_to_num(np.corrcoef(U3a.T, U3b.T)[: U3a.shape[1], U3a.shape[1]:])
    r, c = linear_sum_assignment(-C)
    return float(C[r, c][:k].min())


def main(argv=None) -> int:
    from brainage_xai.cli.parser import _rank_grid

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bids", required=True, type=Path, help="the run's BIDS dataset (participants.tsv)")
    parser.add_argument("--output", required=True, type=Path, help="output directory of a group run")
    parser.add_argument("--device", default="cuda", help="torch device of the candidate (default cuda)")
    parser.add_argument("--rank-grid", type=_rank_grid, default="2:12",
                        help="the sweep's ranks as the group level takes them (the demo's 2:12)")
    parser.add_argument("--n-jobs", type=int, default=os.cpu_count() or 1, help="host workers (baseline)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (medians are printed)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    layer, A, y = load_run(args.bids, args.output)
    grid = args.rank_grid
    print(f"{args.output}: layer {layer}, deviations {A['train'].shape[1:]}, "
          f"{ {s: len(a) for s, a in A.items()} }, rank grid {grid[0]}..{grid[-1]}")
    # The device first, each run printed as it ends: a run cut off by a time limit during
    # the (slower) host baseline still reports the device's time.
    runs = {f"{args.device} (torch)": (args.device, 1), "host (numpy, baseline)": (None, args.n_jobs)}
    res = {}
    for name, (device, n_jobs) in runs.items():
        res[name] = []
        for _ in range(args.repeats):
            res[name].append(run_once(A, y, grid, device, n_jobs, args.quiet))
            r = res[name][-1]
            print(f"  {name}: {r['seconds']:.1f} s, ranks {r['ranks']}, lambda {r['lambda']:.4g}", flush=True)
    base = statistics.median(r["seconds"] for r in res["host (numpy, baseline)"])
    host_U3 = res["host (numpy, baseline)"][0]["U3"]
    rows = []
    for name, rs in res.items():
        med = statistics.median(r["seconds"] for r in rs)
        rows.append({
            "selection on": name, "median_s": round(med, 1),
            "runs_s": " ".join(f"{r['seconds']:.1f}" for r in rs),
            "speed-up": round(base / med, 2), "R1, R2": rs[0]["ranks"], "lambda": f"{rs[0]['lambda']:.4g}",
            "test MAE (std.)": round(rs[0]["test_mae"], 4),
            "RoIs vs host (lowest r)": round(roi_agreement(host_U3, rs[0]["U3"]), 4),
        })
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
