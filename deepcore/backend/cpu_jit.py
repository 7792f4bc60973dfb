"""Optional fused CPU loops for the NumPy backend, compiled with numba (``pip install deepcore[jit]``).

NumPy runs SGD's momentum step ``buf = μ buf + g; value -= lr buf`` as four passes over memory
(``buf *= μ``, ``buf += g``, ``t = -lr buf``, ``value += t``), with weight decay or Nesterov
momentum as six or more, and Adam's step as about twelve; a parameter larger than the cache
streams from memory on each. One compiled loop reads and writes each array once, with NumPy's own
rounded operations per element (the same bits). Loops: SGD's plain momentum step
(:func:`sgd_momentum`), its step with weight decay, dampening or Nesterov momentum (:func:`sgd`)
and without momentum (:func:`sgd_plain`), Adam's (L2 or decoupled decay),
RMSprop's and Adagrad's. Through the backend's calls, on the EPYC of benchmarks/README.md
(``benchmarks/fused_updates.py``): SGD momentum 0.71x NumPy's one-pass time at 65,536 float32
weights, 0.58x at 200,704, 0.41x at 3.1M (0.50x the blocked form's, which the NumPy backend timed
faster there); Adam 0.41x, 0.36x and 0.20x; the other loops in benchmarks/README.md.

numba is never imported by ``import deepcore``, nor by a short run: the NumPy backend runs the
NumPy forms of the updates a loop could take (parameters of at least
``numpy_backend._FUSED_MIN`` weights, arrays the loops can take) and charges their time here
until it reaches :data:`LOAD_AFTER_S`, about what the load costs (0.9-1.0 s in a fresh process
on that EPYC: 0.3-0.4 s to import numba, the rest numba's own start); then the next such update
imports numba and runs fused, with the same bits. ``DEEPCORE_JIT=1`` loads at the first such
update, :func:`preload` at once (the benchmarks), ``DEEPCORE_JIT=0`` never. Each loop is compiled
when first asked for (about 10 ms from numba's on-disk cache, half a second the first time on a
machine), so a process loads only the loops its optimizer uses. Where the loops cannot be
had (numba not installed or refusing this NumPy, ``DEEPCORE_JIT=0``), each function returns
None (where one loop failed to compile, that loop's), the NumPy forms run, and :func:`status`
keeps the reason (``deepcore info`` prints it). numba imports SciPy where it is installed (a
version check), and with it SciPy's own OpenBLAS, idle but with its own thread pool. Unlike
NumPy's operations the loops report no floating-point errors: ``np.errstate`` / ``np.seterr``
settings (raise or warn on overflow, invalid) do not reach a fused step, which returns inf or NaN
as PyTorch's does.

One loop is not NumPy's bits: softmax cross-entropy's (:func:`softmax_cross_entropy`), whose exp
and log are the C library's and whose row sums and logs are float64. It runs only where
``DEEPCORE_JIT=1`` asks for numba from the first call (then numba loads at the first loss), never
once the load budget brings numba in part-way through a run: a run with the variable unset keeps
NumPy's loss throughout, and a repeated or resumed run with the same setting gives the same bits.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

#: The kernels' module once loaded; None before the first try or where it failed.
_kernels: Any = None
#: Why the kernels are unavailable ("" while untried or loaded).
_reason = ""
_tried = False
#: The loops whose compile failed (the others still run).
_broken: set[str] = set()
_lock = threading.Lock()

#: Seconds the NumPy forms may spend on updates a loop could take before numba is loaded: about
#: what loading it costs (0.9-1.0 s in a fresh process on the EPYC of benchmarks/README.md). The
#: ski-rental rule: a run whose updates never take that long never pays for numba (a 10-epoch MNIST
#: MLP with SGD momentum would save 0.3 s for its 1 s), and a long one pays at most twice what the
#: better choice in hindsight would have; the bits are the same either way.
LOAD_AFTER_S = 1.0
#: The NumPy forms' time so far on updates a loop could take (seconds), while nothing is loaded.
_spent = 0.0
#: ``DEEPCORE_JIT`` as read at the first use: "off", "on" (load at the first chance) or "auto".
_mode = ""


def _flag() -> str:
    return os.environ.get("DEEPCORE_JIT", "").strip().lower()


def _disabled() -> str:
    return f"disabled by DEEPCORE_JIT={os.environ['DEEPCORE_JIT']}" if _flag() in ("0", "false", "off", "no") else ""


def eager() -> bool:
    """Whether ``DEEPCORE_JIT`` asks for the loops from the first step (1, true, on, yes)."""
    return _flag() in ("1", "true", "on", "yes")


def wanted() -> bool:
    """Whether an update a loop can take should run fused now (the caller then asks for the loop,
    which loads numba if need be): the loops are loaded; or not tried yet and the NumPy forms have
    spent :data:`LOAD_AFTER_S` (``DEEPCORE_JIT=1``: at once; ``=0``: the load records why not)."""
    if _tried:
        return _kernels is not None
    return (_mode or _read_mode()) != "auto" or _spent >= LOAD_AFTER_S


def _read_mode() -> str:
    global _mode
    _mode = "off" if _disabled() else "on" if eager() else "auto"
    return _mode


#: The loops whose results are not NumPy's bits: run only under DEEPCORE_JIT=1 (see the module's docstring).
_FROM_THE_START = frozenset({"softmax_cross_entropy"})


def preload() -> bool:
    """Import numba and compile every loop that can run now (the loss loop only under
    ``DEEPCORE_JIT=1``), rather than once the NumPy forms have spent
    :data:`LOAD_AFTER_S`: for benchmarks that time the steady state of a long run (and pin the
    thread pools numba's compile brings, SciPy's OpenBLAS, afterwards). True where the loops are
    available."""
    kernels = _load()
    if kernels is None:
        return False
    on = (_mode or _read_mode()) == "on"
    for name in kernels._SOURCES:
        if on or name not in _FROM_THE_START:  # (a loop that will not run is not compiled)
            _loop(name)
    return True


def charge(seconds: float) -> None:
    """Count ``seconds`` of a NumPy form's update that a loop could have taken (see :data:`LOAD_AFTER_S`)."""
    global _spent
    _spent += seconds


