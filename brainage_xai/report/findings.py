"""What the report says of each RoI: the readings that need no ground truth, in words.

For a single fit, :func:`roi_findings` combines whether an RoI's loadings follow the
target (``rois.tsv``) with whether occluding it hurts the network (``occlusion.tsv``); for
a consensus, :func:`consensus_findings` adds the RoI's stability across decompositions and
the share of the networks that rely on it. :func:`findings_sentence` accounts for every RoI
in one sentence, grouped by reading.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _true(value) -> bool:
    """A boolean cell as written to and read back from a TSV (``True``/``true``/bool)."""
    return str(value).strip().lower() == "true"


#: What each combination of the two readings makes an RoI, for the summary.
READINGS = {
    (True, True): "follows {target}; the network relies on it",
    (True, False): "follows {target}; the network relies on it no more than on random blobs",
    (False, True): "mostly other variation, yet the network relies on it",
    (False, False): "mostly other variation",
}


def roi_findings(rois_table=None, occlusion_table=None, *, target: str = "age",
                 unit: str = "years") -> pd.DataFrame | None:
    """One row per RoI: what the two readings that need no ground truth say of it.

    Whether the RoI's loadings follow the target (``cv_r2`` and ``target_related`` of
    ``rois.tsv``) and whether occluding it raises the network's test MAE more than the 95th
    percentile of random blobs of its volume (``occlusion.tsv``). An RoI for which both say
    yes is what the method set out to find. Columns: ``RoI``, ``region`` (atlas region),
    ``loading comes from`` (the atlas region of its back-projection, when ``rois.tsv``
    has it), ``<target> share`` (percent of the loadings' variance, cross-validated),
    ``occlusion`` (the RoI's MAE increase against the random blobs' 95th percentile) and
    ``reading``.
    ``None`` when neither table is given.
    """
    if rois_table is None and occlusion_table is None:
        return None
    rois = {} if rois_table is None else {str(r["name"]): r for _, r in pd.DataFrame(rois_table).iterrows()}
    occ = {} if occlusion_table is None else {str(r["roi"]): r for _, r in pd.DataFrame(occlusion_table).iterrows()}
    rows = []
    for name in list(dict.fromkeys([*rois, *occ])):
        roi, o = rois.get(name), occ.get(name)
        related = None if roi is None or "target_related" not in roi else _true(roi["target_related"])
        empty = o is not None and not np.isfinite(float(o["mae_increase"]))
        relied = None if o is None or empty else _true(o["above_null"])
        if empty:
            reading = "empty after thresholding"
        elif related is not None and relied is not None:
            reading = READINGS[(related, relied)]
        elif related is not None:  # no occlusion test
            reading = "follows {target}" if related else "mostly other variation"
        elif relied is not None:  # a rois.tsv written before cv_r2
            reading = "the network relies on it" if relied else "the network relies on it no more than on random blobs"
        else:
            reading = "n/a"
        back = {} if roi is None or "input_region" not in roi else {
            "loading comes from": "n/a" if pd.isna(roi["input_region"]) else str(roi["input_region"])}
        rows.append({
            "RoI": name,
            "region": "n/a" if roi is None or "region" not in roi else str(roi["region"]),
            **back,
            f"{target} share": ("n/a" if roi is None or "cv_r2" not in roi or pd.isna(roi["cv_r2"])
                                else f"{100 * float(roi['cv_r2']):.0f} %"),
            "occlusion": ("n/a" if o is None or empty else
                          f"{float(o['mae_increase']):.2f} vs {float(o['null_p95']):.2f} {unit}"),
            "reading": reading.format(target=target),
        })
    return pd.DataFrame(rows)


#: What each consensus RoI is, from its stability, its relation to the target and the
#: share of the networks that rely on it (more than half: relied on).
CONSENSUS_READINGS = {
    "robust": "robust, follows {target}, and the networks rely on it",
    "not needed": "robust and follows {target}, but the networks rely on it no more than on random blobs",
    "other": "robust, but mostly other variation",
    "unstable": "unstable: it comes back in too few decompositions",
}


def consensus_findings(rois_table: pd.DataFrame, *, target: str = "age") -> pd.DataFrame:
    """One row per consensus RoI: where it is, how stable, how much of it is the target, how
    many networks rely on it, and what that makes it (:data:`CONSENSUS_READINGS`)."""
    rows = []
    for _, roi in pd.DataFrame(rois_table).iterrows():
        stability = float(roi["stability"])
        related = _true(roi.get("target_related"))
        share = float(roi["networks_relying"]) / max(float(roi["networks"]), 1.0)
        if not _true(roi["robust"]):  # rois.tsv says so, at the consensus' own threshold
            key = "unstable"
        elif not related:
            key = "other"
        else:
            key = "robust" if share > 0.5 else "not needed"
        back = {} if "input_region" not in roi else {
            "loading comes from": "n/a" if pd.isna(roi["input_region"]) else str(roi["input_region"])}
        rows.append({
            "RoI": str(roi["name"]),
            "region": "n/a" if pd.isna(roi.get("region")) else str(roi["region"]),
            **back,
            "stability": f"{100 * stability:.0f} %",
            f"{target} share": "n/a" if pd.isna(roi.get("cv_r2")) else f"{100 * float(roi['cv_r2']):.0f} %",
            "networks relying": f"{int(roi['networks_relying'])} of {int(roi['networks'])}",
            "reading": CONSENSUS_READINGS[key].format(target=target),
        })
    return pd.DataFrame(rows)


#: How :func:`findings_sentence` says each reading of a group of ``{k}`` RoIs, in its
#: order: (one, several).
CLAUSES = {
    CONSENSUS_READINGS["robust"]: ("{k} is robust, follows {target}, and the networks rely on it",
                                   "{k} are robust, follow {target}, and the networks rely on them"),
    CONSENSUS_READINGS["not needed"]: (
        "{k} is robust and follows {target}, but the networks rely on it no more than on random blobs",
        "{k} are robust and follow {target}, but the networks rely on them no more than on random blobs"),
    CONSENSUS_READINGS["other"]: ("{k} is robust but mostly other variation",
                                  "{k} are robust but mostly other variation"),
    CONSENSUS_READINGS["unstable"]: ("{k} is unstable", "{k} are unstable"),
    READINGS[(True, True)]: ("{k} follows {target} and the network relies on it",
                             "{k} follow {target} and the network relies on them"),
    READINGS[(True, False)]: ("{k} follows {target}, but the network relies on it no more than on random blobs",
                              "{k} follow {target}, but the network relies on them no more than on random blobs"),
    "follows {target}": ("{k} follows {target}", "{k} follow {target}"),
    READINGS[(False, True)]: ("{k} is mostly other variation, yet the network relies on it",
                              "{k} are mostly other variation, yet the network relies on them"),
    READINGS[(False, False)]: ("{k} is mostly other variation", "{k} are mostly other variation"),
    "the network relies on it": ("the network relies on {k}", "the network relies on {k}"),
    "the network relies on it no more than on random blobs": (
        "the network relies on {k} no more than on random blobs",
        "the network relies on {k} no more than on random blobs"),
    "empty after thresholding": ("{k} is empty after thresholding", "{k} are empty after thresholding"),
}


def findings_sentence(findings: pd.DataFrame | None, target: str = "age") -> str | None:
    """One sentence that accounts for every RoI, grouped by reading.

    Where the occlusion test ran it starts with the RoIs that follow the target and that
    the network relies on (their number even when none); the other readings follow in the
    order of :data:`CLAUSES`.
    """
    if findings is None or findings.empty:
        return None
    clauses = {reading.format(target=target): forms for reading, forms in CLAUSES.items()}
    combined = [r.format(target=target) for r in READINGS.values()]
    # Both readings ran when the occlusion test did and some reading combines the two; for
    # a consensus, the robust RoIs that follow the target and are relied on come first.
    if "stability" in findings:
        combined = [CONSENSUS_READINGS["robust"].format(target=target)]
        both_ran = True
    else:
        both_ran = ("occlusion" in findings and bool((findings["occlusion"] != "n/a").any())
                    and bool(findings["reading"].isin(combined).any()))
    parts = []
    for reading in dict.fromkeys([*clauses, *findings["reading"]]):
        names = findings.loc[findings["reading"] == reading, "RoI"].tolist()
        if not names and not (reading == combined[0] and both_ran):
            continue
        k = len(names)
        if reading in clauses:
            said = clauses[reading][k != 1].format(k=k, target=target)
        else:  # a reading this sentence does not know: quoted as it is
            said = f"{k} {'reads' if k == 1 else 'read'} \u201c{reading}\u201d"
        parts.append(said + (f" ({', '.join(names)})" if names else ""))
    return f"Of the {len(findings)} RoIs, " + "; ".join(parts) + "."
