"""A synthetic cohort with known age effects, written as a BIDS dataset.

:mod:`.cohort` says what each subject looks like (planted regions, trajectories, sites,
variation, noise); :mod:`.dataset` writes the cohort (``brainage-xai-simulate``).
See ``docs/simulation.md``.
"""

from .cohort import PLANTED, PlantedRegion, draw_participants, model_fingerprint, subject_labels
from .dataset import main, simulate_cohort

__all__ = ["PLANTED", "PlantedRegion", "draw_participants", "main", "model_fingerprint",
           "simulate_cohort", "subject_labels"]
