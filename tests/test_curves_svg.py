"""The dependency-free SVG training curves: the picture reads the data back through its own tick
labels, ticks are the hand-worked "nice" ones, and ``deepcore train --curves`` writes what it says."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from deepcore.cli import main
from deepcore.curves_svg import curves_svg, nice_ticks
from deepcore.plotting import curves_title, training_curves
from deepcore.train import History

NS = {"s": "http://www.w3.org/2000/svg"}


def _history(n: int = 5, val: bool = True) -> History:
    rows = []
    for e in range(1, n + 1):
        row = {"epoch": e, "loss": 2.0 / e + 0.01 * e, "accuracy": 0.4 + 0.1 * math.sqrt(e), "lr": 0.1}
        if val:
            row |= {"val_loss": 2.2 / e + 0.02 * e, "val_accuracy": 0.35 + 0.1 * math.sqrt(e)}
        rows.append(row)
    return History(rows)


def _panels(svg: str) -> dict[str, dict[str, np.ndarray]]:
    """Each panel's series in data units, mapped back from pixels through the panel's tick labels."""
    root = ET.fromstring(svg)
    out = {}
    for panel in root.iterfind("s:g[@class='panel']", NS):
        maps = {}
        for axis, coord in (("xtick", "x"), ("ytick", "y")):
            ticks = panel.findall(f"s:text[@class='{axis}']", NS)
            values = np.array([float(t.text) for t in ticks])  # the printed label, not a hidden attribute
            pixels = np.array([float(t.get(coord)) - (4 if axis == "ytick" else 0) for t in ticks])
            slope, icept = np.polyfit(values, pixels, 1)
            assert np.allclose(values * slope + icept, pixels, atol=0.02), "ticks not evenly spaced"
            maps[coord] = (slope, icept)
        series = {}
        for el in panel.findall("s:*[@class='series']", NS):
            if el.tag.endswith("polyline"):
                pts = np.array([[float(v) for v in p.split(",")] for p in el.get("points").split()])
            else:
                pts = np.array([[float(el.get("cx")), float(el.get("cy"))]])
            data = np.column_stack([(pts[:, i] - maps[c][1]) / maps[c][0] for i, c in enumerate("xy")])
            series.setdefault(el.get("data-name"), []).append(data)
        out[panel.get("data-title")] = {k: np.concatenate(v) for k, v in series.items()}
    return out


def test_the_curves_read_back_through_their_tick_labels():
    history = _history()
    svg = curves_svg(history, curves_title("digits", "mlp 256", 0.9721))
    root = ET.fromstring(svg)
    assert root.find("s:text[@class='title']", NS).text == "digits, mlp 256: test accuracy 97.21%"
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert texts.count("epoch") == 2 and "loss" in texts and "accuracy (%)" in texts
    panels = _panels(svg)
    assert set(panels) == {"loss", "accuracy"}
    epochs = np.arange(1, 6, dtype=float)
    for panel, key, scale in (("loss", "loss", 1.0), ("accuracy", "accuracy", 100.0)):
        for name, prefix in (("train", ""), ("validation", "val_")):
            got = panels[panel][f"{name} {key}"]
            y_range = float(np.ptp(got[:, 1])) or 1.0
            np.testing.assert_allclose(got[:, 0], epochs, atol=0.01)
            np.testing.assert_allclose(got[:, 1], np.array(history[prefix + key]) * scale, atol=0.002 * y_range + 1e-3)
    legends = root.findall(".//s:rect[@class='legend']", NS)
    assert len(legends) == 2


@pytest.mark.parametrize(("lo", "hi", "target", "want"), [
    (0.0, 1.0, 5, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (1.0, 30.0, 6, [0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0]),
    (0.013, 1.14, 5, [0.0, 0.5, 1.0, 1.5]),           # raw step 0.225 -> 0.5
    (62.8, 100.0, 5, [60.0, 70.0, 80.0, 90.0, 100.0]),  # raw 7.44 -> 10
    (-3.0, 7.0, 5, [-4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0]),
    (3.0, 3.0, 5, [2.8, 2.9, 3.0, 3.1, 3.2]),         # one value: +-5% around it
    (0.0, 0.0, 5, [-0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6]),
], ids=["unit", "epochs", "loss", "percent", "negative", "single", "zero"])
def test_nice_ticks_by_hand(lo, hi, target, want):
    assert nice_ticks(lo, hi, target) == pytest.approx(want, abs=1e-12)


def test_nice_ticks_refuses_a_non_finite_range():
    with pytest.raises(ValueError, match=r"nice_ticks: the range must be finite, got \[0.0, inf\]"):
        nice_ticks(0.0, math.inf)


def test_a_non_finite_value_breaks_the_line_and_a_lone_epoch_is_a_dot():
    rows = [{"epoch": e, "loss": v, "accuracy": 0.5} for e, v in zip(range(1, 6), [1.0, 0.8, math.inf, 0.5, 0.4],
                                                                        strict=True)]
    svg = curves_svg(History(rows), "t")
    loss_lines = [el for el in ET.fromstring(svg).iter() if el.get("data-name") == "train loss"]
    assert [len(el.get("points").split()) for el in loss_lines] == [2, 2]
    assert "validation loss" not in svg  # no validation values: no line, no legend entry
    one = curves_svg(History([{"epoch": 1, "loss": 0.7, "accuracy": 0.9}]), "t")
    dots = _panels(one)
    np.testing.assert_allclose(dots["loss"]["train loss"], [[1.0, 0.7]], atol=0.01)
    np.testing.assert_allclose(dots["accuracy"]["train accuracy"], [[1.0, 90.0]], atol=0.05)


def test_nearly_equal_and_huge_values():
    rows = [{"epoch": e, "loss": v, "accuracy": 0.5} for e, v in ((1, 0.6931471805599453), (2, 0.6931471805599454))]
    ET.fromstring(curves_svg(History(rows), "t"))  # a range of one ulp: drawn as one value
    notes = []
    huge = History([{"epoch": 1, "loss": 1e308, "accuracy": 0.5}, {"epoch": 2, "loss": -1e308, "accuracy": 0.5}])
    assert training_curves(huge, "/nonexistent-dir-never-written/c.svg", note=notes.append) is None
    assert notes and notes[0].startswith("could not draw c.svg")


def test_text_is_escaped():
    assert ET.fromstring(curves_svg(_history(2), "data\x01set")).find("s:text[@class='title']", NS).text == "dataset"
    for title in ('a <b> & "c"', "&amp; &lt;x&gt; >>", "ünï & <ö>"):  # an entity's text stays text
        svg = curves_svg(_history(2), title)
        assert ET.fromstring(svg).find("s:text[@class='title']", NS).text == title


def test_training_curves_picks_svg_by_suffix(tmp_path):
    path = training_curves(_history(3), tmp_path / "sub" / "c.svg", dataset="digits")
    assert path == tmp_path / "sub" / "c.svg"
    assert ET.fromstring(path.read_text()).find("s:text[@class='title']", NS).text == "digits"


def test_train_writes_the_curves_asked_for_and_removes_a_stale_picture(tmp_path):
    args = ["train", "--model", "linear", "--epochs", "2", "--schedule", "none", "--quiet", "--out", str(tmp_path)]
    (tmp_path / "curves.png").write_bytes(b"an older run's picture")
    assert main(args) == 0
    assert (tmp_path / "curves.svg").is_file() and not (tmp_path / "curves.png").exists()
    panels = _panels((tmp_path / "curves.svg").read_text())
    hist = History.from_dict(json.loads((tmp_path / "history.json").read_text()))
    np.testing.assert_allclose(panels["loss"]["train loss"][:, 1], hist["loss"], atol=0.002 * max(hist["loss"]) + 1e-3)
    assert main([*args, "--overwrite", "--curves", "none"]) == 0
    assert not (tmp_path / "curves.svg").exists()
    pytest.importorskip("matplotlib")
    assert main([*args, "--overwrite", "--curves", "png"]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "curves.svg").exists()
