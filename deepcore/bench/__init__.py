"""Benchmarks of deepcore's backends against each other and against PyTorch.

One package holds the workloads, so that ``deepcore bench`` (a quick, interleaved
subset) and the pytest-benchmark suite in ``benchmarks/`` time the same code:

========================  ============================================================
case                      what one call does
========================  ============================================================
``matmul``                ``a @ b`` (square, and the 784-256-10 MLP's products)
``softmax``               row softmax of an (N, C) array
``log_softmax``           row log-softmax of an (N, C) array
``softmax_ce``            softmax cross-entropy, loss and d(loss)/d(logits), mean reduction
``mlp_step``              one training step of an MLP (784-256-10 at batches 32-2048, and
                          3072-1024-1024-10 at 256) written as the README's loop: forward,
                          loss, backward, SGD momentum update, zero_grad
``mlp_gemms``             the matrix products of that step alone: the floor BLAS sets
``epoch``                 one epoch (60,000 x 784 synthetic MNIST-shaped data, batch 128,
                          shuffled) of that step
``cnn_step``              one training step of the network ``deepcore train --model cnn``
                          builds (LeNet-like for 1x28x28 at batch 128; VGG-style for
                          3x32x32 at 64 in the full suite); PyTorch runs a mirror with the
                          same layers and weights
``conv``                  one 3x3 ``Conv2d`` (N=128, 64 -> 64, 32x32, padding 1, no bias):
                          forward + backward forming dx and dW
``conv_gemms``            that convolution's three GEMMs alone, into preallocated outputs:
                          the floor BLAS sets
``cnn_epoch``             one shuffled epoch of 60,000 random 1x28x28 images, batch 128, of
                          the LeNet step (full suite only, slow)
========================  ============================================================

Workloads that count their FLOPs (``info["flops"]``: the matrix products, the convolutions and
Linear layers; see :mod:`.cnn`) get a GFLOP/s column in the table and ``gflops`` in the JSON.

Contenders (each row of a table):

- ``numpy``: deepcore on its NumPy backend, the plain README loop; ``cupy``: deepcore on CuPy;
- ``numpy-unfused`` / ``cupy-unfused`` (softmax_ce only): the same call through the base
  class's array-API reference, ``deepcore.backend.base.Backend.softmax_cross_entropy``;
- ``numpy-dx`` (mlp_step): the same loop with ``forward(x, train=True, input_grad=True)``, which
  also forms the gradient of the input batch (the plain loop does not, as PyTorch does not for
  data without ``requires_grad``);
- ``numpy-fit`` (epoch, cnn_epoch): the whole ``deepcore.train.fit(epochs=1)`` loop (batching, the
  per-step loss check, metrics) on the same data;
- ``numpy-plain`` (mlp_step, epoch): the same step hand-written in plain NumPy, the
  framework-overhead baseline;
- ``torch`` / ``torch-cuda``: PyTorch eager, the outside reference.

On the GPU, ``cupy`` and ``torch-cuda`` keep the epoch's data on the device and gather
each batch there; on the CPU every contender gathers from the same host array.

Every result carries the backend, device, dtype, shape, library versions, BLAS and the
thread count. Ratios are to the reference on the same device: PyTorch when it is
installed, else deepcore's NumPy (CPU) or CuPy (GPU) backend.

Timing: every contender of a case is set up first; then ``rounds`` rounds each time
every contender once, in turn (interleaved), for enough calls that a sample lasts at
least ``min_time``, after a short pause (see :func:`default_cooldown`); the median of the
per-call times is what is reported, and the ratio is the median over rounds of the ratio of
the two samples taken in the same round. GPU samples end with a device synchronisation.

Modules: :mod:`.contenders` (who runs what), :mod:`.workloads`, :mod:`.mlp` and :mod:`.cnn` (the work),
:mod:`.cases` (case name -> workload), :mod:`.suites` (sizes), :mod:`.runner` (timing),
:mod:`.report` (table, JSON, comparison), :mod:`.threads` and :mod:`.environment` (what the
machine is doing), :mod:`.command` (the ``deepcore bench`` subcommand). ``import deepcore``
never imports this package.
"""

from __future__ import annotations

from .cases import make_workload, preload_jit
from .contenders import ALL_CONTENDERS, CASES, CPU_CONTENDERS, GPU_CONTENDERS, NotApplicable, available_contenders
from .environment import describe_environment, environment
from .mlp import MLP
from .report import compare, format_table, load_results, save_results, to_json
from .runner import Result, default_cooldown, reference_for, run
from .suites import Spec, suite
from .threads import restore_threads, set_threads, thread_info
from .workloads import Workload

__all__ = [
    "ALL_CONTENDERS",
    "CASES",
    "CPU_CONTENDERS",
    "GPU_CONTENDERS",
    "MLP",
    "NotApplicable",
    "Result",
    "Spec",
    "Workload",
    "available_contenders",
    "compare",
    "default_cooldown",
    "describe_environment",
    "environment",
    "format_table",
    "load_results",
    "make_workload",
    "preload_jit",
    "reference_for",
    "restore_threads",
    "run",
    "save_results",
    "set_threads",
    "suite",
    "thread_info",
    "to_json",
]
