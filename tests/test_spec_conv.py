"""The JSON architecture (:mod:`deepcore.nn.spec`) of the convolutional layers: every one round-trips
(``architecture_of`` -> JSON -> ``model_from_architecture``, then the same outputs once the state is
loaded), a bad field is refused naming its place, and the input / output widths read off a description."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepcore import nn
from deepcore.nn.spec import (
    ArchitectureError,
    architecture_of,
    input_channels,
    input_features,
    model_from_architecture,
    output_features,
)


def _round_trip(model, x):
    """The model rebuilt from its JSON gives the same description, repr and outputs (train and eval)."""
    model.forward(x, train=True)  # running statistics move away from their initial values
    spec = architecture_of(model)
    rebuilt = model_from_architecture(json.loads(json.dumps(spec)))
    assert architecture_of(rebuilt) == spec
    assert repr(rebuilt) == repr(model)
    rebuilt.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(np.asarray(rebuilt(x)), np.asarray(model(x)))
    return spec


def _images(shape=(3, 3, 8, 8), dtype=np.float32):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("layer, node", [
    (nn.Conv2d(3, 4, 3), {"type": "Conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": [3, 3],
                          "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1, "bias": True,
                          "dtype": "float32"}),
    (nn.Conv2d(3, 6, (3, 1), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=3, bias=False),
     {"type": "Conv2d", "in_channels": 3, "out_channels": 6, "kernel_size": [3, 1], "stride": [2, 1],
      "padding": [1, 0], "dilation": [1, 2], "groups": 3, "bias": False, "dtype": "float32"}),
    (nn.Conv2d(3, 3, 4, padding="same", groups=3, dtype="float64"),  # depthwise, an even kernel padded "same"
     {"type": "Conv2d", "in_channels": 3, "out_channels": 3, "kernel_size": [4, 4], "stride": [1, 1],
      "padding": "same", "dilation": [1, 1], "groups": 3, "bias": True, "dtype": "float64"}),
    (nn.MaxPool2d(3, stride=2, padding=1), {"type": "MaxPool2d", "kernel_size": [3, 3], "stride": [2, 2],
                                            "padding": [1, 1]}),
    (nn.MaxPool2d((2, 3)), {"type": "MaxPool2d", "kernel_size": [2, 3], "stride": [2, 3], "padding": [0, 0]}),
    (nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
     {"type": "AvgPool2d", "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "count_include_pad": False}),
    (nn.GlobalAvgPool2d(), {"type": "GlobalAvgPool2d"}),
    (nn.BatchNorm2d(3, eps=1e-3, momentum=None), {"type": "BatchNorm2d", "num_features": 3, "eps": 1e-3,
                                                  "momentum": None, "affine": True, "track_running_stats": True,
                                                  "dtype": "float32"}),
    (nn.BatchNorm2d(3, dtype="float64"), {"type": "BatchNorm2d", "num_features": 3, "eps": 1e-5, "momentum": 0.1,
                                          "affine": True, "track_running_stats": True, "dtype": "float64"}),
    (nn.BatchNorm2d(3, affine=False, track_running_stats=False),  # no state, so no dtype of its own
     {"type": "BatchNorm2d", "num_features": 3, "eps": 1e-5, "momentum": 0.1, "affine": False,
      "track_running_stats": False, "dtype": "float32"}),
])
def test_every_layer_round_trips_with_the_same_outputs(layer, node):
    x = _images(dtype=np.float64 if node.get("dtype") == "float64" else np.float32)
    spec = _round_trip(layer, x)
    assert spec == {"version": 1, "model": node}


def test_residual_blocks_nest_and_round_trip():
    block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1))
    down = nn.Residual(nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()),
                       shortcut=nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(4, 8, 1, bias=False)))
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Residual(block), nn.ReLU(),
                          nn.Residual(nn.Residual(nn.Sequential(nn.ReLU()))), down, nn.GlobalAvgPool2d(),
                          nn.Linear(8, 5))
    spec = _round_trip(model, _images())
    layers = spec["model"]["layers"]
    assert layers[1]["type"] == "Residual" and layers[1]["shortcut"] is None
    assert layers[1]["block"]["layers"][1]["type"] == "BatchNorm2d"
    assert layers[3]["block"] == {"type": "Residual", "block": {"type": "Sequential", "layers": [{"type": "ReLU"}]},
                                  "shortcut": None}
    assert [n["type"] for n in layers[4]["shortcut"]["layers"]] == ["AvgPool2d", "Conv2d"]
    # a Residual without its shortcut field is the identity shortcut
    short = {"version": 1, "model": {"type": "Residual", "block": {"type": "ReLU"}}}
    assert architecture_of(model_from_architecture(short))["model"]["shortcut"] is None


def test_an_integer_pair_is_read_as_both_and_written_as_a_list():
    spec = {"version": 1, "model": {"type": "Conv2d", "in_channels": 1, "out_channels": 2, "kernel_size": 3,
                                    "padding": 1}}
    conv = model_from_architecture(spec)
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
    assert architecture_of(conv)["model"]["kernel_size"] == [3, 3]


def _conv(**fields):
    return {"version": 1, "model": {"type": "Sequential", "layers": [
        {"type": "ReLU"}, {"type": "Conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 3, **fields}]}}


@pytest.mark.parametrize("spec, message", [
    (_conv(kernel_size=[3]), "model.layers[1].kernel_size: expected an integer or a list of two integers, got [3]"),
    (_conv(stride=[1, "2"]), "model.layers[1].stride: expected an integer or a list of two integers"),
    (_conv(padding="valid"), "model.layers[1].padding: expected an integer or a list of two integers, or \"same\""),
    (_conv(dilation=True), "model.layers[1].dilation: expected an integer or a list of two integers, got True"),
    (_conv(groups=2), "model.layers[1]: Conv2d: groups=2 must divide in_channels=3"),
    (_conv(bias=1), "model.layers[1].bias: expected true or false, got 1"),
    (_conv(dtype="int8"), "model.layers[1].dtype: expected one of float16, float32, float64"),
    (_conv(weight=[1]), "model.layers[1]: Conv2d has no argument 'weight'"),
    ({"version": 1, "model": {"type": "Conv2d", "in_channels": 3, "out_channels": 4}}, "Conv2d needs 'kernel_size'"),
    ({"version": 1, "model": {"type": "MaxPool2d"}}, "model: MaxPool2d needs 'kernel_size'"),
    ({"version": 1, "model": {"type": "MaxPool2d", "kernel_size": 2, "padding": 2}},
     "model: MaxPool2d: padding (2, 2) must be at most half of kernel_size (2, 2)"),
    ({"version": 1, "model": {"type": "AvgPool2d", "kernel_size": 2, "count_include_pad": "yes"}},
     "model.count_include_pad: expected true or false, got 'yes'"),
    ({"version": 1, "model": {"type": "GlobalAvgPool2d", "keepdim": True}},
     "GlobalAvgPool2d has no argument 'keepdim'; its arguments: none"),
    ({"version": 1, "model": {"type": "BatchNorm2d", "num_features": 0}}, "model: BatchNorm2d: num_features"),
    ({"version": 1, "model": {"type": "BatchNorm2d", "num_features": 3, "momentum": "fast"}},
     "model.momentum: expected a number or null, got 'fast'"),
    ({"version": 1, "model": {"type": "Residual"}}, "model: Residual takes 'block' (a layer) and 'shortcut'"),
    ({"version": 1, "model": {"type": "Residual", "block": {"type": "ReLU"}, "skip": None}},
     "got fields ['block', 'skip', 'type']"),
    ({"version": 1, "model": {"type": "Residual", "block": [{"type": "ReLU"}]}},
     "model.block: a layer must be a JSON object"),
    ({"version": 1, "model": {"type": "Residual", "block": {"type": "ReLU"},
                              "shortcut": {"type": "Conv2d", "in_channels": 1, "out_channels": 1, "kernel_size": 0}}},
     "model.shortcut: Conv2d: kernel_size"),
    ({"version": 1, "model": {"type": "Sequential", "layers": [{"type": "Residual", "block": {"type": "Conv3d"}}]}},
     "model.layers[0].block: unknown layer type 'Conv3d'; known: Sequential, Residual, Linear, Conv2d"),
])
def test_a_bad_field_is_refused_naming_its_place(spec, message):
    with pytest.raises(ArchitectureError) as info:
        model_from_architecture(spec)
    assert message in str(info.value)


def test_a_subclass_has_no_description_naming_its_place():
    class MyConv(nn.Conv2d):
        pass

    with pytest.raises(ArchitectureError, match=r"model\[1\]\.block\[0\] is a .*MyConv, which has no JSON"):
        architecture_of(nn.Sequential(nn.ReLU(), nn.Residual(nn.Sequential(MyConv(1, 1, 1)))))


def _spec(*layers):
    return architecture_of(nn.Sequential(*layers))


@pytest.mark.parametrize("layers, features, channels, outputs", [
    # LeNet: images in, rows out
    ((nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(72, 10)), None, 1, 10),
    # a pooling first: still images, the channels from the first convolution
    ((nn.MaxPool2d(2), nn.Conv2d(3, 8, 3), nn.GlobalAvgPool2d(), nn.Linear(8, 4)), None, 3, 4),
    ((nn.BatchNorm2d(2), nn.Conv2d(2, 8, 3)), None, 2, None),  # ends in a convolution: no rows out
    # all-convolutional: the classes are the last convolution's channels, after the global pooling
    ((nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 10, 1), nn.BatchNorm2d(10), nn.MaxPool2d(2),
      nn.GlobalAvgPool2d(), nn.Flatten()), None, 3, 10),
    ((nn.Conv2d(3, 8, 3), nn.MaxPool2d(2)), None, 3, None),
    ((nn.Residual(nn.Conv2d(4, 4, 3, padding=1)), nn.GlobalAvgPool2d()), None, 4, 4),  # a Residual's block counts
    ((nn.Flatten(), nn.Linear(12, 5), nn.ReLU()), 12, None, 5),  # an MLP: rows in and out
    ((nn.GlobalAvgPool2d(), nn.Linear(3, 2)), None, None, 2),
])
def test_input_and_output_widths_of_convolutional_models(layers, features, channels, outputs):
    spec = _spec(*layers)
    assert (input_features(spec), input_channels(spec), output_features(spec)) == (features, channels, outputs)
