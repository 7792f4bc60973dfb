"""Matrix products: square 512/2048/4096 (4096 marked slow) and the 784-256-10 MLP's shapes."""

CASES = ("matmul",)


def test_matmul(measure, spec, contender):
    measure(spec, contender)
