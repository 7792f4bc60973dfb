"""Convolutional layers on every backend: forward and backward against PyTorch's modules, float64
finite differences, BatchNorm2d's running statistics, residual blocks, the input-gradient rule and
bad input. The backends' kernels themselves are tested in test_numpy_conv.py / test_conv_kernels.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

import deepcore as dc
from deepcore import nn
from deepcore.gradcheck import check_layer
from tests.helpers import arr, dtype_name, needs_torch, to_np

pytestmark = needs_torch

CONVS = {
    "3x3": dict(in_channels=3, out_channels=4, kernel_size=3),
    "stride2_pad1": dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1),
    "rect_pairs": dict(in_channels=2, out_channels=2, kernel_size=(2, 3), stride=(1, 2), padding=(1, 0)),
    "dilation2": dict(in_channels=2, out_channels=3, kernel_size=3, dilation=2, padding=2),
    "groups2": dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1),
    "depthwise": dict(in_channels=3, out_channels=3, kernel_size=3, groups=3, bias=False),
    "same_even": dict(in_channels=2, out_channels=3, kernel_size=4, padding="same"),
    "same_dilated": dict(in_channels=2, out_channels=2, kernel_size=3, padding="same", dilation=(2, 1)),
    "1x1": dict(in_channels=3, out_channels=5, kernel_size=1),
}


def _images(backend, shape, dtype="float32", seed=0):
    x = np.random.default_rng(seed).standard_normal(shape)
    return arr(backend, x, dtype), x


def _torch_conv(layer: nn.Conv2d):
    import torch

    t = torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, layer.groups, bias=layer.bias is not None, dtype=torch.float64)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(to_np(layer.weight.value).astype(np.float64)))
        if layer.bias is not None:
            t.bias.copy_(torch.from_numpy(to_np(layer.bias.value).astype(np.float64)))
    return t


def _torch_backward(t_module, x: np.ndarray, g: np.ndarray):
    import torch

    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ty = t_module(tx)
    ty.backward(torch.from_numpy(g))
    return ty.detach().numpy(), tx.grad.numpy()


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("dtype, tol", [("float32", 2e-5), ("float64", 1e-12)])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv2d_matches_torch(backend, name, dtype, tol):
    layer = nn.Conv2d(**CONVS[name], seed=1, dtype=dtype)
    x, x_np = _images(backend, (2, layer.in_channels, 7, 6), dtype)
    y, back = layer.forward(x, train=True, input_grad=True)
    g = np.random.default_rng(2).standard_normal(tuple(y.shape))
    t = _torch_conv(layer)
    ty, tdx = _torch_backward(t, x_np.astype(dtype).astype(np.float64), g)
    assert dtype_name(y) == dtype
    np.testing.assert_allclose(to_np(y), ty, rtol=tol, atol=tol)
    dx = back(arr(backend, g, dtype))
    np.testing.assert_allclose(to_np(dx), tdx, rtol=tol, atol=tol)
    np.testing.assert_allclose(to_np(layer.weight.grad), t.weight.grad.numpy(), rtol=tol, atol=tol * 10)
    if layer.bias is not None:
        np.testing.assert_allclose(to_np(layer.bias.grad), t.bias.grad.numpy(), rtol=tol, atol=tol * 10)


POOLS = {
    "max2": lambda: nn.MaxPool2d(2),
    "max3_s2_p1": lambda: nn.MaxPool2d(3, stride=2, padding=1),
    "max_rect": lambda: nn.MaxPool2d((2, 3), stride=(1, 2), padding=(1, 0)),
    "avg2": lambda: nn.AvgPool2d(2),
    "avg3_s2_p1": lambda: nn.AvgPool2d(3, stride=2, padding=1),
    "avg3_p1_exclude": lambda: nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
    "global": nn.GlobalAvgPool2d,
}


def _torch_pool(layer):
    import torch

    if isinstance(layer, nn.MaxPool2d):
        return torch.nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding)
    if isinstance(layer, nn.AvgPool2d):
        return torch.nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding,
                                  count_include_pad=layer.count_include_pad)
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("float64", 1e-13)])
@pytest.mark.parametrize("name", list(POOLS))
def test_pools_match_torch(backend, name, dtype, tol):
    layer = POOLS[name]()
    x_np = np.random.default_rng(3).standard_normal((2, 3, 7, 6))
    x_np[0, 0, :3, :3] = 0.25  # ties: the gradient must go to the first maximum, as PyTorch's
    x = arr(backend, x_np, dtype)
    y, back = layer.forward(x, train=True, input_grad=True)
    g = np.random.default_rng(4).standard_normal(tuple(y.shape))
    ty, tdx = _torch_backward(_torch_pool(layer), x_np.astype(dtype).astype(np.float64), g)
    assert dtype_name(y) == dtype
    np.testing.assert_allclose(to_np(y), ty, rtol=tol, atol=tol)
    np.testing.assert_allclose(to_np(back(arr(backend, g, dtype))), tdx, rtol=tol, atol=tol)


def test_batchnorm2d_follows_torch_over_steps(backend):
    import torch

    layer = nn.BatchNorm2d(3, momentum=0.2)
    ref = torch.nn.BatchNorm2d(3, momentum=0.2, dtype=torch.float64)
    rng = np.random.default_rng(5)
    for step in range(3):
        x_np = rng.standard_normal((4, 3, 5, 5)) * (step + 1) + step
        g = rng.standard_normal(x_np.shape)
        y, back = layer.forward(arr(backend, x_np, "float64"), train=True, input_grad=True)
        ty, tdx = _torch_backward(ref, x_np, g)
        np.testing.assert_allclose(to_np(y), ty, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(to_np(back(arr(backend, g, "float64"))), tdx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_np(layer.running_mean), ref.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(to_np(layer.running_var), ref.running_var.numpy(), rtol=1e-6)
    assert int(to_np(layer.num_batches_tracked)) == 3
    np.testing.assert_allclose(to_np(layer.weight.grad), ref.weight.grad.numpy(), rtol=1e-5, atol=1e-5)
    ref.eval()
    x_np = rng.standard_normal((2, 3, 5, 5))
    np.testing.assert_allclose(to_np(layer(arr(backend, x_np, "float32"))), ref(torch.from_numpy(x_np)).detach(),
                               rtol=1e-5, atol=1e-5)


def test_batchnorm2d_normalises_half_input_in_float32():
    layer = nn.BatchNorm2d(2)
    x_np = (np.random.default_rng(6).standard_normal((3, 2, 4, 4)) * 50 + 300).astype(np.float16)
    y, back = layer.forward(x_np, train=True, input_grad=True)
    assert y.dtype == np.float16
    x32 = x_np.astype(np.float32)
    mean, var = x32.mean(axis=(0, 2, 3), keepdims=True), x32.var(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(y.astype(np.float32), (x32 - mean) / np.sqrt(var + 1e-5), atol=4e-3)
    assert layer.running_mean.dtype == np.float32
    dx = back(np.ones_like(x_np))
    assert dx.dtype == np.float16 and np.all(np.isfinite(dx))


LAYERS = {
    "conv": lambda: nn.Conv2d(2, 3, 3, stride=2, padding=(1, 0), seed=0),
    "conv_groups_dilated": lambda: nn.Conv2d(4, 2, (2, 3), dilation=(2, 1), groups=2, padding="same", seed=1),
    "maxpool": lambda: nn.MaxPool2d(2, stride=1),
    "avgpool": lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
    "global_avg": nn.GlobalAvgPool2d,
    "batchnorm2d": lambda: nn.BatchNorm2d(4),
    "residual": lambda: nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, seed=2), nn.BatchNorm2d(4),
                                                  nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, seed=3))),
    "residual_shortcut": lambda: nn.Residual(nn.Sequential(nn.Conv2d(4, 2, 3, stride=2, padding=1, seed=4), nn.Tanh()),
                                             shortcut=nn.Conv2d(4, 2, 1, stride=2, seed=5)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_gradients_match_finite_differences(backend, name):
    layer = LAYERS[name]()
    channels = 2 if name == "conv" else 4
    # Distinct values far apart: max pooling's choice must not flip under the finite-difference step.
    x_np = np.random.default_rng(7).permutation(2 * channels * 25).reshape(2, channels, 5, 5) / 10.0 - 2.0
    result = check_layer(layer, arr(backend, x_np, "float32"), train=True)
    assert result.ok, result
    assert {label for label, _, _ in result.checks} >= {"x"} | {n for n, _ in layer.named_parameters()}


def test_small_cnn_trains_like_torch():
    """Three SGD steps of conv-BN-ReLU-pool-conv-GAP-linear in float64 give PyTorch's parameters."""
    import torch

    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, seed=0), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, seed=1), nn.ReLU())),
                          nn.Conv2d(4, 6, 3, stride=2, padding=1, seed=2), nn.GlobalAvgPool2d(),
                          nn.Linear(6, 3, seed=3))
    model.to(dtype="float64")

    class Block(torch.nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return x + torch.relu(self.conv(x))

    convs = [model[0], model[4].block[0], model[5]]
    tconvs = [_torch_conv(c) for c in convs]
    tlin = torch.nn.Linear(6, 3, dtype=torch.float64)
    with torch.no_grad():
        tlin.weight.copy_(torch.from_numpy(model[7].weight.value))
        tlin.bias.copy_(torch.from_numpy(model[7].bias.value))
    ref = torch.nn.Sequential(tconvs[0], torch.nn.BatchNorm2d(4, dtype=torch.float64), torch.nn.ReLU(),
                              torch.nn.MaxPool2d(2), Block(tconvs[1]), tconvs[2], torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), tlin)
    opt = dc.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    topt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    rng = np.random.default_rng(8)
    for _ in range(3):
        x = rng.standard_normal((5, 1, 8, 8))
        y = rng.integers(0, 3, 5)
        model.zero_grad()
        logits, back = model.forward(x, train=True)
        loss, g = dc.losses.softmax_cross_entropy(logits, y)
        back(g)
        opt.step()
        topt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(ref(torch.from_numpy(x)), torch.from_numpy(y))
        tloss.backward()
        topt.step()
        assert math.isclose(float(loss), float(tloss.detach()), rel_tol=1e-10)
    for (name, p), tp in zip(model.named_parameters(), ref.parameters(), strict=True):
        np.testing.assert_allclose(p.value, tp.detach().numpy(), rtol=1e-9, atol=1e-11, err_msg=name)


