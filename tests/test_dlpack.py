"""Zero-copy moves (deepcore.to_backend, Module.to) through DLPack: memory shared where the libraries share
the device, a copy where sharing is impossible or unsafe (read-only, non-contiguous, another device)."""

from __future__ import annotations

import numpy as np
import pytest

import deepcore as dc
from deepcore import nn

torch = pytest.importorskip("torch")


def shares(a: np.ndarray, t) -> bool:
    """Whether NumPy array ``a`` and torch tensor ``t`` use the same memory."""
    return np.shares_memory(a, t.numpy()) if t.numel() else a.ctypes.data == t.data_ptr()


@pytest.mark.parametrize("a", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.arange(5, dtype=np.float64),
    np.arange(6, dtype=np.int64),  # labels move the same way
    np.array(2.5, dtype=np.float32),  # 0-d
], ids=["float32", "float64", "int64", "0d"])
def test_numpy_to_torch_shares_memory(a):
    t = dc.to_backend(a, "torch")
    assert isinstance(t, torch.Tensor) and tuple(t.shape) == a.shape and shares(a, t)
    t += 1  # a write through one shows in the other, as with torch.from_numpy
    np.testing.assert_array_equal(a, t.numpy())


def test_torch_to_numpy_shares_memory():
    t = torch.arange(12.0).reshape(3, 4)
    a = dc.to_backend(t, "numpy")
    assert isinstance(a, np.ndarray) and np.shares_memory(a, t.numpy()) and a.flags.writeable
    a[0, 0] = 42.0
    assert t[0, 0].item() == 42.0
    assert dc.get_backend(a).name == "numpy"


def test_round_trip_keeps_the_same_memory():
    a = np.ones((4, 3), np.float32)
    back = dc.to_backend(dc.to_backend(a, "torch"), "numpy")
    assert np.shares_memory(a, back)


@pytest.mark.parametrize("make, why", [
    (lambda: _read_only(np.arange(6.0)), "read-only"),
    (lambda: np.arange(12.0).reshape(3, 4).T, "not C-contiguous"),
    (lambda: np.arange(12.0).reshape(3, 4)[:, ::-1], "not C-contiguous"),  # torch cannot hold negative strides
    (lambda: np.arange(12.0)[::3], "not C-contiguous"),
], ids=["read-only", "transposed", "negative-strides", "strided"])
def test_numpy_arrays_that_must_be_copied(make, why):
    a = make()
    t = dc.to_backend(a, "torch")
    np.testing.assert_array_equal(t.numpy(), a)
    assert not np.shares_memory(t.numpy(), a)
    t += 1  # the copy is ours to write; a read-only source stays as it was
    assert not np.array_equal(t.numpy(), a)
    with pytest.raises(BufferError, match=f"cannot move to torch without a copy: it is {why}"):
        dc.to_backend(a, "torch", copy=False)


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def test_non_contiguous_torch_tensor_is_copied():
    t = torch.arange(12.0).reshape(3, 4).T
    a = dc.to_backend(t, "numpy")
    np.testing.assert_array_equal(a, t.numpy())
    assert not np.shares_memory(a, t.numpy())


def test_copy_true_always_copies_and_same_backend_is_returned_as_is():
    a = np.arange(4.0)
    assert not shares(a, dc.to_backend(a, "torch", copy=True))
    assert dc.to_backend(a, "numpy") is a
    b = dc.to_backend(a, "numpy", copy=True)
    assert b is not a and not np.shares_memory(a, b)
    t = torch.zeros(3)
    assert dc.to_backend(t, "torch") is t
    assert dc.to_backend(t, "torch", copy=False) is t


def test_array_api_strict_arrays_are_copied():
    xps = pytest.importorskip("array_api_strict")
    a = np.arange(4.0)
    s = dc.to_backend(a, "array_api_strict")
    assert dc.get_backend(s).name == "array_api_strict"
    back = dc.to_backend(s, "numpy")
    np.testing.assert_array_equal(back, a)
    assert not np.shares_memory(back, a)
    assert isinstance(s, type(xps.asarray(1.0)))


