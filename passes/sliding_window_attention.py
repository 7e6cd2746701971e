"""A corrected CPU kernel for attention over the paged KV cache in models with sliding-window layers.

When any layer is ``mha_sliding``, TVM 0.27's paged KV cache runs every prefill (more than one
token per sequence) through its CPU sliding-window prefill kernel for the cached keys of *every*
layer (causal within the window for sliding layers, all keys for full ones), then merges the
result with the in-chunk (ragged) attention. TVM's kernel (``_attention_prefill_cpu(...,
sliding_window=True)``) has two bugs that this one fixes:

- a key outside the window leaves the running max ``new_m`` unset, so when a query's first cached
  key is masked the softmax update reads uninitialised memory (NaN or wrong logits);
- it rescales the output with ``scale_O[d]`` of a one-element buffer (out of bounds for d > 0).

Here a masked key is skipped altogether, which is the online softmax's exact meaning of a mask.
The signature, the page/length-info layout and the mask are TVM's (its helpers are reused), so the
runtime calls this kernel exactly as it calls the one it replaces.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.relax.frontend.nn.llm._kernel_common import (
    _causal_or_sliding_cross_mask,
    _declare_length_info,
    _get_kv_chunk_len,
    _get_seq_offset,
    _rope,
)
from tvm.script import tirx as T

# The kernel's name in the module TIRPagedKVCache exports (its global symbol); ours replaces it.
PAGED_PREFILL_SLIDING_CPU = "batch_prefill_paged_kv_cpu_sliding_window"
_LOG2_E = math.log2(math.e)
# TVM's "minus infinity" for running maxima: exp2 of (it − a real score) is exactly 0 in float32.
_NEG = -5e4


def paged_prefill_sliding_window_cpu(  # pylint: disable=too-many-arguments,too-many-locals
    h_kv: int, h_q: int, d: int, dtype: str, window: int, page_size: int = 16
) -> tirx.PrimFunc:
    """Attention of the appended queries over the cached keys, for the llvm target: causal within
    the last ``window`` positions when the runtime passes ``causal`` (sliding layers), all cached
    keys otherwise (full layers). Writes the partial output and its log2-sum-exp for merging."""
    group_size = h_q // h_kv
    # relaxlm applies RoPE in the model (RopeMode.NONE, no rope scaling in the cache); the rotary
    # branch only keeps ``rotary_mode`` meaning what it means in TVM's kernel.
    rope_scaling: dict = {}

    # pylint: disable=invalid-name,unused-argument
    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_cpu_sliding_window(
        var_q: T.handle,  # [total_len, h_q, d]
        var_q_indptr: T.handle,  # [batch_size + 1]
        var_pages: T.handle,  # [max_num_pages, 2, h_kv, page_size, d]
        var_page_indptr: T.handle,  # [batch_size + 1]
        var_page_values: T.handle,  # [nnz_pages]
        var_length_info: T.handle,  # [3, batch_size]: last page length, window offset, sink size
        var_k_rope_pos_offset: T.handle,  # [batch_size]
        var_q_rope_position: T.handle,  # [total_len]
        var_output: T.handle,  # [total_len, h_q, d]
        var_lse: T.handle,  # [total_len, h_q]
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_elem_offset = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()

        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",
                                           elem_offset=k_rope_pos_offset_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (total_len,), "int32",
                                         elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        length_info = _declare_length_info(var_length_info, batch_size, True, length_info_elem_offset)

        for h_qo in T.serial(h_q):
            for b_idx in T.serial(batch_size):
                with T.sblock("attn"):
                    O_local = T.sblock_alloc_buffer((d,), "float32")
                    Q_local = T.sblock_alloc_buffer((d,), "float32")
                    kv_chunk_len = T.sblock_alloc_buffer((1,), "int32")
                    m_val = T.sblock_alloc_buffer((1,), "float32")
                    new_m = T.sblock_alloc_buffer((1,), "float32")
                    d_val = T.sblock_alloc_buffer((1,), "float32")
                    S_val = T.sblock_alloc_buffer((1,), "float32")
                    scale_O = T.sblock_alloc_buffer((1,), "float32")
                    factor = T.sblock_alloc_buffer((1,), "float32")
                    page_begin: T.let[T.int32] = page_indptr[b_idx]
                    page_end: T.let[T.int32] = page_indptr[b_idx + 1]
                    kv_chunk_len[0] = T.if_then_else(
                        page_begin != page_end,
                        _get_kv_chunk_len(page_end - page_begin, page_size, b_idx, length_info, True),
                        0,
                    )
                    for q_idx in T.serial(q_indptr[b_idx + 1] - q_indptr[b_idx]):
                        m_val[0] = _NEG
                        d_val[0] = 1.0
                        for d_idx in T.serial(d):
                            O_local[d_idx] = 0.0
                        cur_q: T.let[T.int32] = q_indptr[b_idx] + q_idx
                        for d_idx in T.serial(d):
                            Q_local[d_idx] = T.Cast("float32", T.if_then_else(
                                rotary_mode == 1,
                                _rope(q, q_rope_position[cur_q], d, rope_theta, rope_scale, (cur_q, h_qo, d_idx),
                                      dtype, rope_scaling),
                                q[cur_q, h_qo, d_idx],
                            ))
                        for row_idx in T.serial(kv_chunk_len[0]):
                            if _causal_or_sliding_cross_mask(causal, row=q_idx, col=row_idx, kv_len=kv_chunk_len[0],
                                                             qo_len=q_indptr[b_idx + 1] - q_indptr[b_idx],
                                                             sliding_window_size=window):
                                seq_offset: T.let[T.int32] = _get_seq_offset(row_idx, b_idx, length_info, True)
                                page_no: T.let[T.int32] = page_values[page_begin + seq_offset // page_size]
                                page_offset: T.let[T.int32] = seq_offset % page_size
                                S_val[0] = 0.0
                                for d_idx in T.serial(d):
                                    S_val[0] += Q_local[d_idx] * T.Cast("float32", T.if_then_else(
                                        rotary_mode == 1,
                                        _rope(pages, k_rope_pos_offset[b_idx] + row_idx, d, rope_theta, rope_scale,
                                              (page_no, 0, h_qo // group_size, page_offset, d_idx), dtype,
                                              rope_scaling),
                                        pages[page_no, 0, h_qo // group_size, page_offset, d_idx],
                                    ))
                                S_val[0] *= sm_scale * _LOG2_E
                                new_m[0] = T.max(m_val[0], S_val[0])
                                scale_O[0] = T.exp2(m_val[0] - new_m[0])
                                factor[0] = T.exp2(S_val[0] - new_m[0])
                                d_val[0] = d_val[0] * scale_O[0] + factor[0]
                                m_val[0] = new_m[0]
                                for d_idx in T.serial(d):
                                    O_local[d_idx] = (O_local[d_idx] * scale_O[0]
                                                      + T.Cast("float32", pages[page_no, 1, h_qo // group_size,
                                                                                page_offset, d_idx]) * factor[0])
                        for d_idx in T.serial(d):
                            output[cur_q, h_qo, d_idx] = T.Cast(dtype, O_local[d_idx] / d_val[0])
                        lse[cur_q, h_qo] = m_val[0] + T.log2(d_val[0])

    return batch_prefill_paged_kv_cpu_sliding_window
