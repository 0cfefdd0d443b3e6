"""Training of the 3D ResNet: split, SGD, schedule, early stopping, resume, tuning.

Everything here works on standardised inputs, an in-memory tensor or the maps on disk
(:class:`~brainage_xai.model.data.MapDataset`, read one batch at a time), and standardised
targets in memory; :mod:`brainage_xai.workflows.group` wires it to the maps on disk.

Determinism: the network is initialised from ``seed``, and every epoch draws its
shuffling and augmentation from a generator seeded by ``(seed, epoch)``, so a run that
resumes from the checkpoint of epoch ``k`` continues exactly as an uninterrupted run
would (on CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..errors import BrainAgeXAIError, DataError, UsageError
from ..utils.io import atomic_path
from .data import batches, spans
from .io import state_tensors
from .network import model_mode

LOGGER = logging.getLogger("brainage_xai.training")

SPLITS = ("train", "val", "test")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainSettings:
    """Hyperparameters of one training run.

    Parameters
    ----------
    epochs : int
        Epoch budget; training may stop earlier (``patience``).
    batch_size, learning_rate, momentum, weight_decay
        SGD settings (the ones ``--tune`` searches).
    warmup_epochs : int
        Linear learning-rate warm-up, then cosine decay to 1 % at the last epoch.
    patience : int
        Stop after this many epochs without a better validation MAE.
    max_shift : int
        Largest random shift (voxels, per axis) of the augmentation; small, so that the
        maps stay MNI-aligned.
    intensity_jitter : float
        Standard deviation of the random gain and offset of the augmentation.
    precision : {"auto", "fp32", "bf16", "fp16"}
        Mixed precision; ``auto`` uses bf16/fp16 on CUDA and bf16 on CPUs with AMX.
    seed : int
    """

    epochs: int = 40
    batch_size: int = 8
    learning_rate: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 2
    patience: int = 12
    max_shift: int = 1
    intensity_jitter: float = 0.05
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UsageError(
                f"'precision' must be one of {list(PRECISIONS)}. {self.precision!r} was provided."
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError(f"epochs and batch size must be positive; got {self.epochs}, {self.batch_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What :func:`fit` returns; the model itself ends with its best weights."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = math.inf
    stopped_early: bool = False


# -- devices and precision --------------------------------------------------------------


def resolve_device(spec: str | None) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N; {spec!r} was provided") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec} asked for CUDA, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N; {spec!r} was provided")
    return device


def _cpu_has_amx() -> bool:
    # bf16 convolutions are ~15x faster than fp32 with AMX tiles, but slower than fp32
    # on CPUs that only emulate bf16, so the flag decides.
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None``: plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise UsageError("fp16 mixed precision needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_amx() else None


def memory_format(device: torch.device, dtype: torch.dtype | None) -> torch.memory_format:
    """Channels-last is ~6x faster for fp32 3D convolutions on CPU and helps cuDNN; with
    AMX bf16 the contiguous layout measured faster (``benchmarks/bench_training.py``)."""
    if device.type == "cpu" and dtype is torch.bfloat16:
        return torch.contiguous_format
    return torch.channels_last_3d


def place(model: nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.memory_format:
    """Move ``model`` to ``device`` in :func:`memory_format` (in place, like
    :meth:`torch.nn.Module.to`) and return that format, for the inputs.

    The weights need the format as much as the inputs do: a model loaded from its
    safetensors file is contiguous, and on a CPU without AMX a float32 forward pass with
    channels-last inputs alone ran at the contiguous speed (``benchmarks/bench_layout.py``).
    """
    device = torch.device(device)
    fmt = memory_format(device, dtype)
    model.to(device).to(memory_format=fmt)
    return fmt


# -- split ------------------------------------------------------------------------------


def stratified_split(
    subjects, values, seed: int = 0, fractions=(0.6, 0.2, 0.2)
) -> pd.DataFrame:
    """Split subjects into train/val/test, stratified by quantile bins of ``values``.

    Parameters
    ----------
    subjects : sequence of str
    values : array-like
        The stratification variable (the first target, usually age).
    seed : int
    fractions : (float, float, float)
        Train, validation and test fractions.

    Returns
    -------
    pandas.DataFrame
        Columns ``participant_id`` and ``split`` in the order of ``subjects``.
    """
    from sklearn.model_selection import train_test_split

    subjects = [str(s) for s in subjects]
    values = np.asarray(values, dtype=float)
    n = len(subjects)
    n_test = int(round(fractions[2] * n))
    n_val = int(round(fractions[1] * n))
    if n < 5 or min(n_test, n_val) < 1 or n - n_test - n_val < 2:
        raise DataError(f"a train/validation/test split needs at least 5 subjects with targets; {n} found")
    # Equal-count bins of the ranks; at most one bin per test subject, so that every bin
    # can give at least one subject to each split.
    n_bins = max(1, min(10, n_val, n_test, n // 10))
    ranks = pd.Series(values).rank(method="first").to_numpy() - 1
    bins = (ranks * n_bins // n).astype(int)
    index = np.arange(n)
    rest, test = train_test_split(
        index, test_size=n_test, stratify=bins if n_bins > 1 else None, random_state=seed
    )
    train, val = train_test_split(
        rest, test_size=n_val, stratify=bins[rest] if n_bins > 1 else None, random_state=seed
    )
    split = np.empty(n, dtype=object)
    split[train], split[val], split[test] = "train", "val", "test"
    return pd.DataFrame({"participant_id": subjects, "split": split})


# -- training ---------------------------------------------------------------------------


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The random stream of one epoch (shuffle and augmentation)."""
    return torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int, jitter: float) -> torch.Tensor:
    """Random integer shifts and intensity gain/offset of a batch ``(n, 1, *grid)``.

    Shifts are circular: the few wrapped voxels at the border are background, and a roll
    keeps every brain voxel.
    """
    n = x.shape[0]
    if max_shift > 0:
        shifts = torch.randint(-max_shift, max_shift + 1, (n, 3), generator=generator).tolist()
        x = torch.stack([torch.roll(x[i], shifts=tuple(s), dims=(1, 2, 3)) for i, s in enumerate(shifts)])
    if jitter > 0:
        shape = (n,) + (1,) * (x.dim() - 1)
        gain = 1.0 + jitter * torch.randn(shape, generator=generator)
        offset = jitter * torch.randn(shape, generator=generator)
        x = x * gain + offset
    return x


