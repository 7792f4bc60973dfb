"""What the user sees (issue 11, part E): every default in ``deepcore train --help``, the plain progress
line's rate and ETA, the run's total time, and a titled, labelled ``curves.png``."""

from __future__ import annotations

import argparse
import re
import sys

import pytest

from deepcore import _progress
from deepcore._progress import Progress, format_interval
from deepcore.cli import _parser, main
from deepcore.train import History


# ---------------------------------------------------------------- E1
def _train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in _parser(with_bench=False)._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_train_help_shows_every_default_once(capsys):
    parser = _train_parser()
    formatter = parser._get_formatter()
    with_default = 0
    for action in parser._actions:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            continue
        with_default += 1
        shown = formatter._expand_help(action)  # the text --help prints for this option
        assert shown.count("default") == 1, (action.option_strings, shown)
        if not isinstance(action.default, bool) and action.option_strings != ["--lr"]:
            assert shown.endswith(f"(default: {action.default})"), (action.option_strings, shown)
    assert with_default >= 15
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("passes over the training set (default: 30)", "(default: momentum)", "(default: cosine)",
                  "(default: 64)", "(default: 0.1)", "(default: deepcore-run)", "(default: 0.0)"):
        assert shown in out, shown
    assert "(default 256)" not in out and not re.search(r"\(default[^)]*\) \(default", out)


# ---------------------------------------------------------------- E2
class _Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def plain_line(monkeypatch):
    """The built-in line (tqdm hidden even where installed) on a clock the test moves."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    clock = _Clock()
    monkeypatch.setattr(_progress, "_clock", clock)
    return clock


def test_progress_line_shows_elapsed_remaining_and_rate_like_tqdm(plain_line, capsys):
    bar = Progress(50, "epoch 1/3", enabled=True, unit="batch")
    for _ in range(12):
        plain_line.t += 0.25
        bar.update(loss=0.5)
    last = capsys.readouterr().err.split("\r")[-1].rstrip()
    assert last == "epoch 1/3: 12/50 [00:03<00:09, 4.00batch/s]  loss 0.5"
    plain_line.t += 3597.0  # slow now: an hour in, under one batch a second
    bar.update()
    assert bar.line() == "epoch 1/3: 13/50 [1:00:00<2:50:46, 276.92s/batch]"
    bar.close()
    assert capsys.readouterr().err.endswith("\r")  # the line is wiped, as tqdm(leave=False)
    unknown = Progress(None, "file.gz", enabled=True, byte_counts=True)
    unknown.done = 3_000_000
    plain_line.t += 2.0
    assert unknown.line() == "file.gz: 3.0 MB [00:02, 1.50MB/s]"
    assert Progress(5, "x", enabled=True).line() == "x: 0/5 [00:00<?, ?it/s]"
    assert format_interval(59.9) == "00:59" and format_interval(3725) == "1:02:05"


def test_train_ends_with_its_total_time(tmp_path, capsys):
    assert main(["train", "--model", "linear", "--epochs", "1", "--schedule", "none", "--out", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"done in \d+\.\d s", last), last


# ---------------------------------------------------------------- E3
def _history() -> History:
    return History([{"epoch": e, "loss": 1.0 / e, "accuracy": 0.5 + 0.1 * e, "val_loss": 1.2 / e,
                     "val_accuracy": 0.45 + 0.1 * e, "lr": 0.1, "time": 0.1} for e in (1, 2, 3)])


def test_training_curves_have_a_title_labels_and_accuracy_in_percent(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from deepcore.plotting import training_curves, training_curves_figure

    history = _history()
    kwargs = {"dataset": "digits", "model": "mlp 256", "test_accuracy": 0.9725}
    fig = training_curves_figure(history, **kwargs)
    assert fig._suptitle.get_text() == "digits, mlp 256: test accuracy 97.25%"
    loss_ax, acc_ax = fig.axes
    assert (loss_ax.get_xlabel(), loss_ax.get_ylabel()) == ("epoch", "loss")
    assert (acc_ax.get_xlabel(), acc_ax.get_ylabel()) == ("epoch", "accuracy (%)")
    lines = {line.get_label(): line for line in acc_ax.get_lines()}
    assert list(lines["train accuracy"].get_xdata()) == [1, 2, 3]
    assert list(lines["train accuracy"].get_ydata()) == pytest.approx([60.0, 70.0, 80.0])
    assert list(lines["validation accuracy"].get_ydata()) == pytest.approx([55.0, 65.0, 75.0])
    assert list(loss_ax.get_lines()[0].get_ydata()) == pytest.approx([1.0, 0.5, 1 / 3])
    fig.savefig(tmp_path / "fig.png")  # renders with Agg
    path = training_curves(history, tmp_path / "curves.png", **kwargs)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
