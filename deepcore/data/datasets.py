"""The in-memory dataset type, the train/val/test bundle the loaders return, and splits.

Datasets are host data: NumPy arrays, whatever backend later trains on them.
The fit loop moves one batch at a time (see :mod:`deepcore.data.batching`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._checks import check_int

__all__ = ["ArrayDataset", "DatasetSplits", "as_images", "image_shape", "split_indices", "train_val_split"]


def _is_labels(y: np.ndarray | None) -> bool:
    """True for a 1-D integer array, i.e. class labels rather than regression targets."""
    return y is not None and y.ndim == 1 and np.issubdtype(y.dtype, np.integer)


class ArrayDataset:
    """Samples ``x`` (shape ``(N, ...)``) with optional targets ``y`` (``len(y) == N``).

    ``classes`` is a sequence of class names or a class count; when given,
    integer labels must lie in ``[0, len(classes))``. ``dataset[idx]`` returns
    ``(x[idx], y[idx])`` (``y`` part None when there are no targets); an index
    array gathers into new contiguous arrays of the stored dtypes.
    """

    def __init__(self, x: Any, y: Any = None, *, name: str = "",
                 classes: Sequence[str] | int | None = None) -> None:
        fn = f"ArrayDataset({name!r})" if name else "ArrayDataset"
        x = np.asarray(x)
        if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise TypeError(f"{fn}: x must be a numeric array, got dtype {x.dtype}")
        if x.ndim < 1:
            raise ValueError(f"{fn}: x must have a leading sample axis, got a 0-d array")
        if y is not None:
            y = np.asarray(y)
            if y.dtype == object or not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_):
                raise TypeError(f"{fn}: y must be a numeric array, got dtype {y.dtype}")
            if y.ndim < 1 or len(y) != len(x):
                raise ValueError(f"{fn}: x has {len(x)} samples but y has shape {y.shape}; "
                                 f"len(y) must equal len(x)")
        if isinstance(classes, bool):
            raise TypeError(f"{fn}: classes must be a sequence of names or a class count, got {classes!r}")
        if isinstance(classes, (int, np.integer)):
            classes = tuple(str(i) for i in range(check_int(classes, "classes", fn, 1)))
        elif classes is not None:
            classes = tuple(str(c) for c in classes)
            if not classes:
                raise ValueError(f"{fn}: classes must not be empty")
        if classes is not None and _is_labels(y) and len(y):
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= len(classes):
                bad = int(np.flatnonzero((y < 0) | (y >= len(classes)))[0])
                raise ValueError(f"{fn}: labels must be in [0, {len(classes)}), got y[{bad}] = {int(y[bad])}")
        self.x: np.ndarray = x
        self.y: np.ndarray | None = y
        self.name = str(name)
        self.classes: tuple[str, ...] | None = classes

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: Any) -> tuple[Any, Any]:
        if isinstance(idx, (int, np.integer, slice)):
            return self.x[idx], (None if self.y is None else self.y[idx])
        idx = np.asarray(idx)
        if idx.dtype == np.bool_:
            idx = np.flatnonzero(idx)
        # np.take copies into a fresh C-contiguous array and keeps the dtype.
        return np.take(self.x, idx, axis=0), (None if self.y is None else np.take(self.y, idx, axis=0))

    @property
    def num_classes(self) -> int | None:
        """``len(classes)``; else ``max(y) + 1`` for integer labels; else None (regression)."""
        if self.classes is not None:
            return len(self.classes)
        y = self.y
        if y is not None and _is_labels(y) and len(y):
            return int(y.max()) + 1
        return None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample, ``x.shape[1:]``."""
        return tuple(self.x.shape[1:])

    def subset(self, idx: Any) -> ArrayDataset:
        """A new dataset of the rows ``idx`` (same name and classes)."""
        x, y = self[np.asarray(idx, dtype=np.intp)]
        return ArrayDataset(x, y, name=self.name, classes=self.classes)

    def __repr__(self) -> str:
        y = "None" if self.y is None else f"{self.y.dtype}{list(self.y.shape)}"
        return (f"ArrayDataset(name={self.name!r}, n={len(self)}, x={self.x.dtype}{list(self.x.shape)}, "
                f"y={y}, num_classes={self.num_classes})")


@dataclass
class DatasetSplits:
    """What a loader returns: ``train``, ``test`` and optionally ``val`` datasets.

    ``input_shape`` is the shape of one sample before flattening (e.g.
    ``(28, 28)`` for MNIST, whose ``x`` rows hold 784 features); it defaults
    to ``train.input_shape``. ``num_classes`` defaults to the largest count
    over the splits (None for regression). ``label_column`` says, for a CSV
    file, which column the labels came from (``"'label' (index 0)"``).
    """

    train: ArrayDataset
    test: ArrayDataset
    val: ArrayDataset | None = None
    name: str = ""
    num_classes: int | None = None
    input_shape: tuple[int, ...] | None = None
    classes: tuple[str, ...] | None = None
    label_column: str | None = None

    def __post_init__(self) -> None:
        parts = [("train", self.train), ("test", self.test)] + ([("val", self.val)] if self.val is not None else [])
        for label, part in parts:
            if not isinstance(part, ArrayDataset):
                raise TypeError(f"DatasetSplits: {label} must be an ArrayDataset, got {type(part).__name__}")
            if part.input_shape != self.train.input_shape:
                raise ValueError(f"DatasetSplits: {label} samples have shape {part.input_shape} "
                                 f"but train samples have shape {self.train.input_shape}")
        if self.classes is None:
            self.classes = self.train.classes
        if self.num_classes is None:
            counts = [p.num_classes for _, p in parts if p.num_classes is not None]
            self.num_classes = len(self.classes) if self.classes else (max(counts) if counts else None)
        if self.input_shape is None:
            self.input_shape = self.train.input_shape
        self.input_shape = tuple(int(d) for d in self.input_shape)

    @property
    def num_features(self) -> int:
        """Features per row of ``x`` (the product of ``input_shape``)."""
        return math.prod(self.input_shape or ())

    def __repr__(self) -> str:
        val = "" if self.val is None else f", val={len(self.val)}"
        return (f"DatasetSplits(name={self.name!r}, train={len(self.train)}{val}, test={len(self.test)}, "
                f"num_classes={self.num_classes}, input_shape={self.input_shape})")


