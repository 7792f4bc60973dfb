"""deepcore.data: datasets, batching, transforms, the embedded digits, and the file formats.

Every file is built here, tiny, in its real format (IDX raw and gzip, CIFAR
binary records and tar.gz, CIFAR python pickles, npz, csv); downloads use an
injected ``fetch``. No test reaches the network: an autouse fixture makes
any socket connection fail.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import pickle
import re
import socket
import struct
import tarfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

import deepcore as dc
from deepcore.data import (
    LOCAL_RESOURCES,
    RESOURCES,
    ArrayDataset,
    BatchIterator,
    ChecksumError,
    DataFormatError,
    DatasetNotFoundError,
    DatasetSplits,
    DownloadError,
    Resource,
    RestrictedUnpickler,
    Standardizer,
    batches,
    download,
    download_file,
    epoch_order,
    four_points,
    load_cifar10,
    load_dataset,
    load_digits,
    load_file,
    load_mnist,
    noisy_curve,
    num_polynomial_features,
    one_hot,
    polynomial_features,
    read_cifar_binary,
    read_cifar_pickle,
    read_idx,
    split_indices,
    train_val_split,
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path_factory):
    def refuse(*args, **kwargs):
        raise AssertionError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    # The cache (and its verified.json) in a fresh folder, never the user's ~/.cache.
    monkeypatch.setenv("DEEPCORE_DATA", str(tmp_path_factory.mktemp("cache")))


# ----------------------------------------------------------------- file builders
_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
              np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr)
    head = bytes([0, 0, _IDX_CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def mnist_arrays(seed=0, n_train=6, n_test=4):
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_mnist(folder: Path, gz: bool, arrays=None) -> dict:
    arrays = arrays or mnist_arrays()
    folder.mkdir(parents=True, exist_ok=True)
    for base, arr in arrays.items():
        write_idx(folder / (base + (".gz" if gz else "")), arr, gz)
    return arrays


def known_as_original(monkeypatch, folder: Path, key="mnist") -> None:
    """Make the gzipped IDX files in ``folder`` the 'originals' of RESOURCES[key], so they verify."""
    fake = tuple(resource_for((folder / res.filename).read_bytes(), res.filename) for res in RESOURCES[key])
    monkeypatch.setitem(RESOURCES, key, fake)


def cifar_batches(per_file=3, seed=0):
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {n: (rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8),
                rng.integers(0, 10, per_file, dtype=np.uint8)) for n in names}


def cifar_record_bytes(images, labels) -> bytes:
    rows = np.concatenate([labels[:, None], images.reshape(len(images), -1)], axis=1)
    return rows.astype(np.uint8).tobytes()


def write_cifar_bin_dir(folder: Path, batches_) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n, (im, lab) in batches_.items():
        (folder / f"{n}.bin").write_bytes(cifar_record_bytes(im, lab))
    return folder


def tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the CIFAR-10 python version: byte strings
    as (SHORT_)BINSTRING and the array rebuilder as ``numpy.core.multiarray._reconstruct``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _binstring(self, data: bytes) -> None:
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    def save_bytes(self, obj):
        self._binstring(obj)
        self.memoize(obj)

    def save_str(self, obj):
        self._binstring(obj.encode("latin1"))
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", "") == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def cifar_pickle_bytes(images, labels, protocol=2, bytes_keys=False) -> bytes:
    entry = {"batch_label": "testing batch", "labels": [int(v) for v in labels],
             "data": images.reshape(len(images), -1), "filenames": [f"img_{i}.png" for i in range(len(labels))]}
    if bytes_keys:
        entry = {k.encode(): v for k, v in entry.items()}
    if protocol == "py2":
        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump(entry)
        return buf.getvalue()
    return pickle.dumps(entry, protocol=protocol)


def expected_cifar(batches_):
    train = [f"data_batch_{i}" for i in range(1, 6)]
    x = np.concatenate([batches_[n][0] for n in train]).reshape(-1, 3072).astype(np.float32) / np.float32(255)
    y = np.concatenate([batches_[n][1] for n in train]).astype(np.int64)
    return x, y


# ----------------------------------------------------------------- ArrayDataset, DatasetSplits, splits
def test_array_dataset_basics():
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    ds = ArrayDataset(x, y, name="toy")
    assert len(ds) == 10 and ds.num_classes == 3 and ds.input_shape == (2,)
    xb, yb = ds[np.array([3, 0, 7])]
    assert xb.dtype == np.float32 and xb.flags.c_contiguous
    np.testing.assert_array_equal(xb, x[[3, 0, 7]])
    np.testing.assert_array_equal(yb, y[[3, 0, 7]])
    xb[:] = -1  # a gathered batch is a copy
    assert x.min() == 0
    assert ArrayDataset(x, y, classes=5).num_classes == 5
    assert ArrayDataset(x, y, classes=["a", "b", "c"]).classes == ("a", "b", "c")
    assert ArrayDataset(x).num_classes is None and ArrayDataset(x)[[1]][1] is None
    assert ArrayDataset(x, x[:, :1]).num_classes is None  # float targets: regression


def test_array_dataset_rejects_bad_input():
    x = np.zeros((4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"x has 4 samples but y has shape \(3,\)"):
        ArrayDataset(x, np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\), got y\[2\] = 2"):
        ArrayDataset(x, np.array([0, 1, 2, 0]), classes=2)
    with pytest.raises(TypeError, match="numeric"):
        ArrayDataset(np.array([["a"], ["b"]]))


def test_dataset_splits_checks_shapes_and_derives_fields():
    a = ArrayDataset(np.zeros((4, 6), np.float32), np.array([0, 1, 2, 3]))
    b = ArrayDataset(np.zeros((2, 6), np.float32), np.array([4, 0]))
    s = DatasetSplits(train=a, test=b, input_shape=(2, 3))
    assert s.num_classes == 5 and s.input_shape == (2, 3) and s.num_features == 6
    with pytest.raises(ValueError, match="test samples have shape"):
        DatasetSplits(train=a, test=ArrayDataset(np.zeros((2, 5)), np.array([0, 1])))


def test_split_indices_is_stratified_disjoint_and_seeded():
    y = np.repeat(np.arange(4), [50, 30, 15, 5])
    keep, held = split_indices(y, 0.2, seed=3)
    assert len(held) == 20 and len(keep) == 80
    assert np.intersect1d(keep, held).size == 0 and np.union1d(keep, held).size == 100
    np.testing.assert_array_equal(np.bincount(y[held], minlength=4), [10, 6, 3, 1])
    k2, h2 = split_indices(y, 0.2, seed=3)
    np.testing.assert_array_equal(held, h2)
    assert not np.array_equal(held, split_indices(y, 0.2, seed=4)[1])
    with pytest.raises(ValueError, match="fraction must be a number in"):
        split_indices(y, 1.5)
    with pytest.raises(ValueError, match="both must be at least 1"):
        split_indices(y[:2], 0.1)


def test_train_val_split():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    y = np.array([0] * 10 + [1] * 10)
    train, val = train_val_split(ArrayDataset(x, y, classes=2), 0.2, seed=0)
    assert len(train) == 16 and len(val) == 4 and val.classes == ("0", "1")
    np.testing.assert_array_equal(np.bincount(val.y), [2, 2])
    assert set(train.x[:, 0]) | set(val.x[:, 0]) == set(x[:, 0])
    # Regression targets: a plain seeded split.
    t2, v2 = train_val_split(ArrayDataset(x, x[:, :1]), 0.25, seed=1)
    assert len(v2) == 5 and len(t2) == 15


# ----------------------------------------------------------------- batching
def id_dataset(n=10, dtype=np.float32):
    return ArrayDataset(np.arange(n, dtype=dtype)[:, None] * np.ones((1, 3), dtype=dtype), np.arange(n))


@pytest.mark.parametrize("seed,epoch", [(0, 0), (0, 1), (7, 3)])
def test_batch_order_is_a_function_of_seed_and_epoch(seed, epoch):
    ds = id_dataset(23)
    first = [yb for _, yb in batches(ds, 5, seed=seed, epoch=epoch)]
    again = [yb for _, yb in BatchIterator(ds, 5, seed=seed, epoch=epoch)]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.concatenate(first), np.random.default_rng([seed, epoch]).permutation(23))
    np.testing.assert_array_equal(epoch_order(23, seed=seed, epoch=epoch), np.concatenate(first))


def test_set_epoch_matches_a_resumed_iterator_and_epochs_differ():
    ds = id_dataset(30)
    it = batches(ds, 4, seed=5)
    orders = []
    for e in range(3):
        it.set_epoch(e)
        order = np.concatenate([yb for _, yb in it])
        resumed = np.concatenate([yb for _, yb in batches(ds, 4, seed=5, epoch=e)])
        np.testing.assert_array_equal(order, resumed)
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    # Iterating again without set_epoch repeats the epoch.
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in it]), orders[2])


def test_every_index_once_per_epoch_with_remainder():
    ds = id_dataset(10)
    it = batches(ds, 3, seed=1)
    got = list(it)
    assert len(it) == 4 and [len(yb) for _, yb in got] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.sort(np.concatenate([yb for _, yb in got])), np.arange(10))
    for xb, yb in got:  # rows stay paired with their labels
        np.testing.assert_array_equal(xb[:, 0], yb.astype(np.float32))


def test_drop_last():
    ds = id_dataset(10)
    it = batches(ds, 3, seed=1, drop_last=True)
    got = [yb for _, yb in it]
    assert len(it) == 3 and [len(b) for b in got] == [3, 3, 3]
    assert len(np.unique(np.concatenate(got))) == 9
    assert len(batches(id_dataset(9), 3, drop_last=True)) == 3
    assert len(batches(id_dataset(2), 3, drop_last=True)) == 0 and list(batches(id_dataset(2), 3, drop_last=True)) == []


def test_batches_keep_dtype_and_are_contiguous():
    for dtype in (np.float32, np.float64, np.uint8):
        for xb, _ in batches(id_dataset(7, dtype), 3, seed=0):
            assert xb.dtype == dtype and xb.flags.c_contiguous
    xs = [yb for _, yb in batches(id_dataset(7), 3, shuffle=False)]
    np.testing.assert_array_equal(np.concatenate(xs), np.arange(7))
    assert all(yb is None for _, yb in batches(ArrayDataset(np.zeros((5, 2))), 2))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8", None])
def test_batch_size_is_validated(bad):
    with pytest.raises((TypeError, ValueError), match="batch_size"):
        batches(id_dataset(), bad)


def test_batches_to_a_backend():
    ds = id_dataset(6)
    xb, yb = next(iter(batches(ds, 4, backend="numpy")))
    assert isinstance(xb, np.ndarray) and xb.dtype == np.float32
    if dc.available_backends().get("array_api_strict") is True:
        xb, yb = next(iter(batches(ds, 4, seed=2, backend="array_api_strict")))
        b = dc.get_backend(xb)
        assert b.name == "array_api_strict" and b.dtype_name(xb.dtype) == "float32"
        ref_x, ref_y = next(iter(batches(ds, 4, seed=2)))
        np.testing.assert_array_equal(b.to_numpy(xb), ref_x)
        np.testing.assert_array_equal(b.to_numpy(yb), ref_y)
    with pytest.raises(dc.UnknownBackendError):
        batches(ds, 4, backend="no-such-backend")


# ----------------------------------------------------------------- transforms
@pytest.mark.parametrize("d", [1, 2, 3, 5, 10, 64])
def test_quadratic_feature_count_is_course_formula(d):
    x = np.random.default_rng(d).standard_normal((3, d))
    assert polynomial_features(x, 2).shape == (3, (d + 1) * (d + 2) // 2)
    assert num_polynomial_features(d, 2) == (d + 1) * (d + 2) // 2
    assert polynomial_features(x, 2, include_bias=False).shape[1] == (d + 1) * (d + 2) // 2 - 1


@pytest.mark.parametrize("d,degree", [(1, 12), (2, 3), (3, 4), (4, 1), (3, 0)])
def test_polynomial_feature_count_general(d, degree):
    x = np.ones((2, d))
    assert polynomial_features(x, degree).shape[1] == math.comb(d + degree, degree)


def test_polynomial_feature_values_and_dtype():
    x = np.array([[2.0, 3.0], [-1.0, 0.5]], dtype=np.float32)
    out = polynomial_features(x, 2)
    a, b = x[:, 0], x[:, 1]
    np.testing.assert_allclose(out, np.stack([np.ones(2), a, b, a * a, a * b, b * b], axis=1))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(polynomial_features(np.array([1.0, 2.0]), 3),
                                  [[1, 1, 1, 1], [1, 2, 4, 8]])
    with pytest.raises(ValueError, match="degree"):
        polynomial_features(x, -1)


def test_standardizer():
    rng = np.random.default_rng(0)
    train = np.concatenate([rng.normal(5, 3, (50, 2)), np.full((50, 1), 0.1)], axis=1).astype(np.float32)
    s = Standardizer().fit(train)
    z = s.transform(train)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z[:, :2].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, :2].std(axis=0), 1, atol=1e-5)
    assert s.std[2] == 1.0 and np.all(z[:, 2] == 0)  # constant feature: std 1, maps to 0
    test = rng.normal(5, 3, (4, 3)).astype(np.float32)
    restored = Standardizer.from_state(json.loads(json.dumps(s.state())))
    np.testing.assert_array_equal(restored.transform(test), s.transform(test))
    np.testing.assert_allclose(s.inverse_transform(s.transform(test)), test, rtol=1e-5)
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        s.transform(np.zeros((2, 4)))
    with pytest.raises(RuntimeError, match="fit"):
        Standardizer().transform(test)


def test_one_hot():
    out = one_hot(np.array([2, 0, 1]), 3)
    np.testing.assert_array_equal(out, [[0, 0, 1], [1, 0, 0], [0, 1, 0]])
    assert out.dtype == np.float32 and one_hot([1], 2, dtype="float64").dtype == np.float64
    with pytest.raises(ValueError, match=r"labels\[1\] = 3"):
        one_hot(np.array([0, 3]), 3)
    with pytest.raises(TypeError, match="integer"):
        one_hot(np.array([0.0, 1.0]), 2)


# ----------------------------------------------------------------- toy sets
def test_four_points():
    ds = four_points()
    np.testing.assert_array_equal(ds.x, [[2], [4], [6], [8]])
    np.testing.assert_array_equal(ds.y, [[3], [4], [5], [6]])
    assert ds.x.dtype == ds.y.dtype == np.float64
    w, b = np.linalg.lstsq(polynomial_features(ds.x, 1), ds.y, rcond=None)[0][::-1, 0]
    assert w == pytest.approx(0.5) and b == pytest.approx(2.0)


def test_noisy_curve_shows_under_and_over_fitting():
    s = noisy_curve(10, noise=0.3, seed=0)
    assert s.train.x.shape == (10, 1) and s.test.x.shape == (100, 1)
    np.testing.assert_array_equal(s.train.y, noisy_curve(10, noise=0.3, seed=0).train.y)
    np.testing.assert_array_equal(s.train.x, noisy_curve(10, seed=0, n_test=7).train.x)
    assert not np.array_equal(s.train.x, noisy_curve(10, seed=1).train.x)
    train_err, test_err = {}, {}
    for order in (1, 2, 3, 4, 12):
        w = np.linalg.lstsq(polynomial_features(s.train.x, order), s.train.y, rcond=None)[0]
        train_err[order] = np.sqrt(np.mean((polynomial_features(s.train.x, order) @ w - s.train.y) ** 2))
        test_err[order] = np.sqrt(np.mean((polynomial_features(s.test.x, order) @ w - s.test.y) ** 2))
    errs = [train_err[k] for k in (1, 2, 3, 4, 12)]
    assert all(a >= b - 1e-9 for a, b in zip(errs, errs[1:], strict=False))
    assert train_err[12] < 1e-6 < test_err[3] < test_err[1] < test_err[12]


# ----------------------------------------------------------------- digits
def test_digits_shape_range_and_split():
    s = load_digits()
    assert len(s.train) + len(s.test) == 1797 and len(s.test) == 359
    assert s.train.x.shape[1] == 64 and s.num_features == 64 and s.input_shape == (8, 8)
    assert s.num_classes == 10 and s.classes == tuple("0123456789")
    for part in (s.train, s.test):
        assert part.x.dtype == np.float32 and part.y.dtype == np.int64
        assert part.x.min() == 0.0 and part.x.max() == 1.0
    assert set(np.unique(s.train.x * 16)) <= set(range(17))
    counts = np.bincount(s.test.y)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified
    again = load_digits()
    np.testing.assert_array_equal(again.test.x, s.test.x)
    assert not np.array_equal(load_digits(seed=1).test.y, s.test.y)


def test_embedded_digits_file_is_plain_npz_matching_provenance():
    ref = resources.files("deepcore.data").joinpath("digits.npz")
    raw = ref.read_bytes()
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
        assert sorted(npz.files) == ["x", "y"]
        x, y = npz["x"], npz["y"]
    assert x.dtype == np.uint8 and x.shape == (1797, 64) and x.min() >= 0 and x.max() == 16
    assert y.dtype == np.uint8 and y.shape == (1797,) and set(y.tolist()) == set(range(10))
    doc = resources.files("deepcore.data").joinpath("DIGITS_PROVENANCE.md").read_text()
    stated = re.search(r"sha256 of `digits.npz`: `([0-9a-f]{64})`", doc).group(1)
    assert hashlib.sha256(raw).hexdigest() == stated
    assert "CC BY 4.0" in doc and "Alpaydin" in doc and "Kaynak" in doc


# ----------------------------------------------------------------- IDX / MNIST
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_roundtrip(tmp_path, gz, dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    got = read_idx(write_idx(tmp_path / "a-idx3", arr, gz))
    assert got.dtype == np.dtype(dtype).newbyteorder("=") and got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("layout", ["gz", "raw", "subdir", "torchvision", "dotted"])
def test_load_mnist_from_files(tmp_path, monkeypatch, layout):
    folder = {"subdir": tmp_path / "mnist", "torchvision": tmp_path / "MNIST" / "raw"}.get(layout, tmp_path)
    arrays = write_mnist(folder, gz=layout != "raw")
    if layout != "raw":
        known_as_original(monkeypatch, folder)
    if layout == "dotted":  # train-images.idx3-ubyte, as some mirrors name them
        for p in list(folder.iterdir()):
            p.rename(p.with_name(p.name.replace("-idx", ".idx")))
    s = load_mnist(tmp_path, download=False, verify=layout != "raw")  # an unpacked copy cannot be verified
    assert s.name == "mnist" and s.input_shape == (28, 28) and s.num_classes == 10
    assert s.train.x.shape == (6, 784) and s.train.x.dtype == np.float32 and s.test.x.shape == (4, 784)
    np.testing.assert_allclose(s.train.x, arrays["train-images-idx3-ubyte"].reshape(6, -1) / 255, rtol=1e-6)
    np.testing.assert_array_equal(s.test.y, arrays["t10k-labels-idx1-ubyte"])
    assert s.test.y.dtype == np.int64


def _corrupt_cases():
    good = idx_bytes(np.zeros((2, 3, 3), np.uint8))
    return {
        "wrong magic": (good[:0] + b"\x08\x03\x00\x00" + good[4:], "bad magic number"),
        "unknown type code": (b"\x00\x00\x07\x03" + good[4:], "unknown IDX element type code 0x07"),
        "zero dims": (b"\x00\x00\x08\x00", "0 dimensions"),
        "truncated header": (good[:9], "truncated"),
        "truncated payload": (good[:-5], "wrong size"),
        "extra bytes": (good + b"\x00", "wrong size"),
        "gz truncated": (gzip.compress(good)[:-12], "corrupt or truncated gzip"),
        "gz payload short": (gzip.compress(good[:-5]), "truncated"),
        "gz extra bytes": (gzip.compress(good + b"\x01\x02"), "more data than"),
        "gz bad crc": (gzip.compress(good)[:-8] + b"\x00\x00\x00\x00" + gzip.compress(good)[-4:], "gzip"),
        "gz garbage": (b"\x1f\x8b" + b"\x08\x00" + bytes(range(40)), "gzip"),
    }


@pytest.mark.parametrize("case", list(_corrupt_cases()))
def test_corrupt_idx_is_refused_with_the_file_name(tmp_path, case):
    data, message = _corrupt_cases()[case]
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(data)
    with pytest.raises(DataFormatError) as info:
        read_idx(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_mnist_refuses_a_corrupt_file_and_mismatched_counts(tmp_path):
    arrays = write_mnist(tmp_path, gz=True)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(DataFormatError, match=re.escape(str(bad))):
        load_mnist(tmp_path, download=False, verify=False)
    arrays["t10k-labels-idx1-ubyte"] = arrays["t10k-labels-idx1-ubyte"][:3]
    write_mnist(tmp_path, gz=True, arrays=arrays)
    with pytest.raises(DataFormatError, match="has 4 images but .* has 3 labels"):
        load_mnist(tmp_path, download=False, verify=False)
    arrays["t10k-labels-idx1-ubyte"] = np.array([1, 2, 10, 3], np.uint8)
    write_mnist(tmp_path, gz=True, arrays=arrays)
    with pytest.raises(DataFormatError, match="label 10 at index 2"):
        load_mnist(tmp_path, download=False, verify=False)


def test_mnist_missing_without_download(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte.gz.*not found"):
        load_mnist(tmp_path, download=False)


# ----------------------------------------------------------------- downloads
def resource_for(data: bytes, name="blob.bin", urls=("https://mirror-a/blob.bin",)) -> Resource:
    return Resource(name, tuple(urls), len(data), hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest())


def writer(payload: bytes, fail_after: int | None = None, exc: BaseException | None = None):
    calls = []

    def fetch(url, dest):
        calls.append(url)
        with open(dest, "wb") as f:
            if fail_after is None:
                f.write(payload)
                return
            f.write(payload[:fail_after])
        raise exc or ConnectionResetError("connection reset mid-download")

    fetch.calls = calls
    return fetch


def test_download_good_bytes(tmp_path):
    data = b"hello data" * 100
    path = download_file(resource_for(data), tmp_path / "d", fetch=writer(data))
    assert path == tmp_path / "d" / "blob.bin" and path.read_bytes() == data
    assert sorted(p.name for p in path.parent.iterdir()) == ["blob.bin"]


@pytest.mark.parametrize("delivered,message", [(b"X" * 1000, "md5"), (b"hello data" * 50, "size 500 bytes")],
                         ids=["bad-bytes", "partial"])
def test_download_wrong_checksum_leaves_nothing(tmp_path, delivered, message):
    data = b"hello data" * 100
    with pytest.raises(ChecksumError, match=message):
        download_file(resource_for(data), tmp_path, fetch=writer(delivered))
    assert list(tmp_path.iterdir()) == []


def test_download_that_dies_midway_leaves_nothing(tmp_path):
    data = b"0123456789" * 100
    with pytest.raises(DownloadError, match="connection reset"):
        download_file(resource_for(data), tmp_path, fetch=writer(data, fail_after=300))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        download_file(resource_for(data), tmp_path, fetch=writer(data, fail_after=300, exc=KeyboardInterrupt()))
    assert list(tmp_path.iterdir()) == []


def test_download_tries_the_next_mirror(tmp_path):
    data = b"payload" * 10

    def fetch(url, dest):
        Path(dest).write_bytes(b"tampered" if "mirror-a" in url else data)

    res = resource_for(data, urls=("https://mirror-a/blob.bin", "https://mirror-b/blob.bin"))
    assert download_file(res, tmp_path, fetch=fetch).read_bytes() == data
    with pytest.raises(ChecksumError, match="mirror-a.*\n.*mirror-b"):
        download_file(res, tmp_path / "x", fetch=writer(b"tampered"))


def test_default_fetch_is_replaceable_module_wide(tmp_path, monkeypatch):
    data = b"via module fetch"
    seen = []

    def fake(url, dest, *, progress=None):
        seen.append(url)
        Path(dest).write_bytes(data)

    monkeypatch.setattr(download, "urllib_fetch", fake)
    assert download_file(resource_for(data), tmp_path).read_bytes() == data and seen == ["https://mirror-a/blob.bin"]


def test_mnist_download_then_reuse(tmp_path, monkeypatch):
    arrays = mnist_arrays(seed=4)
    blobs = {base + ".gz": gzip.compress(idx_bytes(arr)) for base, arr in arrays.items()}
    fake = tuple(resource_for(b, name, urls=(f"https://mirror/{name}",)) for name, b in blobs.items())
    monkeypatch.setitem(RESOURCES, "mnist", fake)

    def fetch(url, dest):
        Path(dest).write_bytes(blobs[url.rsplit("/", 1)[1]])

    s = load_mnist(tmp_path, fetch=fetch, progress=False)
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(blobs)
    np.testing.assert_array_equal(s.train.y, arrays["train-labels-idx1-ubyte"])
    # Second load: files are on disk, so the fetch is never called.
    s2 = load_mnist(tmp_path, fetch=writer(b"", fail_after=0))
    np.testing.assert_array_equal(s2.test.x, s.test.x)
    # The cache folder comes from $DEEPCORE_DATA when data_dir is not given.
    monkeypatch.setenv("DEEPCORE_DATA", str(tmp_path))
    np.testing.assert_array_equal(load_dataset("mnist", download=False).train.x, s.train.x)


def test_checksum_table_is_complete():
    for key in ("mnist", "fashion-mnist", "cifar10"):
        for res in RESOURCES[key]:
            assert re.fullmatch(r"[0-9a-f]{32}", res.md5) and re.fullmatch(r"[0-9a-f]{64}", res.sha256)
            assert res.size > 0 and res.urls and all(u.endswith("/" + res.filename) for u in res.urls)
    assert [r.filename for r in RESOURCES["cifar10"]] == ["cifar-10-binary.tar.gz"]


def test_progress_line_only_when_asked(capsys, monkeypatch):
    from deepcore._progress import Progress

    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # force the plain fallback
    bar = Progress(3_000_000, "blob", enabled=True, byte_counts=True)
    bar.update(1_500_000)
    bar.close()
    assert "blob: 1.5/3.0 MB" in capsys.readouterr().err
    steps = Progress(10, "epoch 1/3", enabled=True, unit="batch")
    steps.update(loss=0.25)
    assert re.search(r"epoch 1/3: 1/10 \[00:00<00:00, [\d.]+batch/s\]  loss 0.25", capsys.readouterr().err)
    quiet = Progress(1000, "blob", byte_counts=True)  # stderr is not a terminal under pytest
    quiet.update(1000)
    quiet.close()
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------- CIFAR-10
def test_cifar_binary_dir(tmp_path):
    b = cifar_batches()
    write_cifar_bin_dir(tmp_path / "cifar-10-batches-bin", b)
    s = load_cifar10(tmp_path, download=False, verify=False)  # the unpacked binary batches have no checksums
    x, y = expected_cifar(b)
    assert s.input_shape == (3, 32, 32) and s.train.x.shape == (15, 3072) and s.test.x.shape == (3, 3072)
    np.testing.assert_array_equal(s.train.x, x)
    np.testing.assert_array_equal(s.train.y, y)
    assert s.classes[0] == "airplane" and s.num_classes == 10 and s.train.x.dtype == np.float32
    # Channel-major records: the first 1024 pixels are red.
    im, lab = read_cifar_binary(tmp_path / "cifar-10-batches-bin" / "test_batch.bin")
    np.testing.assert_array_equal(im, b["test_batch"][0])
    np.testing.assert_array_equal(s.test.x[0, :1024].reshape(32, 32) * 255, b["test_batch"][0][0, 0])


def test_cifar_binary_tar_gz(tmp_path, monkeypatch):
    b = cifar_batches(per_file=2)
    archive = tar_gz(tmp_path / "cifar-10-binary.tar.gz",
                     {f"cifar-10-batches-bin/{n}.bin": cifar_record_bytes(*v) for n, v in b.items()})
    monkeypatch.setitem(RESOURCES, "cifar10", (resource_for(archive.read_bytes(), archive.name),))
    x, y = expected_cifar(b)
    for where in (tmp_path, archive):
        s = load_cifar10(where, download=False)
        np.testing.assert_array_equal(s.train.x, x)
        np.testing.assert_array_equal(s.test.y, b["test_batch"][1])


def test_cifar_corrupt_files(tmp_path):
    b = cifar_batches()
    folder = write_cifar_bin_dir(tmp_path / "cifar-10-batches-bin", b)
    bad = folder / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(DataFormatError, match=re.escape(str(bad)) + ".*not a whole number of 3073-byte"):
        load_cifar10(tmp_path, download=False, verify=False)
    data = bytearray(cifar_record_bytes(*b["data_batch_3"]))
    data[3073] = 42
    bad.write_bytes(bytes(data))
    with pytest.raises(DataFormatError, match="record 1 has label byte 42"):
        load_cifar10(tmp_path, download=False, verify=False)
    (folder / "test_batch.bin").unlink()
    bad.write_bytes(cifar_record_bytes(*b["data_batch_3"]))
    with pytest.raises(DatasetNotFoundError, match="test_batch.bin"):
        load_cifar10(tmp_path, download=False, verify=False)


def test_cifar_corrupt_archive(tmp_path):
    b = cifar_batches(per_file=1)
    archive = tar_gz(tmp_path / "cifar-10-binary.tar.gz",
                     {f"cifar-10-batches-bin/{n}.bin": cifar_record_bytes(*v) for n, v in b.items()})
    whole = archive.read_bytes()
    archive.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataFormatError, match="corrupt or truncated archive"):
        load_cifar10(archive, download=False, verify=False)
    tar_gz(archive, {"cifar-10-batches-bin/data_batch_1.bin": cifar_record_bytes(*b["data_batch_1"])})
    with pytest.raises(DataFormatError, match="lacks data_batch_2.bin"):
        load_cifar10(archive, download=False, verify=False)


def test_cifar_download_with_injected_fetch(tmp_path, monkeypatch):
    b = cifar_batches(per_file=1)
    blob = tar_gz(tmp_path / "src.tar.gz", {f"cifar-10-batches-bin/{n}.bin": cifar_record_bytes(*v)
                                            for n, v in b.items()}).read_bytes()
    monkeypatch.setitem(RESOURCES, "cifar10", (resource_for(blob, "cifar-10-binary.tar.gz"),))
    root = tmp_path / "cache"
    s = load_cifar10(root, fetch=writer(blob))
    assert (root / "cifar10" / "cifar-10-binary.tar.gz").is_file() and len(s.train) == 5
    with pytest.raises(ChecksumError):
        load_cifar10(tmp_path / "other", fetch=writer(blob[:-1]))
    assert list((tmp_path / "other" / "cifar10").iterdir()) == []


@pytest.mark.parametrize("protocol,bytes_keys", [("py2", False), (2, False), (2, True), (4, False), (5, False)])
def test_cifar_python_version(tmp_path, monkeypatch, protocol, bytes_keys):
    b = cifar_batches(per_file=2, seed=9)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for n, (im, lab) in b.items():
        (folder / n).write_bytes(cifar_pickle_bytes(im, lab, protocol, bytes_keys))
    x, y = expected_cifar(b)
    monkeypatch.setitem(LOCAL_RESOURCES, "cifar10", tuple(resource_for((folder / n).read_bytes(), n) for n in b))
    s = load_cifar10(tmp_path, download=False)
    np.testing.assert_array_equal(s.train.x, x)
    np.testing.assert_array_equal(s.train.y, y)
    im, lab = read_cifar_pickle(folder / "test_batch")
    np.testing.assert_array_equal(im, b["test_batch"][0])
    archive = tar_gz(tmp_path / "cifar-10-python.tar.gz",
                     {f"cifar-10-batches-py/{n}": (folder / n).read_bytes() for n in b})
    monkeypatch.setitem(LOCAL_RESOURCES, "cifar10", (resource_for(archive.read_bytes(), archive.name),))
    np.testing.assert_array_equal(load_cifar10(archive, download=False).test.x, s.test.x)


class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("make", [
    lambda marker: _Evil(os.system, f"touch {marker}"),
    lambda marker: _Evil(eval, f"open({str(marker)!r}, 'w').close()"),
    lambda marker: {"data": _Evil(getattr, _Evil(__import__, "os"), "system"), "labels": [0]},
    lambda marker: _Evil(__import__("subprocess").call, ["touch", str(marker)]),
], ids=["os.system", "eval", "getattr", "subprocess"])
def test_malicious_pickle_is_refused_without_running(tmp_path, make):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(make(marker), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        RestrictedUnpickler(io.BytesIO(payload)).load()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(payload)
    with pytest.raises(DataFormatError, match="refusing to load global"):
        read_cifar_pickle(folder / "data_batch_1")
    assert not marker.exists()


# ----------------------------------------------------------------- user files
def test_npz_without_and_with_test_split(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 2, 3))
    y = np.repeat([0, 1, 2, 3], 5)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    s = load_file(tmp_path / "a.npz", seed=0)
    assert len(s.train) == 16 and len(s.test) == 4 and s.input_shape == (2, 3) and s.num_features == 6
    assert s.train.x.shape == (16, 6) and s.train.x.dtype == np.float32 and s.num_classes == 4
    np.testing.assert_array_equal(np.bincount(s.test.y), [1, 1, 1, 1])
    np.savez(tmp_path / "b.npz", x=x, y=y.astype(np.float64), x_test=x[:3], y_test=np.array([4, 0, 1]))
    s = load_file(tmp_path / "b.npz")
    assert len(s.train) == 20 and len(s.test) == 3 and s.num_classes == 5 and s.train.y.dtype == np.int64


@pytest.mark.parametrize("arrays,message", [
    ({"x": np.zeros((3, 2))}, "needs arrays 'x' and 'y'"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(2, np.int64)}, "x has 3 rows but y has shape"),
    ({"x": np.array([[0.0, 1.0], [np.nan, 2.0]]), "y": np.array([0, 1])}, "non-finite value nan at row 1, column 0"),
    ({"x": np.zeros((2, 2)), "y": np.array([0, -1])}, r"y\[1\] = -1"),
    ({"x": np.zeros((2, 2)), "y": np.array([0.0, 1.5])}, "integers >= 0"),
    ({"x": np.zeros((2, 2)), "y": np.array([0, 1]), "x_test": np.zeros((1, 2))}, "without 'y_test'"),
    ({"x": np.array([[1, None]], dtype=object), "y": np.array([0])}, "only pickle can read"),
], ids=["no-y", "lengths", "nan", "negative", "fractional", "half-test", "object"])
def test_npz_validation(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataFormatError, match=message):
        load_file(path)


def test_npz_with_pickle_is_refused(tmp_path):
    path = tmp_path / "p.npz"
    path.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(DataFormatError, match="not a readable .npz"):
        load_file(path)


def test_csv_label_column_by_name_and_default(tmp_path):
    path = tmp_path / "t.csv"
    rows = ["a,label,b"] + [f"{i}.5,{i % 3},{-i}" for i in range(10)]
    path.write_text("\n".join(rows) + "\n")
    s = load_file(path, label_column="label", test_fraction=0.3, seed=1)
    x = np.concatenate([s.train.x, s.test.x])
    y = np.concatenate([s.train.y, s.test.y])
    order = np.argsort(x[:, 1])[::-1]  # b = -i
    np.testing.assert_array_equal(x[order], [[i + 0.5, -i] for i in range(10)])
    np.testing.assert_array_equal(y[order], [i % 3 for i in range(10)])
    assert s.num_classes == 3 and s.input_shape == (2,) and len(s.test) == 3
    plain = tmp_path / "p.csv"
    plain.write_text("1,2,0\n3,4,1\n5,6,1\n7,8,0\n9,10,1\n")
    s = load_file(plain)
    assert s.train.x.shape[1] == 2 and set(np.concatenate([s.train.y, s.test.y])) == {0, 1}
    assert s.label_column == "index 2"
    # Column 0 holds 1, 3, 5, 7, 9: ten classes for five rows, half of them empty: refused...
    with pytest.raises(DataFormatError, match="regression target"):
        load_file(plain, label_column=0)
    # ...unless the class count is given.
    assert load_file(plain, label_column=0, num_classes=10).num_classes == 10


@pytest.mark.parametrize("text,message", [
    ("a,b,y\n1,2,0\n3,nan,1\n", "row 3, column 'b' (#2): value 'nan' is not finite"),
    ("a,b,y\n1,2,0\n3,inf,1\n", "row 3, column 'b'"),
    ("a,b,y\n1,2,0\n\n3,x7,1\n", "row 4, column 'b' (#2): cannot parse 'x7'"),
    ("a,b,y\n1,,0\n", "row 2, column 'b' (#2): an empty cell"),
    ("a,b,y\n1,2,0\n3,4\n", "row 3 has 2 fields, expected 3"),
    ("a,b,y\n1,2,0\n3,4,-1\n", "row 3 = -1"),
    ("a,b,y\n1,2,0\n3,4,0.5\n", "integers >= 0"),
    ("1,2,0\n", "label_column='y' names a column but the file has no header"),
    ("a,b,c\n1,2,0\n", "no column named 'y'; columns: a, b, c"),
    ("a,b,y\n", "no data rows"),
])
def test_csv_errors_name_the_place(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataFormatError) as info:
        load_file(path, label_column="y")
    assert message in str(info.value) and str(path) in str(info.value)


def test_load_file_rejects_other_suffixes(tmp_path):
    with pytest.raises(ValueError, match="supported: .npz, .csv"):
        load_file(tmp_path / "data.json")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_file(tmp_path / "missing.csv")


# ----------------------------------------------------------------- load_dataset
def test_load_dataset_names_and_paths(tmp_path, monkeypatch):
    assert load_dataset("digits").num_features == 64
    s = load_dataset("Digits", seed=0, val_fraction=0.1)
    assert len(s.val) == 144 and len(s.train) == 1294 and s.val.x.dtype == np.float32
    with pytest.raises(ValueError, match="valid names: digits, mnist, fashion-mnist, cifar10"):
        load_dataset("imagenet")
    write_mnist(tmp_path / "fashion-mnist", gz=True)
    known_as_original(monkeypatch, tmp_path / "fashion-mnist", "fashion-mnist")
    f = load_dataset("Fashion_MNIST", data_dir=tmp_path, download=False)
    assert f.name == "fashion-mnist" and f.classes[-1] == "Ankle boot" and f.train.x.shape == (6, 784)
    path = tmp_path / "d.csv"
    path.write_text("f,cls\n" + "".join(f"{i},{i % 2}\n" for i in range(10)))
    assert load_dataset(str(path), label_column="cls").num_classes == 2
    assert load_dataset(path).num_classes == 2
    with pytest.raises(ValueError, match="label_column applies to .csv files"):
        load_dataset("digits", label_column="cls")
