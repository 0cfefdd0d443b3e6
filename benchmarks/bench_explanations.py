"""Ground-truth benchmark of the explanations on the simulated cohort.

Do robust, faithful, age-related RoIs land on the planted regions that the networks use,
and never on the decoy? Evaluates finished group runs on the simulated cohort (nothing is retrained) against
``sourcedata/simulation/planted_dseg.nii.gz`` of their BIDS dataset: five planted
regions (each a left/right pair of 20 mm balls) and the decoy (a structure that varies
strongly between subjects but not with age). Several runs are read in one call and
printed as one table, one row per run and setting::

    python benchmarks/bench_explanations.py \\
        --run seed1-consensus=SEED1/bids:SEED1/results \\
        --run seed1-paper=SEED1/bids:SEED1/paper [--run ...] [-v] [--json FILE]

``NAME=BIDS_DIR:OUTPUT_DIR``: OUTPUT_DIR is the group level's output directory (its
``group/`` and the work folder ``.work/group/``), BIDS_DIR the simulated dataset it was
run on.

Settings
--------
Each run gives every setting it holds:

- ``consensus`` (when ``group/consensus.npz`` exists): the consensus RoIs (``U3``).
  Candidates for the matching: the RoIs that are robust (stability >=
  ``brainage_xai.explain.consensus.ROBUST_STABILITY`` = 0.7) and age-related
  (``cv_r2`` in ``rois.tsv`` >= ``brainage_xai.explain.loadings.RELATED_R2`` = 0.5).
- ``single-<k>`` (each network of a consensus): network k's own decomposition of all
  training subjects (``own_<k>``). Candidates: its age-related RoIs, ``cv_r2`` >= 0.5 of
  ``fit_trajectory`` (the explanations stage's fit, all subjects, the run's seed) of
  ``own_loadings_<k>`` against the subjects' ages from ``predictions.tsv``; without
  ``own_loadings_<k>`` (runs made before it was stored) the age relation, and with it
  every number that needs the candidates, is n/a. Stability does not exist for one fit.
- ``single`` (a run without a consensus: ``--method paper``, one network): the RoIs of
  ``decomposition.npz`` (the components image's), candidates ``cv_r2`` >= 0.5 from
  ``rois.tsv``.

Rules and thresholds
--------------------
Fixed before any held-out cohort seed was evaluated; they are not tuned afterwards.

- Correlation: Pearson over the template's brain mask
  (``brainage_xai.imaging.templates.get_template(res).mask``) between an RoI map (its
  column upsampled with the network's stride geometry, clipped at 0, masked) and a
  structure's binary mask.
- Versions: each structure is scored as ``both`` sides, ``left`` (world x < 0) and
  ``right`` (x > 0). Ceiling of a version: ``resolution_ceiling`` of its mask with the
  run's feature geometry, within the brain mask. The score of RoI j for structure r is
  ``max over versions v of corr(j, r_v) / ceiling(r_v)``; the version v* that gives it
  is the one every comparison below uses (its correlation, its nulls, GradCAM's
  correlation with it).
- Matching: one-to-one between the five planted regions and the candidate RoIs,
  maximising the summed score (Hungarian, ``scipy.optimize.linear_sum_assignment``). A
  matched pair counts (the region is "matched") when the RoI's correlation with v* is
  above all three of: the shift null's 95th percentile, the randomised-network null's
  95th percentile, and the GradCAM average's correlation with v*.
- Shift null (per setting, per structure and version): each candidate RoI map rolled
  (``np.roll`` on the input grid) by its own random offset, a uniform direction and a
  length uniform in 20-60 mm (rounded to voxels, kept within 20-60 mm), masked to the
  brain; the best correlation over the shifted candidates; 95th percentile over 200 draws
  (at least 100; ``--shift-draws``).
- Randomised-network null (per run; Adebayo et al. 2018, model-parameter
  randomisation): 20 networks (``--random-networks``) of the run's architecture
  (``model.json``, one member) with PyTorch's default initialisation
  (``build_network`` under ``torch.manual_seed(10000 + i)``), in evaluation mode; the
  decomposed layer's activations of the run's training subjects (the run's input
  normalisation); the run's tensor (``prepare_tensor`` with the run's ``--tensor``, the
  random network's own centre, scale and, for ``relevance``, output gradient), scaled to
  the Frobenius norm of network 1's trained tensor so that λ weighs the same;
  decomposed at the run's ranks, λ and constraints (300 iterations, tol 1e-6, as each
  fit of the consensus); the best correlation over its RoIs per structure and version;
  95th percentile over the draws. The per-draw values are cached under
  ``OUTPUT_DIR/.work/group/bench_explanations/`` (``--cache``): a rerun only computes
  draws it does not have.
- Positive control (per run, per planted region): the occlusion test
  (``brainage_xai.explain.occlusion.occlusion_test``) with the planted region's mask
  (both sides) as the RoI, each network of the run as a predictor, the test subjects,
  fill = the training subjects' mean input, 20 random blobs per volume bin
  (``--blobs``). A region is "used" when its MAE increase is above its blob null's 95th
  percentile for at least half of the networks of the setting (all K for the
  consensus; network k for ``single-<k>``; the one network for ``single``).
- Recovery: used regions that are matched / used regions.
- Decoy hit: a candidate RoI whose best-scoring structure (the same score, over the five
  regions and the decoy) is the decoy and whose correlation with the decoy's version v*
  is above the shift null's 95th percentile for it.
- Median best/ceiling: the median score over matched regions. Stability: the median
  stability of the RoIs that match them (consensus only).
- Occlusion confirmations: for each candidate RoI, the share of the networks whose
  occlusion test puts it above its null (``occlusion.tsv``; for ``single-<k>`` only
  with ``--single-occlusion``, which runs network k's test on its own candidates with
  the package's RoI masks and 20 blobs); the minimum and median over candidates.
- Linear model / network: test MAE of the linear model on the setting's loadings over
  the network's test MAE (consensus: ``consensus.json``; single: ``metrics.json``;
  ``single-<k>``: a least-squares line of age on ``own_loadings_<k>`` fitted on the
  training subjects, over network k's test MAE, the positive control's baseline).

Goal, per setting; each criterion is yes, no or n/a, and the goal holds when
all five are yes:

1. ``recover``: every used region is matched (n/a when no region is used, or without the
   randomised-network null);
2. ``no_decoy``: no decoy hit;
3. ``ceiling``: median best/ceiling over matched regions >= 0.6 (n/a: none matched);
4. ``linear``: linear-model test MAE <= 1.2 x the network's;
5. ``occlusion``: every candidate RoI is confirmed by at least 80 % of the networks
   (n/a: no candidate, or not measured).

For single networks "robust" does not apply (one fit); their rows are the baseline the
consensus is compared with, and a ``--method paper`` run's row the paper's.

Output
------
One table row per setting; ``-v`` adds per-region detail (used share, ceilings,
matched RoI, version, correlation, score, nulls, GradCAM; for ``single-<k>``, the
consensus RoI that the network's best RoI for the region correlates with most, on the
feature grid, and that correlation) and each candidate RoI's best structure. One line per setting starting ``summary `` holds the row as JSON; ``--json
FILE`` saves every number, the nulls and the costs.

Cost
----
Measured on 2 CPU cores without AMX (6 mm, 48 subjects, block1, K = 2 networks;
scale linearly with K where noted):

- loading a run (networks, maps): about 1 s;
- ceilings (6 structures x 3 versions): under 1 s at 6 mm and block1;
- positive control: K x (1 + 6 + 20 x volume bins) forward passes over the test subjects,
  about 4 s per network at 6 mm; cached;
- randomised-network null: per draw one forward pass over the training subjects and one
  decomposition, about 1 s per draw at 6 mm (20 s for 20); cached per draw;
- shift null: 200 draws x candidate RoIs rolls and correlations, under 2 s per setting;
- matching and the rest: negligible; ``--single-occlusion``: about 3 s per network.

A K = 3 run at 6 mm thus takes well under 2 minutes, a rerun a few seconds.
``--quick`` (20 shift draws, 3 random networks) is for tests, not for results.

Helpers that other benchmarks import (``_inputs``, ``_nulls``, ``run_rois``,
``input_grid_score``, ``_occlude_planted``, ``print_result``) are kept at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

#: Shift null: offsets of this length range (mm), and draws (at least MIN_SHIFT_DRAWS).
SHIFT_MM = (20.0, 60.0)
SHIFT_DRAWS, MIN_SHIFT_DRAWS, QUICK_SHIFT_DRAWS = 200, 100, 20
#: Randomised-network null: networks by default and with --quick; seed of draw i.
RANDOM_NETWORKS, QUICK_RANDOM_NETWORKS, RANDOM_SEED_BASE = 20, 3, 10_000
#: Percentile of the nulls.
NULL_PERCENTILE = 95
#: A region is used when at least this share of the networks' occlusion tests beat the null.
USED_SHARE = 0.5
#: Goal thresholds: occlusion confirmations, median best/ceiling, linear-model margin.
CONFIRM_SHARE, CEILING_GOAL, MAE_MARGIN = 0.8, 0.6, 0.2
#: The fits of the randomised-network null (as each fit of the consensus).
N_ITER_MAX, TOL = 300, 1e-6
VERSIONS = ("both", "left", "right")
CRITERIA = ("recover", "no_decoy", "ceiling", "linear", "occlusion")
#: Raised when a cached value would mean something else.
CACHE_VERSION = 1


# -- small helpers ------------------------------------------------------------------------


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unit_rows(m: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit norm (zero rows stay zero): ``a @ b.T`` is Pearson."""
    m = np.asarray(m, dtype=np.float64)
    m = m - m.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(norm > 0, norm, np.inf)


