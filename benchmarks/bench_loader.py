"""Peak memory of one training epoch against the cohort size: the stacked in-memory maps
against the maps read from disk through a DataLoader.

For each cohort size n, a fresh process trains the network for one epoch
(:func:`brainage_xai.model.ensemble.train_networks`: normalisation, the epoch, batch-norm
recalibration and the validation pass) on n synthetic maps written as NIfTI files, once
from the stacked array (:func:`brainage_xai.model.data.load_maps`, the baseline, named
``memory``) and once from the files (:class:`brainage_xai.model.data.MapDataset`, named
``loader``, with ``--workers`` loader processes), and reports its peak resident memory
(``ru_maxrss``) and that of its largest loader worker. Both runs of one n must give the
same weights (a digest of the state dict is compared). The ratios are the loader's peak
over the baseline's at the same n, and each path's peak over its own at the smallest n.

Run::

    python benchmarks/bench_loader.py [--sizes 50 100 200 400] [--resolution 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _child(path: str, n: int, folder: Path, workers: int) -> None:
    import torch

    from brainage_xai.model import ensemble
    from brainage_xai.model.data import MapDataset, load_maps
    from brainage_xai.model.training import TrainSettings, stratified_split

    torch.set_num_threads(2)
    paths = sorted(folder.glob("sub-*.nii.gz"))[:n]
    age = np.asarray(json.loads((folder / "age.json").read_text()))[:n]
    split = stratified_split([p.name for p in paths], age, seed=0)
    rows = {s: np.flatnonzero(split["split"] == s) for s in ("train", "val")}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tic = time.perf_counter()
    maps = load_maps(paths)[0] if path == "memory" else MapDataset(paths, workers=workers)
    arch = ensemble.architecture(1, widths=[4, 8], depths=[1, 1])
    settings = TrainSettings(epochs=1, batch_size=8, precision="fp32", seed=0)
    with tempfile.TemporaryDirectory() as run_dir:
        trained = ensemble.train_networks(maps, age[:, None], rows["train"], rows["val"], arch, settings,
                                          run_dir=Path(run_dir), device=torch.device("cpu"), quiet=True)
    digest = hashlib.sha256()
    for name, value in trained.model.state_dict().items():
        digest.update(name.encode() + value.numpy().tobytes())
    print(json.dumps({
        "before_mb": base / 1024, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "seconds": time.perf_counter() - tic, "weights": digest.hexdigest()[:12],
    }))


def _write_cohort(folder: Path, n: int, resolution: int) -> float:
    import nibabel as nib

    from brainage_xai.imaging.templates import model_grid

    shape, affine = model_grid(resolution)
    rng = np.random.default_rng(0)
    age = rng.uniform(10, 80, n)
    for i in range(n):
        data = (0.3 * rng.random(shape, dtype=np.float32)).astype(np.float32)
        data[10:20, 10:20, 10:20] += np.float32(age[i] / 80)
        nib.save(nib.Nifti1Image(data, affine), folder / f"sub-{i:05d}_map.nii.gz")
    (folder / "age.json").write_text(json.dumps(age.tolist()))
    return float(np.prod(shape) * 4 / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 400])
    parser.add_argument("--resolution", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("PATH", "N", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]), Path(args.child[2]), args.workers)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        map_mb = _write_cohort(folder, max(args.sizes), args.resolution)
        print(f"{args.resolution} mm maps ({map_mb:.2f} MB each), one epoch, loader workers {args.workers}; "
              "baseline: the stacked in-memory maps (memory)")
        print(f"{'n':>6} {'maps MB':>8} {'memory MB':>10} {'loader MB':>10} {'worker MB':>10} "
              f"{'loader/memory':>14} {'memory s':>9} {'loader s':>9} same weights")
        first = {}
        for n in args.sizes:
            got = {}
            for path in ("memory", "loader"):
                done = subprocess.run([sys.executable, __file__, "--workers", str(args.workers),
                                       "--child", path, str(n), str(folder)],
                                      capture_output=True, text=True, check=True)
                got[path] = json.loads(done.stdout.strip().splitlines()[-1])
                first.setdefault(path, got[path]["peak_mb"])
            m, loader = got["memory"], got["loader"]
            print(f"{n:>6} {n * map_mb:>8.0f} {m['peak_mb']:>10.0f} {loader['peak_mb']:>10.0f} "
                  f"{loader['worker_mb']:>10.0f} {loader['peak_mb'] / m['peak_mb']:>14.2f} "
                  f"{m['seconds']:>9.1f} {loader['seconds']:>9.1f} "
                  f"{'yes' if m['weights'] == loader['weights'] else 'NO'}")
            last = got
        growth = {p: last[p]["peak_mb"] / first[p] for p in first}
        print(f"peak growth from n={args.sizes[0]} to n={args.sizes[-1]}: memory {growth['memory']:.2f}x, "
              f"loader {growth['loader']:.2f}x")


if __name__ == "__main__":
    main()
