"""The decomposition at cohort scale: time per pass and peak memory against n.

Synthetic activation tensors of n = 500, 2,000 and 10,000 subjects (``--sizes``) are
written to disk as chunked stores (:mod:`brainage_xai.decomposition.chunked`; a
planted non-negative low-rank model plus noise, made chunk by chunk, so no tensor is
ever held whole and no network is needed; an interrupted run reuses the chunks it
wrote). On each, the constrained Tucker fit at fixed ranks as the rank sweep runs a
cell (``constraints='nonneg'``, ``n_iter_max=100``, ``tol=1e-4``, ``init='svd'``) runs
in a fresh process per case, so that its peak RSS (``VmHWM``) is its own:

- ``streamed``: from the store, one subject chunk at a time;
- ``sketch``: the same with the three-pass start (``init='sketch'``);
- ``in-memory``: the tensor loaded whole, the numpy path (the baseline), where it fits
  in half the available memory;
- ``dask``: the store as a ``dask.array`` on a ``distributed.LocalCluster`` of 2
  worker processes, for the 2,000 case (``--dask-n``); RSS of the client and of the
  largest worker.

Printed per n and case: passes over the tensor, seconds per pass, microseconds per
subject and pass, peak RSS, final relative error, and the smallest correlation of the
factors' columns with the in-memory fit's (``corr``; with the streamed fit's where the
in-memory one did not run). Ratios are of the largest n's streamed case to the
smallest's; the script ends with one line::

    scale: time-per-subject ratio T, peak-RSS ratio M, peak RSS at N subjects G GB

Run::

    python benchmarks/bench_scale.py [--max-n 2000] [--channels 16 --voxels 10000]
        [--chunk 100] [--dir DIR]   # stores go to DIR (default: a temporary dir)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RANK = (6, 4)
SETTINGS = dict(constraints="nonneg", n_iter_max=100, tol=1e-4)


def write_store(path: Path, n, c, v, chunk, seed=0):
    """A planted rank-``RANK[0]`` tensor with a rank-``RANK[1]`` channel factor, chunk by chunk."""
    from brainage_xai.decomposition.chunked import StoreWriter

    R1, R2 = RANK
    rng = np.random.default_rng(seed)
    U2 = rng.random((c, R2)) * (rng.random((c, R2)) < 0.5) + 0.01
    W = U2 @ (0.2 + rng.random((R1, R2))).T
    U3 = rng.random((v, R1)) * (rng.random((v, R1)) < 0.2)
    w = StoreWriter(path, (n, c, v), dtype="float32", chunk=chunk)
    for k in w.missing:
        lo, hi = w.rows[k]
        g = np.random.default_rng([seed, k])
        clean = np.einsum("ar,br,cr->abc", 0.5 + g.random((hi - lo, R1)), W, U3).astype(np.float32)
        noise = g.standard_normal(clean.shape, dtype=np.float32)
        w.write(k, np.maximum(clean + 0.1 * float(np.sqrt(np.mean(clean**2))) * noise, 0))
    return w


def _peak_rss() -> int:
    """Peak RSS of this process's memory map (``VmHWM``), in bytes.

    Not ``getrusage``'s ``ru_maxrss``: Linux carries it over ``fork``/``exec`` from
    the parent, so a fresh process would report the parent's peak when it is larger.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(case, store, out):
    """One fit in this (fresh) process; writes its factors and a JSON line."""
    from brainage_xai.decomposition import fit_constrained_tucker
    from brainage_xai.decomposition.chunked import ChunkedTensor, store_to_dask

    init = "sketch" if case == "sketch" else "svd"
    extra = {}
    if case == "dask":
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
        A = store_to_dask(store)
    elif case == "in-memory":
        A = ChunkedTensor.from_store(store).to_numpy()
    else:
        A = ChunkedTensor.from_store(store)
    t0 = time.perf_counter()
    res = fit_constrained_tucker(A, RANK, init=init, **SETTINGS)
    seconds = time.perf_counter() - t0
    if case == "dask":
        extra["worker_rss"] = max(client.run(lambda: _peak_rss()).values())
        client.close()
        cluster.close()
    np.savez(out, *[np.asarray(f, dtype=np.float64) for f in res.factors])
    print(json.dumps(dict(case=case, seconds=seconds, passes=res.n_passes, n_iter=res.n_iter,
                          n_iter_init=res.n_iter_init, rel_error=res.rel_error,
                          rss=_peak_rss(), **extra)))