def _load() -> Any:
    """The loops' module, imported on the first call (numba with it; each loop compiles when first
    asked for), or None with the reason kept. ``DEEPCORE_JIT`` is read then, once."""
    global _kernels, _reason, _tried
    if _tried:
        return _kernels
    with _lock:  # another thread's first call waits for this load rather than run without it
        if _tried:
            return _kernels
        reason = _disabled()
        if not reason:
            try:
                from . import cpu_jit_kernels
            except ImportError as e:  # numba missing, or an installed numba that refuses this NumPy
                reason = f"numba unavailable: {e}"
            except Exception as e:  # noqa: BLE001  # numba present but failing on import: NumPy still works
                reason = f"numba failed to load: {type(e).__name__}: {e}"
            else:
                _kernels = cpu_jit_kernels
        # Only an outcome is recorded: interrupted (KeyboardInterrupt), the next call tries again.
        _reason, _tried = reason, True
    return _kernels


def ruled_out() -> bool:
    """True once a load was tried and gave no kernels: callers then skip even their cheap checks."""
    return _tried and _kernels is None


def _loop(name: str) -> Callable[..., Any] | None:
    """The compiled loop ``name``, or None where the loops are unavailable or this one failed to
    compile (its reason kept). The first call imports numba; each loop compiles on its first call."""
    kernels = _load()
    if kernels is None:
        return None
    compiled = kernels._COMPILED.get(name)
    if compiled is not None:
        return compiled
    global _reason
    with _lock:  # one thread compiles, another's first call waits for it
        if name in _broken:
            return None
        try:
            return kernels.loop(name)
        except Exception as e:  # noqa: BLE001  # a compile that failed: NumPy still works
            _broken.add(name)
            _reason = f"numba failed to compile the {name} loop: {type(e).__name__}: {e}"
            return None


def sgd_momentum() -> Callable[..., None] | None:
    """The fused momentum loop ``(value, grad, buf, momentum, neg_lr, tiny, flush)`` over 1-D
    C-contiguous float32 or float64 arrays of one dtype (scalars of that dtype), or None where the
    loops are unavailable (see :func:`status`). The first call imports numba."""
    return _loop("sgd_momentum")


def sgd() -> Callable[..., None] | None:
    """SGD's fused steady step with weight decay, dampening or Nesterov momentum (see
    ``cpu_jit_kernels.sgd``), or None."""
    return _loop("sgd")


def sgd_plain() -> Callable[..., None] | None:
    """SGD's fused step without momentum (see ``cpu_jit_kernels.sgd_plain``), or None."""
    return _loop("sgd_plain")


def adam() -> Callable[..., None] | None:
    """The fused Adam loop (see ``cpu_jit_kernels.adam``), or None."""
    return _loop("adam")


def rmsprop() -> Callable[..., None] | None:
    """The fused RMSprop loop (see ``cpu_jit_kernels.rmsprop``), or None."""
    return _loop("rmsprop")


def adagrad() -> Callable[..., None] | None:
    """The fused Adagrad loop (see ``cpu_jit_kernels.adagrad``), or None."""
    return _loop("adagrad")


def softmax_cross_entropy() -> Callable[..., bool] | None:
    """The fused softmax cross-entropy loop (see ``cpu_jit_kernels.softmax_cross_entropy``) where
    ``DEEPCORE_JIT=1`` asks for numba from the first call, else None (the module's docstring says
    why only then)."""
    if (_mode or _read_mode()) != "on":
        return None
    return _loop("softmax_cross_entropy")


def status() -> dict[str, Any]:
    """What the loader has found, without trying: ``{"tried", "loaded", "reason"}``; before the first
    try ``reason`` says whether ``DEEPCORE_JIT`` will turn the loops off, after it why they are off
    ("" when loaded, unless a loop then failed to compile)."""
    return {"tried": _tried, "loaded": _kernels is not None, "reason": _reason if _tried else _disabled()}


def reset() -> None:
    """Forget the outcome, the time spent and ``DEEPCORE_JIT`` so the next use decides again (after
    installing numba, or in tests)."""
    global _kernels, _reason, _tried, _spent, _mode
    with _lock:
        _kernels, _reason, _tried, _spent, _mode = None, "", False, 0.0, ""
        _broken.clear()
