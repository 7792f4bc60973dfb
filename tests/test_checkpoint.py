"""Checkpoints: round trips through both formats on every backend, moves across backends, dtypes,
compatibility with the safetensors library, corrupt files, restore-or-nothing and atomic writes."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

import deepcore as dc
from deepcore import checkpoint as ckpt_mod
from deepcore import nn
from deepcore.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from deepcore.optim import SGD
from tests.helpers import arr, dtype_name, to_np

FORMATS = [".safetensors", ".npz"]


class RecordingOptimizer:
    """Returns a fixed state_dict and records what load_state_dict receives."""

    def __init__(self, state: dict | None = None, fail: bool = False) -> None:
        self.state, self.fail, self.loaded = state, fail, None

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        if self.fail:
            raise ValueError("RecordingOptimizer refuses this state")
        self.loaded = state


def _sgd(params, lr: float = 0.1):
    return SGD(params, lr=lr, momentum=0.9)


def _model(seed: int = 0, dtype: str = "float32") -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5, seed=seed, dtype=dtype), nn.BatchNorm1d(5, dtype=dtype), nn.ReLU(),
                         nn.Dropout(0.3, seed=seed + 7), nn.Linear(5, 3, seed=seed + 1, dtype=dtype))


def _x(backend, seed: int = 0, dtype: str = "float32"):
    return arr(backend, np.random.default_rng(seed).standard_normal((8, 4)), dtype)


def _train(model, opt, backend, steps: int = 2) -> None:
    for i in range(steps):
        y, backward = model.forward(_x(backend, i), train=True)
        model.zero_grad()
        backward(y * 0 + 1)
        opt.step()


def _host(tree):
    """The nested structure with every array as NumPy, for comparison."""
    if isinstance(tree, dict):
        return {k: _host(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_host(v) for v in tree)
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    return to_np(tree)


def _assert_tree_equal(a, b) -> None:
    a, b = _host(a), _host(b)
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_tree_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_tree_equal(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def _states_equal(m1, m2) -> None:
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert list(s1) == list(s2)
    for k in s1:
        assert dtype_name(s1[k]) == dtype_name(s2[k]), k
        assert tuple(s1[k].shape) == tuple(s2[k].shape), k
        np.testing.assert_array_equal(to_np(s1[k]), to_np(s2[k]), err_msg=k)


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_model_and_optimizer(backend, tmp_path, fmt):
    model = _model(0)
    opt = _sgd(model.parameters())
    _train(model, opt, backend)
    path = save_checkpoint(tmp_path / f"ck{fmt}", model, opt, epoch=3, step=17, extra={"best": 0.25, "tags": ["a"]})
    assert path == tmp_path / f"ck{fmt}" and os.listdir(tmp_path) == [path.name]

    fresh = _model(5)
    fresh_opt = _sgd(fresh.parameters())
    ck = load_checkpoint(path, fresh, fresh_opt)
    assert isinstance(ck, Checkpoint)
    assert (ck.epoch, ck.step, ck.extra) == (3, 17, {"best": 0.25, "tags": ["a"]})
    assert ck.format_version == FORMAT_VERSION and ck.deepcore_version == dc.__version__
    assert ck.model_extra_states == {"3": {"seed": 7, "calls": 2}}
    assert all(isinstance(a, np.ndarray) for a in ck.model_state.values())
    assert ck.model_state["1.num_batches_tracked"].dtype == np.int64
    assert ck.model_state["0.weight"].dtype == np.float32

    _states_equal(model, fresh)
    assert all(dc.get_backend(p.value) is backend for p in fresh.parameters())
    assert fresh.extra_states() == model.extra_states()
    _assert_tree_equal(fresh_opt.state_dict(), opt.state_dict())
    # Training continues identically: same dropout masks, BatchNorm statistics and momentum.
    _train(model, opt, backend, steps=1)
    _train(fresh, fresh_opt, backend, steps=1)
    _states_equal(model, fresh)


@pytest.mark.parametrize("fmt", FORMATS)
def test_optimizer_state_contract_round_trips_exactly(tmp_path, fmt):
    np_ = dc.get_backend("numpy")
    state = {
        "type": "Adam",
        "hyperparams": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False, "name": None,
                        "decay": np.float64(0.5)},
        "step_count": 7,
        "state": {
            "0": {"exp_avg": arr(np_, np.arange(6.0).reshape(2, 3), "float32"),
                  "exp_avg_sq": arr(np_, np.ones(3), "float64"), "step": np.asarray(7.0, dtype=np.float32)},
            "1": {"step": 7, "flags": arr(np_, [True, False])},
            "2": {},
        },
    }
    model = _model()
    save_checkpoint(tmp_path / f"o{fmt}", model, RecordingOptimizer(state))
    rec = RecordingOptimizer()
    ck = load_checkpoint(tmp_path / f"o{fmt}", optimizer=rec)
    expected = dict(state, hyperparams=dict(state["hyperparams"], decay=0.5))  # NumPy scalars become numbers
    _assert_tree_equal(rec.loaded, expected)
    _assert_tree_equal(ck.optimizer_state, expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_move_across_backends(other_backend, tmp_path, fmt):
    with dc.use_backend(other_backend):
        src = _model(1)
        opt = _sgd(src.parameters())
        _train(src, opt, other_backend, steps=1)
    save_checkpoint(tmp_path / f"m{fmt}", src, opt)
    dst = _model(2)  # numpy
    dst_opt = _sgd(dst.parameters(), lr=0.5)
    load_checkpoint(tmp_path / f"m{fmt}", dst, dst_opt)
    assert all(isinstance(v, np.ndarray) for v in dst.state_dict().values())
    for k, v in src.state_dict().items():
        np.testing.assert_array_equal(to_np(dst.state_dict()[k]), to_np(v))
        assert dtype_name(dst.state_dict()[k]) == dtype_name(v)
    assert isinstance(dst_opt.state[0]["momentum_buffer"], np.ndarray) and dst_opt.lr == 0.1


@pytest.mark.parametrize("fmt", FORMATS)
def test_dtypes_preserved_in_the_file(backend, tmp_path, fmt):
    model = _model(0, dtype="float64")
    save_checkpoint(tmp_path / f"d{fmt}", model)
    ck = load_checkpoint(tmp_path / f"d{fmt}")
    assert {v.dtype.name for k, v in ck.model_state.items() if "num_batches" not in k} == {"float64"}
    assert ck.model_state["1.num_batches_tracked"].dtype == np.int64
    assert ck.model_state["1.num_batches_tracked"].shape == ()
    # Loading into a float32 model casts to the model's dtype (load_state_dict's rule).
    f32 = _model(3)
    load_checkpoint(tmp_path / f"d{fmt}", f32)
    assert dtype_name(f32.state_dict()["0.weight"]) == "float32"
    assert dtype_name(f32.state_dict()["1.num_batches_tracked"]) == "int64"


# ------------------------------------------------------------ safetensors library
def _deepcore_tensors_and_meta(tmp_path, model):
    """The tensors and metadata a deepcore .safetensors file holds, read back with our reader."""
    path = save_checkpoint(tmp_path / "ours.safetensors", model)
    tensors, meta = ckpt_mod._read_safetensors(path)
    return path, tensors, meta


def test_our_files_load_in_the_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    model = _model()
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    loaded = st.load_file(str(path))
    assert set(loaded) == {f"model.{k}" for k in model.state_dict()}
    for k, v in model.state_dict().items():
        assert loaded[f"model.{k}"].dtype == to_np(v).dtype
        np.testing.assert_array_equal(loaded[f"model.{k}"], to_np(v))
    with safe_open(str(path), framework="np") as f:
        assert json.loads(f.metadata()["deepcore"])["format_version"] == FORMAT_VERSION


def test_files_from_the_safetensors_library_load(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    model = _model()
    _, tensors, meta = _deepcore_tensors_and_meta(tmp_path, model)
    st.save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"deepcore": meta})
    fresh = _model(9)
    load_checkpoint(tmp_path / "lib.safetensors", fresh)
    _states_equal(model, fresh)

    # A plain weights file, no deepcore metadata: every tensor is model state.
    st.save_file({k: to_np(v) for k, v in model.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    fresh = _model(10)
    ck = load_checkpoint(tmp_path / "plain.safetensors", fresh)
    assert ck.format_version is None and ck.optimizer_state is None
    _states_equal(model, fresh)


def test_plain_npz_weights_load(tmp_path):
    model = _model()
    np.savez(tmp_path / "w.npz", **{f"model.{k}": to_np(v) for k, v in model.state_dict().items()})
    fresh = _model(4)
    load_checkpoint(tmp_path / "w.npz", fresh)
    _states_equal(model, fresh)


# ------------------------------------------------------------------ corrupt files
def _write_st(path, header: dict, data: bytes = b"", length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def _meta(**changes) -> dict:
    meta = {"format": "deepcore.checkpoint", "format_version": 1, "epoch": None, "step": None, "extra": {},
            "model_extra_states": {}, "optimizer": None}
    meta.update(changes)
    return {"__metadata__": {"deepcore": json.dumps(meta)}}


T = {"model.w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
CORRUPT_ST = {
    "empty": (lambda p: p.write_bytes(b""), r"too short for a safetensors file"),
    "garbage": (lambda p: p.write_bytes(b"hello, this is not a checkpoint"),
                r"header length \d+ is beyond the file size"),
    "header_beyond_file": (lambda p: _write_st(p, T, b"\0" * 8, length=10_000), r"header length 10000 is beyond"),
    "header_not_json": (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{{{{"), r"header is not valid JSON"),
    "header_not_object": (lambda p: _write_st(p, [1, 2]), r"header is not a JSON object"),
    "offsets_outside": (lambda p: _write_st(p, {**T, **_meta()}, b"\0" * 4), r"data_offsets \[0, 8\] lie outside"),
    "unknown_dtype": (lambda p: _write_st(p, {"model.w": {**T["model.w"], "dtype": "C64"}}, b"\0" * 8),
                      r"unknown dtype 'C64'"),
    "shape_size_mismatch": (lambda p: _write_st(p, {"model.w": {**T["model.w"], "shape": [3]}}, b"\0" * 8),
                            r"shape \[3\] of F32 needs 12 bytes but data_offsets span 8"),
    "bad_shape": (lambda p: _write_st(p, {"model.w": {**T["model.w"], "shape": [-2]}}, b"\0" * 8),
                  r"shape must be a list of non-negative ints"),
    "duplicate_key": (lambda p: p.write_bytes(struct.pack("<Q", 13) + b'{"a":1,"a":2}'), r"duplicate key 'a'"),
    "future_version": (lambda p: _write_st(p, {**T, **_meta(format_version=99)}, b"\0" * 8),
                       r"unsupported format_version 99; this deepcore .* reads format_version 1"),
    "not_deepcore_meta": (lambda p: _write_st(p, {**T, "__metadata__": {"deepcore": '{"format": "x"}'}}, b"\0" * 8),
                          r"not a deepcore checkpoint"),
    "missing_optimizer_tensor": (
        lambda p: _write_st(p, {**T, **_meta(optimizer={"state": {"0": {"b": {"__array__": "optimizer.nope"}}}})},
                            b"\0" * 8),
        r"refers to tensor 'optimizer.nope', which the file lacks"),
    "stray_tensor": (lambda p: _write_st(p, {"junk": T["model.w"], **_meta()}, b"\0" * 8),
                     r"tensors \['junk'\] belong to neither"),
}


@pytest.mark.parametrize("case", list(CORRUPT_ST))
def test_corrupt_safetensors_rejected(tmp_path, case):
    make, match = CORRUPT_ST[case]
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_truncated_real_checkpoint_rejected(tmp_path):
    path = save_checkpoint(tmp_path / "t.safetensors", _model())
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(CheckpointError, match=r"lie outside the data section"):
        load_checkpoint(path)
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match=r"beyond the file size"):
        load_checkpoint(path)


def test_corrupt_npz_rejected(tmp_path):
    path = save_checkpoint(tmp_path / "c.npz", _model())
    data = path.read_bytes()
    for bad in (b"", b"not a zip file at all", data[: len(data) // 2]):
        path.write_bytes(bad)
        with pytest.raises(CheckpointError, match=r"c\.npz.*not a checkpoint"):
            load_checkpoint(path)
    meta = json.dumps({"format": "deepcore.checkpoint", "format_version": 2})
    np.savez(path, **{"__metadata__": np.frombuffer(meta.encode(), np.uint8)})
    with pytest.raises(CheckpointError, match=r"unsupported format_version 2"):
        load_checkpoint(path)


def test_npz_pickles_are_never_loaded(tmp_path):
    path = tmp_path / "p.npz"
    np.savez(path, **{"model.w": np.array([{"evil": 1}], dtype=object)})  # written with pickle
    with pytest.raises(CheckpointError, match=r"p\.npz.*pickle"):
        load_checkpoint(path)


# ---------------------------------------------------- restore-or-nothing on load
@pytest.mark.parametrize("fmt", FORMATS)
def test_mismatched_model_raises_and_is_unchanged(tmp_path, fmt):
    save_checkpoint(tmp_path / f"a{fmt}", _model())
    other = nn.Sequential(nn.Linear(4, 6, seed=0), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3, seed=1),
                          nn.Linear(6, 3, seed=2))
    before = {k: to_np(v) for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(5, 4\) in the state but \(6, 4\)"):
        load_checkpoint(tmp_path / f"a{fmt}", other)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(to_np(v), before[k])


def test_failed_optimizer_load_restores_the_model(backend, tmp_path):
    src = _model(0)
    src.forward(_x(backend), train=True)
    save_checkpoint(tmp_path / "f.safetensors", src, RecordingOptimizer({"type": "X", "state": {}}))
    model = _model(1)
    before = {k: to_np(v) for k, v in model.state_dict().items()}
    extra_before = model.extra_states()
    with pytest.raises(ValueError, match="refuses"):
        load_checkpoint(tmp_path / "f.safetensors", model, RecordingOptimizer(fail=True))
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(to_np(v), before[k])
        assert dc.get_backend(v) is backend
    assert model.extra_states() == extra_before != src.extra_states()


def test_optimizer_requested_but_not_saved(tmp_path):
    save_checkpoint(tmp_path / "n.npz", _model())
    model = _model(1)
    before = {k: to_np(v) for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"n\.npz' holds no optimizer state"):
        load_checkpoint(tmp_path / "n.npz", model, RecordingOptimizer())
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(to_np(v), before[k])


# ------------------------------------------------------------------ atomic writes
def _fail_after_some_bytes(f, *args, **kwargs):
    f.write(b"partial bytes")
    raise RuntimeError("disk full (simulated)")


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_save_leaves_old_checkpoint_and_no_temp_files(tmp_path, monkeypatch, fmt):
    path = save_checkpoint(tmp_path / f"ck{fmt}", _model(0), epoch=1)
    old = path.read_bytes()
    if fmt == ".safetensors":
        monkeypatch.setattr(ckpt_mod, "_write_array", _fail_after_some_bytes)
    else:
        monkeypatch.setattr(np, "savez", _fail_after_some_bytes)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, _model(1), epoch=2)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == [path.name]
    assert load_checkpoint(path).epoch == 1


def test_bad_input_fails_before_any_file_is_created(tmp_path):
    model = _model()
    with pytest.raises(TypeError, match=r"extra must be JSON-serialisable"):
        save_checkpoint(tmp_path / "x.npz", model, extra={"f": object()})
    with pytest.raises(TypeError, match=r"extra must be a dict"):
        save_checkpoint(tmp_path / "x.npz", model, extra=[1])
    with pytest.raises(TypeError, match=r"epoch must be an int or None, got True"):
        save_checkpoint(tmp_path / "x.npz", model, epoch=True)
    with pytest.raises(ValueError, match=r"must end in \.safetensors or \.npz .* got suffix '\.pt'"):
        save_checkpoint(tmp_path / "x.pt", model)
    with pytest.raises(TypeError, match=r"keys must be strings .* got 0 at state"):
        save_checkpoint(tmp_path / "x.npz", model, RecordingOptimizer({"state": {0: {}}}))
    with pytest.raises(TypeError, match=r"optimizer state at state.0.f is object"):
        save_checkpoint(tmp_path / "x.npz", model, RecordingOptimizer({"state": {"0": {"f": object()}}}))
    with pytest.raises(TypeError, match=r"model must be a deepcore Module"):
        save_checkpoint(tmp_path / "x.npz", {"w": np.ones(2)})
    with pytest.raises(FileNotFoundError, match=r"directory .*nowhere.* does not exist"):
        save_checkpoint(tmp_path / "nowhere" / "x.npz", model)
    assert os.listdir(tmp_path) == []


def test_permissions_follow_umask_or_the_replaced_file(tmp_path):
    path = save_checkpoint(tmp_path / "p.safetensors", _model())
    if os.path.exists("/proc/self/status"):  # where the umask can be read without changing it
        umask = os.umask(0)
        os.umask(umask)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not tempfile's private 0o600
    os.chmod(path, 0o640)
    save_checkpoint(path, _model(1))
    assert path.stat().st_mode & 0o777 == 0o640


# --------------------------------------- the same verdicts as the safetensors library
def _st_file(header, data: bytes = b"", length: int | None = None, raw: bytes | None = None) -> bytes:
    """A safetensors file: the 8-byte length, the header (``raw`` bytes or ``header`` as JSON), the data."""
    text = json.dumps(header).encode() if raw is None else raw
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _e(dtype: str, shape, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _data(n: int) -> bytes:
    return bytes(range(n))  # distinct bytes, so a tensor read from the wrong place shows


# Each file: (bytes, a pattern deepcore's message must match). Verdicts checked against safetensors 0.8.
REFUSED_ST = {
    "overlapping_offsets": (_st_file({"a": _e("F32", [2], 0, 8), "b": _e("F32", [2], 4, 12)}, _data(12)),
                            r"'b': data_offsets \[4, 12\] overlaps the tensor before it \(tensor 'a' ends at byte 8"),
    "gap_between_tensors": (_st_file({"a": _e("F32", [2], 0, 8), "b": _e("F32", [1], 12, 16)}, _data(16)),
                            r"'b': data_offsets \[12, 16\] leaves a gap \(tensor 'a' ends at byte 8\)"),
    "gap_before_the_first": (_st_file({"a": _e("F32", [2], 4, 12)}, _data(12)),
                             r"\[4, 12\] leaves a gap \(the data starts at byte 0\)"),
    "trailing_bytes": (_st_file({"a": _e("F32", [2], 0, 8)}, _data(12)),
                       r"cover 8 of the 12 bytes of the data section \(4 bytes belong to no tensor\)"),
    "data_but_no_tensors": (_st_file({}, _data(8)), r"cover 0 of the 8 bytes"),
    "two_tensors_one_place": (_st_file({"a": _e("F32", [2], 0, 8), "b": _e("F32", [2], 0, 8)}, _data(8)),
                              r"overlaps the tensor before it"),
    "offsets_reversed": (_st_file({"a": _e("F32", [2], 8, 0)}, _data(8)), r"data_offsets \[8, 0\] lie outside"),
    "offsets_beyond_the_data": (_st_file({"a": _e("F32", [2], 0, 8)}, _data(4)), r"\[0, 8\] lie outside"),
    "empty_tensor_beyond_the_data": (_st_file({"a": _e("F32", [2], 0, 8), "z": _e("F32", [0], 12, 12)}, _data(8)),
                                     r"'z': data_offsets \[12, 12\] lie outside"),
    "offset_too_big_for_u64": (_st_file({"a": _e("F32", [2], 0, 2**70)}, _data(8)), r"lie outside"),
    "unknown_dtype": (_st_file({"a": _e("XYZ", [2], 0, 8)}, _data(8)), r"unknown dtype 'XYZ'"),
    "lower_case_dtype": (_st_file({"a": _e("f32", [2], 0, 8)}, _data(8)), r"unknown dtype 'f32'"),
    "shape_larger_than_bytes": (_st_file({"a": _e("F32", [3], 0, 8)}, _data(8)),
                                r"shape \[3\] of F32 needs 12 bytes but data_offsets span 8"),
    "shape_smaller_than_bytes": (_st_file({"a": _e("F64", [2], 0, 8)}, _data(8)), r"needs 16 bytes but .* span 8"),
    "shape_overflows": (_st_file({"a": _e("F32", [2**40, 2**40], 0, 8)}, _data(8)), r"needs \d+ bytes"),
    "negative_dim": (_st_file({"a": _e("F32", [-2], 0, 8)}, _data(8)), r"shape must be a list of non-negative"),
    "float_dim": (_st_file({"a": _e("F32", [2.0], 0, 8)}, _data(8)), r"shape must be a list"),
    "bool_dim": (_st_file({"a": _e("F32", [True], 0, 4)}, _data(4)), r"shape must be a list"),
    "null_shape": (_st_file({"a": _e("F32", None, 0, 4)}, _data(4)), r"shape must be a list"),
    "bool_offset": (_st_file({"a": _e("F32", [1], False, 4)}, _data(4)), r"data_offsets must be \[begin, end\]"),
    "three_offsets": (_st_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, _data(8)),
                      r"data_offsets must be \[begin, end\]"),
    "no_offsets": (_st_file({"a": {"dtype": "F32", "shape": [2]}}, _data(8)), r"data_offsets must be"),
    "entry_not_an_object": (_st_file({"a": 5}), r"header entry must be an object"),
    "metadata_a_list": (_st_file({"__metadata__": [], "a": _e("F32", [2], 0, 8)}, _data(8)),
                        r"__metadata__ must map strings to strings"),
    "metadata_a_string": (_st_file({"__metadata__": "x"}), r"__metadata__ must map strings"),
    "metadata_value_not_a_string": (_st_file({"__metadata__": {"a": 1}}), r"__metadata__ must map strings"),
    "header_length_beyond_the_file": (_st_file({"a": _e("F32", [2], 0, 8)}, _data(8), length=10_000),
                                      r"header length 10000 is beyond the file size"),
    "header_length_over_the_limit": (_st_file({}, length=100_000_001), r"header length 100000001 is beyond"),
    "header_length_zero": (_st_file({}, length=0), r"header is not valid JSON"),
    "header_not_utf8": (_st_file(None, raw=b"\xff\xfe{}"), r"header is not valid JSON"),
    "header_trailing_nul": (_st_file(None, raw=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}\0\0',
                                     data=_data(8)), r"header is not valid JSON"),
    "header_a_list": (_st_file([1, 2]), r"header is not a JSON object"),
    "shorter_than_the_length": (b"\0" * 7, r"too short for a safetensors file"),
}

# Files both readers accept, with the same tensors.
ACCEPTED_ST = {
    "names_not_in_offset_order": _st_file({"b": _e("F32", [1], 8, 12), "a": _e("F32", [2], 0, 8)}, _data(12)),
    "empty_tensors": _st_file({"a": _e("F32", [0], 0, 0), "b": _e("I64", [1], 0, 8), "c": _e("U8", [0, 3], 8, 8)},
                              _data(8)),
    "scalar_and_bool": _st_file({"s": _e("F64", [], 0, 8), "m": _e("BOOL", [3], 8, 11)}, _data(8) + b"\0\1\1"),
    "unaligned_offsets": _st_file({"u": _e("U8", [1], 0, 1), "f": _e("F32", [1], 1, 5), "h": _e("F16", [2, 1], 5, 9)},
                                  _data(9)),
    "unpadded_header_null_metadata": _st_file({"__metadata__": None, "a": _e("I16", [2], 0, 4)}, _data(4)),
    "unknown_entry_field": _st_file({"a": {**_e("U32", [1], 0, 4), "note": 1}}, _data(4)),
    "metadata_only": _st_file({"__metadata__": {"k": "v"}}),
    "nothing": _st_file({}),
    "leading_space": _st_file(None, raw=b' {"a":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}}  ', data=_data(2)),
}


@pytest.mark.parametrize("case", list(REFUSED_ST))
def test_refused_by_deepcore_and_by_the_safetensors_library(tmp_path, case):
    st = pytest.importorskip("safetensors.numpy")
    content, match = REFUSED_ST[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    # (BF16 is left out: deepcore has no NumPy dtype for it, the library has one once ml_dtypes is imported.)
    with pytest.raises(Exception) as library:  # noqa: B017 - the library's own SafetensorError, checked below
        st.load_file(str(path))
    assert type(library.value).__name__ == "SafetensorError", library.value
    with pytest.raises(CheckpointError, match=match) as ours:
        load_checkpoint(path)
    assert str(path) in str(ours.value)


@pytest.mark.parametrize("case", list(ACCEPTED_ST))
def test_accepted_alike_by_deepcore_and_the_safetensors_library(tmp_path, case):
    st = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "ok.safetensors"
    path.write_bytes(ACCEPTED_ST[case])
    theirs = st.load_file(str(path))
    ours = load_checkpoint(path).model_state
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and ours[name].shape == value.shape, name
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_duplicate_names_are_refused_where_the_library_keeps_the_last(tmp_path):
    """The one place deepcore is stricter: a name given twice (the library silently takes the second)."""
    st = pytest.importorskip("safetensors.numpy")
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[%d,%d]}'
    header = ('{"a":' + entry % (0, 4) + ',"a":' + entry % (0, 4) + "}").encode()
    path = tmp_path / "dup.safetensors"
    path.write_bytes(_st_file(None, raw=header, data=_data(4)))
    assert list(st.load_file(str(path))) == ["a"]
    with pytest.raises(CheckpointError, match=r"duplicate key 'a'"):
        load_checkpoint(path)


# ------------------------------------- temporary files of interrupted writes never pile up
_BLOCKED_WRITER = """
import sys
from pathlib import Path
from deepcore._io import atomic_write

