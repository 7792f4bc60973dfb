"""ONNX export (deepcore.export.to_onnx, ``deepcore export``): each layer and composite models run in
onnxruntime and compared with deepcore's inference output, at batch sizes other than the example's."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import deepcore as dc
from deepcore import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from deepcore.export import DEFAULT_OPSET, ExportError, to_onnx  # noqa: E402

from .helpers import ROOT  # noqa: E402

RTOL = ATOL = 1e-5


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics (a few training passes)."""
    rng = np.random.default_rng(seed)
    for _, m in model.named_modules():
        if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
            if m.weight is not None:
                m.weight.value = rng.uniform(0.5, 1.5, m.weight.shape).astype(m.weight.value.dtype)
                m.bias.value = rng.normal(size=m.bias.shape).astype(m.bias.value.dtype)
    return model


def _warm_stats(model: nn.Module, shape: tuple[int, ...], dtype=np.float32) -> None:
    rng = np.random.default_rng(1)
    for _ in range(3):
        model.forward((rng.normal(size=(8, *shape)) * 2 + 0.5).astype(dtype), train=True)


def check_export(tmp_path: Path, model: nn.Module, sample_shape: tuple[int, ...], *, batches=(1, 5, 9),
                 dtype=np.float32, opset: int | None = None, tol: float = ATOL) -> ort.InferenceSession:
    rng = np.random.default_rng(42)
    example = rng.normal(size=(3, *sample_shape)).astype(dtype)
    path = to_onnx(model, example, tmp_path / "model.onnx", opset=opset)
    assert path == tmp_path / "model.onnx" and path.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    sess = _session(path)
    assert sess.get_inputs()[0].shape[0] == "N"  # a dynamic batch dimension
    for n in batches:
        x = rng.normal(size=(n, *sample_shape)).astype(dtype)
        got = sess.run(None, {"input": x})[0]
        want = np.asarray(model(x))
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    return sess


# ------------------------------------------------------------------ each layer
@pytest.mark.parametrize("layer, shape", [
    (lambda: nn.Linear(6, 4), (6,)),
    (lambda: nn.Linear(6, 4, bias=False), (6,)),
    (lambda: nn.Linear(6, 4), (3, 6)),  # (N, L, F): MatMul + Add
    (lambda: nn.ReLU(), (7,)),
    (lambda: nn.LeakyReLU(0.2), (7,)),
    (lambda: nn.Sigmoid(), (7,)),
    (lambda: nn.Tanh(), (7,)),
    (lambda: nn.Softmax(), (7,)),
    (lambda: nn.Softmax(axis=1), (4, 3)),
    (lambda: nn.Dropout(0.5), (7,)),
    (lambda: nn.Flatten(), (2, 3, 4)),
    (lambda: nn.Flatten(start_dim=2), (2, 3, 4)),
    (lambda: nn.Flatten(1, 2), (2, 3, 4)),
    (lambda: nn.Sequential(), (5,)),
], ids=["linear", "linear-nobias", "linear-3d", "relu", "leaky", "sigmoid", "tanh", "softmax", "softmax-axis1",
        "dropout", "flatten", "flatten-2", "flatten-1-2", "empty-sequential"])
def test_dense_layers(tmp_path, layer, shape):
    dc.manual_seed(0)
    check_export(tmp_path, layer(), shape)


@pytest.mark.parametrize("kwargs, shape", [
    ({}, (5,)),
    ({}, (5, 7)),  # (N, C, L)
    ({"affine": False}, (5,)),
    ({"track_running_stats": False}, (5,)),  # normalised with the batch's own statistics, as in deepcore
    ({"track_running_stats": False}, (5, 7)),
    ({"eps": 1e-2, "momentum": None}, (5, 7)),
])
def test_batchnorm1d(tmp_path, kwargs, shape):
    model = _randomise(nn.BatchNorm1d(5, **kwargs))
    if model.track_running_stats:
        _warm_stats(model, shape)
    check_export(tmp_path, model, shape, batches=(2, 6))


