"""Softmax cross-entropy, loss and gradient (mean): deepcore's fused path vs the base class's
array-API reference ("-unfused") vs PyTorch's ``cross_entropy`` + ``backward``."""

CASES = ("softmax_ce",)


def test_softmax_ce(measure, spec, contender):
    measure(spec, contender)