def learning_rate_at(settings: TrainSettings, epoch: int) -> float:
    """Linear warm-up from 10 % then cosine decay to 1 % of the learning rate."""
    lr = settings.learning_rate
    warm = min(settings.warmup_epochs, settings.epochs - 1)
    if epoch < warm:
        return lr * (0.1 + 0.9 * epoch / warm)
    span = max(1, settings.epochs - 1 - warm)
    progress = min(1.0, (epoch - warm) / span)
    return lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def predict_batches(
    model: nn.Module,
    x: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Network outputs ``(n, n_outputs)`` for inputs ``(n, 1, *grid)`` (a tensor or a
    :class:`~brainage_xai.model.data.MapDataset`), in evaluation mode.

    The model is moved to ``device`` and put in the inputs' memory format (:func:`place`,
    in place, like :meth:`torch.nn.Module.to`): a model loaded from its safetensors file
    lives on the CPU, contiguous.
    """
    device = torch.device(device)
    fmt = place(model, device, dtype)
    out = []
    with model_mode(model), torch.inference_mode():
        for xb in batches(x, spans(len(x), batch_size), device):
            xb = xb.to(device).contiguous(memory_format=fmt)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out.append(model(xb).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, getattr(model, "n_outputs", 1)), np.float32)


def recalibrate_batchnorm(
    model: nn.Module,
    x: torch.Tensor,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> None:
    """Recompute every batch-norm layer's running statistics on ``x`` ("precise BN").

    The running averages collected during an epoch mix statistics of weights that kept
    changing; in the deep paper network they drifted so far from the statistics of the
    final weights that evaluation-mode predictions were off by several standard
    deviations while training-mode ones were good. One forward pass over the training
    maps with cumulative averaging (``momentum=None``) gives the statistics of the
    current weights (Wu & Johnson 2021, "Rethinking 'batch' in BatchNorm").
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    fmt = memory_format(device, dtype)
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    kept = [s for s in spans(len(x), batch_size) if len(s) > 1 or not s.start]
    try:
        with model_mode(model, training=True), torch.no_grad():
            for xb in batches(x, kept, device):
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    model(xb.to(device).contiguous(memory_format=fmt))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


