"""deepcore.data against hostile or mistaken files: class counts a column cannot support, the
label column of a CSV, sizes declared by headers (npz, gzip IDX, CIFAR pickles and archives),
corrupt files, and the checksums of public data sets found on disk.

Every file is built here, tiny; "huge" sizes are only ever declared, and tracemalloc checks
that nothing near them is allocated. No test reaches the network.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import socket
import struct
import tarfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from deepcore.data import (
    LOCAL_RESOURCES,
    RESOURCES,
    ChecksumError,
    DataFormatError,
    Resource,
    RestrictedUnpickler,
    download,
    limits,
    load_cifar10,
    load_dataset,
    load_file,
    load_mnist,
    read_cifar_binary,
    read_cifar_pickle,
    read_idx,
    read_npz_arrays,
)
from deepcore.data.errors import cli_message

MB = 1 << 20


@pytest.fixture(autouse=True)
def offline_and_private_cache(monkeypatch, tmp_path_factory):
    def refuse(*args, **kwargs):
        raise AssertionError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("DEEPCORE_DATA", str(tmp_path_factory.mktemp("cache")))


class peak_memory:
    """``with peak_memory() as m: ...``; then ``m.peak`` is the most bytes traced at once."""

    def __enter__(self):
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        self.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return False


def resource_for(data: bytes, name: str) -> Resource:
    return Resource(name, (f"https://mirror/{name}",), len(data), hashlib.md5(data).hexdigest(),
                    hashlib.sha256(data).hexdigest())


# ----------------------------------------------------------------- the class count
def test_a_huge_label_is_refused_without_allocating(tmp_path):
    path = tmp_path / "tiny.csv"
    path.write_text("a,b\n1,2\n3,1000000000\n4,0\n5,1\n")  # 29 bytes, once grew to 24 GB
    with peak_memory() as m, pytest.raises(DataFormatError) as info:
        load_file(path)
    message = str(info.value)
    assert str(path) in message and "1000000001 classes" in message and "regression target" in message
    assert "num_classes=" in message and "label_column=" in message
    cli = cli_message(info.value)
    assert "--num-classes N" in cli and "--label-column" in cli and "num_classes=" not in cli
    assert m.peak < 5 * MB


def test_a_price_column_is_refused_as_a_regression_target(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "houses.csv"
    rows = [f"{rng.integers(1, 6)},{rng.integers(30, 200)},{rng.integers(50_000, 310_001)}" for _ in range(300)]
    path.write_text("rooms,area,price\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataFormatError, match=r"column 'price' \(index 2\) has labels up to \d+.*regression target"):
        load_file(path)


@pytest.mark.parametrize("labels,ok", [
    ([0, 1, 2, 3] * 5, True),             # every class present
    ([0, 2] * 10, True),                  # one of three empty
    ([0, 1, 5] * 4, True),                # three of six empty: exactly half is still accepted
    ([0, 1, 6] * 4, False),               # four of seven empty: more than half
    ([0, 7] * 10, False),                 # six of eight empty
    ([0, 1] * 3 + [6], False),            # seven classes for seven samples, four empty
    (list(range(10)) + [40], False),      # 41 classes for 11 samples
])
def test_the_rule_more_than_half_empty_or_more_classes_than_samples(tmp_path, labels, ok):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(len(labels), dtype=np.float32)[:, None], y=np.array(labels))
    if ok:
        assert load_file(path, test_fraction=0.25).num_classes == max(labels) + 1
    else:
        with pytest.raises(DataFormatError, match="no sample"):
            load_file(path)


def test_num_classes_overrides_the_rule_and_bounds_the_labels(tmp_path):
    path = tmp_path / "d.npz"
    y = np.array([0, 7] * 10)
    np.savez(path, x=np.zeros((20, 2), np.float32), y=y, x_test=np.zeros((3, 2), np.float32), y_test=[0, 9, 12])
    assert load_file(path, num_classes=13).num_classes == 13
    with pytest.raises(DataFormatError) as info:
        load_file(path, num_classes=10)
    assert "label 12 at y_test[2]" in str(info.value) and "num_classes=10" in str(info.value)
    assert "--num-classes 10" in cli_message(info.value)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        load_file(path, num_classes=1)
    csv = tmp_path / "p.csv"
    csv.write_text("a,price\n" + "".join(f"{i},{i * 1000}\n" for i in range(10)))
    with pytest.raises(DataFormatError, match="label 1000 at row 3 "):
        load_file(csv, num_classes=100)


def test_a_single_class_training_set_is_an_error(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("a,label\n" + "".join(f"{i},0\n" for i in range(20)))
    with pytest.raises(DataFormatError, match="single class"):
        load_file(path)
    np.savez(tmp_path / "one.npz", x=np.zeros((10, 2)), y=np.full(10, 3))
    with pytest.raises(DataFormatError, match="single class"):
        load_file(tmp_path / "one.npz", num_classes=4)


@pytest.mark.parametrize("y", [np.array([0.0, 1.0, 2.0**60]), np.array([0, 1, 2**63 + 5], dtype=np.uint64)],
                         ids=["float-beyond-2**53", "uint64-beyond-int64"])
def test_labels_too_large_for_int64_are_errors_not_wrapped(tmp_path, y):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 1)), y=y)
    with pytest.raises(DataFormatError, match=r"y\[2\]"):
        load_file(tmp_path / "d.npz")


# ----------------------------------------------------------------- the CSV label column
def kaggle_csv(path: Path, n=60, label_at=0, name="label") -> Path:
    rng = np.random.default_rng(1)
    cols = [f"pixel{i}" for i in range(6)]
    cols.insert(label_at, name)
    lines = [",".join(cols)]
    for i in range(n):
        cells = [str(int(v)) for v in rng.integers(0, 256, 6)]
        cells.insert(label_at, str(i % 3))
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("label_at,name", [(0, "label"), (3, "Target"), (6, "y"), (2, "CLASS")])
def test_a_label_named_column_is_the_label_wherever_it_stands(tmp_path, label_at, name):
    s = load_file(kaggle_csv(tmp_path / "k.csv", label_at=label_at, name=name))
    assert s.num_classes == 3 and s.num_features == 6
    assert s.label_column == f"{name!r} (index {label_at})"
    assert set(np.concatenate([s.train.y, s.test.y])) == {0, 1, 2}
    assert load_dataset(tmp_path / "k.csv", val_fraction=0.1).label_column == s.label_column


def test_label_column_by_name_or_index_and_ambiguity(tmp_path):
    path = kaggle_csv(tmp_path / "k.csv")
    assert load_file(path, label_column="label").label_column == "'label' (index 0)"
    assert load_file(path, label_column="0").label_column == "'label' (index 0)"   # a CLI index
    assert load_file(path, label_column=-7).label_column == "'label' (index 0)"
    with pytest.raises(ValueError) as info:
        load_file(path, label_column="7")
    assert "index in [-7, 7), got 7" in str(info.value) and "--label-column" in cli_message(info.value)
    with pytest.raises(DataFormatError) as info:
        load_file(path, label_column="nope")
    assert "no column named 'nope'" in str(info.value) and "--label-column" in cli_message(info.value)
    both = tmp_path / "both.csv"
    both.write_text("label,a,y\n0,1,1\n1,2,0\n0,3,1\n1,4,0\n0,5,1\n")
    with pytest.raises(DataFormatError, match=r"columns 'label' \(index 0\) and 'y' \(index 2\) could each be"):
        load_file(both)
    assert load_file(both, label_column="y").label_column == "'y' (index 2)"


# ----------------------------------------------------------------- .npz: sizes before allocations
def npy_header(shape, descr="<f4", fortran=False) -> bytes:
    text = repr({"descr": descr, "fortran_order": fortran, "shape": tuple(shape)}).encode()
    text += b" " * ((64 - (10 + len(text) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def test_an_npz_declaring_2_to_the_40_elements_is_refused_before_allocating(tmp_path):
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", npy_header((2**40,)))
        z.writestr("y.npy", npy_header((2**40,), "<i8"))
    assert path.stat().st_size < 600
    with peak_memory() as m, pytest.raises(DataFormatError, match=r"'x': header declares shape \(1099511627776,\)"):
        load_file(path)
    assert m.peak < 5 * MB


def test_a_zip_bomb_is_refused_by_its_ratio_before_unpacking(tmp_path, monkeypatch):
    monkeypatch.setattr("deepcore.data.files.SMALL_BYTES", 1 << 16)  # a small bomb stands for a big one
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", npy_header((MB, 2)) + bytes(8 * MB))
        z.writestr("y.npy", npy_header((MB,), "<i8") + bytes(8 * MB))
    assert path.stat().st_size < 100_000
    with peak_memory() as m, pytest.raises(DataFormatError, match=r"unpacks \d+ bytes to 8.0 MiB, more than 200 times"):
        load_file(path)
    assert m.peak < 2 * MB


def test_an_npz_larger_than_memory_is_refused_before_unpacking(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "memory_limit", lambda: 1000)
    np.savez(tmp_path / "d.npz", x=np.zeros((100, 4), np.float32), y=np.arange(100) % 2)
    with pytest.raises(DataFormatError, match="would need .* of memory, more than the 1000 bytes available"):
        load_file(tmp_path / "d.npz")


def test_npz_arrays_of_every_layout_are_read_exactly(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((12, 3, 2))
    y = np.arange(12) % 3
    np.savez_compressed(tmp_path / "c.npz", x=x.astype(">f8"), y=y.astype(">i2"))
    np.savez(tmp_path / "f.npz", x=np.asfortranarray(x[:, :, 0]), y=y, x_test=x[:3, :, 0], y_test=y[:3])
    s = load_file(tmp_path / "c.npz")
    got = np.concatenate([s.train.x, s.test.x])
    assert got.shape == (12, 6) and s.input_shape == (3, 2)
    np.testing.assert_allclose(np.sort(got, axis=0), np.sort(x.reshape(12, -1).astype(np.float32), axis=0))
    f = load_file(tmp_path / "f.npz")
    np.testing.assert_array_equal(f.train.x, x[:, :, 0].astype(np.float32))


def test_read_npz_arrays_reads_what_is_asked(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.arange(6).reshape(2, 3), extra=np.ones(2, np.float32))
    got = read_npz_arrays(tmp_path / "a.npz")
    assert sorted(got) == ["extra", "x"] and got["x"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert sorted(read_npz_arrays(tmp_path / "a.npz", lambda names: ["x"])) == ["x"]


def corrupt_npz_cases(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((4, 2), np.float32), y=np.array([0, 1, 0, 1]))
    raw = good.read_bytes()
    flipped = bytearray(raw)
    flipped[raw.index(b"\x93NUMPY") + 128 + 5] ^= 0xFF  # inside x's (stored) data: the CRC no longer matches
    nested = b"{'descr': " + b"[" * 3000 + b"]" * 3000 + b", 'fortran_order': False, 'shape': (1,), }"
    nested += b" " * ((64 - (10 + len(nested) + 1) % 64) % 64) + b"\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(nested)) + nested)
        z.writestr("y.npy", npy_header((1,), "<i8") + bytes(8))
    obj = io.BytesIO()
    np.savez(obj, x=np.array([[1, None]], dtype=object), y=np.array([0]))
    npy = io.BytesIO()
    np.save(npy, np.zeros(3))
    return {
        "empty": (b"", "empty file"),
        "truncated": (raw[: len(raw) // 2], "not a readable .npz"),
        "garbage": (b"PK\x03\x04" + bytes(200), "not a readable .npz"),
        "bad crc": (bytes(flipped), "not a readable .npz"),
        "pickle": (pickle.dumps({"x": 1}), "looks like a pickle"),
        "object array": (obj.getvalue(), "only pickle can read"),
        "nested header": (buf.getvalue(), "malformed .npy header"),
        "single npy": (npy.getvalue(), "holds a single array"),
    }


@pytest.mark.parametrize("case", ["empty", "truncated", "garbage", "bad crc", "pickle", "object array",
                                  "nested header", "single npy"])
def test_a_corrupt_npz_is_one_line_naming_the_file_and_never_suggests_pickle(tmp_path, case):
    data, message = corrupt_npz_cases(tmp_path)[case]
    path = tmp_path / "bad.npz"
    path.write_bytes(data)
    with pytest.raises(DataFormatError) as info:
        load_file(path)
    text = str(info.value)
    assert str(path) in text and message in text, text
    assert "allow_pickle" not in text and "\n" not in text and len(text) < 400


# ----------------------------------------------------------------- gzip IDX
def test_a_gzip_idx_declaring_more_than_it_can_hold_fails_before_allocating(tmp_path):
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 60000, 28000, 28000)  # 47 TB in a 40-byte file
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + bytes(1000)))
    with peak_memory() as m, pytest.raises(DataFormatError, match="more than .* gzipped bytes can hold"):
        read_idx(path)
    assert m.peak < 2 * MB


def test_a_gzip_idx_larger_than_memory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "memory_limit", lambda: 100)
    arr = np.zeros((2, 10, 10), np.uint8)
    path = tmp_path / "a-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", *arr.shape) + arr.tobytes()))
    with pytest.raises(DataFormatError, match="200 bytes of memory, more than the 100 bytes available"):
        read_idx(path)


def test_an_empty_idx_file_names_the_file(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"")
    with pytest.raises(DataFormatError, match=f"{path}: empty file"):
        read_idx(path)


# ----------------------------------------------------------------- CIFAR pickles and archives
class Reduce:
    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


@pytest.mark.parametrize("payload", [
    Reduce(bytearray, (2**40,)),
    Reduce(bytes, (2**40,)),
    Reduce(np.ndarray, ((2**40,),)),
    {"data": Reduce(np.ndarray, ((2**20, 3072), np.uint8)), "labels": [0]},
], ids=["bytearray", "bytes", "ndarray(shape)", "ndarray-in-dict"])
def test_the_unpickler_refuses_allocations_a_pickle_asks_for(payload):
    data = pickle.dumps(payload, protocol=2)
    with peak_memory() as m, pytest.raises(pickle.UnpicklingError, match="refusing"):
        RestrictedUnpickler(io.BytesIO(data)).load()
    assert m.peak < 2 * MB


def reconstruct_pickle(state) -> bytes:
    from numpy._core.multiarray import _reconstruct

    return pickle.dumps(Reduce(_reconstruct, (np.ndarray, (0,), b"b"), state), protocol=2)


@pytest.mark.parametrize("state,message", [
    ((1, (2**31,), np.dtype("O"), False, []), "refusing dtype 'O8'"),
    ((1, (2**40, 3072), np.dtype("u1"), False, b"\0" * 3072), r"refusing an array of shape \(1099511627776, 3072\)"),
    ((1, (10, 3072), np.dtype("u1"), False, b"\0" * 100), "comes with 100 bytes of data"),
    ((1, (2, 3072), np.dtype("<f8"), False, b"\0" * 8 * 6144), "refusing dtype 'f8'"),
    ((1, (2, 3072), np.dtype("u1"), True, b"\0" * 6144), "C-ordered uint8"),
], ids=["object", "huge", "short-bytes", "float", "fortran"])
def test_the_unpickler_accepts_only_a_cifar_image_array(state, message):
    with peak_memory() as m, pytest.raises(pickle.UnpicklingError, match=message):
        RestrictedUnpickler(io.BytesIO(reconstruct_pickle(state))).load()
    assert m.peak < 2 * MB
    ok = RestrictedUnpickler(io.BytesIO(reconstruct_pickle((1, (2, 3072), np.dtype("u1"), False, b"\1" * 6144))))
    arr = ok.load()
    assert arr.shape == (2, 3072) and arr.dtype == np.uint8 and int(arr.sum()) == 6144
    assert np.dtype("u1").itemsize == 1 and np.dtype("u1").byteorder == "|"  # NumPy's own uint8 untouched


def test_the_unpickler_does_not_rebuild_one_buffer_many_times(monkeypatch):
    monkeypatch.setattr("deepcore.data.cifar._MAX_IMAGES", 10)  # a 30 KB batch stands for a 30 MB one
    from numpy._core.multiarray import _reconstruct

    raw = bytes(10 * 3072)  # pickled once, then named again from the memo by every array below

    def arrays(k):
        return pickle.dumps([Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (10, 3072), np.dtype("u1"), False, raw))
                             for _ in range(k)], protocol=4)

    assert len(RestrictedUnpickler(io.BytesIO(arrays(2))).load()) == 2
    with pytest.raises(pickle.UnpicklingError, match="more data than a CIFAR-10 batch holds"):
        RestrictedUnpickler(io.BytesIO(arrays(3))).load()


def test_cifar_files_larger_than_a_batch_are_not_read(tmp_path, monkeypatch):
    big = tmp_path / "data_batch_1"
    with open(big, "wb") as f:
        f.truncate(41 * MB)  # sparse: costs no disk
    with peak_memory() as m, pytest.raises(DataFormatError, match="more than a CIFAR-10 pickled batch holds"):
        read_cifar_pickle(big)
    assert m.peak < MB
    binary = tmp_path / "data_batch_1.bin"
    with open(binary, "wb") as f:
        f.truncate(10_001 * 3073)
    with pytest.raises(DataFormatError, match="more than a CIFAR-10 binary batch holds"):
        read_cifar_binary(binary)
    # A tar entry is measured by its header before it is read.
    monkeypatch.setattr("deepcore.data.cifar._MAX_BINARY_BYTES", 3073)
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for n in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            data = bytes(2 * 3073)
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{n}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataFormatError, match="entry of 6146 bytes, more than a CIFAR-10 batch holds"):
        load_cifar10(archive, download=False, verify=False)


# ----------------------------------------------------------------- checksums of files found on disk
def idx_gz(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return gzip.compress(head + arr.tobytes(), mtime=0)


def fake_mnist(folder: Path, seed=0) -> dict[str, bytes]:
    """Ten-image 'MNIST' files under the real names."""
    rng = np.random.default_rng(seed)
    blobs = {"train-images-idx3-ubyte.gz": idx_gz(rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)),
             "train-labels-idx1-ubyte.gz": idx_gz(np.arange(10, dtype=np.uint8)),
             "t10k-images-idx3-ubyte.gz": idx_gz(rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)),
             "t10k-labels-idx1-ubyte.gz": idx_gz(np.arange(10, dtype=np.uint8))}
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
    return blobs


def test_local_mnist_files_are_checked_against_the_known_checksums(tmp_path):
    fake_mnist(tmp_path)  # named like MNIST, but ten random images: the real table refuses them
    with pytest.raises(ChecksumError) as info:
        load_mnist(tmp_path, download=False)
    text = str(info.value)
    assert f"{tmp_path / 'train-images-idx3-ubyte.gz'}: not the original train-images-idx3-ubyte.gz of MNIST" in text
    assert "expected 9912422" in text and "verify=False" in text
    assert "--no-verify" in cli_message(info.value) and "--dataset PATH" in cli_message(info.value)
    assert len(load_mnist(tmp_path, download=False, verify=False).train) == 10


def test_an_unpacked_copy_cannot_be_verified(tmp_path, monkeypatch):
    blobs = fake_mnist(tmp_path / "gz")
    monkeypatch.setitem(RESOURCES, "mnist", tuple(resource_for(b, n) for n, b in blobs.items()))
    for name, blob in blobs.items():
        (tmp_path / name.removesuffix(".gz")).write_bytes(gzip.decompress(blob))
    with pytest.raises(ChecksumError, match="cannot verify .*train-images-idx3-ubyte: it is unpacked") as info:
        load_mnist(tmp_path, download=False)
    assert "--no-verify" in cli_message(info.value)
    assert len(load_mnist(tmp_path, download=False, verify=False).test) == 10
    # A gzipped copy in another searched folder is preferred to the unpacked one, and verifies.
    (tmp_path / "gz").rename(tmp_path / "mnist")
    assert len(load_mnist(tmp_path, download=False).train) == 10


def test_a_verified_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    blobs = fake_mnist(tmp_path)
    monkeypatch.setitem(RESOURCES, "mnist", tuple(resource_for(b, n) for n, b in blobs.items()))
    hashed = []
    real = download.file_digests
    monkeypatch.setattr(download, "file_digests", lambda p: hashed.append(Path(p).name) or real(p))
    load_mnist(tmp_path, download=False)
    assert sorted(hashed) == sorted(blobs)
    hashed.clear()
    load_mnist(tmp_path, download=False)
    assert hashed == []  # remembered in verified.json
    # Same size, same mtime, other bytes: the change time still tells.
    target = tmp_path / "t10k-labels-idx1-ubyte.gz"
    st = target.stat()
    time.sleep(0.05)  # past the file system's timestamp tick, so the rewrite gets a new change time
    data = bytearray(target.read_bytes())
    data[-9] ^= 1  # inside the compressed stream
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte.gz: not the original"):
        load_mnist(tmp_path, download=False)
    assert hashed == ["t10k-labels-idx1-ubyte.gz"]


@pytest.mark.parametrize("marker", [b"[" * 100_000 + b"]" * 100_000, b"not json", b'["a list"]',
                                    b"{" + b" " * (2 * MB) + b"}"], ids=["nested", "garbage", "list", "huge"])
def test_a_damaged_verified_marker_only_costs_a_hash(tmp_path, monkeypatch, marker):
    blobs = fake_mnist(tmp_path)
    monkeypatch.setitem(RESOURCES, "mnist", tuple(resource_for(b, n) for n, b in blobs.items()))
    cache = Path(os.environ["DEEPCORE_DATA"])
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "verified.json").write_bytes(marker)
    assert len(load_mnist(tmp_path, download=False).train) == 10
    load_mnist(tmp_path, download=False)


def test_a_download_is_remembered_as_verified(tmp_path, monkeypatch):
    blobs = fake_mnist(tmp_path / "src")
    monkeypatch.setitem(RESOURCES, "mnist", tuple(resource_for(b, n) for n, b in blobs.items()))
    load_mnist(tmp_path, fetch=lambda url, dest: Path(dest).write_bytes(blobs[url.rsplit("/", 1)[1]]))
    monkeypatch.setattr(download, "file_digests", lambda p: pytest.fail(f"{p} hashed again"))
    assert len(load_mnist(tmp_path, download=False).train) == 10


def test_local_cifar_copies_are_verified(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    records = {n: np.concatenate([rng.integers(0, 10, (2, 1)), rng.integers(0, 256, (2, 3072))], axis=1)
               .astype(np.uint8).tobytes() for n in names}
    binary = tmp_path / "cifar-10-batches-bin"
    binary.mkdir()
    for n in names:
        (binary / f"{n}.bin").write_bytes(records[n])
    with pytest.raises(ChecksumError, match="cannot verify .*cifar-10-batches-bin: no checksums are published") as e:
        load_cifar10(tmp_path, download=False)
    assert "--no-verify" in cli_message(e.value)
    assert len(load_cifar10(tmp_path, download=False, verify=False).train) == 10
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for n in names:
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{n}.bin")
            info.size = len(records[n])
            tar.addfile(info, io.BytesIO(records[n]))
    with pytest.raises(ChecksumError, match="cifar-10-binary.tar.gz: not the original cifar-10-binary.tar.gz"):
        load_cifar10(tmp_path, download=False)  # the archive is preferred to the folder, and checked
    monkeypatch.setitem(RESOURCES, "cifar10", (resource_for(archive.read_bytes(), archive.name),))
    assert len(load_cifar10(tmp_path, download=False).test) == 2
    # The python version's batch files have their published MD5s.
    py = tmp_path / "elsewhere" / "cifar-10-batches-py"
    py.mkdir(parents=True)
    for n in names:
        (py / n).write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [1]}, protocol=2))
    with pytest.raises(ChecksumError, match="data_batch_1: not the original data_batch_1 of CIFAR-10: md5"):
        load_cifar10(tmp_path / "elsewhere", download=False)
    monkeypatch.setitem(LOCAL_RESOURCES, "cifar10", tuple(resource_for((py / n).read_bytes(), n) for n in names))
    assert len(load_cifar10(tmp_path / "elsewhere", download=False).train) == 5
