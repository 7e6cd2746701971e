"""The decode kernels with integer activations (targets.cpu_integer) that BlockMatmul puts in place
when asked, for every block layout, both widths (int8, int16) and every integer dot product this
CPU can run. Reference: numpy on ``gguf.quants.dequantize``'s weights with the activations rounded
as the kernel rounds them (then only float32 summation differs), and the exact product within the
rounding's error."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from tvm.target import Target

from relaxlm.passes.gguf_blocks import LAYOUTS
from relaxlm.targets import resolve
from relaxlm.targets.cpu_integer import DOT_PRODUCTS, dot_product_for, has_integer_dots, integer_kernel_for
from relaxlm.targets.cpu_schedules import BlockMatmul
from gguf_support import rounded
from support import random_blocks
from test_block_kernels import OUT, block_matmul
from test_cpu_schedules import replacement_by, run

IN = 512
# An LLVM CPU with each dot product and no better one, and the cpuinfo flags running it needs.
CPUS = {"avx512vnni": ("cascadelake", {"avx512_vnni", "avx512vl"}), "avxvnni": ("alderlake", {"avx_vnni"}),
        "avx2": ("x86-64-v3", {"avx2"})}
HOST_FLAGS = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
# The largest error of rounding x per 32 values, relative to the largest output: int8 costs ~0.5%
# (llama.cpp's Q8 activations), int16 ~2e-5 (float32's own error here is ~1e-7).
ROUNDING_BOUND = {8: 0.03, 16: 1e-4}


@pytest.mark.parametrize("rows", [1, 6], ids=["decode", "prefill"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("dot", sorted(CPUS))
def test_integer_kernels_match_rounded_activations(dot, bits, name, residual, rows):
    """One row (decode's kernel) and 6 (prefill's: a tile of 4 and 2 rows left over)."""
    cpu, flags = CPUS[dot]
    if not flags <= HOST_FLAGS:
        pytest.skip(f"this CPU cannot run {dot} code (needs {', '.join(sorted(flags))})")
    target = Target({"kind": "llvm", "mcpu": cpu})
    layout = LAYOUTS[name]
    chosen, width = integer_kernel_for(target, layout, bits)
    if dot_product_for(target, layout, bits) is None:
        # vpmaddubsw's int16 pairs would overflow on Q8_0's codes: 16 bits instead.
        assert (dot, bits, name, width) == ("avx2", 8, "Q8_0", 16)
    else:
        assert width == bits
    assert chosen.name == dot
    func = block_matmul(layout, rows, residual, IN)
    replacement = replacement_by(BlockMatmul(bits), func, target, "gemv" if rows == 1 else "gemm")
    assert "llvm.x86" in replacement.script()
    raw = random_blocks(layout, OUT, IN, seed=4)
    parts = layout.split(raw)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, rows, IN), dtype="float32")
    args = [parts[c.name] for c in layout.components] + [x]
    args += [rng.standard_normal((1, rows, OUT), dtype="float32")] * residual
    actual = run(replacement, target, args, (1, rows, OUT))
    weights = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).astype(np.float64)
    added = args[-1] if residual else 0
    # The kernel: scale * dx * sum(qx * code) + offset * sum(dx * qx), the rounded x times the weights.
    expected = rounded(x, width) @ weights.T + added
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    exact = x.astype(np.float64) @ weights.T + added
    assert np.abs(actual - exact).max() < ROUNDING_BOUND[width] * np.abs(exact).max()


@pytest.mark.parametrize("name", ["Q4_K", "Q8_0"])
def test_integer_prefill_over_several_passes_of_k(name):
    """k = 8192 goes in 4 passes of 2048 columns (cpu_kernels.gemm_k_chunk), each adding to ``out``."""
    target, layout, k = resolve("llvm").target, LAYOUTS[name], 8192
    if not has_integer_dots(target):
        pytest.skip("this CPU has no integer dot products")
    replacement = replacement_by(BlockMatmul(16), block_matmul(layout, 5, True, k), target, "gemm")
    raw = random_blocks(layout, OUT, k, seed=6)
    rng = np.random.default_rng(7)
    x, added = rng.standard_normal((1, 5, k), dtype="float32"), rng.standard_normal((1, 5, OUT), dtype="float32")
    actual = run(replacement, target, [layout.split(raw)[c.name] for c in layout.components] + [x, added], (1, 5, OUT))
    weights = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).astype(np.float64)
    expected = rounded(x, 16) @ weights.T + added
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_decode_over_a_partial_group_of_runs(name, bits):
    """Decode reduces the sums of 8 runs at a time (cpu_integer._GROUP): 640 columns of a 32-value
    block leave a group of 4 runs (SmolLM2's 576 and Gemma 3's 640 have such tails); the K-quants
    take 768 (3 groups; Q6_K's runs of 16 make groups of half a block)."""
    target, layout = resolve("llvm").target, LAYOUTS[name]
    if not has_integer_dots(target):
        pytest.skip("this CPU has no integer dot products")
    k = 640 if layout.block == 32 else 768
    _, width = integer_kernel_for(target, layout, bits)
    replacement = replacement_by(BlockMatmul(bits), block_matmul(layout, 1, True, k), target, "gemv")
    raw = random_blocks(layout, OUT, k, seed=8)
    rng = np.random.default_rng(9)
    x, added = rng.standard_normal((1, 1, k), dtype="float32"), rng.standard_normal((1, 1, OUT), dtype="float32")
    actual = run(replacement, target, [layout.split(raw)[c.name] for c in layout.components] + [x, added], (1, 1, OUT))
    weights = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).astype(np.float64)
    expected = rounded(x, width) @ weights.T + added
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("k", [640, 608], ids=["whole", "odd-runs"])
@pytest.mark.parametrize("name", sorted(n for n, lay in LAYOUTS.items() if lay.nibble_weight and lay.block == 32))
def test_decode_reads_nibbles_as_words_where_runs_pair_up(name, k):
    """At 16 bits the 4-bit layouts with a nibble form read their codes as uint16 words, two runs
    at a time; a row of an odd number of runs (608 columns) reads bytes, and both match."""
    target, layout = resolve("llvm").target, LAYOUTS[name]
    if not has_integer_dots(target):
        pytest.skip("this CPU has no integer dot products")
    replacement = replacement_by(BlockMatmul(16), block_matmul(layout, 1, False, k), target, "gemv")
    words = 'qs.view("uint16")'
    assert (words in replacement.script()) == (k % 64 == 0)
    assert words not in replacement_by(BlockMatmul(8), block_matmul(layout, 1, False, k), target, "gemv").script()
    raw = random_blocks(layout, OUT, k, seed=10)
    x = np.random.default_rng(11).standard_normal((1, 1, k), dtype="float32")
    actual = run(replacement, target, [layout.split(raw)[c.name] for c in layout.components] + [x], (1, 1, OUT))
    weights = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).astype(np.float64)
    expected = rounded(x, 16) @ weights.T
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_integer_activations_only_when_asked():
    from tvm import tirx

    target = resolve("llvm").target
    for rows, kernel in ((1, "gemv"), (tirx.Var("seq_len", "int64"), "gemm")):
        func = block_matmul(LAYOUTS["Q4_0"], rows, False, IN)
        assert "llvm.x86" not in replacement_by(BlockMatmul(), func, target, kernel).script()
        if has_integer_dots(target):
            assert "llvm.x86" in replacement_by(BlockMatmul(8), func, target, kernel).script()


def test_dot_products_by_cpu():
    """What each CPU gets: the best dot product it has; none below AVX2 or off the CPU."""
    q4 = LAYOUTS["Q4_0"]
    assert [dot_product_for(Target({"kind": "llvm", "mcpu": CPUS[d][0]}), q4).name for d in CPUS] == list(CPUS)
    assert dot_product_for(Target({"kind": "llvm", "mcpu": "x86-64-v2"}), q4) is None
    assert not has_integer_dots(Target({"kind": "llvm", "mcpu": "x86-64-v2"}))
    assert [d.name for d in DOT_PRODUCTS] == list(CPUS)
