"""``deepcore train --model cnn``: the default networks per image shape, the data seen as (N, C, H, W)
images, ``--channels`` and ``--input-shape``, and ``deepcore evaluate`` / ``predict`` on a convolutional
checkpoint (the image shape it records, images or flat rows in)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from deepcore import data, nn
from deepcore.checkpoint import load_checkpoint, save_checkpoint
from deepcore.cli import main
from deepcore.cli.models import build_model, cnn_plan, model_size
from deepcore.cli.train import _describe_model
from deepcore.nn.spec import architecture_of

SEED = 1
TRAIN = ["train", "--model", "cnn", "--channels", "8,16", "--hidden", "32", "--epochs", "2", "--schedule", "none",
         "--seed", str(SEED), "--quiet"]


def _accuracy(out: str) -> float:
    return float(re.search(r"test accuracy ([\d.]+)%", out).group(1))


def _one_line_error(capsys, code, status, *fragments):
    assert code == status
    err = capsys.readouterr().err
    assert err.startswith("deepcore: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short cnn run on the embedded digits: its checkpoint and what it printed."""
    out_dir = tmp_path_factory.mktemp("cnn") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([*TRAIN, "--out", str(out_dir)]) == 0
    return SimpleNamespace(ckpt=out_dir / "checkpoint.safetensors", out=buf.getvalue())


def _test_images():
    return data.as_images(data.load_dataset("digits", seed=SEED, val_fraction=0.1)).test


def _reference_logits(ckpt, x):
    """The trained model built from the training flags (not from the recorded architecture)."""
    model = build_model("cnn", 64, 10, [32], image_shape=(1, 8, 8), channels=[8, 16], seed=SEED)
    load_checkpoint(ckpt, model)
    return np.asarray(model(x.astype(np.float32)), dtype=np.float64)


# ------------------------------------------------------------------------ training
def test_a_cnn_trains_on_the_digits_as_images_and_records_its_shape(run):
    ckpt = load_checkpoint(run.ckpt)
    extra = ckpt.extra
    assert extra["input_shape"] == [1, 8, 8]
    settings = extra["settings"]
    assert (settings["model"], settings["channels"], settings["input_shape"], settings["hidden"]) == \
        ("cnn", "8,16", "1,8,8", "32")
    layers = [n["type"] for n in extra["architecture"]["model"]["layers"]]
    assert layers == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear", "ReLU",
                      "Linear"]
    first = extra["architecture"]["model"]["layers"][0]
    assert (first["in_channels"], first["out_channels"], first["kernel_size"], first["padding"]) == (1, 8, [3, 3],
                                                                                                   [1, 1])
    assert extra["architecture"]["model"]["layers"][7]["in_features"] == 16 * 2 * 2  # 8 -> 4 -> 2
    assert extra["test"]["accuracy"] == pytest.approx(_accuracy(run.out) / 100, abs=1e-4)
    assert _accuracy(run.out) > 50  # two epochs of a small net: well above chance


def test_every_epochs_checkpoint_records_the_image_shape(tmp_path):
    """fit's own per-epoch checkpoints carry the run's settings, the image shape among them."""
    out = tmp_path / "r"
    assert main(["train", "--model", "cnn", "--channels", "4", "--hidden", "8", "--epochs", "1", "--quiet",
                 "--out", str(out)]) == 0
    extra = load_checkpoint(out / "checkpoint.safetensors").extra
    assert extra["settings"]["input_shape"] == "1,8,8"


@pytest.mark.slow
def test_the_default_cnn_reaches_97_percent_on_the_digits(tmp_path, capsys):
    assert main(["train", "--model", "cnn", "--quiet", "--out", str(tmp_path / "o")]) == 0
    assert _accuracy(capsys.readouterr().out) >= 97.0


def test_the_run_line_names_the_images_and_the_title_the_net(tmp_path, capsys):
    out = tmp_path / "o"
    assert main([*TRAIN[:-1], "--epochs", "1", "--batchnorm", "--dropout", "0.1", "--out", str(out)]) == 0
    assert "1x8x8 images, 10 classes" in capsys.readouterr().out.splitlines()[0]
    args = SimpleNamespace(model="cnn", channels="8,16", hidden="32", batchnorm=True, dropout=0.1)
    assert _describe_model(args) == "cnn 8,16 + fc 32 + BatchNorm + dropout 0.1"
    layers = load_checkpoint(out / "checkpoint.safetensors").extra["architecture"]["model"]["layers"]
    types = [n["type"] for n in layers]
    assert types[:3] == ["Conv2d", "BatchNorm2d", "ReLU"] and types[-5:] == ["Linear", "BatchNorm1d", "ReLU",
                                                                               "Dropout", "Linear"]