def _true(values) -> np.ndarray:
    return pd.Series(values).astype(str).str.lower().eq("true").to_numpy()


def _fmt(v, digits=2) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _yes(v) -> str:
    return "n/a" if v is None else ("yes" if v else "no")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


# -- the truth and a run ------------------------------------------------------------------


@dataclass
class Truth:
    """The planted structures on the model grid, with their left/right versions."""

    names: list  # "occipital (childhood)", ...
    decoy: np.ndarray  # (S,) bool
    masks: np.ndarray  # (S, X, Y, Z) bool, both sides
    versions: np.ndarray  # (S, 3, X, Y, Z) bool: both, left, right
    brain: np.ndarray  # (X, Y, Z) bool
    affine: np.ndarray
    sha: str

    @property
    def targets(self) -> np.ndarray:
        """Every version's mask in the brain, as unit rows ``(S * 3, brain voxels)``."""
        return _unit_rows(self.versions.reshape(-1, *self.brain.shape)[:, self.brain].astype(float))


def load_truth(bids: Path, resolution: float) -> Truth:
    import nibabel as nib

    from brainage_xai.imaging.templates import get_template
    from brainage_xai.utils.io import read_tsv

    sim = bids / "sourcedata" / "simulation"
    img = nib.load(str(sim / "planted_dseg.nii.gz"))
    table = read_tsv(sim / "planted_dseg.tsv")
    dseg = np.asarray(img.dataobj).astype(int)
    template = get_template(resolution)
    if tuple(dseg.shape) != tuple(template.shape[:3]) or not np.allclose(img.affine, template.mask.affine):
        raise SystemExit(f"{sim}/planted_dseg.nii.gz is not on the {resolution:g} mm model grid: "
                         "evaluate a run at the simulation's resolution")
    brain = np.asarray(template.mask.dataobj) > 0
    ijk = np.indices(dseg.shape).reshape(3, -1)
    x_mm = (img.affine[0, :3] @ ijk + img.affine[0, 3]).reshape(dseg.shape)
    masks = np.stack([dseg == int(k) for k in table["index"]])
    versions = np.stack([np.stack([m, m & (x_mm < 0), m & (x_mm > 0)]) for m in masks])
    names = [f"{n} ({t})" for n, t in zip(table["name"], table["trajectory"])]
    decoy = np.array([str(t) == "decoy" for t in table["trajectory"]])
    return Truth(names, decoy, masks, versions, brain, img.affine,
                 _file_sha(sim / "planted_dseg.nii.gz")[:16])