def test_first_conv_forms_no_input_gradient(monkeypatch):
    """Data needs no gradient: the first convolution is asked for none, the second one for its own."""
    backend = dc.get_backend("numpy")
    asked = []
    original = type(backend).conv2d_backward

    def spy(self, dy, saved, *, need_dx=True, need_bias=True):
        asked.append(need_dx)
        return original(self, dy, saved, need_dx=need_dx, need_bias=need_bias)

    monkeypatch.setattr(type(backend), "conv2d_backward", spy)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, seed=0), nn.ReLU(), nn.Conv2d(2, 2, 3, seed=1), nn.Flatten())
    x = np.random.default_rng(9).standard_normal((2, 1, 6, 6)).astype(np.float32)
    y, back = model.forward(x, train=True)
    assert back(np.ones(tuple(y.shape), dtype=np.float32)) is None
    assert asked == [True, False]
    asked.clear()
    y, back = model.forward(x, train=True, input_grad=True)
    assert back(np.ones(tuple(y.shape), dtype=np.float32)).shape == x.shape
    assert asked == [True, True]


def test_residual_without_input_gradient_still_trains_both_branches():
    block = nn.Residual(nn.Conv2d(2, 2, 3, padding=1, seed=0), shortcut=nn.Conv2d(2, 2, 1, seed=1))
    x = np.random.default_rng(10).standard_normal((2, 2, 4, 4)).astype(np.float32)
    y, back = block.forward(x, train=True)
    assert back(np.ones_like(y)) is None
    assert block.block.weight.grad is not None and block.shortcut.weight.grad is not None


