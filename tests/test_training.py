"""Training: split, schedule, augmentation, SGD fit, early stopping, resume, tuning."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from brainage_xai.errors import DataError, UsageError
from brainage_xai.model import PreActResNet3d
from brainage_xai.model.training import (
    TrainSettings,
    augment,
    epoch_generator,
    fit,
    learning_rate_at,
    resolve_device,
    resolve_precision,
    stratified_split,
    tune,
)

SHAPE = (12, 14, 11)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort():
    """Maps whose value in one region rises with age, plus noise; standardised targets."""
    rng = np.random.default_rng(1)
    n = 40
    age = rng.uniform(10, 80, n)
    x = 0.3 * rng.normal(size=(n, 1, *SHAPE)).astype(np.float32)
    x[:, 0, 3:7, 4:8, 3:7] += ((age - 45) / 20).astype(np.float32)[:, None, None, None]
    split = stratified_split([f"{i:02d}" for i in range(n)], age, seed=0)
    y = torch.from_numpy(((age - age.mean()) / age.std()).astype(np.float32)[:, None])
    train = torch.from_numpy(np.flatnonzero(split["split"] == "train"))
    val = torch.from_numpy(np.flatnonzero(split["split"] == "val"))
    x = torch.from_numpy(x)
    return {"x": x, "y": y, "train": train, "val": val, "age": age}


def net(seed=0):
    torch.manual_seed(seed)
    return PreActResNet3d(widths=(4, 6, 8), depths=(1, 1, 1))


def settings(**kw):
    base = dict(epochs=6, batch_size=8, learning_rate=0.05, precision="fp32", patience=50, seed=0)
    return TrainSettings(**{**base, **kw})


def run_fit(cohort, s, **kw):
    model = net()
    c = cohort
    result = fit(model, c["x"][c["train"]], c["y"][c["train"]], c["x"][c["val"]], c["y"][c["val"]], s,
                 quiet=True, **kw)  # fmt: skip
    return model, result


def test_stratified_split_sizes_balance_and_seed():
    rng = np.random.default_rng(0)
    age = rng.uniform(5, 81, 200)
    subjects = [f"{i:03d}" for i in range(200)]
    split = stratified_split(subjects, age, seed=0)
    counts = split["split"].value_counts().to_dict()
    assert counts == {"train": 120, "val": 40, "test": 40}
    assert list(split["participant_id"]) == subjects
    # Stratified: each split spans the age range with a similar median.
    for name in ("train", "val", "test"):
        a = age[split["split"] == name]
        assert abs(np.median(a) - np.median(age)) < 5 and a.min() < 15 and a.max() > 70
    assert split.equals(stratified_split(subjects, age, seed=0))
    assert not split.equals(stratified_split(subjects, age, seed=1))


def test_split_needs_enough_subjects():
    with pytest.raises(DataError, match="at least 5 subjects"):
        stratified_split(["a", "b", "c"], [1, 2, 3])


def test_learning_rate_schedule():
    s = settings(epochs=20, warmup_epochs=3, learning_rate=0.1)
    lrs = [learning_rate_at(s, e) for e in range(20)]
    assert lrs[0] == pytest.approx(0.01) and max(lrs) == pytest.approx(0.1)
    assert np.all(np.diff(lrs[:4]) > 0) and np.all(np.diff(lrs[3:]) < 0)
    assert lrs[-1] == pytest.approx(0.001)


def test_augment_is_small_and_seeded():
    x = torch.zeros(3, 1, *SHAPE)
    x[:, :, 5, 6, 5] = 1.0
    a = augment(x, epoch_generator(0, 4), max_shift=1, jitter=0.0)
    b = augment(x, epoch_generator(0, 4), max_shift=1, jitter=0.0)
    assert torch.equal(a, b) and a.shape == x.shape
    for i in range(3):
        idx = np.argwhere(a[i, 0].numpy() == 1.0)
        assert len(idx) == 1 and np.abs(idx[0] - [5, 6, 5]).max() <= 1
    j = augment(x, epoch_generator(0, 4), max_shift=0, jitter=0.05)
    assert not torch.equal(j, x) and (j - x).abs().max() < 0.5


def test_fit_learns_and_keeps_best_epoch(cohort):
    model, result = run_fit(cohort, settings(epochs=12))
    assert len(result.history) == 12
    val_mae = [h["val_mae"][0] for h in result.history]
    assert result.best_epoch == int(np.argmin(val_mae)) + 1
    c = cohort
    mean_mae = (c["y"][c["val"]] - c["y"][c["train"]].mean()).abs().mean().item()
    assert min(val_mae) < 0.5 * mean_mae  # learnt the planted effect
    # The model ends with the best epoch's weights.
    model.eval()
    with torch.no_grad():
        mae = (model(c["x"][c["val"]]) - c["y"][c["val"]]).abs().mean().item()
    assert mae == pytest.approx(result.best_score, rel=1e-4)


def test_early_stopping(cohort):
    # No learning: the validation MAE never improves after the first epoch.
    _, result = run_fit(cohort, settings(epochs=30, learning_rate=0.0, patience=2))
    assert result.stopped_early and len(result.history) < 30
    assert len(result.history) - result.best_epoch == 2


def test_resume_after_interruption_matches_uninterrupted(cohort, tmp_path):
    s = settings(epochs=5)
    full, full_result = run_fit(cohort, s)

    class Interrupt(Exception):
        pass

    def stop_after_two(record):
        if record["epoch"] == 2:
            raise Interrupt

    ckpt = tmp_path / "checkpoint.safetensors"
    with pytest.raises(Interrupt):
        run_fit(cohort, s, checkpoint=ckpt, callback=stop_after_two)
    assert ckpt.is_file()
    epochs_run = []
    resumed, result = run_fit(cohort, s, checkpoint=ckpt, callback=lambda r: epochs_run.append(r["epoch"]))
    assert epochs_run == [3, 4, 5]
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5]
    assert result.best_epoch == full_result.best_epoch
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # A finished checkpoint returns at once with the best weights.
    again, _ = run_fit(cohort, s, checkpoint=ckpt, callback=lambda r: pytest.fail("retrained"))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), full.state_dict().values()))


def test_checkpoint_of_other_settings_is_not_resumed(cohort, tmp_path):
    ckpt = tmp_path / "checkpoint.safetensors"
    run_fit(cohort, settings(epochs=2), checkpoint=ckpt)
    epochs_run = []
    run_fit(cohort, settings(epochs=3, learning_rate=0.01), checkpoint=ckpt,
            callback=lambda r: epochs_run.append(r["epoch"]))  # fmt: skip
    assert epochs_run == [1, 2, 3]


def test_tune_searches_and_resumes_from_storage(cohort, tmp_path):
    c = cohort
    args = (net, c["x"][c["train"]], c["y"][c["train"]], c["x"][c["val"]], c["y"][c["val"]], settings(epochs=2))
    db = tmp_path / "tune.db"
    first = tune(*args, 2, storage=db, quiet=True)
    params = first["best_params"]
    assert set(params) == {"learning_rate", "batch_size", "weight_decay", "momentum"}
    assert 1e-3 <= params["learning_rate"] <= 0.2 and params["batch_size"] in (4, 8, 16)
    assert len(first["trials"]) == 2 and np.isfinite(first["best_value"])
    second = tune(*args, 3, storage=db, quiet=True)
    assert [t["number"] for t in second["trials"]] == [0, 1, 2]
    assert second["trials"][:2] == first["trials"]


def test_device_and_precision_checks():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(UsageError, match="--device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            resolve_device("cuda:0")
    with pytest.raises(UsageError, match="fp16 mixed precision needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("fp32", torch.device("cpu")) is None
    with pytest.raises(UsageError, match="'precision' must be one of"):
        dataclasses.replace(settings(), precision="int8")


def _conv(model):
    """A 3D convolution's weight with several input channels (with one, both formats agree)."""
    return next(p for p in model.parameters() if p.dim() == 5 and p.shape[1] > 1)


def test_a_loaded_network_runs_with_its_weights_in_the_inputs_format(tmp_path):
    # A network read from its safetensors file is contiguous; every pass outside training
    # puts its weights in the format of its inputs (channels-last for float32 on a CPU,
    # contiguous for bf16), which only the inputs used to get. Same predictions either way.
    from brainage_xai.model.io import load_model, save_model
    from brainage_xai.model.training import place, predict_batches

    model = net(3)
    path = tmp_path / "model.safetensors"
    save_model(path, model, {"map": "volume"})
    loaded, _ = load_model(path)
    conv = _conv(loaded)
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last_3d)
    x = torch.randn(5, 1, *SHAPE)
    before = net(3).eval()
    with torch.inference_mode():
        expected = before(x).numpy()
    out = predict_batches(loaded, x, batch_size=2)
    conv = _conv(loaded)
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert place(loaded, "cpu", torch.bfloat16) is torch.contiguous_format
    assert _conv(loaded).is_contiguous()
