"""Chunked activation stores: memory-mapped ``.npy`` chunks against zarr.

The same synthetic float32 tensor (``--subjects`` x ``--channels`` x ``--voxels``,
chunks of ``--chunk`` subjects; rectified Gaussian values, half zeros as after a ReLU)
is written as the package's directory store
(:class:`brainage_xai.decomposition.chunked.StoreWriter`: one ``.npy`` per chunk,
``open_memmap``, rename) and, when zarr is installed, as a zarr array with the same
chunks, once without compression and once with zarr's default codec. Then one pass of
the decomposition (``A2_k @ U`` for a ``v x 10`` factor, chunk by chunk) is timed on
each, ``--repeats`` times (median; the files are in the page cache after the first).
The baseline is the ``.npy`` store in the same run; a column gives each store's time
over it.

Run::

    pip install zarr   # optional: without it only the .npy store is measured
    python benchmarks/bench_store.py [--subjects 400 --channels 16 --voxels 10000 --chunk 50]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from brainage_xai.decomposition.chunked import ChunkedTensor, StoreWriter


def _block(rng_seed, k, shape):
    """Rectified Gaussian values: about half zeros, as activations after a ReLU."""
    g = np.random.default_rng([rng_seed, k]).standard_normal(shape, dtype=np.float32)
    return np.maximum(g, 0, out=g)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _pass(get_block, rows, U):
    out = 0.0
    for k, (lo, hi) in enumerate(rows):
        a = get_block(k, lo, hi)
        out += float((np.asarray(a).reshape(-1, U.shape[0]) @ U).sum())
        del a
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=400)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--voxels", type=int, default=10_000)
    ap.add_argument("--chunk", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary dir)")
    args = ap.parse_args(argv)
    n, c, v = args.subjects, args.channels, args.voxels
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench_store-"))
    U = np.random.default_rng(1).random((v, 10), dtype=np.float32)
    rows_out = []
    try:
        t0 = time.perf_counter()
        w = StoreWriter(root / "npy", (n, c, v), chunk=args.chunk)
        for k in w.missing:
            lo, hi = w.rows[k]
            w.write(k, _block(0, k, (hi - lo, c, v)))
        t_write = time.perf_counter() - t0
        T = ChunkedTensor.from_store(root / "npy")
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ref = _pass(lambda k, lo, hi: T.chunk(k), T.rows, U)
            times.append(time.perf_counter() - t0)
        rows_out.append(("npy chunks (memmap)", t_write, statistics.median(times), _dir_size(root / "npy"), ref))

        try:
            import zarr
        except ImportError:
            zarr = None
            print("zarr is not installed: only the .npy store was measured")
        if zarr is not None:
            for label, comp in (("zarr, no compression", None), ("zarr, default codec", "auto")):
                path = root / label.split(",")[1].strip().replace(" ", "-")
                t0 = time.perf_counter()
                kw = {"compressors": None} if comp is None else {}
                z = zarr.create_array(str(path), shape=(n, c, v), chunks=(args.chunk, c, v),
                                      dtype="float32", **kw)
                for k, (lo, hi) in enumerate(T.rows):
                    z[lo:hi] = _block(0, k, (hi - lo, c, v))
                t_write = time.perf_counter() - t0
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    got = _pass(lambda k, lo, hi, z=z: z[lo:hi], T.rows, U)
                    times.append(time.perf_counter() - t0)
                assert abs(got - ref) <= 1e-6 * abs(ref)
                rows_out.append((label, t_write, statistics.median(times), _dir_size(path), got))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    gb = n * c * v * 4 / 1e9
    print(f"tensor {n} x {c} x {v} float32 ({gb:.2f} GB), chunks of {args.chunk} subjects, "
          f"median of {args.repeats} passes")
    print(f"{'store':24s} {'write s':>8s} {'pass s':>8s} {'pass / npy':>10s} {'GB/s':>6s} {'disk GB':>8s}")
    base = rows_out[0][2]
    for label, tw, tp, size, _ in rows_out:
        print(f"{label:24s} {tw:8.2f} {tp:8.3f} {tp / base:10.2f} {gb / tp:6.2f} {size / 1e9:8.2f}")


if __name__ == "__main__":
    main()
