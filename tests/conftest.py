"""Session-wide fixtures shared by every test of the project.

``sim_bids`` is a small synthetic cohort (:func:`brainage_xai.simulate.simulate_cohort`:
24 subjects, 4 mm, seed 0) made once per session and read-only, so that a test that
writes into BIDS_DIR fails. Tests run as root ignore file permissions, so the fixture
also records every file's size and modification time and checks at the end of the
session that nothing under the dataset changed.
"""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

SIM_N_SUBJECTS = 24
SIM_RESOLUTION = 4
SIM_SEED = 0


def _set_writable(root: Path, writable: bool) -> None:
    w = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        path.chmod((mode | stat.S_IWUSR) if writable else (mode & ~w))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="session")
def sim_bids(tmp_path_factory) -> Path:
    """Path of a read-only simulated BIDS dataset (24 subjects, 4 mm, seed 0).

    Layout: raw ``sub-XXX/anat/sub-XXX_T1w.nii.gz``; maps under
    ``derivatives/simulated/sub-XXX/anat/`` (``..._label-GM_probseg.nii.gz`` and
    ``..._desc-stiffness_mremap.nii.gz``, ``space-MNI152NLin2009cAsym_res-4``); ground
    truth under ``sourcedata/simulation/``. Never write into it; use ``sim_bids_copy``.
    """
    from brainage_xai.simulate import simulate_cohort

    root = tmp_path_factory.mktemp("sim") / "bids"
    simulate_cohort(root, n_subjects=SIM_N_SUBJECTS, resolution=SIM_RESOLUTION,
                    seed=SIM_SEED, quiet=True)
    before = _snapshot(root)
    _set_writable(root, False)
    yield root
    after = _snapshot(root)
    # Writable again so that pytest can remove old temporary folders.
    _set_writable(root, True)
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed, f"a test wrote into the read-only sim_bids dataset: {changed[:5]}"


@pytest.fixture
def sim_bids_copy(sim_bids, tmp_path) -> Path:
    """A writable copy of ``sim_bids`` for tests that must change or corrupt files."""
    dest = tmp_path / "bids"
    shutil.copytree(sim_bids, dest)
    _set_writable(dest, True)
    return dest


@pytest.fixture(scope="session")
def bids_validator() -> str:
    """Path of the BIDS validator (``bids-validator-deno``, a dependency of the package)."""
    from brainage_xai.bids import find_validator

    found = find_validator()
    assert found, "bids-validator-deno not found: pip install -e '.[test]' installs it"
    return found


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module of tiny networks: they gain nothing from threads, and
    on a loaded machine OpenMP workers that spin waiting for each other make them many times
    slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
