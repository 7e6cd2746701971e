"""Replace the frontend's KV-cache placeholder with the target's paged KV cache.

A frontend cannot know the target, but TVM's paged KV cache compiles attention kernels for one
(TIR kernels for the CPU differ from the GPU ones). The frontend exports a placeholder
``create_paged_kv_cache``; this pass exports the real one for the target and swaps it in, with
the kernels the target's recipe replaces (by name, same signature).
"""

from __future__ import annotations

from typing import Callable

import tvm
from tvm import relax as rx
from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache

from relaxlm.frontends.causal_lm import KV_CACHE_ARGS, KVCacheSpec

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


def dispatch_kv_cache(mod: tvm.IRModule, spec: KVCacheSpec, target: tvm.target.Target,
                      replaced_kernels: Callable[[KVCacheSpec], dict[str, tirx.PrimFunc]] = lambda _spec: {},
                      ) -> tvm.IRModule:
    """``mod`` with its placeholder ``create_paged_kv_cache`` replaced by the target's cache, whose
    kernels named in ``replaced_kernels(spec)`` are replaced by the ones given there."""
    factory_spec = {ENTRY: {**{arg: int for arg in KV_CACHE_ARGS}, "$": {"param_mode": "none", "effect_mode": "none"}}}
    with target:
        cache_mod, _ = _TIRKVCacheFactory(spec, target).export_tvm(spec=factory_spec)
    for name, kernel in replaced_kernels(spec).items():
        (gv,) = [gv for gv in cache_mod.get_global_vars() if gv.name_hint == name]
        cache_mod[gv] = kernel.with_attrs(cache_mod[gv].attrs)
    functions = {gv: func for gv, func in mod.functions_items() if gv.name_hint != ENTRY}
    functions.update(dict(cache_mod.functions_items()))
    return tvm.IRModule(functions, attrs=mod.attrs)
