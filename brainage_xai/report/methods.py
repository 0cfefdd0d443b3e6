"""The methods text of what ran: the report's methods section and ``CITATION.md``.

One source for both, so that the report and the boilerplate a user copies into a paper
describe the same run.
"""

from __future__ import annotations

from .._version import __version__
from ..bids.derivatives import CODE_URL

DEFAULT_METHODS = (
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


CITATIONS = [
    "He K, Zhang X, Ren S, Sun J (2016). Identity mappings in deep residual networks. ECCV.",
    "Kossaifi J, Panagakis Y, Anandkumar A, Pantic M (2016). TensorLy: Tensor learning in "
    "Python. arXiv:1610.09555.",
    "Zhou G, Cichocki A, Zhao Q, Xie S (2015). Efficient nonnegative Tucker decompositions: "
    "algorithms and uniqueness. IEEE Trans Image Process 24(12).",
    "Cichocki A, Zdunek R, Amari S (2007). Hierarchical ALS algorithms for nonnegative "
    "matrix and 3D tensor factorization. ICA.",
    "Satopaa V, Albrecht J, Irwin D, Raghavan B (2011). Finding a 'kneedle' in a haystack. "
    "ICDCS Workshops.",
    "Selvaraju RR et al. (2017). Grad-CAM: visual explanations from deep networks via "
    "gradient-based localization. ICCV.",
    "Zhou B, Khosla A, Lapedriza A, Oliva A, Torralba A (2016). Learning deep features for "
    "discriminative localization. CVPR.",
    "Kokhlikyan N et al. (2020). Captum: a unified and generic model interpretability "
    "library for PyTorch. arXiv:2009.07896.",
    "Abraham A et al. (2014). Machine learning for neuroimaging with scikit-learn "
    "(nilearn). Front Neuroinform 8:14.",
    "Brunet JP, Tamayo P, Golub TR, Mesirov JP (2004). Metagenes and molecular pattern "
    "discovery using matrix factorization. PNAS 101(12).",
    "Himberg J, Hyvärinen A, Esposito F (2004). Validating the independent components of "
    "neuroimaging time series via clustering and visualization. NeuroImage 22(3).",
]



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


def methods_text(*, target: str, tensor: str, n_members: int = 1, backprojection: bool = True,
                 method: str = "consensus", consensus: dict | None = None) -> str:
    """The group report's methods paragraph for what ran."""
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


CITATION = """\
# Methods

Results included in this manuscript come from brainage-xai {version} ({url}).

## Participant level

Each participant's brain map (gray-matter probability map for the `volume` preset, MR
elastography stiffness map for the `stiffness` preset), already in MNI152 space, was
checked for registration to the {space} template in world coordinates (declared space,
orientation, voxel size, overlap with the template brain mask (Dice) and correlation with
the template), resampled with nilearn onto the model grid ({resolution} mm isotropic,
the template's bounding box), and intensity-normalised by proportional scaling: the map
was divided by its mean within the template brain mask, which removes global (for
example site-related) intensity differences while preserving regional contrasts.

## Group level

A 3D pre-activation ResNet was trained to predict age from the preprocessed maps, and
its last convolutional layer's activations over all participants were explained with a
constrained non-negative Tucker decomposition (see the group report).

## References

- He K, Zhang X, Ren S, Sun J (2016). Identity mappings in deep residual networks. ECCV.
- Gorgolewski KJ et al. (2017). BIDS apps. PLoS Comput Biol 13(3):e1005209.
- Abraham A et al. (2014). Machine learning for neuroimaging with scikit-learn (nilearn).
  Front Neuroinform 8:14.
"""


def citation_text(*, resolution: str, space: str) -> str:
    """``CITATION.md``: the methods text of the participant level, with references."""
    return CITATION.format(version=__version__, url=CODE_URL, space=space, resolution=resolution)