def _save_checkpoint(path: Path, model, optimizer, best_state, scaler, state: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v for k, v in state_tensors(model.state_dict()).items()}
    tensors.update({f"best.{k}": v for k, v in state_tensors(best_state).items()})
    for i, s in optimizer.state_dict()["state"].items():
        for name, value in s.items():
            if torch.is_tensor(value):
                tensors[f"optim.{i}.{name}"] = value.detach().cpu().contiguous()
    state = {**state, "scaler": scaler.state_dict() if scaler.is_enabled() else None}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(state)})


def _load_checkpoint(path: Path, model, optimizer, scaler) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        state = json.loads(handle.metadata()["state"])
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    opt_state = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            opt_state["state"].setdefault(int(i), {})[name] = value
    optimizer.load_state_dict(opt_state)
    if state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    return state, best


def fit(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    settings: TrainSettings,
    *,
    y_scale=None,
    device: torch.device | str = "cpu",
    checkpoint: str | Path | None = None,
    quiet: bool = False,
    callback: Callable[[dict], None] | None = None,
    trial=None,
) -> TrainResult:
    """Train ``model`` with SGD and keep the weights of its best validation epoch.

    Parameters
    ----------
    model : torch.nn.Module
        Freshly initialised (or any) network; trained in place.
    x_train, x_val : torch.Tensor or MapDataset
        Standardised inputs ``(n, 1, *grid)`` on the CPU, or the maps on disk read one
        batch at a time (:class:`~brainage_xai.model.data.MapDataset`): the same batches,
        augmentation draws and weights.
    y_train, y_val : torch.Tensor
        Standardised targets ``(n, n_targets)``.
    settings : TrainSettings
    y_scale : array-like, optional
        Standard deviation of each target, to report the validation MAE in its units.
    device : torch.device or str
    checkpoint : path-like, optional
        A ``.safetensors`` file written after every epoch; when it exists and was written
        with the same settings, training resumes after its last epoch.
    quiet : bool
        No progress bar.
    callback : callable, optional
        Called with each epoch's record after its checkpoint is written.
    trial : optuna.Trial, optional
        Reports the validation score per epoch and prunes unpromising trials.

    Returns
    -------
    TrainResult
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    dtype = resolve_precision(settings.precision, device)
    n_targets = y_train.shape[1]
    scale = np.ones(n_targets) if y_scale is None else np.asarray(y_scale, dtype=float).reshape(-1)
    fmt = place(model, device, dtype)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.learning_rate,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        nesterov=settings.momentum > 0,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    key = json.dumps(settings.to_dict(), sort_keys=True)
    result = TrainResult()
    best_state = copy.deepcopy(model.state_dict())
    bad_epochs, start = 0, 0
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.is_file():
        try:
            state, best = _load_checkpoint(checkpoint, model, optimizer, scaler)
        except Exception as exc:  # a corrupt or foreign file: start afresh
            LOGGER.warning("ignoring unreadable checkpoint %s: %s", checkpoint, exc)
        else:
            if state.get("settings") == key:
                best_state = best
                result = TrainResult(
                    state["history"], state["best_epoch"], state["best_score"], state["stopped_early"]
                )
                bad_epochs, start = state["bad_epochs"], state["epoch"] + 1
                LOGGER.info("resuming training from %s after epoch %d", checkpoint, state["epoch"] + 1)
                if state["done"]:
                    start = settings.epochs
            else:
                LOGGER.info("checkpoint %s has other settings; training from scratch", checkpoint)
                optimizer.state.clear()
    n = len(x_train)
    bar = tqdm(total=settings.epochs, initial=start, disable=quiet, desc="training", unit="epoch", leave=False)
    try:
        for epoch in range(start, settings.epochs):
            tic = time.perf_counter()
            lr = learning_rate_at(settings, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            generator = epoch_generator(settings.seed, epoch)
            order = torch.randperm(n, generator=generator)
            model.train()
            total, seen = 0.0, 0
            # batch norm needs two samples: a last batch of one is left out (the next
            # epoch reshuffles)
            rows = [order[b : b + settings.batch_size] for b in range(0, n, settings.batch_size)]
            rows = [idx for b, idx in enumerate(rows) if len(idx) > 1 or not b]
            for idx, xb in zip(rows, batches(x_train, rows, device)):
                xb = augment(xb, generator, settings.max_shift, settings.intensity_jitter)
                xb = xb.to(device).contiguous(memory_format=fmt)
                yb = y_train[idx].to(device)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    out = model(xb)
                loss = nn.functional.mse_loss(out.float(), yb)
                if not torch.isfinite(loss):
                    raise BrainAgeXAIError(
                        f"training diverged at epoch {epoch + 1} (loss {loss.item()}); "
                        f"lower the learning rate (now {settings.learning_rate:g})"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                total += loss.item() * len(idx)
                seen += len(idx)
            recalibrate_batchnorm(model, x_train, settings.batch_size, device, dtype)
            pred = predict_batches(model, x_val, settings.batch_size, device, dtype)
            err = np.abs(pred - y_val.numpy()).mean(axis=0)
            score = float(err.mean())
            record = {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": total / max(seen, 1),
                "val_mae": (err * scale).tolist(),
                "val_score": score,
                "seconds": time.perf_counter() - tic,
                "subjects_per_second": seen / (time.perf_counter() - tic),
            }
            result.history.append(record)
            if score < result.best_score:
                result.best_score, result.best_epoch, bad_epochs = score, epoch + 1, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_epochs += 1
            result.stopped_early = bad_epochs >= settings.patience
            done = result.stopped_early or epoch + 1 == settings.epochs
            if checkpoint is not None:
                _save_checkpoint(
                    checkpoint, model, optimizer, best_state, scaler,
                    {"settings": key, "epoch": epoch, "history": result.history,
                     "best_epoch": result.best_epoch, "best_score": result.best_score,
                     "bad_epochs": bad_epochs, "stopped_early": result.stopped_early, "done": done},
                )  # fmt: skip
            bar.update(1)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_mae=f"{record['val_mae'][0]:.2f}")
            LOGGER.debug("epoch %d: %s", epoch + 1, record)
            if callback is not None:
                callback(record)
            if trial is not None:
                import optuna

                trial.report(score, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            if result.stopped_early:
                break
    finally:
        bar.close()
    model.load_state_dict(best_state)
    return result


def tune(
    build: Callable[[], nn.Module],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    settings: TrainSettings,
    n_trials: int,
    *,
    storage: str | Path | None = None,
    device: torch.device | str = "cpu",
    quiet: bool = False,
) -> dict:
    """Search learning rate, batch size, weight decay and momentum with TPE (optuna).

    Each trial trains a network from ``build()`` with ``settings`` except the searched
    values and scores its best validation MAE; trials that fall behind the median are
    pruned. With ``storage`` (an SQLite file) finished trials survive an interruption and
    only the missing ones run again.

    Returns
    -------
    dict
        ``{"best_params": {...}, "best_value": float, "trials": [{"number", "state",
        "value", "params"}, ...]}``.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=settings.seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, settings.epochs // 3))
    url = f"sqlite:///{Path(storage).absolute()}" if storage is not None else None
    study = optuna.create_study(
        direction="minimize", sampler=sampler, pruner=pruner, storage=url,
        study_name="brainage-xai-tune", load_if_exists=True,
    )  # fmt: skip
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def objective(trial) -> float:
        trial_settings = dataclasses.replace(
            settings,
            learning_rate=trial.suggest_float("learning_rate", 1e-3, 0.2, log=True),
            batch_size=trial.suggest_categorical("batch_size", [4, 8, 16]),
            weight_decay=trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
            momentum=trial.suggest_float("momentum", 0.5, 0.99),
        )
        torch.manual_seed(settings.seed)
        model = build()
        try:
            result = fit(model, x_train, y_train, x_val, y_val, trial_settings,
                         device=device, quiet=True, trial=trial)  # fmt: skip
        except BrainAgeXAIError as exc:  # diverged: a bad region of the search space
            LOGGER.info("trial %d pruned: %s", trial.number, exc)
            raise optuna.TrialPruned() from exc
        return result.best_score

    remaining = n_trials - sum(t.state in finished for t in study.trials)
    if remaining > 0:
        from tqdm.auto import tqdm

        with tqdm(total=n_trials, initial=n_trials - remaining, disable=quiet, desc="tuning", unit="trial") as bar:
            study.optimize(objective, n_trials=remaining, callbacks=[lambda s, t: bar.update(1)])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise BrainAgeXAIError(f"none of {n_trials} tuning trials finished; widen the epoch budget")
    return {
        "best_params": dict(study.best_params),
        "best_value": float(study.best_value),
        "trials": [
            {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params}
            for t in study.trials if t.state in finished
        ],  # fmt: skip
    }
