"""Figures of the selection stage (matplotlib, no display needed).

``matplotlib.figure.Figure`` is used directly rather than ``pyplot`` so that no GUI
backend is ever touched and figures are freed as soon as they are saved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..utils.io import atomic_path

__all__ = ["plot_scree", "plot_rank_sweep", "plot_lambda_sweep"]

_MODE_NAMES = {1: "mode 1 (subjects)", 2: "mode 2 (channels)", 3: "mode 3 (voxels)"}


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


def plot_scree(scree: pd.DataFrame, path, choice: dict | None = None) -> Path:
    """Singular values per unfolding on a log scale, the chosen ranks marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.4), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, mode in zip(axes, (1, 2, 3)):
        sub = scree.loc[scree["mode"] == mode].sort_values("index")
        ax.semilogy(sub["index"], sub["singular_value"], "o-", ms=3)
        ax.set_title(_MODE_NAMES[mode], fontsize=10)
        ax.set_xlabel("index")
        if choice is not None:
            r = choice["R2"] if mode == 2 else choice["R1"]
            ax.axvline(r + 0.5, color="C3", ls="--", lw=1, label=f"{'R2' if mode == 2 else 'R1'} = {r}")
            ax.legend(fontsize=8)
    axes[0].set_ylabel("singular value")
    fig.suptitle("Scree of the training activations", fontsize=11)
    return _save(fig, path)


def plot_rank_sweep(sweep: pd.DataFrame, path, choice: dict | None = None) -> Path:
    """Validation error heat map over (R1, R2) and error curves, the chosen rank marked."""
    from matplotlib.figure import Figure

    r1s = np.sort(sweep["R1"].unique())
    r2s = np.sort(sweep["R2"].unique())
    grid = np.full((r1s.size, r2s.size), np.nan)
    pos1 = {r: i for i, r in enumerate(r1s)}
    pos2 = {r: j for j, r in enumerate(r2s)}
    for rec in sweep.itertuples():
        grid[pos1[rec.R1], pos2[rec.R2]] = rec.val_error

    fig = Figure(figsize=(13, 4), layout="constrained")
    ax0, ax1, ax2 = fig.subplots(1, 3)
    im = ax0.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    ax0.set_xticks(range(r2s.size), [str(r) for r in r2s], fontsize=7)
    ax0.set_yticks(range(r1s.size), [str(r) for r in r1s], fontsize=7)
    ax0.set_xlabel("R2")
    ax0.set_ylabel("R1")
    ax0.set_title("validation error (R2 ≥ R1: shared optimum)", fontsize=9)
    fig.colorbar(im, ax=ax0, label="relative error")
    if choice is not None and choice["R1"] in pos1 and choice["R2"] in pos2:
        ax0.plot(pos2[choice["R2"]], pos1[choice["R1"]], "r*", ms=12)

    best = sweep.loc[sweep.groupby("R1")["val_error"].idxmin()]
    ax1.plot(best["R1"], best["train_error"], "o-", ms=3, label="train")
    ax1.plot(best["R1"], best["val_error"], "s-", ms=3, label="validation")
    ax1.set_xlabel("R1 (best R2)")
    ax1.set_ylabel("relative error")
    if choice is not None:
        r1 = choice["R1"]
        ax1.axvline(r1, color="C3", ls="--", lw=1, label=f"R1 = {r1}")
        at = sweep.loc[sweep["R1"] == r1].sort_values("R2")
        ax2.plot(at["R2"], at["train_error"], "o-", ms=3, label="train")
        ax2.plot(at["R2"], at["val_error"], "s-", ms=3, label="validation")
        ax2.axvline(choice["R2"], color="C3", ls="--", lw=1, label=f"R2 = {choice['R2']}")
        ax2.set_xlabel(f"R2 at R1 = {r1}")
        ax2.set_ylabel("relative error")
        handles, labels = ax2.get_legend_handles_labels()
        if "val_mae" in at and at["val_mae"].notna().all():
            # R2 is chosen among equally good candidates by this curve (choose_ranks).
            mae_ax = ax2.twinx()
            (line,) = mae_ax.plot(at["R2"], at["val_mae"], "^:", color="C2", ms=3)
            mae_ax.set_ylabel("validation MAE, linear model")
            handles.append(line)
            labels.append("validation MAE")
        ax2.legend(handles, labels, fontsize=8)
    else:
        ax2.set_axis_off()
    ax1.legend(fontsize=8)
    return _save(fig, path)


def plot_lambda_sweep(table: pd.DataFrame, path, choice: dict | None = None) -> Path:
    """Train/validation MAE and U3 sparsity against λ (symlog x so that λ = 0 shows)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.subplots()
    t = table.sort_values("lambda")
    ax.plot(t["lambda"], t["train_mae"], "o-", ms=3, label="train MAE")
    ax.plot(t["lambda"], t["val_mae"], "s-", ms=3, label="validation MAE")
    positive = t["lambda"][t["lambda"] > 0]
    ax.set_xscale("symlog", linthresh=float(positive.min()) if len(positive) else 1.0)
    ax.set_xlabel("λ (ℓ1 on U3)")
    ax.set_ylabel("MAE")
    ax2 = ax.twinx()
    ax2.plot(t["lambda"], t["sparsity"], "^:", color="C2", ms=3, label="U3 sparsity")
    ax2.set_ylabel("fraction of zeros in U3")
    ax2.set_ylim(0, 1)
    if choice is not None:
        ax.axvline(choice["lambda"], color="C3", ls="--", lw=1, label=f"λ = {choice['lambda']:.3g}")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8)
    return _save(fig, path)
