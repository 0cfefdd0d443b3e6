"""Benchmark: structured constrained Tucker solver against TensorLy's non-negative Tucker.

Baseline, measured in the same process on the same tensor:
``tensorly.decomposition.non_negative_tucker_hals(A, rank=[R1, R2, R1])`` (the
solver the paper built on), 100 iterations.

Cases
-----
paper   166 x 128 x 252 float64 (the paper's training set, 2 mm last-layer grid),
        planted rank (7, 20): both solvers; time, iterations, relative error, the
        time this solver needs to reach TensorLy's final error and the ratio; the
        per-iteration floor (two bare passes over the tensor).
large   1000 x 256 x 2000 float32, rank (7, 20): this solver, time and peak memory.
wide    300 x 512 x 2000 float32, rank (20, 20): this solver (TensorLy needs ~17 s
        per iteration there and diverges at [20, 20, 20]).
Every case also runs on CUDA when a GPU is available.

Usage::

    .venv/bin/python benchmarks/bench_decomposition.py            # paper case
    .venv/bin/python benchmarks/bench_decomposition.py --large    # + large cases
    .venv/bin/python benchmarks/bench_decomposition.py --quick    # smaller, for CI
    # this tree against another checkout of the package (e.g. an earlier commit):
    .venv/bin/python benchmarks/bench_decomposition.py --baseline-tree DIR [--repeats 5] [--threads 1]

``--baseline-tree`` times fixed-length fits (numpy f64/f32, torch CPU f64, a chunked
tensor; CUDA with ``--device``) of the package in ``DIR`` and of this tree, each in
its own process, alternating, and prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from brainage_xai.decomposition import fit_constrained_tucker
from brainage_xai.decomposition._testing import make_planted


def _ours(A, rank, **kw):
    """Fit, recording (seconds since start, relative objective) at every iteration."""
    trace = []
    t0 = time.perf_counter()

    def cb(it, rel):
        trace.append((time.perf_counter() - t0, rel))

    res = fit_constrained_tucker(A, rank, callback=cb, **kw)
    return res, time.perf_counter() - t0, trace


def _time_to(trace, target):
    for t, e in trace:
        if e <= target:
            return t
    return float("nan")


def _floor(A, R1, reps=5):
    """Seconds for the two bare passes of one iteration (A x3 U3 and the mode-3 MTTKRP)."""
    n, c, v = A.shape
    is_torch = type(A).__module__.startswith("torch")
    if is_torch:
        import torch

        gen = torch.Generator(device="cpu").manual_seed(0)
        U3 = torch.rand((v, R1), generator=gen, dtype=A.dtype).to(A.device)
        KR = torch.rand((n * c, R1), generator=gen, dtype=A.dtype).to(A.device)
        sync = torch.cuda.synchronize if A.is_cuda else (lambda: None)
    else:
        rng = np.random.default_rng(0)
        U3 = rng.random((v, R1)).astype(A.dtype)
        KR = rng.random((n * c, R1)).astype(A.dtype)
        sync = lambda: None  # noqa: E731
    A2 = A.reshape(n * c, v)
    best = float("inf")
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        _ = A2 @ U3
        _ = A2.T @ KR
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def paper_case(shape, rank, tl_iters, device=None):
    import tensorly as tl
    from tensorly.decomposition import non_negative_tucker_hals

    A, _ = make_planted(shape, rank, noise=0.1, random_state=0)
    R1, R2 = rank
    rows = []

    # baseline: TensorLy
    tl.set_backend("numpy")
    t = time.perf_counter()
    (core, factors), tl_err = non_negative_tucker_hals(
        A, rank=[R1, R2, R1], n_iter_max=tl_iters, init="svd", random_state=0,
        return_errors=True,
    )
    t_tl = time.perf_counter() - t
    rec = tl.tucker_to_tensor((core, factors))
    e_tl = float(np.linalg.norm(A - rec) / np.linalg.norm(A))
    faces = float(sum(np.sum(core[i, :, i] ** 2) for i in range(R1)) / np.sum(core**2))
    rows.append(("tensorly non_negative_tucker_hals", "numpy f64", t_tl, len(tl_err), e_tl,
                 float("nan"), float("nan")))

    # this solver, float64 numpy: to convergence
    res, t_ours, trace = _ours(A, rank, tol=1e-7, n_iter_max=1000)
    t_hit = _time_to(trace, e_tl)
    per_it = (trace[-1][0] - trace[0][0]) / max(len(trace) - 1, 1)
    rows.append(("fit_constrained_tucker", "numpy f64", t_ours, res.n_iter, res.rel_error, t_hit,
                 t_tl / t_hit))
    floor = _floor(A, R1)

    variants = [("numpy f32", A.astype(np.float32))]
    try:
        import torch

        variants.append(("torch cpu f64", torch.from_numpy(A)))
        if device is not None and device.startswith("cuda") and torch.cuda.is_available():
            variants.append(("torch cuda f32", torch.from_numpy(A.astype(np.float32)).to(device)))
            variants.append(("torch cuda f64", torch.from_numpy(A).to(device)))
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    for label, X in variants:
        if label.startswith("torch cuda"):
            _ours(X, rank, tol=1e-7, n_iter_max=5)  # warm-up: CUDA context, kernels
        r, t_v, tr = _ours(X, rank, tol=1e-7, n_iter_max=1000)
        th = _time_to(tr, e_tl)
        rows.append(("fit_constrained_tucker", label, t_v, r.n_iter, r.rel_error, th, t_tl / th))

    print(f"\n## paper case: {shape[0]} x {shape[1]} x {shape[2]}, rank {rank}, "
          f"planted rank-{R1} model + 10% noise")
    print(f"baseline: TensorLy {tl.__version__} non_negative_tucker_hals(rank={[R1, R2, R1]}, "
          f"n_iter_max={tl_iters}), same process, same tensor")
    print(f"{'solver':36s} {'backend':15s} {'seconds':>9s} {'iters':>6s} {'rel.err':>9s} "
          f"{'t->TL err':>10s} {'speed-up':>9s}")
    for name, be, t, it, e, th, sp in rows:
        print(f"{name:36s} {be:15s} {t:9.3f} {it:6d} {e:9.5f} {th:10.4f} {sp:9.1f}")
    print(f"TensorLy: share of the core's energy on the diagonal faces: {faces:.3f} "
          "(eq. 2 needs 1.0; this solver's core is exactly on the faces)")
    print(f"per-iteration floor (two bare passes, numpy f64): {1e3 * floor:.2f} ms; "
          f"this solver: {1e3 * per_it:.2f} ms per iteration ({per_it / floor:.2f}x the floor)")
    print(f"speed-up to TensorLy's final error (numpy f64): {t_tl / t_hit:.1f}x; "
          f"final error {res.rel_error:.5f} vs TensorLy {e_tl:.5f}")
    return t_tl / t_hit


def large_case(shape, rank, n_iter, device=None):
    A, _ = make_planted(shape, rank, noise=0.1, dtype=np.float32, random_state=1)
    nbytes = A.nbytes
    print(f"\n## large case: {shape[0]} x {shape[1]} x {shape[2]} float32 ({nbytes / 2**30:.2f} GiB), "
          f"rank {rank}, {n_iter} iterations max")
    print(f"{'backend':15s} {'seconds':>9s} {'init s':>7s} {'iters':>6s} {'s/iter':>7s} "
          f"{'floor s':>8s} {'rel.err':>9s} {'peak extra MiB':>15s}")
    tracemalloc.start()
    res, t, trace = _ours(A, rank, tol=1e-6, n_iter_max=n_iter)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    per_it = (trace[-1][0] - trace[0][0]) / max(len(trace) - 1, 1)
    init = trace[0][0] - per_it
    floor = _floor(A, rank[0], reps=2)
    print(f"{'numpy f32':15s} {t:9.2f} {init:7.2f} {res.n_iter + res.n_iter_init:6d} {per_it:7.3f} "
          f"{floor:8.3f} {res.rel_error:9.5f} {peak / 2**20:15.1f}")
    if device is not None and device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            X = torch.from_numpy(A).to(device)
            del A
            _ours(X, rank, tol=1e-6, n_iter_max=3)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            res, t, trace = _ours(X, rank, tol=1e-6, n_iter_max=n_iter)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            per_it = (trace[-1][0] - trace[0][0]) / max(len(trace) - 1, 1)
            init = trace[0][0] - per_it
            floor = _floor(X, rank[0])
            print(f"{'torch cuda f32':15s} {t:9.2f} {init:7.2f} {res.n_iter + res.n_iter_init:6d} "
                  f"{per_it:7.3f} {floor:8.3f} {res.rel_error:9.5f} {peak / 2**20:15.1f}")
    print("peak extra = allocations made during the fit beyond the input tensor "
          "(tracemalloc for numpy, torch.cuda.max_memory_allocated for CUDA)")


def _fit_times(shape, rank, n_iter, device=None):
    """Seconds of one fixed-length fit per input kind, from an SVD start."""
    import torch

    import brainage_xai
    from brainage_xai.decomposition.chunked import ChunkedTensor

    A, _ = make_planted(shape, rank, noise=0.1, random_state=0)
    inputs = {"numpy f64": A, "numpy f32": A.astype(np.float32),
              "torch cpu f64": torch.from_numpy(A), "chunked f64": ChunkedTensor.from_array(A, 32)}
    if device is not None and device.startswith("cuda") and torch.cuda.is_available():
        inputs["torch cuda f32"] = torch.from_numpy(A.astype(np.float32)).to(device)
    times = {}
    for label, X in inputs.items():
        fit_constrained_tucker(X, rank, n_iter_max=2, tol=0)  # warm-up: first calls, kernels
        t = time.perf_counter()
        fit_constrained_tucker(X, rank, n_iter_max=n_iter, tol=0)
        if label.startswith("torch cuda"):
            torch.cuda.synchronize()
        times[label] = time.perf_counter() - t
    return {"package": str(Path(brainage_xai.__file__).parent), "times": times}


def compare(baseline, shape, rank, n_iter, repeats, device=None, threads=None):
    """Medians of :func:`_fit_times` for the package in ``baseline`` and in this tree.

    ``threads`` caps the BLAS and torch threads of the child processes: on a loaded
    machine a multithreaded BLAS makes single calls up to 100x slower, at random,
    which swamps what the comparison is about.
    """
    limits = {} if threads is None else {
        k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    trees = {"baseline": Path(baseline).resolve(), "this tree": Path(__file__).resolve().parents[1]}
    runs = {name: [] for name in trees}
    spec = json.dumps([list(shape), list(rank), n_iter, device])
    for _ in range(repeats):
        for name, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=str(tree), **limits)
            out = subprocess.run([sys.executable, __file__, "--fit-times", spec], env=env,
                                 capture_output=True, text=True, check=True).stdout
            got = json.loads(out.splitlines()[-1])
            if not Path(got["package"]).is_relative_to(tree):
                raise RuntimeError(f"{name}: imported {got['package']}, not the package in {tree}")
            runs[name].append(got["times"])
    print(f"\n## solver against a baseline tree: {shape[0]} x {shape[1]} x {shape[2]}, "
          f"rank {tuple(rank)}, {n_iter} iterations, median of {repeats} alternating runs, "
          f"{threads or 'default'} BLAS/torch threads")
    print(f"baseline: the package in {trees['baseline']}")
    print(f"{'input':15s} {'baseline s':>11s} {'this tree s':>12s} {'ratio':>7s}")
    for label in runs["baseline"][0]:
        b = float(np.median([r[label] for r in runs["baseline"]]))
        h = float(np.median([r[label] for r in runs["this tree"]]))
        print(f"{label:15s} {b:11.3f} {h:12.3f} {h / b:7.3f}")
    print("ratio = this tree / baseline (below 1: this tree is faster)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    p.add_argument("--large", action="store_true", help="also the large float32 cases")
    p.add_argument("--device", default=None, help="e.g. cuda: also run on this device")
    p.add_argument("--tl-iters", type=int, default=100)
    p.add_argument("--baseline-tree", default=None,
                   help="time this tree's solver against the package in this directory")
    p.add_argument("--repeats", type=int, default=5, help="runs per tree with --baseline-tree")
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS/torch threads of the --baseline-tree runs (default: unchanged)")
    p.add_argument("--fit-times", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.fit_times is not None:
        print(json.dumps(_fit_times(*json.loads(args.fit_times))))
        return 0
    if args.baseline_tree is not None:
        shape, rank, n_iter = ((40, 32, 60), (4, 8), 20) if args.quick else ((166, 128, 252), (7, 20), 50)
        compare(args.baseline_tree, shape, rank, n_iter, args.repeats, args.device, args.threads)
        return 0
    if args.quick:
        paper_case((40, 32, 60), (4, 8), 20, args.device)
        if args.large:
            large_case((100, 64, 200), (4, 8), 50, args.device)
        return 0
    paper_case((166, 128, 252), (7, 20), args.tl_iters, args.device)
    if args.large:
        large_case((1000, 256, 2000), (7, 20), 100, args.device)
        large_case((300, 512, 2000), (20, 20), 100, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
