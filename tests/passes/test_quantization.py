"""Group quantization schemes: quantize → dequantize round trips on random matrices, against the
bound each scheme guarantees, and the packing against an independent, element-by-element
reading of MLC LLM's layout (code ``k`` of a row in bits ``bits * (k % per_word)`` of word
``k // per_word``)."""

from __future__ import annotations

import numpy as np
import pytest

from relaxlm.passes import get_scheme
from relaxlm.passes.quantization import GROUP_SIZE

GROUP_SCHEMES = ["q4f32_1", "q4f16_1", "q8f32_1", "q8f16_1"]


def random_weights(rows: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Rows of very different magnitudes, and an outlier per row: scales must follow each group.
    w = rng.standard_normal((rows, k)).astype(np.float32) * np.logspace(-3, 1, rows, dtype=np.float32)[:, None]
    w[np.arange(rows), rng.integers(0, k, rows)] *= 8
    return w


@pytest.mark.parametrize("name", GROUP_SCHEMES)
def test_round_trip_is_within_half_a_scale(name):
    """Symmetric absmax: every element is within half of its group's (stored) scale."""
    scheme = get_scheme(name)
    w = random_weights(48, 256)
    packed, scale = scheme.quantize(w)
    assert packed.dtype == np.uint32 and packed.shape == (48, 256 * scheme.bits // 32)
    assert scale.dtype == np.float16 and scale.shape == (48, 256 // GROUP_SIZE)
    error = np.abs(scheme.dequantize(packed, scale) - w)
    bound = np.repeat(scale.astype(np.float32), GROUP_SIZE, axis=1) / 2
    # Relative slack for float32 rounding of w / scale and (q - z) * scale only.
    assert np.all(error <= bound * (1 + 1e-6)), float(np.max(error / bound))
    # The stored scale is max|w| / z rounded up to float16: the smallest float16 not below it.
    exact = np.abs(w.reshape(48, -1, GROUP_SIZE)).max(-1) / scheme.zero_point
    assert np.all(scale >= exact) and np.all(np.nextafter(scale, np.float16(0)) < exact)


@pytest.mark.parametrize("name, zero_point, per_word", [("q4f32_1", 7, 8), ("q8f32_1", 127, 4)])
def test_codes_follow_the_mlc_layout(name, zero_point, per_word):
    scheme = get_scheme(name)
    w = random_weights(3, 64, seed=1)
    packed, scale = scheme.quantize(w)
    bits = 32 // per_word
    for r in range(3):
        for k in range(64):
            code = (int(packed[r, k // per_word]) >> (bits * (k % per_word))) & ((1 << bits) - 1)
            s = float(scale[r, k // GROUP_SIZE])
            assert 0 <= code <= 2 * zero_point
            assert code == min(max(round(w[r, k] / s) + zero_point, 0), 2 * zero_point)


def test_zero_groups_and_extremes():
    """An all-zero group has scale 0 and dequantizes to 0; a group's max reaches the top code."""
    scheme = get_scheme("q4f32_1")
    w = np.zeros((2, 64), np.float32)
    w[1, :32] = np.linspace(-3, 3, 32)
    packed, scale = scheme.quantize(w)
    assert scale[0, 0] == 0 and np.all(scheme.dequantize(packed, scale)[0] == 0)
    codes = (packed[1, :4, None] >> (np.arange(8, dtype=np.uint32) * 4)) & 15
    assert codes.min() == 0 and codes.max() == 14


@pytest.mark.parametrize("name", GROUP_SCHEMES)
def test_convert_stores_packed_weights_and_keeps_the_rest(name):
    scheme = get_scheme(name)
    w = random_weights(8, 64)
    stored = scheme.convert("model.layers.0.mlp.down_proj.weight", w)
    assert set(stored) == {"model.layers.0.mlp.down_proj.q_weight", "model.layers.0.mlp.down_proj.q_scale"}
    norm = scheme.convert("model.norm.weight", np.ones(64, np.float32))
    assert list(norm) == ["model.norm.weight"] and norm["model.norm.weight"].dtype == scheme.model_dtype
    # An input dimension that is not a multiple of the group size stays unquantized.
    odd = scheme.convert("lm_head.weight", random_weights(8, 48))
    assert list(odd) == ["lm_head.weight"]
