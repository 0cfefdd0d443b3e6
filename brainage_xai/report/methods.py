"""The methods text of what ran: the report's methods section and ``logs/CITATION.*``.

One source for both, so that the report and the boilerplate a user copies into a paper
describe the same run: :func:`participant_methods` (the preprocessing),
:func:`methods_text` and :func:`settings_sentence` (the group level), gathered with their
references by :func:`boilerplate` into a :class:`Boilerplate` that writes Markdown, HTML
and BibTeX.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._version import __version__
from ..bids.derivatives import CODE_URL
from .references import REFERENCES, Reference

DEFAULT_METHODS = (
    "The explanation follows the method of \u201cInterpreting age predictions from brain maps "
    "via deep neural activations and tensor decomposition\u201d (under review). "
    "A pre-activation 3D ResNet (He et al., 2016) was trained to predict {target} from "
    "template-registered brain maps. The activations of one convolutional layer over all "
    "subjects form a tensor (subjects x channels x voxels), decomposed by a constrained "
    "non-negative Tucker decomposition with diagonal core faces (Kossaifi et al., 2016; "
    "Zhou et al., 2015), solved by hierarchical alternating least squares (Cichocki et al., "
    "2007). Ranks were chosen from scree plots and the held-out reconstruction error "
    "(Kneedle, Satopaa et al., 2011); among channel ranks that reconstructed equally well, "
    "and for the l1 penalty on the spatial factor, by the validation error of a linear "
    "model on the voxel-averaged reconstruction. Each column "
    "of the spatial factor, upsampled to the template with the network's stride geometry, "
    "is a region of interest (RoI); the matching column of the subject factor holds the "
    "subjects' loadings. Each RoI's loadings were fitted on {target} by a line, a line with "
    "one breakpoint and a smoothing spline, compared by 5-fold cross-validation; the share of "
    "the loadings' variance that the best fit predicts for held-out subjects tells how much "
    "of the RoI is {target}, and an RoI below one half is reported as a component of other "
    "variation. GradCAM (Selvaraju et al., 2017), averaged over subjects, is the "
    "baseline; at a last layer followed by global average pooling and a linear head it "
    "equals CAM (Zhou et al., 2016). Faithfulness was tested by occluding each RoI with the "
    "training mean and comparing the test MAE increase with that of random blobs of the "
    "same volume."
)


#: Added to the methods when the RoIs were back-projected (the default; not with
#: ``--no-backprojection``).
BACKPROJECTION_METHODS = (
    " Each RoI's loading was also followed back to the input: the least-squares "
    "loading of the subject's tensor slice on the RoI's component, differentiated with "
    "respect to the input map and multiplied by the input's deviation from the training "
    "mean, gives each input voxel's first-order contribution; its covariance with the "
    "loading over the training subjects (negative values set to zero) is that voxel's share "
    "of the loading's variance (the back-projected RoI), which shows where in the input the "
    "differences between subjects that the RoI measures come from."
)


#: Added to the methods when ``--tensor deviations`` was used.
DEVIATIONS_METHODS = (
    " Unlike the original method (which decomposes the activations themselves), the "
    "decomposed tensor held each subject's deviation from the training subjects' mean "
    "activation, divided by each channel's standard deviation over the training subjects "
    "and voxels and split into its positive and negative parts so that it stays "
    "non-negative; the RoIs are therefore where subjects differ, not where activations "
    "are large."
)


#: Added after :data:`DEVIATIONS_METHODS` when ``--tensor relevance`` was used.
RELEVANCE_METHODS = (
    " Each channel and voxel of these deviations was further weighted by the square root "
    "of how far the network's prediction moves for a one-spread change of that activation "
    "(the root mean square over the training subjects of the output's gradient with "
    "respect to the activation, times the channel's standard deviation; weights normalised "
    "to mean 1), so that tissue that varies between subjects but that the network ignores "
    "does not form RoIs."
)


#: Added when the RoIs are the consensus over networks and resamples.
CONSENSUS_METHODS = (
    " {k} networks were trained from different random initialisations on the same subjects "
    "(predicting with the mean of their outputs). The chosen layer of each network was "
    "decomposed at the chosen ranks and penalty on all training subjects and on {b_minus} "
    "bootstrap resamples of them ({fits} decompositions); their spatial components were "
    "clustered by spatial correlation (average linkage, threshold {threshold}) and matched "
    "one-to-one to the cluster centres in each decomposition (Hungarian algorithm), as in "
    "consensus NMF (Brunet et al., 2004) and ICASSO (Himberg et al., 2004). Each consensus "
    "RoI is the mean of its matched components; its stability is the share of the "
    "decompositions that contain it (robust from {robust}). The subjects' loadings on the "
    "consensus RoIs were fitted on all networks' tensors with the consensus spatial factor "
    "fixed, and each network's occlusion test asked whether that network relies on each RoI."
)
#: Added with ``--method paper``.
PAPER_METHODS = (
    " As in the original method, one network's last convolutional layer was decomposed with "
    "the constraints of its eq. 2 (subject and channel factors unconstrained), the ranks "
    "chosen by the knee of the held-out reconstruction error and the scree plots."
)



#: The symbols of the method's equations, said once, in the methods only: the rest of the
#: report uses the plain names.
NOTATION = (
    "In the notation of the method, the tensor A (subjects x channels x voxels) is "
    "approximated as A ≈ G ×1 U1 ×2 U2 ×3 U3, with a core G whose faces G[:, j, :] are "
    "diagonal and non-negative: the columns of U1 (subjects x R1) are the RoI loadings, U2 "
    "(channels x R2) holds the channel profiles and the columns of U3 (voxels x R1) are "
    "the RoIs' spatial maps. The scree plots show the singular values of the mode-1, "
    "mode-2 and mode-3 unfoldings of A (its subjects, channels and voxels as rows)."
)

#: Which works each part of the group level's methods cites (keys of
#: :data:`~brainage_xai.report.references.REFERENCES`), in the order they are cited.
_GROUP_KEYS = ("brainagexai_method", "he2016identity", "kossaifi2016tensorly", "zhou2015nntucker",
               "cichocki2007hals", "satopaa2011kneedle", "selvaraju2017gradcam", "zhou2016cam")
_CONSENSUS_KEYS = ("brunet2004consensus", "himberg2004icasso")
#: The Harvard-Oxford atlas, when it named RoIs.
_HOSPA_KEYS = ("makris2006harvardoxford", "desikan2006")
#: The libraries the group level runs on, with the works that describe them.
_GROUP_LIBRARIES = (("PyTorch", "torch", "paszke2019pytorch"), ("scikit-learn", "scikit-learn", "pedregosa2011sklearn"),
                    ("nilearn", "nilearn", "abraham2014nilearn"), ("NiBabel", "nibabel", "brett_nibabel"),
                    ("Captum", "captum", "kokhlikyan2020captum"))
_PARTICIPANT_LIBRARIES = (("PyBIDS", "pybids", "yarkoni2019pybids"), ("nilearn", "nilearn", "abraham2014nilearn"),
                          ("NiBabel", "nibabel", "brett_nibabel"))

#: How the participant level resamples (the sidecar's ``Interpolation``).
INTERPOLATION = "3rd-order spline (nilearn 'continuous')"
#: What each ``--map`` preset reads.
MAP_DESCRIPTIONS = {
    "volume": "gray-matter map (a gray-matter probability map or a modulated gray-matter volume map)",
    "stiffness": "MR elastography stiffness map",
}
#: The mean inside the template brain mask that proportional scaling brings each map to.
NORMALISED_MEAN = {
    "volume": "the mean of the template's gray-matter probability map",
    "stiffness": "1 (stiffness relative to the brain mean)",
}


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "n/a"


def _libraries(libs) -> tuple[str, list[str]]:
    said = ", ".join(f"{name} {_version(dist)}" for name, dist, _ in libs)
    return said, [key for _, _, key in libs]


def template_sentence(space: str, template_source: str | None) -> tuple[str, list[str]]:
    """Where the template came from: TemplateFlow, or the copy nilearn ships offline."""
    if template_source == "templateflow":
        return (f"the {space} template (Fonov et al., 2011) from TemplateFlow (Ciric et al., 2022)",
                ["fonov2011", "ciric2022templateflow"])
    return (f"the {space} template (Fonov et al., 2011; the ICBM 2009 copy that nilearn ships)",
            ["fonov2011"])


def participant_methods(*, map_name: str, resolution: str, space: str, template_source: str | None = None,
                        grid_shape=None, filtered: bool = False, allow_resample: bool = False,
                        activations: bool = False) -> tuple[str, list[str]]:
    """The participant level's methods paragraph for what ran, and the keys it cites.

    One text for ``CITATION.md``, the group report and the subject pages, so that all
    three describe the preprocessing the same way.
    """
    from ..imaging import registration as reg

    template, keys = template_sentence(space, template_source)
    libs, lib_keys = _libraries(_PARTICIPANT_LIBRARIES)
    grid = f", {' x '.join(map(str, grid_shape))} voxels" if grid_shape is not None else ""
    text = (
        f"Each participant's {MAP_DESCRIPTIONS.get(map_name, map_name + ' map')}, already in MNI "
        f"space, was found with PyBIDS (Yarkoni et al., 2019)"
        + (" with the given filter query" if filtered else "")
        + f" and checked for registration to {template} in world coordinates: declared space, "
        f"orientation, voxel size ({reg.VOXEL_SIZE_RANGE[0]:g}-{reg.VOXEL_SIZE_RANGE[1]:g} mm), "
        f"overlap of the map's support with the template brain mask (Dice at least "
        f"{reg.MIN_DICE:g}), correlation with the template (at least {reg.MIN_CORRELATION:g}), "
        f"distance between their centres (at most {reg.MAX_CENTROID_OFFSET:g} mm) and coverage "
        f"of the brain by the field of view (at least {reg.MIN_COVERAGE:g})."
        + (" Maps on another MNI grid were accepted and resampled." if allow_resample else "")
        + f" Each map that passed was resampled with nilearn (Abraham et al., 2014) onto the "
        f"{resolution} mm isotropic model grid{grid} (3rd-order spline interpolation; negative "
        f"interpolation overshoot set to 0) and normalised by proportional scaling: multiplied by one factor "
        f"so that its mean inside the template brain mask equals "
        f"{NORMALISED_MEAN.get(map_name, '1')}, which removes global (for example site-related) "
        f"intensity differences and keeps regional contrast."
        + (" The given network's activations were computed for each participant." if activations else "")
        + f" Images were read and written with NiBabel (Brett et al.); software: {libs}."
    )
    return text, [*keys, *dict.fromkeys(lib_keys)]


def preprocessing_methods(config, template) -> tuple[str, list[str]]:
    """:func:`participant_methods` for a run's ``config`` on its ``template``."""
    from ..bids.derivatives import format_resolution

    return participant_methods(
        map_name=config.map, resolution=format_resolution(config.resolution), space=template.name,
        template_source=getattr(template, "source", None), grid_shape=tuple(template.shape),
        filtered=config.bids_filters is not None, allow_resample=config.allow_resample,
        activations=config.analysis_level == "participant" and config.model is not None,
    )