@dataclass
class Run:
    """What the benchmark reads of one group run."""

    name: str
    bids: Path
    out: Path
    group: Path
    cache: Path | None
    meta: dict
    model: object
    device: object
    x: np.ndarray  # (n, X, Y, Z) standardised inputs, in `subjects` order
    subjects: list
    split: np.ndarray
    ages: np.ndarray
    geometry: object
    layer: str
    tensor: str
    ranks: tuple
    l1: float
    constraints: str
    seed: int
    resolution: float
    n_networks: int
    gradcam: np.ndarray
    consensus: dict | None
    affine: np.ndarray  # of the model grid
    brain: np.ndarray  # the template's brain mask on it
    costs: dict = field(default_factory=dict)

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def network(self, k: int):
        members = getattr(self.model, "members", None)
        return self.model if members is None else members[k]

    def predictor(self, k: int):
        from brainage_xai.explain import occlusion
        from brainage_xai.model.training import resolve_precision

        norm = self.meta["normalisation"]
        return occlusion.torch_predictor(
            self.network(k), device=self.device, batch_size=16, scale=float(norm["target_std"][0]),
            shift=float(norm["target_mean"][0]), dtype=resolve_precision("auto", self.device))

    def cached(self, stem: str, key: dict) -> Path | None:
        if self.cache is None:
            return None
        return self.cache / f"{stem}-{_digest({**key, 'cache_version': CACHE_VERSION})}"


def load_run(name: str, bids: Path, out: Path, device: str, cache: Path | None) -> Run:
    import nibabel as nib

    from brainage_xai.bids.derivatives import collect_preprocessed
    from brainage_xai.imaging.templates import get_template
    from brainage_xai.model.training import resolve_device

    t0 = time.perf_counter()
    group = out / "group"
    if not (group / "model.safetensors").is_file():
        raise SystemExit(f"{out}: no group/model.safetensors; is it the OUTPUT_DIR of a group run?")
    resolution = float(json.loads((group / "analysis.json").read_text())["resolution"])
    comps, geometry, sidecar = run_rois(group)
    dev = resolve_device(device)
    dev, model, meta, x, which, y = _inputs(out, group, resolution, str(dev))
    subjects = [s for s, _ in collect_preprocessed(out, meta.get("map", "volume"), resolution=resolution)]
    act_json = sorted((out / ".work" / "group" / "activations").glob("layer-*_activations.json"))
    order = None
    for path in act_json:
        info = json.loads(path.read_text())
        if info.get("layer") == sidecar.get("Layer"):
            order = info["subjects"]
    if order is not None and order != subjects:
        idx = [subjects.index(s) for s in order]
        x, which, y, subjects = x[idx], which[idx], y[idx], list(order)
    dec = json.loads((group / "decomposition.json").read_text())
    sel = json.loads((group / "selection.json").read_text())
    metrics = json.loads((group / "metrics.json").read_text())
    tensor = dec.get("tensor") or metrics.get("decomposition", {}).get("tensor", "activations")
    consensus = None
    if (group / "consensus.npz").is_file():
        with np.load(group / "consensus.npz") as npz:
            consensus = {k: npz[k] for k in npz.files}
        consensus["about"] = json.loads((group / "consensus.json").read_text())
    cam_path = _one(group, "*_desc-gradcam_map.nii.gz")
    cam = np.asarray(nib.load(str(cam_path)).dataobj, dtype=float)
    run = Run(
        name=name, bids=bids, out=out, group=group,
        cache=cache if cache is not None else out / ".work" / "group" / "bench_explanations",
        meta=meta, model=model, device=dev, x=x, subjects=subjects, split=np.asarray(which),
        ages=np.asarray(y, dtype=float), geometry=geometry,
        layer=sidecar.get("Layer") or dec.get("layer"), tensor=tensor,
        ranks=(int(sel["ranks"]["R1"]), int(sel["ranks"]["R2"])), l1=float(sel["lambda"]["lambda"]),
        constraints=dec.get("constraints", "nonneg"), seed=int(meta.get("seed", 0)),
        resolution=resolution, n_networks=int(getattr(model, "n_members", 1)), gradcam=cam,
        consensus=consensus, affine=comps.affine,
        brain=np.asarray(get_template(resolution).mask.dataobj) > 0)
    try:
        run.cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        warnings.warn(f"{run.cache}: {exc}; nothing is cached", stacklevel=2)
        run.cache = None
    run.costs["load_s"] = time.perf_counter() - t0
    return run


# -- ceilings, nulls and the positive control ---------------------------------------------


def ceilings(run: Run, truth: Truth) -> np.ndarray:
    """``(S, 3)``: the resolution ceiling of every structure's version on the run's grid."""
    from brainage_xai.imaging.geometry import resolution_ceiling

    t0 = time.perf_counter()
    out = np.array([[resolution_ceiling(v, run.geometry, truth.brain) if v.any() else np.nan
                     for v in s] for s in truth.versions])
    run.costs["ceilings_s"] = time.perf_counter() - t0
    return out


def correlations(maps_in_brain: np.ndarray, truth: Truth) -> np.ndarray:
    """``(m, S, 3)``: every map's correlation with every version (maps ``(m, brain voxels)``)."""
    return (_unit_rows(maps_in_brain) @ truth.targets.T).reshape(len(maps_in_brain), -1, len(VERSIONS))


def _offset(rng, resolution: float) -> tuple:
    while True:
        v = rng.normal(size=3)
        v *= rng.uniform(*SHIFT_MM) / resolution / np.linalg.norm(v)
        off = np.rint(v).astype(int)
        if SHIFT_MM[0] <= np.linalg.norm(off) * resolution <= SHIFT_MM[1]:
            return tuple(int(o) for o in off)


def shift_null(maps: np.ndarray, truth: Truth, resolution: float, draws: int, rng) -> np.ndarray:
    """``(draws, S, 3)``: the best correlation of the shifted maps ``(m, X, Y, Z)``."""
    best = np.full((draws, len(truth.names), len(VERSIONS)), np.nan)
    if len(maps) == 0:
        return best
    for d in range(draws):
        rolled = np.stack([np.roll(m, _offset(rng, resolution), axis=(0, 1, 2))[truth.brain] for m in maps])
        best[d] = correlations(rolled, truth).max(axis=0)
    return best


