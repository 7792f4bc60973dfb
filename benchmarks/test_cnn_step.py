"""Convolutional training: one step of the network ``deepcore train --model cnn`` builds (LeNet-like
for 1x28x28 at batch 128; VGG-style with BatchNorm2d for 3x32x32 at batch 64): forward, softmax
cross-entropy, backward, SGD momentum; deepcore against a PyTorch mirror with the same layers and
weights. And one shuffled epoch of 60,000 random 1x28x28 images at batch 128 (``cnn_epoch``, slow:
``--run-slow``): ``deepcore.train.fit`` ("numpy-fit"), deepcore's batches + step ("numpy"), PyTorch's
loop indexing batches from one tensor. ``extra_info["gflops"]``: the step's convolution and Linear
FLOPs per median call."""

CASES = ("cnn_step", "cnn_epoch")


def record_gflops(benchmark) -> None:
    """``extra_info["gflops"]``: the workload's FLOPs per median call (absent when timing was disabled)."""
    median = getattr(getattr(benchmark.stats, "stats", None), "median", None)
    flops = benchmark.extra_info.get("flops")
    if flops and median:
        benchmark.extra_info["gflops"] = flops / median / 1e9


def test_cnn_step(measure, benchmark, spec, contender):
    measure(spec, contender)
    record_gflops(benchmark)
