"""Pictures: training curves (SVG with no dependency, or PNG through matplotlib) and the
under-/over-fitting demo (matplotlib).

Each function returns the path it wrote, or None with a note when matplotlib is
missing, so that plotting never stops a run.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._io import write_bytes_atomic
from .train import History


def _figure_class() -> Any:
    # matplotlib.figure.Figure renders to PNG without pyplot, so the caller's
    # matplotlib backend (a notebook's inline one, say) is left alone.
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return write_bytes_atomic(path, buf.getvalue())


def curves_title(dataset: str | None = None, model: str | None = None, test_accuracy: float | None = None) -> str:
    """``digits, mlp 256: test accuracy 97.50%`` (the parts given; accuracy as a fraction in [0, 1])."""
    head = ", ".join(part for part in (dataset, model) if part)
    tail = "" if test_accuracy is None else f"test accuracy {test_accuracy:.2%}"
    return f"{head}: {tail}" if head and tail else head or tail or "training curves"


def training_curves_figure(history: History, *, dataset: str | None = None, model: str | None = None,
                           test_accuracy: float | None = None) -> Any:
    """The figure :func:`training_curves` writes (a ``matplotlib.figure.Figure``), or None without
    matplotlib: loss and accuracy (in percent, as the console prints it) per epoch, train and
    validation, side by side, under a title naming the data set, the model and the test accuracy."""
    Figure = _figure_class()
    if Figure is None:
        return None
    epochs = history["epoch"]
    fig = Figure(figsize=(10, 3.8))
    fig.suptitle(curves_title(dataset, model, test_accuracy))
    axes = fig.subplots(1, 2)
    for ax, key, label, scale in zip(axes, ("loss", "accuracy"), ("loss", "accuracy (%)"), (1.0, 100.0),
                                     strict=True):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history[prefix + key]
            if values:
                ax.plot(epochs[: len(values)], [v * scale for v in values], style,
                        label=("validation " if prefix else "train ") + key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    return fig


def training_curves(history: History, path: str | Path, note: Callable[[str], None] = print, *,
                    dataset: str | None = None, model: str | None = None,
                    test_accuracy: float | None = None) -> Path | None:
    """Write the curves at ``path``: an SVG (:mod:`deepcore.curves_svg`, no dependency) when it ends in
    ``.svg``, else :func:`training_curves_figure` as a PNG; None (with a note) for a PNG without matplotlib."""
    path = Path(path)
    if path.suffix.lower() == ".svg":
        from .curves_svg import curves_svg

        try:
            text = curves_svg(history, curves_title(dataset, model, test_accuracy))
        except (ValueError, OverflowError) as exc:  # values no axis can span (+-1e308): no picture, not a failed run
            note(f"could not draw {path.name}: {exc}")
            return None
        return write_bytes_atomic(path, text.encode("utf-8"))
    fig = training_curves_figure(history, dataset=dataset, model=model, test_accuracy=test_accuracy)
    if fig is None:
        note("matplotlib is not installed: skipping the training-curve PNG (pip install matplotlib)")
        return None
    return _save(fig, path)


def overfitting(orders: Sequence[int], train_err: Sequence[float], test_err: Sequence[float], curve: dict[str, Any],
                path: str | Path, note: Callable[[str], None] = print) -> Path | None:
    """Left: the fitted polynomials over the data; right: train and test error by order."""
    Figure = _figure_class()
    if Figure is None:
        note("matplotlib is not installed: skipping the over-fitting PNG (pip install matplotlib)")
        return None
    fig = Figure(figsize=(11, 3.8))
    left, right = fig.subplots(1, 2)
    left.scatter(curve["x_train"], curve["y_train"], s=14, label="train")
    left.scatter(curve["x_test"], curve["y_test"], s=14, marker="x", label="test")
    for order, ys in zip(orders, curve["fits"], strict=True):
        left.plot(curve["grid"], ys, label=f"order {order}")
    left.set_ylim(-2, 2)
    left.legend(fontsize=7)
    left.set_title("polynomial fits")
    right.semilogy(range(len(orders)), train_err, "o-", label="train")
    right.semilogy(range(len(orders)), test_err, "s--", label="test")
    right.set_xticks(range(len(orders)), [str(o) for o in orders])
    right.set_xlabel("polynomial order")
    right.set_title("mean squared error")
    right.legend()
    return _save(fig, Path(path))
