"""The network, its weights on disk and the activation tensor."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from brainage_xai.bids.derivatives import GroupOutputs, participant_activations_path
from brainage_xai.errors import DataError, MissingInputError
from brainage_xai.model import PAPER_DEPTHS, PAPER_WIDTHS, PreActResNet3d, load_model, save_model
from brainage_xai.model.activations import (
    feature_geometry,
    iter_activations,
    load_activation_tensor,
    write_activation_tensor,
)
from brainage_xai.model.data import check_grid, load_maps
from brainage_xai.model.io import read_metadata
from brainage_xai.model.training import place

SHAPE = (13, 15, 11)  # uneven on purpose


def small_net(n_outputs=1, seed=0):
    torch.manual_seed(seed)
    return PreActResNet3d(widths=(3, 4, 6), depths=(1, 2, 1), n_outputs=n_outputs).eval()


def inputs(rng, n=3):
    return torch.from_numpy(rng.normal(size=(n, 1, *SHAPE)).astype(np.float32))


def test_default_is_the_papers_architecture():
    model = PreActResNet3d()
    assert model.widths == PAPER_WIDTHS == (8, 16, 32, 64, 128)
    assert model.depths == PAPER_DEPTHS == (3, 4, 6, 4, 3)
    assert [len(b) for b in model.blocks] == [3, 4, 6, 4, 3]
    assert [b[0].conv1.stride for b in model.blocks] == [(1, 1, 1)] + [(2, 2, 2)] * 4
    # Pre-activation units: BN-ReLU before every convolution.
    unit = model.blocks[2][1]
    assert isinstance(unit.preact[0], torch.nn.BatchNorm3d) and isinstance(unit.preact[1], torch.nn.ReLU)
    assert model.layers == ("block1", "block2", "block3", "block4", "block5")
    assert model.default_layer == "block5" and model.activation_module_name() == "final"
    # 2 mm FSL-size grid gives the 6 x 7 x 6 of DESIGN.md at the last block.
    assert model.feature_shape((91, 109, 91)) == (6, 7, 6)


def test_multi_output_head(rng):
    model = small_net(n_outputs=2)
    assert model(inputs(rng)).shape == (3, 2)


@pytest.mark.parametrize("layer", ["block1", "block2", "block3"])
def test_layer_grid_matches_hook_and_stride_tracer(rng, layer):
    model = small_net()
    (act,) = iter_activations(model, inputs(rng), layer, batch_size=3)
    assert act.shape == (3, model.layer_channels(layer), *model.feature_shape(SHAPE, layer))
    assert act.min() >= 0  # a BN-ReLU output
    # The RoI code derives the geometry from the network's convolutions on its own.
    geom = feature_geometry(model, model.activation_module_name(layer), SHAPE)
    assert geom.feature_shape == model.feature_shape(SHAPE, layer)
    assert geom.stride == (model.layer_stride(layer),) * 3 and geom.offset == (0.0, 0.0, 0.0)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = [-70, -100, -50]
    expected = affine.copy()
    expected[:3, :3] *= model.layer_stride(layer)
    np.testing.assert_allclose(model.feature_affine(affine, layer), expected)


def test_head_on_pooled_activation_is_the_prediction(rng):
    model = small_net()
    x = inputs(rng)
    (act,) = iter_activations(model, x, batch_size=8)
    pooled = torch.from_numpy(act.reshape(act.shape[0], act.shape[1], -1).mean(axis=2))
    with torch.no_grad():
        np.testing.assert_allclose(model.head(pooled).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_unknown_layer_is_refused():
    with pytest.raises(ValueError, match=r"'layer' must be one of \['block1', 'block2', 'block3'\]"):
        small_net().check_layer("block9")


def test_auto_layer_is_the_deepest_at_most_4_mm_apart():
    paper = PreActResNet3d()  # five blocks, strides 1, 2, 4, 8, 16
    assert [paper.layer_for_spacing(mm) for mm in (0.25, 0.5, 1, 1.5, 2, 3, 4, 8)] == [
        "block5", "block4", "block3", "block2", "block2", "block1", "block1", "block1"]
    assert paper.layer_for_spacing(1, spacing_mm=16) == "block5"
    assert paper.check_layer("auto", 4.0) == "block1" and paper.check_layer("auto", 2.0) == "block2"
    assert small_net().check_layer("auto", 0.25) == "block3"  # never deeper than the network
    with pytest.raises(ValueError, match="'auto'"):
        paper.check_layer("block9", 2.0)  # "auto" is offered where the voxel size is known
    with pytest.raises(ValueError, match="must be one of"):
        paper.check_layer("auto")  # ... and refused where it is not


def test_save_load_roundtrip_without_pickle(tmp_path, rng):
    model = small_net(n_outputs=2)
    x = inputs(rng)
    path = save_model(tmp_path / "model.safetensors", model, {"targets": ["age", "bmi"], "seed": 3})
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and json.loads(raw[8 : 8 + header_len])  # a safetensors header, not a pickle
    meta_json = json.loads(path.with_suffix(".json").read_text())
    assert meta_json["architecture"]["widths"] == [3, 4, 6] and meta_json["targets"] == ["age", "bmi"]
    assert {"torch", "brainage_xai", "numpy", "python"} <= set(meta_json["versions"])
    assert read_metadata(tmp_path) == meta_json  # a folder works, header == JSON
    loaded, meta = load_model(tmp_path)
    assert not loaded.training and meta["seed"] == 3
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_load_model_errors(tmp_path):
    with pytest.raises(MissingInputError, match="not found"):
        load_model(tmp_path / "absent.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(DataError, match="not a readable safetensors file"):
        load_model(bad)


def test_activation_tensor_roundtrip(tmp_path, rng):
    model = small_net()
    x = inputs(rng, n=5)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    meta = write_activation_tensor(
        GroupOutputs(tmp_path, tmp_path).activations("block2"), iter_activations(model, x, "block2", batch_size=2), subjects=list("abcde"),
        split=["train", "train", "val", "test", "train"], model=model, layer="block2",
        input_shape=SHAPE, input_affine=affine, model_sha="0" * 64,
    )  # fmt: skip
    tensor = load_activation_tensor(meta)
    grid = model.feature_shape(SHAPE, "block2")
    assert isinstance(tensor.array, np.memmap) and tensor.array.dtype == np.float32
    assert tensor.array.shape == (5, 4, int(np.prod(grid))) and tensor.grid_shape == grid
    assert tensor.subjects == list("abcde") and list(tensor.rows("train")) == [0, 1, 4]
    np.testing.assert_allclose(tensor.affine, model.feature_affine(affine, "block2"))
    (direct,) = iter_activations(model, x, "block2", batch_size=5)
    np.testing.assert_allclose(tensor.volumes(), direct, rtol=1e-4, atol=1e-5)


def test_participant_activation_name():
    p = participant_activations_path(
        "/o/sub-01/anat/sub-01_space-MNI152NLin2009cAsym_res-4_label-GM_desc-preproc_probseg.nii.gz", "block5"
    )
    assert p.name == "sub-01_space-MNI152NLin2009cAsym_res-4_label-GM_desc-block5_activations.nii.gz"
    assert str(p.parent) == "/o/sub-01/anat"


def test_load_maps_checks_grid(tmp_path, rng):
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    paths = []
    for i, aff in enumerate([affine, affine, np.diag([2.0, 2.0, 2.0, 1.0])]):
        paths.append(tmp_path / f"m{i}.nii.gz")
        nib.save(nib.Nifti1Image(rng.random(SHAPE).astype(np.float32), aff), paths[-1])
    maps, aff = load_maps(paths[:2])
    assert maps.shape == (2, 1, *SHAPE) and np.allclose(aff, affine)
    with pytest.raises(DataError, match=r"voxel size \[2.0, 2.0, 2.0\] mm .* expects .* \[4.0, 4.0, 4.0\]"):
        load_maps(paths)
    with pytest.raises(DataError, match="expected a 3D map"):
        check_grid((*SHAPE, 3), affine, SHAPE, affine)


def test_gradient_rms_is_the_output_gradient_over_subjects(rng):
    # The relevance weight's input (--tensor relevance): sqrt(mean_n (dy_n / dA_n[c, v])^2).
    from brainage_xai.model.activations import gradient_rms

    net = small_net(seed=2)
    # Non-trivial BN statistics, as in a trained network.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = inputs(rng, n=5)
    # The last layer feeds global average pooling and a linear head: the gradient is
    # head weight / voxels at every voxel and for every subject.
    g = gradient_rms(net, x, "block3", batch_size=2)
    grid = feature_geometry(net, net.activation_module_name("block3"), SHAPE).feature_shape
    assert g.shape == (6, *grid) and g.dtype == np.float64
    w = net.head.weight.detach().numpy()[0].astype(np.float64)
    np.testing.assert_allclose(g, np.broadcast_to((np.abs(w) / np.prod(grid))[:, None, None, None], g.shape), rtol=1e-5)
    # An earlier layer: against autograd through a forward hook, one subject at a time.
    captured = {}
    handle = net.activation_module("block2").register_forward_hook(lambda m, i, o: captured.update(a=o))
    squares = []
    for k in range(x.shape[0]):
        y = net(x[k : k + 1])[0, 0]
        squares.append(torch.autograd.grad(y, captured["a"])[0][0].double().numpy() ** 2)
    handle.remove()
    expected = np.sqrt(np.mean(squares, axis=0))
    g2 = gradient_rms(net, x, "block2", batch_size=3)
    assert expected.std() > 0  # varies over voxels: not the last layer's constant
    np.testing.assert_allclose(g2, expected, rtol=1e-4, atol=1e-9)
    assert not net.training
    with pytest.raises(DataError, match="no inputs"):
        gradient_rms(net, x[:0], "block2")


def _ensemble(k=2, seed=0):
    from brainage_xai.model.network import EnsembleNet

    members = [small_net(seed=seed + i) for i in range(k)]
    for i, net in enumerate(members):  # non-trivial BN statistics, as in trained networks
        gen = torch.Generator().manual_seed(100 + i)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return EnsembleNet(members).eval()


def test_ensemble_predicts_the_members_mean_and_its_layer_is_theirs_side_by_side(tmp_path, rng):
    from brainage_xai.model.activations import gradient_rms
    from brainage_xai.model.network import EnsembleNet, build_network

    ens = _ensemble(3)
    a, b, c = ens.members
    x = inputs(rng, n=4)
    with torch.no_grad():
        np.testing.assert_allclose(ens(x).numpy(), ((a(x) + b(x) + c(x)) / 3).numpy(), rtol=1e-6)
        # The ensemble's head on its pooled channels is its prediction, as for one network.
        pooled = ens.features(x).mean(dim=(2, 3, 4))
        assert pooled.shape == (4, 3 * 6)
        np.testing.assert_allclose(ens.head(pooled).numpy(), ens(x).numpy(), rtol=1e-5, atol=1e-6)
    # The grid is the members'; the channels are all of theirs.
    assert ens.layers == a.layers and ens.default_layer == "block3"
    assert ens.layer_channels("block2") == 3 * 4 and ens.feature_shape(SHAPE, "block2") == a.feature_shape(SHAPE, "block2")
    assert ens.check_layer("auto", 4.0) == "block1"
    assert feature_geometry(ens, ens.activation_module_name("block2"), SHAPE) == feature_geometry(
        a, a.activation_module_name("block2"), SHAPE)
    acts = np.concatenate(list(iter_activations(ens, x, "block2", batch_size=3)))
    each = [np.concatenate(list(iter_activations(m, x, "block2", batch_size=3))) for m in ens.members]
    np.testing.assert_array_equal(acts, np.concatenate(each, axis=1))
    # The ensemble's output gradient is 1/K of each member's own.
    g = gradient_rms(ens, x, "block2", batch_size=2)
    np.testing.assert_allclose(g, np.concatenate([gradient_rms(m, x, "block2") for m in ens.members]) / 3,
                               rtol=1e-4, atol=1e-10)
    # Saved and loaded as one safetensors file.
    path = save_model(tmp_path / "model.safetensors", ens, {"seed": 0})
    assert read_metadata(path)["architecture"]["ensemble"] == 3
    loaded, _ = load_model(path)
    assert isinstance(loaded, EnsembleNet) and loaded.n_members == 3
    # The passes above put the ensemble's weights in the inputs' memory format; the same
    # format gives the same kernels, so the outputs are equal to the bit.
    place(loaded, "cpu")
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(x).numpy(), ens(x).numpy())
    torch.manual_seed(0)
    built = build_network({**a.architecture(), "ensemble": 2})
    assert isinstance(built, EnsembleNet)
    assert not torch.equal(built.members[0].stem.weight, built.members[1].stem.weight)
    with pytest.raises(ValueError, match="at least 2 members"):
        EnsembleNet([a])
    with pytest.raises(ValueError, match="share one architecture"):
        EnsembleNet([a, PreActResNet3d(widths=(3, 4, 6), depths=(1, 1, 1))])
    with pytest.raises(ValueError, match="at least 1"):
        build_network({**a.architecture(), "ensemble": 0})
