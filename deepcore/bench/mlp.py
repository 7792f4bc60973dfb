"""The 784-256-10 MLP's training step and epoch, four ways: deepcore (tuned, plain, and the
whole ``fit`` loop), the same step hand-written in NumPy (the framework-overhead baseline), and
PyTorch eager (the outside reference). Every contender starts from the same weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..initializers import pytorch_default
from .contenders import NotApplicable, import_torch, library_of
from .workloads import Workload, dc_backend, on_contender, sync_for, torch_device

MLP = (784, 256, 10)
LR, MOMENTUM = 0.01, 0.9


# ---- the MLP training step, four ways
def _init_weights(seed: int = 0) -> list[np.ndarray]:
    """PyTorch's default Linear initialisation, drawn once so every contender starts equal."""
    rng = np.random.default_rng(seed)
    out = []
    for fan_in, fan_out in zip(MLP[:-1], MLP[1:], strict=True):
        out.append(pytorch_default(rng, (fan_out, fan_in), fan_in, fan_out).astype(np.float32))
        out.append(pytorch_default(rng, (fan_out,), fan_in, fan_out).astype(np.float32))
    return out


class _PlainNumpyMLP:
    """The 784-256-10 step written by hand in plain NumPy, as a careful person would: in-place
    bias and ReLU, the softmax cross-entropy gradient in the probability buffer, no input
    gradient, SGD momentum (PyTorch's rule) in place. The framework-overhead baseline."""

    def __init__(self, weights: Sequence[np.ndarray]) -> None:
        self.params = [w.copy() for w in weights]
        self.bufs: list[np.ndarray | None] = [None] * len(self.params)

    def step(self, x: np.ndarray, y: np.ndarray) -> np.floating:
        w1, b1, w2, b2 = self.params
        n = x.shape[0]
        h = x @ w1.T
        h += b1
        np.maximum(h, 0, out=h)
        s = h @ w2.T
        s += b2
        s -= s.max(axis=1, keepdims=True)
        rows = np.arange(n)
        target = s[rows, y]
        np.exp(s, out=s)
        sum_e = s.sum(axis=1)
        loss = (np.log(sum_e) - target).mean()
        s *= (1.0 / n / sum_e)[:, None]   # d loss / d logits = (p - onehot) / n
        s[rows, y] -= 1.0 / n
        g_w2 = s.T @ h
        g_b2 = s.sum(axis=0)
        dh = s @ w2
        dh *= h > 0
        g_w1 = dh.T @ x
        g_b1 = dh.sum(axis=0)
        for i, (p, g) in enumerate(zip(self.params, (g_w1, g_b1, g_w2, g_b2), strict=True)):
            buf = self.bufs[i]
            if buf is None:
                self.bufs[i] = buf = g
            else:
                buf *= MOMENTUM
                buf += g
            p -= LR * buf
        return loss


def _deepcore_mlp(contender: str, weights: Sequence[np.ndarray]) -> tuple[Any, Any, Any]:
    import deepcore

    from .. import nn, optim

    backend = dc_backend(contender)
    with deepcore.use_backend(backend):
        model = nn.Sequential(nn.Linear(MLP[0], MLP[1]), nn.ReLU(), nn.Linear(MLP[1], MLP[2]))
    for p, w in zip(model.parameters(), weights, strict=True):
        p.value = backend.from_numpy(w, device=backend.device(p.value))
    opt = optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    return model, opt, backend


def _deepcore_step(model: Any, opt: Any, need_input_grad: bool) -> Callable[[Any, Any], Any]:
    from .. import losses

    def step(x: Any, y: Any) -> Any:
        opt.zero_grad()
        pred, backward = model.forward(x, train=True)
        loss, grad = losses.softmax_cross_entropy(pred, y)
        if need_input_grad:
            backward(grad)
        else:
            backward(grad, need_input_grad=False)
        opt.step()
        return loss

    return step


def _torch_mlp(contender: str, weights: Sequence[np.ndarray]) -> Callable[[Any, Any], Any]:
    torch = import_torch()
    dev = torch_device(contender)
    model = torch.nn.Sequential(torch.nn.Linear(MLP[0], MLP[1]), torch.nn.ReLU(), torch.nn.Linear(MLP[1], MLP[2]))
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights, strict=True):
            p.copy_(torch.from_numpy(w))
    model.to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    F = torch.nn.functional

    def step(x: Any, y: Any) -> Any:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _step_fn(contender: str, weights: Sequence[np.ndarray]) -> tuple[Callable[[Any, Any], Any], Any]:
    """``(step(x, y), model_or_params)`` for a contender of mlp_step / epoch."""
    lib = library_of(contender)
    if lib == "torch":
        return _torch_mlp(contender, weights), None
    if contender == "numpy-plain":
        plain = _PlainNumpyMLP(weights)
        return plain.step, plain
    model, opt, _ = _deepcore_mlp(contender, weights)
    return _deepcore_step(model, opt, need_input_grad=contender in ("numpy-dx", "numpy-fit")), model


