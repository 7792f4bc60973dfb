"""The ``deepcore`` command: train, info, demo, and one-line errors for bad arguments."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from deepcore.checkpoint import load_checkpoint
from deepcore.cli import main


def _accuracy(out: str) -> float:
    return float(re.search(r"test accuracy ([\d.]+)%", out).group(1))


@pytest.mark.slow
def test_train_with_no_arguments_is_well_above_95_percent(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert _accuracy(out) > 96.0, out
    run = tmp_path / "deepcore-run"
    assert (run / "checkpoint.safetensors").is_file()
    history = json.loads((run / "history.json").read_text())
    assert len(history["epochs"]) == 30
    ckpt = load_checkpoint(run / "checkpoint.safetensors")
    assert ckpt.extra["test"]["accuracy"] == pytest.approx(_accuracy(out) / 100, abs=1e-4)


def test_train_options_and_resume(tmp_path, capsys):
    out_dir = tmp_path / "run"
    args = ["train", "--epochs", "2", "--hidden", "32,16", "--optimizer", "adam", "--reg", "l2:1e-4",
            "--max-norm", "3", "--dropout", "0.1", "--batchnorm", "--warmup", "1", "--schedule", "exponential",
            "--out", str(out_dir)]  # exponential: a run that may go on past its planned epochs
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "test accuracy" in out
    assert main(args[:2] + ["4"] + args[3:] + ["--resume", str(out_dir / "checkpoint.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "epoch 3/4" in out and "epoch 1/4" not in out
    assert len(json.loads((out_dir / "history.json").read_text())["epochs"]) == 4


def test_train_on_a_user_npz(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    assert main(["train", "--dataset", str(tmp_path / "mine.npz"), "--model", "linear", "--epochs", "5",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert _accuracy(capsys.readouterr().out) > 80.0


def test_info_lists_backends_and_reasons(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "deepcore" in out and "numpy" in out and "BLAS" in out
    assert re.search(r"cupy\s+(available|unavailable: .+)", out)
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["numpy"] is True


def test_demo_regression_reaches_the_optimum(capsys):
    assert main(["demo", "regression"]) == 0
    last = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\s*5000 ", line)][0]
    _, loss, w, b = last.split()
    assert float(w) == pytest.approx(0.5, abs=1e-5) and float(b) == pytest.approx(2.0, abs=1e-4)


def test_demo_overfit_shows_the_u_curve(tmp_path, capsys):
    assert main(["demo", "overfit", "--out", str(tmp_path)]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0].isdigit():
            rows[int(parts[0])] = (int(parts[1]), float(parts[2]), float(parts[3]))
    assert sorted(rows) == [1, 2, 3, 4, 12]
    assert rows[12][0] == 13  # order d in one variable: d + 1 coefficients
    assert rows[12][1] < rows[3][1] < rows[1][1]  # training error keeps falling
    assert rows[12][2] > rows[3][2] and rows[1][2] > rows[3][2]  # test error is U-shaped


def test_demo_hinge_prints_the_course_numbers(capsys):
    assert main(["demo", "hinge"]) == 0
    out = capsys.readouterr().out
    assert "= 2.9" in out and "= 0.0" in out and "= 12.9" in out and "5.27" in out


@pytest.mark.parametrize("args, status, message", [
    (["train", "--hidden", "a,b"], 2, "--hidden must be comma-separated positive integers"),
    (["train", "--reg", "l3:1"], 2, "--reg must be none, l2:LAMBDA"),
    (["train", "--epochs", "0"], 2, "--epochs must be a positive integer"),
    (["train", "--dropout", "1.5"], 2, r"--dropout must be in \[0, 1\)"),
    (["train", "--resume", "/nonexistent/ck.safetensors"], 2, "--resume: no checkpoint at"),
    (["train", "--dataset", "imagenet", "--epochs", "1"], 1, "digits"),
    (["train", "--backend", "nupmy", "--epochs", "1"], 2, "--backend: unknown backend .nupmy."),
    (["train", "--lr", "-1"], 2, "--lr must be > 0, got -1"),
    (["train", "--loss", "hinge", "--label-smoothing", "0.1"], 2, "--label-smoothing applies to --loss softmax-ce"),
    (["train", "--optimizer", "gd", "--weight-decay", "0.1"], 2, "--weight-decay needs"),
    (["train", "--warmup", "40"], 2, r"--warmup must be in \[0, --epochs\)"),
    (["train", "--dataset", "mnist", "--no-download", "--data-dir", "/nonexistent", "--epochs", "1"], 1, "mnist"),
])
def test_bad_arguments_give_one_line_errors(tmp_path, capsys, args, status, message):
    assert main(args + ["--out", str(tmp_path)]) == status
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepcore: error: ") and len(err.splitlines()) == 1, err
    assert re.search(message, err), err


def test_no_traceback_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "deepcore.cli", "train", "--dataset", str(tmp_path / "x.csv")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stderr.startswith("deepcore: error:")


def test_a_files_own_validation_split_is_used(tmp_path, capsys):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((130, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x[:100], y=y[:100], x_val=x[100:], y_val=y[100:])
    assert main(["train", "--dataset", str(tmp_path / "d.npz"), "--epochs", "1", "--val-fraction", "0",
                 "--schedule", "none", "--warmup", "0", "--out", str(tmp_path / "o")]) == 0
    assert "30 val" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["train", "--epochs", "x"], ["demo", "nope"], ["--bogus"]])
def test_argparse_errors_are_one_line_too(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepcore: error: ") and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------- data files (issue 11 A)
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepcore: error: ") and len(err.splitlines()) == 1, err
    return err


def test_a_label_named_column_is_used_and_the_header_line_says_so(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "kaggle.csv"
    rows = [",".join([str(i % 3)] + [str(int(v)) for v in rng.integers(0, 256, 8)]) for i in range(90)]
    path.write_text("label," + ",".join(f"pixel{i}" for i in range(8)) + "\n" + "\n".join(rows) + "\n")
    assert main(["train", "--dataset", str(path), "--epochs", "1", "--hidden", "8", "--out", str(tmp_path / "o")]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "8 features, 3 classes, labels in column 'label' (index 0)" in header, header
    assert main(["train", "--dataset", str(path), "--label-column", "pixel0", "--epochs", "1",
                 "--out", str(tmp_path / "o2")]) == 1
    assert "regression target" in _one_line_error(capsys)


@pytest.mark.parametrize("text, flags, message", [
    ("a,b\n1,2\n3,1000000000\n4,0\n5,1\n", [], r"1000000001 classes.*--num-classes N"),
    ("a,label\n" + "".join(f"{i},0\n" for i in range(20)), [], "single class"),
    ("a,b\n" + "".join(f"{i},{i * 7}\n" for i in range(20)), ["--num-classes", "50"],
     "label 56 at row 10 .* is not below --num-classes 50"),
    ("a,b\n1,0\n2,1\n", ["--label-column", "c"], "--label-column: no column named 'c'"),
])
def test_bad_label_columns_are_one_line_in_flag_words(tmp_path, capsys, text, flags, message):
    path = tmp_path / "d.csv"
    path.write_text(text)
    assert main(["train", "--dataset", str(path), "--epochs", "1", "--out", str(tmp_path / "o"), *flags]) == 1
    err = _one_line_error(capsys)
    assert re.search(message, err) and str(path) in err, err
    assert "num_classes=" not in err and "label_column=" not in err
    assert not (tmp_path / "o" / "checkpoint.safetensors").exists()


@pytest.mark.parametrize("args, message", [
    (["--label-column", "label"], "--label-column applies to a .csv --dataset"),
    (["--dataset", "mnist", "--num-classes", "10"], "--num-classes applies to a .npz or .csv --dataset"),
    (["--dataset", "x.csv", "--num-classes", "1"], "--num-classes must be an integer >= 2, got 1"),
    (["--no-verify"], "--no-verify applies to mnist, fashion-mnist, cifar10"),
])
def test_data_flags_are_checked_first(tmp_path, capsys, args, message):
    assert main(["train", *args, "--out", str(tmp_path / "o")]) == 2
    assert message in _one_line_error(capsys)


def test_a_model_too_big_for_memory_is_refused_before_the_data_is_read(tmp_path, capsys):
    # mnist is not there: the model is refused first, from the data set's known size.
    assert main(["train", "--dataset", "mnist", "--no-download", "--data-dir", str(tmp_path / "none"),
                 "--hidden", "1000000000", "--out", str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys)
    assert "--hidden 1000000000: the 784-1000000000-10 MLP has 795,000,000,010 parameters (2.9 TiB" in err, err
    assert not (tmp_path / "o").exists()


def test_a_model_too_big_for_a_files_features_is_refused_after_reading_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("deepcore.data.limits.memory_limit", lambda: 50 << 20)
    path = tmp_path / "wide.npz"
    np.savez(path, x=np.zeros((20, 1000), np.float32), y=np.arange(20) % 2)
    assert main(["train", "--dataset", str(path), "--hidden", "20000", "--out", str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys)
    assert "--hidden 20000: the 1000-20000-2 MLP has 20,060,002 parameters" in err
    assert "more than the 50.0 MiB of memory available" in err, err


def test_a_memory_error_is_one_line_saying_what_was_allocated(tmp_path, capsys, monkeypatch):
    from numpy._core._exceptions import _ArrayMemoryError

    def build(*args, **kwargs):
        raise _ArrayMemoryError((100000000, 64), np.dtype(np.float32))

    monkeypatch.setattr("deepcore.cli.train.build_model", build)
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "o")]) == 1
    err = _one_line_error(capsys)
    assert "out of memory: could not allocate an array of shape (100000000, 64) and dtype float32 (23.8 GiB)" in err
    assert "deepcore/cli/train.py" in err


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


def test_local_mnist_files_that_are_not_the_originals(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DEEPCORE_DATA", str(tmp_path / "cache"))
    _fake_mnist(tmp_path / "mnist")
    args = ["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-download", "--epochs", "1",
            "--hidden", "8", "--val-fraction", "0", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 1
    err = _one_line_error(capsys)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in err and "not the original" in err
    assert "--no-verify" in err and "--dataset PATH" in err and "verify=False" not in err
    assert main([*args, "--no-verify", "--out", str(tmp_path / "o2")]) == 0
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "none"), "--no-download",
                 "--out", str(tmp_path / "o3")]) == 1
    err = _one_line_error(capsys)
    assert "without --no-download" in err and "download=True" not in err
