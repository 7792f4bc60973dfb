"""Row softmax and log-softmax of (N, C) float32, C = 10, 1000, 32768."""

CASES = ("softmax", "log_softmax")


def test_softmax(measure, spec, contender):
    measure(spec, contender)
