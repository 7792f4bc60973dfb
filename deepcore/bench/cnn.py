"""The convolutional workloads: the training step of the network ``deepcore train --model cnn`` builds
(LeNet-like for 1x28x28, VGG-style for 3x32x32), one convolution's forward + backward, the plain GEMMs
of that convolution (the floor BLAS sets), and an epoch of the CNN. deepcore (NumPy or CuPy) against
PyTorch eager with the same layers, the same initial weights and the same data.

FLOPs (``info["flops"]``, so reports can give GFLOP/s): a convolution's forward is
``2 N O OH OW (C/G) KH KW``; its backward forms dW and dx, the same again each (3x in all; the first
convolution of a network forms no dx, 2x); a Linear layer is ``2 N I O`` per product, likewise.
Bias additions, activations, pooling and the loss are not counted."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .contenders import import_torch, library_of
from .workloads import Workload, dc_backend, host_data, on_contender, sync_for, torch_device

LR, MOMENTUM = 0.01, 0.9
#: The network ``deepcore train --model cnn`` builds for MNIST: (C, H, W), --hidden, classes.
LENET_SHAPE, HIDDEN, CLASSES = (1, 28, 28), (256,), 10


def _deepcore_cnn(contender: str, image_shape: Sequence[int], channels: Sequence[int] | None,
                  hidden: Sequence[int], seed: int = 0) -> Any:
    """``build_model("cnn", ...)``, the model of ``deepcore train --model cnn``, on the contender's backend."""
    import deepcore

    from ..cli.models import build_model

    backend = dc_backend(contender)
    with deepcore.use_backend(backend):
        return build_model("cnn", math.prod(image_shape), CLASSES, tuple(hidden), seed=seed,
                           image_shape=tuple(image_shape), channels=None if channels is None else tuple(channels))


def torch_mirror(model: Any, contender: str) -> Any:
    """A ``torch.nn.Sequential`` with the same layers as the deepcore ``Sequential`` ``model`` and its
    current weights (copied), on the contender's device."""
    torch = import_torch()
    tnn = torch.nn
    layers: list[Any] = []
    for layer in model:
        kind = type(layer).__name__
        if kind == "Conv2d":
            layers.append(tnn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                     layer.padding, layer.dilation, layer.groups, bias=layer.bias is not None))
        elif kind == "Linear":
            layers.append(tnn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None))
        elif kind == "BatchNorm2d":
            layers.append(tnn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum))
        elif kind == "MaxPool2d":
            layers.append(tnn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding))
        elif kind == "GlobalAvgPool2d":
            layers += [tnn.AdaptiveAvgPool2d(1), tnn.Flatten()]
        elif kind in ("ReLU", "Flatten"):
            layers.append(getattr(tnn, kind)())
        else:
            raise ValueError(f"torch_mirror: no mirror for {kind}")
    mirror = tnn.Sequential(*layers)
    ours = [np.asarray(_host(p.value)) for p in model.parameters()]
    theirs = list(mirror.parameters())
    if [a.shape for a in ours] != [tuple(t.shape) for t in theirs]:
        raise ValueError("torch_mirror: the parameters do not line up")
    with torch.no_grad():
        for t, a in zip(theirs, ours, strict=True):
            t.copy_(torch.from_numpy(np.ascontiguousarray(a)))
    return mirror.to(torch_device(contender))


def _host(a: Any) -> Any:
    get = getattr(a, "get", None)  # CuPy
    return get() if callable(get) else a