def _run_tensor(net, x_train, run: Run) -> np.ndarray:
    """The training subjects' tensor of ``net`` at the run's layer, built as the run did."""
    from brainage_xai.model.activations import gradient_rms, iter_activations
    from brainage_xai.selection import Splits, prepare_tensor

    act = np.concatenate(list(iter_activations(net, x_train, run.layer, batch_size=8, device=run.device)))
    act = act.reshape(act.shape[0], act.shape[1], -1)
    grad = None
    if run.tensor == "relevance":
        g = gradient_rms(net, x_train, run.layer, batch_size=8, device=run.device)
        grad = g.reshape(g.shape[0], -1)
    empty = np.arange(0)
    A, _, _ = prepare_tensor(act, Splits(np.arange(len(act)), empty, empty), run.tensor, gradient_rms=grad)
    return np.ascontiguousarray(A.train, dtype=np.float32)


def random_network_null(run: Run, truth: Truth, n_draws: int) -> np.ndarray:
    """``(n_draws, S, 3)``: per draw, the best correlation with a random network's RoIs."""
    import torch

    from brainage_xai.decomposition import fit_constrained_tucker
    from brainage_xai.explain.rois import roi_maps
    from brainage_xai.model.network import build_network

    arch = {k: v for k, v in run.meta["architecture"].items() if k != "ensemble"}
    train = run.rows("train")
    key = {"arch": arch, "layer": run.layer, "tensor": run.tensor, "ranks": run.ranks, "l1": run.l1,
           "constraints": run.constraints, "seed": run.seed, "train": [run.subjects[i] for i in train],
           "normalisation": run.meta["normalisation"], "truth": truth.sha,
           "geometry": run.geometry.to_dict(), "model": _file_sha(run.group / "model.safetensors")}
    path = run.cached("random_networks", key)
    done: dict = {}
    if path is not None and path.with_suffix(".npz").is_file():
        with np.load(path.with_suffix(".npz")) as npz:
            done = {int(i): (b, float(s)) for i, b, s in zip(npz["draw"], npz["best"], npz["seconds"])}
    todo = [i for i in range(n_draws) if i not in done]
    t0 = time.perf_counter()
    if todo:
        x_train = torch.from_numpy(np.ascontiguousarray(run.x[train][:, None]))
        norm = float(np.linalg.norm(_run_tensor(run.network(0), x_train, run)))
        for i in todo:
            t1 = time.perf_counter()
            torch.manual_seed(RANDOM_SEED_BASE + i)
            net = build_network(arch).to(run.device).eval()
            A = _run_tensor(net, x_train, run)
            A *= norm / max(float(np.linalg.norm(A)), 1e-12)
            best = np.full((len(truth.names), len(VERSIONS)), np.nan)
            try:
                fit = fit_constrained_tucker(A, run.ranks, constraints=run.constraints, l1=run.l1,
                                             n_iter_max=N_ITER_MAX, tol=TOL, random_state=run.seed)
                maps = roi_maps(np.asarray(fit.factors[2], dtype=np.float64), run.geometry, truth.brain)
                best = correlations(maps[:, truth.brain], truth).max(axis=0)
            except ValueError as exc:  # e.g. a tensor of zeros: this draw has no RoIs
                warnings.warn(f"random network {i}: {exc}", stacklevel=2)
            done[i] = (best, time.perf_counter() - t1)
        if path is not None:
            keys = sorted(done)
            np.savez(path.with_suffix(".npz"), draw=np.array(keys),
                     best=np.stack([done[i][0] for i in keys]), seconds=np.array([done[i][1] for i in keys]))
    run.costs["random_networks_s"] = time.perf_counter() - t0
    run.costs["random_networks_computed"] = len(todo)
    run.costs["random_network_s_per_draw"] = float(np.mean([done[i][1] for i in range(n_draws)]))
    return np.stack([done[i][0] for i in range(n_draws)])


def _occlusion(run: Run, masks: np.ndarray, names: list, networks: list, blobs: int, stem: str,
               key: dict) -> pd.DataFrame:
    """The occlusion test of ``masks`` with ``networks`` on the test subjects (cached)."""
    from brainage_xai.explain import occlusion

    test, train = run.rows("test"), run.rows("train")
    key = {**key, "blobs": blobs, "seed": run.seed, "networks": networks,
           "model": _file_sha(run.group / "model.safetensors"), "volume_ratio": occlusion.VOLUME_RATIO,
           "test": [run.subjects[i] for i in test], "masks": hashlib.sha256(np.packbits(masks)).hexdigest()}
    path = run.cached(stem, key)
    run.costs[f"{stem}_cached"] = path is not None and path.with_suffix(".tsv").is_file()
    if run.costs[f"{stem}_cached"]:
        return pd.read_csv(path.with_suffix(".tsv"), sep="\t")
    predictors = {f"network {k + 1}": run.predictor(k) for k in networks}
    table, _ = occlusion.occlusion_test(
        predictors, run.x[test], run.ages[test], masks, run.x[train].mean(axis=0), run.brain,
        n_random=blobs, seed=run.seed, zooms=(run.resolution,) * 3, roi_names=names)
    if path is not None:
        table.to_csv(path.with_suffix(".tsv"), sep="\t", index=False)
    return table


def positive_control(run: Run, truth: Truth, blobs: int) -> pd.DataFrame:
    """Occluding each planted region (both sides) with each network of the run."""
    t0 = time.perf_counter()
    table = _occlusion(run, truth.masks, truth.names, list(range(run.n_networks)), blobs,
                       "planted_occlusion", {"truth": truth.sha})
    run.costs["positive_control_s"] = time.perf_counter() - t0
    return table


# -- the settings -------------------------------------------------------------------------


@dataclass
class Setting:
    name: str
    u3: np.ndarray  # (v, R)
    networks: list  # whose positive control counts
    related: np.ndarray | None  # (R,) bool, None: unknown
    cv_r2: np.ndarray | None
    stability: np.ndarray | None = None
    confirm: np.ndarray | None = None  # (R,) share of networks relying
    lin_mae: float | None = None
    net_mae: float | None = None

    @property
    def candidates(self) -> np.ndarray | None:
        if self.related is None:
            return None
        robust = np.ones_like(self.related) if self.stability is None else self.stability >= _robust()
        return np.flatnonzero(self.related & robust)


def _robust() -> float:
    from brainage_xai.explain.consensus import ROBUST_STABILITY

    return ROBUST_STABILITY


def _related_r2() -> float:
    from brainage_xai.explain.loadings import RELATED_R2

    return RELATED_R2


def _rois_table(run: Run, n: int) -> pd.DataFrame:
    from brainage_xai.utils.io import read_tsv

    table = read_tsv(run.group / "rois.tsv").set_index("name")
    return table.reindex([f"RoI {q + 1}" for q in range(n)])


