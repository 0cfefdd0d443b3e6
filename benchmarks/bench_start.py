"""The fit's start: the SVD start (about 22 passes) against the sketch start (3 passes).

On planted tensors (:func:`brainage_xai.decomposition._testing.make_planted`) and on a
tensor whose spectrum decays slowly (30 components, weights ``0.8**r``: the ranks are
not singled out by the data, where the start decided the RoIs before the SVD start
had subspace iterations), each start is run with ``--seeds`` seeds at the rank sweep's
settings (``n_iter_max=100, tol=1e-4``) and the selection's final ones
(``n_iter_max=500, tol=1e-7``). Printed per case and start: passes of the start,
passes of the whole fit (median over seeds), the final relative error (median, and its
range over the seeds), and ``seed agree``, the smallest correlation of a spatial
component with the first seed's (1: every seed gives the same RoIs). The baseline is
the SVD start in the same run; ``err / svd`` is the sketch's median error over it.

Run::

    python benchmarks/bench_start.py [--seeds 0,1,2,3]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from brainage_xai.decomposition import fit_constrained_tucker
from brainage_xai.decomposition._testing import make_planted

SETTINGS = {"sweep": dict(n_iter_max=100, tol=1e-4), "final": dict(n_iter_max=500, tol=1e-7)}


def decaying(shape, seed=0):
    rng = np.random.default_rng(seed)
    n, c, v = shape
    s = 0.8 ** np.arange(30)
    A = np.einsum("r,ar,br,cr->abc", s, rng.random((n, 30)), rng.random((c, 30)), rng.random((v, 30)))
    return (A + 0.01 * rng.random(A.shape)).astype(np.float32)


def cases():
    yield "planted 166x128x252, rank (6, 6)", make_planted((166, 128, 252), (6, 6), noise=0.1, dtype=np.float32)[0], (6, 6), 0.0
    yield "planted 166x128x252, rank (6, 3)", make_planted((166, 128, 252), (6, 3), noise=0.1, dtype=np.float32, random_state=1)[0], (6, 3), 0.0
    yield "planted 300x16x4000, rank (8, 8)", make_planted((300, 16, 4000), (8, 8), noise=0.1, dtype=np.float32, random_state=2)[0], (8, 8), 0.0
    A = make_planted((300, 16, 4000), (8, 4), noise=0.1, dtype=np.float32, random_state=3)[0]
    yield "planted 300x16x4000, rank (8, 4), l1", A, (8, 4), 0.02 * float(A.mean())
    yield "decaying 200x16x3000, rank (6, 6)", decaying((200, 16, 3000)), (6, 6), 0.0


def _agree(U3s):
    ref = U3s[0]
    worst = 1.0
    for U in U3s[1:]:
        C = np.abs(np.corrcoef(ref.T, U.T)[: ref.shape[1], ref.shape[1]:])
        worst = min(worst, float(C.max(axis=1).min()))
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{'case':40s} {'settings':8s} {'start':7s} {'start passes':>12s} {'passes':>7s} "
          f"{'rel_error':>9s} {'range':>9s} {'err / svd':>9s} {'seed agree':>10s}")
    for name, A, rank, l1 in cases():
        for label, settings in SETTINGS.items():
            base = None
            for init in ("svd", "sketch"):
                fits = [fit_constrained_tucker(A, rank, init=init, l1=l1, random_state=s, **settings)
                        for s in seeds]
                errs = [f.rel_error for f in fits]
                med = statistics.median(errs)
                base = med if init == "svd" else base
                passes = statistics.median(f.n_passes for f in fits)
                # the start is what is left of the passes after the input check and two
                # passes per iteration (the warm-up's included)
                start = "/".join(str(p) for p in sorted(
                    {f.n_passes - 1 - 2 * (f.n_iter + f.n_iter_init) for f in fits}))
                print(f"{name:40s} {label:8s} {init:7s} {start:>12s} {passes:7.0f} "
                      f"{med:9.5f} {max(errs) - min(errs):9.2e} {med / base:9.4f} "
                      f"{_agree([np.asarray(f.factors[2]) for f in fits]):10.4f}", flush=True)


if __name__ == "__main__":
    main()