def write(f):
    f.write(sys.argv[2].encode() * 100_000)
    f.flush()
    print("writing", flush=True)
    sys.stdin.readline()  # blocked mid-write until told to go on (or killed)

atomic_write(Path(sys.argv[1]), write)
print("done", flush=True)
"""


def _blocked_writer(path, content: str):
    """A process stopped in the middle of ``atomic_write(path)``, its temporary file on disk."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    proc = subprocess.Popen([sys.executable, "-c", _BLOCKED_WRITER, str(path), content], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline() == "writing\n"
    return proc


def _temps(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def test_temps_of_writers_killed_mid_write_are_removed_by_the_next_write(tmp_path):
    import signal

    from deepcore._io import temp_pattern

    path = tmp_path / "ck.safetensors"
    for _ in range(3):  # kill -9 during checkpoint writes used to leave one more file each time
        proc = _blocked_writer(path, "x")
        proc.kill()
        assert proc.wait() == -signal.SIGKILL
        (stale,) = _temps(tmp_path)  # each writer removed the one killed before it
        assert temp_pattern(path).fullmatch(stale)
    live = _blocked_writer(path, "y")  # a concurrent writer, alive and mid-write: its file stays
    try:
        (live_temp,) = _temps(tmp_path)
        assert live_temp != stale
        save_checkpoint(path, _model(), epoch=3)
        assert _temps(tmp_path) == [live_temp]
        assert load_checkpoint(path).epoch == 3
        live.stdin.write("\n")
        live.stdin.flush()
        assert live.stdout.readline() == "done\n" and live.wait() == 0
    finally:
        live.kill()
        live.wait()
    assert path.read_bytes() == b"y" * 100_000 and _temps(tmp_path) == []


def test_only_stale_temps_of_the_same_target_are_removed(tmp_path):
    import subprocess
    import sys
    import time

    path = tmp_path / "ck.safetensors"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - 3600

    def temp(name, mtime=old):
        (tmp_path / name).write_bytes(b"partial")
        os.utime(tmp_path / name, (mtime, mtime))
        return name

    gone = [temp(f".ck.safetensors.{dead.pid}.ab12_x9q.tmp"),
            # this process's pid, but written before it started: the pid was reused, its writer is gone
            temp(f".ck.safetensors.{os.getpid()}.zz9.tmp", mtime=time.time() - 10**6)]
    kept = [temp(f".ck.safetensors.{os.getpid()}.live1.tmp", mtime=time.time() - 1),  # this process may write it
            temp(f".ck.safetensors.{dead.pid}.new.tmp", mtime=time.time() + 3600),  # newer than the write
            temp(f".history.json.{dead.pid}.ab12.tmp"),  # another target's
            temp(f".ck.safetensors.x{dead.pid}.ab12.tmp"),  # not the pattern
            temp(".ck.safetensors.k2j4h1.tmp"),  # no pid: not ours to judge
            temp(f"ck.safetensors.{dead.pid}.ab12.tmp")]  # not hidden: a user's file
    (tmp_path / f".ck.safetensors.{dead.pid}.dir.tmp").mkdir()  # not a file
    os.utime(tmp_path / f".ck.safetensors.{dead.pid}.dir.tmp", (old, old))
    save_checkpoint(path, _model())
    names = set(os.listdir(tmp_path))
    assert not names & set(gone)
    assert names == {*kept, path.name, f".ck.safetensors.{dead.pid}.dir.tmp"}


def test_a_temp_locked_by_a_writer_is_kept_even_if_its_pid_looks_dead(tmp_path):
    """The lock, not the pid alone, marks a live writer (a pid from another machine on a shared disk)."""
    import subprocess
    import sys

    fcntl = pytest.importorskip("fcntl")
    path = tmp_path / "h.json"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f".h.json.{dead.pid}.abc.tmp"
    with open(tmp_path / name, "wb") as f:
        os.utime(tmp_path / name, (0, 0))
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        from deepcore._io import write_bytes_atomic

        write_bytes_atomic(path, b"{}")
        assert name in os.listdir(tmp_path)
    write_bytes_atomic(path, b"{}")
    assert os.listdir(tmp_path) == ["h.json"]
