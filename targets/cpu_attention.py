"""Hand-written CPU attention kernels for TVM's paged KV cache on the ``llvm`` target, with the
signatures and results (output and log2-sum-exp per head) of the kernels they replace.

TVM's CPU kernels run one query head after another with scalar code, rescale the output after
every key, and (over the cache) walk every page of the whole cache for every query. Here every
kernel is made of one online softmax over a block of queries that share their keys
(:func:`_attend_block`): the scores and the softmax are vectors over the block, no dot product
needs a horizontal sum, and the output is rescaled once per :data:`KEY_TILE` keys. Each block is
a parallel task.

- :func:`decode_attention_cpu`: one query per sequence over its cached keys; the block is the
  query heads of a kv head, and a long sequence is split among several tasks.
- :func:`ragged_prefill_attention_cpu`: a prefill chunk's queries over the chunk's own keys.
- :func:`paged_prefill_attention_cpu`: a prefill chunk's queries over the cached keys before it.
- :func:`paged_prefill_sliding_window_cpu`: a prefill chunk's queries over the cached keys when
  the model has sliding-window layers. TVM's kernel for this reads uninitialised memory when a
  query's first cached key is masked (its running max stays unset) and rescales with an index out
  of bounds, so its logits are wrong; this one attends each query's visible keys.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.relax.frontend.nn.llm._kernel_common import _declare_length_info, _get_kv_chunk_len
from tvm.script import tirx as T

from .cpu_kernels import vector_exp2

# Keys per step of the online softmax (a page of TVM's cache).
KEY_TILE = 16
# TVM's "minus infinity" for running maxima: exp2 of (it - a real score) is exactly 0 in float32.
_NEG = -5e4
_LOG2_E = math.log2(math.e)
# Slots of the ``state`` buffer: running max, its update, softmax sum, rescale.
_MAX, _NEW_MAX, _SUM, _RESCALE = 0, 1, 2, 3
# The name TIRPagedKVCache gives the kernel paged_prefill_sliding_window_cpu replaces.
PAGED_PREFILL_SLIDING_CPU = "batch_prefill_paged_kv_cpu_sliding_window"


def _whole(*buffers):
    """Each buffer's whole region, for an sblock's reads and writes."""
    return [buffer[tuple(slice(0, n) for n in buffer.shape)] for buffer in buffers]


def _paged_cache(var_pages, var_page_indptr, var_page_values, var_length_info, batch_size, h_kv: int,
                 page_size: int, d: int, dtype: str, sliding: bool):
    """The paged cache's buffers: the pages (page, keys or values, kv head, position, d), where each
    sequence's page numbers start, the page numbers, and the length info (the last page's length;
    with ``sliding`` also where the window starts in the pages and the attention sinks)."""
    return (T.match_buffer(var_pages, (T.int32(), 2, h_kv, page_size, d), dtype),
            T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", offset_factor=1),
            T.match_buffer(var_page_values, (T.int32(),), "int32", offset_factor=1),
            _declare_length_info(var_length_info, batch_size, sliding, T.int32()))


def _paged_prefill_buffers(var_q, var_q_indptr, var_pages, var_page_indptr, var_page_values, var_length_info,
                           var_output, var_lse, batch_size, total_len, h_kv: int, h_q: int, page_size: int, d: int,
                           dtype: str, sliding: bool):
    """The buffers of TVM's prefill-over-the-cache signature: the queries, where each sequence's
    start, the paged cache (:func:`_paged_cache`), the output and lse."""
    return (T.match_buffer(var_q, (total_len, h_q, d), dtype),
            T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", offset_factor=1),
            *_paged_cache(var_pages, var_page_indptr, var_page_values, var_length_info, batch_size, h_kv, page_size,
                          d, dtype, sliding),
            *_results(var_output, var_lse, total_len, h_q, d, dtype))


@T.macro
def _no_rope(var_k_rope_pos_offset, var_q_rope_position, rotary_mode, batch_size, rows):
    """The RoPE inputs of TVM's signature stay unread: relaxlm applies RoPE in the model."""
    T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", offset_factor=1)
    T.match_buffer(var_q_rope_position, (rows,), "int32", offset_factor=1)
    T.Assert(rotary_mode == 0, "relaxlm's CPU attention expects RoPE applied by the model")