def _occlusion_shares(run: Run, n: int) -> np.ndarray:
    """Per RoI, the share of the run's networks whose occlusion test confirms it."""
    from brainage_xai.utils.io import read_tsv

    occ = read_tsv(run.group / "occlusion.tsv")
    occ["ok"] = _true(occ["above_null"])
    share = occ.groupby("roi")["ok"].mean()
    return np.array([float(share.get(f"RoI {q + 1}", np.nan)) for q in range(n)])


def settings_of(run: Run, control: pd.DataFrame, single_occlusion: bool, blobs: int) -> list:
    from brainage_xai.explain.loadings import fit_trajectory

    out = []
    if run.consensus is not None:
        c = run.consensus
        u3 = c["U3"]
        rois = _rois_table(run, u3.shape[1])
        cv = rois["cv_r2"].to_numpy(float)
        test = c["about"].get("metrics", {}).get("test", {})
        out.append(Setting(
            "consensus", u3, list(range(run.n_networks)), cv >= _related_r2(), cv,
            stability=np.asarray(c["stability"], float), confirm=_occlusion_shares(run, u3.shape[1]),
            lin_mae=test.get("linear_model_on_consensus", {}).get("mae"),
            net_mae=test.get("network", {}).get("mae")))
        base = control.groupby("network")["mae_baseline"].first()
        rows = {s: run.rows(s) for s in ("train", "test")}
        for k in range(run.n_networks):
            if f"own_{k}" not in c:
                continue
            u3k = c[f"own_{k}"]
            related = cv_k = lin = None
            loadings = c.get(f"own_loadings_{k}")
            if loadings is not None:
                cv_k = np.array([fit_trajectory(run.ages, loadings[:, r], seed=run.seed)["cv_r2"]
                                 for r in range(loadings.shape[1])])
                related = cv_k >= _related_r2()
                from sklearn.linear_model import LinearRegression

                lm = LinearRegression().fit(loadings[rows["train"]], run.ages[rows["train"]])
                lin = float(np.mean(np.abs(lm.predict(loadings[rows["test"]]) - run.ages[rows["test"]])))
            out.append(Setting(f"single-{k + 1}", u3k, [k], related, cv_k, lin_mae=lin,
                               net_mae=float(base.get(f"network {k + 1}", np.nan))))
    else:
        with np.load(run.group / "decomposition.npz") as npz:
            u3 = npz["U3"]
        rois = _rois_table(run, u3.shape[1])
        cv = rois["cv_r2"].to_numpy(float)
        metrics = json.loads((run.group / "metrics.json").read_text())
        target = run.meta["targets"][0]
        test = metrics.get("decomposition", {}).get("metrics", {}).get(target, {}).get("test", {})
        out.append(Setting("single", u3, list(range(run.n_networks)), cv >= _related_r2(), cv,
                           confirm=_occlusion_shares(run, u3.shape[1]),
                           lin_mae=test.get("linear_model_on_decomposition", {}).get("mae"),
                           net_mae=test.get("network", {}).get("mae")))
    if single_occlusion:
        for s in out:
            if s.name.startswith("single-") and s.candidates is not None:
                s.confirm = _single_occlusion(run, s, blobs)
    return out


def _single_occlusion(run: Run, setting: Setting, blobs: int) -> np.ndarray:
    """Network k's occlusion test on its own candidate RoIs (the package's RoI masks)."""
    import nibabel as nib

    from brainage_xai.explain.rois import roi_components, roi_masks

    t0 = time.perf_counter()
    confirm = np.full(setting.u3.shape[1], np.nan)
    cand = setting.candidates
    if len(cand):
        img = nib.Nifti1Image(np.zeros(run.geometry.input_shape, np.float32), run.affine)
        masks = roi_masks(roi_components(setting.u3[:, cand], run.geometry, img, mask=run.brain))
        names = [f"RoI {q + 1}" for q in cand]
        table = _occlusion(run, masks, names, setting.networks, blobs, f"{setting.name}_occlusion", {})
        ok = dict(zip(table["roi"], _true(table["above_null"])))
        for q, n in zip(cand, names):
            confirm[q] = float(ok.get(n, False))
    run.costs[f"{setting.name}_occlusion_s"] = time.perf_counter() - t0
    return confirm


# -- evaluating one setting ---------------------------------------------------------------


