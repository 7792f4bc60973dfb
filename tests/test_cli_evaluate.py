"""``deepcore evaluate`` and ``deepcore predict``, and the JSON architecture they rebuild models from
(:mod:`deepcore.nn.spec`). The references are computed here by hand with NumPy on the model's own
forward pass, the model built independently (``cli.train.build_model``) from the training flags."""

from __future__ import annotations

import csv
import io
import json
import sys

import numpy as np
import pytest

from deepcore import data, nn
from deepcore.checkpoint import load_checkpoint, save_checkpoint
from deepcore.cli import main
from deepcore.cli.train import build_model
from deepcore.nn.spec import (
    ArchitectureError,
    architecture_of,
    input_features,
    model_from_architecture,
    output_features,
)
from deepcore.train import fit

HIDDEN = [24]
TRAIN = ["train", "--epochs", "2", "--hidden", "24", "--batchnorm", "--dropout", "0.1", "--seed", "3", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short runs on the embedded digits: softmax-ce (BatchNorm, Dropout) and hinge."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for loss in ("softmax-ce", "hinge"):
        assert main([*TRAIN, "--loss", loss, "--out", str(root / loss)]) == 0
        out[loss] = root / loss / "checkpoint.safetensors"
    return out


def _reference_logits(ckpt_path, x):
    """The trained model built from the training flags (not from the recorded architecture)."""
    model = build_model("mlp", 64, 10, HIDDEN, dropout=0.1, batchnorm=True, seed=3)
    load_checkpoint(ckpt_path, model)
    return np.asarray(model(x.astype(np.float32)), dtype=np.float64)


def _test_split():
    return data.load_dataset("digits", seed=3, val_fraction=0.1).test


def _one_line_error(capsys, code, status, *fragments):
    assert code == status
    err = capsys.readouterr().err
    assert err.startswith("deepcore: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ------------------------------------------------------------------ the architecture
def _every_layer():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 8, bias=False), nn.BatchNorm1d(8, eps=1e-3, momentum=None),
        nn.LeakyReLU(0.2),
        nn.Sequential(nn.Dropout(0.25), nn.Tanh(), nn.Sequential(nn.Sigmoid()), nn.ReLU()),
        nn.Linear(8, 5, dtype="float64"), nn.BatchNorm1d(5, affine=False, track_running_stats=False),
        nn.Softmax(axis=1),
    )


def test_architecture_round_trips_through_json_with_the_same_outputs():
    model = _every_layer()
    rng = np.random.default_rng(0)
    model.forward(rng.standard_normal((16, 3, 4)).astype(np.float32), train=True)  # running statistics move
    spec = architecture_of(model)
    layers = spec["model"]["layers"]
    assert spec["version"] == 1
    assert layers[1] == {"type": "Linear", "in_features": 12, "out_features": 8, "bias": False, "dtype": "float32"}
    assert layers[2] == {"type": "BatchNorm1d", "num_features": 8, "eps": 1e-3, "momentum": None, "affine": True,
                         "track_running_stats": True, "dtype": "float32"}
    assert layers[4]["layers"][0] == {"type": "Dropout", "p": 0.25}
    assert layers[4]["layers"][2] == {"type": "Sequential", "layers": [{"type": "Sigmoid"}]}
    assert layers[5]["dtype"] == "float64" and layers[7] == {"type": "Softmax", "axis": 1}
    assert (input_features(spec), output_features(spec)) == (12, 5)

    rebuilt = model_from_architecture(json.loads(json.dumps(spec)))
    assert architecture_of(rebuilt) == spec
    assert repr(rebuilt) == repr(model)
    rebuilt.load_state_dict(model.state_dict())
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(rebuilt(x)), np.asarray(model(x)))
    assert rebuilt[5].weight.dtype == np.float64


@pytest.mark.parametrize("spec, message", [
    ([], "must be a JSON object"),
    ({"version": 2, "model": {"type": "ReLU"}}, "unsupported version 2"),
    ({"version": 1}, "'model' is missing"),
    ({"version": 1, "model": {"type": "Conv3d"}}, "model: unknown layer type 'Conv3d'"),
    ({"version": 1, "model": {"type": "Sequential", "layers": [{"type": "ReLU"}, {"type": "Dropout", "q": 1}]}},
     "model.layers[1]: Dropout has no argument 'q'"),
    ({"version": 1, "model": {"type": "Linear", "in_features": 3}}, "Linear needs 'out_features'"),
    ({"version": 1, "model": {"type": "Linear", "in_features": True, "out_features": 2}},
     "model.in_features: expected an integer, got True"),
    ({"version": 1, "model": {"type": "Linear", "in_features": 2, "out_features": 2, "dtype": "int8"}},
     "model.dtype: expected one of float16, float32, float64"),
    ({"version": 1, "model": {"type": "Dropout", "p": 1.5}}, "model: Dropout: p must be a probability"),
])
def test_a_bad_architecture_is_refused_naming_the_place(spec, message):
    with pytest.raises(ArchitectureError) as info:
        model_from_architecture(spec)
    assert message in str(info.value)


