"""Peak memory of the selection stage, step by step, on an existing run's activations.

Reads the activation tensor a group run left in its work directory
(``OUTPUT/.work/group/activations/*.npy``, memory-mapped), builds the tensor the group
level decomposes (``--tensor``: split by split, as the selection stage,
``workflows.group.selection``, does) and
runs :func:`brainage_xai.selection.run_selection` on it, sampling every 0.2 s the
resident memory of this process (all of it, and its anonymous part: the file-backed rest
is the memory-mapped tensor and the libraries, which the kernel can drop) and the
anonymous memory of its worker processes (joblib). Printed per step, against the named
baseline **the decomposed tensor's own size** (all splits), measured in the same run:
a step that copies the tensor shows up as one more unit.

The targets are random (the memory does not depend on them), so the ranks and λ chosen
here mean nothing.

Run::

    brainage-xai-demo DEMO               # or any group run at the demo's settings
    python benchmarks/bench_memory.py --output DEMO/results [--tensor deviations] \\
        [--rank-grid 2:12] [--n-jobs -1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _kib(fields: dict, key: str) -> int:
    return int(fields[key].split()[0]) if key in fields else 0


def _status(pid: str) -> dict:
    with open(f"/proc/{pid}/status") as fh:
        return dict(line.split(":", 1) for line in fh.read().splitlines() if ":" in line)


def _sample(me: int) -> tuple[int, int, int]:
    """(RSS, anonymous RSS) of this process and the anonymous RSS of its children, bytes."""
    rss = anon = kids = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = _status(pid)
        except OSError:
            continue
        if int(pid) == me:
            rss, anon = _kib(fields, "VmRSS"), _kib(fields, "RssAnon")
        elif int(fields.get("PPid", "0").strip() or 0) == me:
            kids += _kib(fields, "RssAnon")
    return rss * 1024, anon * 1024, kids * 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="output directory of a group run")
    p.add_argument("--tensor", choices=("activations", "deviations"), default="deviations")
    p.add_argument("--rank-grid", default="2:12", help="LO:HI (inclusive)")
    p.add_argument("--n-jobs", type=int, default=-1)
    args = p.parse_args(argv)
    if not Path("/proc/self/status").exists():
        p.error("needs Linux /proc to read the resident memory")
    lo, hi = (int(v) for v in args.rank_grid.split(":"))

    from brainage_xai.bids.derivatives import GroupOutputs
    from brainage_xai.model.activations import load_activation_tensor
    from brainage_xai.selection import SelectionFiles, Splits, deviation_splits, workflow

    output = Path(args.output)
    pattern, _ = GroupOutputs(output / "group", output / ".work" / "group").activations("*")
    found = sorted(pattern.parent.glob(pattern.name))
    if not found:
        p.error(f"no activation tensor under {pattern.parent}; run the group level first")

    peaks: dict[str, list[int]] = {}
    step = ["imports"]
    me = os.getpid()

    def sampler():
        while True:
            vals = _sample(me)
            cur = peaks.setdefault(step[0], [0, 0, 0])
            for i, v in enumerate(vals):
                cur[i] = max(cur[i], v)
            time.sleep(0.2)

    threading.Thread(target=sampler, daemon=True).start()

    def enter(name: str) -> None:
        time.sleep(0.3)  # let the sampler see the end of the previous step
        step[0] = name

    for name in ("compute_scree", "run_rank_sweep", "run_lambda_sweep", "fit_final"):
        real = getattr(workflow, name)

        def wrapped(*a, _real=real, _name=name, **k):
            enter(_name)
            return _real(*a, **k)

        setattr(workflow, name, wrapped)

    act = load_activation_tensor(found[0])
    split = np.asarray(act.split)
    rows = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    rng = np.random.default_rng(0)
    y = {s: rng.normal(size=len(r)) for s, r in rows.items()}
    enter(f"build {args.tensor}")
    if args.tensor == "deviations":
        A, _, _ = deviation_splits(act.array, rows)
    else:
        A = {s: np.asarray(act.array[r]) for s, r in rows.items()}
    size = sum(a.nbytes for a in A.values())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = GroupOutputs(Path(tmp) / "group", Path(tmp) / "work")
        files = SelectionFiles(
            scree=out.scree, rank_sweep=out.rank_sweep, lambda_sweep=out.lambda_sweep,
            selection=out.selection, decomposition=out.decomposition,
            decomposition_json=out.decomposition_json, loadings=out.loadings,
            rank_sweep_cache=out.rank_sweep_cache,
        )
        workflow.run_selection(
            Splits.from_dict(A), Splits.from_dict(y), files,
            rank_grid=list(range(lo, hi + 1)), quiet=True, n_jobs=args.n_jobs,
        )
    enter("done")
    time.sleep(0.5)
    gb = 1e9
    print(f"{found[0]}: {args.tensor} tensor {A['train'].shape[1:]} x {sum(len(r) for r in rows.values())} "
          f"subjects; selection {time.perf_counter() - t0:.0f} s")
    print(f"baseline: the decomposed tensor itself, {size / gb:.2f} GB (all splits)")
    print(f"{'step':22s} {'RSS GB':>7s} {'anon GB':>8s} {'anon / tensor':>14s} {'workers anon GB':>16s}")
    for name, (rss, anon, kids) in peaks.items():
        if name == "done":
            continue
        print(f"{name:22s} {rss / gb:7.2f} {anon / gb:8.2f} {anon / size:14.2f} {kids / gb:16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
