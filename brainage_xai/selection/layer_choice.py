"""Which layer and tensor to decompose: the finest whose decomposition carries the prediction.

A decomposition explains the network only if a linear model on its loadings predicts the
target about as well as the network does. Which layer (and which tensor) achieves that
depends on the cohort: on the simulated cohort the finest layer's deviations do, on a
multi-site cohort whose sites differ in intensity and smoothness they may capture the
sites instead. So the candidates are probed on the validation subjects, finest first, and
the first whose linear model reaches the network's validation MAE within
:data:`MARGIN` is chosen; when none does, the one that comes closest is used and the
report says that the RoIs do not carry the prediction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .linear_model import fit_final
from .splits import Splits

LOG = logging.getLogger("brainage_xai.selection")

#: A candidate carries the prediction when its linear model's validation MAE is at most
#: this much above the network's (0.2: within 20 %).
MARGIN = 0.2
#: The probe's fit: few iterations, loose tolerance (a ranking, not the final model).
PROBE_ITERATIONS, PROBE_TOL = 100, 1e-5

LAYER_CHOICE_SIDECAR = {
    "layer": {"Description": "Candidate layer, finest first"},
    "tensor": {"Description": "What was decomposed (deviations, relevance, activations)"},
    "rank": {"Description": "R1 = R2 of the probe's decomposition"},
    "val_mae": {"Description": "Validation MAE of the linear model on the probe's loadings "
                "(the target's units)"},
    "network_val_mae": {"Description": "Validation MAE of the network (the target's units)"},
    "ratio": {"Description": "val_mae / network_val_mae"},
    "carries": {"Description": f"ratio at most 1 + {MARGIN}: the decomposition carries the prediction"},
    "status": {"Description": "probed, chosen, or skipped (and why)"},
}


@dataclass
class Candidate:
    layer: str
    tensor: str


def probe(A: Splits, y: Splits, rank: int, *, constraints: str = "nonneg", random_state: int = 0) -> float:
    """Validation MAE (the units of ``y``) of the linear model on a rank-``rank`` decomposition."""
    final = fit_final(A, y, (rank, rank), 0.0, constraints=constraints, n_iter_max=PROBE_ITERATIONS,
                      tol=PROBE_TOL, random_state=random_state)
    return float(final.metrics["val"]["linear_model_on_decomposition"]["mae"])


def choose(rows: list[dict]) -> tuple[int, bool]:
    """The chosen row of a probe table (the first that carries, else the lowest ratio)."""
    probed = [i for i, r in enumerate(rows) if np.isfinite(r.get("ratio", np.nan))]
    if not probed:
        raise ValueError("no candidate layer could be probed")
    carrying = [i for i in probed if rows[i]["ratio"] <= 1 + MARGIN]
    if carrying:
        return carrying[0], True
    return min(probed, key=lambda i: rows[i]["ratio"]), False


def choose_layer(candidates: list[Candidate], tensors, y: Splits, network_val_mae: float, rank: int,
                 *, scale: float = 1.0, constraints: str = "nonneg", random_state: int = 0) -> tuple[pd.DataFrame, int, bool]:
    """Probe ``candidates`` finest first until one carries the prediction.

    Parameters
    ----------
    candidates : list of Candidate
        In the order tried.
    tensors : callable
        ``tensors(candidate)`` returns its ``Splits`` of tensors, or a string saying why it
        is skipped (too large, too few channels for ``rank``).
    y : Splits
        The (standardised) target per split.
    network_val_mae : float
        The network's validation MAE, in the target's units.
    rank : int
        R1 = R2 of the probe.
    scale : float
        Standardised units to the target's (its training standard deviation).

    Returns
    -------
    table : DataFrame
        One row per candidate (:data:`LAYER_CHOICE_SIDECAR`).
    chosen : int
        Its row.
    carries : bool
        Whether the chosen candidate reaches the margin.
    """
    rows = []
    for cand in candidates:
        row = {"layer": cand.layer, "tensor": cand.tensor, "rank": rank, "val_mae": np.nan,
               "network_val_mae": network_val_mae, "ratio": np.nan, "carries": False}
        if any(r["carries"] for r in rows):
            rows.append({**row, "status": "not probed (a finer candidate carries the prediction)"})
            continue
        A = tensors(cand)
        if isinstance(A, str):
            rows.append({**row, "status": f"skipped: {A}"})
            continue
        mae = probe(A, y, rank, constraints=constraints, random_state=random_state) * scale
        del A
        ratio = mae / network_val_mae if network_val_mae > 0 else np.inf
        rows.append({**row, "val_mae": mae, "ratio": ratio, "carries": bool(ratio <= 1 + MARGIN),
                     "status": "probed"})
        LOG.info("layer choice: %s %s, validation MAE %.3f (network %.3f)", cand.layer, cand.tensor,
                 mae, network_val_mae)
    chosen, carries = choose(rows)
    rows[chosen]["status"] = "chosen" if carries else "chosen (closest; none carries the prediction)"
    return pd.DataFrame(rows), chosen, carries