def mlp_step(contender: str, batch: int) -> Workload:
    if contender == "numpy-fit":
        raise NotApplicable("numpy-fit is an epoch contender; mlp_step has numpy-dx")
    weights = _init_weights()
    x_h = np.random.default_rng(6).random((batch, MLP[0]), dtype=np.float32)
    y_h = np.random.default_rng(7).integers(0, MLP[-1], batch)
    step, _ = _step_fn(contender, weights)
    x, y = on_contender(contender, x_h), on_contender(contender, y_h)
    return Workload(lambda: step(x, y), sync_for(contender),
                    {"shape": [batch, *MLP], "optimizer": f"SGD(lr={LR}, momentum={MOMENTUM})"})


_EPOCH_DATA: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _epoch_data(n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-shaped synthetic data: n x d float32 in [0, 1), labels 0..9; built once and shared."""
    key = (n, d)
    if key not in _EPOCH_DATA:
        rng = np.random.default_rng(8)
        _EPOCH_DATA[key] = (rng.random((n, d), dtype=np.float32), rng.integers(0, MLP[-1], n))
    return _EPOCH_DATA[key]


def epoch(contender: str, n: int, batch: int) -> Workload:
    if contender == "numpy-dx":
        raise NotApplicable("numpy-dx is an mlp_step contender; epoch has numpy-fit")
    x_h, y_h = _epoch_data(n, MLP[0])
    weights = _init_weights()
    counter = {"epoch": 0}
    lib = library_of(contender)
    if contender == "numpy-fit":
        from ..data import ArrayDataset
        from ..train import fit

        model, opt, _ = _deepcore_mlp(contender, weights)
        ds = ArrayDataset(x_h, y_h)

        def fn() -> Any:
            counter["epoch"] += 1
            return fit(model, "softmax-ce", opt, ds, epochs=1, batch_size=batch, seed=counter["epoch"],
                       verbose=False)
    elif lib == "torch":
        torch = import_torch()
        step, _ = _step_fn(contender, weights)
        dev = torch_device(contender)
        xt, yt = torch.from_numpy(x_h).to(dev), torch.from_numpy(y_h).to(dev)

        def fn() -> Any:
            counter["epoch"] += 1
            g = torch.Generator().manual_seed(counter["epoch"])
            order = torch.randperm(n, generator=g).to(dev)
            loss = None
            for i in range(0, n, batch):
                idx = order[i:i + batch]
                loss = step(xt.index_select(0, idx), yt.index_select(0, idx))
            return loss
    elif lib == "cupy":
        # Device-resident data, gathered on the device, as the torch-cuda contender does.
        step, _ = _step_fn(contender, weights)
        backend = dc_backend(contender)
        xp = backend.xp
        xd, yd = backend.from_numpy(x_h), backend.from_numpy(y_h)

        def fn() -> Any:
            counter["epoch"] += 1
            order = backend.from_numpy(np.random.default_rng(counter["epoch"]).permutation(n))
            loss = None
            for i in range(0, n, batch):
                idx = order[i:i + batch]
                loss = step(xp.take(xd, idx, axis=0), xp.take(yd, idx, axis=0))
            return loss
    elif contender == "numpy-plain":
        plain = _PlainNumpyMLP(weights)

        def fn() -> Any:
            counter["epoch"] += 1
            order = np.random.default_rng(counter["epoch"]).permutation(n)
            loss = None
            for i in range(0, n, batch):
                idx = order[i:i + batch]
                loss = plain.step(np.take(x_h, idx, axis=0), np.take(y_h, idx, axis=0))
            return loss
    else:
        from ..data import ArrayDataset, batches

        step, _ = _step_fn(contender, weights)
        backend = dc_backend(contender)
        ds = ArrayDataset(x_h, y_h)

        def fn() -> Any:
            counter["epoch"] += 1
            loss = None
            for xb, yb in batches(ds, batch, seed=0, epoch=counter["epoch"], backend=backend):
                loss = step(xb, yb)
            return loss
    return Workload(fn, sync_for(contender), {"shape": [n, MLP[0]], "batch": batch, "model": list(MLP),
                                               "optimizer": f"SGD(lr={LR}, momentum={MOMENTUM})"})