def network_flops(model: Any, batch: int, image_shape: Sequence[int]) -> float:
    """The step's multiply-add FLOPs (module docstring): 3x each layer's forward, 2x for the first
    layer with parameters (no dx)."""
    h, w = image_shape[1:]
    total, first = 0.0, True
    for layer in model:
        kind = type(layer).__name__
        fwd = 0.0
        if kind == "Conv2d":
            oh, ow = layer.output_size(h, w)
            kh, kw = layer.kernel_size
            fwd = 2.0 * batch * layer.out_channels * oh * ow * (layer.in_channels // layer.groups) * kh * kw
            h, w = oh, ow
        elif kind == "MaxPool2d":
            (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
            h, w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        elif kind == "Linear":
            fwd = 2.0 * batch * layer.in_features * layer.out_features
        if fwd:
            total += fwd * (2 if first else 3)
            first = False
    return total


def _net_info(image_shape: Sequence[int], channels: Sequence[int] | None, hidden: Sequence[int]) -> dict[str, Any]:
    from ..cli.models import describe_cnn

    return {"model": f"{describe_cnn(image_shape, channels)} cnn, hidden {','.join(map(str, hidden))}",
            "optimizer": f"SGD(lr={LR}, momentum={MOMENTUM})"}


def _step(contender: str, model: Any) -> Any:
    """``step(x, y)``: forward, softmax cross-entropy, backward, SGD momentum, zero_grad."""
    if library_of(contender) == "torch":
        torch = import_torch()
        mirror = torch_mirror(model, contender)
        opt = torch.optim.SGD(mirror.parameters(), lr=LR, momentum=MOMENTUM)
        F = torch.nn.functional

        def tstep(x: Any, y: Any) -> Any:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(mirror(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        return tstep
    from .. import losses, optim

    opt = optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def step(x: Any, y: Any) -> Any:
        logits, backward = model.forward(x, train=True)
        loss, grad = losses.softmax_cross_entropy(logits, y)
        backward(grad)
        opt.step()
        opt.zero_grad()
        return loss

    return step


def cnn_step(contender: str, batch: int, image_shape: Sequence[int] = LENET_SHAPE,
             channels: Sequence[int] | None = None, hidden: Sequence[int] = HIDDEN) -> Workload:
    """One training step of ``deepcore train --model cnn``'s network for ``image_shape`` on random data."""
    model = _deepcore_cnn(contender, image_shape, channels, hidden)
    step = _step(contender, model)
    x = on_contender(contender, host_data((batch, *image_shape), 21))
    y = on_contender(contender, np.random.default_rng(22).integers(0, CLASSES, batch))
    return Workload(lambda: step(x, y), sync_for(contender),
                    {"shape": [batch, *image_shape], "flops": network_flops(model, batch, image_shape),
                     **_net_info(image_shape, channels, hidden)})


def _conv_geometry(n: int, c: int, o: int, hw: int, k: int, padding: int) -> tuple[int, int, float]:
    out = hw + 2 * padding - k + 1
    return out, n * out * out, 2.0 * n * o * out * out * c * k * k


def conv(contender: str, n: int, c: int, o: int, hw: int, k: int = 3, padding: int = 1,
         bias: bool = False) -> Workload:
    """One ``Conv2d(c, o, k, padding=padding, bias=bias)`` layer, stride 1, on (n, c, hw, hw): forward, then
    backward of a fixed random dy forming dx and dW (and db with ``bias``); the gradients are set to
    None before each call, so none accumulates."""
    import deepcore

    from .. import nn

    out, _, fwd = _conv_geometry(n, c, o, hw, k, padding)
    x_h, dy_h = host_data((n, c, hw, hw), 23), host_data((n, o, out, out), 24)
    backend = dc_backend("numpy" if library_of(contender) == "torch" else contender)
    with deepcore.use_backend(backend):
        layer = nn.Conv2d(c, o, k, padding=padding, bias=bias, seed=0)
    if library_of(contender) == "torch":
        tconv = torch_mirror(nn.Sequential(layer), contender)[0]
        x = on_contender(contender, x_h).requires_grad_(True)
        dy = on_contender(contender, dy_h)

        def fn() -> Any:
            x.grad = None
            tconv.zero_grad(set_to_none=True)
            tconv(x).backward(dy)
            return x.grad
    else:
        x, dy = on_contender(contender, x_h), on_contender(contender, dy_h)
        params = layer.parameters()

        def fn() -> Any:
            for p in params:
                p.grad = None
            _, backward = layer.forward(x, train=True, input_grad=True)  # x stands for an activation
            return backward(dy)

    return Workload(fn, sync_for(contender), {"shape": [n, c, hw, hw], "out_channels": o, "kernel": k,
                                              "padding": padding, "bias": bias, "what": "forward + dx + dW",
                                              "flops_forward": fwd, "flops": 3 * fwd})


def conv_gemms(contender: str, n: int, c: int, o: int, hw: int, k: int = 3, padding: int = 1) -> Workload:
    """The plain GEMMs of that convolution, into preallocated outputs, nothing else: the forward
    ``W cols`` (O x CKK)(CKK x NL), ``dW^T = cols dY^T`` (CKK x NL)(NL x O) (the orientation deepcore's
    NumPy path uses; OpenBLAS runs it faster than ``dY cols^T``) and ``dcols = W^T dY`` (CKK x O)(O x NL),
    with NL = N OH OW. ``numpy``: ``np.matmul(out=)`` (OpenBLAS); ``torch``: ``torch.mm(out=)``."""
    _, nl, fwd = _conv_geometry(n, c, o, hw, k, padding)
    ckk = c * k * k
    w, cols, dy = host_data((o, ckk), 25), host_data((ckk, nl), 26), host_data((o, nl), 27)
    y, dwt, dcols = np.empty((o, nl), np.float32), np.empty((ckk, o), np.float32), np.empty((ckk, nl), np.float32)
    if library_of(contender) == "torch":
        torch = import_torch()
        w, cols, dy, y, dwt, dcols = (torch.from_numpy(a) for a in (w, cols, dy, y, dwt, dcols))

        def fn() -> None:
            torch.mm(w, cols, out=y)
            torch.mm(cols, dy.T, out=dwt)
            torch.mm(w.T, dy, out=dcols)
    else:
        def fn() -> None:
            np.matmul(w, cols, out=y)
            np.matmul(cols, dy.T, out=dwt)
            np.matmul(w.T, dy, out=dcols)

    return Workload(fn, sync_for(contender), {"shape": [n, c, hw, hw], "out_channels": o, "kernel": k,
                                              "gemms": [[o, ckk, nl], [ckk, nl, o], [ckk, o, nl]],
                                              "what": "GEMMs only", "flops_forward": fwd, "flops": 3 * fwd})


_EPOCH_DATA: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}


def _epoch_data(n: int, image_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-shaped synthetic images: (n, C, H, W) float32 in [0, 1), labels 0..9; built once."""
    key = (n, *image_shape)
    if key not in _EPOCH_DATA:
        rng = np.random.default_rng(28)
        _EPOCH_DATA[key] = (rng.random((n, *image_shape), dtype=np.float32), rng.integers(0, CLASSES, n))
    return _EPOCH_DATA[key]


def cnn_epoch(contender: str, n: int, batch: int, image_shape: Sequence[int] = LENET_SHAPE,
              channels: Sequence[int] | None = None, hidden: Sequence[int] = HIDDEN) -> Workload:
    """One shuffled epoch of ``n`` random images at ``batch``: ``numpy-fit`` is
    ``deepcore.train.fit(epochs=1)``; ``numpy`` deepcore's ``data.batches`` and the step of
    :func:`cnn_step` (no loss check, no metrics); ``torch`` the idiomatic loop without a DataLoader (a
    ``randperm`` per epoch, each batch gathered from one tensor with ``index_select``)."""
    x_h, y_h = _epoch_data(n, image_shape)
    model = _deepcore_cnn(contender, image_shape, channels, hidden)
    counter = {"epoch": 0}
    if library_of(contender) == "torch":
        torch = import_torch()
        step = _step(contender, model)
        dev = torch_device(contender)
        xt, yt = torch.from_numpy(x_h).to(dev), torch.from_numpy(y_h).to(dev)

        def fn() -> Any:
            counter["epoch"] += 1
            order = torch.randperm(n, generator=torch.Generator().manual_seed(counter["epoch"])).to(dev)
            loss = None
            for i in range(0, n, batch):
                idx = order[i:i + batch]
                loss = step(xt.index_select(0, idx), yt.index_select(0, idx))
            return loss
    elif contender == "numpy-fit":
        from .. import optim
        from ..data import ArrayDataset
        from ..train import fit

        opt = optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        ds = ArrayDataset(x_h, y_h)

        def fn() -> Any:
            counter["epoch"] += 1
            return fit(model, "softmax-ce", opt, ds, epochs=1, batch_size=batch, seed=counter["epoch"],
                       verbose=False)
    else:
        from ..data import ArrayDataset, batches

        step = _step(contender, model)
        backend = dc_backend(contender)
        ds = ArrayDataset(x_h, y_h)

        def fn() -> Any:
            counter["epoch"] += 1
            loss = None
            for xb, yb in batches(ds, batch, seed=0, epoch=counter["epoch"], backend=backend):
                loss = step(xb, yb)
            return loss

    steps = math.ceil(n / batch)
    return Workload(fn, sync_for(contender), {"shape": [n, *image_shape], "batch": batch, "steps": steps,
                                              "flops": network_flops(model, batch, image_shape) * n / batch,
                                              **_net_info(image_shape, channels, hidden)})
