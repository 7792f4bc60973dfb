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