def test_a_custom_layer_has_no_architecture_and_fit_still_checkpoints(tmp_path):
    class Scale(nn.Module):
        def forward(self, x, train=False):
            return 2 * x, lambda dy: 2 * dy

    with pytest.raises(ArchitectureError, match=r"model\[1\] is a .*Scale, which has no JSON description"):
        architecture_of(nn.Sequential(nn.Linear(2, 2), Scale()))

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 4)).astype(np.float32), rng.integers(0, 3, 40)
    from deepcore.optim import SGD

    for model, recorded in ((nn.Sequential(nn.Linear(4, 3)), True), (nn.Sequential(nn.Linear(4, 3), Scale()), False)):
        path = tmp_path / "fit.npz"
        fit(model, "softmax-ce", SGD(model.parameters(), lr=0.1), (x, y), epochs=1, verbose=False, checkpoint=path)
        extra = load_checkpoint(path).extra
        assert ("architecture" in extra) is recorded
        if recorded:
            assert extra["architecture"] == architecture_of(model)


# -------------------------------------------------------------------------- evaluate
def test_evaluate_matches_a_hand_computation_on_the_models_forward(runs, tmp_path, capsys):
    ckpt = runs["softmax-ce"]
    saved = load_checkpoint(ckpt).extra
    assert saved["architecture"] == architecture_of(build_model("mlp", 64, 10, HIDDEN, dropout=0.1, batchnorm=True))
    assert saved["classes"] == [str(i) for i in range(10)]

    assert main(["evaluate", str(ckpt), "--json", "--no-plot"]) == 0
    result = json.loads(capsys.readouterr().out)
    test = _test_split()
    y = test.y
    z = _reference_logits(ckpt, test.x)
    shifted = z - z.max(axis=1, keepdims=True)
    loss = np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(y)), y])
    pred = z.argmax(axis=1)
    matrix = np.zeros((10, 10), dtype=int)
    for t, p in zip(y, pred, strict=True):
        matrix[t, p] += 1
    assert result["samples"] == len(y) == 359
    assert result["loss_name"] == "softmax-ce"
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["accuracy"] == pytest.approx(np.mean(pred == y))
    assert result["confusion_matrix"] == matrix.tolist()
    for c in range(10):
        row = result["per_class"][c]
        assert (row["samples"], row["correct"]) == (int(np.sum(y == c)), int(np.sum((y == c) & (pred == c))))
        assert row["accuracy"] == pytest.approx(np.mean(pred[y == c] == c))
    # ... and what training itself measured on the same split.
    assert result["loss"] == pytest.approx(saved["test"]["loss"], rel=1e-6)
    assert result["accuracy"] == pytest.approx(saved["test"]["accuracy"])