@pytest.mark.parametrize("kwargs", [
    {},
    {"stride": 2, "padding": 1},
    {"stride": (2, 1), "padding": (0, 2)},
    {"padding": "same"},  # 3x3: symmetric
    {"kernel_size": (4, 2), "padding": "same"},  # even kernel: one less row/column on top/left
    {"kernel_size": 2, "padding": "same", "dilation": 3},
    {"dilation": (2, 1), "padding": 2},
    {"groups": 2},
    {"groups": 4, "bias": False},
    {"padding": "valid"},
], ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_conv2d(tmp_path, kwargs):
    kwargs = {"kernel_size": 3, **kwargs}
    dc.manual_seed(0)
    check_export(tmp_path, nn.Conv2d(4, 8, **kwargs), (4, 9, 10))


@pytest.mark.parametrize("layer", [
    lambda: nn.MaxPool2d(2),
    lambda: nn.MaxPool2d(3, stride=2, padding=1),
    lambda: nn.MaxPool2d((3, 2), stride=(1, 2)),
    lambda: nn.AvgPool2d(2),
    lambda: nn.AvgPool2d(3, stride=2, padding=1),
    lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
    lambda: nn.AvgPool2d((2, 3), stride=1, padding=(1, 1), count_include_pad=False),
    lambda: nn.GlobalAvgPool2d(),
], ids=["max2", "max3s2p1", "max-rect", "avg2", "avg3s2p1", "avg-exclude-pad", "avg-rect-exclude", "gap"])
def test_pooling(tmp_path, layer):
    check_export(tmp_path, layer(), (3, 9, 8))


def test_batchnorm2d(tmp_path):
    model = _randomise(nn.BatchNorm2d(3))
    _warm_stats(model, (3, 5, 4))
    check_export(tmp_path, model, (3, 5, 4))


@pytest.mark.parametrize("with_shortcut", [False, True])
def test_residual(tmp_path, with_shortcut):
    dc.manual_seed(0)
    if with_shortcut:
        block = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))
        model = nn.Residual(block, nn.Conv2d(3, 6, 1, stride=2))
    else:
        model = nn.Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Tanh()))
    check_export(tmp_path, model, (3, 8, 8))


# ------------------------------------------------------------- composite models
def test_mlp_with_batchnorm_and_dropout(tmp_path):
    dc.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(32, 16), nn.LeakyReLU(0.1), nn.Dropout(0.1), nn.Linear(16, 10), nn.Softmax())
    _randomise(model)
    _warm_stats(model, (20,))
    check_export(tmp_path, model, (20,), batches=(1, 7, 64))


def test_cnn(tmp_path):
    dc.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(8, 8, 3, padding="same"), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Residual(block), nn.ReLU(),
        nn.Residual(nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()), nn.Conv2d(8, 16, 1, stride=2)),
        nn.AvgPool2d(2, padding=1, count_include_pad=False), nn.GlobalAvgPool2d(), nn.Linear(16, 10))
    _randomise(model)
    _warm_stats(model, (3, 16, 16))
    check_export(tmp_path, model, (3, 16, 16), batches=(1, 4, 11))


def test_cnn_flatten_head(tmp_path):
    dc.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 10))
    check_export(tmp_path, model, (1, 8, 8))


def test_float64(tmp_path):
    dc.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, dtype="float64"), nn.BatchNorm1d(5, dtype="float64"), nn.Tanh(),
                          nn.Linear(5, 3, dtype="float64"))
    _warm_stats(model, (6,), np.float64)
    check_export(tmp_path, model, (6,), dtype=np.float64, tol=1e-12)


@pytest.mark.parametrize("opset", [13, "newest"])
def test_opsets(tmp_path, opset):
    opset = onnx.defs.onnx_opset_version() if opset == "newest" else opset
    dc.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.GlobalAvgPool2d(), nn.Linear(4, 3),
                          nn.Softmax())
    try:
        check_export(tmp_path, model, (2, 6, 6), opset=opset)
    except ort.capi.onnxruntime_pybind11_state.Fail as exc:  # a runtime older than the onnx package
        if "opset" not in str(exc).lower():
            raise
        pytest.skip(f"onnxruntime does not run opset {opset}: {exc}")
    assert onnx.load(tmp_path / "model.onnx").opset_import[0].version == opset


def test_default_opset_and_metadata(tmp_path):
    to_onnx(nn.Sequential(nn.Linear(3, 2)), np.zeros((2, 3), np.float32), tmp_path / "m.onnx")
    proto = onnx.load(tmp_path / "m.onnx")
    assert proto.opset_import[0].version == DEFAULT_OPSET
    assert proto.producer_name == "deepcore"
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["output"]


def test_torch_model(tmp_path):
    """A model on another backend exports from its own arrays (a torch tensor as the example)."""
    torch = pytest.importorskip("torch")
    with dc.use_backend("torch"):
        dc.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    path = to_onnx(model, torch.zeros((2, 4)), tmp_path / "t.onnx")
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_session(path).run(None, {"input": x})[0], want, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------- refusals
class Doubler(nn.Module):
    def forward(self, x, train=False):
        return x * 2, lambda dy: dy * 2


class MyReLU(nn.ReLU):
    pass


@pytest.mark.parametrize("bad, where, kind", [
    (Doubler, "'1.block.0'", "not a built-in layer"),
    (MyReLU, "'1.block.0'", "a subclass of ReLU"),
])
def test_unexportable_layer_is_named(tmp_path, bad, where, kind):
    model = nn.Sequential(nn.Linear(4, 4), nn.Residual(nn.Sequential(bad(), nn.ReLU())))
    with pytest.raises(ExportError) as err:
        to_onnx(model, np.zeros((2, 4), np.float32), tmp_path / "m.onnx")
    message = str(err.value)
    assert where in message and bad.__qualname__ in message and kind in message
    assert "exportable" in message and "Conv2d" in message
    assert not (tmp_path / "m.onnx").exists()


def test_unexportable_model_itself(tmp_path):
    with pytest.raises(ExportError, match="the model is a .*Doubler"):
        to_onnx(Doubler(), np.zeros((2, 4), np.float32), tmp_path / "m.onnx")


