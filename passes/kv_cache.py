"""Replace the frontend's KV-cache placeholder with the target's paged KV cache.

A frontend cannot know the target, but TVM's paged KV cache compiles attention kernels for one
(TIR kernels for the CPU differ from the GPU ones). The frontend exports a placeholder
``create_paged_kv_cache``; this pass exports the real one for the target and swaps it in. For the
llvm target it also replaces TVM's faulty CPU sliding-window prefill kernel with
:mod:`relaxlm.passes.sliding_window_attention`'s.
"""

from __future__ import annotations

import tvm
from tvm import relax as rx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache

from relaxlm.frontends.causal_lm import KV_CACHE_ARGS, KVCacheSpec

from .sliding_window_attention import PAGED_PREFILL_SLIDING_CPU, paged_prefill_sliding_window_cpu

ENTRY = "create_paged_kv_cache"
# TVM's default window; the value only matters for layers of kind mha_sliding.
_NO_WINDOW = 1024


class _TIRKVCacheFactory(nn.Module):
    """Exports ``create_paged_kv_cache`` with TVM's TIR-kernel paged KV cache."""

    def __init__(self, spec: KVCacheSpec, target: tvm.target.Target):
        self.spec = spec
        self.target = target

    def create_paged_kv_cache(  # pylint: disable=too-many-arguments
        self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window
    ):
        s = self.spec
        return TIRPagedKVCache(
            attn_kind=list(s.attention_kinds),
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, s.num_layers]),
            num_hidden_layers=s.num_layers,
            num_attention_heads=s.num_q_heads,
            num_key_value_heads=s.num_kv_heads,
            qk_head_dim=s.head_dim,
            v_head_dim=s.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            # The model applies RoPE itself (frontends.layers.Rotations).
            rope_mode=RopeMode.NONE,
            rope_scale=1,
            rope_theta=10000,
            rope_scaling={},
            rope_ext_factors=rx.prim_value(0),
            rotary_dim=s.head_dim,
            enable_disaggregation=False,
            dtype=s.dtype,
            target=self.target,
            layer_sliding_window_size=s.sliding_window or _NO_WINDOW,
        )


def dispatch_kv_cache(mod: tvm.IRModule, spec: KVCacheSpec, target: tvm.target.Target) -> tvm.IRModule:
    """``mod`` with its placeholder ``create_paged_kv_cache`` replaced by the target's cache."""
    factory_spec = {ENTRY: {**{arg: int for arg in KV_CACHE_ARGS}, "$": {"param_mode": "none", "effect_mode": "none"}}}
    with target:
        cache_mod, _ = _TIRKVCacheFactory(spec, target).export_tvm(spec=factory_spec)
    if target.kind.name == "llvm":
        cache_mod = _fix_sliding_window_prefill(cache_mod, spec)
    functions = {gv: func for gv, func in mod.functions_items() if gv.name_hint != ENTRY}
    functions.update(dict(cache_mod.functions_items()))
    return tvm.IRModule(functions, attrs=mod.attrs)


def _fix_sliding_window_prefill(cache_mod: tvm.IRModule, spec: KVCacheSpec) -> tvm.IRModule:
    """``cache_mod`` with TVM's CPU sliding-window prefill kernel replaced by ours (same name, same
    signature); see :mod:`relaxlm.passes.sliding_window_attention` for what is wrong with TVM's."""
    (gv,) = [gv for gv in cache_mod.get_global_vars() if gv.name_hint == PAGED_PREFILL_SLIDING_CPU]
    ours = paged_prefill_sliding_window_cpu(spec.num_kv_heads, spec.num_q_heads, spec.head_dim, spec.dtype,
                                            window=spec.sliding_window or _NO_WINDOW)
    cache_mod[gv] = ours.with_attrs(cache_mod[gv].attrs)
    return cache_mod
