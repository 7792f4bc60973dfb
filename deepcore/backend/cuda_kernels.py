"""Host side of deepcore's hand-written CUDA kernels (compiled at run time by NVRTC through CuPy).

The fused softmax cross-entropy is PyTorch's ``cross_entropy`` with class weights
``w``, label smoothing ``eps`` and ``ignore_index``; per row
``L = (1-eps) w_y (lse - s_y) + (eps/C) sum_k w_k (lse - s_k)`` and
``dL/ds_k = p_k ((1-eps) w_y + (eps/C) sum_j w_j) - (1-eps) w_y [k==y] - (eps/C) w_k``;
"mean" divides both by ``sum w_y`` over the rows that are not ignored.

CuPy is imported inside the functions only, so this module imports (and
``tools/check_kernels.py`` can read :data:`KERNEL_INSTANCES`) on machines
without CuPy or a GPU.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy

__all__ = [
    "BLOCK_KERNEL_THREADS",
    "CONV_CTYPES",
    "CONV_KERNELS",
    "CONV_NAME_EXPRESSIONS",
    "CONV_SOURCE",
    "KERNEL_INSTANCES",
    "SCE_NAME_EXPRESSIONS",
    "WARP_KERNEL_MAX_CLASSES",
    "WARP_KERNEL_THREADS",
    "fused_softmax_cross_entropy",
    "kernel_source",
    "launch_softmax_cross_entropy",
]

SCE_SOURCE = "softmax_cross_entropy.cu"

# Logits dtype name -> CUDA type, and labels dtype name -> CUDA type.
_LOGIT_CTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
_LABEL_CTYPES = {"int32": "int", "int64": "long long"}
_SCE_KERNELS = ("sce_warp_per_row", "sce_block_per_row")

SCE_NAME_EXPRESSIONS: tuple[str, ...] = tuple(
    f"{kernel}<{t}, {lab}>"
    for kernel in _SCE_KERNELS
    for t in _LOGIT_CTYPES.values()
    for lab in _LABEL_CTYPES.values()
)

# The im2col / col2im and pooling kernels that conv_kernels.py launches, each over
# these element types. Listed here rather than there because this registry must
# not import conv_kernels.py (which imports kernel_source from this module).
CONV_SOURCE = "conv2d.cu"
CONV_CTYPES = {"float32": "float", "float64": "double", "float16": "__half", "bfloat16": "__nv_bfloat16"}
CONV_KERNELS = ("im2col", "col2im", "max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward",
                "avg_pool2d_backward")
CONV_NAME_EXPRESSIONS: tuple[str, ...] = tuple(f"{k}<{t}>" for k in CONV_KERNELS for t in CONV_CTYPES.values())

# Every template instance the host code may launch, per source file. NVRTC only
# emits the instances named here, and tools/check_kernels.py compiles exactly
# these with nvcc, so a new instance must be added here to be checked at all.
KERNEL_INSTANCES: dict[str, tuple[str, ...]] = {SCE_SOURCE: SCE_NAME_EXPRESSIONS, CONV_SOURCE: CONV_NAME_EXPRESSIONS}

# Must equal sce::kWarpKernelThreads / sce::kBlockKernelThreads in the .cu:
# __launch_bounds__ there promises ptxas these sizes, and a larger launch fails.
# 256 threads = 8 rows per block in the warp kernel: enough warps for a block
# to hide latency without leaving a tail of idle warps when N is small.
WARP_KERNEL_THREADS = 256
# 512 threads per row keep ~16 KiB of 16-byte loads in flight per block for
# vocabulary-sized rows while three blocks still fit on an SM.
BLOCK_KERNEL_THREADS = 512
# Up to here a row is at most 32 elements per lane, so a warp owns it cheaply;
# wider rows would serialize on one warp, and a whole block pays for its
# shared-memory reduction and barriers.
WARP_KERNEL_MAX_CLASSES = 1024
# Both kernels loop over rows with a grid stride, so any cap is correct; this
# one keeps the grid well inside CUDA's limits for any N.
_MAX_GRID = 1 << 20

_REDUCTIONS = ("mean", "sum", "none")


def kernel_source(name: str) -> str:
    """Text of ``kernels/<name>``: from the installed package (wheels ship the
    folder as ``deepcore/kernels``), else from the repository's top-level
    ``kernels/`` in a source or editable checkout."""
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise ValueError(f"kernel_source takes a bare file name, got {name!r}")
    try:
        resource = importlib.resources.files("deepcore").joinpath("kernels").joinpath(name)
        if resource.is_file():
            return resource.read_text(encoding="utf-8")
    except (ImportError, OSError, TypeError):
        pass  # no installed copy: fall through to the checkout
    path = Path(__file__).resolve().parents[2] / "kernels" / name
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise FileNotFoundError(f"CUDA kernel source {name!r} is neither in package deepcore/kernels nor at {path}")


#: (source, name expression, device id) -> the loaded kernel.
_COMPILED: dict[tuple[str, str, int], Any] = {}


def compiled_function(source: str, name_expression: str) -> Any:
    """The kernel ``name_expression`` of ``kernels/<source>`` on the current device: NVRTC builds a
    module holding that one instance on first use (a run needs a few of a file's instances, and all
    twelve of the softmax-cross-entropy's took 2.2 s against 0.2 s for one), loaded once per device
    because a loaded module belongs to the device that loaded it."""
    import cupy

    if name_expression not in KERNEL_INSTANCES.get(source, ()):
        raise KeyError(f"{name_expression!r} is not a kernel of {source}; have {KERNEL_INSTANCES.get(source)}")
    key = (source, name_expression, cupy.cuda.Device().id)
    function = _COMPILED.get(key)
    if function is None:
        # -std=c++17 matches tools/check_kernels.py, so the CI compile check sees the
        # same language the run-time compile does.
        module = cupy.RawModule(code=kernel_source(source), options=("-std=c++17",),
                                name_expressions=[name_expression])
        function = _COMPILED[key] = module.get_function(name_expression)
    return function


def _sce_function(name_expression: str) -> Any:
    return compiled_function(SCE_SOURCE, name_expression)


def fused_softmax_cross_entropy(
    logits: Any,
    labels: Any,
    *,
    class_weights: Any | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> tuple[Any, Any]:
    """Loss and d(loss)/d(logits) of PyTorch's ``cross_entropy`` in one fused pass.

    ``L_i = (1-eps) w_y (lse_i - s_iy) + (eps/C) sum_k w_k (lse_i - s_ik)``, summed
    ("sum"), kept per row ("none") or divided by ``sum w_y`` over non-ignored rows
    ("mean"); ``grad = dL/ds`` for that reduction. A label outside ``[0, C)``
    that is not ``ignore_index`` gives NaN for its row (and for "mean").

    ``logits`` is a 2-D CuPy array of float32, float16 or bfloat16, ``labels`` a
    1-D integer array. Returns ``(loss, grad)`` on the device without waiting
    for it: ``loss`` is 0-d (or per row for "none") and ``grad`` has the shape
    and dtype of ``logits``; ``logits`` is left unchanged.
    """
    import cupy

    return launch_softmax_cross_entropy(
        cupy, _sce_function, logits, labels, class_weights=class_weights, ignore_index=ignore_index,
        label_smoothing=label_smoothing, reduction=reduction,
    )


def launch_softmax_cross_entropy(
    xp: Any,
    get_function: Callable[[str], Any],
    logits: Any,
    labels: Any,
    *,
    class_weights: Any | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> tuple[Any, Any]:
    """:func:`fused_softmax_cross_entropy` with the array module and the kernels passed in.

    ``xp`` is ``cupy``, and ``get_function(name_expression)`` returns the
    compiled kernel. The tests pass ``numpy`` and the CPU emulator's kernels
    (tools/cuda_emulator) here, so everything on the host side (checks, the
    mean's denominator, launch shapes, reductions) runs without a GPU exactly
    as it does with one.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {logits.shape}")
    logit_ctype = _LOGIT_CTYPES.get(logits.dtype.name)
    if logit_ctype is None:
        raise TypeError(f"fused softmax cross-entropy supports {tuple(_LOGIT_CTYPES)}, got {logits.dtype}")
    n_rows, n_classes = (int(d) for d in logits.shape)
    if labels.ndim != 1 or int(labels.shape[0]) != n_rows:
        raise ValueError(f"labels must have shape ({n_rows},), got {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    if n_classes >= 2**31:
        raise ValueError(f"at most 2**31 - 1 classes are supported, got {n_classes}")

    logits = xp.ascontiguousarray(logits)
    if labels.dtype.name not in _LABEL_CTYPES:
        labels = labels.astype(xp.int64)  # uint64 above 2**63 wraps negative: still "out of range"
    labels = xp.ascontiguousarray(labels)
    label_ctype = _LABEL_CTYPES[labels.dtype.name]

    weights = None
    if class_weights is not None:
        weights = xp.ascontiguousarray(class_weights, dtype=xp.float32)
        if weights.shape != (n_classes,):
            raise ValueError(f"class_weights must have shape ({n_classes},), got {weights.shape}")

    # The kernel compares every label with ignore_index; when disabled, pass an
    # int64 that no real label is (only a label of exactly -2**63 would match).
    ignore = numpy.int64(numpy.iinfo(numpy.int64).min if ignore_index is None else int(ignore_index))

    if reduction == "mean":
        # The denominator is sum w_y over the rows, but the gradient pass already
        # needs 1/denominator, so it comes from the labels alone, on the device:
        # w_y (1 without weights), 0 for ignored rows, NaN for labels outside
        # [0, C) so that a bad label also shows in "mean".
        in_range = (labels >= 0) & (labels < n_classes)
        if weights is not None and n_classes > 0:
            w_y = weights[xp.clip(labels, 0, n_classes - 1)]
        else:
            w_y = xp.ones(n_rows, dtype=xp.float32)
        w_y = xp.where(in_range, w_y, numpy.float32("nan"))
        if ignore_index is not None:
            w_y = xp.where(labels == ignore, numpy.float32(0.0), w_y)
        denominator = w_y.sum(dtype=xp.float32)
        # Every row ignored: 1/0 = inf and a NaN mean, as in PyTorch. errstate
        # only matters to NumPy, when the tests run this with the CPU emulator.
        with numpy.errstate(divide="ignore", invalid="ignore"):
            scale = xp.reciprocal(denominator.reshape(1))
    else:
        scale = xp.ones(1, dtype=xp.float32)

    # The kernel could write grad over logits (it is alias-safe), but logits may
    # be the caller's array, so the gradient always gets its own buffer.
    grad = xp.empty_like(logits)
    loss_row = xp.empty(n_rows, dtype=xp.float32)

    if n_rows > 0:
        if n_classes <= WARP_KERNEL_MAX_CLASSES:
            kernel, threads = "sce_warp_per_row", WARP_KERNEL_THREADS
            rows_per_block = WARP_KERNEL_THREADS // 32
            blocks = min(-(-n_rows // rows_per_block), _MAX_GRID)
        else:
            kernel, threads = "sce_block_per_row", BLOCK_KERNEL_THREADS
            blocks = min(n_rows, _MAX_GRID)
        get_function(f"{kernel}<{logit_ctype}, {label_ctype}>")(
            (blocks,),
            (threads,),
            (
                logits,
                labels,
                # A 64-bit zero is the kernel's "no class weights" null pointer.
                weights if weights is not None else numpy.uint64(0),
                scale,
                grad,
                loss_row,
                numpy.int64(n_rows),
                numpy.int32(n_classes),
                ignore,
                numpy.float32(eps),
            ),
        )

    if reduction == "none":
        return loss_row.astype(logits.dtype), grad
    total = loss_row.sum(dtype=xp.float32)
    if reduction == "mean":
        with numpy.errstate(invalid="ignore"):
            total = total * scale[0]
    return total.astype(logits.dtype), grad
