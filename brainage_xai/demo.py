"""``brainage-xai-demo``: the whole app on a synthetic cohort, for people without data.

Simulates a cohort into ``OUT_DIR/bids`` (:func:`brainage_xai.simulate.simulate_cohort`),
runs the participant level on every subject and then the group level through the same
``main`` as the ``brainage-xai`` command, and prints where the results are. Options
after ``--`` go to both ``brainage-xai`` calls (for example ``-- --epochs 5``).

The group level runs with its defaults (the consensus of 3 networks on a CPU, 5 on a GPU,
each decomposed on 4 resamples; the layer and tensor chosen on the validation subjects),
so that the demo shows what a user gets. To fit a laptop's time, and unless given after
``--``, it uses 6 mm maps (:data:`DEMO_RESOLUTION`), a lighter network than the paper's
(:data:`DEMO_NETWORK`: one residual unit per block, 8 8 16 32 64 channels, about a
quarter of the paper network's time per epoch), :data:`DEMO_EPOCHS` epochs, and the rank
grid :data:`DEMO_RANK_GRID`: the occlusion test costs a pass over the test set per RoI
and network, and the simulated cohort has six structures (five planted regions and a
decoy), so the grid must reach well past six. These are the demo's settings only: for
results on real data, the paper's network and the default epochs apply.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._version import __version__
from .errors import BrainAgeXAIError

#: The demo's rank grid unless ``-- --rank-grid`` or ``-- --ranks`` says otherwise.
DEMO_RANK_GRID = "2:12"
#: Voxel size of the demo's maps (mm) unless ``--resolution`` says otherwise.
DEMO_RESOLUTION = 6
#: The demo's network and training unless given after ``--``.
DEMO_NETWORK = ("--widths", "8", "8", "16", "32", "64", "--depths", "1", "1", "1", "1", "1")
DEMO_EPOCHS = 12


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
        "--resolution", type=int, default=DEMO_RESOLUTION, metavar="MM",
        help=f"voxel size of the maps and the model grid in mm (default {DEMO_RESOLUTION}: "
        "minutes on a CPU)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--site-effects", action="store_true",
                   help="simulate sites that differ in age distribution and smoothness too")
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
            seed=args.seed, quiet=args.quiet, site_effects=args.site_effects,
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
    light = [] if "--widths" in extra or "--model" in extra else list(DEMO_NETWORK)
    light += [] if "--epochs" in extra or "--model" in extra else ["--epochs", str(DEMO_EPOCHS)]
    code = cli_main([str(bids_dir), str(results), "group", *common, *light, *extra])
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
