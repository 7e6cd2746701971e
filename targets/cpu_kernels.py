"""Hand-written CPU kernels for the ``llvm`` target. The rules of :mod:`.cpu_schedules` put them
in place of the kernels they replace, with the same parameters and results.

- :func:`group_gemv_cpu` and :func:`group_gemm_cpu`: projections with 4-bit group-quantized
  weights (``passes.quantization``), for one activation row (decode) and for several (prefill).
- :func:`block_gemv_cpu` and :func:`block_gemm_cpu`: the same for weights in llama.cpp's block
  layouts (``passes.gguf_blocks``), generated from the layout's dequantize expressions; the
  prefill kernels share one tiled multiply (:func:`_dequantized_gemm`).
- :func:`split_qkv_cpu`: TVM's KV-cache kernel that splits the fused qkv, without its RoPE.

The attention kernels are in :mod:`.cpu_attention`.
"""

from __future__ import annotations

import functools
import math

import tvm
from tvm import tirx
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as IB

from relaxlm.passes.gguf_blocks import BlockLayout

# float32 lanes of one AVX2 vector, and 4-bit codes per uint32: a vector of codes is one word.
F32_LANES = PACKED_LANES = 8
# Codes per block of group_gemv_cpu: one vector of packed words.
GEMV_BLOCK = PACKED_LANES * PACKED_LANES
# Output rows per parallel task of group_gemv_cpu.
_GEMV_ROWS_PER_TASK = 16
# Activation rows by weight rows of group_gemm_cpu's register tile: 12 accumulators, 2 weight
# vectors and 1 activation vector fill 15 of AVX2's 16 registers.
_GEMM_TILE_ROWS, _GEMM_TILE_COLS = 6, 2
# Columns of k per pass of the prefill kernels (see gemm_k_chunk).
_GEMM_K_CHUNK = 2048
# Rows ahead whose weights the decode kernels ask the caches for while they read the current one:
# the hardware prefetchers alone left a decode's stream of weights at about 8 GB/s on 2 cores.
_PREFETCH_ROWS = 4
_CACHE_LINE = 64
_WORDS_PER_LINE = _CACHE_LINE // 4
# The parameters of group_gemv_cpu and group_gemm_cpu, in order.
GROUP_MATMUL_PARAMS = ("x", "packed", "scale", "residual", "out")


def largest_divisor(n: int, candidates: tuple[int, ...]) -> int | None:
    """The first of ``candidates`` that divides ``n``."""
    return next((c for c in candidates if n % c == 0), None)


