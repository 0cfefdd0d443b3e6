"""Benchmark: the full 19 x 19 rank sweep against one TensorLy non-negative Tucker fit.

The paper's rank sweep (Algorithm 1) fits the decomposition at every (R1, R2) in
{2..20}^2 on the training activations (166 x 128 x 252: the paper's training-set size and
a 2 mm network's last-layer grid), each fit in their implementation a TensorLy
``non_negative_tucker_hals`` run. The unit here is one such fit at rank [7, 20, 7] with
100 iterations, timed in the same process (before and after the sweep, so that a load
change on a shared machine shows); the sweep is ``run_rank_sweep`` over the full grid,
validation errors included.

Run::

    .venv/bin/python benchmarks/bench_selection.py [--n-jobs N] [--dtype float64]

The last line is ``sweep/tensorly_fit ratio: X`` (goal: <= 3).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def planted(n, c, v, rank, rng, noise=0.05, dtype=np.float64):
    """Non-negative rank-``rank`` CP tensor with sparse spatial factors, 5% noise."""
    U1 = rng.random((n, rank)) + 0.2
    W = rng.random((c, rank))
    U3 = rng.random((v, rank)) * (rng.random((v, rank)) < 0.35)
    X = np.einsum("ir,jr,kr->ijk", U1, W, U3)
    return (X * (1 + noise * rng.uniform(-1, 1, X.shape))).astype(dtype)


def tensorly_fit(A):
    import tensorly as tl
    from tensorly.decomposition import non_negative_tucker_hals

    tl.set_backend("numpy")
    t0 = time.perf_counter()
    _, errors = non_negative_tucker_hals(A, rank=[7, 20, 7], n_iter_max=100, tol=0,
                                         random_state=0, return_errors=True)
    return time.perf_counter() - t0, float(errors[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-jobs", type=int, default=os.cpu_count() or 1,
                        help="joblib workers of the sweep (default: all cores, as TensorLy's BLAS uses)")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--grid-max", type=int, default=20, help="largest rank of the grid")
    args = parser.parse_args(argv)

    from brainage_xai.selection import choose_ranks, compute_scree, run_rank_sweep

    rng = np.random.default_rng(0)
    # Training and validation subjects as in the paper (166 and 56), planted rank 7.
    A = planted(166 + 56, 128, 252, 7, rng, dtype=np.dtype(args.dtype))
    A_train, A_val = A[:166], A[166:]
    grid = range(2, args.grid_max + 1)
    print(f"tensor {A_train.shape} {A_train.dtype} (validation {A_val.shape}), "
          f"grid {grid.start}..{grid.stop - 1}, n_jobs={args.n_jobs}, cpus={os.cpu_count()}")

    tl_before, tl_err = tensorly_fit(A_train)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sweep = run_rank_sweep(A_train, A_val, grid, out_tsv=os.path.join(tmp, "rank_sweep.tsv"),
                               n_jobs=args.n_jobs, quiet=True)
        t_sweep = time.perf_counter() - t0
    tl_after, _ = tensorly_fit(A_train)
    t_scree = time.perf_counter()
    choice = choose_ranks(sweep, compute_scree(A_train))
    t_scree = time.perf_counter() - t_scree
    unit = 0.5 * (tl_before + tl_after)

    fitted = sweep.loc[sweep["fitted"]]
    # the sweep's cell at TensorLy's rank (not in a grid that stops below 20: --grid-max)
    at7 = sweep.loc[(sweep["R1"] == 7) & (sweep["R2"] == 20), "train_error"]
    err7 = float(at7.iloc[0]) if len(at7) else float("nan")
    print()
    print(f"{'what':<52}{'seconds':>10}{'fits':>7}{'iterations':>12}{'rel. error':>12}")
    print(f"{'TensorLy non_negative_tucker_hals [7,20,7] (before)':<52}{tl_before:>10.2f}{1:>7}{100:>12}{tl_err:>12.4f}")
    print(f"{'TensorLy non_negative_tucker_hals [7,20,7] (after)':<52}{tl_after:>10.2f}{1:>7}{100:>12}{'':>12}")
    print(f"{f'rank sweep {len(grid)} x {len(grid)} (this package)':<52}{t_sweep:>10.2f}{len(fitted):>7}"
          f"{int(fitted['n_iter'].sum()):>12}{err7:>12.4f}")
    print(f"{'  scree + rank choice':<52}{t_scree:>10.2f}")
    print(f"chosen ranks: R1={choice['R1']} R2={choice['R2']} (planted 7); "
          f"{len(sweep)} cells, {len(fitted)} fitted, {len(sweep) - len(fitted)} share the R1 optimum")
    print(f"sweep/tensorly_fit ratio: {t_sweep / unit:.2f}")


if __name__ == "__main__":
    main()