def split_indices(y: Any, fraction: float, *, seed: int = 0, stratify: bool = True,
                  fn: str = "split_indices") -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(kept, held_out)`` row indices, ``round(fraction * N)`` of them held out.

    With ``stratify`` and integer labels ``y``, each class contributes in
    proportion to its size (largest-remainder rounding, ties to the lower
    class), so the class mix of both parts matches the whole. The result
    depends on ``(y, fraction, seed)`` only.
    """
    y = np.asarray(y)
    n = len(y)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"{fn}: fraction must be a number in (0, 1), got {fraction!r}")
    seed = check_int(seed, "seed", fn)
    n_held = int(math.floor(fraction * n + 0.5))
    if not 0 < n_held < n:
        raise ValueError(f"{fn}: holding out {fraction!r} of {n} samples leaves {n_held} held out and "
                         f"{n - n_held} kept; both must be at least 1")
    rng = np.random.default_rng(seed)
    if stratify and _is_labels(y):
        _, inverse = np.unique(y, return_inverse=True)
        counts = np.bincount(inverse)
        quota = counts * (n_held / n)
        take = np.floor(quota).astype(np.int64)
        extra = n_held - int(take.sum())
        take[np.argsort(-(quota - take), kind="stable")[:extra]] += 1
        held = np.concatenate([rng.permutation(np.flatnonzero(inverse == c))[:k] for c, k in enumerate(take)])
    else:
        held = rng.permutation(n)[:n_held]
    held = np.sort(held)
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask), held


def train_val_split(dataset: ArrayDataset, val_fraction: float = 0.1, *, seed: int = 0,
                    stratify: bool = True) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, val)``: ``round(val_fraction * N)`` rows of ``dataset`` held out for validation.

    Stratified by class when ``y`` holds integer labels and ``stratify`` is
    true; a plain seeded random split otherwise (regression targets).
    """
    if not isinstance(dataset, ArrayDataset):
        raise TypeError(f"train_val_split: dataset must be an ArrayDataset, got {type(dataset).__name__}")
    # Without targets there is nothing to stratify on: float zeros take the plain random path.
    y = dataset.y if dataset.y is not None else np.zeros(len(dataset), dtype=np.float64)
    keep, held = split_indices(y, val_fraction, seed=seed, stratify=stratify, fn="train_val_split")
    return dataset.subset(keep), dataset.subset(held)


def image_shape(shape: Sequence[int], *, what: str = "input_shape") -> tuple[int, int, int]:
    """The channels-first image shape ``(C, H, W)`` of one sample of shape ``shape``.

    ``(H, W)`` is a one-channel image, ``(1, H, W)``; ``(C, H, W)`` is kept. Any other rank
    (flat rows among them, whose image shape cannot be told) is a ValueError naming ``what``.
    """
    dims = tuple(int(d) for d in shape)
    if len(dims) == 2:
        dims = (1, *dims)
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"{what}: expected an image shape (H, W) or (C, H, W) of positive sizes, got {tuple(shape)}")
    return dims[0], dims[1], dims[2]


def as_images(splits: DatasetSplits, shape: Sequence[int] | None = None) -> DatasetSplits:
    """``splits`` with every ``x`` seen as images ``(N, C, H, W)``, for a convolutional model.

    ``shape`` is ``(C, H, W)``, by default :func:`image_shape` of ``splits.input_shape``
    (the digits' ``(8, 8)`` becomes ``(1, 8, 8)``); its product must be the features per row.
    The arrays are reshaped, not copied (rows are C-contiguous, channel-major as CIFAR-10's are).
    """
    dims = image_shape(splits.input_shape if shape is None else shape,
                       what="as_images: shape" if shape is not None else f"as_images: {splits.name or 'the data'}")
    if math.prod(dims) != splits.num_features:
        raise ValueError(f"as_images: shape {dims} holds {math.prod(dims)} values per sample, but "
                         f"{splits.name or 'the data'} has {splits.num_features} features per sample")

    def view(ds: ArrayDataset) -> ArrayDataset:
        return ArrayDataset(ds.x.reshape(len(ds.x), *dims), ds.y, name=ds.name, classes=ds.classes)

    return DatasetSplits(train=view(splits.train), test=view(splits.test),
                         val=None if splits.val is None else view(splits.val), name=splits.name,
                         num_classes=splits.num_classes, input_shape=dims, classes=splits.classes,
                         label_column=splits.label_column)
