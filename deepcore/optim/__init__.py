"""Optimizers with PyTorch's update rules, parameter groups, learning-rate schedules, loss scaling,
gradient clipping and weight averaging.

```python
opt = dc.optim.AdamW(dc.optim.param_groups(model, weight_decay=0.05), lr=1e-3)
sched = dc.optim.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs * steps_per_epoch)  # interval "step"
scaler, ema = dc.optim.LossScaler(enabled=fp16), dc.optim.EMA(model, decay=0.999)
for epoch in range(epochs):
    for xb, yb in batches:
        opt.zero_grad(); pred, backward = model.forward(xb, train=True)
        loss, dloss = dc.losses.softmax_cross_entropy(pred, yb)
        backward(scaler.scale(dloss)); scaler.unscale(opt); dc.optim.clip_grad_norm(opt, 1.0)
        scaler.step(opt); scaler.update(); ema.update(); sched.step()
```
"""

from .adaptive import Adagrad, RMSprop
from .clipping import clip_grad_norm, clip_grad_value
from .ema import EMA
from .groups import ParamGroup, param_groups
from .onecycle import OneCycleLR
from .optimizers import GD, SGD, Adam, AdamW, Optimizer
from .plateau import ReduceLROnPlateau
from .scaler import LossScaler
from .schedules import (
    INTERVALS,
    CosineAnnealingLR,
    ExponentialLR,
    LinearWarmup,
    LRSchedule,
    SequentialSchedule,
    StepLR,
)

__all__ = [
    "EMA",
    "GD",
    "INTERVALS",
    "SGD",
    "Adagrad",
    "Adam",
    "AdamW",
    "CosineAnnealingLR",
    "ExponentialLR",
    "LRSchedule",
    "LinearWarmup",
    "LossScaler",
    "OneCycleLR",
    "Optimizer",
    "ParamGroup",
    "RMSprop",
    "ReduceLROnPlateau",
    "SequentialSchedule",
    "StepLR",
    "clip_grad_norm",
    "clip_grad_value",
    "param_groups",
]
