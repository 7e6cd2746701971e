"""Projections of llama.cpp's block layouts with integer activations and integer dot products:
:func:`block_gemv_integer_cpu` (decode: one activation row) and :func:`block_gemm_integer_cpu`
(prefill: several).

The float kernels of :mod:`.cpu_kernels` convert every code to float32 and multiply: about five
vector instructions per eight weights, so decode is bound by the core, not by the memory the
weights stream from, and prefill by float32 FMAs. Here each activation row is rounded once per
call to integers of ``bits`` with a float scale per :data:`X_BLOCK` values (``qx = round(x /
dx)``, ``dx = max|x| / (2^(bits-1) - 1)``), and each run of 32 codes (16 for Q6_K, whose scales
cover 16) meets its activations in integer dot-product instructions (4 products per int32 lane
at 8 bits, 2 at 16):

- int16 (``vpdpwssd`` with VNNI, ``vpmaddwd`` on AVX2): ~3e-5 of the largest output off (the
  bundled models' perplexity unchanged to 5 digits); the CPU default.
- int8 (``vpdpbusd``, or ``vpmaddubsw`` + ``vpmaddwd``): llama.cpp's Q8 activations, ~0.7% of the
  largest output off (SmolLM2's perplexity +0.72%), faster still.

The instructions take unsigned codes, so a layout's codes enter as ``code - code_min`` (0 ..
2^bits - 1); the accumulator starts from ``code_min * (the run's sum of qx)``, computed once per
call, which makes the dot exactly ``sum(qx * code)``. Per run, then::

    x . w  ~=  scale * dx * sum(qx * code)  +  offset * sum(dx * qx)

that is, the rounded ``x`` times the weights: the rounding of ``x`` is the only approximation.
"""

from __future__ import annotations

import dataclasses
import functools

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as IB
from tvm.target import Target, codegen

from relaxlm.passes.gguf_blocks import BlockLayout

from .cpu_kernels import (_GEMV_ROWS_PER_TASK, _PREFETCH_ROWS, _prefetch_row, block_kernel_params, gemm_block_rows,
                          gemm_k_chunk, largest_divisor)

# Activations per scale (llama.cpp's Q8_0 block).
X_BLOCK = 32
# What ``--activations`` names, in bits.
ACTIVATION_BITS = {"int8": 8, "int16": 16}
# Codes per integer dot product: one 256-bit vector of bytes.
_RUN = 32
_PIECE = 16


