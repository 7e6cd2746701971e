"""Group quantization schemes: quantize → dequantize round trips on random matrices, against the
bound each scheme guarantees, and the packing against an independent, element-by-element
reading of MLC LLM's layout (code ``k`` of a row in bits ``bits * (k % per_word)`` of word
``k // per_word``)."""

from __future__ import annotations

import numpy as np
import pytest

from relaxlm.passes import get_scheme
from relaxlm.passes.errors import PassError
from relaxlm.passes.quantization import FINE_GROUP_SIZE, GROUP_SIZE

GROUP_SCHEMES = ["q4f32_1", "q4f16_1", "q8f32_1", "q8f16_1"]


def random_weights(rows: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Rows of very different magnitudes, and an outlier per row: scales must follow each group.
    w = rng.standard_normal((rows, k)).astype(np.float32) * np.logspace(-3, 1, rows, dtype=np.float32)[:, None]
    w[np.arange(rows), rng.integers(0, k, rows)] *= 8
    return w


def absmax_round_trip(w: np.ndarray, zero_point: int, group_size: int) -> np.ndarray:
    """MLC's rule, written out here as the bound: scale max|w| / z stored as the float16 at or
    above it, codes rounded to nearest."""
    groups = w.reshape(len(w), -1, group_size).astype(np.float64)
    exact = np.abs(groups).max(-1, keepdims=True) / zero_point
    scale = exact.astype(np.float16)
    scale = np.where(scale < exact, np.nextafter(scale, np.float16(np.inf)), scale).astype(np.float64)
    return (np.rint(groups / np.where(scale == 0, 1, scale)) * scale).reshape(w.shape)


def group_squared_error(a: np.ndarray, b: np.ndarray, group_size: int) -> np.ndarray:
    return np.square(a.astype(np.float64) - b).reshape(len(a), -1, group_size).sum(-1)


@pytest.mark.parametrize("group_size", [GROUP_SIZE, FINE_GROUP_SIZE])
@pytest.mark.parametrize("name", GROUP_SCHEMES)
def test_round_trip_is_never_worse_than_absmax(name, group_size):
    """Each group's squared error is at most that of MLC's absmax rule (whose every element is
    within half its scale, max|w| / z); and every weight inside the
    levels' range is within half of its group's stored scale."""
    scheme = get_scheme(name)
    w = random_weights(48, 256)
    packed, scale = scheme.quantize(w, group_size=group_size)
    assert packed.dtype == np.uint32 and packed.shape == (48, 256 * scheme.bits // 32)
    assert scale.dtype == np.float16 and scale.shape == (48, 256 // group_size)
    restored = scheme.dequantize(packed, scale)
    ours = group_squared_error(restored, w, group_size)
    absmax = group_squared_error(absmax_round_trip(w, scheme.zero_point, group_size), w, group_size)
    # Slack for float32 arithmetic only.
    assert np.all(ours <= absmax * (1 + 1e-5) + 1e-30), float(np.max(ours / absmax))
    assert np.mean(ours) < 0.95 * np.mean(absmax), "the search found nothing better than absmax"
    step = np.repeat(np.abs(scale.astype(np.float32)), group_size, axis=1)
    levels = w / np.where(step == 0, 1, np.repeat(scale.astype(np.float32), group_size, axis=1))
    inside = (levels >= -scheme.zero_point - 0.5) & (levels <= scheme.zero_point + 1.5)
    assert np.all(np.abs(restored - w)[inside] <= step[inside] / 2 * (1 + 1e-6))


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
            assert code == min(max(round(w[r, k] / s) + zero_point, 0), 2 * zero_point + 1)


def test_zero_groups_and_a_mirrored_grid():
    """An all-zero group has scale 0 and dequantizes to 0. A group on a grid whose largest level
    is negative (-8 .. 7 steps, as llama.cpp's Q4_0 stores) comes back exactly, with a negative
    scale that mirrors the levels -7 .. 8."""
    scheme = get_scheme("q4f32_1")
    w = np.zeros((2, 64), np.float32)
    w[1, :32] = np.repeat(np.arange(-8, 8, dtype=np.float32), 2) * 0.25
    packed, scale = scheme.quantize(w)
    assert scale[0, 0] == 0 and np.all(scheme.dequantize(packed, scale)[0] == 0)
    assert scale[1, 0] == np.float16(-0.25)
    np.testing.assert_array_equal(scheme.dequantize(packed, scale)[1, :32], w[1, :32])


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


@pytest.mark.parametrize("name, fine", [("q4f32_1", True), ("q4f16_1", True), ("q8f32_1", False)])
def test_4_bit_schemes_store_attention_and_down_proj_in_groups_of_16(name, fine):
    """The projections whose rounding costs most at 4 bits get a scale per 16 weights; the
    gate/up projection and the embedding keep groups of 32 (passes.quantization explains why)."""
    scheme = get_scheme(name)
    w = random_weights(8, 64)
    for layer, group in [("self_attn.qkv_proj", FINE_GROUP_SIZE if fine else GROUP_SIZE),
                         ("self_attn.o_proj", FINE_GROUP_SIZE if fine else GROUP_SIZE),
                         ("mlp.down_proj", FINE_GROUP_SIZE if fine else GROUP_SIZE),
                         ("mlp.gate_up_proj", GROUP_SIZE), ("embed_tokens", GROUP_SIZE)]:
        prefix = f"model.layers.3.{layer}." if layer != "embed_tokens" else "model.embed_tokens."
        assert scheme.group_size(prefix + "weight") == group
        stored = scheme.convert(prefix + "weight", w)
        assert stored[prefix + "q_scale"].shape == (8, 64 // group), layer
        # dequantize reads the group size off the shapes.
        restored = scheme.dequantize(stored[prefix + "q_weight"], stored[prefix + "q_scale"])
        np.testing.assert_array_equal(restored, scheme.dequantize(*scheme.quantize(w, group_size=group)))


def weighted_error(scheme, w: np.ndarray, importance: np.ndarray, *quantized) -> float:
    restored = scheme.dequantize(*quantized).astype(np.float64)
    return float((np.square(restored - w) * importance).sum())


@pytest.mark.parametrize("name", ["q4f32_1", "q8f32_1"])
def test_importance_weights_the_search(name):
    """Uniform importance is the plain search; skewed importance (a few channels carrying most of
    the input energy, as in real activations) lowers the error that counts, Σ_j h_j Δw_j², well
    below what the plain search leaves."""
    scheme = get_scheme(name)
    w = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    plain = scheme.quantize(w)
    for a, b in zip(plain, scheme.quantize(w, np.full(256, 3.0))):
        np.testing.assert_array_equal(a, b)
    importance = np.random.default_rng(2).lognormal(0.0, 2.0, 256)
    weighted = scheme.quantize(w, importance)
    assert weighted_error(scheme, w, importance, *weighted) < 0.9 * weighted_error(scheme, w, importance, *plain)


@pytest.mark.parametrize("importance", [np.full(64, -1.0), np.full(64, np.nan), np.zeros(64)])
def test_invalid_importance_is_a_clear_error(importance):
    with pytest.raises(PassError, match="importance must be finite, non-negative and not all zero"):
        get_scheme("q4f32_1").quantize(random_weights(4, 64), importance)


def test_gptq_lowers_the_output_error_through_correlated_inputs():
    """With correlated inputs (H = E[x xᵀ] far from diagonal), GPTQ's expected output error
    tr(ΔW H ΔWᵀ) is well below that of the importance-weighted search with diag(H); the result
    is the scheme's own format (codes and float16 scales that dequantize as usual)."""
    scheme = get_scheme("q4f32_1")
    rng = np.random.default_rng(4)
    w = rng.standard_normal((96, 128)).astype(np.float32)
    mixing = rng.standard_normal((128, 128)) * np.logspace(0, -2, 128)
    x = rng.standard_normal((4096, 128)) @ mixing.T
    hessian = x.T @ x / len(x)

    def output_error(packed, scale):
        delta = scheme.dequantize(packed, scale).astype(np.float64) - w
        return float(np.einsum("ij,jk,ik->", delta, hessian, delta))

    packed, scale = scheme.quantize(w, hessian=hessian)
    assert packed.shape == (96, 128 // 8) and packed.dtype == np.uint32 and scale.dtype == np.float16
    assert output_error(packed, scale) < 0.7 * output_error(*scheme.quantize(w, np.diag(hessian)))
