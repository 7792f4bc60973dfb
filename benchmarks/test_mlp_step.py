"""One training step of the 784-256-10 MLP (batch 128 and 1024): forward, softmax cross-entropy,
backward, SGD momentum; deepcore, deepcore with the input gradient ("numpy-dx", as the fit
loop runs it), the same step hand-written in plain NumPy, and PyTorch eager."""

CASES = ("mlp_step",)


def test_mlp_step(measure, spec, contender):
    measure(spec, contender)
