"""Training the group level's network: inputs and targets standardised, K members, tuning.

:func:`train_networks` is what the model stage calls: it standardises the maps with the
training subjects' global mean and spread and each target with its training mean and
spread, optionally tunes the SGD settings (TPE, :func:`~brainage_xai.model.training.tune`),
then trains one network per seed on the same split (an ensemble when there are several,
:class:`~brainage_xai.model.network.EnsembleNet`: the mean of their outputs). Each member
has its own checkpoint, so an interrupted ensemble resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import MapDataset, dataset_normalisation, input_normalisation, standardise_inputs
from .network import PAPER_DEPTHS, PAPER_WIDTHS, EnsembleNet, build_network
from .training import TrainSettings, fit, resolve_precision, tune

LOGGER = logging.getLogger("brainage_xai.training")

#: Training epochs unless ``--epochs`` says otherwise.
DEFAULT_EPOCHS = 20


def architecture(n_outputs: int, widths=None, depths=None, ensemble: int = 1) -> dict:
    """The network's architecture record (``model.json``): the paper's unless given."""
    out = {
        "name": "PreActResNet3d",
        "widths": list(widths or PAPER_WIDTHS),
        "depths": list(depths or PAPER_DEPTHS),
        "n_outputs": n_outputs,
        "in_channels": 1,
    }
    if ensemble > 1:  # absent for one network, so its stage key is unchanged
        out["ensemble"] = int(ensemble)
    return out


def settings(epochs: int | None, seed: int) -> TrainSettings:
    """The training settings of a run (``--epochs``, ``--random-seed``)."""
    return TrainSettings(epochs=epochs or DEFAULT_EPOCHS, seed=seed)


def target_normalisation(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per target: the training mean and standard deviation (1 where it is 0)."""
    mean, std = y.mean(axis=0), y.std(axis=0)
    std[std == 0] = 1.0
    return mean, std


@dataclass
class Trained:
    """What :func:`train_networks` returns."""

    model: torch.nn.Module
    normalisation: dict
    training: dict


def _summary(result, seed=None) -> dict:
    return {
        **({} if seed is None else {"seed": seed}),
        "best_epoch": result.best_epoch,
        "best_val_mae": result.history[result.best_epoch - 1]["val_mae"] if result.history else None,
        "stopped_early": result.stopped_early,
        "history": result.history,
    }


def train_networks(maps: np.ndarray, y: np.ndarray, train, val, arch: dict,
                   train_settings: TrainSettings, *, run_dir: Path, n_trials: int = 0,
                   device: torch.device, quiet: bool = False) -> Trained:
    """Train the network (``arch["ensemble"]`` members, seeds ``seed``, ``seed + 1``, ...).

    Parameters
    ----------
    maps : ndarray, shape (n, 1, *grid), or MapDataset
        Every subject's preprocessed map: in memory, or on disk and read one batch at a
        time (training memory then does not grow with the cohort). Both give the same
        normalisation and, on the CPU, the same weights to the bit.
    y : ndarray, shape (n, targets)
        Every subject's targets.
    train, val : array of int
        Rows of the training and validation subjects.
    arch : dict
        :func:`architecture`.
    train_settings : TrainSettings
        Its seed is the first member's.
    run_dir : Path
        Checkpoints (one per member) and the tuning database.
    n_trials : int
        TPE trials before training (0: none).

    Returns
    -------
    Trained
        The network (an :class:`EnsembleNet` for several members, on the CPU), the input
        and target normalisation and the training record for ``model.json``.
    """
    on_disk = isinstance(maps, MapDataset)
    norm = dataset_normalisation(maps.subset(train)) if on_disk else input_normalisation(maps[train])
    y_mean, y_std = target_normalisation(y[train])
    norm.update(target_mean=y_mean.tolist(), target_std=y_std.tolist())
    y_t = torch.from_numpy(((y - y_mean) / y_std).astype(np.float32))
    tr, va = torch.from_numpy(np.asarray(train)), torch.from_numpy(np.asarray(val))
    if on_disk:
        x = maps.standardised(norm)
        x_tr, x_va = x.subset(train), x.subset(val)
    else:
        x = standardise_inputs(maps, norm)
        x_tr, x_va = x[tr], x[va]
    single = {k: v for k, v in arch.items() if k != "ensemble"}
    n_members = int(arch.get("ensemble", 1))
    seed0 = train_settings.seed

    def build(seed=seed0):
        torch.manual_seed(seed)
        return build_network(single)

    tuning = None
    if n_trials:
        LOGGER.info("tuning: %d TPE trials of %d epochs", n_trials, train_settings.epochs)
        tuning = tune(build, x_tr, y_t[tr], x_va, y_t[va], train_settings, n_trials,
                      storage=Path(run_dir) / "tune.db", device=device, quiet=quiet)
        train_settings = dataclasses.replace(train_settings, **tuning["best_params"])
        LOGGER.info("tuning: best %s", tuning["best_params"])
    LOGGER.info(
        "training: %d/%d subjects, up to %d epochs on %s%s", len(train), len(val), train_settings.epochs,
        device, f", {n_members} networks (seeds {seed0}-{seed0 + n_members - 1})" if n_members > 1 else "",
    )  # fmt: skip
    members, results = [], []
    for i in range(n_members):
        # Member i: its own seed (initialisation and batch order), the same split and
        # settings; each has its own checkpoint, so an interrupted ensemble resumes.
        seed = seed0 + i
        member = build(seed)
        result = fit(
            member, x_tr, y_t[tr], x_va, y_t[va], dataclasses.replace(train_settings, seed=seed),
            y_scale=y_std, device=device, quiet=quiet,
            checkpoint=Path(run_dir) / ("checkpoint.safetensors" if i == 0 else f"checkpoint-{i + 1}.safetensors"),
        )  # fmt: skip
        members.append(member.cpu())
        results.append(result)
        if n_members > 1:
            LOGGER.info("training: network %d/%d (seed %d), best epoch %d", i + 1, n_members, seed,
                        result.best_epoch)
    model = members[0] if n_members == 1 else EnsembleNet(members)
    precision = resolve_precision(train_settings.precision, device)
    training = {
        "settings": train_settings.to_dict(),
        "device": str(device),
        "precision": str(precision).replace("torch.", "") if precision else "float32",
        **_summary(results[0]),
        "tuning": tuning,
    }
    if n_members > 1:
        # The top-level curve is the first network's; every member's is listed.
        training["members"] = [_summary(r, seed0 + i) for i, r in enumerate(results)]
    return Trained(model, norm, training)