def evaluate_setting(run: Run, truth: Truth, setting: Setting, ceil: np.ndarray, rand95, control,
                     shift_draws: int, seed: int) -> dict:
    from scipy.optimize import linear_sum_assignment

    from brainage_xai.explain.rois import roi_maps

    t0 = time.perf_counter()
    planted = np.flatnonzero(~truth.decoy)
    decoys = np.flatnonzero(truth.decoy)
    # positive control: the share of the setting's networks for which occluding the region hurts
    ok = control.assign(ok=_true(control["above_null"]))
    ok = ok[ok["network"].isin([f"network {k + 1}" for k in setting.networks])]
    share = ok.groupby("roi")["ok"].mean()
    used_share = np.array([float(share.get(n, np.nan)) for n in truth.names])
    used = used_share >= USED_SHARE
    cam = correlations(run.gradcam[truth.brain][None], truth)[0]
    maps = roi_maps(setting.u3, run.geometry, truth.brain)
    corr = correlations(maps[:, truth.brain], truth)  # (R, S, 3)
    score_v = corr / np.where(ceil > 0, ceil, np.nan)[None]
    score = np.nanmax(score_v, axis=2)  # (R, S)
    version = np.nanargmax(np.nan_to_num(score_v, nan=-np.inf), axis=2)
    regions = []
    # a network's own RoIs against the consensus (feature grid): where each went
    to_consensus = None
    if setting.name.startswith("single-") and run.consensus is not None:
        to_consensus = _unit_rows(setting.u3.T) @ _unit_rows(run.consensus["U3"].T).T  # (R, Q)
    for r in range(len(truth.names)):
        j = int(np.argmax(score[:, r]))
        regions.append({"region": truth.names[r], "decoy": bool(truth.decoy[r]),
                        "used_share": used_share[r], "used": bool(used[r]),
                        "ceiling": {v: ceil[r, i] for i, v in enumerate(VERSIONS)},
                        "best_any_roi": f"RoI {j + 1}", "best_any_score": score[j, r]})
        if to_consensus is not None and np.isfinite(to_consensus[j]).any():
            q = int(np.nanargmax(to_consensus[j]))
            regions[-1].update(consensus_roi=f"RoI {q + 1}", consensus_corr=float(to_consensus[j, q]))
    result = {"run": run.name, "setting": setting.name, "rois": int(setting.u3.shape[1]),
              "regions": regions, "used": int(used[planted].sum()), "n_planted": len(planted)}
    cand = setting.candidates
    result["candidates"] = None if cand is None else [f"RoI {q + 1}" for q in cand]
    if cand is None:
        result.update(recovered=None, matched=None, decoy_hits=None, median_ceiling=None,
                      median_stability=None, confirm_min=None, confirm_median=None)
    else:
        rng = np.random.default_rng([seed, zlib.crc32(f"{run.name}/{setting.name}".encode())])
        shift = shift_null(maps[cand], truth, run.resolution, shift_draws, rng)
        shift95 = np.percentile(shift, NULL_PERCENTILE, axis=0) if len(cand) else np.full(ceil.shape, np.nan)
        matched = np.zeros(len(truth.names), bool)
        pairs = {}
        if len(cand):
            rows, cols = linear_sum_assignment(score[np.ix_(cand, planted)].T, maximize=True)
            pairs = {int(planted[a]): int(cand[b]) for a, b in zip(rows, cols)}
        for r, j in pairs.items():
            v = int(version[j, r])
            c = float(corr[j, r, v])
            passes = {"shift": c > shift95[r, v], "gradcam": c > cam[r, v],
                      "random": None if rand95 is None else bool(c > rand95[r, v])}
            matched[r] = passes["shift"] and passes["gradcam"] and passes["random"] is not False
            regions[r].update(roi=f"RoI {j + 1}", version=VERSIONS[v], corr=c, score=float(score[j, r]),
                              shift95=float(shift95[r, v]), gradcam=float(cam[r, v]),
                              rand95=None if rand95 is None else float(rand95[r, v]),
                              passes=passes, matched=bool(matched[r]),
                              stability=None if setting.stability is None else float(setting.stability[j]))
        hits, best_structure = [], {}
        for j in cand:
            r = int(np.argmax(score[j]))
            v = int(version[j, r])
            best_structure[f"RoI {j + 1}"] = {"structure": truth.names[r], "version": VERSIONS[v],
                                              "corr": float(corr[j, r, v]), "score": float(score[j, r]),
                                              "cv_r2": float(setting.cv_r2[j])}
            if truth.decoy[r] and corr[j, r, v] > shift95[r, v]:
                hits.append(f"RoI {j + 1}")
        m = [r for r in planted if matched[r]]
        result.update(
            matched=int(matched[planted].sum()), recovered=int((matched & used)[planted].sum()),
            decoy_hits=len(hits), decoy_rois=hits, candidate_best=best_structure,
            median_ceiling=float(np.median([regions[r]["score"] for r in m])) if m else None,
            median_stability=(float(np.median([regions[r]["stability"] for r in m]))
                              if m and setting.stability is not None else None),
            shift95_decoy=[float(shift95[d, 0]) for d in decoys])
        conf = None if setting.confirm is None or not len(cand) else setting.confirm[cand]
        if conf is not None and np.all(np.isfinite(conf)):
            result.update(confirm_min=float(conf.min()), confirm_median=float(np.median(conf)))
        else:
            result.update(confirm_min=None, confirm_median=None)
    result["lin_mae"], result["net_mae"] = setting.lin_mae, setting.net_mae
    result["criteria"] = _criteria(result, rand95 is not None, cand)
    result["goal"] = all(v is True for v in result["criteria"].values())
    result["seconds"] = time.perf_counter() - t0
    return result


def _criteria(res: dict, have_random: bool, cand) -> dict:
    lin, net = res["lin_mae"], res["net_mae"]
    known = cand is not None
    confirmed = None
    if known and len(cand) and res["confirm_min"] is not None:
        confirmed = res["confirm_min"] >= CONFIRM_SHARE
    return {
        "recover": (res["recovered"] == res["used"]) if known and res["used"] and have_random else None,
        "no_decoy": (res["decoy_hits"] == 0) if known else None,
        "ceiling": (res["median_ceiling"] >= CEILING_GOAL) if res.get("median_ceiling") is not None else None,
        "linear": (lin <= (1 + MAE_MARGIN) * net) if lin is not None and net is not None and np.isfinite(net)
        else None,
        "occlusion": confirmed,
    }


# -- printing -----------------------------------------------------------------------------


def table_row(res: dict) -> dict:
    cand = res["candidates"]
    return {
        "run": res["run"], "setting": res["setting"],
        "cand/RoIs": f"{'n/a' if cand is None else len(cand)}/{res['rois']}",
        "used": f"{res['used']}/{res['n_planted']}",
        "recovered": "n/a" if res["recovered"] is None else f"{res['recovered']}/{res['used']}",
        "decoy hits": "n/a" if res["decoy_hits"] is None else str(res["decoy_hits"]),
        "med b/c": _fmt(res["median_ceiling"]), "stab": _fmt(res["median_stability"]),
        "occl min/med": (f"{_fmt(res['confirm_min'])}/{_fmt(res['confirm_median'])}"
                         if res["confirm_min"] is not None else "n/a"),
        "lin/net MAE": f"{_fmt(res['lin_mae'])}/{_fmt(res['net_mae'])}",
        **{c: _yes(res["criteria"][c]) for c in CRITERIA},
        "goal": _yes(res["goal"]),
    }


