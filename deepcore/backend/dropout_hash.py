"""Dropout masks from a stateless counter-based generator: the same mask on every backend.

Element ``i`` of the mask for a Dropout layer's ``call``-th training call is a pure function of
``(seed, call, i)``: no generator state exists, nothing is built per call, and a run resumed from
``(seed, calls)`` on another backend draws the very same masks.

The generator is SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014): the stream of one ``(seed, call)`` is a key and an odd increment
``gamma`` (:func:`stream`), and its ``j``-th 64-bit output is ``mix64(key + (j + 1) * gamma)``
with ``mix64`` Stafford's "Mix13" finaliser (shifts 30, 27, 31). Each output decides two
elements: element ``i`` (C order) takes the low 32 bits of output ``i // 2`` when ``i`` is even,
the high 32 bits when odd, and is kept when those are at least ``threshold = ceil(p * 2**32)``
(:func:`threshold`), so the keep probability is ``1 - p`` to within 2**-32 (PyTorch's float32
uniforms resolve 2**-24). A kept element is ``1 / (1 - p)`` rounded to the mask's dtype
(:func:`mask_value`), a dropped one 0. Two decisions per hash halve NumPy's work: a 128x1024
float32 mask takes about 0.25 ms, where a generator per call with ``Generator.random`` float32
uniforms, the compare and the scaling took 0.44 ms (the uniforms alone 0.37 ms; 2 shared cores).

Three implementations, tested to give bit-identical masks (tests/test_dropout_hash.py):

* :func:`keep_mask` here, vectorised with NumPy's uint64 arithmetic (which wraps modulo 2**64);
  the NumPy backend uses it directly, and the array-API reference backend (torch, array_api_strict,
  ...) computes it on the host and moves the mask, because the standard leaves integer overflow
  undefined and PyTorch's uint64 has no shifts, additions or comparisons on the CPU;
* ``DROPOUT_MASK`` in :mod:`deepcore.backend.elementwise_kernels`, the same arithmetic as one CuPy
  ``ElementwiseKernel`` (one launch per mask, no cuRAND generator), run on the CPU emulator by the
  tests;
* :func:`keep_mask_scalar`, the definition in plain Python integers, the oracle for both.

Only NumPy is imported here.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

MASK64 = (1 << 64) - 1
#: The golden-ratio increment of SplitMix64, 2**64 / phi rounded to odd.
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
MIX_1 = 0xBF58476D1CE4E5B9
MIX_2 = 0x94D049BB133111EB

_U64 = np.uint64


class Stream(NamedTuple):
    """One ``(seed, call)``'s counter-based stream: output ``i`` is ``mix64(key + (i + 1) * gamma)``."""

    key: int
    gamma: int


def mix64(z: int) -> int:
    """Stafford's Mix13 (SplitMix64's output function) on a Python int, modulo 2**64."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX_1) & MASK64
    z = ((z ^ (z >> 27)) * MIX_2) & MASK64
    return z ^ (z >> 31)


def _mix_gamma(z: int) -> int:
    """SplitMix64's gamma: odd, and with enough bit transitions that the Weyl sequence mixes well."""
    z = (((z ^ (z >> 33)) * 0xFF51AFD7ED558CCD) & MASK64)
    z = (((z ^ (z >> 33)) * 0xC4CEB9FE1A85EC53) & MASK64)
    z = (z ^ (z >> 33)) | 1
    if bin(z ^ (z >> 1)).count("1") < 24:
        z ^= 0xAAAAAAAAAAAAAAAA
    return z


def stream(seed: int, call: int) -> Stream:
    """The stream of a layer's ``call``-th training call: SplitMix64 split twice, by seed then by call."""
    if seed < 0 or call < 0:
        raise ValueError(f"stream: seed and call must be non-negative, got seed={seed!r}, call={call!r}")
    seed_state = mix64(seed + GOLDEN_GAMMA)  # the seed's own generator, one step in
    z = (seed_state + (call + 1) * GOLDEN_GAMMA) & MASK64
    key = mix64(z)
    gamma = _mix_gamma((z + GOLDEN_GAMMA) & MASK64)
    return Stream(key, gamma)


def threshold(p: float) -> int:
    """``ceil(p * 2**32)`` exactly (scaling a double by a power of two is exact), for ``0 <= p < 1``: a
    32-bit draw is kept when ``>= threshold``, with probability ``(2**32 - threshold) / 2**32``. It is
    2**32, keeping nothing, only for p within 2**-32 of 1."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"threshold: p must be in [0, 1), got {p!r}")
    return math.ceil(math.ldexp(p, 32))


def mask_value(p: float, dtype_name: str) -> float:
    """``1 / (1 - p)`` rounded to ``dtype_name`` as a Python float, exactly representable in that dtype,
    so every library's cast gives the same bits. Half types round through float32 (as CuPy, PyTorch and
    ml_dtypes all convert to them), so the value does not depend on whether a cast is single or double."""
    scale = 1.0 / (1.0 - p)
    if dtype_name == "float64":
        return scale
    f32 = np.float32(scale)
    if dtype_name == "float32":
        return float(f32)
    if dtype_name == "float16":
        return float(np.float16(f32))
    if dtype_name == "bfloat16":  # round-to-nearest-even on the top 16 bits of the float32
        bits = int(f32.view(np.uint32))
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return float(np.uint32(bits).view(np.float32))
    raise ValueError(f"mask_value: dropout masks are floating point, got dtype {dtype_name!r}")


def keep_mask_scalar(s: Stream, thresh: int, n: int) -> list[bool]:
    """The definition, element by element in Python integers (slow; the tests' oracle)."""
    out = []
    for i in range(n):
        h = mix64(s.key + (i // 2 + 1) * s.gamma)
        out.append((h >> 32 if i & 1 else h & 0xFFFFFFFF) >= thresh)
    return out


def keep_mask(s: Stream, thresh: int, n: int) -> np.ndarray:
    """The first ``n`` keep decisions of stream ``s`` as a bool array, vectorised in uint64 (wrapping)."""
    half = (n + 1) // 2
    z = np.arange(1, half + 1, dtype=_U64)
    tmp = np.empty_like(z)
    np.multiply(z, _U64(s.gamma), out=z)
    np.add(z, _U64(s.key), out=z)
    for shift, mult in ((30, MIX_1), (27, MIX_2)):
        np.right_shift(z, _U64(shift), out=tmp)
        np.bitwise_xor(z, tmp, out=z)
        np.multiply(z, _U64(mult), out=z)
    np.right_shift(z, _U64(31), out=tmp)
    np.bitwise_xor(z, tmp, out=z)
    # Element 2j is output j's low half, 2j+1 its high half: a little-endian uint32 view in order.
    words = z.view("<u4")[:n]
    if thresh > 0xFFFFFFFF:
        return np.zeros(n, dtype=bool)
    return np.greater_equal(words, np.uint32(thresh))


def numpy_mask(s: Stream, shape: tuple[int, ...], p: float, dtype: Any) -> np.ndarray:
    """The inverted-dropout mask of stream ``s`` as a NumPy array of ``dtype`` (C order): ``mask_value``
    where kept, 0 where dropped; all zeros for ``p >= 1``."""
    dtype = np.dtype(dtype)
    if p >= 1.0:
        return np.zeros(shape, dtype=dtype)
    # astype and an in-place multiply, not np.where, whose branch on random bools costs 20x more.
    out = keep_mask(s, threshold(p), math.prod(shape)).reshape(shape).astype(dtype)
    out *= np.asarray(mask_value(p, dtype.name), dtype=dtype)
    return out
