"""Data: in-memory datasets, deterministic batching, transforms, and the data sets the course uses.

Everything here is NumPy on the host; the fit loop moves one batch at a
time to its backend (or ask :func:`batches` to, with ``backend=``).

>>> from deepcore.data import load_dataset, batches
>>> splits = load_dataset("digits")            # embedded, no download
>>> for xb, yb in batches(splits.train, 64, seed=0, epoch=0):
...     pass

Files are only ever read from plain formats (npz without pickle, IDX,
CIFAR binary; the CIFAR python version through a restricted unpickler),
every size a file declares is checked against the bytes present before it
is allocated (:mod:`deepcore.data.limits`), and the public data sets' files,
downloaded or found on disk, are verified against known checksums before use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .batching import BatchIterator, batches, epoch_order
from .cifar import (
    CIFAR10_CLASSES,
    RestrictedUnpickler,
    load_cifar10,
    read_cifar_binary,
    read_cifar_pickle,
)
from .datasets import ArrayDataset, DatasetSplits, as_images, image_shape, split_indices, train_val_split
from .digits import DIGITS_CLASSES, load_digits, load_digits_arrays
from .download import LOCAL_RESOURCES, RESOURCES, Resource, default_data_dir, download_file, file_digests
from .errors import ChecksumError, DataFormatError, DatasetNotFoundError, DownloadError
from .files import load_file, read_npz_arrays
from .idx import (
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    load_fashion_mnist,
    load_mnist,
    read_idx,
)
from .toy import curve, four_points, noisy_curve
from .transforms import (
    Standardizer,
    num_polynomial_features,
    one_hot,
    polynomial_features,
)

__all__ = [
    "CIFAR10_CLASSES",
    "DATASET_NAMES",
    "DIGITS_CLASSES",
    "IMAGE_SHAPES",
    "KNOWN_SIZES",
    "LOCAL_RESOURCES",
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "RESOURCES",
    "ArrayDataset",
    "BatchIterator",
    "ChecksumError",
    "DataFormatError",
    "DatasetNotFoundError",
    "DatasetSplits",
    "DownloadError",
    "Resource",
    "RestrictedUnpickler",
    "Standardizer",
    "as_images",
    "batches",
    "curve",
    "dataset_name",
    "default_data_dir",
    "download_file",
    "epoch_order",
    "file_digests",
    "four_points",
    "image_shape",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_digits_arrays",
    "load_fashion_mnist",
    "load_file",
    "load_mnist",
    "noisy_curve",
    "num_polynomial_features",
    "one_hot",
    "polynomial_features",
    "read_cifar_binary",
    "read_cifar_pickle",
    "read_idx",
    "read_npz_arrays",
    "split_indices",
    "train_val_split",
]

DATASET_NAMES = ("digits", "mnist", "fashion-mnist", "cifar10")
_ALIASES = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}
# (features per sample, classes) of the named sets, known before any file is read.
KNOWN_SIZES = {"digits": (64, 10), "mnist": (784, 10), "fashion-mnist": (784, 10), "cifar10": (3072, 10)}
# Their images, channels first (what a convolutional model takes), also known before any file is read.
IMAGE_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def dataset_name(spec: str | os.PathLike[str]) -> str | None:
    """The canonical name of a named data set (``"Fashion_MNIST"`` -> ``"fashion-mnist"``), else None."""
    return _canonical(spec) if isinstance(spec, str) else None


def _canonical(name: str) -> str | None:
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    return key if key in DATASET_NAMES else None


def load_dataset(spec: str | os.PathLike[str], *, data_dir: str | os.PathLike[str] | None = None,
                 download: bool = True, seed: int = 0, val_fraction: float = 0.0, fetch: Any = None,
                 progress: bool | None = None, label_column: int | str | None = None,
                 num_classes: int | None = None, verify: bool = True) -> DatasetSplits:
    """A data set by name (``"digits"``, ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``) or a ``.npz``/``.csv`` path.

    x is float32 ``(N, features)`` (image sets scaled to [0, 1] and
    flattened; ``input_shape`` keeps the image shape, and :func:`as_images`
    views the rows as ``(N, C, H, W)`` images for a convolutional model), labels int64.
    ``data_dir``, ``download``, ``fetch``, ``progress`` and ``verify`` (check
    files found on disk against the known checksums) go to the MNIST and CIFAR
    loaders; ``label_column`` and ``num_classes`` to :func:`load_file`; ``seed``
    fixes the digits' and files' train/test split. ``val_fraction > 0`` holds
    out that part of train (stratified, ``seed``) as ``val``, unless the file
    brings its own.
    """
    kwargs = {"download": download, "fetch": fetch, "progress": progress, "verify": verify}
    name = _canonical(spec) if isinstance(spec, str) else None
    if label_column is not None and name is not None:
        raise ValueError(f"load_dataset: label_column applies to .csv files, not to {name!r}")
    if num_classes is not None and name is not None:
        raise ValueError(f"load_dataset: num_classes applies to .npz and .csv files; {name!r} has "
                         f"{KNOWN_SIZES[name][1]} classes")
    if name == "digits":
        splits = load_digits(seed=seed)
    elif name == "mnist":
        splits = load_mnist(data_dir, **kwargs)
    elif name == "fashion-mnist":
        splits = load_fashion_mnist(data_dir, **kwargs)
    elif name == "cifar10":
        splits = load_cifar10(data_dir, **kwargs)
    elif isinstance(spec, (str, os.PathLike)) and (Path(spec).suffix.lower() in (".npz", ".csv")
                                                   or Path(spec).is_file()):
        splits = load_file(spec, label_column=label_column, seed=seed, num_classes=num_classes)
    else:
        raise ValueError(f"load_dataset: unknown data set {spec!r}; valid names: {', '.join(DATASET_NAMES)}, "
                         f"or a path to a .npz or .csv file")
    if val_fraction and splits.val is None:
        train, val = train_val_split(splits.train, val_fraction, seed=seed)
        splits = DatasetSplits(train=train, test=splits.test, val=val, name=splits.name,
                               num_classes=splits.num_classes, input_shape=splits.input_shape, classes=splits.classes,
                               label_column=splits.label_column)
    return splits
