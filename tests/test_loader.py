"""Training and network passes from the maps on disk (``MapDataset`` and a DataLoader)
against the stacked in-memory path: the same normalisation, batches and weights, bit
for bit on the CPU."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch

from brainage_xai.errors import DataError
from brainage_xai.model import ensemble
from brainage_xai.model.data import (
    MapDataset,
    batches,
    dataset_normalisation,
    input_normalisation,
    load_maps,
    standardise_inputs,
)
from brainage_xai.model.training import TrainSettings, predict_batches, stratified_split

SHAPE = (12, 14, 11)
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_maps(root, n, shape=SHAPE, seed=0):
    """``n`` NIfTI maps whose value in one region rises with age, plus noise."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(10, 80, n)
    paths = []
    for i in range(n):
        data = (0.5 + 0.3 * rng.random(shape)).astype(np.float32)
        data[3:7, 4:8, 3:7] += np.float32((age[i] - 45) / 40)
        path = root / f"sub-{i:02d}_map.nii.gz"
        nib.save(nib.Nifti1Image(data, AFFINE), path)
        paths.append(path)
    return paths, age


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    paths, age = _write_maps(tmp_path_factory.mktemp("maps"), 23)
    split = stratified_split([p.name for p in paths], age, seed=0)
    return {"paths": paths, "age": age,
            "train": np.flatnonzero(split["split"] == "train"), "val": np.flatnonzero(split["split"] == "val")}


@pytest.mark.parametrize("n, shape", [(5, (7, 8, 9)), (9, (20, 23, 19)), (31, (13, 17, 11))])
def test_normalisation_from_files_equals_the_stacked_arrays(tmp_path, n, shape):
    paths, _ = _write_maps(tmp_path, n, shape, seed=n)
    maps, _ = load_maps(paths)
    assert dataset_normalisation(MapDataset(paths)) == input_normalisation(maps)
    rows = np.random.default_rng(n).permutation(n)[: n - 2]  # a split's rows, shuffled
    assert dataset_normalisation(MapDataset(paths).subset(rows)) == input_normalisation(maps[rows])


def test_loader_batches_equal_the_stacked_rows(cohort):
    maps, _ = load_maps(cohort["paths"])
    norm = input_normalisation(maps)
    x = standardise_inputs(maps, norm)
    rows = [torch.tensor([4, 0, 9]), torch.tensor([22, 1]), range(5, 12)]
    for workers in (0, 2):
        data = MapDataset(cohort["paths"], norm, workers=workers)
        assert len(data) == len(x)
        got = list(batches(data, rows))
        assert [b.dtype for b in got] == [torch.float32] * 3
        for batch, idx in zip(got, rows):
            want = x[idx.start : idx.stop] if isinstance(idx, range) else x[idx]
            assert torch.equal(batch, want)


def _train(maps, cohort, run_dir, settings):
    arch = ensemble.architecture(1, widths=[2, 4], depths=[1, 1])
    y = cohort["age"][:, None]
    return ensemble.train_networks(maps, y, cohort["train"], cohort["val"], arch, settings,
                                   run_dir=run_dir, device=torch.device("cpu"), quiet=True)


def test_training_from_files_gives_the_same_weights(cohort, tmp_path):
    """Two epochs from the stacked array and from the files (read in this process and by
    two loader workers): the same normalisation, losses and weights, bit for bit."""
    # 13 training subjects in batches of 4: the last batch of one is left out each epoch
    assert len(cohort["train"]) % 4 == 1
    settings = TrainSettings(epochs=2, batch_size=4, learning_rate=0.05, precision="fp32",
                             warmup_epochs=1, seed=3)
    stacked, _ = load_maps(cohort["paths"])
    reference = _train(stacked, cohort, tmp_path / "memory", settings)
    ref_state = reference.model.state_dict()
    x = standardise_inputs(stacked, reference.normalisation)
    ref_pred = predict_batches(reference.model, x, batch_size=5)
    for workers in (0, 2):
        trained = _train(MapDataset(cohort["paths"], workers=workers), cohort, tmp_path / f"files{workers}", settings)
        assert trained.normalisation == reference.normalisation
        strip = [{k: v for k, v in r.items() if k not in ("seconds", "subjects_per_second")}
                 for r in (trained.training["history"], reference.training["history"]) for r in r]
        assert strip[:2] == strip[2:]
        state = trained.model.state_dict()
        assert state.keys() == ref_state.keys()
        for name, value in state.items():
            assert torch.equal(value, ref_state[name]), name
        data = MapDataset(cohort["paths"], trained.normalisation, workers=workers)
        np.testing.assert_array_equal(predict_batches(trained.model, data, batch_size=5), ref_pred)
    # and the weights moved: a test of training, not of two untrained copies
    untrained = _train(stacked, cohort, tmp_path / "none", dataclasses.replace(settings, learning_rate=0.0))
    assert not torch.equal(untrained.model.state_dict()["head.weight"], ref_state["head.weight"])


def test_a_bad_map_is_named_when_it_is_read(cohort, tmp_path):
    paths = list(cohort["paths"][:4])
    data = np.asarray(nib.load(paths[0]).dataobj, dtype=np.float32)
    data[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(data[:-1], AFFINE), tmp_path / "small.nii.gz")
    dataset = MapDataset([*paths, tmp_path / "nan.nii.gz", tmp_path / "small.nii.gz"])
    assert dataset[3].shape == (1, *SHAPE)
    with pytest.raises(DataError, match="nan.nii.gz contains NaN"):
        dataset[4]
    with pytest.raises(DataError, match=r"small.nii.gz is on grid \(11, 14, 11\)"):
        dataset[5]


def test_explanation_inputs_from_files_equal_the_stacked_ones(cohort):
    """What the explanations stage reads from the files (a split's rows stacked, the
    training mean map, GradCAM over the maps one batch at a time) equals what it computed
    from the stacked cohort."""
    from brainage_xai.explain.gradcam import gradcam_maps

    maps, _ = load_maps(cohort["paths"])
    norm = input_normalisation(maps)
    x = standardise_inputs(maps, norm)
    data = MapDataset(cohort["paths"], norm)
    rows = cohort["val"][::-1]
    assert torch.equal(data.stack(rows), x[torch.from_numpy(rows.copy())])
    assert torch.equal(data.stack(), x)
    train = cohort["train"]
    np.testing.assert_array_equal(data.subset(train).mean(), x.numpy()[:, 0][train].mean(axis=0))
    torch.manual_seed(0)
    net = ensemble.build_network(ensemble.architecture(1, widths=[2, 4], depths=[1, 1]))
    layer = net.activation_module(net.default_layer)
    want = gradcam_maps(net, layer, list(x.numpy()[:, 0]), batch_size=4)
    got = gradcam_maps(net, layer, (data[i] for i in range(len(data))), batch_size=4)
    assert got.shape == (len(data), *want.shape[1:]) and np.abs(want).max() > 0
    np.testing.assert_array_equal(got, want)