def test_help_and_the_readme_name_the_cnn(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "{linear,mlp,cnn}" in text and "--channels" in text and "--input-shape C,H,W" in text
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "--model linear|mlp|cnn" in readme and "deepcore train --model cnn --out cnn-run" in readme


# --------------------------------------------------------------- the default nets
def _count(model) -> int:
    state = model.state_dict()
    return sum(int(np.asarray(v).size) for k, v in state.items() if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("shape, channels, kinds, features", [
    ((1, 28, 28), None, ["Conv2d", "ReLU", "MaxPool2d"] * 2 + ["Flatten"], 64 * 7 * 7),  # LeNet, 5x5 kernels
    ((3, 32, 32), [4, 8], (["Conv2d", "BatchNorm2d", "ReLU"] * 2 + ["MaxPool2d"]) * 2 + ["GlobalAvgPool2d"], 8),
    ((1, 5, 3), [2, 3, 4], ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "Conv2d", "ReLU", "Flatten"], 4 * 2 * 1),
])
def test_the_default_net_for_each_image_shape(shape, channels, kinds, features):
    plan = cnn_plan(shape, 10, channels, [16])
    assert [p.kind for p in plan] == [*kinds, "Linear", "ReLU", "Linear"]
    assert plan[len(kinds)].args["in_features"] == features
    if shape[1] == 28:
        assert plan[0].args["kernel_size"] == 5 and plan[0].args["padding"] == 2
    model = build_model("cnn", math.prod(shape), 10, [16], image_shape=shape, channels=channels)
    x = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
    assert np.asarray(model.forward(x, train=True)[0]).shape == (2, 10)
    assert _count(model) == model_size("cnn", math.prod(shape), 10, [16], image_shape=shape, channels=channels)


def test_the_vgg_default_widths_and_batchnorm_always():
    plan = cnn_plan((3, 32, 32), 10, None, [])
    convs = [p.args["out_channels"] for p in plan if p.kind == "Conv2d"]
    assert convs == [32, 32, 64, 64, 128, 128]
    assert all(not p.args["bias"] for p in plan if p.kind == "Conv2d")  # BatchNorm follows each
    assert [p.kind for p in plan[-2:]] == ["GlobalAvgPool2d", "Linear"]


def _fake_mnist(folder) -> None:
    import gzip
    import struct

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
        labels = (np.arange(20) % 10).astype(np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 20, 28, 28) + images.tobytes()))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 20) + labels.tobytes()))


def test_mnist_files_train_a_lenet_on_28x28_images(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DEEPCORE_DATA", str(tmp_path / "cache"))
    _fake_mnist(tmp_path / "mnist")
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-download", "--no-verify",
                 "--model", "cnn", "--channels", "4,8", "--hidden", "8", "--epochs", "1", "--val-fraction", "0",
                 "--out", str(tmp_path / "o")]) == 0
    assert "1x28x28 images" in capsys.readouterr().out
    extra = load_checkpoint(tmp_path / "o" / "checkpoint.safetensors").extra
    assert extra["input_shape"] == [1, 28, 28]
    assert extra["architecture"]["model"]["layers"][0]["kernel_size"] == [5, 5]


def test_cifar_batches_train_a_vgg_on_channel_major_images(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DEEPCORE_DATA", str(tmp_path / "cache"))
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    records = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rec = rng.integers(0, 256, (4, 3073), dtype=np.uint8)
        rec[:, 0] = np.arange(4) % 10
        (folder / f"{name}.bin").write_bytes(rec.tobytes())
        records[name] = rec
    splits = data.as_images(data.load_dataset("cifar10", data_dir=tmp_path, download=False, verify=False))
    # a record is 1024 red, then 1024 green, then 1024 blue bytes: channel c is the c-th plane
    blue = records["test_batch"][1, 1 + 2048:].reshape(32, 32)
    np.testing.assert_array_equal(splits.test.x[1, 2], blue / np.float32(255))
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--no-download", "--no-verify",
                 "--model", "cnn", "--channels", "2,4", "--hidden", "8", "--epochs", "1", "--val-fraction", "0",
                 "--batch-size", "4", "--quiet", "--out", str(tmp_path / "o")]) == 0
    extra = load_checkpoint(tmp_path / "o" / "checkpoint.safetensors").extra
    assert extra["input_shape"] == [3, 32, 32]
    assert [n["type"] for n in extra["architecture"]["model"]["layers"]][:4] == ["Conv2d", "BatchNorm2d", "ReLU",
                                                                                "Conv2d"]


