"""Hand-written CPU kernels for the ``llvm`` target. The rules of :mod:`.cpu_schedules` put them
in place of the kernels they replace, with the same parameters and results.

- :func:`group_gemv_cpu` and :func:`group_gemm_cpu`: projections with 4-bit group-quantized
  weights (``passes.quantization``), for one activation row (decode) and for several (prefill).
- :func:`split_qkv_cpu`: TVM's KV-cache kernel that splits the fused qkv, without its RoPE.

The attention kernels are in :mod:`.cpu_attention`.
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

# float32 lanes of one AVX2 vector, and 4-bit codes per uint32: a vector of codes is one word.
F32_LANES = PACKED_LANES = 8
# Codes per block of group_gemv_cpu: one vector of packed words.
GEMV_BLOCK = PACKED_LANES * PACKED_LANES
# Output rows per parallel task of group_gemv_cpu.
_GEMV_ROWS_PER_TASK = 16
# Activation rows by weight rows of group_gemm_cpu's register tile: 12 accumulators, 2 weight
# vectors and 1 activation vector fill 15 of AVX2's 16 registers.
_GEMM_TILE_ROWS, _GEMM_TILE_COLS = 6, 2
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
    per call), and then the lanes' group scales multiply. Each row's lanes are summed at its end. Output rows go in parallel blocks of :data:`_GEMV_ROWS_PER_TASK`."""
    group, x_shape, out_shape = k // groups, shapes[0], shapes[1]
    blocks, lanes, rows = k // GEMV_BLOCK, PACKED_LANES, largest_divisor(n, (_GEMV_ROWS_PER_TASK, 8, 4, 2, 1))

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


def gemm_block_rows(n: int) -> int | None:
    """Weight rows per parallel task of :func:`group_gemm_cpu`: 64, or 32 where that leaves too
    few tasks to share among the threads (576 rows: 18 tasks, not 9)."""
    for rows in (64, 32):
        if n % rows == 0 and (n // rows >= 16 or rows == 32):
            return rows
    return None


def group_gemm_cpu(n: int, k: int, groups: int, shapes: list[tuple], scale_dtype: str, residual: bool) -> tirx.PrimFunc:
    """``out = x . dequantize(packed, scale)^T (+ residual)`` for any number of activation rows
    (prefill), 4-bit codes as in :func:`group_gemv_cpu`, same parameters.

    Each parallel task dequantizes a block of :func:`gemm_block_rows` weight rows once (in
    order, vectorised) and multiplies every activation row with it in tiles of
    :data:`_GEMM_TILE_ROWS` activation rows by :data:`_GEMM_TILE_COLS` weight rows: per 8 values
    of ``k``, 6 + 2 vector loads feed 12 independent FMA chains that stay in registers, and each
    of the 12 outputs is summed across its lanes at the end. Rows left over go one at a time."""
    group, x_shape, out_shape = k // groups, shapes[0], shapes[1]
    block, lanes, cols = gemm_block_rows(n), PACKED_LANES, _GEMM_TILE_COLS
    rows = functools.reduce(lambda a, b: a * b, x_shape[:-1])
    tiles = rows // _GEMM_TILE_ROWS

    @T.macro
    def tile(acc, total, x_rows, weights, out_rows, added_rows, first, count, j0, jb):
        """Outputs of activation rows ``first ..`` (``count`` of them) for weight rows ``jb ..``
        of the task's block (``j0``: the block's first row)."""
        for r, c in T.grid(count, cols):
            for lane in T.vectorized(lanes):
                acc[r, c, lane] = 0.0
        for kv in T.serial(k // lanes):
            for r in T.unroll(count):
                for c in T.unroll(cols):
                    for lane in T.vectorized(lanes):
                        acc[r, c, lane] += (x_rows[(first + r) * k + kv * lanes + lane]
                                            * weights[(jb + c) * k + kv * lanes + lane])
        for r in T.unroll(count):
            for c in T.unroll(cols):
                total[0] = 0.0
                for lane in T.serial(lanes):
                    total[0] += acc[r, c, lane]
                if residual:
                    out_rows[(first + r) * n + j0 + jb + c] = total[0] + added_rows[(first + r) * n + j0 + jb + c]
                else:
                    out_rows[(first + r) * n + j0 + jb + c] = total[0]

    @T.prim_func(s_tir=True)
    def group_gemm(x: T.Buffer(x_shape, "float32"), packed: T.Buffer((n, k // lanes), "uint32"),
                   scale: T.Buffer((n, groups), scale_dtype), added: T.Buffer(out_shape, "float32"),
                   out: T.Buffer(out_shape, "float32")):
        T.func_attr({"tirx.noalias": True})
        x_rows = T.decl_buffer((rows * k,), "float32", data=x.data)
        out_rows = T.decl_buffer((rows * n,), "float32", data=out.data)
        if residual:
            added_rows = T.decl_buffer((rows * n,), "float32", data=added.data)
        else:
            added_rows = out_rows  # never read
        for task in T.parallel(n // block):
            with T.sblock("gemm"):
                if residual:
                    T.reads(x_rows[0:rows * k], packed[0:n, 0:k // lanes], scale[0:n, 0:groups], added_rows[0:rows * n])
                else:
                    T.reads(x_rows[0:rows * k], packed[0:n, 0:k // lanes], scale[0:n, 0:groups])
                T.writes(out_rows[0:rows * n])
                weights = T.sblock_alloc_buffer((block * k,), "float32")
                acc = T.sblock_alloc_buffer((_GEMM_TILE_ROWS, cols, lanes), "float32")
                total = T.sblock_alloc_buffer((1,), "float32")
                j0: T.let[T.int32] = task * block
                for jj, w in T.grid(block, k // lanes):
                    for lane in T.vectorized(lanes):
                        weights[jj * k + w * lanes + lane] = (T.Cast("float32", T.Cast("int32", T.bitwise_and(
                            T.shift_right(packed[j0 + jj, w], T.Cast("uint32", lane * 4)), T.uint32(15)))) - 7.0
                            ) * T.Cast("float32", scale[j0 + jj, w * lanes // group])
                for jb in T.serial(block // cols):
                    for t in T.serial(tiles):
                        tile(acc, total, x_rows, weights, out_rows, added_rows, t * _GEMM_TILE_ROWS,
                             _GEMM_TILE_ROWS, j0, jb * cols)
                    for m in T.serial(tiles * _GEMM_TILE_ROWS, rows):
                        tile(acc, total, x_rows, weights, out_rows, added_rows, m, 1, j0, jb * cols)

    return group_gemm



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


__all__ = ["GROUP_MATMUL_PARAMS", "gemm_block_rows", "group_gemm_cpu", "group_gemv_cpu", "split_qkv_cpu"]
