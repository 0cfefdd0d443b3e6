"""The synthetic cohort written as a BIDS dataset (raw, derivatives, ground truth).

What each subject looks like is :mod:`.cohort`; this module writes it: one subject at
a time (threads), atomically, resumable, with the dataset-level files and the truth.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from .._version import __version__
from ..errors import BrainAgeXAIError, OutputError
from .cohort import (
    BIDS_VERSION,
    CODE_URL,
    GENERATOR,
    PLANTED,
    SITE_GM_STEP,
    SITE_STIFFNESS_STEP,
    SITE_T1_GAIN_STEP,
    SPACE,
    _check_args,
    _Layout,
    _layout,
    _subject_images,
    draw_participants,
    model_fingerprint,
)


def _nifti(data, affine, intent=None):
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=4)  # 4: MNI152
    img.header.set_sform(affine, code=4)
    if intent:
        img.header.set_intent(intent)
    return img


# ------------------------------------------------------------------------ BIDS files


def _paths(out: Path, label: str, resolution: int) -> dict[str, Path]:
    anat = Path(f"sub-{label}") / "anat"
    deriv = out / "derivatives" / "simulated" / anat
    stem = f"sub-{label}_space-{SPACE}_res-{resolution}"
    return {
        "t1": out / anat / f"sub-{label}_T1w.nii.gz",
        "gm": deriv / f"{stem}_label-GM_probseg.nii.gz",
        "stiffness": deriv / f"{stem}_desc-stiffness_mremap.nii.gz",
    }


def _generated_by():
    return [{"Name": GENERATOR, "Version": __version__, "CodeURL": CODE_URL}]


def _write_subject(out: Path, layout: _Layout, row, seed: int, index: int, site_effects: bool = False) -> None:
    from ..utils.io import save_nifti, write_json

    label = row["participant_id"][4:]
    paths = _paths(out, label, layout.resolution)
    images = _subject_images(layout, row, seed, index, site_effects)
    res = layout.resolution
    raw_rel = f"sub-{label}/anat/sub-{label}_T1w.nii.gz"
    resolution_desc = {
        str(res): f"{res} mm isotropic on nilearn's MNI152 grid (origin -98, -134, -72 mm)"
    }
    save_nifti(_nifti(images["t1"], layout.affine), paths["t1"])
    write_json(
        paths["t1"].with_name(f"sub-{label}_T1w.json"),
        {
            "Manufacturer": "brainage-xai synthetic",
            "MagneticFieldStrength": 3,
            "InstitutionName": row["site"],
        },
    )
    save_nifti(_nifti(images["gm"], layout.affine), paths["gm"])
    write_json(
        Path(str(paths["gm"])[: -len(".nii.gz")] + ".json"),
        {
            "Description": "Simulated grey-matter probability (0..1) in MNI space, with planted age effects",
            "Sources": [f"bids:raw:{raw_rel}"],
            "SpatialReference": SPACE,
            "Resolution": resolution_desc,
            "SkullStripped": True,
        },
    )
    save_nifti(_nifti(images["stiffness"], layout.affine), paths["stiffness"])
    write_json(
        Path(str(paths["stiffness"])[: -len(".nii.gz")] + ".json"),
        {
            "Description": (
                "Simulated magnetic resonance elastography (MRE) stiffness map: shear "
                "stiffness magnitude |G*| in kPa, in MNI space, with planted age effects"
            ),
            "Units": "kPa",
            "Sources": [f"bids:raw:{raw_rel}"],
            "SpatialReference": SPACE,
            "Resolution": resolution_desc,
            "SkullStripped": True,
        },
    )


PARTICIPANTS_SIDECAR = {
    "participant_id": {"Description": "Subject label"},
    "age": {"Description": "Age at scan", "Units": "year"},
    "sex": {"Description": "Sex", "Levels": {"F": "female", "M": "male"}},
    "site": {"Description": "Acquisition site; sites differ in global intensity"},
}


def _trajectories_sidecar():
    side = {
        "participant_id": {"Description": "Subject label"},
        "age": {"Description": "Age at scan", "Units": "year"},
        "sex": {"Description": "Sex", "Levels": {"F": "female", "M": "male"}},
        "site": {"Description": "Acquisition site"},
        "site_gm_scale": {"Description": "Global factor applied to the subject's grey-matter map by its site"},
        "site_stiffness_scale": {"Description": "Global factor applied to the subject's stiffness map by its site"},
    }
    for r in PLANTED:
        if r.trajectory == "decoy":
            desc = "Relative grey-matter change in the decoy region (independent of age)"
        else:
            desc = (f"Relative grey-matter change planted in the {r.name} region "
                    f"({r.trajectory} trajectory plus subject-level noise)")
        side[r.name] = {"Description": desc, "Units": "fraction of the template value"}
        side[f"{r.name}_trajectory"] = {
            "Description": f"Noise-free part of {r.name}: amplitude times the trajectory curve at the subject's age",
            "Units": "fraction of the template value",
        }
    return side


def _write_dataset_files(out: Path, table, params: dict) -> None:
    import pandas as pd

    from ..utils.io import write_json, write_text, write_tsv

    write_json(
        out / "dataset_description.json",
        {
            "Name": "brainage-xai synthetic cohort",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": ["brainage-xai developers"],
            "GeneratedBy": _generated_by(),
        },
    )
    write_text(
        out / "README",
        "brainage-xai synthetic cohort\n"
        "=============================\n\n"
        f"{len(table)} simulated subjects (seed {params['seed']}, {params['resolution']} mm), generated by\n"
        f"`{GENERATOR}` version {__version__}. The raw T1w images are the MNI152 template\n"
        "warped per subject. The MNI-space grey-matter and MRE stiffness maps with planted\n"
        "age effects are under derivatives/simulated/, and the ground truth (planted regions,\n"
        "per-subject effects) under sourcedata/simulation/. No real person's data is included.\n"
        "See docs/simulation.md in the brainage-xai package for the model.\n",
    )
    write_text(out / ".bidsignore", "sourcedata/\nderivatives/\n")
    sidecar = json.loads(json.dumps(PARTICIPANTS_SIDECAR))
    sidecar["site"]["Levels"] = {
        f"site{k + 1}": f"site {k + 1}: grey matter x {1 - SITE_GM_STEP * k:.2f}, "
        f"stiffness x {1 + SITE_STIFFNESS_STEP * k:.2f}, T1w gain x {1 + SITE_T1_GAIN_STEP * k:.2f}"
        for k in range(params["n_sites"])
    }
    write_tsv(out / "participants.tsv", table[["participant_id", "age", "sex", "site"]],
              sidecar=sidecar)

    deriv = out / "derivatives" / "simulated"
    write_json(
        deriv / "dataset_description.json",
        {
            "Name": "brainage-xai synthetic cohort: MNI-space maps",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": _generated_by(),
            "DatasetLinks": {"raw": "../../"},
            "SourceDatasets": [{"URL": "bids:raw:"}],
        },
    )

    truth = out / "sourcedata" / "simulation"
    rows = [
        {
            "index": k + 1,
            "name": r.name,
            "trajectory": r.trajectory,
            "onset_age": r.onset if r.trajectory != "decoy" else None,
            "offset_age": r.offset if r.trajectory != "decoy" else None,
            "amplitude": r.amplitude,
            "subject_sd": r.subject_sd,
            "centre_mm": "n/a" if r.centre is None else " ".join(f"{c:g}" for c in r.centre),
            "radius_mm": "n/a" if r.radius is None else r.radius,
        }
        for k, r in enumerate(PLANTED)
    ]
    write_tsv(
        truth / "planted_dseg.tsv",
        pd.DataFrame(rows),
        sidecar={
            "index": {"Description": "Label value in planted_dseg.nii.gz"},
            "name": {"Description": "Atlas structure (both hemispheres) of brainage_xai.imaging.atlas that holds the region"},
            "trajectory": {"Description": "Age band in which the region changes, or decoy (no age effect)"},
            "onset_age": {"Description": "Age at which the change starts", "Units": "year"},
            "offset_age": {"Description": "Age at which the change is complete", "Units": "year"},
            "amplitude": {"Description": "Total relative grey-matter change over the trajectory"},
            "subject_sd": {"Description": "Standard deviation of the subject-level effect noise"},
            "centre_mm": {"Description": "Centre x y z of the right-hemisphere ball (the left one is at -x); n/a: the whole structure", "Units": "mm"},
            "radius_mm": {"Description": "Radius of the two balls the region is restricted to", "Units": "mm"},
        },
    )
    traj = table.copy()
    traj["site_gm_scale"] = np.round(1.0 - SITE_GM_STEP * traj["site_index"], 4)
    traj["site_stiffness_scale"] = np.round(1.0 + SITE_STIFFNESS_STEP * traj["site_index"], 4)
    cols = ["participant_id", "age", "sex", "site", "site_gm_scale", "site_stiffness_scale"]
    cols += [c for r in PLANTED for c in (r.name, f"{r.name}_trajectory")]
    write_tsv(truth / "trajectories.tsv", traj[cols], sidecar=_trajectories_sidecar())


def _write_truth_image(out: Path, layout: _Layout) -> None:
    from ..utils.io import save_nifti

    save_nifti(_nifti(layout.dseg, layout.affine, intent="label"),
               out / "sourcedata" / "simulation" / "planted_dseg.nii.gz")


def _existing_params(out: Path) -> dict | None:
    marker = out / "sourcedata" / "simulation" / "simulation.json"
    try:
        return json.loads(marker.read_text())["parameters"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _ours(out: Path) -> bool:
    try:
        desc = json.loads((out / "dataset_description.json").read_text())
        return desc["GeneratedBy"][0]["Name"] == GENERATOR
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return False


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def simulate_cohort(out_dir, n_subjects=200, resolution=2, seed=0,
                    age_range=(5.0, 81.0), n_sites=3, quiet=False, *, n_jobs=None,
                    site_effects: bool = False) -> Path:
    """Write a synthetic BIDS cohort with planted, complementary age effects.

    Parameters
    ----------
    out_dir : path
        Folder to create (or an empty one). A folder that already holds a complete
        simulation with the same settings is left as it is; one holding an unfinished
        simulation of the same settings is completed; anything else is refused.
    n_subjects : int, default 200
    resolution : int, default 2
        Voxel size (whole mm) of the maps, on nilearn's MNI152 bounding box.
    seed : int, default 0
    age_range : (float, float), default (5, 81)
    n_sites : int, default 3
    site_effects : bool, default False
        Sites that differ in age distribution and image smoothness, as well as intensity
        (:func:`~brainage_xai.simulate.draw_participants`).
    quiet : bool, default False
        No progress bar.
    n_jobs : int, optional
        Subjects written in parallel (threads); by default the usable CPUs, at most 4.
        The result does not depend on it.

    Returns
    -------
    pathlib.Path
        ``out_dir``.

    Raises
    ------
    UsageError
        Invalid parameters.
    OutputError
        ``out_dir`` holds other files, or cannot be written.
    """
    from tqdm.auto import tqdm

    from ..utils.io import write_json

    n_subjects, resolution, seed, age_range, n_sites = _check_args(
        n_subjects, resolution, seed, age_range, n_sites
    )
    out = Path(out_dir).absolute()
    params = {
        "n_subjects": n_subjects, "resolution": resolution, "seed": seed,
        "age_range": list(age_range), "n_sites": n_sites, "version": __version__,
        "model": model_fingerprint(),
    }
    if site_effects:  # absent otherwise, so that earlier datasets keep their parameters
        params["site_effects"] = True
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        previous = _existing_params(out)
        if previous == params:
            return out
        if previous is not None:
            differ = sorted(k for k in params if previous.get(k) != params[k])
            raise OutputError(
                f"{out} holds a simulation with other settings ({', '.join(differ)} differ); "
                "give an empty or new folder"
            )
        if not _ours(out):
            raise OutputError(f"{out} holds other files; give an empty or new folder")
    table = draw_participants(n_subjects, seed, age_range, n_sites, site_effects=site_effects)
    layout = _layout(resolution)
    _write_dataset_files(out, table, params)
    _write_truth_image(out, layout)

    rows = [row for _, row in table.iterrows()]
    progress = tqdm(total=n_subjects, desc="simulating subjects", unit="subject", disable=quiet)
    with progress:
        if n_jobs is None:
            n_jobs = min(4, _usable_cpus())
        if n_jobs == 1:
            for i, row in enumerate(rows):
                _write_subject(out, layout, row, seed, i, site_effects)
                progress.update()
        else:
            from concurrent.futures import ThreadPoolExecutor

            # Threads: scipy, zlib and numpy release the GIL for the heavy parts, and the
            # shared per-resolution arrays are not copied.
            with ThreadPoolExecutor(max_workers=max(1, int(n_jobs))) as pool:
                futures = [pool.submit(_write_subject, out, layout, row, seed, i, site_effects)
                           for i, row in enumerate(rows)]
                for fut in futures:
                    fut.result()
                    progress.update()
    # Written last: its presence marks a complete simulation.
    write_json(out / "sourcedata" / "simulation" / "simulation.json",
               {"GeneratedBy": _generated_by(), "parameters": params})
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=GENERATOR,
        description=(
            "Write a synthetic BIDS cohort (raw T1w, MNI-space grey-matter and stiffness maps "
            "under derivatives/simulated/, ground truth under sourcedata/simulation/) with "
            "complementary age effects planted in known regions and a decoy region."
        ),
    )
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to create (new or empty)")
    p.add_argument("--n-subjects", type=int, default=200, metavar="N", help="number of subjects (default 200)")
    p.add_argument("--resolution", type=int, default=2, metavar="MM", help="voxel size in whole mm (default 2)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--age-range", type=float, nargs=2, default=(5.0, 81.0), metavar=("LOW", "HIGH"),
                   help="ages in years (default 5 81)")
    p.add_argument("--n-sites", type=int, default=3, metavar="K", help="number of sites (default 3)")
    p.add_argument("--site-effects", action="store_true",
                   help="sites that differ in age distribution and image smoothness too, not only "
                   "in intensity (as multi-site cohorts do)")
    p.add_argument("--n-jobs", type=int, default=None, metavar="J",
                   help="subjects written in parallel (default: usable CPUs, at most 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv=None) -> int:
    """Command line entry point of ``brainage-xai-simulate``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        out = simulate_cohort(
            args.out_dir, n_subjects=args.n_subjects, resolution=args.resolution,
            seed=args.seed, age_range=tuple(args.age_range), n_sites=args.n_sites,
            quiet=args.quiet, n_jobs=args.n_jobs, site_effects=args.site_effects,
        )
    except BrainAgeXAIError as exc:
        print(f"{GENERATOR}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if not args.quiet:
        print(f"Synthetic BIDS dataset: {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
