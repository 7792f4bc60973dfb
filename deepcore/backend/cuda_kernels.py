"""Host side of deepcore's hand-written CUDA kernels (compiled at run time by NVRTC through CuPy).

The fused softmax cross-entropy is PyTorch's ``cross_entropy`` with class weights
``w``, label smoothing ``eps`` and ``ignore_index``; per row
``L = (1-eps) w_y (lse - s_y) + (eps/C) sum_k w_k (lse - s_k)`` and
``dL/ds_k = p_k ((1-eps) w_y + (eps/C) sum_j w_j) - (1-eps) w_y [k==y] - (eps/C) w_k``;
"mean" divides both by ``sum w_y`` over the rows that are not ignored.

Each call is one kernel launch (``plan_softmax_cross_entropy`` picks which, see
``kernels/softmax_cross_entropy.cu``): the per-row losses, the mean's denominator,
the final sum or mean (deterministic: per-block partials summed in block order by
the last block) and the gradient. The host does nothing on the device but allocate.

CuPy is imported inside the functions only, so this module imports (and
``tools/check_kernels.py`` can read :data:`KERNEL_INSTANCES`) on machines
without CuPy or a GPU.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy

__all__ = [
    "CONV_CTYPES",
    "CONV_KERNELS",
    "CONV_NAME_EXPRESSIONS",
    "CONV_SOURCE",
    "INSTANCE_MIN_ARCH",
    "KERNEL_INSTANCES",
    "PORTABLE_SHARED_MEMORY",
    "SCE_CLUSTER_BLOCKS",
    "SCE_NAME_EXPRESSIONS",
    "SCE_THREADS",
    "ScePlan",
    "cluster_slice",
    "fused_softmax_cross_entropy",
    "kernel_source",
    "launch_softmax_cross_entropy",
    "plan_softmax_cross_entropy",
]

SCE_SOURCE = "softmax_cross_entropy.cu"

# Logits dtype name -> CUDA type, and labels dtype name -> CUDA type.
_LOGIT_CTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
_LABEL_CTYPES = {"int32": "int", "int64": "long long"}
_SCE_KERNELS = ("sce_on_chip", "sce_two_pass", "sce_cluster")

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

# Instances that exist only from an architecture on (as sm_NN's NN), everything else on every
# architecture deepcore targets: sce_cluster needs thread-block clusters (sm_90, Hopper). The
# .cu defines it only there; tools/check_kernels.py compiles it only for those targets, and the
# wrapper launches it only on a device of compute capability 9.0 or above.
INSTANCE_MIN_ARCH: dict[str, int] = {name: 90 for name in SCE_NAME_EXPRESSIONS if name.startswith("sce_cluster<")}

# Must equal sce::kThreads in the .cu: __launch_bounds__ there promises ptxas this
# size, and a larger launch fails. 512 threads keep 16-32 KiB of 16-byte loads in
# flight per block.
SCE_THREADS = 512
# Elements of a row per thread that sce_on_chip aims for: threads_per_row is the
# power of two at or above C / 8 (at most a block), so a tile of rows_per_tile =
# 512 / threads_per_row rows holds at most 4096 elements until a row needs the
# whole block. MNIST's C = 10 is 2 threads a row, 256 rows a block.
_ELEMENTS_PER_THREAD = 8
# Dynamic shared memory every CUDA device grants without opting in (48 KiB), less
# what the kernel's static shared memory takes (under 1 KiB, see _STATIC_SHARED).
_STATIC_SHARED = 1024
PORTABLE_SHARED_MEMORY = 48 * 1024 - _STATIC_SHARED
# sce_cluster: blocks per cluster (sce::kClusterBlocks, its __cluster_dims__), and the dynamic
# shared memory ahead of a block's slice of the row (sce::kClusterHeaderBytes).
SCE_CLUSTER_BLOCKS = 8
_CLUSTER_HEADER = 512
# Blocks of the grid: one tile (or row) per block up to CUDA's limit for "none";
# for "sum"/"mean", at most _MAX_PARTIALS blocks (each writes one partial, which
# the last block sums), the blocks looping over the tiles.
_MAX_GRID = 2**31 - 1
_MAX_PARTIALS = 4096
# "mean" with class weights or ignore_index: each block reduces all N labels, so the
# grid is kept to about C * itemsize / 16 blocks (the labels' bytes per block then
# stay within ~1/4 of the block's logit traffic, and they come from L2).
_LABEL_BYTES_PER_BLOCK_DIVISOR = 16

# The kernels' `reduction` argument (sce::kNone ... in the .cu).
_MODE_NONE, _MODE_SUM, _MODE_MEAN, _MODE_MEAN_OF_LABELS = 0, 1, 2, 3

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


#: device id -> the dynamic shared memory a kernel may opt in to on it.
_SHARED_OPTIN: dict[int, int] = {}


def _shared_optin() -> int:
    import cupy

    device = cupy.cuda.Device()
    limit = _SHARED_OPTIN.get(device.id)
    if limit is None:
        runtime = cupy.cuda.runtime
        attribute = getattr(runtime, "cudaDevAttrMaxSharedMemoryPerBlockOptin", 97)
        limit = _SHARED_OPTIN[device.id] = int(runtime.deviceGetAttribute(attribute, device.id))
    return limit


#: device id -> its compute capability as major * 10 + minor (90 on H100).
_COMPUTE_CAPABILITY: dict[int, int] = {}


def _compute_capability() -> int:
    import cupy

    device = cupy.cuda.Device()
    cc = _COMPUTE_CAPABILITY.get(device.id)
    if cc is None:
        cc = _COMPUTE_CAPABILITY[device.id] = int(device.compute_capability)  # CuPy's "90"
    return cc


#: id() of every kernel (kept alive by _COMPILED) that has opted in; CuPy's RawKernel takes no new attributes.
_OPTED_IN: set[int] = set()


def _sce_function(name_expression: str) -> Any:
    function = compiled_function(SCE_SOURCE, name_expression)
    if (name_expression.startswith(("sce_on_chip", "sce_cluster")) and id(function) not in _OPTED_IN
            and hasattr(function, "max_dynamic_shared_size_bytes")):
        # Opt in once to the device's whole shared memory (a launch with more than 48 KiB
        # of dynamic shared memory fails otherwise); the wrapper asks for at most
        # _shared_optin() - _STATIC_SHARED.
        function.max_dynamic_shared_size_bytes = _shared_optin() - int(function.shared_size_bytes)
        _OPTED_IN.add(id(function))
    return function


#: (device id, stream) -> the kernels' ticket counter (one uint32, zero between launches).
_TICKETS: dict[tuple[int, int], Any] = {}


def _ticket() -> Any:
    import cupy

    key = (cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr)
    ticket = _TICKETS.get(key)
    if ticket is None:
        ticket = _TICKETS[key] = cupy.zeros(1, dtype=cupy.uint32)
    return ticket


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
        label_smoothing=label_smoothing, reduction=reduction, shared_memory_limit=_shared_optin() - _STATIC_SHARED,
        ticket=_ticket(), compute_capability=_compute_capability(),
    )


@dataclass(frozen=True)
class ScePlan:
    """What one call launches: ``kernel`` ("sce_on_chip", "sce_cluster" or "sce_two_pass"), ``blocks``
    x ``threads`` with ``shared_bytes`` of dynamic shared memory; sce_on_chip's ``threads_per_row``
    and ``rows_per_tile`` (the others: a block, or a cluster, per row, so 512 and 1);
    ``cluster_blocks``: blocks per cluster (sce_cluster's SCE_CLUSTER_BLOCKS, else 1), which
    ``blocks`` is a multiple of."""

    kernel: str
    blocks: int
    threads: int
    threads_per_row: int
    rows_per_tile: int
    shared_bytes: int
    cluster_blocks: int = 1


def cluster_slice(n_classes: int, itemsize: int) -> int:
    """Elements of a row per block of sce_cluster (sce::cluster_slice in the .cu): a multiple of the
    16-byte vector, with the SCE_CLUSTER_BLOCKS slices covering the row and its offset from a
    16-byte boundary (under one vector)."""
    vector = 16 // itemsize
    per_block = -(-(n_classes + vector - 1) // SCE_CLUSTER_BLOCKS)
    return -(-per_block // vector) * vector


def plan_softmax_cross_entropy(n_rows: int, n_classes: int, itemsize: int, *, reduction: str = "mean",
                               labels_reduced: bool = False,
                               shared_memory_limit: int = PORTABLE_SHARED_MEMORY,
                               compute_capability: int = 0) -> ScePlan:
    """The launch for an (n_rows, n_classes) problem with ``itemsize``-byte logits.

    sce_on_chip whenever a tile fits in ``shared_memory_limit`` bytes of dynamic shared
    memory (rows up to about that size: 227 KiB on H100, 48 KiB without opting in); else, on a
    device of ``compute_capability`` 90 (9.0) or above, sce_cluster while a row's slice for one
    block of a cluster fits (rows up to about 8 x 227 KiB: 454k float32 classes); else
    sce_two_pass. ``labels_reduced``: "mean" with class weights or ignore_index, where each
    block reduces the labels itself (the grid is then capped, see
    _LABEL_BYTES_PER_BLOCK_DIVISOR)."""
    vector = 16 // itemsize
    threads_per_row = 1
    while threads_per_row < SCE_THREADS and threads_per_row * _ELEMENTS_PER_THREAD < n_classes:
        threads_per_row *= 2
    rows_per_tile = SCE_THREADS // threads_per_row
    # The tile, plus one vector for the shift that puts its vectors on 16-byte boundaries.
    shared_bytes = -(-(rows_per_tile * n_classes + vector) * itemsize // 16) * 16
    slice_bytes = _CLUSTER_HEADER + cluster_slice(n_classes, itemsize) * itemsize
    cluster_blocks = 1
    if shared_bytes <= shared_memory_limit:
        kernel, units = "sce_on_chip", -(-n_rows // rows_per_tile)
    elif compute_capability >= 90 and slice_bytes <= shared_memory_limit:
        kernel, units, threads_per_row, rows_per_tile, shared_bytes = "sce_cluster", n_rows, SCE_THREADS, 1, slice_bytes
        cluster_blocks = SCE_CLUSTER_BLOCKS
    else:
        kernel, units, threads_per_row, rows_per_tile, shared_bytes = "sce_two_pass", n_rows, SCE_THREADS, 1, 0
    cap = _MAX_GRID if reduction == "none" else _MAX_PARTIALS
    if labels_reduced:
        # Per block: its share of the row's bytes (a cluster's block reads 1/SCE_CLUSTER_BLOCKS of it).
        cap = min(cap, max(1, n_classes * itemsize // (_LABEL_BYTES_PER_BLOCK_DIVISOR * cluster_blocks)))
    # At least one block (cluster) for "sum"/"mean" (even with no rows: it writes the 0-d result).
    # units and cap count blocks, or clusters of cluster_blocks blocks each (cap in whole clusters).
    clusters = max(1, min(units, cap // cluster_blocks if cluster_blocks > 1 else cap))
    return ScePlan(kernel, clusters * cluster_blocks, SCE_THREADS, threads_per_row, rows_per_tile, shared_bytes,
                   cluster_blocks)


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
    shared_memory_limit: int = PORTABLE_SHARED_MEMORY,
    ticket: Any | None = None,
    compute_capability: int = 0,
) -> tuple[Any, Any]:
    """:func:`fused_softmax_cross_entropy` with the array module and the kernels passed in.

    ``xp`` is ``cupy``, and ``get_function(name_expression)`` returns the
    compiled kernel. The tests pass ``numpy`` and the CPU emulator's kernels
    (tools/cuda_emulator) here, so everything on the host side (checks, launch
    shapes, the arguments) runs without a GPU exactly as it does with one.

    One launch, and no other device work than ``xp.empty`` / ``xp.empty_like``
    (plus a contiguous copy of an input that is not C-contiguous, int32/int64
    labels or float32 class weights). ``shared_memory_limit``: the dynamic shared
    memory a launch may ask for (the kernel must have opted in to it).
    ``ticket``: a uint32 array of one zero that the kernels leave zero after
    every complete launch, kept per device and stream by the caller; without one,
    "sum"/"mean" allocate a fresh zero (``xp.zeros``). ``compute_capability``: the device's, as
    major * 10 + minor; sce_cluster (thread-block clusters) is chosen only from 90 on, so the
    default 0 never launches it.
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

    if not logits.flags.c_contiguous:
        logits = xp.ascontiguousarray(logits)
    if labels.dtype.name not in _LABEL_CTYPES:
        labels = labels.astype(numpy.int64)  # uint64 above 2**63 wraps negative: still "out of range"
    if not labels.flags.c_contiguous:
        labels = xp.ascontiguousarray(labels)
    label_ctype = _LABEL_CTYPES[labels.dtype.name]

    weights = None
    if class_weights is not None:
        weights = class_weights
        if weights.dtype != numpy.float32 or not weights.flags.c_contiguous:
            weights = xp.ascontiguousarray(weights, dtype=numpy.float32)
        if weights.shape != (n_classes,):
            raise ValueError(f"class_weights must have shape ({n_classes},), got {weights.shape}")

    # The kernel compares every label with ignore_index; when disabled, pass an
    # int64 that no real label is (only a label of exactly -2**63 would match).
    ignore = numpy.int64(numpy.iinfo(numpy.int64).min if ignore_index is None else int(ignore_index))

    labels_reduced = reduction == "mean" and (weights is not None or ignore_index is not None)
    if reduction == "none":
        mode, scale = _MODE_NONE, numpy.float32(1.0)
    elif reduction == "sum":
        mode, scale = _MODE_SUM, numpy.float32(1.0)
    elif labels_reduced:
        mode, scale = _MODE_MEAN_OF_LABELS, numpy.float32(1.0)  # the kernel derives sum w_y itself
    else:
        # Every row counts 1: the denominator is N, known here. N = 0 gives 1/0 = inf and
        # a mean of 0 * inf = NaN, as in PyTorch. errstate matters to NumPy only.
        with numpy.errstate(divide="ignore"):
            mode, scale = _MODE_MEAN, numpy.float32(1.0) / numpy.float32(n_rows)

    # The kernel could write grad over logits (it is alias-safe), but logits may
    # be the caller's array, so the gradient always gets its own buffer.
    grad = xp.empty_like(logits)
    loss = xp.empty(n_rows if reduction == "none" else (), dtype=logits.dtype)
    if reduction == "none" and n_rows == 0:
        return loss, grad

    plan = plan_softmax_cross_entropy(n_rows, n_classes, logits.dtype.itemsize, reduction=reduction,
                                      labels_reduced=labels_reduced, shared_memory_limit=shared_memory_limit,
                                      compute_capability=compute_capability)
    null = numpy.uint64(0)  # a 64-bit zero is the kernel's null pointer
    partials = null
    if reduction != "none":
        partials = xp.empty(plan.blocks, dtype=numpy.float32)
        if ticket is None:
            ticket = xp.zeros(1, dtype=numpy.uint32)
    else:
        ticket = null
    args = (logits, labels, weights if weights is not None else null, grad, loss, partials, ticket,
            numpy.int64(n_rows), numpy.int32(n_classes), ignore, numpy.float32(eps), scale, numpy.int32(mode))
    if plan.kernel == "sce_on_chip":
        args += (numpy.int32(plan.threads_per_row),)
    get_function(f"{plan.kernel}<{logit_ctype}, {label_ctype}>")(
        (plan.blocks,), (plan.threads,), args, shared_mem=plan.shared_bytes)
    return loss, grad
