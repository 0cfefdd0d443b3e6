"""``brainage-xai-demo``: the whole app on a synthetic cohort, for people without data.

Simulates a cohort into ``OUT_DIR/bids`` (:func:`brainage_xai.simulate.simulate_cohort`),
runs the participant level on every subject and then the group level through the same
``main`` as the ``brainage-xai`` command, and prints where the results are. Options
after ``--`` go to both ``brainage-xai`` calls (for example ``-- --epochs 5``).

The demo sweeps ranks :data:`DEMO_RANK_GRID` (not 2..20) unless ``--rank-grid`` or
``--ranks`` is given after ``--``: the occlusion test costs ``R1 × 21`` passes over the
test set, and the simulated cohort has six structures (five planted regions and a
decoy). The grid must reach well past six: the knee rule picked R1 = 5 on 2..8 (fewer
RoIs than structures, so one RoI merged the decoy with a planted region) and R1 = 7 on
2..12 at block2 and R1 = 8 at block1 (docs/report.md). Unless given after ``--``,
it decomposes the layer chosen by ``--layer auto`` (feature voxels 4 mm apart:
``block1`` at the demo's 4 mm) and ``--tensor deviations`` (each subject's deviation
from the mean activation, each channel in units of its spread): with the paper's
settings (the last layer, a 4 × 4 × 3 grid at 4 mm, and the activations themselves)
the RoIs do not find the planted regions (docs/report.md, "Does it find the truth?").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._version import __version__
from .errors import BrainAgeXAIError

#: The demo's rank grid unless ``-- --rank-grid`` or ``-- --ranks`` says otherwise.
DEMO_RANK_GRID = "2:12"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="brainage-xai-demo",
        description=(
            "Simulate a cohort with planted age effects, run brainage-xai's participant "
            "and group levels on it, and print where the results are. Arguments after "
            "'--' are passed to both brainage-xai calls."
        ),
    )
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder for the dataset and results")
    p.add_argument("--n-subjects", type=int, default=200, metavar="N", help="subjects to simulate (default 200)")
    p.add_argument(
        "--resolution", type=int, default=4, metavar="MM",
        help="voxel size of the maps and the model grid in mm (default 4: minutes on a CPU)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv=None) -> int:
    """Run the demo; returns the exit code (that of the first level that failed)."""
    from .cli.run import main as cli_main
    from .simulate import simulate_cohort

    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = _parser().parse_args(argv)
    out = args.out_dir.expanduser().absolute()
    bids_dir, results = out / "bids", out / "results"

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, flush=True)

    say(f"[1/3] Simulating {args.n_subjects} subjects at {args.resolution} mm into {bids_dir}")
    try:
        simulate_cohort(
            bids_dir, n_subjects=args.n_subjects, resolution=args.resolution,
            seed=args.seed, quiet=args.quiet,
        )
    except BrainAgeXAIError as exc:
        print(f"brainage-xai-demo: error: {exc}", file=sys.stderr)
        return exc.exit_code

    common = ["--resolution", str(args.resolution), "--random-seed", str(args.seed)]
    if "--rank-grid" not in extra and "--ranks" not in extra:
        common += ["--rank-grid", DEMO_RANK_GRID]
    if args.quiet:
        common.append("--quiet")
    say(f"[2/3] Participant level -> {results}")
    code = cli_main([str(bids_dir), str(results), "participant", *common, *extra])
    if code != 0:
        print(f"brainage-xai-demo: participant level failed (exit {code}); see {results / 'logs'}", file=sys.stderr)
        return code

    say(f"[3/3] Group level -> {results / 'group'}")
    explain = [] if "--layer" in extra else ["--layer", "auto"]
    explain += [] if "--tensor" in extra else ["--tensor", "deviations"]
    code = cli_main([str(bids_dir), str(results), "group", *common, *explain, *extra])
    if code != 0:
        print(f"brainage-xai-demo: group level failed (exit {code}); see {results / 'logs'}", file=sys.stderr)
        return code

    print(f"Synthetic dataset:    {bids_dir}")
    print(f"Ground truth:         {bids_dir / 'sourcedata' / 'simulation'}")
    print(f"Participant results:  {results} (sub-*.html, sub-*/anat, sub-*/figures)")
    print(f"Group results:        {results / 'group'}")
    print(f"Group report:         {results / 'group' / 'report.html'} (open it in a browser)")
    print(f"Logs:                 {results / 'logs'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
