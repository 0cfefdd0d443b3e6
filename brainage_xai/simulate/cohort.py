"""A synthetic cohort with known age effects, written as a BIDS dataset.

Real cohorts cannot be redistributed, and an explanation can only be checked against a
truth, so the package generates one. Each subject's maps are the MNI152 template's grey
matter (and a stiffness map derived from its tissue classes) with

- age-dependent change planted in six compact regions: five pairs of 20 mm balls
  (mirrored left and right, clipped to their lobe of the package atlas,
  :mod:`brainage_xai.imaging.atlas`), 16 % of the brain together, and the deep grey nuclei;
  five follow **complementary** trajectories, each
  changing mainly in its own age band (childhood, adolescence, mid-life, late life) or
  weakly over the whole lifespan, each with its own subject-level noise, so that an
  accurate predictor must combine all of them; the sixth is a **decoy** with strong
  subject-level variation that is independent of age;
- a smooth multiplicative field of individual variation and voxel noise;
- a small smooth random deformation (low-frequency DCT basis, as in SPM's nonlinear
  normalisation; a few mm), standing for imperfect registration;
- a global intensity factor per ``site`` and a small one per ``sex``.

The dataset holds raw ``T1w`` images (the template warped per subject, with a
site-dependent scanner gain), the MNI-space maps under ``derivatives/simulated/`` and the
ground truth under ``sourcedata/simulation/``. Everything is deterministic for a seed:
cohort-level draws (ages, sexes, sites, regional effects) come from one random stream and
each subject's images from its own stream, so the result does not depend on ``n_jobs``.
See ``docs/simulation.md``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..imaging.templates import check_resolution

SPACE = "MNI152NLin2009cAsym"
GENERATOR = "brainage-xai-simulate"
CODE_URL = "https://github.com/brainage-xai/brainage-xai"
BIDS_VERSION = "1.9.0"
#: Ages (years) over which the lifespan-linear trajectory goes from 0 to 1, whatever
#: the cohort's age range, so that trajectories do not change with ``age_range``.
REFERENCE_AGES = (5.0, 81.0)


@dataclass(frozen=True)
class PlantedRegion:
    """One planted region: where it is, and its trajectory.

    The region is the atlas structure ``name`` (both hemispheres), restricted, when
    ``centre`` is given, to two balls of ``radius`` mm centred at ``centre`` (MNI mm, the
    right hemisphere) and at its mirror image ``(-x, y, z)``.

    The subject's relative change of grey matter in the region is
    ``amplitude * curve(age) + N(0, subject_sd)``, where ``curve`` rises smoothly
    (cubic smoothstep) from 0 at ``onset`` to 1 at ``offset`` years; the decoy has no
    curve, only the subject-level term.
    """

    name: str
    trajectory: str
    onset: float
    offset: float
    amplitude: float
    subject_sd: float
    centre: tuple[float, float, float] | None = None
    radius: float | None = None

    def curve(self, age):
        """Noise-free trajectory (0..1) at ``age`` (years); 0 for the decoy."""
        age = np.asarray(age, dtype=np.float64)
        if self.trajectory == "decoy":
            return np.zeros_like(age)
        t = np.clip((age - self.onset) / (self.offset - self.onset), 0.0, 1.0)
        if self.trajectory == "lifespan-linear":
            return t
        return t * t * (3.0 - 2.0 * t)


#: Radius (mm) of the balls that make the compact planted regions: 2.5 feature voxels
#: across at the 16 mm spacing of block3 at 4 mm, 5 at the 8 mm of block2, 10 at the 4 mm of
#: block1 (`--layer auto` at 4 mm).
REGION_RADIUS_MM = 20.0

#: The planted regions, in label order (label = position + 1). Bands overlap, and the
#: first and last extend past 5 and 81 years, so that some region changes at every age;
#: signs alternate so that total grey matter is not itself a clean age marker. The
#: regions are compact (a pair of balls inside their lobe: calcarine/occipital pole,
#: superior parietal lobule, dorsolateral prefrontal cortex, middle/inferior temporal
#: gyrus, cerebellar hemispheres), so that most of the brain carries no age effect and
#: occluding a region can be told apart from occluding a random blob of its volume.
PLANTED = (
    PlantedRegion("occipital", "childhood", 2.0, 18.0, +0.30, 0.015, (20.0, -90.0, 2.0), REGION_RADIUS_MM),
    PlantedRegion("parietal", "adolescence", 11.0, 32.0, -0.30, 0.015, (30.0, -60.0, 52.0), REGION_RADIUS_MM),
    PlantedRegion("frontal", "mid-life", 28.0, 60.0, -0.25, 0.015, (36.0, 36.0, 28.0), REGION_RADIUS_MM),
    PlantedRegion("temporal", "late-life", 54.0, 85.0, -0.35, 0.015, (54.0, -18.0, -18.0), REGION_RADIUS_MM),
    PlantedRegion("cerebellum", "lifespan-linear", *REFERENCE_AGES, +0.25, 0.03, (26.0, -68.0, -36.0),
                  REGION_RADIUS_MM),
    PlantedRegion("deepgrey", "decoy", float("nan"), float("nan"), 0.0, 0.15),
)

# Image model constants (documented in docs/simulation.md).
SITE_GM_STEP = 0.07  # site k scales grey matter by 1 - k * step
SITE_STIFFNESS_STEP = 0.04  # and stiffness by 1 + k * step
SITE_T1_GAIN_STEP = 0.15  # and the T1w scanner gain by 1 + k * step
SEX_GM_SCALE = {"F": 1.02, "M": 1.0}
STIFFNESS_EFFECT_SCALE = 0.6  # stiffness changes by this fraction of the GM change
DEFORMATION_SD_MM = 1.0  # per axis, at a voxel
DEFORMATION_BASIS = 3  # DCT functions per axis (the all-constant one gets no weight)
INDIVIDUAL_SD = 0.02  # smooth multiplicative variation (log scale)
INDIVIDUAL_BASIS = 5
GM_NOISE_SD = 0.03
STIFFNESS_NOISE_SD = 0.15  # kPa
T1_NOISE_SD = 0.02  # relative to the scanner gain
REGION_SMOOTH_MM = 2.0  # soft edges of the planted change
MAX_SITES = 8
#: With ``site_effects``: site k's maps are smoothed with a Gaussian of FWHM k times this
#: (scanners and processing pipelines differ in effective resolution), ...
SITE_SMOOTHING_FWHM_MM = 3.0
#: ... and site k's ages centre on the k-th of evenly spread points of the age range,
#: with this spread (a share of the range): the sites differ in age distribution, as
#: multi-site cohorts do, so that site and age are confounded.
SITE_AGE_SPREAD = 0.3
#: The template's GM probability is scaled by this before the effects, so that the
#: largest planted increase (+30 %) does not saturate at 1 where the template is near 1
#: (cerebellum, deep grey): clipping would erase exactly the signal that was planted.
GM_BASE_SCALE = 0.75


def model_fingerprint() -> str:
    """A short hash of the simulation model (planted regions and image constants).

    Stored with the parameters, so that a dataset made by an earlier model is never taken
    for a finished one with the same settings.
    """
    import hashlib

    constants = (
        PLANTED, REFERENCE_AGES, SITE_GM_STEP, SITE_STIFFNESS_STEP, SITE_T1_GAIN_STEP,
        sorted(SEX_GM_SCALE.items()), STIFFNESS_EFFECT_SCALE, DEFORMATION_SD_MM,
        DEFORMATION_BASIS, INDIVIDUAL_SD, INDIVIDUAL_BASIS, GM_NOISE_SD, STIFFNESS_NOISE_SD,
        T1_NOISE_SD, REGION_SMOOTH_MM, GM_BASE_SCALE, SITE_SMOOTHING_FWHM_MM, SITE_AGE_SPREAD,
    )
    return hashlib.sha256(repr(constants).encode()).hexdigest()[:12]


def _check_args(n_subjects, resolution, seed, age_range, n_sites):
    try:
        n_subjects = int(n_subjects)
    except (TypeError, ValueError):
        raise UsageError(f"n_subjects must be an integer; {n_subjects!r} was provided") from None
    if n_subjects < 1:
        raise UsageError(f"n_subjects must be at least 1; {n_subjects} was provided")
    res = check_resolution(resolution)
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise UsageError(f"seed must be an integer; {seed!r} was provided") from None
    if seed < 0:
        raise UsageError(f"seed must be non-negative; {seed} was provided")
    try:
        lo, hi = (float(a) for a in age_range)
    except (TypeError, ValueError):
        raise UsageError(f"age_range must be two numbers (low, high); {age_range!r} was provided") from None
    if not (0 <= lo < hi <= 120):
        raise UsageError(f"age_range must satisfy 0 <= low < high <= 120; {age_range!r} was provided")
    try:
        n_sites = int(n_sites)
    except (TypeError, ValueError):
        raise UsageError(f"n_sites must be an integer; {n_sites!r} was provided") from None
    if not 1 <= n_sites <= MAX_SITES:
        raise UsageError(f"n_sites must be between 1 and {MAX_SITES}; {n_sites} was provided")
    return n_subjects, int(res), seed, (lo, hi), n_sites


def subject_labels(n_subjects: int) -> list[str]:
    """Zero-padded labels ``001``, ``002``, ... (at least three digits)."""
    width = max(3, len(str(n_subjects)))
    return [f"{i + 1:0{width}d}" for i in range(n_subjects)]


def draw_participants(n_subjects=200, seed=0, age_range=(5.0, 81.0), n_sites=3, site_effects=False):
    """Draw the cohort-level variables: ages, sexes, sites and regional effects.

    Needs no images, so tests and benchmarks can study the design on large cohorts.

    Parameters
    ----------
    n_subjects : int
    seed : int
    age_range : (float, float)
        Ages are stratified: one subject in each of ``n_subjects`` equal bins of the
        range, uniform within its bin, so even a small cohort spans the range.
    n_sites : int
    site_effects : bool
        Sites that differ in age distribution (site ``k``'s ages around the ``k``-th of
        evenly spread points of the range, :data:`SITE_AGE_SPREAD`) and in smoothness
        (:data:`SITE_SMOOTHING_FWHM_MM`); otherwise sites are assigned independently of
        age and differ in intensity only.

    Returns
    -------
    pandas.DataFrame
        ``participant_id, age, sex, site, site_index`` and, per planted region,
        ``<name>`` (the subject's relative grey-matter change) and
        ``<name>_trajectory`` (its noise-free part).
    """
    import pandas as pd

    n_subjects, _, seed, (lo, hi), n_sites = _check_args(n_subjects, 2, seed, age_range, n_sites)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**31,)))
    bins = rng.permutation(n_subjects)
    age = lo + (hi - lo) * (bins + rng.uniform(size=n_subjects)) / n_subjects
    age = np.round(age, 1)
    sex = np.where(rng.uniform(size=n_subjects) < 0.5, "F", "M")
    if site_effects and n_sites > 1:
        # Each subject's site drawn with weights that favour the sites whose age centre is
        # near the subject's age.
        centres = (np.arange(n_sites) + 0.5) / n_sites
        where = (age - lo) / max(hi - lo, 1e-9)
        weights = np.exp(-0.5 * ((where[:, None] - centres[None]) / SITE_AGE_SPREAD) ** 2)
        weights /= weights.sum(axis=1, keepdims=True)
        site_index = np.array([rng.choice(n_sites, p=w) for w in weights])
    else:
        # Sites assigned independently of age (balanced counts), so site is a pure nuisance.
        site_index = rng.permutation(np.arange(n_subjects) % n_sites)
    table = pd.DataFrame(
        {
            "participant_id": [f"sub-{s}" for s in subject_labels(n_subjects)],
            "age": age,
            "sex": sex,
            "site": [f"site{k + 1}" for k in site_index],
            "site_index": site_index,
        }
    )
    for region in PLANTED:
        curve = region.amplitude * region.curve(age)
        noise = rng.normal(0.0, region.subject_sd, size=n_subjects)
        table[region.name] = np.round(np.clip(curve + noise, -0.8, 1.0), 5)
        table[f"{region.name}_trajectory"] = np.round(curve, 5)
    return table


# ----------------------------------------------------------------------------- images


@dataclass
class _Layout:
    """Per-resolution arrays shared by all subjects."""

    resolution: int
    affine: np.ndarray
    gm: np.ndarray
    t1: np.ndarray
    mask: np.ndarray
    stiffness: np.ndarray
    weights: np.ndarray  # (K, n_support) soft masks of the planted regions
    dseg: np.ndarray  # int16 labels of the planted regions
    support: np.ndarray  # flat indices of the voxels a subject's brain can reach
    ijk: np.ndarray  # (3, n_support) their voxel coordinates
    bases_deform: tuple  # DCT bases per axis
    bases_indiv: tuple


def _dct_basis(n: int, k: int) -> np.ndarray:
    i = (np.arange(n) + 0.5) / n
    basis = [np.ones(n)] + [math.sqrt(2.0) * np.cos(math.pi * j * i) for j in range(1, k)]
    return np.stack(basis, axis=1).astype(np.float32)  # (n, k)


def _dct_weights(k: int, constant: bool = True) -> np.ndarray:
    # Low frequencies dominate, as in a smooth random field; weights sum to 1 so the
    # coefficient scale is the field's standard deviation at a voxel.
    i, j, m = np.meshgrid(*(np.arange(k),) * 3, indexing="ij")
    w = 1.0 / (1.0 + i**2 + j**2 + m**2)
    if not constant:
        w[0, 0, 0] = 0.0
    return (w / w.sum()).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _layout(resolution: int) -> _Layout:
    from nilearn import datasets
    from nilearn.image import resample_img
    from scipy import ndimage

    from ..imaging.atlas import load_atlas
    from ..imaging.templates import get_template

    # nilearn's template whatever TemplateFlow holds: the cohort is the same everywhere.
    tpl = get_template(resolution, source="nilearn")
    shape, affine = tpl.shape, tpl.affine
    gm = np.asarray(tpl.gm.get_fdata(dtype=np.float32))
    t1 = np.asarray(tpl.t1.get_fdata(dtype=np.float32))
    mask = np.asarray(tpl.mask.dataobj).astype(bool)
    gm_base = np.where(mask, GM_BASE_SCALE * gm, 0.0).astype(np.float32)
    wm_img = resample_img(
        datasets.load_mni152_wm_template(resolution=1), target_affine=affine,
        target_shape=shape, interpolation="linear", force_resample=True, copy_header=True,
    )
    wm = np.clip(np.asarray(wm_img.get_fdata(dtype=np.float32)), 0, 1)
    # MRE stiffness (kPa): soft CSF, stiffer grey and white matter (typical 3 T values).
    stiffness = np.where(mask, 1.2 + 1.6 * gm + 2.0 * wm, 0.0).astype(np.float32)

    # Only voxels within reach of the brain after warping are ever non-zero: working on
    # them alone (a quarter of the box) makes a subject several times cheaper.
    reach = int(math.ceil(4 * DEFORMATION_SD_MM / resolution)) + 1
    support = np.flatnonzero(ndimage.binary_dilation(mask, iterations=reach))
    ijk = np.stack(np.unravel_index(support, shape))

    atlas_img, table = load_atlas(tpl.t1)
    atlas = np.asarray(atlas_img.dataobj)
    dseg = np.zeros(shape, dtype=np.int16)
    weights = np.zeros((len(PLANTED), support.size), dtype=np.float32)
    sigma = REGION_SMOOTH_MM / resolution
    xyz = np.tensordot(affine[:3, :3], np.indices(shape, dtype=np.float32), axes=1)
    xyz += affine[:3, 3].reshape(3, 1, 1, 1)
    for k, region in enumerate(PLANTED):
        labels = table.loc[table["structure"] == region.name, "index"].to_numpy()
        inside = np.isin(atlas, labels) & mask
        if region.centre is not None:
            cx, cy, cz = region.centre
            d2 = (xyz[1] - cy) ** 2 + (xyz[2] - cz) ** 2
            balls = (np.minimum((xyz[0] - cx) ** 2, (xyz[0] + cx) ** 2) + d2) <= region.radius**2
            inside &= balls
        dseg[inside] = k + 1
        weights[k] = ndimage.gaussian_filter(inside.astype(np.float32), sigma).ravel()[support]
    bases_deform = tuple(_dct_basis(n, DEFORMATION_BASIS) for n in shape)
    bases_indiv = tuple(_dct_basis(n, INDIVIDUAL_BASIS) for n in shape)
    return _Layout(int(resolution), affine, gm_base, t1, mask, stiffness, weights, dseg,
                   support, ijk.astype(np.float32), bases_deform, bases_indiv)


def _smooth_field(rng, bases, sd, support, n_components=1, constant=True):
    """A smooth random field at the support voxels: ``(n_components, n_support)``."""
    k = bases[0].shape[1]
    coef = rng.standard_normal((n_components, k, k, k)).astype(np.float32)
    coef *= np.sqrt(_dct_weights(k, constant))[None] * sd
    out = np.empty((n_components, support.size), dtype=np.float32)
    for d in range(n_components):
        # Separable: one small matrix product per axis on the whole grid (BLAS), then
        # the support voxels; cheaper than any per-voxel contraction.
        field = np.tensordot(bases[0], coef[d], axes=(1, 0))  # (x, k, k)
        field = np.tensordot(field, bases[1], axes=(1, 1))  # (x, k, y)
        field = np.tensordot(field, bases[2], axes=(1, 1))  # (x, y, z)
        out[d] = field.ravel()[support]
    return out


def _subject_images(layout: _Layout, row, seed: int, index: int, site_effects: bool = False) -> dict[str, np.ndarray]:
    """Synthesise one subject's GM probability, stiffness and T1w arrays."""
    from scipy import ndimage

    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    shape, sup = layout.gm.shape, layout.support
    effects = np.array([row[r.name] for r in PLANTED], dtype=np.float32)
    change = 1.0 + effects @ layout.weights
    individual = np.exp(_smooth_field(rng, layout.bases_indiv, INDIVIDUAL_SD, sup)[0])

    def volume(values):
        out = np.zeros(shape, dtype=np.float32)
        out.flat[sup] = values
        return out

    gm = volume(layout.gm.ravel()[sup] * change * individual)
    stiff_change = 1.0 + STIFFNESS_EFFECT_SCALE * (change - 1.0)
    stiffness = volume(layout.stiffness.ravel()[sup] * stiff_change)

    # Pull-back warp: the subject's map at x is its anatomy at x + d(x). No constant
    # term: a registration removes a global shift; what is left is smooth and local.
    disp = _smooth_field(rng, layout.bases_deform, DEFORMATION_SD_MM / layout.resolution, sup,
                         3, constant=False)
    coords = layout.ijk + disp

    def warp(vol):
        return ndimage.map_coordinates(vol, coords, order=1, mode="constant", cval=0.0)

    brain = warp(layout.mask.astype(np.float32)) >= 0.5
    site = int(row["site_index"])
    n_vox = int(brain.sum())

    gm = warp(gm) * (1.0 - SITE_GM_STEP * site) * SEX_GM_SCALE[row["sex"]]
    if site_effects and site > 0:  # the site's effective resolution
        sigma = site * SITE_SMOOTHING_FWHM_MM / (2.0 * np.sqrt(2.0 * np.log(2.0))) / layout.resolution
        gm = ndimage.gaussian_filter(gm, sigma)
    gm[brain] += rng.normal(0.0, GM_NOISE_SD, n_vox).astype(np.float32)
    gm = volume(np.where(brain, np.clip(gm, 0.0, 1.0), 0.0))

    stiffness = warp(stiffness) * (1.0 + SITE_STIFFNESS_STEP * site)
    stiffness[brain] += rng.normal(0.0, STIFFNESS_NOISE_SD, n_vox).astype(np.float32)
    stiffness = volume(np.where(brain, np.clip(stiffness, 0.1, None), 0.0))

    gain = 1000.0 * (1.0 + SITE_T1_GAIN_STEP * site)
    t1 = warp(layout.t1)
    head = t1 > 0.01
    t1 = t1 * gain
    t1[head] += rng.normal(0.0, T1_NOISE_SD * gain, int(head.sum())).astype(np.float32)
    t1 = np.clip(np.rint(volume(t1)), 0, np.iinfo(np.int16).max).astype(np.int16)
    return {"gm": gm, "stiffness": stiffness, "t1": t1}