def print_detail(res: dict) -> None:
    print(f"\n{res['run']} / {res['setting']}: candidates {res['candidates'] if res['candidates'] is not None else 'n/a'}")
    rows = []
    for reg in res["regions"]:
        c = reg["ceiling"]
        rows.append({
            "region": reg["region"], "used": _fmt(reg["used_share"]),
            "ceil b/l/r": "/".join(_fmt(c[v]) for v in VERSIONS),
            "best any": f"{reg['best_any_roi']} {_fmt(reg['best_any_score'])}",
            "match": reg.get("roi", "-"), "side": reg.get("version", "-"), "r": _fmt(reg.get("corr")),
            "r/ceil": _fmt(reg.get("score")), "shift95": _fmt(reg.get("shift95")),
            "rand95": _fmt(reg.get("rand95")), "gradcam": _fmt(reg.get("gradcam")),
            "stab": _fmt(reg.get("stability")), "matched": _yes(reg.get("matched")) if "roi" in reg else "-",
            **({"best any -> consensus": f"{reg['consensus_roi']} {_fmt(reg['consensus_corr'])}"}
               if "consensus_roi" in reg else {}),
        })
    print(pd.DataFrame(rows).to_string(index=False))
    for roi, b in (res.get("candidate_best") or {}).items():
        print(f"  {roi} (cv_r2 {b['cv_r2']:.2f}): best structure {b['structure']} ({b['version']}), "
              f"r {b['corr']:.2f}, r/ceil {b['score']:.2f}" + ("  DECOY HIT" if roi in res["decoy_rois"] else ""))


def _summary(res: dict, quick: bool) -> dict:
    keys = ("run", "setting", "rois", "used", "matched", "recovered", "decoy_hits", "median_ceiling",
            "median_stability", "confirm_min", "confirm_median", "lin_mae", "net_mae", "goal")
    out = {k: res.get(k) for k in keys}
    out["candidates"] = None if res["candidates"] is None else len(res["candidates"])
    out.update({f"c_{k}": v for k, v in res["criteria"].items()})
    out["quick"] = quick
    return _jsonable({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()})


def parse_run(text: str) -> tuple[str, Path, Path]:
    name, eq, paths = text.partition("=")
    bids, colon, out = paths.partition(":")
    if not eq or not colon or not name or not bids or not out:
        raise argparse.ArgumentTypeError(f"--run takes NAME=BIDS_DIR:OUTPUT_DIR; got {text!r}")
    return name, Path(bids), Path(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", type=parse_run, required=True, metavar="NAME=BIDS:OUT",
                        help="a group run and its simulated BIDS dataset (repeat for several)")
    parser.add_argument("--random-networks", type=int, default=None, metavar="N",
                        help=f"draws of the randomised-network null (default {RANDOM_NETWORKS}; 0: skip)")
    parser.add_argument("--shift-draws", type=int, default=None,
                        help=f"draws of the shift null (default {SHIFT_DRAWS}, at least {MIN_SHIFT_DRAWS})")
    parser.add_argument("--blobs", type=int, default=20, help="random blobs per volume bin (occlusion)")
    parser.add_argument("--single-occlusion", action="store_true",
                        help="run each single network's occlusion test on its own candidate RoIs")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_SHIFT_DRAWS} shift draws and {QUICK_RANDOM_NETWORKS} random networks "
                        "(for tests; not a benchmark result)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shift null")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache folder (default OUTPUT_DIR/.work/group/bench_explanations per run)")
    parser.add_argument("--json", type=Path, help="save every number here")
    parser.add_argument("-v", "--verbose", action="store_true", help="per-region detail")
    args = parser.parse_args(argv)
    shift_draws = args.shift_draws or (QUICK_SHIFT_DRAWS if args.quick else SHIFT_DRAWS)
    n_random = args.random_networks if args.random_networks is not None else (
        QUICK_RANDOM_NETWORKS if args.quick else RANDOM_NETWORKS)
    if shift_draws < MIN_SHIFT_DRAWS and not args.quick:
        parser.error(f"--shift-draws must be at least {MIN_SHIFT_DRAWS} (or use --quick)")
    if 0 < n_random < RANDOM_NETWORKS and not args.quick:
        parser.error(f"--random-networks must be 0 or at least {RANDOM_NETWORKS} (or use --quick)")
    if args.blobs < 20:
        parser.error("--blobs must be at least 20 (the occlusion test's minimum)")
    names = [r[0] for r in args.run]
    if len(set(names)) != len(names):
        parser.error("--run names must differ")

    results, report = [], {"rules": {
        "shift_mm": SHIFT_MM, "shift_draws": shift_draws, "random_networks": n_random,
        "percentile": NULL_PERCENTILE, "used_share": USED_SHARE, "robust_stability": _robust(),
        "related_r2": _related_r2(), "confirm_share": CONFIRM_SHARE, "ceiling_goal": CEILING_GOAL,
        "mae_margin": MAE_MARGIN, "blobs": args.blobs, "quick": args.quick}, "runs": {}}
    for name, bids, out in args.run:
        cache = None if args.cache is None else args.cache / name
        run = load_run(name, bids, out, args.device, cache)
        truth = load_truth(bids, run.resolution)
        if not np.allclose(truth.affine, run.affine):
            raise SystemExit(f"{name}: the planted regions and the RoIs are on different grids")
        ceil = ceilings(run, truth)
        control = positive_control(run, truth, args.blobs)
        rand = random_network_null(run, truth, n_random) if n_random else None
        rand95 = None if rand is None else np.nanpercentile(rand, NULL_PERCENTILE, axis=0)
        settings = settings_of(run, control, args.single_occlusion, args.blobs)
        run_res = []
        for s in settings:
            res = evaluate_setting(run, truth, s, ceil, rand95, control, shift_draws, args.seed)
            run.costs[f"{s.name}_evaluate_s"] = res["seconds"]
            run_res.append(res)
        results += run_res
        print(f"{name}: {run.layer} {'x'.join(map(str, run.geometry.feature_shape))} "
              f"(stride {run.geometry.stride[0] * run.resolution:g} mm), tensor {run.tensor}, ranks "
              f"{run.ranks}, lambda {run.l1:.3g}, constraints {run.constraints}, {run.n_networks} "
              f"network(s), test subjects {len(run.rows('test'))}; cost "
              + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in run.costs.items()),
              flush=True)
        report["runs"][name] = {
            "bids": str(bids), "output": str(out), "layer": run.layer, "tensor": run.tensor,
            "ranks": run.ranks, "lambda": run.l1, "constraints": run.constraints,
            "networks": run.n_networks, "feature_shape": run.geometry.feature_shape,
            "ceilings": {n: dict(zip(VERSIONS, c)) for n, c in zip(truth.names, ceil)},
            "positive_control": control.to_dict(orient="records"),
            "random_network_best": None if rand is None else rand.tolist(),
            "random_network_95": None if rand95 is None else {
                n: dict(zip(VERSIONS, c)) for n, c in zip(truth.names, rand95)},
            "costs": run.costs, "settings": run_res}
        del run
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 40)
    print()
    if args.quick:
        print("quick: nulls from fewer draws than the rules ask; not a benchmark result")
    print(pd.DataFrame([table_row(r) for r in results]).to_string(index=False))
    if args.verbose:
        for r in results:
            print_detail(r)
    print()
    for r in results:
        print("summary " + json.dumps(_summary(r, args.quick), separators=(",", ":")))
    if args.json:
        args.json.write_text(json.dumps(_jsonable(report), indent=1))
    return 0


