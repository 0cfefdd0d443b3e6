"""RoI occlusion test: an RoI the model relies on hurts more than random blobs."""

import numpy as np
import pytest
import torch
from _tiny import tiny_net
from sklearn.linear_model import Ridge

from brainage_xai.errors import DataError
from brainage_xai.explain import occlusion
from brainage_xai.report.figures import plot_occlusion

SHAPE = (14, 15, 13)


@pytest.fixture
def cohort(rng):
    """Maps whose intensity in one box tracks age, and a ridge model fitted to them."""
    n_train, n_test = 120, 40
    age = rng.uniform(20, 80, n_train + n_test)
    region = np.zeros(SHAPE, bool)
    region[3:7, 4:8, 3:7] = True
    decoy = np.zeros(SHAPE, bool)
    decoy[8:12, 8:12, 6:10] = True
    x = rng.normal(0, 1, (age.size, *SHAPE)).astype(np.float32)
    x[:, region] += ((age - 50) / 10)[:, None]
    x[:, decoy] += rng.normal(0, 3, age.size)[:, None]  # varies, but not with age
    model = Ridge(alpha=100.0).fit(x[:n_train].reshape(n_train, -1), age[:n_train])

    def predict(batch):
        return model.predict(np.asarray(batch).reshape(len(batch), -1))

    brain = np.zeros(SHAPE, bool)
    brain[1:-1, 1:-1, 1:-1] = True
    return {
        "predict": predict, "x_test": x[n_train:], "y_test": age[n_train:],
        "fill": x[:n_train].mean(axis=0), "region": region, "decoy": decoy, "brain": brain,
    }


def test_relevant_roi_beats_random_blobs_and_decoy_does_not(cohort):
    masks = np.stack([cohort["region"], cohort["decoy"]])
    table, null = occlusion.occlusion_test(
        cohort["predict"], cohort["x_test"], cohort["y_test"], masks, cohort["fill"],
        cohort["brain"], n_random=20, seed=1, zooms=(2.0, 2.0, 2.0),
        roi_names=["age <b>region</b>", "decoy"],
    )
    assert list(table["roi"]) == ["age <b>region</b>", "decoy"]
    assert table["voxels"].tolist() == [64, 64]
    assert table["volume_mm3"].tolist() == [512.0, 512.0]
    region, decoy = table.iloc[0], table.iloc[1]
    assert region["mae_increase"] > 5 * region["null_p95"] > 0
    assert region["above_null"] and region["p_value"] == pytest.approx(1 / 21)
    assert not decoy["above_null"]
    assert len(null) == 40 and set(null["roi"]) == set(table["roi"])
    fig = plot_occlusion(table, null)
    assert len(fig.axes[0].collections) >= 4


def test_random_blob_has_the_volume_and_stays_in_the_brain(rng):
    brain = np.zeros(SHAPE, bool)
    brain[2:12, 2:13, 2:11] = True
    for n in (1, 27, 200):
        blob = occlusion.random_blob(brain, n, rng, zooms=(2.0, 2.0, 2.0))
        assert blob.sum() == n and not (blob & ~brain).any()
    with pytest.raises(DataError, match="does not fit"):
        occlusion.random_blob(brain, int(brain.sum()) + 1, rng)


def test_torch_predictor_maps_outputs_to_target_units(rng):
    net = tiny_net()
    x = rng.random((3, 21, 23, 19)).astype(np.float32)
    raw = net(torch.from_numpy(x[:, None]))[:, 0].detach().numpy()
    pred = occlusion.torch_predictor(net, batch_size=2, scale=10.0, shift=40.0)(x)
    np.testing.assert_allclose(pred, raw * 10 + 40, rtol=1e-5)


def test_occlusion_checks_its_inputs(cohort):
    masks = cohort["region"][None]
    with pytest.raises(DataError, match="at least 20"):
        occlusion.occlusion_test(cohort["predict"], cohort["x_test"], cohort["y_test"], masks,
                                 cohort["fill"], cohort["brain"], n_random=5)
    with pytest.warns(UserWarning, match="empty"):
        table, null = occlusion.occlusion_test(
            cohort["predict"], cohort["x_test"], cohort["y_test"],
            np.concatenate([np.zeros_like(masks), masks]), cohort["fill"], cohort["brain"])
    assert not table.loc[0, "above_null"] and np.isnan(table.loc[0, "mae_increase"])
    assert table.loc[1, "above_null"] and set(null["roi"]) == {"RoI 2"}


def test_networks_share_the_rois_and_the_blobs_of_similar_volume(cohort, rng, tmp_path):
    # two RoIs of 64 voxels share one null; a 27-voxel RoI gets its own; both networks
    # are tested on the same blobs, and a network that ignores the inputs relies on nothing
    small = np.zeros(SHAPE, bool)
    small[8:11, 2:5, 2:5] = True
    masks = np.stack([cohort["region"], cohort["decoy"], small])
    assert occlusion.volume_bins([64, 64, 27]) == [(27, [2]), (64, [0, 1])]
    assert occlusion.volume_bins([64, 70, 0]) == [(67, [0, 1])]
    flat = {"ridge": cohort["predict"], "constant": lambda b: np.full(len(b), 50.0)}
    table, null = occlusion.occlusion_test(flat, cohort["x_test"], cohort["y_test"], masks,
                                           cohort["fill"], cohort["brain"], seed=3)
    assert list(table.columns[:2]) == ["network", "roi"] and len(table) == 6
    ridge = table[table["network"] == "ridge"].set_index("roi")
    assert ridge.loc["RoI 1", "above_null"] and not ridge.loc["RoI 2", "above_null"]
    assert list(ridge["null_voxels"]) == [64, 64, 27]
    assert not table.loc[table["network"] == "constant", "above_null"].any()
    shared = null[(null["network"] == "ridge") & null["roi"].isin(["RoI 1", "RoI 2"])]
    np.testing.assert_array_equal(shared[shared["roi"] == "RoI 1"]["mae_increase"],
                                  shared[shared["roi"] == "RoI 2"]["mae_increase"])
    assert len(null) == 2 * 3 * 20


def test_every_roi_empty_still_gives_readable_tables(cohort, tmp_path):
    from brainage_xai.utils.io import read_tsv, write_tsv

    with pytest.warns(UserWarning, match="empty"):
        table, null = occlusion.occlusion_test(
            cohort["predict"], cohort["x_test"], cohort["y_test"], np.zeros((2, *SHAPE), bool),
            cohort["fill"], cohort["brain"])
    assert len(table) == 2 and not table["above_null"].any() and null.empty
    write_tsv(tmp_path / "null.tsv", null)
    assert list(read_tsv(tmp_path / "null.tsv").columns) == ["roi", "draw", "mae_increase"]
