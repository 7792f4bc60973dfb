"""Parameters and the layer base class.

A layer is called in closure style: ``y, backward = layer.forward(x, train=True)``
returns the output and a function that maps ``dL/dy`` to ``dL/dx`` while adding
each parameter's gradient into ``Param.grad``. No tape is kept anywhere: the
closure holds exactly what its backward pass needs.

Which input gradients are formed is decided as PyTorch decides it by ``requires_grad``:

- The input of an outermost ``forward`` call is data unless it is the output of
  another outermost ``forward`` (a user chaining layers by hand): its ``backward``
  adds the parameters' gradients and returns None, without the first layer's
  ``dy W`` product. ``forward(x, train, input_grad=True)`` asks for ``dL/dx``.
- Inside a module (a forward called from another forward) a child's input is an
  activation, and its ``backward`` returns ``dL/dx`` as always; a container may
  still ask a child's closure for ``backward(dy, need_input_grad=False)``.

Layers need none of this: a subclass's ``forward(x, train)`` always builds a
closure that returns ``dL/dx``; :class:`Module` wraps every subclass's ``forward``
to apply the rule above. A closure marked with :func:`input_grad_optional` can
skip ``dL/dx`` itself (the built-in layers' can); an unmarked one (a user's layer)
computes it and the wrapper drops it.
"""

from __future__ import annotations

import contextvars
import functools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..backend import Backend, BackendMismatchError, backend_of, get_backend, to_backend
from ..backend.base import Array
from ..backend.registry import _by_type as _BACKEND_BY_TYPE

Backward = Callable[..., Array]

#: Set on a backward closure that also takes ``need_input_grad=False``: it then still adds its
#: parameters' gradients but skips computing ``dL/dx`` and returns None.
INPUT_GRAD_OPTIONAL = "deepcore_input_grad_optional"


def input_grad_optional(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``backward`` as accepting ``need_input_grad`` (see :data:`INPUT_GRAD_OPTIONAL`)."""
    setattr(backward, INPUT_GRAD_OPTIONAL, True)
    return backward


def takes_input_grad_flag(backward: Callable[..., Any]) -> bool:
    return getattr(backward, INPUT_GRAD_OPTIONAL, False)


#: How many ``forward`` calls are running in this context: 0 outside any module.
_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("deepcore_forward_depth", default=0)
#: Outputs of outermost forward calls still alive, by id: an input found here is an activation.
_OUTPUTS: dict[int, weakref.ref[Any]] = {}


class _OutputRef(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to an outermost output that knows its key in ``_OUTPUTS``: one shared
    callback instead of a closure built per forward call."""

    __slots__ = ("key",)


def _forget(ref: _OutputRef) -> None:
    if _OUTPUTS.get(ref.key) is ref:
        del _OUTPUTS[ref.key]


def _remember_output(y: Any) -> None:
    try:
        ref = _OutputRef(y, _forget)
    except TypeError:  # an array type without weak references: its outputs count as data
        return
    ref.key = key = id(y)
    _OUTPUTS[key] = ref


def _is_output(x: Any) -> bool:
    ref = _OUTPUTS.get(id(x))
    return ref is not None and ref() is x


def _params_only(backward: Callable[..., Any]) -> Callable[..., Any]:
    """``backward`` returning None instead of ``dL/dx`` unless called with ``need_input_grad=True``."""
    if takes_input_grad_flag(backward):
        def params_only(dy: Array, *, need_input_grad: bool = False) -> Array | None:
            return backward(dy, need_input_grad=need_input_grad)
    else:
        def params_only(dy: Array, *, need_input_grad: bool = False) -> Array | None:
            dx = backward(dy)
            return dx if need_input_grad else None
    return input_grad_optional(params_only)


def _forward_entry(impl: Callable[..., tuple[Array, Backward]]) -> Callable[..., tuple[Array, Backward]]:
    """Wrap a subclass's ``forward(x, train)`` with the input-gradient rule of this module's docstring."""

    @functools.wraps(impl)
    def forward(self: Module, x: Array, train: bool = False, *,
                input_grad: bool | None = None) -> tuple[Array, Backward]:
        depth = _DEPTH.get()
        token = _DEPTH.set(depth + 1)
        try:
            y, backward = impl(self, x, train)
        finally:
            _DEPTH.reset(token)
        if depth == 0:
            if input_grad is None:
                input_grad = _is_output(x)
            _remember_output(y)
        if input_grad is False:
            return y, _params_only(backward)
        return y, backward

    _ENTRY_IMPL[forward] = impl
    return forward


#: Each wrapper ``_forward_entry`` made -> the subclass's own ``forward(x, train)``, which a container
#: inside a forward call (where the wrapper would only count the depth) calls directly. Keyed by the
#: wrapper itself, not marked by an attribute on it, since ``functools.wraps`` copies attributes: a
#: user's own ``forward`` decorated with ``wraps(nn.ReLU.forward)`` must neither be skipped nor unwrapped.
_ENTRY_IMPL: dict[Callable[..., Any], Callable[..., tuple[Array, Backward]]] = {}


def inner_forward(layer: Module, x: Array, train: bool) -> tuple[Array, Backward]:
    """``layer.forward(x, train=train)`` for a container's child, called from inside the container's
    own ``forward`` (the depth is already above zero, so the entry wrapper would change nothing):
    the layer's own ``forward`` directly, without the wrapper, unless the instance overrides it."""
    impl = _ENTRY_IMPL.get(type(layer).forward)
    if impl is None or "forward" in layer.__dict__:
        return layer.forward(x, train=train)
    return impl(layer, x, train)


class Param:
    """A trainable array: ``value``, and ``grad`` (same shape and dtype, None until a backward pass)."""

    __slots__ = ("value", "grad", "name")

    def __init__(self, value: Array, name: str = "") -> None:
        self.value = value
        self.grad: Array | None = None
        self.name = name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self) -> Any:
        return self.value.dtype

    def zero_grad(self) -> None:
        """Forget the gradient (``grad = None``, as PyTorch's ``set_to_none=True``)."""
        self.grad = None

    def accumulate_grad(self, g: Array, backend: Backend) -> None:
        """Add ``g`` into ``grad``, cast to the parameter's dtype.

        ``g`` must be a fresh array the caller no longer uses: the first
        contribution is adopted without a copy.
        """
        if self.grad is None:
            dtype = self.value.dtype
            self.grad = g if g.dtype == dtype else backend.astype(g, dtype)
        else:
            self.grad = backend.add_into(self.grad, g)

    def __repr__(self) -> str:
        return f"Param(name={self.name!r}, shape={self.shape}, dtype={self.dtype})"


