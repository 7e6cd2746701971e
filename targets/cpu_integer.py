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

    def __call__(self, acc, codes, at, qx, column, run: int, bits: int):
        """``acc`` plus codes ``at .. at + run`` (bytes) times ``qx[column:]`` (int``bits``): a run
        of a row's weights (decode's lanes are columns)."""
        if bits == 8:
            return self.multiply(acc, codes.vload([at], f"uint8x{run}"), qx.vload([column], f"int8x{run}"), 8,
                                 run // 4)
        half = run // 2  # int16: each half of the run's codes widened to words
        for h in range(2):
            c = tirx.Cast(f"int16x{half}", codes.vload([at + h * half], f"uint8x{half}"))
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


# Runs whose integer sums are reduced into one vector of as many lanes before they meet their scales.
_GROUP = 8


# pylint: disable=too-many-locals,too-many-arguments
def block_gemv_integer_cpu(layout: BlockLayout, n: int, k: int, shapes: list[tuple], residual: bool,
                           dot: DotProduct, bits: int = 8):
    """``out ~= x . w^T (+ residual)`` for one activation row, ``w`` in a llama.cpp block layout,
    with activations rounded to ``bits`` (module docstring); the parameters of ``block_gemv_cpu``.

    Each run's codes are built in 16-byte pieces with constant shifts (contiguous loads), as in
    the float kernel, and meet the activations in integer dot products. The int32 sums of
    :data:`_GROUP` runs are transposed into one vector (a lane per run, :func:`_lane_sums`), so
    that the runs' scales, offsets and activation scales meet them as vectors: one conversion
    and two multiply-adds per group instead of per run. Output rows go in parallel blocks; each
    row prefetches the one :data:`_PREFETCH_ROWS` ahead.

    At 16 bits, 4-bit layouts with a nibble form (``BlockLayout.nibble_weight``) take their codes
    from 16-bit words instead: ``(word >> 4 n) & 15`` is a vector of 16 codes ready for
    ``vpmaddwd``, four per 32 bytes of codes (:func:`_nibble_word_sums`), where widening bytes
    costs a shift, two masks and two widenings per 32 codes; the activations are permuted once
    per call to the codes' order."""
    run = _run_of(layout)
    span = _GROUP * run  # columns per group
    # Groups per loop step: a whole block when it holds several groups (constant code offsets).
    per_step = max(1, layout.block // span)
    steps, rest = divmod(k, span * per_step)
    rows = largest_divisor(n, (_GEMV_ROWS_PER_TASK, 8, 4, 2, 1))
    with IRBuilder() as builder:
        with IB.prim_func(s_tir=True):
            x_row, weight, out_row, added_row = block_kernel_params("block_gemv_integer", layout, n, k, shapes,
                                                                    residual)
            nibbles = layout.nibble_words() if bits == 16 and k % _NIBBLE_SPAN == 0 else None
            rounded = _rounded_row(x_row, k, run, layout, bits, nibbles)
            words = _NibbleWords.of(layout, weight, nibbles) if nibbles else None
            with IB.parallel(0, n // rows) as task:
                with IB.sblock("gemv"):
                    IB.reads([*(b[0:b.shape[0]] for b in rounded.buffers()),
                              *(w[0:w.shape[0], 0:w.shape[1]] for w in weight.values()),
                              *([added_row[0:n]] if residual else [])])
                    IB.writes([out_row[0:n]])
                    scratch = _GroupScratch(IB.sblock_alloc_buffer((span,), "uint8"),
                                            IB.sblock_alloc_buffer((_GROUP,), "float32"),
                                            IB.sblock_alloc_buffer((_GROUP,), "float32"),
                                            IB.sblock_alloc_buffer((_GROUP,), "float32"))
                    group = functools.partial(_group_of_runs, layout, dot, bits, weight, rounded, scratch, words)
                    with IB.serial(0, rows) as r:
                        j = task * rows + r
                        _prefetch_row(weight.values(), tirx.min(j + _PREFETCH_ROWS, n - 1))
                        _store(scratch.acc, 0, tirx.Broadcast(tirx.const(0.0, "float32"), _GROUP), _GROUP)
                        with IB.serial(0, steps) as step:
                            for h in range(per_step):
                                group(j, (step * per_step + h) * span, _GROUP)
                        for h in range(rest // span):
                            group(j, steps * per_step * span + h * span, _GROUP)
                        if rest % span:
                            group(j, k - rest % span, rest % span // run)
                        total = _sum_of_lanes(scratch.acc.vload([0], f"float32x{_GROUP}"), _GROUP)
                        IB.buffer_store(out_row, total + added_row[j] if residual else total, [j])
    return builder.get()


@dataclasses.dataclass(frozen=True)
class _RoundedRow:
    """One activation row rounded for the decode kernel: ``qx``, ``dx`` per :data:`X_BLOCK`, and
    per run (padded with zeros to whole groups) ``code_min * sum(qx)`` (int32, None when
    ``code_min`` is 0) and ``sum(qx * dx)`` (float32, None without offsets)."""

    qx: object
    dx: object
    starts: object
    sums: object
    # qx in the order of a nibble form's codes (None without one).
    qx_nibbles: object = None

    def buffers(self) -> list:
        return [b for b in (self.qx, self.dx, self.starts, self.sums, self.qx_nibbles) if b is not None]


@dataclasses.dataclass(frozen=True)
class _GroupScratch:
    """Per task: a group's codes, its lanes' factors and offsets, and the row's float accumulator."""

    codes: object
    factors: object
    offsets: object
    acc: object


def _rounded_row(x_row, k: int, run: int, layout: BlockLayout, bits: int, nibbles) -> _RoundedRow:
    """``x_row`` rounded once per call (:func:`_round_block`), with its per-run sums (and in the
    order of ``nibbles``, ``BlockLayout.nibble_words``, where given)."""
    runs = -(-k // run // _GROUP) * _GROUP
    qx = IB.alloc_buffer((k,), f"int{bits}")
    dx = IB.alloc_buffer((k // X_BLOCK,), "float32")
    largest = IB.alloc_buffer((1,), "float32")
    with IB.serial(0, k // X_BLOCK) as g:
        _round_block(x_row, g * X_BLOCK, qx, dx, g, largest, bits)
    starts = IB.alloc_buffer((runs,), "int32") if layout.code_min else None
    sums = IB.alloc_buffer((runs,), "float32") if layout.offset is not None else None
    total = IB.alloc_buffer((1,), "int32")
    with IB.serial(0, runs) as u:
        IB.buffer_store(total, 0, [0])
        with IB.serial(0, run) as i:
            e = tirx.min(u * run + i, k - 1)
            IB.buffer_store(total, total[0] + tirx.if_then_else(u * run + i < k, qx[e].astype("int32"), 0), [0])
        if starts is not None:
            IB.buffer_store(starts, total[0] * layout.code_min, [u])
        if sums is not None:
            # The offsets meet the rounded activations too, so that each weight is multiplied by the
            # same rounded x (as in llama.cpp; rounding errors then meet w, not the larger scale * code).
            IB.buffer_store(sums, total[0].astype("float32") * dx[tirx.min(u * run, k - 1) // X_BLOCK], [u])
    return _RoundedRow(qx, dx, starts, sums, _in_nibble_order(qx, k, nibbles) if nibbles else None)


# Weights whose codes are 16 words of one nibble form (BlockLayout.nibble_weight): two runs of 32.
_NIBBLE_SPAN = 64


def _in_nibble_order(qx, k: int, nibbles: list[list[int]]):
    """``qx`` permuted per :data:`_NIBBLE_SPAN` weights so that lane ``i`` of nibble ``n`` meets
    its activation at ``16 n + i``."""
    permuted = IB.alloc_buffer((k,), qx.dtype)
    with IB.serial(0, k // _NIBBLE_SPAN) as p:
        for n, weights in enumerate(nibbles):
            for i, w in enumerate(weights):
                IB.buffer_store(permuted, qx[p * _NIBBLE_SPAN + w], [p * _NIBBLE_SPAN + 16 * n + i])
    return permuted


@dataclasses.dataclass(frozen=True)
class _NibbleWords:
    """The codes as uint16 words (``[rows, bytes / 2]``), their nibble form's weights and, for
    5-bit codes, the bytes of the words that hold the fifth bits (``BlockLayout.fifth_bits``)."""

    words: object
    nibbles: list[list[int]]
    fifth_bits: object = None

    @staticmethod
    def of(layout: BlockLayout, weight: dict, nibbles: list[list[int]]) -> "_NibbleWords":
        """Views of ``weight``'s components for ``layout``'s nibble form."""
        codes = weight["qs"]
        words = IB.decl_buffer((codes.shape[0], int(codes.shape[1]) // 2), "uint16", data=codes.data)
        if layout.fifth_bits is None:
            return _NibbleWords(words, nibbles)
        bits = weight[layout.fifth_bits]
        return _NibbleWords(words, nibbles,
                            IB.decl_buffer((bits.shape[0], int(bits.shape[1]) * 4), "uint8", data=bits.data))

    def halves(self) -> bool:
        """Whether each nibble's first 8 lanes are the first run and its last 8 the second (Q4_0,
        Q4_1), rather than each nibble being within one run (Q4_K)."""
        return all(w // 32 == i // 8 for weights in self.nibbles for i, w in enumerate(weights))


def _group_of_runs(layout, dot, bits: int, weight, rounded: _RoundedRow, scratch: _GroupScratch,
                   nibble_words: "_NibbleWords | None", j, first, count: int) -> None:
    """``acc += sum(qx * code) * scale * dx (+ offset * sum(qx * dx))`` for ``count`` runs of row
    ``j`` from column ``first``, one lane per run."""
    run = _run_of(layout)
    summed = _group_sums(layout, dot, bits, weight, rounded, scratch, nibble_words, j, first, count)
    first_run = first // run
    if rounded.starts is not None:
        summed = summed + rounded.starts.vload([first_run], f"int32x{_GROUP}")
    if count < _GROUP:
        _store(scratch.factors, 0, tirx.Broadcast(tirx.const(0.0, "float32"), _GROUP), _GROUP)
        _store(scratch.offsets, 0, tirx.Broadcast(tirx.const(0.0, "float32"), _GROUP), _GROUP)
    with IB.vectorized(0, count) as u:
        column = first + u * run
        block, s = column // layout.block, column % layout.block // layout.sub
        IB.buffer_store(scratch.factors, layout.scale(weight, j, block, s) * rounded.dx[column // X_BLOCK], [u])
        if layout.offset is not None:
            IB.buffer_store(scratch.offsets, layout.offset(weight, j, block, s), [u])
    vector = f"float32x{_GROUP}"
    total = scratch.acc.vload([0], vector) + tirx.Cast(vector, summed) * scratch.factors.vload([0], vector)
    if layout.offset is not None:
        total = total + scratch.offsets.vload([0], vector) * rounded.sums.vload([first_run], vector)
    _store(scratch.acc, 0, total, _GROUP)


def _group_sums(layout, dot, bits: int, weight, rounded: _RoundedRow, scratch: _GroupScratch,
                nibble_words: "_NibbleWords | None", j, first, count: int):
    """``sum(qx * (code - code_min))`` of ``count`` runs of row ``j`` from column ``first``, as
    one int32 vector of :data:`_GROUP` lanes, a lane per run."""
    run = _run_of(layout)
    zero = tirx.Broadcast(tirx.const(0, "int32"), run // 4)
    if nibble_words is None:
        sums = [_byte_code_sum(layout, dot, bits, weight, rounded, scratch, j, first, u) for u in range(count)]
    else:
        sums = [v for u in range(0, count, 2)
                for v in _nibble_word_sums(dot, nibble_words, rounded.qx_nibbles, j, first + u * run)]
    if nibble_words is not None and nibble_words.halves():
        return _lane_sums_of_halves(sums + [zero] * ((_GROUP - count) // 2))
    return _lane_sums(sums + [zero] * (_GROUP - count), run // 4)


def _byte_code_sum(layout, dot, bits: int, weight, rounded: _RoundedRow, scratch: _GroupScratch, j, first, u: int):
    """Run ``u`` of the group from column ``first``: its codes as bytes (16 at a time) times its
    activations, as int32 lanes."""
    run = _run_of(layout)
    column = first + u * run
    block, e0 = column // layout.block, column % layout.block
    for piece in range(run // _PIECE):
        with IB.vectorized(0, _PIECE) as lane:
            code = layout.code_byte(weight, j, block, e0 + piece * _PIECE + lane)
            IB.buffer_store(scratch.codes, code, [u * run + piece * _PIECE + lane])
    return dot(tirx.Broadcast(tirx.const(0, "int32"), run // 4), scratch.codes, u * run, rounded.qx, column, run,
               bits)


def _nibble_word_sums(dot, nibble_words: _NibbleWords, qx_nibbles, j, column) -> list:
    """The two runs of the :data:`_NIBBLE_SPAN` weights of row ``j`` from ``column``, from their
    16 words: one int32x8 holding both in its halves, or one int32x8 per run."""
    words = nibble_words.words.vload([j, column // 4], "uint16x16")
    products = []
    for n in range(4):
        shifted = tirx.shift_right(words, tirx.Broadcast(tirx.const(4 * n, "uint16"), 16)) if n else words
        codes = tirx.bitwise_and(shifted, tirx.Broadcast(tirx.const(15, "uint16"), 16))
        if nibble_words.fifth_bits is not None:
            codes = tirx.bitwise_or(codes, _fifth_bits(nibble_words, j, column, n))
        x = qx_nibbles.vload([column + 16 * n], "int16x16")
        products.append(dot.multiply(tirx.Broadcast(tirx.const(0, "int32"), 8), tirx.reinterpret("int16x16", codes),
                                     x, 16, 8))
    if nibble_words.halves():
        return [products[0] + products[1] + products[2] + products[3]]
    runs = [[p for p, weights in zip(products, nibble_words.nibbles) if weights[0] // 32 == r] for r in range(2)]
    return [a + b for a, b in runs]


def _fifth_bits(nibble_words: _NibbleWords, j, column, n: int):
    """16 where bit 4 of the code in lane ``i`` of nibble ``n`` is set, else 0 (uint16x16): the
    two blocks' 32-bit words of fifth bits, 8 bytes, spread so that each lane holds the 16 of
    them that contain its bit, then tested with a constant mask per lane."""
    both = nibble_words.fifth_bits.vload([j, column // 32 * 4], "uint8x8")
    spread, masks = [], []
    for weight in nibble_words.nibbles[n]:
        block, bit = divmod(weight, 32)
        spread += [4 * block + 2 * (bit // 16), 4 * block + 2 * (bit // 16) + 1]
        masks.append(tirx.const(1 << bit % 16, "uint16"))
    held = tirx.reinterpret("uint16x16", tirx.Shuffle([both] * 4, spread))  # a Shuffle cannot widen
    mask = tirx.Shuffle(masks, list(range(16)))  # a constant vector
    return tirx.Select(tirx.bitwise_and(held, mask) == mask, tirx.Broadcast(tirx.const(16, "uint16"), 16),
                       tirx.Broadcast(tirx.const(0, "uint16"), 16))


def _lane_sums_of_halves(vectors: list):
    """``[sum of each half of v for v in vectors]`` in run order: ``vectors`` are 4 int32x8
    holding two runs each, the first in lanes 0-3 (:func:`_nibble_word_sums`)."""
    # Runs 0, 2, 4, 6 in the low half, 1, 3, 5, 7 in the high one.
    crossed = _add_pairs(_add_pairs(vectors, 8, 1), 8, 2)[0]
    return tirx.Shuffle([crossed], [0, 4, 1, 5, 2, 6, 3, 7])


# Shuffles of two vectors ``a || b`` (lanes of ``a`` first) that interleave within 128-bit halves.
def _interleave(lanes: int, width: int, high: bool) -> list[int]:
    """Indices of ``unpack{lo,hi}`` of ``width``-lane units: per 4-lane half, alternate units of ``a`` and ``b``."""
    out = []
    for half in range(lanes // 4):
        base = half * 4 + (2 if high else 0)
        for unit in range(0, 2, width):
            for src in (0, lanes):
                out += [src + base + unit + i for i in range(width)]
    return out


def _add_pairs(vectors: list, lanes: int, width: int) -> list:
    """Vectors 0 and 1, 2 and 3, … interleaved by units of ``width`` lanes within 128-bit halves
    and added: half as many vectors, each unit a sum of two."""
    return [tirx.Shuffle([a, b], _interleave(lanes, width, False))
            + tirx.Shuffle([a, b], _interleave(lanes, width, True)) for a, b in zip(vectors[0::2], vectors[1::2])]


def _lane_sums(vectors: list, lanes: int):
    """``[sum(v) for v in vectors]`` as one vector of :data:`_GROUP` int32 lanes, ``vectors``
    being :data:`_GROUP` int32 vectors of ``lanes`` (8 or 4): a transpose by in-half interleaves
    (``vpunpck*``, one instruction each) with adds, ~2.6 instructions per vector."""
    quads = _add_pairs(_add_pairs(vectors, lanes, 1), lanes, 2)  # each: 4 vectors' sums per 128-bit half
    if lanes == 4:
        return tirx.Shuffle(quads, list(range(8)))
    low, high = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
    return tirx.Shuffle(quads, low) + tirx.Shuffle(quads, high)


def _sum_of_lanes(vector, lanes: int):
    """The sum of a float vector's lanes, halving it ``log2(lanes)`` times."""
    while lanes > 1:
        lanes //= 2
        vector = (tirx.Shuffle([vector], list(range(lanes)))
                  + tirx.Shuffle([vector], list(range(lanes, 2 * lanes))))
    return vector


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
                IB.buffer_store(piece, layout.code_byte(weight, j, kb, p * _PIECE + lane).astype(piece.dtype), [lane])
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


def has_integer_dots(target: Target) -> bool:
    """Whether ``target`` has any of :data:`DOT_PRODUCTS` (AVX2 at least)."""
    return target.kind.name == "llvm" and any(
        all(codegen.target_has_features(f, target) for f in dot.features) for dot in DOT_PRODUCTS)


__all__ = ["ACTIVATION_BITS", "DOT_PRODUCTS", "DotProduct", "X_BLOCK", "block_gemm_integer_cpu",
           "block_gemv_integer_cpu", "dot_product_for", "has_integer_dots", "integer_gemv_supports",
           "integer_kernel_for"]
