"""The CPU kernels of llama.cpp's block layouts (block_gemv_cpu, block_gemm_cpu) put in place by
the BlockMatmul rule. Reference: the same dequantize + matmul built unscheduled, and numpy on
``gguf.quants.dequantize``'s weights."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from tvm import te, tirx

from relaxlm.passes.gguf_blocks import LAYOUTS
from relaxlm.passes.gguf_quantization import LAYOUT_ATTR
from relaxlm.targets import resolve
from relaxlm.targets.cpu_schedules import BlockMatmul, NTMatmul
from support import random_blocks
from test_cpu_schedules import dequantize_nt_matmul, nt_matmul, replacement_by, run

# 96 output rows (32-row prefill blocks, 16-row decode tasks), 512 inputs (two K-quant super-blocks;
# 6144 for prefill in passes over k).
OUT, IN = 96, 512


@pytest.fixture(scope="module")
def target():
    return resolve("llvm").target


def block_matmul(layout, rows, residual: bool, inputs: int = IN) -> tirx.PrimFunc:
    """``dequantize`` (annotated with its layout, as the gguf scheme emits it) → NT matmul
    (→ ``+ residual``), as passes.fusion leaves it; parameters in TE's order."""
    components = [te.placeholder((OUT, inputs // layout.block * c.per_block), c.dtype, name=c.name)
                  for c in layout.components]
    named = {c.name: p for c, p in zip(layout.components, components)}
    w = te.compute((OUT, inputs), lambda j, col: layout.value(named, j, col), name="dequantize",
                   attrs={LAYOUT_ATTR: layout.name})
    x = te.placeholder((1, rows, inputs), name="x")
    k = te.reduce_axis((0, inputs), name="k")
    y = te.compute((1, rows, OUT), lambda b, i, j: te.sum(x[b, i, k] * w[j, k], axis=k), name="NT_matmul")
    if not residual:
        return te.create_prim_func([*components, x, y])
    r = te.placeholder((1, rows, OUT), name="r")
    out = te.compute(y.shape, lambda b, i, j: y[b, i, j] + r[b, i, j], name="T_add")
    return te.create_prim_func([*components, x, r, out])


@pytest.mark.parametrize("rows, inputs", [(1, IN), (7, IN), (7, 12 * IN)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_block_kernels_match_unscheduled(target, name, rows, inputs, residual):
    """Decode (1 row) and prefill (symbolic rows; 7 = a tile of 6 and a leftover row; 6144 inputs
    in three passes over k), for every layout: the replacement keeps the parameters and computes
    what the plain kernel does."""
    layout = LAYOUTS[name]
    rng = np.random.default_rng(2)
    func = block_matmul(layout, 1 if rows == 1 else tirx.Var("seq_len", "int64"), residual, inputs)
    replacement = replacement_by(BlockMatmul(), func, target, "gemv" if rows == 1 else "gemm")
    raw = random_blocks(layout, OUT, inputs, seed=3)
    parts = layout.split(raw)
    x = rng.standard_normal((1, rows, inputs), dtype="float32")
    args = [parts[c.name] for c in layout.components] + [x]
    args += [rng.standard_normal((1, rows, OUT), dtype="float32")] * residual
    expected = run(func, target, args, (1, rows, OUT))
    actual = run(replacement, target, args, (1, rows, OUT))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # And against numpy on gguf's own dequantized weights.
    weights = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).astype(np.float64)
    reference = x.astype(np.float64) @ weights.T + (args[-1] if residual else 0)
    np.testing.assert_allclose(actual, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def test_other_matmuls_are_left_to_nt_matmul(target):
    """Kernels without a block layout's dequantize (a plain weight, a 4-bit group dequantize) are
    not BlockMatmul's."""
    assert BlockMatmul().apply(nt_matmul(1, OUT, IN), target, False) is None
    assert BlockMatmul().apply(dequantize_nt_matmul(1, OUT, IN), target, False) is None
    assert NTMatmul().apply(nt_matmul(1, OUT, IN), target, False) is not None