class Module:
    """Base class of every layer: parameters, buffers, children, state and device moves.

    Subclasses implement ``forward(x, train=False) -> (y, backward)``. Assigning
    a :class:`Param` or a :class:`Module` to an attribute registers it;
    ``register_buffer`` registers state that is saved but not trained
    (BatchNorm's running statistics).
    """

    _params: dict[str, Param]
    _buffers: dict[str, Array]
    _children: dict[str, Module]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        impl = cls.__dict__.get("forward")
        if impl is not None and impl not in _ENTRY_IMPL:
            cls.forward = _forward_entry(impl)  # type: ignore[method-assign]

    def __init__(self) -> None:
        object.__setattr__(self, "_params", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_children", {})

    # ----------------------------------------------------------- registration
    def __setattr__(self, name: str, value: Any) -> None:
        if "_params" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() before setting {name!r}")
        if name in self._buffers and hasattr(value, "shape") and not isinstance(value, (Param, Module)):
            self._buffers[name] = value  # as PyTorch: assigning to a buffer's name replaces the buffer
            object.__setattr__(self, name, value)
            return
        for table in (self._params, self._children, self._buffers):
            table.pop(name, None)
        if isinstance(value, Param):
            value.name = value.name or name
            self._params[name] = value
        elif isinstance(value, Module):
            self._children[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, value: Array) -> None:
        """Register ``value`` as state that is saved and moved with the module but not trained
        (BatchNorm's running statistics). Later ``self.name = new`` replaces the buffer."""
        if name in self._params or name in self._children:
            raise KeyError(f"register_buffer: {name!r} is already a parameter or submodule of "
                           f"{type(self).__name__}")
        self._buffers[name] = value
        object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ calls
    def forward(self, x: Array, train: bool = False, *, input_grad: bool | None = None) -> tuple[Array, Backward]:
        """``(y, backward)``; ``input_grad`` says whether ``backward(dy)`` returns ``dL/dx`` (default: only
        for an activation, see the module docstring). Subclasses define ``forward(x, train)``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward(x, train)")

    def __call__(self, x: Array) -> Array:
        """Inference: ``forward(x, train=False)[0]``."""
        return self.forward(x, train=False)[0]

    # ------------------------------------------------------------ traversal
    def children(self) -> Iterator[Module]:
        return iter(self._children.values())

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Param]]:
        """Every parameter by dotted path (``"0.weight"``), this module's first; ``prefix`` goes in front."""
        for path, module in self.named_modules(prefix):
            for name, p in module._params.items():
                yield (f"{path}.{name}" if path else name), p

    def parameters(self) -> list[Param]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Array]]:
        """Every buffer by dotted path (``"1.running_mean"``), in the order of :meth:`named_modules`."""
        for path, module in self.named_modules(prefix):
            for name, b in module._buffers.items():
                yield (f"{path}.{name}" if path else name), b

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module (named ``prefix``, ``""`` by default) and every submodule, by dotted path."""
        yield prefix, self
        for cname, child in self._children.items():
            yield from child.named_modules(f"{prefix}.{cname}" if prefix else cname)

    def set_buffers(self, values: dict[str, Array]) -> None:
        """Replace buffers by dotted name with the given arrays themselves (no copy, no conversion;
        :meth:`load_state_dict` converts). Every name is checked before any buffer changes."""
        owners = {(f"{path}.{bname}" if path else bname): (module, bname)
                  for path, module in self.named_modules() for bname in module._buffers}
        unknown = sorted(set(values) - set(owners))
        if unknown:
            raise KeyError(f"set_buffers: no buffer named {unknown}; buffers: {sorted(owners)}")
        for name, value in values.items():
            module, bname = owners[name]
            setattr(module, bname, value)

    def snapshot(self) -> ModuleSnapshot:
        """What :meth:`restore` puts back: every parameter's value and grad, every buffer and the
        extra states, as references (no copies). That undoes anything that replaces arrays (a
        forward pass's buffer updates, :meth:`load_state_dict`, :meth:`to`), not in-place writes
        such as an optimizer step."""
        # One walk for all three (fit takes a snapshot every step); the same contents and order as
        # parameters(), named_buffers() and extra_states().
        params: list[tuple[Param, Array, Array | None]] = []
        buffers: dict[str, Array] = {}
        extra: dict[str, Any] = {}
        for path, m in self.named_modules():
            for p in m._params.values():
                params.append((p, p.value, p.grad))
            for name, b in m._buffers.items():
                buffers[f"{path}.{name}" if path else name] = b
            if (st := m.get_extra_state()) is not None:
                extra[path] = st
        return ModuleSnapshot(params, buffers, extra)

    def restore(self, snapshot: ModuleSnapshot) -> None:
        """Put back what :meth:`snapshot` took."""
        for p, value, grad in snapshot.params:
            p.value, p.grad = value, grad
        self.set_buffers(snapshot.buffers)
        self.load_extra_states(snapshot.extra_states)

    def get_extra_state(self) -> Any:
        """JSON-able state outside arrays (a random stream's position); None when there is none."""
        return None

    def set_extra_state(self, state: Any) -> None:
        raise TypeError(f"{type(self).__name__} has no extra state to set")

    def extra_states(self) -> dict[str, Any]:
        """``get_extra_state()`` of every submodule that has one, by dotted path ('' for self)."""
        return {path: st for path, m in self.named_modules() if (st := m.get_extra_state()) is not None}

    def load_extra_states(self, states: dict[str, Any]) -> None:
        owners = dict(self.named_modules())
        unknown = sorted(set(states) - set(owners))
        if unknown:
            raise KeyError(f"load_extra_states: no submodule at {unknown}")
        for path, st in states.items():
            owners[path].set_extra_state(st)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.zero_grad()

    @property
    def backend(self) -> Backend:
        """The backend holding this module's parameters (the default backend if it has none)."""
        for p in self.parameters():
            return get_backend(p.value)
        for _, b in self.named_buffers():
            return get_backend(b)
        return get_backend()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Array]:
        """Parameters and buffers by dotted name (the arrays themselves, not copies)."""
        state = {name: p.value for name, p in self.named_parameters()}
        state.update(self.named_buffers())
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Copy values into this module, converting backend and dtype to the current ones.

        Everything is checked (names, shapes) before anything is assigned, so a
        failed load leaves the module as it was.
        """
        if not isinstance(state, dict):
            raise TypeError(f"load_state_dict: state must be a dict of arrays, got {type(state).__name__}")
        current = self.state_dict()
        missing = sorted(set(current) - set(state))
        unexpected = sorted(set(state) - set(current))
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        converted = {}
        for name, old in current.items():
            if name not in state:
                continue
            new = state[name]
            new_shape = tuple(getattr(new, "shape", ()))
            if new_shape != tuple(old.shape):
                raise ValueError(
                    f"load_state_dict: {name!r} has shape {new_shape} in the state but {tuple(old.shape)} in the model"
                )
            target = get_backend(old)
            value = to_backend(new, target, device=target.device(old)) if not _is_same(new, target) else new
            # On the parameter's own device, whichever device is current.
            converted[name] = target.xp.asarray(target.astype(value, old.dtype), copy=True, device=target.device(old))
        params = dict(self.named_parameters())
        for name, value in converted.items():
            if name in params:
                params[name].value = value
        self.set_buffers({name: value for name, value in converted.items() if name not in params})

    def to(self, target: Any = None, *, dtype: Any = None, device: Any = None) -> Module:
        """Move parameters, gradients and buffers to ``target`` (a backend name, module or Backend)
        and/or cast floating ones to ``dtype`` (a name like ``"float64"`` or a dtype). Returns self."""
        dst = get_backend(target) if target is not None else self.backend
        if dtype is not None and isinstance(dtype, str):
            dtype = dst.dtype_from_name(dtype)

        def move(a: Array, cast: bool) -> Array:
            a = to_backend(a, dst, device=device)
            if cast and dtype is not None and dst.is_floating(a):
                a = dst.astype(a, dtype)
            return a

        moved_params = [(p, move(p.value, True), None if p.grad is None else move(p.grad, True))
                        for p in self.parameters()]
        moved_buffers = {name: move(b, True) for name, b in self.named_buffers()}
        for p, value, grad in moved_params:
            p.value, p.grad = value, grad
        self.set_buffers(moved_buffers)
        return self

    # ------------------------------------------------------------------ repr
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        if not self._children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"  ({name}): " + repr(child).replace("\n", "\n  ") for name, child in self._children.items()]
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"


@dataclass(frozen=True)
class ModuleSnapshot:
    """A module's state by reference: ``params`` as ``(Param, value, grad)``, ``buffers`` by
    dotted name, ``extra_states`` as :meth:`Module.extra_states` gives them."""

    params: list[tuple[Param, Array, Array | None]]
    buffers: dict[str, Array]
    extra_states: dict[str, Any]


def _is_same(value: Any, backend: Backend) -> bool:
    try:
        return get_backend(value) is backend
    except TypeError:
        return False


def input_backend(layer: Module, x: Array, *params: Param) -> Backend:
    """The backend running ``layer`` on ``x``: checks that ``x`` is a floating-point array on the
    same backend and device as the layer's parameters, with errors that say what to do."""
    array_type = type(x)
    backend = _BACKEND_BY_TYPE.get(array_type)
    if backend is not None and backend.single_device and backend.is_floating(x):
        for p in params:
            if type(p.value) is not array_type:
                break
        else:
            return backend  # the usual case, in a dictionary look-up
    try:
        backend = backend_of(x, *[p.value for p in params])
    except (BackendMismatchError, TypeError):
        # Again with the arguments' names, only now that the message needs them.
        backend = backend_of(x, *[p.value for p in params], names=("x",) + tuple(p.name for p in params))
    if not backend.is_floating(x):
        raise TypeError(
            f"{type(layer).__name__}: input x must be a floating-point array, got dtype {x.dtype}; "
            f"cast it first, e.g. xp.astype(x, xp.float32)"
        )
    return backend


def check_grad_shape(layer: Module, dy: Array, expected: tuple[int, ...]) -> None:
    if tuple(dy.shape) != tuple(expected):
        raise ValueError(
            f"{type(layer).__name__} backward: dy must have the output's shape {tuple(expected)}, got {tuple(dy.shape)}"
        )
