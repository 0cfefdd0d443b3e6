"""The command-line parser (BIDS-App conventions, as fMRIPrep and MRIQC).

The parser only parses and checks the call: paths exist, OUTPUT_DIR is outside BIDS_DIR
or a dataset of its own in ``BIDS_DIR/derivatives/``, labels are stripped of ``sub-``
and well formed, the filter file is JSON. A wrong call fails through ``parser.error``
(exit 2). Checks that need the dataset (are the labels in it?) and all the work happen
in :mod:`brainage_xai.cli.run`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from .._version import __version__
from ..config import CONSTRAINTS, DEVICES_HELP, MAP_PRESETS, METHODS, TENSORS, Config
from ..errors import UsageError
from ..imaging.templates import check_resolution

_LABEL = re.compile(r"[0-9A-Za-z]+")
#: A ``--target`` column name: it becomes part of file names (``loadings_vs_<target>.tsv``).
TARGET_NAME = re.compile(r"[0-9A-Za-z_]+")
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def _integer(minimum: int, expected: str):
    """An argparse type: an integer of at least ``minimum`` ("expected <expected>" else)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}; {value!r} was provided")
        return number

    return parse


_positive_int = _integer(1, "a positive integer")
_non_negative_int = _integer(0, "an integer >= 0")


def _non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0; {value!r} was provided") from None
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0; {value!r} was provided")
    return number


def _resolution(value: str) -> int:
    try:
        return check_resolution(value)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _device(value: str) -> str:
    if not _DEVICE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"expected {DEVICES_HELP}; {value!r} was provided")
    return value