# -- helpers other benchmarks import ------------------------------------------------------


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"expected one {pattern} in {folder}; found {len(found)}")
    return found[0]


def _best(maps, target, within):
    from brainage_xai.explain.rois import spatial_correlation

    corrs = [spatial_correlation(m, target, within) for m in maps]
    k = int(np.argmax(corrs))
    return corrs[k], k


def _nulls(u3, geometry, masks, brain, rng, n_perm):
    """Per region: 95th percentiles of the best correlation with surrogate RoIs (the
    diagnostic nulls of ``bench_ensemble.py``; this benchmark uses :func:`shift_null`).

    ``permute`` shuffles the feature voxels of each column of U3 within the brain;
    ``shift`` rolls each RoI's feature map by a random offset per axis (wrapping).
    """
    from brainage_xai.explain.rois import columns_to_feature_maps, downsample, upsample

    idx = np.flatnonzero(downsample(brain.astype(float), geometry).ravel() > 0.5)
    maps = columns_to_feature_maps(u3, geometry.feature_shape)
    best = {"permute": np.zeros((n_perm, len(masks))), "shift": np.zeros((n_perm, len(masks)))}
    for p in range(n_perm):
        perm = u3.copy()
        for r in range(u3.shape[1]):
            perm[idx, r] = u3[rng.permutation(idx), r]
        shifted = np.stack([
            np.roll(m, [int(rng.integers(n)) for n in geometry.feature_shape], axis=(0, 1, 2))
            for m in maps])
        for kind, fmaps in (("permute", columns_to_feature_maps(perm, geometry.feature_shape)),
                            ("shift", shifted)):
            up = np.clip(upsample(fmaps, geometry), 0, None) * brain
            for k, mask in enumerate(masks):
                best[kind][p, k] = _best(up, mask, brain)[0]
    return {k: np.percentile(v, 95, axis=0) for k, v in best.items()}


def input_grid_score(maps, masks, brain, rng, n_perm):
    """Maps on the input grid (back-projected RoIs): each region's correlation with each
    map ``(regions, maps)``, and per region the 95th percentile of the best correlation
    with the maps' voxels shuffled within the brain (their ``perm95``)."""
    from brainage_xai.explain.rois import spatial_correlation

    corr = np.array([[spatial_correlation(m, mask, brain) for m in maps] for mask in masks])
    inside = [m[brain] for m in maps]
    null = np.zeros((n_perm, len(masks)))
    for p in range(n_perm):
        perm = np.zeros_like(maps)
        for r, v in enumerate(inside):
            perm[r][brain] = rng.permutation(v)
        for k, mask in enumerate(masks):
            null[p, k] = max(spatial_correlation(m, mask, brain) for m in perm)
    return corr, np.percentile(null, 95, axis=0)


def run_rois(group: Path):
    """The run's RoI image, its feature geometry and the components' JSON sidecar."""
    import nibabel as nib

    from brainage_xai.explain import rois

    comps_path = _one(group, "*_desc-rois_components.nii.gz")
    sidecar = json.loads(comps_path.with_name(comps_path.name.replace(".nii.gz", ".json"))
                         .read_text())
    g = sidecar["FeatureGeometry"]
    geo = rois.FeatureGeometry(tuple(g["InputShape"]), tuple(g["FeatureShape"]),
                               tuple(g["Stride"]), tuple(g["Offset"]))
    return nib.load(str(comps_path)), geo, sidecar


def _inputs(out: Path, group: Path, resolution: float, device: str):
    """The run's network, its standardised inputs ``(n, X, Y, Z)``, splits and targets."""
    from brainage_xai.bids.derivatives import collect_preprocessed
    from brainage_xai.model.data import load_maps, standardise_inputs
    from brainage_xai.model.io import load_model
    from brainage_xai.model.training import resolve_device
    from brainage_xai.utils.io import read_tsv

    dev = resolve_device(device)
    model, meta = load_model(group / "model.safetensors", device=str(dev))
    model.eval()
    found = collect_preprocessed(out, meta.get("map", "volume"), resolution=resolution)
    split = read_tsv(group / "split.tsv").set_index("participant_id")["split"]
    preds = read_tsv(group / "predictions.tsv").set_index("participant_id")
    subjects = ["sub-" + s for s, _ in found]
    which = split.loc[subjects].to_numpy()
    x = standardise_inputs(load_maps([p for _, p in found])[0], meta["normalisation"]).numpy()[:, 0]
    y = preds.loc[subjects, meta["targets"][0]].to_numpy(float)
    return dev, model, meta, x, which, y


def _occlude_planted(inputs, masks, names, brain, resolution: float, draws: int, seed: int):
    """The occlusion test of ``masks`` with the run's network (one predictor)."""
    from brainage_xai.explain import occlusion
    from brainage_xai.model.training import resolve_precision

    dev, model, meta, x, which, y = inputs
    norm = meta["normalisation"]
    predict = occlusion.torch_predictor(
        model, device=dev, batch_size=16, scale=float(norm["target_std"][0]),
        shift=float(norm["target_mean"][0]), dtype=resolve_precision("auto", dev))
    zooms = (float(resolution),) * 3
    table, _ = occlusion.occlusion_test(
        predict, x[which == "test"], y[which == "test"], np.stack(masks),
        x[which == "train"].mean(axis=0), brain, n_random=draws, seed=seed, zooms=zooms,
        roi_names=names)
    return table


def print_result(title: str, tab: pd.DataFrame, summary: dict, key_width: int = 32) -> None:
    """A table, then a summary one line per entry."""
    pd.set_option("display.width", 220)
    pd.set_option("display.max_columns", 30)
    print(title)
    print(tab.to_string(index=False))
    print()
    for k, v in summary.items():
        print(f"{k:{key_width}s} {v}")


if __name__ == "__main__":
    sys.exit(main())