def test_evaluate_prints_a_table_and_draws_the_confusion_matrix(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    ckpt = runs["hinge"]
    plot = tmp_path / "cm.png"
    assert main(["evaluate", str(ckpt), "--plot", str(plot), "--batch-size", "50"]) == 0
    out = capsys.readouterr().out
    result = _json_of(ckpt, capsys)
    assert f"loss        {result['loss']:.4f} (hinge)" in out
    assert f"accuracy    {result['accuracy']:.2%}" in out
    assert "confusion matrix (rows: true class, columns: predicted class)" in out
    row3 = next(line for line in out.splitlines() if line.startswith("3 ") and "%" in line).split()
    assert row3 == ["3", str(result["per_class"][3]["samples"]), str(result["per_class"][3]["correct"]),
                    f"{result['per_class'][3]['accuracy']:.2%}"]
    matrix_rows = out.split("predicted class)\n")[1].splitlines()[1:11]
    assert [[int(v) for v in line.split()[1:]] for line in matrix_rows] == result["confusion_matrix"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {plot}" in out
    # the hinge loss, by hand
    test = _test_split()
    s = _reference_logits(ckpt, test.x)
    margins = np.maximum(0, s - s[np.arange(len(test.y)), test.y][:, None] + 1)
    margins[np.arange(len(test.y)), test.y] = 0
    assert result["loss"] == pytest.approx(margins.sum(axis=1).mean(), rel=1e-5)


def _json_of(ckpt, capsys):
    assert main(["evaluate", str(ckpt), "--json", "--no-plot"]) == 0
    return json.loads(capsys.readouterr().out)


def test_evaluate_without_matplotlib_skips_the_plot_with_a_note(runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib.figure raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    ckpt = runs["softmax-ce"]
    assert main(["evaluate", str(ckpt)]) == 0
    assert "matplotlib is not installed: skipping the confusion-matrix PNG" in capsys.readouterr().out
    assert not ckpt.with_name("checkpoint-confusion.png").exists()


def test_a_python_checkpoint_with_class_names_on_a_user_npz(tmp_path, capsys):
    """What a Python user saves by hand: the architecture, names and the data set in extra."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5).astype(np.int64)
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3))
    from deepcore.optim import Adam

    fit(model, "softmax-ce", Adam(model.parameters(), lr=0.02), (x, y), epochs=20, verbose=False)
    ckpt = tmp_path / "mine.npz.safetensors"
    save_checkpoint(ckpt, model, extra={"architecture": architecture_of(model), "classes": ["low", "mid", "high"],
                                        "args": {"dataset": str(tmp_path / "mine.npz"), "seed": 0}})
    assert main(["evaluate", str(ckpt), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "softmax-ce" in out and "\n0 low " in out and "\n2 high " in out
    test = data.load_dataset(tmp_path / "mine.npz").test
    pred = np.asarray(model(test.x)).argmax(axis=1)
    assert f"({int(np.sum(pred == test.y))} of {len(test.y)})" in out

    # predict names the classes too
    np.savetxt(tmp_path / "rows.csv", x[:4], delimiter=",")
    assert main(["predict", str(ckpt), str(tmp_path / "rows.csv")]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["row", "class", "name", "p_0", "p_1", "p_2"]
    want = np.asarray(model(x[:4])).argmax(axis=1)
    assert [r[2] for r in rows[1:]] == [["low", "mid", "high"][k] for k in want]

    # a checkpoint without the data set needs --dataset
    save_checkpoint(ckpt, model, extra={"architecture": architecture_of(model)})
    _one_line_error(capsys, main(["evaluate", str(ckpt)]), 2, "--dataset:", "does not record the data set")
    assert main(["evaluate", str(ckpt), "--dataset", str(tmp_path / "mine.npz"), "--no-plot"]) == 0
    assert "softmax-ce assumed" in capsys.readouterr().out


# --------------------------------------------------------------------------- predict
def test_predict_gives_the_softmax_of_the_models_logits(runs, tmp_path, capsys):
    ckpt = runs["softmax-ce"]
    test = _test_split()
    x = test.x[:40]
    np.savez(tmp_path / "in.npz", x=x.reshape(40, 8, 8), other=np.zeros(3))  # images are flattened
    out_csv = tmp_path / "sub" / "preds.csv"
    assert main(["predict", str(ckpt), str(tmp_path / "in.npz"), "-o", str(out_csv), "--batch-size", "7"]) == 0
    assert f"wrote 40 predictions (softmax probabilities) to {out_csv}" in capsys.readouterr().out
    rows = list(csv.reader(out_csv.open()))
    assert rows[0] == ["row", "class", *(f"p_{j}" for j in range(10))]
    table = np.array(rows[1:], dtype=np.float64)
    z = _reference_logits(ckpt, x)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(table[:, 0], np.arange(40))
    np.testing.assert_array_equal(table[:, 1], z.argmax(axis=1))
    np.testing.assert_allclose(table[:, 2:], p, rtol=2e-5, atol=1e-9)

    # the same rows from a CSV with a header, to standard output; in batches of the same size, since
    # BLAS may round a row's product differently in a batch of another size (OpenBLAS's Haswell
    # kernels do: one probability's last printed digit moved)
    with open(tmp_path / "in.csv", "w") as f:
        f.write(",".join(f"px{i}" for i in range(64)) + "\n")
        np.savetxt(f, x, delimiter=",")
    assert main(["predict", str(ckpt), str(tmp_path / "in.csv"), "--batch-size", "7"]) == 0
    assert list(csv.reader(io.StringIO(capsys.readouterr().out))) == rows


def test_predict_with_a_hinge_model_writes_scores(runs, tmp_path, capsys):
    ckpt = runs["hinge"]
    x = _test_split().x[:5]
    np.savez(tmp_path / "one.npz", features=x)  # the only array, whatever its name
    assert main(["predict", str(ckpt), str(tmp_path / "one.npz")]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["row", "class", *(f"score_{j}" for j in range(10))]
    s = _reference_logits(ckpt, x)
    np.testing.assert_allclose(np.array(rows[1:], dtype=float)[:, 2:], s, rtol=1e-5, atol=1e-6)


def test_predict_refuses_bad_input_in_one_line(runs, tmp_path, capsys):
    ckpt = str(runs["softmax-ce"])
    x = _test_split().x[:3]
    np.savetxt(tmp_path / "labelled.csv", np.c_[x, [1, 2, 3]], delimiter=",")
    _one_line_error(capsys, main(["predict", ckpt, str(tmp_path / "labelled.csv")]), 1,
                    "rows have 65 features, but the model takes 64", "label")
    np.savez(tmp_path / "two.npz", a=x, b=x)
    _one_line_error(capsys, main(["predict", ckpt, str(tmp_path / "two.npz")]), 1,
                    "expected an array named 'x' (or a single array), got arrays 'a', 'b'")
    (tmp_path / "bad.csv").write_text("1,2\n3,oops\n")
    _one_line_error(capsys, main(["predict", ckpt, str(tmp_path / "bad.csv")]), 1, "line 2, column 2: 'oops'")
    np.savez(tmp_path / "flat.npz", x=x[0])
    _one_line_error(capsys, main(["predict", ckpt, str(tmp_path / "flat.npz")]), 1, "a 1-D array of 64 values")
    _one_line_error(capsys, main(["predict", ckpt, str(tmp_path / "in.txt")]), 2, "INPUT: expected a .npz or .csv")
    _one_line_error(capsys, main(["predict", ckpt, str(tmp_path / "none.csv")]), 2, "INPUT: no file at")
    _one_line_error(capsys, main(["predict", ckpt, str(tmp_path / "labelled.csv"), "-o", str(tmp_path)]), 2,
                    "-o:", "is a directory")


# ------------------------------------------------------------------- shared failures
def test_a_checkpoint_without_an_architecture_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "old.npz"
    save_checkpoint(ckpt, nn.Sequential(nn.Linear(64, 10)), extra={"args": {"dataset": "digits"}})
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 64)))
    for argv in (["evaluate", str(ckpt)], ["predict", str(ckpt), str(tmp_path / "x.npz")]):
        _one_line_error(capsys, main(argv), 1, str(ckpt), "records no model architecture", f"so {argv[0]} cannot")


def test_a_checkpoint_whose_state_does_not_fit_its_architecture(tmp_path, capsys):
    ckpt = tmp_path / "odd.safetensors"
    save_checkpoint(ckpt, nn.Sequential(nn.Linear(64, 10)),
                    extra={"architecture": architecture_of(nn.Sequential(nn.Linear(64, 12)))})
    _one_line_error(capsys, main(["evaluate", str(ckpt), "--dataset", "digits"]), 1,
                    "its state does not fit the recorded architecture")


@pytest.mark.parametrize("argv, fragment", [
    (["evaluate", "{d}/missing.safetensors"], "CKPT: no checkpoint file at"),
    (["evaluate", "{d}/ckpt.pt"], "CKPT: expected a .safetensors or .npz checkpoint"),
    (["evaluate", "{ckpt}", "--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["evaluate", "{ckpt}", "--backend", "nope"], "--backend: unknown backend 'nope'"),
    (["evaluate", "{ckpt}", "--plot", "{d}/cm.jpg"], "--plot: expected a path ending in .png"),
    (["evaluate", "{ckpt}", "--plot", "{d}/no/cm.png"], "--plot: directory"),
    (["evaluate", "{ckpt}", "--plot", "{d}/cm.png", "--no-plot"], "--plot and --no-plot"),
    (["predict", "{ckpt}", "{d}/x.npz", "--batch-size", "-1"], "--batch-size must be a positive integer"),
    (["evaluate", "{ckpt}", "--loss", "l2"], "argument --loss: invalid choice"),
])
def test_bad_flags_are_one_line_usage_errors(runs, tmp_path, capsys, argv, fragment):
    argv = [a.format(d=tmp_path, ckpt=runs["softmax-ce"]) for a in argv]
    if "invalid choice" in fragment:
        with pytest.raises(SystemExit) as info:
            main(argv)
        _one_line_error(capsys, info.value.code, 2, fragment)
    else:
        _one_line_error(capsys, main(argv), 2, fragment)


def test_evaluate_on_a_data_set_of_another_width_names_both(runs, tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "five.npz", x=rng.standard_normal((50, 5)), y=rng.integers(0, 2, 50))
    _one_line_error(capsys, main(["evaluate", str(runs["softmax-ce"]), "--dataset", str(tmp_path / "five.npz")]), 1,
                    "five test split has 5 features per sample, but the model in", "takes 64")