@dataclasses.dataclass(frozen=True)
class DotProduct:
    """``acc + sum(codes * qx)`` per int32 lane, with the integer instructions of one kind of CPU."""

    name: str
    # LLVM features it needs, all of them.
    features: tuple[str, ...]
    # vpdpbusd / vpdpwssd (VNNI), else vpmaddubsw / vpmaddwd (AVX2).
    vnni: bool
    # int32 lanes of the prefill kernel's vectors: 16 with AVX-512's 32 registers, else 8.
    gemm_lanes: int = 8

    def saturates_on(self, layout: BlockLayout, bits: int) -> bool:
        """Whether int8 products could overflow vpmaddubsw's int16 pairs (2 * 255 * 127 for
        Q8_0's codes; the other layouts' stay below 2^15)."""
        return bits == 8 and not self.vnni and 2 * (2 ** layout.code_bits - 1) * 127 > 32767

    def __call__(self, acc, codes, qx, column, run: int, bits: int):
        """``acc`` plus codes ``0 .. run`` (bytes) times ``qx[column:]`` (int``bits``): a run of a
        row's weights (decode's lanes are columns)."""
        if bits == 8:
            return self.multiply(acc, codes.vload([0], f"uint8x{run}"), qx.vload([column], f"int8x{run}"), 8, run // 4)
        half = run // 2  # int16: each half of the run's codes widened to words
        for h in range(2):
            c = tirx.Cast(f"int16x{half}", codes.vload([h * half], f"uint8x{half}"))
            acc = self.multiply(acc, c, qx.vload([column + h * half], f"int16x{half}"), 16, run // 4)
        return acc

    def multiply(self, acc, codes, x, bits: int, lanes: int):
        """``acc`` (``lanes`` int32) plus, per lane, the sum of its ``32 // bits`` products of
        ``codes`` (uint8 for 8 bits, int16 for 16; 0 .. 255) and ``x`` (int``bits``)."""
        width = {16: "512", 8: "256", 4: "128"}[lanes]
        if bits == 8 and self.vnni:
            return tirx.call_llvm_pure_intrin(f"int32x{lanes}", f"llvm.x86.avx512.vpdpbusd.{width}", acc, codes, x)
        if bits == 8:
            pairs = {8: "llvm.x86.avx2.pmadd.ub.sw", 4: "llvm.x86.ssse3.pmadd.ub.sw.128"}[lanes]
            return acc + _pairs_to_words(tirx.call_llvm_pure_intrin(f"int16x{2 * lanes}", pairs, codes, x),
                                         tirx.Broadcast(tirx.const(1, "int16"), 2 * lanes), lanes)
        if self.vnni:
            return tirx.call_llvm_pure_intrin(f"int32x{lanes}", f"llvm.x86.avx512.vpdpwssd.{width}", acc, codes, x)
        return acc + _pairs_to_words(codes, x, lanes)


def _pairs_to_words(a, b, lanes: int):
    """vpmaddwd: int16 ``a * b``, adjacent pairs summed into int32 lanes."""
    name = {8: "llvm.x86.avx2.pmadd.wd", 4: "llvm.x86.sse2.pmadd.wd"}[lanes]
    return tirx.call_llvm_pure_intrin(f"int32x{lanes}", name, a, b)


# Best first: AVX-512 VNNI (with its 256-bit forms), AVX-VNNI (Alder Lake and later), AVX2.
DOT_PRODUCTS = (
    DotProduct("avx512vnni", ("avx512vnni", "avx512vl"), vnni=True, gemm_lanes=16),
    DotProduct("avxvnni", ("avxvnni",), vnni=True),
    DotProduct("avx2", ("avx2",), vnni=False),
)


def dot_product_for(target: Target, layout: BlockLayout, bits: int = 8) -> DotProduct | None:
    """The best integer dot product ``target`` has that cannot overflow on ``layout``'s codes
    with activations of ``bits``, or None."""
    if target.kind.name != "llvm":
        return None
    for dot in DOT_PRODUCTS:
        if all(codegen.target_has_features(f, target) for f in dot.features):
            return None if dot.saturates_on(layout, bits) else dot
    return None


def integer_kernel_for(target: Target, layout: BlockLayout, bits: int) -> tuple[DotProduct, int] | None:
    """The dot product and activation width for ``layout`` when ``bits`` are asked: ``bits``, or
    16 where 8-bit products could overflow (Q8_0 on AVX2); None without integer dot products."""
    for width in (bits, 16) if bits == 8 else (bits,):
        dot = dot_product_for(target, layout, width)
        if dot is not None:
            return dot, width
    return None


def integer_gemv_supports(layout: BlockLayout, k: int) -> bool:
    """Whether the integer kernels (:func:`block_gemv_integer_cpu`, :func:`block_gemm_integer_cpu`)
    take rows of ``k`` weights in ``layout``."""
    return k % X_BLOCK == 0 and k % layout.block == 0 and _run_of(layout) % _PIECE == 0


def _run_of(layout: BlockLayout) -> int:
    """Codes per integer dot: 32, or the layout's scale group when smaller (Q6_K: 16)."""
    return min(_RUN, layout.sub)


# pylint: disable=too-many-locals,too-many-arguments
def block_gemv_integer_cpu(layout: BlockLayout, n: int, k: int, shapes: list[tuple], residual: bool,
                           dot: DotProduct, bits: int = 8):
    """``out ~= x . w^T (+ residual)`` for one activation row, ``w`` in a llama.cpp block layout,
    with activations rounded to ``bits`` (module docstring); the parameters of ``block_gemv_cpu``.

    Runs go two at a time into two float accumulators (the FMA's latency), each run's codes built
    in 16-byte pieces with constant shifts (contiguous loads) as in the float kernel. Output rows
    go in parallel blocks; each row prefetches the one :data:`_PREFETCH_ROWS` ahead."""
    run, blocks, subs = _run_of(layout), k // layout.block, layout.block // layout.sub
    lanes, runs_per_sub = run // 4, layout.sub // run
    # Blocks per loop step: enough for two runs, so that each run's accumulator is a constant.
    step = 2 if layout.block == run and blocks % 2 == 0 else 1
    rows = largest_divisor(n, (_GEMV_ROWS_PER_TASK, 8, 4, 2, 1))
    with IRBuilder() as builder:
        with IB.prim_func(s_tir=True):
            x_row, weight, out_row, added_row = block_kernel_params("block_gemv_integer", layout, n, k, shapes,
                                                                    residual)
            qx, dx, start = _quantized_activations(x_row, k, -layout.code_min, bits)
            sums = _rounded_sums(qx, dx, k, layout.sub) if layout.offset is not None else None
            with IB.parallel(0, n // rows) as task:
                with IB.sblock("gemv"):
                    IB.reads([qx[0:k], dx[0:k // X_BLOCK], start[0:k // 4],
                              *(w[0:w.shape[0], 0:w.shape[1]] for w in weight.values()),
                              *([sums[0:k // layout.sub]] if sums is not None else []),
                              *([added_row[0:n]] if residual else [])])
                    IB.writes([out_row[0:n]])
                    acc = IB.sblock_alloc_buffer((2 * lanes,), "float32")
                    codes = IB.sblock_alloc_buffer((run,), "uint8")
                    total = IB.sblock_alloc_buffer((1,), "float32")
                    with IB.serial(0, rows) as r:
                        j = task * rows + r
                        _prefetch_row(weight.values(), tirx.min(j + _PREFETCH_ROWS, n - 1))
                        with IB.vectorized(0, 2 * lanes) as lane:
                            IB.buffer_store(acc, 0.0, [lane])
                        IB.buffer_store(total, 0.0, [0])
                        with IB.serial(0, blocks // step) as pair:
                            for t in range(step):
                                b = pair * step + t
                                for s in range(subs):
                                    for u in range(runs_per_sub):
                                        e0 = s * layout.sub + u * run
                                        parity = (t + (s * runs_per_sub + u)) % 2
                                        _one_run(layout, dot, weight, j, b, s, e0, run, codes, qx, dx, start, acc,
                                                 parity, bits)
                                    if sums is not None:
                                        IB.buffer_store(total, total[0] + layout.offset(weight, j, b, s)
                                                        * sums[b * subs + s], [0])
                        with IB.serial(0, 2 * lanes) as lane:
                            IB.buffer_store(total, total[0] + acc[lane], [0])
                        IB.buffer_store(out_row, total[0] + added_row[j] if residual else total[0], [j])
    return builder.get()


def _one_run(layout, dot, weight, j, b, s, e0: int, run: int, codes, qx, dx, start, acc, parity: int,
             bits: int) -> None:
    """``acc[parity] += scale * dx * sum(qx * code)`` over codes ``e0 .. e0 + run`` of block ``b``."""
    lanes = run // 4
    for piece in range(run // _PIECE):
        with IB.vectorized(0, _PIECE) as lane:
            e = e0 + piece * _PIECE + lane
            IB.buffer_store(codes, (layout.code(weight, j, b, e) - layout.code_min).astype("uint8"),
                            [piece * _PIECE + lane])
    column = b * layout.block + e0
    summed = dot(start.vload([column // 4], f"int32x{lanes}"), codes, qx, column, run, bits)
    factor = layout.scale(weight, j, b, s) * dx[column // X_BLOCK]
    here = tirx.Ramp(parity * lanes, 1, lanes)
    IB.buffer_store(acc, tirx.BufferLoad(acc, [here]) + tirx.Cast(f"float32x{lanes}", summed)
                    * tirx.Broadcast(factor, lanes), [here])


# Activation rows per tile of the prefill kernel, by its vectors' lanes: as many int and float
# accumulators, the codes and a broadcast activation word stay within AVX2's 16 vector registers
# (8 lanes) or AVX-512's 32 (16 lanes).
_TILE_ROWS = {8: 4, 16: 8}


# pylint: disable=too-many-locals,too-many-arguments,too-many-statements
def block_gemm_integer_cpu(layout: BlockLayout, n: int, k: int, shapes: list[tuple], residual: bool,
                           dot: DotProduct, bits: int = 8):
    """``out ~= x . w^T (+ residual)`` for any number of activation rows (prefill), activations
    rounded as in :func:`block_gemv_integer_cpu`; the parameters of ``block_gemm_cpu``.

    Here a vector's lanes are weight rows (``DotProduct.gemm_lanes``: 8 or 16), not columns, so
    that nothing is summed across lanes:
    each task stages its block of weight rows, a pass of columns at a time, as unsigned codes
    interleaved by ``32 // bits`` columns (one int32 word per row and lane) with their scales
    (and offsets) per run; then for tiles of :data:`_TILE_ROWS` activation rows, each word of
    an activation row is broadcast to all lanes and one dot-product instruction adds its
    products with a vector of rows' codes. A run's int32 sums are scaled into float accumulators
    (the rows' scales times the activation's ``dx``) and written to a vector of outputs at once."""
    rows = functools.reduce(lambda a, b: a * b, shapes[0][:-1])
    run, span = _run_of(layout), 32 // bits
    assert layout.offset is None or layout.sub == run
    block, chunk = gemm_block_rows(n), gemm_k_chunk(k, layout.block)
    runs, code_dtype = chunk // run, {8: "uint8", 16: "int16"}[bits]
    lanes = dot.gemm_lanes
    tile_rows = _TILE_ROWS[lanes]
    with IRBuilder() as builder:
        with IB.prim_func(s_tir=True):
            x_rows, weight, out_rows, added_rows = block_kernel_params("block_gemm_integer", layout, n, k, shapes,
                                                                       residual, rows)
            rounded = _rounded_rows(x_rows, rows, k, run, bits)
            with IB.parallel(0, n // block) as task:
                with IB.sblock("gemm"):
                    IB.reads([x_rows[0:rows * k], *(w[0:w.shape[0], 0:w.shape[1]] for w in weight.values()),
                              *(r[0:r.shape[0]] for r in rounded),
                              *([added_rows[0:rows * n]] if residual else [])])
                    IB.writes([out_rows[0:rows * n]])
                    codes = IB.sblock_alloc_buffer((chunk * block,), code_dtype)
                    piece = IB.sblock_alloc_buffer((_PIECE,), code_dtype)
                    scales = IB.sblock_alloc_buffer((runs * block,), "float32")
                    offsets = IB.sblock_alloc_buffer((runs * block,), "float32") if layout.offset else None
                    int_acc = IB.sblock_alloc_buffer((tile_rows * lanes,), "int32")
                    acc = IB.sblock_alloc_buffer((tile_rows * lanes,), "float32")
                    j0 = task * block
                    with IB.serial(0, k // chunk) as pass_:
                        _stage_weights(layout, weight, j0, block, pass_ * chunk, chunk, span, codes, piece, scales,
                                       offsets)
                        tile = functools.partial(_gemm_tile, layout, dot, bits, lanes, k, n, chunk, run, span, pass_,
                                                 codes, scales, offsets, rounded, int_acc, acc, block, j0,
                                                 out_rows, added_rows)
                        with IB.serial(0, block // lanes) as g:
                            with IB.serial(0, rows // tile_rows) as t:
                                tile(g, t * tile_rows, tile_rows)
                            with IB.serial(rows // tile_rows * tile_rows, rows) as m:
                                tile(g, m, 1)
    return builder.get()


def _store(buffer, at, vector, lanes: int) -> None:
    """Store ``vector`` (of ``lanes``) at ``buffer[at:]``."""
    IB.buffer_store(buffer, vector, [tirx.Ramp(at, 1, lanes)])


def _rounded_rows(x_rows, rows, k: int, run: int, bits: int):
    """Every activation row rounded once per call, rows in parallel: ``qx``, ``dx`` per
    :data:`X_BLOCK`, and per run ``sum(qx)`` (int32) and ``sum(qx * dx)`` (float32)."""
    qx = IB.alloc_buffer((rows * k,), f"int{bits}")
    dx = IB.alloc_buffer((rows * (k // X_BLOCK),), "float32")
    qx_sums = IB.alloc_buffer((rows * (k // run),), "int32")
    x_sums = IB.alloc_buffer((rows * (k // run),), "float32")
    with IB.parallel(0, rows) as m:
        with IB.sblock("round"):
            IB.reads([x_rows[m * k:(m + 1) * k]])
            IB.writes([qx[m * k:(m + 1) * k], dx[m * (k // X_BLOCK):(m + 1) * (k // X_BLOCK)],
                       qx_sums[m * (k // run):(m + 1) * (k // run)], x_sums[m * (k // run):(m + 1) * (k // run)]])
            largest = IB.sblock_alloc_buffer((1,), "float32")
            total = IB.sblock_alloc_buffer((1,), "int32")
            with IB.serial(0, k // X_BLOCK) as g:
                base = m * k + g * X_BLOCK
                _round_block(x_rows, base, qx, dx, m * (k // X_BLOCK) + g, largest, bits)
                for u in range(X_BLOCK // run):
                    IB.buffer_store(total, 0, [0])
                    with IB.serial(0, run) as i:
                        IB.buffer_store(total, total[0] + qx[base + u * run + i].astype("int32"), [0])
                    at = m * (k // run) + (g * X_BLOCK + u * run) // run
                    IB.buffer_store(qx_sums, total[0], [at])
                    IB.buffer_store(x_sums, total[0].astype("float32") * dx[m * (k // X_BLOCK) + g], [at])
    return qx, dx, qx_sums, x_sums


def _stage_weights(layout, weight, j0, block: int, k0, chunk: int, span: int, codes, piece, scales,
                   offsets) -> None:
    """The task's ``block`` weight rows from ``j0``, columns ``k0 .. k0 + chunk``: unsigned codes
    at ``codes[((column // span) * block + row) * span + column % span]`` (a row's ``span``
    columns in one int32 word, consecutive rows' words in one vector), and each run's scale and offset at
    ``[run * block + row]``. Codes are made :data:`_PIECE` at a time along the row (contiguous
    loads, constant shifts) in ``piece``, then stored a word at a time."""
    words = IB.decl_buffer((chunk * block // span,), "int32", data=codes.data)
    piece_words = IB.decl_buffer((_PIECE // span,), "int32", data=piece.data)
    run = _run_of(layout)
    with IB.grid(block, chunk // layout.block) as (jj, b):
        kb, j = k0 // layout.block + b, j0 + jj
        for p in range(layout.block // _PIECE):
            with IB.vectorized(0, _PIECE) as lane:
                code = layout.code(weight, j, kb, p * _PIECE + lane) - layout.code_min
                IB.buffer_store(piece, code.astype(piece.dtype), [lane])
            for w in range(_PIECE // span):
                at = (b * layout.block + p * _PIECE) // span * block + w * block + jj
                IB.buffer_store(words, piece_words[w], [at])
        for s in range(layout.block // layout.sub):
            for u in range(layout.sub // run):
                at = (b * layout.block + s * layout.sub + u * run) // run * block + jj
                IB.buffer_store(scales, layout.scale(weight, j, kb, s), [at])
                if offsets is not None:
                    IB.buffer_store(offsets, layout.offset(weight, j, kb, s), [at])


def _gemm_tile(layout, dot, bits: int, lanes: int, k: int, n: int, chunk: int, run: int, span: int, pass_, codes,
               scales, offsets, rounded, int_acc, acc, block: int, j0, out_rows, added_rows, g, first,
               count: int) -> None:
    """Outputs of activation rows ``first ..`` (``count``) for weight rows ``j0 + lanes * g ..`` over the
    columns of pass ``pass_``: the first pass starts from the residual (or 0), the others from ``out``."""
    qx, dx, qx_sums, x_sums = rounded
    words = IB.decl_buffer((qx.shape[0] // span,), "int32", data=qx.data)
    code_vector = f"{codes.dtype}x{lanes * span}"
    x_vector = f"int{bits}x{lanes * span}"
    for r in range(count):
        index = (first + r) * n + j0 + g * lanes
        start = (added_rows.vload([index], f"float32x{lanes}") if added_rows is not None
                 else tirx.Broadcast(tirx.const(0.0, "float32"), lanes))
        previous = tirx.Select(tirx.Broadcast(pass_ == 0, lanes), start, out_rows.vload([index], f"float32x{lanes}"))
        _store(acc, r * lanes, previous, lanes)
    with IB.serial(0, chunk // run) as u:
        column = pass_ * chunk + u * run
        for r in range(count):
            at = (first + r) * (k // run) + column // run
            _store(int_acc, r * lanes, tirx.Broadcast(qx_sums[at] * layout.code_min, lanes), lanes)
        for w in range(run // span):
            weights = codes.vload([((u * run // span + w) * block + g * lanes) * span], code_vector)
            for r in range(count):
                word = tirx.Broadcast(words[((first + r) * k + column) // span + w], lanes)
                here = int_acc.vload([r * lanes], f"int32x{lanes}")
                summed = dot.multiply(here, weights, tirx.reinterpret(x_vector, word), bits, lanes)
                _store(int_acc, r * lanes, summed, lanes)
        scale = scales.vload([u * block + g * lanes], f"float32x{lanes}")
        offset = offsets.vload([u * block + g * lanes], f"float32x{lanes}") if offsets is not None else None
        for r in range(count):
            factor = scale * tirx.Broadcast(dx[(first + r) * (k // X_BLOCK) + column // X_BLOCK], lanes)
            total = (acc.vload([r * lanes], f"float32x{lanes}")
                     + tirx.Cast(f"float32x{lanes}", int_acc.vload([r * lanes], f"int32x{lanes}")) * factor)
            if offset is not None:
                total = total + offset * tirx.Broadcast(x_sums[(first + r) * (k // run) + column // run], lanes)
            _store(acc, r * lanes, total, lanes)
    for r in range(count):
        _store(out_rows, (first + r) * n + j0 + g * lanes, acc.vload([r * lanes], f"float32x{lanes}"), lanes)


def _round_block(x, base, qx, dx, dx_at, largest, bits: int) -> None:
    """``x[base:base + X_BLOCK]`` rounded: ``qx`` at the same place, its scale at ``dx[dx_at]``
    (``largest``: a one-value scratch buffer)."""
    top = float(2 ** (bits - 1) - 1)
    IB.buffer_store(largest, 0.0, [0])
    with IB.serial(0, X_BLOCK) as i:
        IB.buffer_store(largest, tirx.max(largest[0], tirx.abs(x[base + i])), [0])
    IB.buffer_store(dx, largest[0] / top, [dx_at])
    inverse = tirx.if_then_else(largest[0] > 0.0, top / largest[0], tirx.const(0.0, "float32"))
    with IB.vectorized(0, X_BLOCK) as i:
        IB.buffer_store(qx, tirx.round(x[base + i] * inverse).astype(f"int{bits}"), [base + i])


def _quantized_activations(x_row, k: int, bias: int, bits: int):
    """``qx`` (int``bits``), ``dx`` (one float per :data:`X_BLOCK`) and, per 4 values,
    ``-bias * sum(qx)`` (int32: where each dot's accumulator starts), once per call."""
    qx = IB.alloc_buffer((k,), f"int{bits}")
    dx = IB.alloc_buffer((k // X_BLOCK,), "float32")
    start = IB.alloc_buffer((k // 4,), "int32")
    largest = IB.alloc_buffer((1,), "float32")
    with IB.serial(0, k // X_BLOCK) as g:
        _round_block(x_row, g * X_BLOCK, qx, dx, g, largest, bits)
    with IB.serial(0, k // 4) as w:
        quad = sum(qx[4 * w + i].astype("int32") for i in range(1, 4)) + qx[4 * w].astype("int32")
        IB.buffer_store(start, quad * -bias, [w])
    return qx, dx, start


def _rounded_sums(qx, dx, k: int, sub: int):
    """``sum(qx * dx)`` over each ``sub`` consecutive values, once per call: the offsets meet the
    rounded activations too, so that each weight is multiplied by the same rounded ``x`` (as in
    llama.cpp; rounding errors then meet ``w``, not the larger ``scale * code``)."""
    sums = IB.alloc_buffer((k // sub,), "float32")
    with IB.serial(0, k // sub) as g:
        IB.buffer_store(sums, 0.0, [g])
        with IB.serial(0, sub) as i:
            e = g * sub + i
            IB.buffer_store(sums, sums[g] + qx[e].astype("float32") * dx[e // X_BLOCK], [g])
    return sums


def has_integer_dots(target: Target) -> bool:
    """Whether ``target`` has any of :data:`DOT_PRODUCTS` (AVX2 at least)."""
    return target.kind.name == "llvm" and any(
        all(codegen.target_has_features(f, target) for f in dot.features) for dot in DOT_PRODUCTS)


__all__ = ["ACTIVATION_BITS", "DOT_PRODUCTS", "DotProduct", "X_BLOCK", "block_gemm_integer_cpu",
           "block_gemv_integer_cpu", "dot_product_for", "has_integer_dots", "integer_gemv_supports",
           "integer_kernel_for"]