def test_bad_arguments(tmp_path):
    model = nn.Sequential(nn.Linear(4, 2))
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(ExportError, match="opset must be an integer from 13"):
        to_onnx(model, x, tmp_path / "m.onnx", opset=7)
    with pytest.raises(ExportError, match="example_input has dtype float64 but the model's '0.weight' is float32"):
        to_onnx(model, x.astype(np.float64), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="floating-point"):
        to_onnx(model, x.astype(np.int64), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"Linear\(4, 2\): input x must have shape"):
        to_onnx(model, np.zeros((2, 5), np.float32), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="model must be a deepcore.nn.Module"):
        to_onnx(lambda x: x, x, tmp_path / "m.onnx")


# ---------------------------------------------------------- deepcore export CLI
def _deepcore(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "deepcore", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def _test_split(ckpt: Path):
    from deepcore import data
    from deepcore.checkpoint import load_checkpoint

    settings = load_checkpoint(ckpt).extra["settings"]
    splits = data.load_dataset("digits", seed=settings["seed"], val_fraction=settings["val_fraction"])
    return np.asarray(splits.test.x), np.asarray(splits.test.y)


@pytest.mark.slow
@pytest.mark.parametrize("model_flags, image", [
    (["--model", "mlp", "--hidden", "32", "--batchnorm", "--dropout", "0.1"], False),
    (["--model", "cnn", "--channels", "4,8", "--hidden", "16", "--batchnorm"], True),
], ids=["mlp", "cnn"])
def test_cli_export_matches_predict(tmp_path, model_flags, image):
    run = _deepcore("train", "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet", *model_flags, cwd=tmp_path)
    if run.returncode != 0:
        pytest.fail(f"deepcore train failed: {run.stderr}")
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    out = _deepcore("export", str(ckpt), "-o", str(tmp_path / "model.onnx"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and "model.onnx" in out.stdout

    x, y = _test_split(ckpt)
    np.savez(tmp_path / "test.npz", x=x)
    pred = _deepcore("predict", str(ckpt), str(tmp_path / "test.npz"), cwd=tmp_path)
    assert pred.returncode == 0, pred.stderr
    rows = list(csv.DictReader(io.StringIO(pred.stdout)))
    want_classes = np.array([int(r["class"]) for r in rows])
    want_probs = np.array([[float(r[f"p_{k}"]) for k in range(10)] for r in rows])

    sess = _session(tmp_path / "model.onnx")
    inputs = x.reshape(len(x), 1, 8, 8) if image else x.reshape(len(x), -1)
    logits = sess.run(None, {"input": inputs.astype(np.float32)})[0]
    np.testing.assert_array_equal(np.argmax(logits, axis=1), want_classes)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(axis=1, keepdims=True), want_probs, atol=1e-5)

    ev = _deepcore("evaluate", str(ckpt), "--json", "--no-plot", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    import json

    accuracy = json.loads(ev.stdout)["accuracy"]
    assert np.mean(np.argmax(logits, axis=1) == y) == pytest.approx(accuracy)


def test_cli_export_errors(tmp_path):
    from deepcore.checkpoint import save_checkpoint
    from deepcore.cli import main
    from deepcore.nn.spec import architecture_of

    dc.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GlobalAvgPool2d(), nn.Linear(2, 3))
    ckpt = tmp_path / "conv.safetensors"
    save_checkpoint(ckpt, conv, extra={"architecture": architecture_of(conv)})
    assert main(["export", str(ckpt), "-o", str(tmp_path / "x.txt")]) == 2
    assert main(["export", str(tmp_path / "missing.safetensors")]) == 2
    assert main(["export", str(ckpt), "--opset", "9"]) == 2
    assert main(["export", str(ckpt)]) == 2  # no recorded image shape and no --input-shape
    assert main(["export", str(ckpt), "--input-shape", "3,8,8"]) == 2  # 3 channels for a 1-channel model
    assert main(["export", str(ckpt), "--input-shape", "1,6,6"]) == 0
    x = np.random.default_rng(0).normal(size=(3, 1, 6, 6)).astype(np.float32)
    got = _session(tmp_path / "conv.onnx").run(None, {"input": x})[0]
    np.testing.assert_allclose(got, np.asarray(conv(x)), rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------ deepcore info
def test_info_lists_optional_integrations(capsys):
    import json

    from deepcore.cli import main

    assert main(["info", "--json"]) == 0
    integrations = json.loads(capsys.readouterr().out)["integrations"]
    assert set(integrations) == {"onnx", "onnxruntime", "torch", "jax", "cupy", "mpi4py", "dask", "numba"}
    assert integrations["onnx"] == onnx.__version__ and integrations["onnxruntime"] == ort.__version__
    assert main(["info"]) == 0
    assert f"onnx {onnx.__version__}" in capsys.readouterr().out


def test_optional_integrations_import_nothing():
    code = ("import sys; from deepcore.sysinfo import optional_integrations; optional_integrations(); "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'jax', 'cupy', 'dask') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
