"""Optimizers (GD, SGD, Adam, AdamW) with PyTorch's update rules, and learning-rate schedules.

```python
opt = dc.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
sched = dc.optim.StepLR(opt, step_size=10)
for epoch in range(epochs):
    ...; opt.zero_grad(); backward(dloss); opt.step()
    sched.step()
```
"""

from .optimizers import GD, SGD, Adam, AdamW, Optimizer
from .schedules import (
    CosineAnnealingLR,
    ExponentialLR,
    LinearWarmup,
    LRSchedule,
    SequentialSchedule,
    StepLR,
)

__all__ = [
    "GD",
    "SGD",
    "Adam",
    "AdamW",
    "CosineAnnealingLR",
    "ExponentialLR",
    "LRSchedule",
    "LinearWarmup",
    "Optimizer",
    "SequentialSchedule",
    "StepLR",
]
