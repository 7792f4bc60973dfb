"""One training step of an MLP (784-256-10 at batch 32, 128, 512, 2048; 3072-1024-1024-10 at 256):
forward, softmax cross-entropy, backward, SGD momentum, as the README's loop writes it; deepcore,
deepcore also forming the input gradient ("numpy-dx"), the same step hand-written in plain NumPy,
PyTorch eager, and the step's matrix products alone (``mlp_gemms``, the floor BLAS sets)."""

CASES = ("mlp_step", "mlp_gemms")


def test_mlp_step(measure, spec, contender):
    measure(spec, contender)