# pylint: disable=invalid-name,unused-argument,too-many-arguments,too-many-locals
def group_gemv_cpu(n: int, k: int, groups: int, shapes: list[tuple], scale_dtype: str, residual: bool) -> tirx.PrimFunc:
    """``out = x . dequantize(packed, scale)^T (+ residual)`` for one activation row ``x`` of ``k``
    float32 values and 4-bit codes (8 per uint32, zero point 7). Its parameters are
    :data:`GROUP_MATMUL_PARAMS`; without ``residual`` the kernel never reads that one, and the caller
    leaves it out. ``k`` is a multiple of :data:`GEMV_BLOCK`.

    A row is read :data:`PACKED_LANES` words (a block of 64 codes) at a time, as one vector whose
    lane ``l`` is word ``l``. Shifting the whole vector by ``4 s`` puts code ``s`` of every word in
    its lane, so a block is 8 immediate shifts, masks, converts and FMAs against ``x`` permuted
    once per call to the same order (``x_planes``). The FMAs go to two partial sums (latency); the
    zero point comes off once per block, as 7 times each word's sum of ``x`` (``zero_sums``, once
    per call), and then the lanes' group scales multiply. Each row's lanes are summed at its end. Output rows go in parallel blocks of :data:`_GEMV_ROWS_PER_TASK`; each row prefetches the codes of the
    one :data:`_PREFETCH_ROWS` ahead."""
    group, x_shape, out_shape = k // groups, shapes[0], shapes[1]
    blocks, lanes, rows = k // GEMV_BLOCK, PACKED_LANES, largest_divisor(n, (_GEMV_ROWS_PER_TASK, 8, 4, 2, 1))
    words_per_row = k // lanes

    @T.macro
    def plane(partial, packed, x_planes, j, b, s):
        # Code s of each of the block's words, times x at that code's position.
        for lane in T.vectorized(lanes):
            partial[lane] += T.Cast("float32", T.Cast("int32", T.bitwise_and(
                T.shift_right(packed[j, b * lanes + lane], T.uint32(4 * s)), T.uint32(15)))
                ) * x_planes[(b * lanes + s) * lanes + lane]

    @T.prim_func(s_tir=True)
    def group_gemv(x: T.Buffer(x_shape, "float32"), packed: T.Buffer((n, k // lanes), "uint32"),
                   scale: T.Buffer((n, groups), scale_dtype), added: T.Buffer(out_shape, "float32"),
                   out: T.Buffer(out_shape, "float32")):
        T.func_attr({"tirx.noalias": True})
        x_row = T.decl_buffer((k,), "float32", data=x.data)
        out_row = T.decl_buffer((n,), "float32", data=out.data)
        # Python-level ifs: without a residual the kernel never touches the parameter (dropped).
        if residual:
            added_row = T.decl_buffer((n,), "float32", data=added.data)
        x_planes = T.alloc_buffer((k,), "float32")
        zero_sums = T.alloc_buffer((k // lanes,), "float32")
        for b, s, w in T.grid(blocks, lanes, lanes):
            with T.sblock("x_planes"):
                vb, vs, vw = T.axis.remap("SSS", [b, s, w])
                x_planes[(vb * lanes + vs) * lanes + vw] = x_row[(vb * lanes + vw) * lanes + vs]
        for w in T.serial(k // lanes):
            with T.sblock("zero_sums"):
                T.reads(x_row[w * lanes:w * lanes + lanes])
                T.writes(zero_sums[w])
                zero_sums[w] = 0.0
                for i in T.serial(lanes):
                    zero_sums[w] += x_row[w * lanes + i]
                zero_sums[w] *= 7.0
        for task in T.parallel(n // rows):
            with T.sblock("gemv"):
                if residual:
                    T.reads(x_planes[0:k], zero_sums[0:k // lanes], packed[0:n, 0:k // lanes], scale[0:n, 0:groups],
                            added_row[0:n])
                else:
                    T.reads(x_planes[0:k], zero_sums[0:k // lanes], packed[0:n, 0:k // lanes], scale[0:n, 0:groups])
                T.writes(out_row[0:n])
                acc = T.sblock_alloc_buffer((lanes,), "float32")
                even = T.sblock_alloc_buffer((lanes,), "float32")
                odd = T.sblock_alloc_buffer((lanes,), "float32")
                total = T.sblock_alloc_buffer((1,), "float32")
                for r in T.serial(rows):
                    j: T.let[T.int32] = task * rows + r
                    ahead: T.let[T.int32] = T.min(j + _PREFETCH_ROWS, n - 1)
                    for line in T.unroll(words_per_row // _WORDS_PER_LINE):
                        T.evaluate(T.call_intrin("void", "tirx.prefetch",
                                                 T.address_of(packed[ahead, line * _WORDS_PER_LINE]), 0, 3, 1))
                    for lane in T.vectorized(lanes):
                        acc[lane] = 0.0
                    for b in T.serial(blocks):
                        for lane in T.vectorized(lanes):
                            even[lane] = 0.0
                            odd[lane] = 0.0
                        for s in T.unroll(lanes // 2):
                            plane(even, packed, x_planes, j, b, 2 * s)
                            plane(odd, packed, x_planes, j, b, 2 * s + 1)
                        for lane in T.vectorized(lanes):
                            acc[lane] += (even[lane] + odd[lane] - zero_sums[b * lanes + lane]) * T.Cast(
                                "float32", scale[j, (b * lanes + lane) * lanes // group])
                    total[0] = 0.0
                    for lane in T.serial(lanes):
                        total[0] += acc[lane]
                    if residual:
                        out_row[j] = total[0] + added_row[j]
                    else:
                        out_row[j] = total[0]

    return group_gemv


# Cephes' exp2f polynomial on [-1/2, 1/2]: 2^f = 1 + f * P(f), within 2e-7 relative.
_EXP2_POLY = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
              2.402264791363012e-1, 6.931472028550421e-1)


def vector_exp2(x):
    """2^x in float32 by a polynomial that LLVM vectorises (``exp2`` and ``tanh`` on a vector
    become one libm call per lane), within 2e-7 relative; 0 below 2^-126, where TVM's "minus
    infinity" attention scores land, and 2^128 above 127."""
    n = T.min(T.floor(x + T.float32(0.5)), T.float32(128))
    f = x - n
    poly = T.float32(_EXP2_POLY[0])
    for coefficient in _EXP2_POLY[1:]:
        poly = poly * f + T.float32(coefficient)
    power = T.reinterpret("float32", T.shift_left(T.Cast("int32", T.max(n, T.float32(-126))) + 127, 23))
    return T.if_then_else(x < T.float32(-126), T.float32(0), (f * poly + T.float32(1)) * power)


def vector_tanh(x):
    """tanh(x) as 1 - 2 / (e^2x + 1) through :func:`vector_exp2`: vectorisable, within 2e-7 of
    float64's tanh (TVM's own llvm lowering of tanh is off by up to 1e-4 relative near 0)."""
    clamped = T.max(T.min(x, T.float32(9)), T.float32(-9))
    return T.float32(1) - T.float32(2) / (vector_exp2(clamped * T.float32(2 * math.log2(math.e))) + T.float32(1))


def vector_sigmoid(x):
    """1 / (1 + e^-x) through :func:`vector_exp2`: vectorisable (TVM's sigmoid is one libm
    ``expf`` per element: SmolLM2's SiLU of 1,536 took 10 us per decode step and layer)."""
    return T.float32(1) / (T.float32(1) + vector_exp2(x * T.float32(-math.log2(math.e))))


def vector_math_legalizations() -> dict:
    """Relax ops legalized through :func:`vector_tanh` and :func:`vector_sigmoid` instead of
    TVM's ``tanh`` and ``sigmoid`` (the GELU of Gemma 3's MLP, its logit soft-capping, the SiLU of
    Llama's and OLMo's), as transformers computes them, for LegalizeOps."""
    from tvm import te

    def elementwise(formula):
        def legalize(bb, call):
            def compute(x):
                return te.compute(x.shape, lambda *i: formula(x(*i).astype("float32")).astype(x.dtype),
                                  name="vector_math")
            return bb.call_te(compute, call.args[0])
        return legalize

    sqrt_2_over_pi = math.sqrt(2 / math.pi)
    return {
        "relax.tanh": elementwise(vector_tanh),
        "relax.nn.gelu_tanh": elementwise(
            lambda x: T.float32(0.5) * x * (T.float32(1) + vector_tanh(
                T.float32(sqrt_2_over_pi) * (x + T.float32(0.044715) * x * x * x)))),
        "relax.sigmoid": elementwise(vector_sigmoid),
        "relax.nn.silu": elementwise(lambda x: x * vector_sigmoid(x)),
    }


def gemm_block_rows(n: int) -> int | None:
    """Weight rows per parallel task of the prefill kernels: 64, or 32 where that leaves too few
    tasks to share among the threads (576 rows: 18 tasks, not 9)."""
    for rows in (64, 32):
        if n % rows == 0 and (n // rows >= 16 or rows == 32):
            return rows
    return None


def group_gemm_cpu(n: int, k: int, groups: int, shapes: list[tuple], scale_dtype: str, residual: bool) -> tirx.PrimFunc:
    """``out = x . dequantize(packed, scale)^T (+ residual)`` for any number of activation rows
    (prefill), 4-bit codes as in :func:`group_gemv_cpu`, same parameters (:func:`_dequantized_gemm`)."""
    group, lanes = k // groups, PACKED_LANES

    def dequantize_rows(weights, weight, j0: tirx.PrimExpr, block: int, k0: tirx.PrimExpr, chunk: int) -> None:
        packed, scale = weight["packed"], weight["scale"]
        with IB.grid(block, chunk // lanes) as (jj, w):
            with IB.vectorized(0, lanes) as lane:
                word = k0 // lanes + w
                code = tirx.bitwise_and(tirx.shift_right(packed[j0 + jj, word], (lane * 4).astype("uint32")),
                                        tirx.const(15, "uint32")).astype("int32").astype("float32")
                IB.buffer_store(weights, (code - 7.0) * scale[j0 + jj, word * lanes // group].astype("float32"),
                                [jj * chunk + w * lanes + lane])

    weight = [("packed", (n, k // lanes), "uint32"), ("scale", (n, groups), scale_dtype)]
    return _dequantized_gemm("group_gemm", n, k, shapes, residual, weight, dequantize_rows, lanes)


def block_gemm_cpu(layout: BlockLayout, n: int, k: int, shapes: list[tuple], residual: bool) -> tirx.PrimFunc:
    """``out = x . w^T (+ residual)`` for any number of activation rows, ``w`` stored in one of
    llama.cpp's block layouts (``passes.gguf_blocks``); parameters ``x``, the layout's components,
    ``residual`` (if any), ``out``. Each task dequantizes its block of rows a vector at a time,
    with the block's positions unrolled so that every load is contiguous (:func:`_dequantized_gemm`)."""
    def dequantize_rows(weights, weight, j0: tirx.PrimExpr, block: int, k0: tirx.PrimExpr, chunk: int) -> None:
        with IB.grid(block, chunk // layout.block) as (jj, b):
            for v in range(layout.block // F32_LANES):
                with IB.vectorized(0, F32_LANES) as lane:
                    e = v * F32_LANES + lane
                    IB.buffer_store(weights, layout.value_in_block(weight, j0 + jj, k0 // layout.block + b, e),
                                    [jj * chunk + b * layout.block + e])

    return _dequantized_gemm("block_gemm", n, k, shapes, residual, _components(layout, n, k), dequantize_rows,
                             layout.block)


def _components(layout: BlockLayout, n: int, k: int) -> list[tuple[str, tuple[int, int], str]]:
    return [(c.name, (n, k // layout.block * c.per_block), c.dtype) for c in layout.components]


def gemm_k_chunk(k: int, unit: int) -> int:
    """Columns of ``k`` per pass of the prefill kernels: all of them up to :data:`_GEMM_K_CHUNK`
    times 2, else the largest multiple of ``unit`` (the weights' block) dividing ``k`` up to
    :data:`_GEMM_K_CHUNK`, so that a pass's activations and weights stay in the core's caches."""
    if k <= 2 * _GEMM_K_CHUNK:
        return k
    fitting = [c for c in range(unit, _GEMM_K_CHUNK + 1, unit) if k % c == 0]
    return fitting[-1] if fitting else k


def _dequantized_gemm(name: str, n: int, k: int, shapes: list[tuple], residual: bool,
                      weight_params: list[tuple[str, tuple, str]], dequantize_rows, unit: int) -> tirx.PrimFunc:
    """The prefill kernel of a quantized weight: parameters ``x``, ``weight_params`` (name,
    shape, dtype), ``residual`` (if any) and ``out``.

    Each parallel task takes a block of :func:`gemm_block_rows` weight rows, in passes over
    :func:`gemm_k_chunk` columns of ``k`` (``unit``: the columns a weight block spans). A pass
    dequantizes the block's columns once (``dequantize_rows(weights, weight buffers, first row,
    rows, first column, columns)``, vectorised) and multiplies every activation row with them in
    tiles of :data:`_GEMM_TILE_ROWS` activation rows by :data:`_GEMM_TILE_COLS` weight rows: per 8
    values of ``k``, 6 + 2 vector loads feed 12 independent FMA chains that stay in registers, and
    each of the 12 outputs is summed across its lanes at the end of the pass, into ``out``. Rows
    left over go one at a time."""
    x_shape, out_shape = shapes[0], shapes[1]
    block, cols, chunk = gemm_block_rows(n), _GEMM_TILE_COLS, gemm_k_chunk(k, unit)
    rows = functools.reduce(lambda a, b: a * b, x_shape[:-1])
    with IRBuilder() as builder:
        with IB.prim_func(s_tir=True):
            IB.func_name(name)
            IB.func_attr({"tirx.noalias": True})
            x = IB.arg("x", IB.buffer(x_shape, "float32"))
            weight = {w: IB.arg(w, IB.buffer(shape, dtype)) for w, shape, dtype in weight_params}
            # Declared even without a residual, which it then never reads: the schedule rules pick
            # the parameters of the kernel they replace by role (GROUP_MATMUL_PARAMS' order).
            added = IB.arg("residual", IB.buffer(out_shape, "float32"))
            out = IB.arg("out", IB.buffer(out_shape, "float32"))
            x_rows = IB.decl_buffer((rows * k,), "float32", data=x.data)
            out_rows = IB.decl_buffer((rows * n,), "float32", data=out.data)
            added_rows = IB.decl_buffer((rows * n,), "float32", data=added.data) if residual else None
            with IB.parallel(0, n // block) as task:
                with IB.sblock("gemm"):
                    IB.reads([x_rows[0:rows * k], *(w[0:w.shape[0], 0:w.shape[1]] for w in weight.values()),
                              *([added_rows[0:rows * n]] if residual else [])])
                    IB.writes([out_rows[0:rows * n]])
                    weights = IB.sblock_alloc_buffer((block * chunk,), "float32")
                    acc = IB.sblock_alloc_buffer((_GEMM_TILE_ROWS, cols, F32_LANES), "float32")
                    total = IB.sblock_alloc_buffer((1,), "float32")
                    j0 = task * block
                    with IB.serial(0, k // chunk) as pass_:
                        dequantize_rows(weights, weight, j0, block, pass_ * chunk, chunk)
                        tile = functools.partial(_gemm_tile, k, n, chunk, pass_, acc, total, x_rows, weights, out_rows,
                                                 added_rows)
                        with IB.serial(0, block // cols) as jb:
                            tiles = rows // _GEMM_TILE_ROWS
                            with IB.serial(0, tiles) as t:
                                tile(t * _GEMM_TILE_ROWS, _GEMM_TILE_ROWS, j0, jb * cols)
                            with IB.serial(tiles * _GEMM_TILE_ROWS, rows) as m:
                                tile(m, 1, j0, jb * cols)
    return builder.get()


def _gemm_tile(k, n, chunk, pass_, acc, total, x_rows, weights, out_rows, added_rows, first, count: int, j0,
               jb) -> None:
    """Outputs of activation rows ``first ..`` (``count`` of them) for weight rows ``jb ..`` of
    the task's block (``j0``: the block's first row), over the columns of pass ``pass_``: the
    first pass writes them (plus the residual), the others add to them."""
    lanes, cols = F32_LANES, _GEMM_TILE_COLS
    for r in range(count):
        for c in range(cols):
            with IB.vectorized(0, lanes) as lane:
                IB.buffer_store(acc, 0.0, [r, c, lane])
    with IB.serial(0, chunk // lanes) as kv:
        for r in range(count):
            for c in range(cols):
                with IB.vectorized(0, lanes) as lane:
                    IB.buffer_store(acc, acc[r, c, lane] + x_rows[(first + r) * k + pass_ * chunk + kv * lanes + lane]
                                    * weights[(jb + c) * chunk + kv * lanes + lane], [r, c, lane])
    for r in range(count):
        for c in range(cols):
            IB.buffer_store(total, 0.0, [0])
            with IB.serial(0, lanes) as lane:
                IB.buffer_store(total, total[0] + acc[r, c, lane], [0])
            index = (first + r) * n + j0 + jb + c
            start = added_rows[index] if added_rows is not None else tirx.const(0.0, "float32")
            IB.buffer_store(out_rows, total[0] + tirx.if_then_else(pass_ == 0, start, out_rows[index]), [index])


def block_gemv_cpu(layout: BlockLayout, n: int, k: int, shapes: list[tuple], residual: bool) -> tirx.PrimFunc:
    """``out = x . w^T (+ residual)`` for one activation row (decode), ``w`` in a llama.cpp block
    layout; the parameters of :func:`block_gemm_cpu`.

    Per sub-block (the weights sharing a scale) the codes are multiplied with ``x`` in vectors
    (positions unrolled: contiguous loads, constant shifts), then scaled once:
    ``x . w = sum scale * (x . code) + offset * sum(x)``, the sums of ``x`` per sub-block taken
    once per call for the layouts with an offset. Output rows go in parallel blocks; each row
    prefetches the one :data:`_PREFETCH_ROWS` ahead."""
    blocks, subs, lanes = k // layout.block, layout.block // layout.sub, F32_LANES
    rows = largest_divisor(n, (_GEMV_ROWS_PER_TASK, 8, 4, 2, 1))
    with IRBuilder() as builder:
        with IB.prim_func(s_tir=True):
            x_row, weight, out_row, added_row = block_kernel_params("block_gemv", layout, n, k, shapes, residual)
            sums = _sub_block_sums(x_row, k, layout.sub) if layout.offset is not None else None
            with IB.parallel(0, n // rows) as task:
                with IB.sblock("gemv"):
                    IB.reads([x_row[0:k], *(w[0:w.shape[0], 0:w.shape[1]] for w in weight.values()),
                              *([sums[0:k // layout.sub]] if sums is not None else []),
                              *([added_row[0:n]] if residual else [])])
                    IB.writes([out_row[0:n]])
                    acc = IB.sblock_alloc_buffer((lanes,), "float32")
                    part = IB.sblock_alloc_buffer((lanes,), "float32")
                    total = IB.sblock_alloc_buffer((1,), "float32")
                    with IB.serial(0, rows) as r:
                        j = task * rows + r
                        _prefetch_row(weight.values(), tirx.min(j + _PREFETCH_ROWS, n - 1))
                        with IB.vectorized(0, lanes) as lane:
                            IB.buffer_store(acc, 0.0, [lane])
                        IB.buffer_store(total, 0.0, [0])
                        with IB.serial(0, blocks) as b:
                            for s in range(subs):
                                with IB.vectorized(0, lanes) as lane:
                                    IB.buffer_store(part, 0.0, [lane])
                                for v in range(layout.sub // lanes):
                                    with IB.vectorized(0, lanes) as lane:
                                        e = s * layout.sub + v * lanes + lane
                                        code = layout.code(weight, j, b, e).astype("float32")
                                        IB.buffer_store(part, part[lane] + x_row[b * layout.block + e] * code, [lane])
                                with IB.vectorized(0, lanes) as lane:
                                    IB.buffer_store(acc, acc[lane] + part[lane] * layout.scale(weight, j, b, s), [lane])
                                if sums is not None:
                                    IB.buffer_store(total, total[0] + layout.offset(weight, j, b, s)
                                                    * sums[b * subs + s], [0])
                        with IB.serial(0, lanes) as lane:
                            IB.buffer_store(total, total[0] + acc[lane], [0])
                        IB.buffer_store(out_row, total[0] + added_row[j] if residual else total[0], [j])
    return builder.get()




def block_kernel_params(name: str, layout: BlockLayout, n: int, k: int, shapes: list[tuple], residual: bool,
                        rows=1):
    """Inside ``IB.prim_func``: the name and parameters of a kernel of block weights (``x``, the
    layout's components, ``residual``, ``out``: :func:`block_gemm_cpu`'s order); returns ``x``
    (``rows * k``), the components by name, ``out`` and ``residual`` (``rows * n``; None without
    one) as flat buffers."""
    IB.func_name(name)
    IB.func_attr({"tirx.noalias": True})
    x = IB.arg("x", IB.buffer(shapes[0], "float32"))
    weight = {c.name: IB.arg(c.name, IB.buffer(shape, c.dtype))
              for c, (_, shape, _) in zip(layout.components, _components(layout, n, k))}
    added = IB.arg("residual", IB.buffer(shapes[1], "float32"))  # as in _dequantized_gemm
    out = IB.arg("out", IB.buffer(shapes[1], "float32"))
    return (IB.decl_buffer((rows * k,), "float32", data=x.data), weight,
            IB.decl_buffer((rows * n,), "float32", data=out.data),
            IB.decl_buffer((rows * n,), "float32", data=added.data) if residual else None)


def _prefetch_row(components, j) -> None:
    """Prefetch row ``j`` of every component, one cache line at a time."""
    for buffer in components:
        row_bytes = int(buffer.shape[1]) * tvm.DataType(buffer.dtype).bits // 8
        for offset in range(0, row_bytes, _CACHE_LINE):
            element = offset * 8 // tvm.DataType(buffer.dtype).bits
            IB.evaluate(tirx.call_intrin("void", "tirx.prefetch", tirx.address_of(buffer[j, element]), 0, 3, 1))


def _sub_block_sums(x_row, k: int, sub: int):
    """``sum(x)`` over each ``sub`` consecutive values, once per call."""
    sums = IB.alloc_buffer((k // sub,), "float32")
    with IB.serial(0, k // sub) as g:
        IB.buffer_store(sums, 0.0, [g])
        with IB.serial(0, sub) as i:
            IB.buffer_store(sums, sums[g] + x_row[g * sub + i], [g])
    return sums


# Tokens above which the qkv split runs in parallel (one decode token does not pay for the pool).
_SPLIT_PARALLEL_TOKENS = 16


@T.macro
def _split_token(qkv, q, k, v, s):
    for h, i in T.grid(q.shape[1], q.shape[2]):
        q[s, h, i] = qkv[s, h, i]
    for h, i in T.grid(k.shape[1], k.shape[2]):
        k[s, h, i] = qkv[s, q.shape[1] + h, i]
        v[s, h, i] = qkv[s, q.shape[1] + k.shape[1] + h, i]


def split_qkv_cpu(h_q: int, h_kv: int, d: int, dtype: str) -> tirx.PrimFunc:
    """TVM's KV-cache kernel that splits the fused qkv into q, k and v before attention, with its
    signature. TVM's also applies RoPE per element (a branch, and a cos and sin when on); relaxlm
    applies RoPE in the model (``apply_rope`` is 0), so this one only copies."""

    @T.prim_func(s_tir=True)
    def fused_rope(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle,
                   var_v: T.handle, apply_rope: T.int64):
        seq_len = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, h_q + 2 * h_kv, d), dtype)
        T.match_buffer(var_position_map, (seq_len,), "int32", offset_factor=1)
        q = T.match_buffer(var_q, (seq_len, h_q, d), dtype)
        k = T.match_buffer(var_k, (seq_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (seq_len, h_kv, d), dtype)
        T.Assert(apply_rope == 0, "relaxlm's CPU KV cache expects RoPE applied by the model")
        with T.sblock("split"):
            T.reads(qkv[0:seq_len, 0:h_q + 2 * h_kv, 0:d])
            T.writes(q[0:seq_len, 0:h_q, 0:d], k[0:seq_len, 0:h_kv, 0:d], v[0:seq_len, 0:h_kv, 0:d])
            if seq_len > _SPLIT_PARALLEL_TOKENS:
                for s in T.parallel(seq_len):
                    _split_token(qkv, q, k, v, s)
            else:
                for s in T.serial(seq_len):
                    _split_token(qkv, q, k, v, s)

    return fused_rope


__all__ = ["GROUP_MATMUL_PARAMS", "block_gemm_cpu", "block_gemv_cpu", "gemm_block_rows", "group_gemm_cpu",
           "group_gemv_cpu", "split_qkv_cpu"]
