"""How long would a rank sweep take with another schedule? From its own measured cell times.

`run_rank_sweep` fits the grid's warm-start chains (:func:`sweep_chains`: each R1 row
walked down from R2 = R1) in waves: the k-th cell of every chain at once, the next wave
after the slowest cell of this one. On many cores the chains of large R1 make every wave
wait. This script reads a finished ``rank_sweep.tsv`` (its ``seconds`` column: each
cell's fit as measured in that run) and prints, for several worker counts, the wall time
of the sweep's wave schedule (the baseline) and of an alternative that runs each chain
start to end as one task, chains handed to free workers longest first. Both are
simulated from the same cell times, without overheads and assuming the cells take as
long under either schedule (memory-bandwidth contention may differ), so the ratio is the
point, not the seconds.

Run::

    python benchmarks/bench_sweep_schedule.py OUTPUT_DIR/group/rank_sweep.tsv [--workers 2,4,8,16]
"""

from __future__ import annotations

import argparse
import heapq
import sys

import pandas as pd

from brainage_xai.selection.rank_sweep import sweep_chains


def _list_schedule(durations, workers: int) -> float:
    """Makespan of tasks handed, longest first, to whichever of ``workers`` is free first."""
    free = [0.0] * workers
    for d in sorted(durations, reverse=True):
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def schedules(cell_seconds: dict, grid, workers: int) -> dict:
    """Simulated wall time of the wave schedule and of whole chains as tasks."""
    chains = sweep_chains(grid)
    depth = max(len(c) for c in chains.values())
    waves = sum(
        _list_schedule([cell_seconds.get((R1, c[k]), 0.0) for R1, c in chains.items() if k < len(c)], workers)
        for k in range(depth)
    )
    whole = _list_schedule([sum(cell_seconds.get((R1, R2), 0.0) for R2 in c) for R1, c in chains.items()],
                           workers)
    return {"waves": waves, "chains": whole}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", help="rank_sweep.tsv of a finished group run")
    parser.add_argument("--workers", default="1,2,4,8,16", help="comma-separated worker counts")
    args = parser.parse_args(argv)
    table = pd.read_csv(args.table, sep="\t")
    fitted = table[table["fitted"].astype(str) == "True"]
    cells = {(int(r.R1), int(r.R2)): float(r.seconds) for r in fitted.itertuples()}
    grid = sorted(set(table["R1"].astype(int)))
    print(f"{args.table}: grid {grid[0]}..{grid[-1]}, {len(cells)} cells fitted, "
          f"{sum(cells.values()):.0f} s of fitting in all")
    print(f"{'workers':>7s} {'waves (baseline) s':>19s} {'whole chains s':>15s} {'speed-up':>9s}")
    for k in map(int, args.workers.split(",")):
        s = schedules(cells, grid, k)
        print(f"{k:7d} {s['waves']:19.0f} {s['chains']:15.0f} {s['waves'] / s['chains']:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