def methods_text(*, target: str, tensor: str, n_members: int = 1, backprojection: bool = True,
                 method: str = "consensus", consensus: dict | None = None) -> str:
    """The group level's description of the method for what ran (without the settings)."""
    if consensus is not None:
        ensemble = CONSENSUS_METHODS.format(
            k=consensus["networks"], b_minus=consensus["resamples"] - 1, fits=consensus["fits"],
            threshold=consensus["match_threshold"], robust=consensus["robust_stability"])
    else:
        ensemble = ""
    return (DEFAULT_METHODS.format(target=target)
            + (PAPER_METHODS if method == "paper" else "")
            + (DEVIATIONS_METHODS if tensor in ("deviations", "relevance") else "")
            + (RELEVANCE_METHODS if tensor == "relevance" else "")
            + ensemble
            + (BACKPROJECTION_METHODS if backprojection else ""))


def settings_sentence(run: dict) -> str:
    """What ran, in one paragraph: subjects, network, layer and tensor, ranks, penalty.

    ``run`` holds what the stages wrote: ``target``, ``subjects`` (``{split: n}``),
    ``networks``, ``epochs``, ``tuned`` (trials, 0: none), ``layer``, ``channels``,
    ``grid`` (feature grid shape), ``tensor``, ``constraints``, ``ranks`` (R1, R2),
    ``rank_rule``, ``lambda``, ``lambda_rule``, ``method``, ``consensus`` (``consensus.json``) and
    ``atlases`` (those that named the RoIs); missing keys are left out.
    """
    parts = []
    if run.get("consensus"):
        parts.append(f"The RoIs are the consensus (--method consensus) of {run['consensus']['networks']} "
                     f"networks x {run['consensus']['resamples']} resamples of the training subjects.")
    elif run.get("method") == "paper":
        parts.append("The RoIs come from the original method (--method paper): one network, its last "
                     "layer's activations and the constraints of its eq. 2.")
    elif run.get("method"):
        parts.append(f"The RoIs come from one decomposition of one network (--method {run['method']} "
                     "with one network and one resample).")
    subjects = run.get("subjects")
    if subjects:
        total = sum(subjects.values())
        parts.append(f"The {total} participants were split, stratified by {run.get('target', 'the target')}, "
                     f"into {subjects.get('train', 0)} training, {subjects.get('val', 0)} validation and "
                     f"{subjects.get('test', 0)} test subjects.")
    if run.get("networks"):
        k = int(run["networks"])
        trained = "One network was" if k == 1 else f"{k} networks were"
        tuned = (f", its hyperparameters chosen by {run['tuned']} trials of a tree-structured Parzen "
                 f"estimator (Optuna; Akiba et al., 2019)") if run.get("tuned") else ""
        epochs = f" for up to {run['epochs']} epochs" if run.get("epochs") else ""
        parts.append(f"{trained} trained{epochs} (SGD, best validation epoch kept){tuned}.")
    if run.get("layer"):
        grid = " x ".join(map(str, run["grid"])) if run.get("grid") is not None else "?"
        tensor = {"activations": "its activations", "deviations": "the activations' deviations from the "
                  "training mean", "relevance": "the gradient-weighted deviations from the training mean"
                  }.get(run.get("tensor"), run.get("tensor"))
        parts.append(f"The decomposed layer was {run['layer']} ({run.get('channels', '?')} channels on a "
                     f"{grid} feature grid), and the decomposed tensor {tensor}"
                     + (f", with the {run['constraints']} constraint set" if run.get("constraints") else "")
                     + ".")
    if run.get("ranks"):
        r1, r2 = run["ranks"]
        parts.append(f"The ranks were R1 = {r1} RoIs and R2 = {r2} channel components"
                     + (f" ({run['rank_rule']})" if run.get("rank_rule") else "")
                     + (f", and the l1 penalty λ = {run['lambda']:.4g}" if run.get("lambda") is not None else "")
                     + (f" ({run['lambda_rule']})" if run.get("lambda_rule") else "") + ".")
    atlases = run.get("atlases") or []
    if "HOSPA" in atlases:
        parts.append("The RoIs were named by their overlap with the Harvard-Oxford subcortical atlas "
                     "(Makris et al., 2006; Desikan et al., 2006; from TemplateFlow) where it names them "
                     "by more than a hemisphere's cortex or white matter, and otherwise with the lobe "
                     "atlas that ships with brainage-xai.")
    elif atlases:
        parts.append("The RoIs were named by their overlap with the lobe atlas that ships with brainage-xai.")
    return " ".join(parts)