def _derivative(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep:  # a bare path is named after its folder, as fMRIPrep does
        path, name = value, Path(value).name
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH or PATH; {value!r} was provided")
    return name, Path(path).expanduser().absolute()


def _rank_grid(value: str) -> list[int]:
    """``5``, ``2:20`` (inclusive) or ``2,4,8``."""
    try:
        if ":" in value:
            lo, hi = (int(v) for v in value.split(":"))
            ranks = list(range(lo, hi + 1))
        else:
            ranks = [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected ranks as N, LO:HI or N,N,...; {value!r} was provided"
        ) from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"ranks must be >= 1; {value!r} was provided")
    return ranks


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage error is two lines: a pointer to ``--help`` and the
    error itself (argparse prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"usage: {self.prog} BIDS_DIR OUTPUT_DIR {{participant,group}} [options] "
                     f"(see {self.prog} --help)\n{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one worth reading (not for flags)."""

    def _get_help_string(self, action):
        if (
            action.nargs == 0
            or any(action.default is v for v in (None, False, argparse.SUPPRESS))
            or "%(default)" in (action.help or "")
        ):
            return action.help
        return super()._get_help_string(action)


class _HelpAll(argparse.Action):
    """``--help-all``: the help with the advanced options, then exit."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        build_parser(show_all=True).print_help()
        parser.exit()


def build_parser(show_all: bool = False) -> argparse.ArgumentParser:
    """The ``brainage-xai`` argument parser.

    Parameters
    ----------
    show_all : bool
        List the advanced options (for tests and development) in the help too; they
        are accepted either way. ``--help-all`` prints that help.
    """

    def advanced(text: str) -> str:
        return text if show_all else argparse.SUPPRESS

    parser = _Parser(
        prog="brainage-xai",
        description=(
            "brainage-xai: predict age from MNI-registered brain maps with a 3D ResNet and "
            "explain it at dataset level (constrained non-negative Tucker decomposition "
            "of the last layer's activations). A BIDS-App."
        ),
        epilog=(
            "Exit codes: 0 ok, 1 failure, 2 usage, 16 BIDS validation failed, 18 filters "
            "matched no files, 65 bad data, 66 missing input, 73 cannot create output, 130 "
            "stopped by SIGINT, 143 stopped by SIGTERM."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("bids_dir", type=Path, help="the BIDS dataset (read only)")
    parser.add_argument("output_dir", type=Path, help="where the derivatives are written")
    parser.add_argument(
        "analysis_level", choices=["participant", "group"], help="which level to run"
    )
    parser.add_argument("--version", action="version", version=f"brainage-xai {__version__}")
    parser.add_argument(
        "--help-all", action=_HelpAll,
        help="show this help with the advanced options (for tests and development) too",
    )

    g = parser.add_argument_group("selecting the data")
    g.add_argument(
        "--participant-label", "--participant_label", dest="participant_label", nargs="+",
        metavar="LABEL", help="subjects to process, with or without 'sub-' (default: all)",
    )
    g.add_argument(
        "--derivatives", nargs="+", type=_derivative, metavar="NAME=PATH",
        help="derivative datasets holding the MNI-space maps (default: BIDS_DIR and "
        "BIDS_DIR/derivatives/*)",
    )
    g.add_argument(
        "--bids-filter-file", "--bids_filter_file", dest="bids_filter_file", type=Path,
        metavar="FILE", help="PyBIDS query (JSON) that selects the map; overrides --map's preset",
    )
    g.add_argument(
        "--map", choices=MAP_PRESETS, default="volume",
        help="map preset: 'volume' (gray-matter probseg) or 'stiffness' (desc-stiffness mremap)",
    )
    g.add_argument(
        "--target", nargs="+", action="extend", metavar="COLUMN",
        help="numeric participants.tsv column(s) to predict (default: age); letters, digits "
        "and '_' only",
    )
    g.add_argument(
        "--skip-bids-validation", "--skip_bids_validation", dest="skip_bids_validation",
        action="store_true", help="do not run the BIDS validator on BIDS_DIR",
    )

    g = parser.add_argument_group("preprocessing")
    g.add_argument(
        "--resolution", type=_resolution, default=2, metavar="MM",
        help="voxel size of the model grid in mm",
    )
    g.add_argument(
        "--allow-resample", action="store_true",
        help="accept maps declared in another MNI152 space (e.g. MNI152NLin6Asym). Maps "
        "on a different grid of MNI152NLin2009cAsym are always resampled",
    )

    g = parser.add_argument_group("group level")
    g.add_argument("--model", type=Path, metavar="PATH", help="trained model (safetensors); skips training")
    g.add_argument(
        "--method", choices=METHODS, default="consensus",
        help="consensus: K networks, each decomposed on resamples of the training subjects, and "
        "the RoIs that come back (with their stability); paper: one network, its last layer's "
        "activations, the paper's constraints and rank rule",
    )
    g.add_argument(
        "--layer", metavar="NAME",
        help="layer whose activations are decomposed: block1..block5, or auto (the deepest "
        "whose feature voxels are at most 4 mm apart). Default: with --method consensus the "
        "finest layer whose decomposition predicts the target about as well as the network "
        "does on validation subjects; with --method paper the last",
    )
    g.add_argument(
        "--tensor", choices=TENSORS,
        help="what is decomposed: the activations (the paper's); each subject's deviation "
        "from the training mean, split into positive and negative parts (finds where subjects "
        "differ rather than where activations are large); or those deviations weighted by how "
        "much the prediction depends on each channel and voxel (docs/decomposition.md). "
        "Default: chosen with the layer (consensus); the activations (paper)",
    )
    g.add_argument(
        "--constraints", choices=CONSTRAINTS,
        help="nonneg: every factor non-negative; paper: the paper's eq. 2 (subject and channel "
        "factors free). Default: paper with --method paper, else nonneg",
    )
    g.add_argument("--ranks", nargs=2, type=_positive_int, metavar=("R1", "R2"), help="decomposition ranks; skips the rank sweep")
    g.add_argument("--lambda", dest="l1", type=_non_negative_float, metavar="L", help="l1 penalty on the spatial factor; skips the lambda sweep")
    g.add_argument("--rank-grid", type=_rank_grid, metavar="LO:HI", help="ranks of the sweep (e.g. 2:20)")
    g.add_argument("--lambda-grid", nargs="+", type=_non_negative_float, metavar="L", help="lambdas of the sweep")
    g.add_argument("--tune", type=_non_negative_int, default=0, metavar="N", help="TPE trials of hyperparameter tuning (0: none; needs brainage-xai[tune])")
    g.add_argument("--epochs", type=_positive_int, metavar="N", help="training epochs")
    g.add_argument(
        "--ensemble", type=_positive_int, metavar="K",
        help="networks trained on the same split (seeds --random-seed, +1, ...); they predict "
        "with their mean and the consensus is formed over them. Default: 3 on a CPU, 5 on a "
        "GPU; 1 with --method paper",
    )
    g.add_argument(
        "--resamples", type=_positive_int, default=4, metavar="B",
        help="decompositions per network in the consensus: all training subjects, then B-1 "
        "bootstrap resamples of them",
    )
    g.add_argument(
        "--no-backprojection", dest="backprojection", action="store_false",
        help="do not back-project each RoI's loading to the input (one backward pass per RoI "
        "and training subject; docs/report.md)",
    )
    g.add_argument(
        "--dask-scheduler", metavar="ADDR",
        help=advanced("advanced: run the rank sweep's fits on the Dask cluster at this "
                      "scheduler address (needs brainage-xai[dask])"),
    )
    g.add_argument(
        "--widths", nargs="+", type=_positive_int, metavar="C",
        help=advanced("advanced: channels of each block of the network (default: the paper's "
                      "8 16 32 64 128); a narrower network trains faster, for tests, not for results"),
    )  # fmt: skip
    g.add_argument(
        "--depths", nargs="+", type=_positive_int, metavar="U",
        help=advanced("advanced: residual units of each block (default: the paper's 3 4 6 4 3); "
                      "as many values as --widths"),
    )  # fmt: skip

    g = parser.add_argument_group("resources and reproducibility")
    g.add_argument("-w", "--work-dir", type=Path, metavar="DIR", help="work directory (default: OUTPUT_DIR/.work)")
    g.add_argument("--n-cpus", "--nprocs", dest="n_cpus", type=_positive_int, metavar="N", help="CPUs to use (default: all the job may use); the participant level runs this many subjects at once")
    g.add_argument("--device", type=_device, default="auto", help=DEVICES_HELP)
    g.add_argument("--random-seed", type=_non_negative_int, default=0, metavar="N", help="seed of splits, initialisation and training")
    g.add_argument(
        "--config-file", type=Path, metavar="FILE",
        help="repeat an earlier run: its OUTPUT_DIR/logs/config-<run>.toml; options given "
        "here override its settings",
    )

    g = parser.add_argument_group("messages")
    g.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="debug messages on the console too (the log in OUTPUT_DIR/logs always has them)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars, warnings and errors only")
    return parser


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _generated_by(dataset: Path) -> str | None:
    """``GeneratedBy[0].Name`` of a derivatives dataset ("" when it names none)."""
    try:
        desc = json.loads((dataset / "dataset_description.json").read_text(encoding="utf-8"))
        return str(((desc.get("GeneratedBy") or [{}])[0] or {}).get("Name", ""))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError, TypeError, IndexError):
        return ""


def _output_place_error(output_dir: Path, bids_real: Path, derivatives: dict) -> str | None:
    """Why OUTPUT_DIR may not be where it is; ``None`` when it may.

    It may be outside BIDS_DIR, or a dataset of its own directly in
    ``BIDS_DIR/derivatives/`` that is not an input: not a ``--derivatives`` dataset and
    not another pipeline's.
    """
    real = output_dir.resolve()
    if not _is_within(real, bids_real):
        return None
    if real.parent != bids_real / "derivatives":
        return (
            f"OUTPUT_DIR {output_dir} is BIDS_DIR or inside it; BIDS_DIR is never written to: "
            "choose a folder outside it, or BIDS_DIR/derivatives/<name>"
        )
    for name, path in derivatives.items():
        if _is_within(real, path.resolve()) or _is_within(path.resolve(), real):
            return f"OUTPUT_DIR {output_dir} is the --derivatives input {name}; choose another name"
    maker = _generated_by(real)
    if maker is not None and maker != "brainage-xai":
        return (
            f"OUTPUT_DIR {output_dir} holds the derivatives of {maker or 'another pipeline'}, "
            "which brainage-xai does not write into; choose another name"
        )
    return None


#: Settings of a configuration file that are not options (positional, or derived).
_NOT_OPTIONS = ("bids_dir", "output_dir", "analysis_level", "run_uuid", "bids_filters")


def _given_options(argv: list[str]) -> set[str]:
    """The destinations of the options the command line itself gives."""
    probe = build_parser()
    for action in probe._actions:
        if action.option_strings:
            action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv))) - set(_NOT_OPTIONS)


def _saved_argv(parser, path: Path, saved: dict, given: set[str]) -> list[str]:
    """A configuration file's settings as command-line options, except those ``given``.

    Going through the command line, a saved value is checked as a typed one would be.
    """
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    argv: list[str] = []
    for key, value in saved.items():
        if key in _NOT_OPTIONS or key in given:
            continue
        action = actions.get(key)
        if action is None or key in ("help", "version", "config_file"):
            parser.error(f"--config-file {path}: unknown setting {key!r}")
        option = next(o for o in action.option_strings if o.startswith("--"))
        if action.nargs == 0:  # a flag or a counter
            if action.const is None and isinstance(value, int) and not isinstance(value, bool):
                argv += [option] * max(0, value)
            elif isinstance(value, bool) and action.const is not None:
                argv += [option] if value == action.const else []
            else:
                parser.error(f"--config-file {path}: {key} = {value!r} is not a valid setting")
        elif isinstance(value, dict):
            argv += [option, *(f"{k}={v}" for k, v in value.items())] if value else []
        elif isinstance(value, list) and action.nargs is None:  # --rank-grid N,N,...
            argv.append(f"{option}={','.join(map(str, value))}")
        elif isinstance(value, list):
            argv += [option, *map(str, value)]
        elif isinstance(value, bool):
            parser.error(f"--config-file {path}: {key} = {value!r} is not a valid setting")
        else:
            argv.append(f"{option}={value}")
    return argv


def parse_args(argv=None) -> Config:
    """Parse and check a command line; return the run's :class:`~brainage_xai.config.Config`.

    With ``--config-file``, the settings it holds (:meth:`Config.write_toml`) are used
    where the command line gives no option of its own. Errors in the call exit with
    status 2 through ``parser.error``.
    """
    import sys

    from ..config import read_toml

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    saved: dict = {}
    given: set[str] = set()
    opts = parser.parse_args(argv)
    if opts.config_file is not None:
        path = opts.config_file.expanduser().absolute()
        try:
            saved = read_toml(path)
        except (OSError, ValueError) as exc:
            parser.error(f"--config-file {opts.config_file} cannot be read: {exc}")
        given = _given_options(argv)
        # After the command line: each saved option starts with its option string, so
        # none is taken as a value of the command line's last option, and the reverse.
        opts = parser.parse_args(argv + _saved_argv(parser, path, saved, given))

    bids_dir = opts.bids_dir.expanduser().absolute()
    if not bids_dir.is_dir():
        parser.error(f"BIDS_DIR {opts.bids_dir} does not exist or is not a folder")
    bids_real = bids_dir.resolve()
    output_dir = opts.output_dir.expanduser().absolute()
    work_dir = opts.work_dir.expanduser().absolute() if opts.work_dir else None

    labels = None
    if opts.participant_label:
        labels = []
        for raw in opts.participant_label:
            label = raw[len("sub-") :] if raw.startswith("sub-") else raw
            if not _LABEL.fullmatch(label):
                parser.error(f"participant label {raw!r} is not a BIDS label ([0-9A-Za-z]+, optional 'sub-')")
            labels.append(label)
        labels = list(dict.fromkeys(labels))

    for name in opts.target or []:
        if not TARGET_NAME.fullmatch(name):
            parser.error(f"--target {name!r} must be a participants.tsv column named with "
                         "letters, digits and '_' only ([0-9A-Za-z_]+)")

    derivatives = {}
    for name, path in opts.derivatives or []:
        if not _LABEL.fullmatch(name.replace("-", "").replace("_", "")):
            parser.error(f"--derivatives name {name!r} must be letters, digits, '-' or '_'")
        if not path.is_dir():
            parser.error(f"--derivatives {name}={path} does not exist or is not a folder")
        derivatives[name] = path

    problem = _output_place_error(output_dir, bids_real, derivatives)
    if problem:
        parser.error(problem)
    if work_dir is not None and _is_within(work_dir.resolve(), bids_real) and not _is_within(
        work_dir.resolve(), output_dir.resolve()
    ):
        parser.error(
            f"--work-dir {opts.work_dir} is inside BIDS_DIR; choose a folder outside it "
            "(or inside OUTPUT_DIR)"
        )

    bids_filters = None
    filter_file = None
    if opts.bids_filter_file is not None:
        filter_file = opts.bids_filter_file.expanduser().absolute()
        if not filter_file.is_file():
            parser.error(f"--bids-filter-file {opts.bids_filter_file} does not exist")
        try:
            bids_filters = json.loads(filter_file.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            parser.error(f"--bids-filter-file {opts.bids_filter_file} is not valid JSON: {exc}")
        if not isinstance(bids_filters, dict):
            parser.error(f"--bids-filter-file {opts.bids_filter_file} must hold a JSON object")
        if "bids_filters" in saved and "bids_filter_file" not in given and bids_filters != saved["bids_filters"]:
            parser.error(
                f"--bids-filter-file {filter_file} has changed since the run of --config-file "
                f"{opts.config_file}; pass --bids-filter-file to use it as it is now"
            )

    model = None
    if opts.model is not None:
        model = opts.model.expanduser().absolute()
        if not model.exists():
            parser.error(f"--model {opts.model} does not exist")

    if opts.method == "paper" and (opts.ensemble or 1) > 1:
        parser.error("--method paper explains one network; --ensemble asks for more")
    if (opts.ensemble or 1) > 1 and opts.model is not None:
        parser.error("--ensemble trains networks and --model gives a trained one (an ensemble "
                     "too when it was trained with --ensemble); pass one of them")
    if (opts.widths is None) != (opts.depths is None) or (
        opts.widths is not None and len(opts.widths) != len(opts.depths)
    ):
        parser.error(
            "--widths and --depths go together, one value per block each; "
            f"{len(opts.widths or [])} widths and {len(opts.depths or [])} depths were provided"
        )

    kwargs = {
        "bids_dir": bids_dir,
        "output_dir": output_dir,
        "analysis_level": opts.analysis_level,
        "participant_label": labels,
        "derivatives": derivatives,
        "bids_filter_file": filter_file,
        "bids_filters": bids_filters,
        "map": opts.map,
        "target": list(dict.fromkeys(opts.target)) if opts.target else ["age"],
        "resolution": opts.resolution,
        "work_dir": work_dir,
        "n_cpus": opts.n_cpus,
        "device": opts.device,
        "random_seed": opts.random_seed,
        "skip_bids_validation": opts.skip_bids_validation,
        "allow_resample": opts.allow_resample,
        "model": model,
        "method": opts.method,
        "layer": opts.layer,
        "tensor": opts.tensor,
        "constraints": opts.constraints,
        "ranks": tuple(opts.ranks) if opts.ranks else None,
        "l1": opts.l1,
        "rank_grid": opts.rank_grid,
        "lambda_grid": opts.lambda_grid,
        "dask_scheduler": opts.dask_scheduler,
        "tune": opts.tune,
        "epochs": opts.epochs,
        "ensemble": opts.ensemble,
        "resamples": opts.resamples,
        "backprojection": opts.backprojection,
        "widths": opts.widths,
        "depths": opts.depths,
        "verbose": opts.verbose,
        "quiet": opts.quiet,
    }
    return Config(**kwargs)