def test_conv_initialisation_is_pytorchs_default():
    layer = nn.Conv2d(8, 16, (3, 5), groups=2, seed=0)
    bound = 1.0 / math.sqrt(4 * 3 * 5)  # fan_in = in_channels / groups * kh * kw
    w = layer.weight.value
    assert w.shape == (16, 4, 3, 5) and w.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert np.abs(w.std() - bound / math.sqrt(3)) < 0.1 * bound
    assert np.abs(layer.bias.value).max() <= bound
    he = nn.Conv2d(8, 16, 3, init="he", seed=0)
    assert abs(he.weight.value.std() - math.sqrt(2 / 72)) < 0.1 * math.sqrt(2 / 72)
    assert not he.bias.value.any()


def test_same_seed_same_conv_weights_on_every_backend(backend):
    a = nn.Conv2d(3, 4, 3, seed=11)
    with dc.use_backend("numpy"):
        b = nn.Conv2d(3, 4, 3, seed=11)
    np.testing.assert_array_equal(to_np(a.weight.value), b.weight.value)


@pytest.mark.parametrize("make, match", [
    (lambda: nn.Conv2d(3, 4, 0), "Conv2d: kernel_size must be a positive integer"),
    (lambda: nn.Conv2d(3, 4, (3, 3, 3)), "Conv2d: kernel_size must be an integer or a pair"),
    (lambda: nn.Conv2d(3, 4, 3, groups=2), "groups=2 must divide in_channels=3"),
    (lambda: nn.Conv2d(3, 4, 3, stride=2, padding="same"), "padding='same' needs stride 1"),
    (lambda: nn.Conv2d(3, 4, 3, padding="full"), "padding must be an integer, a pair, 'same' or 'valid'"),
    (lambda: nn.Conv2d(3, 4, 3, padding=-1), "Conv2d: padding must be a non-negative integer"),
    (lambda: nn.Conv2d(3, 4, 2.5), "Conv2d: kernel_size must be a positive integer, got float"),
    (lambda: nn.MaxPool2d(2, padding=2), "padding .* must be at most half of kernel_size"),
    (lambda: nn.AvgPool2d(2, count_include_pad=1), "count_include_pad must be True or False"),
    (lambda: nn.Residual(lambda x: x), "Residual: block must be a deepcore.nn.Module"),
])
def test_constructor_errors(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


def test_shape_errors_name_the_layer():
    x = np.zeros((2, 3, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"Conv2d\(2, 4\): input x must have shape \(N, 2, H, W\), got \(2, 3, 4, 4\)"):
        nn.Conv2d(2, 4, 3).forward(x)
    with pytest.raises(ValueError, match=r"Conv2d: input x of spatial size \(4, 4\) is smaller than the kernel"):
        nn.Conv2d(3, 4, 5).forward(x)
    with pytest.raises(ValueError, match=r"MaxPool2d: input x must have shape \(N, C, H, W\), got \(2, 3\)"):
        nn.MaxPool2d(2).forward(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"AvgPool2d: input x of spatial size \(4, 4\) is smaller than kernel_size"):
        nn.AvgPool2d(5).forward(x)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\): input x must have shape \(N, 3, H, W\)"):
        nn.BatchNorm2d(3).forward(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"Residual: the block's output has shape \(2, 4, 2, 2\) but the input"):
        nn.Residual(nn.Conv2d(3, 4, 3)).forward(x)
    with pytest.raises(TypeError, match="Conv2d: input x must be a floating-point array"):
        nn.Conv2d(3, 4, 3).forward(x.astype(np.int64))


def test_repr_names_the_arguments():
    assert repr(nn.Conv2d(3, 8, 3, padding="same", groups=1)) == (
        "Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding='same', bias=True)")
    assert repr(nn.MaxPool2d(2)) == "MaxPool2d(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0))"
    assert "block" in repr(nn.Residual(nn.ReLU()))