def test_requested_device_is_honoured():
    a = np.arange(3.0)
    t = dc.to_backend(a, "torch", device="cpu")
    assert shares(a, t) and t.device.type == "cpu"
    with pytest.raises(ValueError, match="device"):
        dc.to_backend(torch.zeros(2), "numpy", device="gpu0")


# ------------------------------------------------------------------ Module.to
def test_module_to_shares_parameters_and_buffers():
    model = nn.Sequential(nn.Linear(4, 3, seed=0), nn.BatchNorm1d(3))
    before = {name: a for name, a in model.state_dict().items()}
    model.to("torch")
    after = model.state_dict()
    for name, a in before.items():
        assert isinstance(after[name], torch.Tensor)
        assert shares(a, after[name]), name  # the old NumPy arrays and the tensors alias
    x = torch.ones(2, 4)
    model.forward(x, train=True)  # runs on the torch backend
    model.to("numpy")
    for name, t in model.state_dict().items():
        assert isinstance(t, np.ndarray), name
    assert np.shares_memory(model.state_dict()["0.weight"], before["0.weight"])


def test_module_to_with_a_cast_copies():
    model = nn.Sequential(nn.Linear(4, 3, seed=0))
    w = model[0].weight.value
    model.to("torch", dtype="float64")
    assert model[0].weight.value.dtype == torch.float64
    assert not np.shares_memory(w, model[0].weight.value.numpy())


def test_module_to_then_training_updates_in_place():
    """After a zero-copy move the optimizer writes into the moved tensors, so into the old arrays too
    (as a model built on torch.from_numpy would): documented, and shown here."""
    from deepcore import losses, optim

    model = nn.Sequential(nn.Linear(4, 3, seed=0))
    w = model[0].weight.value
    w0 = w.copy()
    model.to("torch")
    opt = optim.SGD(model.parameters(), lr=0.5)
    logits, back = model.forward(torch.ones(2, 4), train=True)
    back(losses.softmax_cross_entropy(logits, torch.tensor([0, 2]))[1])
    opt.step()
    assert not np.array_equal(w, w0) and shares(w, model[0].weight.value)


def test_load_state_dict_copies():
    with dc.use_backend("torch"):
        model = nn.Sequential(nn.Linear(4, 3, seed=0))
    state = {k: np.full(tuple(v.shape), 0.5, np.float32) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    for k, v in model.state_dict().items():
        assert not shares(state[k], v), k


def test_optimizer_state_loaded_across_backends_is_not_shared():
    from deepcore import optim

    model = nn.Sequential(nn.Linear(3, 2, seed=0))
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = np.ones(p.shape, np.float32)
    opt.step()
    state = opt.state_dict()
    buf = state["state"]["0"]["momentum_buffer"]
    before = buf.copy()
    with dc.use_backend("torch"):
        other = nn.Sequential(nn.Linear(3, 2, seed=0))
    other_opt = optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    other_opt.load_state_dict(state)
    for p in other.parameters():
        p.grad = torch.ones(p.shape)
    other_opt.step()
    np.testing.assert_array_equal(buf, before)


# ------------------------------------------------------------------ GPU: CuPy <-> torch CUDA
@pytest.mark.gpu
def test_cupy_and_torch_cuda_share_memory():
    if dc.available_backends().get("cupy") is not True or not torch.cuda.is_available():
        pytest.skip("needs CuPy and torch with CUDA")
    import cupy

    c = cupy.arange(6, dtype=cupy.float32)
    t = dc.to_backend(c, "torch")
    assert t.is_cuda and t.data_ptr() == c.data.ptr
    back = dc.to_backend(t, "cupy")
    assert back.data.ptr == c.data.ptr
    host = dc.to_backend(t, "numpy")  # another device: a copy
    np.testing.assert_array_equal(host, np.arange(6, dtype=np.float32))
