"""llama.cpp's quantized block types, as relaxlm stores and computes them.

A GGUF tensor of a block type is a sequence of blocks of ``block`` weights along the input
dimension; each block packs integer codes and the float16 numbers that scale them. relaxlm keeps
every bit: a layout splits a row of blocks into a few typed arrays (its *components*, each
``[rows, blocks * per_block]``) and :meth:`BlockLayout.join` puts them back byte for byte. The
only change is that the K-quants' twelve bytes of 6-bit sub-block scales and mins are stored
unpacked, one byte each (16 bytes per 256 weights instead of 12), so that no kernel unpacks them.
Numbers read together share one word (Q4_1's and the K-quants' scale and minimum; a sub-block's
scale and minimum), so that every weight reads each component at one place, as dlight's GPU
analysis requires; and within a layout no two components share a dtype and a size per block, so
a kernel knows each one by its buffer's dtype and shape alone.

Every type computes a weight the same way, as the ``gguf`` package's ``dequantize`` does, in
float32 and in the same order of operations::

    w[j, b * block + e] = scale(j, b, e // sub) * code(j, b, e) + offset(j, b, e // sub)

with an integer ``code``, a ``scale`` per ``sub`` weights and, for the types with a minimum
(Q4_1 and the K-quants), an ``offset``. The products are exact in float32 (a float16 times a
6-bit integer, times a code of at most 8 bits), so a fused multiply-add gives the same bits.
The kernels use the same form: ``x . w = sum over sub-blocks of scale * (x . code) + offset *
sum(x)``. :data:`LAYOUTS` is the one table of supported types.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from tvm import tirx

Buffers = dict  # component name -> tirx.Buffer (or te.Tensor): anything indexable as [row, column]


@dataclasses.dataclass(frozen=True)
class Component:
    """One stored array of a layout: ``per_block`` values of ``dtype`` per block."""

    name: str
    dtype: str
    per_block: int


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """One llama.cpp block type (see the module docstring)."""

    name: str
    block: int
    # Weights per scale (and offset) within a block.
    sub: int
    type_size: int
    components: tuple[Component, ...]
    split_block: Callable[[np.ndarray], dict[str, np.ndarray]]
    join_block: Callable[[dict[str, np.ndarray]], np.ndarray]
    code: Callable[[Buffers, object, object, int | object], object]
    scale: Callable[[Buffers, object, object, object], object]
    offset: Callable[[Buffers, object, object, object], object] | None = None
    # The codes run over ``code_min .. code_min + 2^code_bits - 1`` (the integer kernels'
    # unsigned bytes are ``code - code_min``).
    code_bits: int = 4
    code_min: int = 0
    # ``code - code_min`` computed in bytes, where that is cheaper for vector code than
    # narrowing ``code`` (the integer kernels' form; None: from ``code``).
    unsigned_code: Callable[[Buffers, object, object, int | object], object] | None = None
    # For layouts whose codes' low 4 bits are nibbles, 64 consecutive weights in 32 consecutive
    # bytes of ``qs``: the weight (0..63) in the low (``high`` 0) or high nibble of byte 0..31. The
    # 16-bit integer kernels then take the codes from 16-bit words of those bytes (None: no such form).
    nibble_weight: Callable[[int, int], int] | None = None
    # With a nibble form: the uint32-per-block component whose bit ``e`` is bit 4 of weight ``e``'s code.
    fifth_bits: str | None = None

    def component_of(self, dtype: str, width: int, k: int) -> Component | None:
        """The component stored as ``[rows, width]`` of ``dtype`` for rows of ``k`` weights."""
        return next((c for c in self.components
                     if c.dtype == dtype and c.per_block * (k // self.block) == width), None)

    def split(self, raw: np.ndarray) -> dict[str, np.ndarray]:
        """Raw rows ``[rows, blocks * type_size]`` uint8 → the components, each 2-D."""
        rows = raw.shape[0]
        blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, -1, self.type_size)
        parts = self.split_block(blocks)
        return {c.name: np.ascontiguousarray(parts[c.name].astype(c.dtype, copy=False)).reshape(rows, -1)
                for c in self.components}

    def join(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        """The inverse of :meth:`split`: the raw rows, byte for byte."""
        rows = next(iter(parts.values())).shape[0]
        blocks = {c.name: np.asarray(parts[c.name]).reshape(rows, -1, c.per_block) for c in self.components}
        return self.join_block(blocks).reshape(rows, -1)

    def code_byte(self, c: Buffers, j, b, e):
        """``code - code_min`` of weight ``e`` of block ``b`` of row ``j``, as uint8."""
        if self.unsigned_code is not None:
            return self.unsigned_code(c, j, b, e)
        return (self.code(c, j, b, e) - self.code_min).astype("uint8")

    def nibble_words(self) -> list[list[int]] | None:
        """For :attr:`nibble_weight` layouts: the weight (0..63) in lane ``i`` of ``(word >> 4 *
        n) & 15`` over the 16 uint16 words of 64 weights' bytes, as ``[n][i]``."""
        if self.nibble_weight is None:
            return None
        return [[self.nibble_weight(2 * i + n // 2, n % 2) for i in range(16)] for n in range(4)]

    def value(self, c: Buffers, j, column):
        """The float32 weight at ``[j, column]`` (a TIR expression)."""
        b, e = column // self.block, column % self.block
        return self.value_in_block(c, j, b, e)

    def value_in_block(self, c: Buffers, j, b, e):
        """The float32 weight ``e`` of block ``b`` of row ``j``."""
        s = e // self.sub
        scaled = self.scale(c, j, b, s) * self.code(c, j, b, e).astype("float32")
        return scaled if self.offset is None else scaled + self.offset(c, j, b, s)

    def reference(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        """The weights in float32 by the ``gguf`` package, from the components (for tests and
        the float paths)."""
        import gguf

        raw = self.join(parts)
        return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[self.name]), np.float32)


# ---- byte-level helpers ----------------------------------------------------------------------
def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[..., start:start + 2].copy().view(np.float16)[..., :1]


def _bytes(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).view(np.uint8)


def _concat(*arrays: np.ndarray) -> np.ndarray:
    return np.concatenate([_bytes(a) for a in arrays], axis=-1)


def _u8(value) -> tirx.PrimExpr:
    return tirx.const(value, "uint8")


def _as(value, dtype: str):
    """A Python int (an unrolled kernel's constant) or a TIR expression, as ``dtype``."""
    return tirx.const(value, dtype) if isinstance(value, int) else value.astype(dtype)


def _bits(byte, shift, mask: int):
    """``(byte >> shift) & mask`` of a uint8, as int32."""
    return tirx.bitwise_and(tirx.shift_right(byte, _as(shift, "uint8")), _u8(mask)).astype("int32")


def _nibble(byte, shift):
    """Bits ``shift .. shift + 3`` of a uint8, as int32."""
    return _bits(byte, shift, 15)


def _half(value) -> object:
    return value.astype("float32")


def _half_of(word, which: int):
    """Float16 number ``which`` (0: low bits) of a uint32 holding two, as float32."""
    bits = tirx.bitwise_and(tirx.shift_right(word, tirx.const(16 * which, "uint32")), tirx.const(0xFFFF, "uint32"))
    return tirx.reinterpret("float16", bits.astype("uint16")).astype("float32")


# ---- the 32-weight types ---------------------------------------------------------------------
def _low_high_nibble(c: Buffers, j, b, e):
    """Weight ``e`` of a 32-weight block: the low nibbles of its 16 bytes are weights 0..15,
    the high nibbles 16..31."""
    return _nibble(c["qs"][j, b * 16 + e % 16], (e // 16) * 4)


def _block_of_32_nibble(byte: int, high: int) -> int:
    # Two blocks of 16 bytes; byte t of a block holds its weights t (low) and t + 16 (high).
    return byte // 16 * 32 + byte % 16 + 16 * high


Q4_0 = BlockLayout(
    "Q4_0", block=32, sub=32, type_size=18,
    components=(Component("d", "float16", 1), Component("qs", "uint8", 16)),
    split_block=lambda blk: {"d": _f16(blk, 0), "qs": blk[..., 2:18]},
    join_block=lambda p: _concat(p["d"], p["qs"]),
    code=lambda c, j, b, e: _low_high_nibble(c, j, b, e) - 8,
    scale=lambda c, j, b, s: _half(c["d"][j, b]),
    code_min=-8, nibble_weight=_block_of_32_nibble,
)

Q4_1 = BlockLayout(
    "Q4_1", block=32, sub=32, type_size=20,
    components=(Component("dm", "uint32", 1), Component("qs", "uint8", 16)),
    split_block=lambda blk: {"dm": blk[..., 0:4].copy().view(np.uint32), "qs": blk[..., 4:20]},
    join_block=lambda p: _concat(p["dm"], p["qs"]),
    code=_low_high_nibble,
    scale=lambda c, j, b, s: _half_of(c["dm"][j, b], 0),
    offset=lambda c, j, b, s: _half_of(c["dm"][j, b], 1),
    nibble_weight=_block_of_32_nibble,
)


def _q5_0_code(c: Buffers, j, b, e):
    # The fifth bit of weight e is bit e of the block's 32-bit qh (little-endian).
    high = tirx.bitwise_and(tirx.shift_right(c["qh"][j, b], _as(e, "uint32")), tirx.const(1, "uint32"))
    return (_low_high_nibble(c, j, b, e) + high.astype("int32") * 16) - 16


def _q5_0_unsigned_code(c: Buffers, j, b, e):
    # The same bits, in bytes: the fifth bit tested in byte e // 8 of qh with a constant mask per
    # lane rather than shifted out of a 32-bit word by a different amount per lane.
    qh_byte = tirx.shift_right(c["qh"][j, b], _as((e // 8) * 8, "uint32")).astype("uint8")
    bit = tirx.shift_left(_u8(1), _as(e % 8, "uint8"))
    low = tirx.bitwise_and(tirx.shift_right(c["qs"][j, b * 16 + e % 16], _as((e // 16) * 4, "uint8")), _u8(15))
    return tirx.bitwise_or(low, tirx.Select(tirx.bitwise_and(qh_byte, bit) == bit, _u8(16), _u8(0)))


Q5_0 = BlockLayout(
    "Q5_0", block=32, sub=32, type_size=22,
    components=(Component("d", "float16", 1), Component("qh", "uint32", 1), Component("qs", "uint8", 16)),
    split_block=lambda blk: {"d": _f16(blk, 0), "qh": blk[..., 2:6].copy().view(np.uint32), "qs": blk[..., 6:22]},
    join_block=lambda p: _concat(p["d"], p["qh"].astype(np.uint32), p["qs"]),
    code=_q5_0_code,
    scale=lambda c, j, b, s: _half(c["d"][j, b]),
    code_bits=5, code_min=-16, unsigned_code=_q5_0_unsigned_code,
    nibble_weight=_block_of_32_nibble, fifth_bits="qh",
)

Q8_0 = BlockLayout(
    "Q8_0", block=32, sub=32, type_size=34,
    components=(Component("d", "float16", 1), Component("qs", "int8", 32)),
    split_block=lambda blk: {"d": _f16(blk, 0), "qs": blk[..., 2:34].copy().view(np.int8)},
    join_block=lambda p: _concat(p["d"], p["qs"].astype(np.int8)),
    code=lambda c, j, b, e: c["qs"][j, b * 32 + e].astype("int32"),
    scale=lambda c, j, b, s: _half(c["d"][j, b]),
    code_bits=8, code_min=-128,
)


# ---- the K-quants (256-weight super-blocks) --------------------------------------------------
def _unpack_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes → 8 six-bit scales and 8 six-bit mins: bytes 0-3 hold scales 0-3
    (and the top two bits of scales 4-7), bytes 4-7 mins 0-3 (and those of mins 4-7), bytes 8-11
    the low nibbles of scales 4-7 and (high nibbles) mins 4-7."""
    low, high, mixed = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([low & 63, (mixed & 15) | ((low >> 2) & 48)], axis=-1)
    mins = np.concatenate([high & 63, (mixed >> 4) | ((high >> 2) & 48)], axis=-1)
    return scales, mins


def _pack_k_scales(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_unpack_k_scales`."""
    scales, mins = scales.astype(np.uint8), mins.astype(np.uint8)
    low = (scales[..., :4] & 63) | ((scales[..., 4:] >> 4) << 6)
    high = (mins[..., :4] & 63) | ((mins[..., 4:] >> 4) << 6)
    mixed = (scales[..., 4:] & 15) | ((mins[..., 4:] & 15) << 4)
    return np.concatenate([low, high, mixed], axis=-1).astype(np.uint8)


def _k_nibble(c: Buffers, j, b, e):
    """Weight ``e`` of a Q4_K / Q5_K super-block: each 64 weights are 32 bytes, low nibbles first."""
    return _nibble(c["qs"][j, b * 128 + (e // 64) * 32 + e % 32], ((e % 64) // 32) * 4)


def _k_split(blk: np.ndarray, high_bits: bool) -> dict[str, np.ndarray]:
    scales, mins = _unpack_k_scales(blk[..., 4:16])
    parts = {"dm": blk[..., 0:4].copy().view(np.uint32),
             "scales": scales.astype(np.uint16) | (mins.astype(np.uint16) << 8)}
    if high_bits:
        parts.update(qh=blk[..., 16:48], qs=blk[..., 48:176])
    else:
        parts["qs"] = blk[..., 16:144]
    return parts


def _k_join(p: dict[str, np.ndarray]) -> np.ndarray:
    bits = [p["qh"]] if "qh" in p else []
    scales = p["scales"].astype(np.uint16)
    return _concat(p["dm"], _pack_k_scales(scales & 255, scales >> 8), *bits, p["qs"])


# d and dmin as one word; each sub-block's scale (low byte) and min (high byte) as one uint16.
_K_SCALES = (Component("dm", "uint32", 1), Component("scales", "uint16", 8))


def _k_scale(c: Buffers, j, b, s):
    scale = tirx.bitwise_and(c["scales"][j, b * 8 + s], tirx.const(255, "uint16"))
    return _half_of(c["dm"][j, b], 0) * scale.astype("float32")


def _k_offset(c: Buffers, j, b, s):
    # gguf computes d * q - dmin * m: the same bits as adding the negated product.
    minimum = tirx.shift_right(c["scales"][j, b * 8 + s], tirx.const(8, "uint16"))
    return -(_half_of(c["dm"][j, b], 1) * minimum.astype("float32"))


Q4_K = BlockLayout(
    "Q4_K", block=256, sub=32, type_size=144,
    components=(*_K_SCALES, Component("qs", "uint8", 128)),
    split_block=lambda blk: _k_split(blk, high_bits=False),
    join_block=_k_join,
    code=_k_nibble,
    scale=_k_scale,
    offset=_k_offset,
    # 32 bytes hold 64 weights: low nibbles 0..31, high nibbles 32..63.
    nibble_weight=lambda byte, high: byte + 32 * high,
)


def _q5_k_code(c: Buffers, j, b, e):
    # The fifth bit of weight e is bit e // 32 of byte e % 32 of the block's qh.
    return _k_nibble(c, j, b, e) + _bits(c["qh"][j, b * 32 + e % 32], e // 32, 1) * 16


Q5_K = BlockLayout(
    "Q5_K", block=256, sub=32, type_size=176,
    components=(*_K_SCALES, Component("qh", "uint8", 32), Component("qs", "uint8", 128)),
    split_block=lambda blk: _k_split(blk, high_bits=True),
    join_block=_k_join,
    code=_q5_k_code,
    scale=_k_scale,
    offset=_k_offset,
    code_bits=5,
)


def _q6_k_code(c: Buffers, j, b, e):
    # Each half of 128 weights: 64 bytes of low nibbles (weights 0-63 low, 64-127 high) and 32
    # bytes of 2-bit high parts (weight l + 32 t in bits 2t of byte l).
    half, r = e // 128, e % 128
    low = _nibble(c["ql"][j, b * 128 + half * 64 + r % 64], (r // 64) * 4)
    high = _bits(c["qh"][j, b * 64 + half * 32 + r % 32], (r // 32) * 2, 3)
    return (low + high * 16) - 32


Q6_K = BlockLayout(
    "Q6_K", block=256, sub=16, type_size=210,
    components=(Component("d", "float16", 1), Component("sc", "int8", 16),
                Component("ql", "uint8", 128), Component("qh", "uint8", 64)),
    split_block=lambda blk: {"ql": blk[..., 0:128], "qh": blk[..., 128:192],
                             "sc": blk[..., 192:208].copy().view(np.int8), "d": _f16(blk, 208)},
    join_block=lambda p: _concat(p["ql"], p["qh"], p["sc"].astype(np.int8), p["d"]),
    code=_q6_k_code,
    scale=lambda c, j, b, s: _half(c["d"][j, b]) * c["sc"][j, b * 16 + s].astype("float32"),
    code_bits=6, code_min=-32,
)

LAYOUTS: dict[str, BlockLayout] = {layout.name: layout for layout in (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K)}