def _results(var_output, var_lse, rows, h_q: int, d: int, dtype: str):
    """The output rows and their log2-sum-exp per head."""
    return T.match_buffer(var_output, (rows, h_q, d), dtype), T.match_buffer(var_lse, (rows, h_q), "float32")


# Decode splits a sequence's pages among at most this many tasks, of at least this many pages.
DECODE_SPLITS, DECODE_SPLIT_PAGES = 8, 4
# Keys whose scores _attend_block sums at once, in independent chains of FMAs.
_KEY_CHAINS = 4
# Queries per task of the query-blocked kernels: the vector lanes of scores and softmax state.
QUERY_BLOCK = 16
def _sees(bounds, r, position):
    """Whether row ``r`` of a block sees the key at ``position``."""
    return tirx.all(bounds[0, r] <= position, position < bounds[1, r])


@T.macro
def _attend_block(qt, keys, values, n, key_base, bounds, o, scores, state, acc, rows):
    """Online softmax of a block of query rows (``bounds.shape[1]`` lanes, ``rows`` of them real)
    over ``n`` keys (rows of ``keys``/``values``, at positions ``key_base`` on): row ``r`` sees the
    keys from ``bounds[0, r]`` up to (not including) ``bounds[1, r]``. Scores and softmax state
    are vectors over the rows; ``qt`` holds the block's queries transposed and scaled by
    ``sm_scale * log2(e)``. ``acc`` (:func:`_accumulator_size`) keeps independent sums, so that
    no loop waits on one chain of FMAs: the scores of :data:`_KEY_CHAINS` keys at a time, and
    all of an output row's columns over the keys."""
    # state: (4 slots, rows): running max, its update, softmax sum, rescale.
    for key4 in T.serial(n // _KEY_CHAINS):
        for chain, r in T.grid(_KEY_CHAINS, bounds.shape[1]):
            acc[chain * bounds.shape[1] + r] = 0.0
        for c in T.serial(qt.shape[0]):
            for chain in T.unroll(_KEY_CHAINS):
                for r in T.vectorized(bounds.shape[1]):
                    acc[chain * bounds.shape[1] + r] += (T.Cast("float32", keys[key4 * _KEY_CHAINS + chain, c])
                                                         * qt[c, r])
        for chain in T.unroll(_KEY_CHAINS):
            for r in T.vectorized(bounds.shape[1]):
                scores[key4 * _KEY_CHAINS + chain, r] = T.if_then_else(
                    _sees(bounds, r, key_base + key4 * _KEY_CHAINS + chain), acc[chain * bounds.shape[1] + r],
                    T.float32(_NEG))
    for key in T.serial(n // _KEY_CHAINS * _KEY_CHAINS, n):
        for r in T.vectorized(bounds.shape[1]):
            acc[r] = 0.0
        for c in T.serial(qt.shape[0]):
            for r in T.vectorized(bounds.shape[1]):
                acc[r] += T.Cast("float32", keys[key, c]) * qt[c, r]
        for r in T.vectorized(bounds.shape[1]):
            scores[key, r] = T.if_then_else(_sees(bounds, r, key_base + key), acc[r], T.float32(_NEG))
    for r in T.vectorized(bounds.shape[1]):
        state[_NEW_MAX, r] = state[_MAX, r]
    for key in T.serial(n):
        for r in T.vectorized(bounds.shape[1]):
            state[_NEW_MAX, r] = T.max(state[_NEW_MAX, r], scores[key, r])
    for r in T.vectorized(bounds.shape[1]):
        state[_RESCALE, r] = vector_exp2(state[_MAX, r] - state[_NEW_MAX, r])
        state[_SUM, r] *= state[_RESCALE, r]
        state[_MAX, r] = state[_NEW_MAX, r]
    for key in T.serial(n):
        for r in T.vectorized(bounds.shape[1]):
            scores[key, r] = T.if_then_else(_sees(bounds, r, key_base + key), vector_exp2(scores[key, r] - state[_MAX, r]),
                                            T.float32(0))
            state[_SUM, r] += scores[key, r]
    for r in T.serial(rows):
        for c in T.vectorized(o.shape[1]):
            acc[c] = o[r, c] * state[_RESCALE, r]
        for key in T.serial(n):
            for c in T.vectorized(o.shape[1]):
                acc[c] += scores[key, r] * T.Cast("float32", values[key, c])
        for c in T.vectorized(o.shape[1]):
            o[r, c] = acc[c]


@T.macro
def _attend_block_range(qt, pages, page_values, begin, kv_head, first, end, bounds, o, scores, state, acc, rows):
    """:func:`_attend_block` over the cached keys at positions ``first`` to ``end`` (exclusive)
    of a sequence's pages (``page_values[begin:]``), a page's part at a time."""
    # pages: (pages, 2 for keys and values, kv heads, page size, head dim)
    for p in T.serial(first // pages.shape[3], T.ceildiv(end, pages.shape[3])):
        page: T.let[T.int32] = page_values[begin + p]
        lo: T.let[T.int32] = T.max(first, p * pages.shape[3]) - p * pages.shape[3]
        hi: T.let[T.int32] = T.min(end, (p + 1) * pages.shape[3]) - p * pages.shape[3]
        keys = T.decl_buffer((pages.shape[3], pages.shape[4]), pages.dtype, data=pages.data, elem_offset=(
            ((page * 2 + 0) * pages.shape[2] + kv_head) * pages.shape[3] + lo) * pages.shape[4])
        values = T.decl_buffer((pages.shape[3], pages.shape[4]), pages.dtype, data=pages.data, elem_offset=(
            ((page * 2 + 1) * pages.shape[2] + kv_head) * pages.shape[3] + lo) * pages.shape[4])
        _attend_block(qt, keys, values, hi - lo, p * pages.shape[3] + lo, bounds, o, scores, state, acc, rows)


def _block_buffers(d: int, block: int, tile: int):
    """A query block's working buffers: its queries transposed, its outputs, a tile's scores, the
    softmax state (4 slots per row), a vector accumulator and each row's bounds of keys."""
    return (T.sblock_alloc_buffer((d, block), "float32"), T.sblock_alloc_buffer((block, d), "float32"),
            T.sblock_alloc_buffer((tile, block), "float32"), T.sblock_alloc_buffer((4, block), "float32"),
            T.sblock_alloc_buffer((_accumulator_size(block, d),), "float32"),
            T.sblock_alloc_buffer((2, block), "int32"))


def _accumulator_size(block: int, d: int) -> int:
    """``acc`` of :func:`_attend_block`: the scores of :data:`_KEY_CHAINS` keys, or an output row."""
    return max(_KEY_CHAINS * block, d)


def _rows_of(buffer, first_row, h, rows: int, row_stride):
    """``rows`` query rows of head ``h`` from row ``first_row`` of a (rows, heads, d) buffer."""
    d = buffer.shape[2]
    return T.decl_buffer((rows, d), buffer.dtype, data=buffer.data, strides=[row_stride, 1],
                         elem_offset=(first_row * buffer.shape[1] + h) * d)


@T.macro
def _start_block(queries, rows, sm_scale, qt, o, state):
    """A block's transposed queries (scaled for exp2; 0 past ``rows``) and its empty softmax."""
    for r in T.serial(qt.shape[1]):
        for c in T.serial(qt.shape[0]):
            qt[c, r] = T.if_then_else(r < rows, T.Cast("float32", queries[T.min(r, rows - 1), c]), 0.0) * (
                sm_scale * _LOG2_E)
        state[_MAX, r] = _NEG
        state[_SUM, r] = 1.0
        for c in T.serial(o.shape[1]):
            o[r, c] = 0.0


@T.macro
def _causal_bounds(bounds, rows, kv_len, qo_len, local_first, causal):
    """Each row's keys, with TVM's _causal_mask: all ``kv_len``, or with ``causal`` those up to the
    row's own position (the chunk's ``qo_len`` queries end where the keys end); none past ``rows``."""
    for r in T.serial(bounds.shape[1]):
        bounds[0, r] = 0
        bounds[1, r] = T.if_then_else(r < rows, T.if_then_else(
            causal > 0, T.min(T.max(kv_len - qo_len + local_first + r + 1, 0), kv_len), kv_len), 0)


@T.macro
def _finish_block(o, state, outputs, lse, first_row, h, rows):
    """The block's normalised outputs (rows of ``outputs``) and log2-sum-exps."""
    for r in T.serial(rows):
        for c in T.vectorized(o.shape[1]):
            outputs[r, c] = T.Cast(outputs.dtype, o[r, c] / state[_SUM, r])
        lse[first_row + r, h] = state[_MAX, r] + T.log2(state[_SUM, r])


# pylint: disable=invalid-name,unused-argument,too-many-arguments,too-many-locals
def decode_attention_cpu(h_kv: int, h_q: int, d: int, dtype: str, sliding: bool = False) -> tirx.PrimFunc:
    """One query per sequence over its cached keys (with ``sliding``, those the window keeps: the
    attention sinks, then the window). The query heads that share a kv head read its keys once,
    as one block (:func:`_attend_block`); a long sequence's pages are split among up to
    :data:`DECODE_SPLITS` tasks (at least :data:`DECODE_SPLIT_PAGES` pages each), whose partial
    softmaxes a second loop merges, so that one sequence keeps every thread busy. Only as many
    splits as the batch's pages fill are tasks: a short context's empty splits, each one
    setting up its block and merged, cost more than its keys. relaxlm applies
    RoPE in the model (``RopeMode.NONE``): ``rotary_mode`` is 0."""
    group, page_size, splits = h_q // h_kv, KEY_TILE, DECODE_SPLITS
    lanes = 1 << (group - 1).bit_length()

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv_cpu(
        var_q: T.handle, var_pages: T.handle, var_page_indptr: T.handle, var_page_values: T.handle,
        var_length_info: T.handle, var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle,
        var_output: T.handle, var_lse: T.handle,
        rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        batch_size = T.int32()
        q = T.match_buffer(var_q, (batch_size, h_q, d), dtype)
        pages, page_indptr, page_values, length_info = _paged_cache(
            var_pages, var_page_indptr, var_page_values, var_length_info, batch_size, h_kv, page_size, d, dtype, sliding)
        output, lse = _results(var_output, var_lse, batch_size, h_q, d, dtype)
        _no_rope(var_k_rope_pos_offset, var_q_rope_position, rotary_mode, batch_size, batch_size)
        # Each split's unnormalised output, and its running max and sum.
        partial = T.alloc_buffer((batch_size, h_kv, splits, lanes, d), "float32")
        partial_state = T.alloc_buffer((batch_size, h_kv, splits, 2, lanes), "float32")
        # Any count of splits covers every page (a split takes its share of them); this one gives
        # each split at least DECODE_SPLIT_PAGES pages of an average sequence.
        used: T.let[T.int32] = T.min(splits, T.max(1, T.ceildiv(page_indptr[batch_size] - page_indptr[0],
                                                                DECODE_SPLIT_PAGES * batch_size)))
        for task in T.parallel(batch_size * h_kv * used):
            with T.sblock("attn"):
                T.reads(_whole(q, pages, page_indptr, page_values, length_info))
                T.writes(_whole(partial, partial_state))
                qt = T.sblock_alloc_buffer((d, lanes), "float32")
                o = T.sblock_alloc_buffer((lanes, d), "float32")
                scores = T.sblock_alloc_buffer((page_size, lanes), "float32")
                state = T.sblock_alloc_buffer((4, lanes), "float32")
                acc = T.sblock_alloc_buffer((_accumulator_size(lanes, d),), "float32")
                bounds = T.sblock_alloc_buffer((2, lanes), "int32")
                # Truncating division: a floor division by the runtime ``used`` lowers to sign
                # fix-ups in which LLVM spent 30 s per kernel; task >= 0 and used >= 1.
                b: T.let[T.int32] = T.truncdiv(task, h_kv * used)
                kv: T.let[T.int32] = T.truncdiv(task, used) % h_kv
                split: T.let[T.int32] = T.truncmod(task, used)
                begin: T.let[T.int32] = page_indptr[b]
                sinks: T.let[T.int32] = _sinks(length_info, b, sliding)
                # The keys after the sinks lie at these positions of the sequence's pages.
                first: T.let[T.int32] = _window_start(length_info, b, sliding)
                end: T.let[T.int32] = first + _decode_length(page_indptr, length_info, b, page_size, sliding) - sinks
                per_split: T.let[T.int32] = _pages_per_split(first, end, page_size, used)
                for r in T.serial(lanes):
                    bounds[0, r] = 0
                    bounds[1, r] = T.if_then_else(r < group, end, 0)
                    for c in T.serial(d):
                        qt[c, r] = T.if_then_else(
                            r < group, T.Cast("float32", q[b, kv * group + T.min(r, group - 1), c]), 0.0
                        ) * sm_scale * _LOG2_E
                    state[_MAX, r] = _NEG
                    state[_SUM, r] = 1.0
                    for c in T.serial(d):
                        o[r, c] = 0.0
                # The split's keys, read back from a buffer: as expressions they made TVM's buffer
                # compaction take seconds analysing the block's accesses through both ranges.
                span = T.sblock_alloc_buffer((2,), "int32")
                span[0] = T.max(first, (first // page_size + split * per_split) * page_size)
                span[1] = T.min(end, (first // page_size + (split + 1) * per_split) * page_size)
                if split == 0:
                    _attend_block_range(qt, pages, page_values, begin, kv, 0, sinks, bounds, o, scores, state, acc, group)
                _attend_block_range(qt, pages, page_values, begin, kv, span[0], span[1],
                                    bounds, o, scores, state, acc, group)
                for r in T.serial(lanes):
                    partial_state[b, kv, split, 0, r] = state[_MAX, r]
                    partial_state[b, kv, split, 1, r] = state[_SUM, r]
                    for c in T.vectorized(d):
                        partial[b, kv, split, r, c] = o[r, c]
        for task in T.parallel(batch_size * h_q):
            with T.sblock("merge"):
                T.reads(_whole(partial, partial_state, page_indptr, length_info))
                T.writes(_whole(output, lse))
                merged = T.sblock_alloc_buffer((d,), "float32")
                total = T.sblock_alloc_buffer((2,), "float32")
                b: T.let[T.int32] = task // h_q
                kv: T.let[T.int32] = task % h_q // group
                r: T.let[T.int32] = task % group
                # A split without keys weighs exp2(-5e4 - max) = 0; an empty sequence (no split
                # merged) gets output 0 and lse -5e4, as from TVM's kernel.
                merged_splits: T.let[T.int32] = T.if_then_else(
                    _decode_length(page_indptr, length_info, b, page_size, sliding) > 0, used, 0)
                total[0] = _NEG
                for split in T.serial(merged_splits):
                    total[0] = T.max(total[0], partial_state[b, kv, split, 0, r])
                total[1] = T.if_then_else(merged_splits > 0, 0.0, 1.0)
                for c in T.vectorized(d):
                    merged[c] = 0.0
                for split in T.serial(merged_splits):
                    weight: T.let[T.float32] = T.exp2(partial_state[b, kv, split, 0, r] - total[0])
                    total[1] += partial_state[b, kv, split, 1, r] * weight
                    for c in T.vectorized(d):
                        merged[c] += partial[b, kv, split, r, c] * weight
                for c in T.vectorized(d):
                    output[b, task % h_q, c] = T.Cast(dtype, merged[c] / total[1])
                lse[b, task % h_q] = total[0] + T.log2(total[1])

    return batch_decode_paged_kv_cpu.with_attr(
        "global_symbol", "batch_decode_paged_kv_cpu" + ("_sliding_window" if sliding else ""))


def _decode_length(page_indptr, length_info, b, page_size: int, sliding: bool):
    """The cached keys sequence ``b`` attends to (TVM's ``_get_kv_chunk_len``, 0 without pages)."""
    pages = page_indptr[b + 1] - page_indptr[b]
    return T.if_then_else(pages > 0, _get_kv_chunk_len(pages, page_size, b, length_info, sliding), 0)


def _sinks(length_info, b, sliding: bool):
    """The attention-sink keys at the start of sequence ``b``'s pages (none without a window)."""
    return length_info[2, b] if sliding else 0


def _window_start(length_info, b, sliding: bool):
    """Where the keys after the sinks start in sequence ``b``'s pages."""
    return length_info[1, b] if sliding else 0


def _pages_per_split(first, end, page_size: int, splits):
    """Pages per decode task for the keys at positions ``first`` to ``end`` of the pages: over
    ``splits`` tasks, at least :data:`DECODE_SPLIT_PAGES` (a split's fixed costs outweigh fewer keys)."""
    # ceildiv by truncating division (see decode_attention_cpu); a negative count (no keys)
    # ends at DECODE_SPLIT_PAGES either way.
    pages = T.ceildiv(end, page_size) - first // page_size
    return T.max(T.truncdiv(pages + splits - 1, splits), DECODE_SPLIT_PAGES)


def ragged_prefill_attention_cpu(h_kv: int, h_q: int, d: int, dtype: str) -> tirx.PrimFunc:
    """The queries of a prefill chunk over the chunk's own keys (causal when the runtime says so).
    Each task is a block of :data:`QUERY_BLOCK` queries of one sequence and one head over
    :data:`KEY_TILE` keys at a time (:func:`_attend_block`); masked keys weigh exactly 0, as in
    TVM's kernel."""
    group, block, tile = h_q // h_kv, QUERY_BLOCK, KEY_TILE

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(
        var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle, var_kv_indptr: T.handle,
        var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        batch_size, qo_len, kv_len = T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", offset_factor=1)
        k = T.match_buffer(var_k, (kv_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", offset_factor=1)
        output, lse = _results(var_output, var_lse, qo_len, h_q, d, dtype)
        _no_rope(var_k_rope_pos_offset, var_q_rope_position, rotary_mode, batch_size, qo_len)
        # Each sequence's rows in blocks; at most this many blocks in all.
        for task in T.parallel((qo_len // block + batch_size) * h_q):
            with T.sblock("attn"):
                T.reads(_whole(q, k, v, q_indptr, kv_indptr))
                T.writes(_whole(output, lse))
                qt, o, scores, state, acc, bounds = _block_buffers(d, block, tile)
                where = T.sblock_alloc_buffer((2,), "int32")
                h: T.let[T.int32] = task % h_q
                _block_of(q_indptr, task // h_q, block, where)
                b: T.let[T.int32] = where[0]
                first_row: T.let[T.int32] = where[1]
                rows: T.let[T.int32] = T.if_then_else(b < batch_size, T.min(block, q_indptr[b + 1] - first_row), 0)
                if rows > 0:
                    begin: T.let[T.int32] = kv_indptr[b]
                    _causal_bounds(bounds, rows, kv_indptr[b + 1] - begin, q_indptr[b + 1] - q_indptr[b],
                                   first_row - q_indptr[b], causal)
                    _start_block(_rows_of(q, first_row, h, block, h_q * d), rows, sm_scale, qt, o, state)
                    for t in T.serial(T.ceildiv(bounds[1, rows - 1], tile)):
                        keys = T.decl_buffer((tile, d), dtype, data=k.data, strides=[h_kv * d, 1],
                                             elem_offset=((begin + t * tile) * h_kv + h // group) * d)
                        values = T.decl_buffer((tile, d), dtype, data=v.data, strides=[h_kv * d, 1],
                                               elem_offset=((begin + t * tile) * h_kv + h // group) * d)
                        _attend_block(qt, keys, values, T.min(tile, bounds[1, rows - 1] - t * tile), t * tile, bounds,
                                      o, scores, state, acc, rows)
                    _finish_block(o, state, _rows_of(output, first_row, h, block, h_q * d), lse, first_row, h, rows)

    return batch_prefill_ragged_kv


def paged_prefill_attention_cpu(h_kv: int, h_q: int, d: int, dtype: str, page_size: int = KEY_TILE) -> tirx.PrimFunc:
    """The queries of a prefill chunk over the cached keys of their sequence, with TVM's mask:
    all of them, or with ``causal`` those up to the query's own position. Each task is a block of
    :data:`QUERY_BLOCK` queries of one sequence and one head, which share every key they read:
    scores and softmax run as vectors over the block, and no dot product needs a horizontal sum."""
    group, block = h_q // h_kv, QUERY_BLOCK

    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_cpu(
        var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
        var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        batch_size, total_len = T.int32(), T.int32()
        q, q_indptr, pages, page_indptr, page_values, last_page_len, output, lse = _paged_prefill_buffers(
            var_q, var_q_indptr, var_pages, var_page_indptr, var_page_values, var_length_info, var_output, var_lse,
            batch_size, total_len, h_kv, h_q, page_size, d, dtype, False)
        _no_rope(var_k_rope_pos_offset, var_q_rope_position, rotary_mode, batch_size, total_len)
        # Each sequence's rows in blocks; at most this many blocks in all.
        for task in T.parallel((total_len // block + batch_size) * h_q):
            with T.sblock("attn"):
                T.reads(_whole(q, q_indptr, pages, page_indptr, page_values, last_page_len))
                T.writes(_whole(output, lse))
                qt, o, scores, state, acc, bounds = _block_buffers(d, block, page_size)
                where = T.sblock_alloc_buffer((2,), "int32")
                h: T.let[T.int32] = task % h_q
                _block_of(q_indptr, task // h_q, block, where)
                b: T.let[T.int32] = where[0]
                first_row: T.let[T.int32] = where[1]
                rows: T.let[T.int32] = T.if_then_else(b < batch_size, T.min(block, q_indptr[b + 1] - first_row), 0)
                if rows > 0:
                    begin: T.let[T.int32] = page_indptr[b]
                    kv_len: T.let[T.int32] = T.if_then_else(
                        page_indptr[b + 1] != begin, (page_indptr[b + 1] - begin - 1) * page_size + last_page_len[b], 0)
                    _causal_bounds(bounds, rows, kv_len, q_indptr[b + 1] - q_indptr[b], first_row - q_indptr[b], causal)
                    _start_block(_rows_of(q, first_row, h, block, h_q * d), rows, sm_scale, qt, o, state)
                    _attend_block_range(qt, pages, page_values, begin, h // group, 0, bounds[1, rows - 1], bounds, o,
                                        scores, state, acc, rows)
                    _finish_block(o, state, _rows_of(output, first_row, h, block, h_q * d), lse, first_row, h, rows)

    return batch_prefill_paged_kv_cpu


@T.macro
def _block_of(q_indptr, index, block, where):
    """Block ``index`` of the rows, counted sequence by sequence in blocks of ``block`` rows:
    its sequence and first row (sequence ``batch_size`` where there is no such block)."""
    where[0] = q_indptr.shape[0] - 1
    where[1] = 0
    blocks_before = T.sblock_alloc_buffer((1,), "int32")
    blocks_before[0] = 0
    for i in T.serial(q_indptr.shape[0] - 1):
        blocks: T.let[T.int32] = T.ceildiv(q_indptr[i + 1] - q_indptr[i], block)
        if where[0] == q_indptr.shape[0] - 1 and index < blocks_before[0] + blocks:
            where[0] = i
            where[1] = q_indptr[i] + (index - blocks_before[0]) * block
        blocks_before[0] += blocks


def paged_prefill_sliding_window_cpu(h_kv: int, h_q: int, d: int, dtype: str, window: int,
                                     page_size: int = KEY_TILE) -> tirx.PrimFunc:
    """The queries of a prefill chunk over the cached keys, for a model with sliding-window layers:
    when the runtime passes ``causal`` (a sliding layer) query ``i`` of the chunk sees the last
    ``window - 1 - i`` cached keys (the chunk's own keys are the ragged kernel's), otherwise (a
    full layer) all of them. Each task is a block of :data:`QUERY_BLOCK` queries of one sequence
    and one head, over the attention-sink keys and then the window's (two ranges of the pages)."""
    group, block = h_q // h_kv, QUERY_BLOCK

    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_cpu_sliding_window(
        var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
        var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        batch_size, total_len = T.int32(), T.int32()
        q, q_indptr, pages, page_indptr, page_values, length_info, output, lse = _paged_prefill_buffers(
            var_q, var_q_indptr, var_pages, var_page_indptr, var_page_values, var_length_info, var_output, var_lse,
            batch_size, total_len, h_kv, h_q, page_size, d, dtype, True)
        _no_rope(var_k_rope_pos_offset, var_q_rope_position, rotary_mode, batch_size, total_len)
        for task in T.parallel((total_len // block + batch_size) * h_q):
            with T.sblock("attn"):
                T.reads(_whole(q, q_indptr, pages, page_indptr, page_values, length_info))
                T.writes(_whole(output, lse))
                qt, o, scores, state, acc, bounds = _block_buffers(d, block, page_size)
                where = T.sblock_alloc_buffer((2,), "int32")
                h: T.let[T.int32] = task % h_q
                _block_of(q_indptr, task // h_q, block, where)
                b: T.let[T.int32] = where[0]
                first_row: T.let[T.int32] = where[1]
                rows: T.let[T.int32] = T.if_then_else(b < batch_size, T.min(block, q_indptr[b + 1] - first_row), 0)
                if rows > 0:
                    begin: T.let[T.int32] = page_indptr[b]
                    kv_len: T.let[T.int32] = _decode_length(page_indptr, length_info, b, page_size, True)
                    # Key position p lies in the pages at p below the sinks, at p - sinks + window start above.
                    sinks: T.let[T.int32] = length_info[2, b]
                    shift: T.let[T.int32] = length_info[1, b] - sinks
                    _start_block(_rows_of(q, first_row, h, block, h_q * d), rows, sm_scale, qt, o, state)
                    # Row 0 of the block sees the most keys: its range holds every row's.
                    _sliding_bounds(bounds, rows, kv_len, first_row - q_indptr[b], causal, window, 0, sinks, 0)
                    _attend_block_range(qt, pages, page_values, begin, h // group, bounds[0, 0], bounds[1, 0], bounds,
                                        o, scores, state, acc, rows)
                    _sliding_bounds(bounds, rows, kv_len, first_row - q_indptr[b], causal, window, sinks, kv_len + 1,
                                    shift)
                    _attend_block_range(qt, pages, page_values, begin, h // group, bounds[0, 0], bounds[1, 0], bounds,
                                        o, scores, state, acc, rows)
                    _finish_block(o, state, _rows_of(output, first_row, h, block, h_q * d), lse, first_row, h, rows)

    return batch_prefill_paged_kv_cpu_sliding_window


@T.macro
def _sliding_bounds(bounds, rows, kv_len, local_first, causal, window, lowest, highest, shift):
    """Each row's cached keys at positions ``lowest`` to ``highest`` (exclusive) of the sequence,
    moved by ``shift`` into the pages, with TVM's mask (_causal_or_sliding_cross_mask): with
    ``causal`` the last ``window - 1 - i`` keys for row ``i`` of the chunk, else all ``kv_len``."""
    for r in T.serial(bounds.shape[1]):
        first: T.let[T.int32] = T.if_then_else(
            causal > 0, T.max(kv_len - T.max(window - (local_first + r) - 1, 0), 0), 0)
        bounds[0, r] = T.if_then_else(r < rows, T.min(T.max(first, lowest), highest) + shift, 0)
        bounds[1, r] = T.if_then_else(r < rows, T.max(T.min(kv_len, highest), lowest) + shift, 0)


def kv_cache_kernels(spec) -> dict[str, tirx.PrimFunc]:
    """The kernels of TVM's paged KV cache that the llvm target replaces at export, by name (the
    others are replaced by schedule rules, which see their shapes; this one needs the window)."""
    if not spec.sliding_window:
        return {}
    kernel = paged_prefill_sliding_window_cpu(spec.num_kv_heads, spec.num_q_heads, spec.head_dim, spec.dtype,
                                              spec.sliding_window)
    return {PAGED_PREFILL_SLIDING_CPU: kernel}


__all__ = ["KEY_TILE", "PAGED_PREFILL_SLIDING_CPU", "decode_attention_cpu", "kv_cache_kernels",
           "paged_prefill_attention_cpu", "paged_prefill_sliding_window_cpu", "ragged_prefill_attention_cpu"]
