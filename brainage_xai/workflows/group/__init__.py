"""The group level: a sequence of stages, each skipped on a re-run when done.

The stages, in order (:data:`STAGES`), one module each: load the preprocessed maps and the
targets (``inputs``) and split the subjects 60/20/20, stratified (``split``); train the 3D
ResNet(s) or load ``--model`` (``model``) and predict the brain-age gap (``predictions``);
decide which layer and tensor are decomposed (``layer``); store the activation tensor
(``activations``); choose the ranks and λ and fit the decomposition (``selection``); form
the consensus RoIs over networks and resamples (``consensus``); write the RoIs, loadings
against the target, GradCAM, the occlusion test and the back-projections
(``explanations``); and render ``report.html`` and
the group section of every ``sub-X.html`` from those files (``report``). The runner, its
keys and stamps are :mod:`.runner`.
"""

from __future__ import annotations

from .activations import stage_activations
from .consensus import stage_consensus
from .explanations import stage_explanations
from .inputs import stage_inputs, stage_split
from .layer import stage_layer
from .model import stage_model, stage_predictions
from .report import stage_report
from .runner import GroupContext, Stage, analysis_dirs, make_context, run_stages
from .selection import stage_selection

#: The stages of the group level, in order.
STAGES: list[tuple[str, Stage]] = [
    ("inputs", stage_inputs),
    ("split", stage_split),
    ("model", stage_model),
    ("predictions", stage_predictions),
    ("layer", stage_layer),
    ("activations", stage_activations),
    ("selection", stage_selection),
    ("consensus", stage_consensus),
    ("explanations", stage_explanations),
    ("report", stage_report),
]


def run(config, stages: list[tuple[str, Stage]] | None = None) -> int:
    """Run the group level; returns the exit code (0).

    Parameters
    ----------
    config : brainage_xai.config.Config
    stages : list of (name, function), optional
        Defaults to :data:`STAGES`.
    """
    return run_stages(make_context(config), stages if stages is not None else STAGES)


__all__ = ["STAGES", "GroupContext", "analysis_dirs", "make_context", "run"]