# ------------------------------------------------------------------ the data as images
def test_as_images_reshapes_without_a_copy():
    splits = data.load_dataset("digits", val_fraction=0.1)
    images = data.as_images(splits)
    for part in ("train", "val", "test"):
        flat, img = getattr(splits, part), getattr(images, part)
        assert img.x.shape == (len(flat), 1, 8, 8) and np.shares_memory(img.x, flat.x)
        assert img.y is flat.y
    assert images.input_shape == (1, 8, 8) and images.num_features == 64
    assert data.image_shape((3, 32, 32)) == (3, 32, 32) and data.image_shape((28, 28)) == (1, 28, 28)
    with pytest.raises(ValueError, match=r"as_images: shape \(1, 8, 9\) holds 72 values per sample, but digits"):
        data.as_images(splits, (1, 8, 9))
    with pytest.raises(ValueError, match=r"expected an image shape \(H, W\) or \(C, H, W\).*got \(64,\)"):
        data.image_shape((64,))


def _blobs(shape, n=120, seed=0):
    """Images whose class is which quarter of the first channel is bright."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    x = rng.random((n, *shape), dtype=np.float32) * 0.1
    h, w = shape[-2] // 2, shape[-1] // 2
    for i, k in enumerate(y):
        r, c = divmod(int(k), 2)
        (x[i, 0] if len(shape) == 3 else x[i])[r * h:(r + 1) * h, c * w:(c + 1) * w] += 1
    return x, y


@pytest.mark.parametrize("shape, flags, seen", [
    ((2, 6, 6), [], "2x6x6 images"),  # x (N, C, H, W)
    ((6, 6), [], "1x6x6 images"),  # x (N, H, W): one channel
    ((72,), ["--input-shape", "2,6,6"], "2x6x6 images"),  # flat rows with their shape
])
def test_a_user_npz_of_images_trains_a_cnn(tmp_path, capsys, shape, flags, seen):
    x, y = _blobs(shape if len(shape) > 1 else (2, 6, 6))
    path = tmp_path / "imgs.npz"
    np.savez(path, x=x.reshape(len(x), *shape), y=y)
    assert main(["train", "--dataset", str(path), "--model", "cnn", "--channels", "4", "--hidden", "8",
                 "--epochs", "10", "--batch-size", "16", "--optimizer", "adam", "--lr", "0.01", *flags,
                 "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert seen in out.splitlines()[0]
    assert _accuracy(out) > 90
    ckpt = tmp_path / "o" / "checkpoint.safetensors"
    assert main(["evaluate", str(ckpt), "--json", "--no-plot"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(_accuracy(out) / 100, abs=1e-4)


def test_a_csv_of_flat_rows_trains_with_its_input_shape(tmp_path, capsys):
    x, y = _blobs((1, 4, 4), n=60)
    path = tmp_path / "rows.csv"
    np.savetxt(path, np.c_[x.reshape(60, 16), y], delimiter=",", fmt="%.4f")
    args = ["train", "--dataset", str(path), "--model", "cnn", "--channels", "2", "--hidden", "4", "--epochs", "1"]
    _one_line_error(capsys, main([*args, "--out", str(tmp_path / "o")]), 2, f"the rows of {path} are flat",
                    "--input-shape C,H,W")
    _one_line_error(capsys, main([*args, "--input-shape", "1,4,5", "--out", str(tmp_path / "o")]), 2,
                    "--input-shape 1,4,5: 20 values per sample, but", "has 16 features per sample")
    assert main([*args, "--input-shape", "1,4,4", "--out", str(tmp_path / "o")]) == 0
    assert "1x4x4 images" in capsys.readouterr().out


# ------------------------------------------------------------------- flags refused
@pytest.mark.parametrize("flags, message", [
    (["--channels", "32,x"], "--channels must be comma-separated positive integers, got '32,x'"),
    (["--channels", "0,8"], "--channels must be comma-separated positive integers, got '0,8'"),
    (["--channels", ","], "--channels must be comma-separated positive integers, got ','"),
    (["--model", "mlp", "--channels", "8"], "--channels applies to --model cnn, not to --model mlp"),
    (["--model", "linear", "--input-shape", "1,8,8"], "--input-shape applies to --model cnn, not to --model linear"),
    (["--input-shape", "8,8"], "--input-shape must be C,H,W, three positive integers"),
    (["--input-shape", "1,0,64"], "--input-shape must be C,H,W, three positive integers"),
    (["--input-shape", "1,4,16"], "--input-shape 1,4,16: digits has images of 1x8x8 (C,H,W)"),
    (["--dataset", "cifar10", "--input-shape", "1,8,8"], "--input-shape 1,8,8: cifar10 has images of 3x32x32"),
    # 1*1e5*9 + 1e5, 1e5*1e5*9 + 1e5, then (1e5*2*2)*256 + 256 and 256*10 + 10
    (["--channels", "100000,100000"], "--channels 100000,100000, --hidden 256: the lenet 3x3 100000,100000 cnn "
                                      "for 1x8x8 images has 90,103,502,826 parameters"),
])
def test_bad_cnn_flags_are_one_line_errors_before_anything_runs(tmp_path, capsys, flags, message):
    argv = ["train", "--model", "cnn", *flags, "--out", str(tmp_path / "o")]
    if flags[0] == "--model":
        argv = ["train", *flags, "--out", str(tmp_path / "o")]
    _one_line_error(capsys, main(argv), 2, message)
    assert not (tmp_path / "o").exists()


def test_a_cnn_too_big_for_memory_names_channels_and_hidden(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("deepcore.data.limits.memory_limit", lambda: 50 << 20)
    err = _one_line_error(capsys, main(["train", "--model", "cnn", "--dataset", "cifar10", "--no-download",
                                        "--data-dir", str(tmp_path / "none"), "--hidden", "64",
                                        "--out", str(tmp_path / "o")]), 2)
    # convolutions without bias 9*(3*32 + 32*32 + 32*64 + 64*64 + 64*128 + 128*128), BatchNorm 4*2*(32+64+128),
    # then 128*64 + 64 and 64*10 + 10
    assert "--channels 32,64,128, --hidden 64: the vgg 32,64,128 cnn for 3x32x32 images has 297,258 parameters" in err
    assert "at --batch-size 64 needs about" in err and "more than the 50.0 MiB of memory available" in err
    assert "choose smaller --channels or --hidden widths, or a smaller --batch-size" in err


def test_a_flat_npz_needs_the_input_shape(tmp_path, capsys):
    np.savez(tmp_path / "flat.npz", x=np.zeros((20, 12), np.float32), y=np.arange(20) % 2)
    _one_line_error(capsys, main(["train", "--dataset", str(tmp_path / "flat.npz"), "--model", "cnn",
                                  "--out", str(tmp_path / "o")]), 2,
                    "--model cnn needs images, but", "has flat rows of 12 features", "--input-shape C,H,W")


# ------------------------------------------------------------------------- resume
def test_resume_takes_the_channels_back_and_refuses_others(tmp_path, capsys):
    out = tmp_path / "r"
    assert main([*TRAIN, "--epochs", "1", "--out", str(out)]) == 0
    ckpt = str(out / "checkpoint.safetensors")
    capsys.readouterr()
    _one_line_error(capsys, main(["train", "--resume", ckpt, "--epochs", "2", "--channels", "8,32"]), 2,
                    "--channels 8,32 contradicts", "whose run has --channels 8,16")
    _one_line_error(capsys, main(["train", "--resume", ckpt, "--epochs", "2", "--input-shape", "1,4,16"]), 2,
                    "--input-shape 1,4,16 contradicts", "whose run has --input-shape 1,8,8")
    _one_line_error(capsys, main(["train", "--resume", ckpt, "--epochs", "2", "--model", "mlp"]), 2,
                    "--model mlp contradicts")
    assert main(["train", "--resume", ckpt, "--epochs", "2", "--channels", "8,16", "--input-shape", "1,8,8"]) == 0
    assert len(json.loads((out / "history.json").read_text())["epochs"]) == 2


# ------------------------------------------------------------------ evaluate, predict
def test_evaluate_gives_the_accuracy_training_printed(run, capsys):
    assert main(["evaluate", str(run.ckpt), "--json", "--no-plot"]) == 0
    result = json.loads(capsys.readouterr().out)
    saved = load_checkpoint(run.ckpt).extra["test"]
    assert result["samples"] == 359
    assert result["accuracy"] == pytest.approx(_accuracy(run.out) / 100, abs=1e-4)
    assert result["accuracy"] == pytest.approx(saved["accuracy"]) and result["loss"] == pytest.approx(saved["loss"],
                                                                                                       rel=1e-6)
    test = _test_images()
    assert result["accuracy"] == pytest.approx(np.mean(_reference_logits(run.ckpt, test.x).argmax(axis=1) == test.y))


def _predicted(capsys, argv):
    assert main(argv) == 0
    return list(csv.reader(io.StringIO(capsys.readouterr().out)))


def test_predict_takes_images_or_flat_rows(run, tmp_path, capsys):
    test = _test_images()
    x = test.x[:30]
    np.savez(tmp_path / "nchw.npz", x=x)
    np.savez(tmp_path / "nhw.npz", x=x[:, 0])
    np.savez(tmp_path / "flat.npz", x=x.reshape(30, 64))
    np.savetxt(tmp_path / "flat.csv", x.reshape(30, 64), delimiter=",")
    rows = _predicted(capsys, ["predict", str(run.ckpt), str(tmp_path / "nchw.npz")])
    assert rows[0] == ["row", "class", *(f"p_{j}" for j in range(10))]
    z = _reference_logits(run.ckpt, x)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    table = np.array(rows[1:], dtype=np.float64)
    np.testing.assert_array_equal(table[:, 1], z.argmax(axis=1))
    np.testing.assert_allclose(table[:, 2:], p / p.sum(axis=1, keepdims=True), rtol=2e-5, atol=1e-9)
    for name in ("nhw.npz", "flat.npz", "flat.csv"):
        assert _predicted(capsys, ["predict", str(run.ckpt), str(tmp_path / name)]) == rows, name
    # the whole test split, as images: the accuracy training printed
    np.savez(tmp_path / "all.npz", x=test.x)
    rows = _predicted(capsys, ["predict", str(run.ckpt), str(tmp_path / "all.npz")])
    classes = np.array([int(r[1]) for r in rows[1:]])
    assert np.mean(classes == test.y) == pytest.approx(_accuracy(run.out) / 100, abs=1e-4)


def test_predict_refuses_images_of_another_shape(run, tmp_path, capsys):
    x = _test_images().x[:4]
    ckpt = str(run.ckpt)
    np.savez(tmp_path / "c2.npz", x=x.reshape(4, 2, 4, 8))
    _one_line_error(capsys, main(["predict", ckpt, str(tmp_path / "c2.npz")]), 1,
                    "images of 2x4x8 (C x H x W), but the model in", "takes 1x8x8 images")
    np.savez(tmp_path / "hw.npz", x=np.zeros((4, 7, 7)))
    _one_line_error(capsys, main(["predict", ckpt, str(tmp_path / "hw.npz")]), 1,
                    "samples of shape (7, 7) (one channel), images of 1x7x7")
    np.savetxt(tmp_path / "labelled.csv", np.c_[x.reshape(4, 64), [1, 2, 3, 4]], delimiter=",")
    _one_line_error(capsys, main(["predict", ckpt, str(tmp_path / "labelled.csv")]), 1,
                    "rows of 65 values, but the model in", "takes 1x8x8 images (64 values per row)")
    np.savez(tmp_path / "five.npz", x=np.zeros((4, 1, 2, 2, 2)))
    _one_line_error(capsys, main(["predict", ckpt, str(tmp_path / "five.npz")]), 1, "samples of shape (1, 2, 2, 2)")


def test_a_python_cnn_checkpoint_without_a_recorded_shape(tmp_path, capsys):
    """What fit alone writes: the architecture but no image shape; images still go in, flat rows cannot."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.GlobalAvgPool2d(), nn.Linear(4, 10))
    ckpt = tmp_path / "py.safetensors"
    save_checkpoint(ckpt, model, extra={"architecture": architecture_of(model),
                                        "args": {"dataset": "digits", "seed": SEED}})
    x = _test_images().x[:3]
    np.savez(tmp_path / "img.npz", x=x)
    np.savez(tmp_path / "flat.npz", x=x.reshape(3, 64))
    rows = _predicted(capsys, ["predict", str(ckpt), str(tmp_path / "img.npz")])
    assert [int(r[1]) for r in rows[1:]] == list(np.asarray(model(x)).argmax(axis=1))
    _one_line_error(capsys, main(["predict", str(ckpt), str(tmp_path / "flat.npz")]), 1,
                    "flat rows of 64 values, but", "does not record the image shape", "(N, C, H, W)")
    # evaluate takes the data set's own image shape (the digits' 8x8, one channel)
    assert main(["evaluate", str(ckpt), "--json", "--no-plot"]) == 0
    result = json.loads(capsys.readouterr().out)
    test = _test_images()
    assert result["accuracy"] == pytest.approx(np.mean(np.asarray(model(test.x)).argmax(axis=1) == test.y))
    # a recorded shape that contradicts the model is refused
    save_checkpoint(ckpt, model, extra={"architecture": architecture_of(model), "input_shape": [3, 8, 8]})
    _one_line_error(capsys, main(["predict", str(ckpt), str(tmp_path / "img.npz")]), 1,
                    "the recorded input_shape [3, 8, 8] has 3 channels, but the model's first layer takes 1")