def _run_case(case, store, out):
    proc = subprocess.run([sys.executable, __file__, "--worker", case, str(store), str(out)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{case} on {store} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _min_corr(a_npz, b_npz):
    a, b = np.load(a_npz), np.load(b_npz)
    worst = 1.0
    for key in a.files:
        for j in range(a[key].shape[1]):
            x, y = a[key][:, j], b[key][:, j]
            if np.std(x) > 0 and np.std(y) > 0:
                worst = min(worst, abs(float(np.corrcoef(x, y)[0, 1])))
    return worst


def _available() -> int:
    with open("/proc/meminfo") as fh:
        fields = dict(line.split(":", 1) for line in fh)
    return int(fields["MemAvailable"].split()[0]) * 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="500,2000,10000")
    ap.add_argument("--max-n", type=int, default=None, help="stop at this many subjects")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--voxels", type=int, default=10_000)
    ap.add_argument("--chunk", type=int, default=100, help="subjects per chunk")
    ap.add_argument("--dask-n", type=int, default=2000, help="the size also run on a LocalCluster")
    ap.add_argument("--dir", type=Path, default=None, help="keep the stores here (reused)")
    ap.add_argument("--worker", nargs=3, metavar=("CASE", "STORE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(*args.worker)

    sizes = sorted(int(s) for s in args.sizes.split(","))
    if args.max_n is not None:
        sizes = [n for n in sizes if n <= args.max_n]
    if not sizes:
        ap.error("no size left under --max-n")
    c, v = args.channels, args.voxels
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench_scale-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"tensors n x {c} x {v} float32, chunks of {args.chunk} subjects; rank {RANK}, {SETTINGS}")
    hdr = (f"{'n':>6s} {'case':10s} {'GB':>6s} {'passes':>6s} {'s/pass':>7s} {'us/subj/pass':>12s} "
           f"{'peak RSS GB':>11s} {'rel_error':>9s} {'corr':>8s}")
    print(hdr)
    streamed = {}
    try:
        for n in sizes:
            store = root / f"n{n}-c{c}-v{v}-k{args.chunk}"
            t0 = time.perf_counter()
            write_store(store, n, c, v, args.chunk)
            gb = n * c * v * 4 / 1e9
            print(f"# n={n}: store ready in {time.perf_counter() - t0:.1f} s ({gb:.2f} GB)", flush=True)
            cases = ["streamed", "sketch"]
            if 4 * n * c * v < 0.5 * _available():
                cases.append("in-memory")
            if n == args.dask_n:
                cases.append("dask")
            res = {}
            for case in cases:
                res[case] = _run_case(case, store, root / f"{store.name}-{case}.npz")
            ref = "in-memory" if "in-memory" in res else "streamed"
            for case, r in res.items():
                per = r["seconds"] / r["passes"]
                rss = r["rss"] / 1e9
                if "worker_rss" in r:
                    rss_s = f"{rss:.2f}+{r['worker_rss'] / 1e9:.2f}"
                else:
                    rss_s = f"{rss:.2f}"
                corr = "-" if case == ref else f"{_min_corr(root / f'{store.name}-{ref}.npz', root / f'{store.name}-{case}.npz'):.5f}"
                print(f"{n:6d} {case:10s} {gb:6.2f} {r['passes']:6d} {per:7.3f} {1e6 * per / n:12.2f} "
                      f"{rss_s:>11s} {r['rel_error']:9.5f} {corr:>8s}", flush=True)
            streamed[n] = res["streamed"]
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    lo, hi = sizes[0], sizes[-1]

    def per_subject(n):
        return streamed[n]["seconds"] / streamed[n]["passes"] / n

    T = per_subject(hi) / per_subject(lo)
    M = streamed[hi]["rss"] / streamed[lo]["rss"]
    print(f"scale: time-per-subject ratio {T:.2f}, peak-RSS ratio {M:.2f}, "
          f"peak RSS at {hi} subjects {streamed[hi]['rss'] / 1e9:.2f} GB")


if __name__ == "__main__":
    sys.exit(main())