@dataclass
class Boilerplate:
    """The methods text of what ran, as ``CITATION.md``/``.html``/``.bib`` and the report
    show it: ``sections`` (heading, paragraphs) and the cited works' keys, in order."""

    sections: list[tuple[str, list[str]]]
    keys: list[str] = field(default_factory=list)

    @property
    def references(self) -> list[Reference]:
        return [REFERENCES[k] for k in dict.fromkeys(self.keys)]

    def markdown(self) -> str:
        lines = ["# Methods", "",
                 f"Results included in this manuscript come from brainage-xai {__version__} ({CODE_URL}), "
                 "a BIDS-App (Gorgolewski et al., 2017). The text below is generated from the settings "
                 "of the run: it may be copied and adapted, and should be cited with the works it names.",
                 ""]
        for heading, paragraphs in self.sections:
            lines += [f"## {heading}", ""]
            for paragraph in paragraphs:
                lines += [paragraph, ""]
        lines += ["## References", ""]
        lines += [f"- {ref.text}" for ref in self.references]
        return "\n".join(lines) + "\n"

    def bibtex(self) -> str:
        return "\n".join(ref.bibtex for ref in self.references)

    def html(self) -> str:
        from . import render

        return render("citation.html", boilerplate=self, code_url=CODE_URL)


def boilerplate(participant: tuple[str, list[str]], group: dict | None = None) -> Boilerplate:
    """The boilerplate of a level: the participant paragraph (:func:`participant_methods`)
    and, for the group level, ``group`` with ``methods`` (:func:`methods_text`),
    ``settings`` (:func:`settings_sentence`), ``consensus`` and ``tuned`` (bool)."""
    text, keys = participant
    keys = ["gorgolewski2017bids", *keys]
    if group is not None:
        keys.insert(0, "brainagexai_method")
    sections = [("Preprocessing (participant level)", [text])]
    if group is not None:
        libs, lib_keys = _libraries(_GROUP_LIBRARIES)
        paragraphs = [group["methods"], group["settings"] + f" Software: {libs}.", NOTATION]
        sections.append(("Brain-age model and its explanation (group level)", [p for p in paragraphs if p.strip()]))
        keys += [*_GROUP_KEYS, *(_CONSENSUS_KEYS if group.get("consensus") else ()),
                 *(("akiba2019optuna",) if group.get("tuned") else ()),
                 *(_HOSPA_KEYS if "HOSPA" in (group.get("atlases") or ()) else ()), *lib_keys]
    return Boilerplate(sections, keys)
