"""SGD's steady step: the checked plan of the last step, re-used while nothing it relied on changed.

Once every parameter has a gradient and a momentum buffer, a training loop's steps look alike:
the same parameter arrays, the same buffers, gradients of the same type, dtype and shape.
:class:`SteadyPlan` keeps what ``Optimizer.step`` found (each parameter's array, state dict and
buffer, its backend, the runs of one group) and, on the next step, confirms it with an identity
test per parameter, array and state, and the gradient's type, dtype and shape, instead of
redoing the checks and building the runs again (about 2 us of a 4-parameter step's 17, warm).
Anything else (a missing gradient, a replaced parameter, array or buffer, a state dict loaded or
edited, a new group, another dtype, a backend registered anew, an ``_update`` or ``_apply`` set
since) declines before anything is written, and the full step runs and builds a new plan.
Hyperparameters are read from the groups at every step, so schedules work as before.
"""

from __future__ import annotations

from operator import is_
from typing import Any

from ..backend.registry import _by_type as _BACKEND_BY_TYPE

#: The optimizer a plan serves: an ``optimizers.SGD`` (not imported here: it imports this module).
_SGD = Any

_BUFFER = "momentum_buffer"


def update_run(backend: Any, group: Any, values: list[Any], grads: list[Any], bufs: list[Any],
               step: int) -> tuple[list[Any], list[Any]]:
    """One run of ``group``'s parameters on ``backend``: ``Backend.sgd_update_many`` with the group's
    hyperparameters as they are now."""
    return backend.sgd_update_many(values, grads, bufs, lr=group["lr"], momentum=group["momentum"],
                                   dampening=group["dampening"], nesterov=group["nesterov"],
                                   weight_decay=group["weight_decay"], step=step)


class SteadyPlan:
    """The runs (backend, group, parameter indices) of an SGD step that updated every parameter,
    with the arrays each index had after it."""

    __slots__ = ("params", "states", "entries", "runs")

    def __init__(self, opt: _SGD) -> None:
        self.params = opt.params
        self.states = opt.state
        #: Per parameter: (Param, its value, the value's type, its state dict, its buffer or None).
        self.entries = [(p, p.value, type(p.value), s, s.get(_BUFFER))
                        for p, s in zip(opt.params, opt.state, strict=True)]
        #: Per run of one group on one backend: (backend, group, the array type, first index, end index,
        #: the values, the buffers).
        self.runs: list[tuple[Any, Any, type, int, int, list[Any], list[Any]]] = []
        start, n = 0, len(self.entries)
        for i, (_, _, array_type, _, _) in enumerate(self.entries):
            group = opt._group_of[i]
            if i + 1 == n or self.entries[i + 1][2] is not array_type or opt._group_of[i + 1] is not group:
                run = self.entries[start:i + 1]
                self.runs.append((_BACKEND_BY_TYPE[array_type], group, array_type, start, i + 1,
                                  [e[1] for e in run], [e[4] for e in run]))
                start = i + 1

    @classmethod
    def after_step(cls, opt: _SGD) -> SteadyPlan | None:
        """The plan of the step just taken, or None when it was not one the plan can repeat (a
        parameter without a gradient, or on a backend that is not a one-device library)."""
        for p in opt.params:
            value = p.value
            backend = _BACKEND_BY_TYPE.get(type(value))
            if p.grad is None or backend is None or not backend.single_device:
                return None
        return cls(opt)

    def step(self, opt: _SGD) -> bool:
        """Take ``opt``'s step with this plan (True), or decline with nothing written (False)."""
        params, states, entries = self.params, self.states, self.entries
        if (opt.params is not params or opt.state is not states or len(params) != len(entries)
                or len(states) != len(entries)):
            return False
        grads = []
        for q, (p, value, array_type, state, buf), s in zip(params, entries, states, strict=True):
            g = p.grad
            if (q is not p or p.value is not value or type(g) is not array_type or g.dtype != value.dtype
                    or g.shape != value.shape or s is not state or state.get(_BUFFER) is not buf):
                return False
            grads.append(g)
        by_type = _BACKEND_BY_TYPE
        for run in self.runs:
            if by_type.get(run[2]) is not run[0]:  # a backend registered in place of the run's since
                return False
        step = opt.step_count + 1
        changed = False
        for backend, group, _, start, end, values, bufs in self.runs:
            new_values, new_bufs = update_run(backend, group, values, grads[start:end], bufs, step)
            if (len(new_values) == len(new_bufs) == end - start and all(map(is_, new_values, values))
                    and all(map(is_, new_bufs, bufs))):
                continue  # in place, as a steady step on NumPy always is
            for i, value, buf in zip(range(start, end), new_values, new_bufs, strict=True):
                p, old_value, _, state, old_buf = entries[i]
                if value is not old_value or buf is not old_buf:
                    # Not in place (a read-only parameter, a first buffer): stored as the full step
                    # stores it; the next step builds a new plan.
                    p.value = value
                    if buf is not None:
                        state[_BUFFER] = buf
                    changed = True
        opt.__dict__["step_count"] = step
        if changed:
            opt.__dict__["_steady"] = None
        return True
