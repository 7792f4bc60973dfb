"""One epoch of MNIST-shaped synthetic data (60,000 x 784 float32, batch 128, shuffled):
deepcore's batches + step, ``deepcore.train.fit`` ("numpy-fit"), plain NumPy, PyTorch eager."""

CASES = ("epoch",)


def test_epoch(measure, spec, contender):
    measure(spec, contender)
