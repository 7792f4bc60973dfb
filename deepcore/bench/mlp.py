"""The MLP's training step and epoch, four ways: deepcore (the README's loop as written, the same
loop also forming the batch's gradient, and the whole ``fit`` loop), the same step hand-written in
NumPy (the framework-overhead baseline), and PyTorch eager (the outside reference). Every contender
starts from the same weights."""

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
#: The wide MLP of the CIFAR-sized case (3072 inputs, two hidden layers of 1024).
WIDE_MLP = (3072, 1024, 1024, 10)


def _init_weights(sizes: Sequence[int] = MLP, seed: int = 0) -> list[np.ndarray]:
    """PyTorch's default Linear initialisation, drawn once so every contender starts equal."""
    rng = np.random.default_rng(seed)
    out = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        out.append(pytorch_default(rng, (fan_out, fan_in), fan_in, fan_out).astype(np.float32))
        out.append(pytorch_default(rng, (fan_out,), fan_in, fan_out).astype(np.float32))
    return out


class _PlainNumpyMLP:
    """The MLP step written by hand in plain NumPy, as a careful person would: in-place bias and
    ReLU, the softmax cross-entropy gradient in the probability buffer, no input gradient, SGD
    momentum (PyTorch's rule) in place. The framework-overhead baseline."""

    def __init__(self, weights: Sequence[np.ndarray]) -> None:
        self.params = [w.copy() for w in weights]
        self.bufs: list[np.ndarray | None] = [None] * len(self.params)

    def step(self, x: np.ndarray, y: np.ndarray) -> np.floating:
        ws, bs = self.params[0::2], self.params[1::2]
        n, last = x.shape[0], len(ws) - 1
        acts = [x]
        for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
            h = acts[-1] @ w.T
            h += b
            if i < last:
                np.maximum(h, 0, out=h)
            acts.append(h)
        s = acts.pop()
        s -= s.max(axis=1, keepdims=True)
        rows = np.arange(n)
        target = s[rows, y]
        np.exp(s, out=s)
        sum_e = s.sum(axis=1)
        loss = (np.log(sum_e) - target).mean()
        s *= (1.0 / n / sum_e)[:, None]   # d loss / d logits = (p - onehot) / n
        s[rows, y] -= 1.0 / n
        grads: list[np.ndarray] = [None] * len(self.params)  # type: ignore[list-item]
        d = s
        for i in range(last, -1, -1):
            grads[2 * i], grads[2 * i + 1] = d.T @ acts[i], d.sum(axis=0)
            if i:
                d = d @ ws[i]
                d *= acts[i] > 0
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            buf = self.bufs[i]
            if buf is None:
                self.bufs[i] = buf = g
            else:
                buf *= MOMENTUM
                buf += g
            p -= LR * buf
        return loss


def _deepcore_mlp(contender: str, weights: Sequence[np.ndarray], sizes: Sequence[int] = MLP) -> tuple[Any, Any, Any]:
    import deepcore

    from .. import nn, optim

    backend = dc_backend(contender)
    layers: list[Any] = []
    with deepcore.use_backend(backend):
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers += [nn.Linear(fan_in, fan_out)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
        model = nn.Sequential(*layers)
    for p, w in zip(model.parameters(), weights, strict=True):
        p.value = backend.from_numpy(w, device=backend.device(p.value))
    opt = optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    return model, opt, backend


def _deepcore_step(model: Any, opt: Any, input_grad: bool) -> Callable[[Any, Any], Any]:
    """The README's loop, as written there; ``input_grad=True`` also forms the batch's gradient."""
    from .. import losses

    def step(x: Any, y: Any) -> Any:
        logits, backward = model.forward(x, train=True, input_grad=input_grad)
        loss, grad = losses.softmax_cross_entropy(logits, y)
        backward(grad)
        opt.step()
        opt.zero_grad()
        return loss

    return step


def _torch_mlp(contender: str, weights: Sequence[np.ndarray], sizes: Sequence[int] = MLP) -> Callable[[Any, Any], Any]:
    torch = import_torch()
    dev = torch_device(contender)
    layers: list[Any] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [torch.nn.Linear(fan_in, fan_out)] + ([torch.nn.ReLU()] if i < len(sizes) - 2 else [])
    model = torch.nn.Sequential(*layers)
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


def _step_fn(contender: str, weights: Sequence[np.ndarray],
             sizes: Sequence[int] = MLP) -> tuple[Callable[[Any, Any], Any], Any]:
    """``(step(x, y), model_or_params)`` for a contender of mlp_step / epoch."""
    lib = library_of(contender)
    if lib == "torch":
        return _torch_mlp(contender, weights, sizes), None
    if contender == "numpy-plain":
        plain = _PlainNumpyMLP(weights)
        return plain.step, plain
    model, opt, _ = _deepcore_mlp(contender, weights, sizes)
    return _deepcore_step(model, opt, input_grad=contender == "numpy-dx"), model


def mlp_step(contender: str, batch: int, sizes: tuple[int, ...] = MLP) -> Workload:
    if contender == "numpy-fit":
        raise NotApplicable("numpy-fit is an epoch contender; mlp_step has numpy-dx")
    weights = _init_weights(sizes)
    x_h = np.random.default_rng(6).random((batch, sizes[0]), dtype=np.float32)
    y_h = np.random.default_rng(7).integers(0, sizes[-1], batch)
    step, _ = _step_fn(contender, weights, sizes)
    x, y = on_contender(contender, x_h), on_contender(contender, y_h)
    return Workload(lambda: step(x, y), sync_for(contender),
                    {"shape": [batch, *sizes], "optimizer": f"SGD(lr={LR}, momentum={MOMENTUM})"})


def mlp_gemms(contender: str, batch: int, sizes: tuple[int, ...] = MLP) -> Workload:
    """The matrix products of one step without an input gradient, nothing else: per layer
    ``x W^T`` and ``dy^T x``, and ``dy W`` for every layer but the first. ``numpy`` calls BLAS
    through ``np.matmul``; ``torch`` through ``torch.matmul``."""
    rng = np.random.default_rng(9)
    acts = [rng.random((batch, d), dtype=np.float32) for d in sizes]
    weights = [w for w in _init_weights(sizes)[0::2]]
    if library_of(contender) == "torch":
        torch = import_torch()
        acts = [torch.from_numpy(a) for a in acts]
        weights = [torch.from_numpy(w) for w in weights]
        mm = torch.matmul
    else:
        mm = np.matmul

    def fn() -> None:
        for i, w in enumerate(weights):
            mm(acts[i], w.T)
            mm(acts[i + 1].T, acts[i])
            if i:
                mm(acts[i + 1], w)

    return Workload(fn, sync_for(contender), {"shape": [batch, *sizes], "what": "GEMMs only"})


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

