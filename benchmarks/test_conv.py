"""One 3x3 convolution, N=128, 64 -> 64 channels, 32x32, padding 1, stride 1, no bias: forward + backward
(dx and dW), deepcore's ``Conv2d`` against PyTorch's; and the same convolution's three plain GEMMs into
preallocated outputs (``conv_gemms``: ``W cols``, ``cols dY^T``, ``W^T dY``), NumPy/OpenBLAS and torch,
the floor BLAS sets. Both count ``3 * 2 N O OH OW C KH KW`` FLOPs, so the issue's criterion (the layer at
>= 50% of a plain GEMM's GFLOP/s) reads off ``extra_info["gflops"]`` of the two groups."""

CASES = ("conv", "conv_gemms")


def record_gflops(benchmark) -> None:
    """``extra_info["gflops"]``: the workload's FLOPs per median call (absent when timing was disabled)."""
    median = getattr(getattr(benchmark.stats, "stats", None), "median", None)
    flops = benchmark.extra_info.get("flops")
    if flops and median:
        benchmark.extra_info["gflops"] = flops / median / 1e9


def test_conv(measure, benchmark, spec, contender):
    measure(spec, contender)
    record_gflops(benchmark)
