"""GradCAM baseline: CAM equivalence at the last layer, averaging, template grid."""

import nibabel as nib
import numpy as np
import pytest
from _tiny import mni_affine, tiny_net

from brainage_xai.errors import DataError
from brainage_xai.explain import gradcam
from brainage_xai.imaging.geometry import upsample
from brainage_xai.model.activations import feature_geometry

SHAPE = (21, 23, 19)


@pytest.fixture
def inputs(rng):
    return [rng.random(SHAPE).astype(np.float32) for _ in range(5)]


def test_gradcam_equals_cam_over_voxels_for_gap_and_linear_head(inputs):
    net = tiny_net()
    geo = feature_geometry(net, "features", SHAPE)
    grad = gradcam.gradcam_maps(net, "features", inputs, batch_size=2)
    cam = gradcam.cam_maps(net, "features", net.head.weight.detach()[0].numpy(), inputs)
    assert grad.shape == (5, *geo.feature_shape)
    n_vox = int(np.prod(geo.feature_shape))
    np.testing.assert_allclose(grad, cam / n_vox, rtol=1e-4, atol=1e-7)
    assert grad.min() >= 0


def test_signed_gradcam_keeps_negative_evidence(inputs):
    net = tiny_net(seed=3)
    w = net.head.weight.detach()[0].numpy()
    signed = gradcam.gradcam_maps(net, "features", inputs, relu=False)
    cam = gradcam.cam_maps(net, "features", w, inputs, relu=False)
    np.testing.assert_allclose(signed * np.prod(signed.shape[1:]), cam, rtol=1e-4, atol=1e-6)


def test_gradcam_of_an_earlier_layer_differs_from_cam(inputs):
    net = tiny_net()
    maps = gradcam.gradcam_maps(net, net.down1, inputs, relu=False)
    assert maps.shape == (5, 11, 12, 10)
    assert np.isfinite(maps).all() and np.abs(maps).max() > 0


def test_average_gradcam_on_template_grid(inputs):
    net = tiny_net()
    geo = feature_geometry(net, "features", SHAPE)
    template = nib.Nifti1Image(np.zeros(SHAPE, np.float32), mni_affine(4.0))
    img, maps = gradcam.average_gradcam(net, "features", inputs, geo, template)
    assert img.shape == SHAPE
    np.testing.assert_allclose(img.affine, template.affine)
    expected = upsample(maps.mean(axis=0), geo)
    np.testing.assert_allclose(img.get_fdata(), expected, rtol=1e-5, atol=1e-6)
    # inputs as nibabel images give the same maps
    imgs = [nib.Nifti1Image(x, template.affine) for x in inputs]
    np.testing.assert_allclose(gradcam.gradcam_maps(net, "features", imgs), maps, rtol=1e-5)


def test_gradcam_rejects_wrong_input_shape():
    with pytest.raises(DataError, match="expected \\(X, Y, Z\\)"):
        gradcam.gradcam_maps(tiny_net(), "features", [np.zeros((2, 2))])


def test_gradcam_of_an_ensemble_is_that_of_its_members_channels_side_by_side(rng):
    # GradCAM of the ensemble's layer, all members' channels, each weighted by the mean
    # gradient of the ensemble's output: by autograd through hooks.
    import torch

    from brainage_xai.model.network import EnsembleNet, PreActResNet3d

    torch.manual_seed(0)
    ens = EnsembleNet([PreActResNet3d(widths=(3, 4), depths=(1, 1)) for _ in range(2)]).eval()
    x = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3)]
    signed = gradcam.gradcam_maps(ens, ens.activation_modules("block1"), x, relu=False, batch_size=2)
    acts = []

    def keep(module, inp, out):
        out.retain_grad()
        acts.append(out)

    handles = [m.register_forward_hook(keep) for m in ens.activation_modules("block1")]
    ens(torch.from_numpy(np.stack(x))[:, None])[:, 0].sum().backward()
    for h in handles:
        h.remove()
    expected = sum((a.grad.mean(dim=(2, 3, 4), keepdim=True) * a).sum(dim=1) for a in acts).detach().numpy()
    assert np.abs(expected).max() > 0 and expected.min() < 0
    np.testing.assert_allclose(signed, expected, rtol=1e-4, atol=1e-8)
    relu = gradcam.gradcam_maps(ens, ens.activation_modules("block1"), x, batch_size=3)
    np.testing.assert_allclose(relu, np.clip(expected, 0, None), rtol=1e-4, atol=1e-8)
