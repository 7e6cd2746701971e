"""The decoder-only language model that every family specialises, and its entry points.

The entry points (``embed``, ``prefill``, ``decode``, ``batch_prefill``, ``batch_decode``,
``batch_verify``, ``create_paged_kv_cache``) are written once here; their export spec comes
from :data:`ENTRY_POINTS`, one table shared by every family.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from tvm import relax as rx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from .config import ModelConfig
from .layers import DecoderLayer, GatedMLP, PagedAttention, Rotations, last_position, rms_norm

KV_CACHE_ARGS = ("max_batch_size", "max_total_seq_len", "prefill_chunk_size", "page_size", "support_sliding_window")
KV_CACHE_PLACEHOLDER = "relaxlm.create_paged_kv_cache"


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    """What the KV cache must hold; ``passes.kv_cache`` builds the target's cache from it."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    attention_kinds: tuple[str, ...]
    sliding_window: int | None


# Entry point → its arguments, as (name, shape, dtype). "hidden" stands for the hidden size and
# "model" for the model's dtype; strings are symbolic dimensions chosen at run time.
ENTRY_POINTS: dict[str, tuple[tuple[str, tuple, str], ...]] = {
    "embed": (("input_ids", ("batch_size", "seq_len"), "int32"),),
    "prefill": (("input_embed", (1, "seq_len", "hidden"), "model"),),
    "decode": (("input_embed", (1, 1, "hidden"), "model"),),
    "batch_prefill": (
        ("input_embeds", (1, "seq_len", "hidden"), "model"),
        ("logit_positions", ("batch_size",), "int32"),
    ),
    "batch_decode": (("input_embeds", ("batch_size", 1, "hidden"), "model"),),
    "batch_verify": (("input_embeds", (1, "seq_len", "hidden"), "model"),),
}
USES_KV_CACHE = ("prefill", "decode", "batch_prefill", "batch_decode", "batch_verify")


def export_spec(config: ModelConfig, dtype: str) -> dict[str, Any]:
    """The ``export_tvm`` spec of every entry point, generated from :data:`ENTRY_POINTS`."""
    packed = {"param_mode": "packed", "effect_mode": "none"}
    spec: dict[str, Any] = {}
    for name, args in ENTRY_POINTS.items():
        method: dict[str, Any] = {}
        for arg, shape, arg_dtype in args:
            dims = [config.hidden_size if d == "hidden" else d for d in shape]
            method[arg] = nn.spec.Tensor(dims, dtype if arg_dtype == "model" else arg_dtype)
        if name in USES_KV_CACHE:
            method["paged_kv_cache"] = nn.spec.Object(object_type=PagedKVCache)
        spec[name] = {**method, "$": packed}
    spec["create_paged_kv_cache"] = {
        **{arg: int for arg in KV_CACHE_ARGS},
        "$": {"param_mode": "none", "effect_mode": "none"},
    }
    return spec


class DecoderStack(nn.Module):
    """Embedding, the layers and the final norm: HF's ``model.*`` submodule."""

    def __init__(self, config: ModelConfig, layers: list[nn.Module], final_norm: nn.Module, dtype: str):
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(layers)
        self.norm = final_norm


class CausalLM(nn.Module):
    """A decoder-only LM over the paged KV cache. Llama's choices are the defaults; a family
    overrides the class attributes and hooks that differ (norm placement, norm kind,
    attention, q/k norm, embedding scale, logit processing)."""

    config_class: type[ModelConfig] = ModelConfig
    attention_class: type[PagedAttention] = PagedAttention
    layer_norms = {"pre_attention": "input_layernorm", "pre_mlp": "post_attention_layernorm"}
    qk_norm: str | None = None

    def __init__(self, config: ModelConfig, dtype: str = "float32"):
        self.config = config
        self.dtype = dtype
        layers = [self.make_layer(i) for i in range(config.num_hidden_layers)]
        self.model = DecoderStack(config, layers, self.make_norm(), dtype)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)

    # ---- hooks a family may override -------------------------------------------------------
    def make_norm(self, dim: int | None = None) -> nn.Module:
        """The norm used everywhere in the model, over ``dim`` features (default: the hidden size)."""
        return rms_norm(dim or self.config.hidden_size, self.config.norm_eps, self.dtype)

    def make_layer(self, layer_id: int) -> nn.Module:
        """One decoder block."""
        c = self.config
        attention = self.attention_class(
            c, layer_id, self.dtype, rope=c.layer_rope(layer_id), qk_norm=self.qk_norm, make_norm=self.make_norm
        )
        mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, c.mlp_bias, self.dtype)
        return DecoderLayer(attention, mlp, self.layer_norms, self.make_norm)

    def scale_embeddings(self, embeds: Tensor) -> Tensor:
        """Applied to token embeddings (Gemma scales them)."""
        return embeds

    def process_logits(self, logits: Tensor) -> Tensor:
        """Applied to float32 logits (Gemma soft-caps them)."""
        return logits

    # ---- shared machinery ----------------------------------------------------------------
    def kv_cache_spec(self) -> KVCacheSpec:
        """The paged KV cache this model needs."""
        c = self.config
        return KVCacheSpec(
            num_layers=c.num_hidden_layers,
            num_q_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            dtype=self.dtype,
            attention_kinds=tuple(c.attention_kinds),
            sliding_window=c.sliding_window,
        )

    def _hidden_states(self, embeds: Tensor, cache: PagedKVCache) -> Tensor:
        batch, seq_len, _ = embeds.shape
        rotations = Rotations(cache.get_query_positions(batch * seq_len), self.config.head_dim)
        hidden = embeds
        for layer in self.model.layers:
            hidden = layer(hidden, cache, rotations)
        return self.model.norm(hidden)

    def _logits(self, hidden: Tensor) -> Tensor:
        if self.config.tie_word_embeddings:
            logits = op.matmul(hidden, op.permute_dims(self.model.embed_tokens.weight))
        else:
            logits = self.lm_head(hidden)
        if logits.dtype != "float32":
            logits = logits.astype("float32")
        return self.process_logits(logits)

    def _run(self, embeds: Tensor, cache: PagedKVCache, select: Callable[[Tensor], Tensor]):
        return self._logits(select(self._hidden_states(embeds, cache))), cache

    # ---- entry points (their spec: ENTRY_POINTS) --------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        """Token ids (b, s) → embeddings (b, s, hidden)."""
        return self.scale_embeddings(self.model.embed_tokens(input_ids))

    def prefill(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        """One sequence's chunk → logits of its last position (1, 1, vocab)."""
        return self._run(input_embed, paged_kv_cache, last_position)

    def decode(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        """One token of one sequence → its logits (1, 1, vocab)."""
        return self._run(input_embed, paged_kv_cache, lambda h: h)

    def batch_prefill(self, input_embeds: Tensor, logit_positions: Tensor, paged_kv_cache: PagedKVCache):
        """Several sequences' chunks concatenated → logits at ``logit_positions`` (1, b, vocab)."""
        return self._run(input_embeds, paged_kv_cache, lambda h: op.take(h, logit_positions, axis=1))

    def batch_decode(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        """One token for each of b sequences → logits (b, 1, vocab)."""
        return self._run(input_embeds, paged_kv_cache, lambda h: h)

    def batch_verify(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        """Token trees (draft tokens) → logits at every position (1, n, vocab)."""
        return self._run(input_embeds, paged_kv_cache, lambda h: h)

    def create_paged_kv_cache(  # pylint: disable=too-many-arguments
        self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window
    ) -> PagedKVCache:
        """A placeholder that ``passes.kv_cache`` replaces with the target's paged KV cache."""
        sizes = [max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window]
        return PagedKVCache(
            _expr=rx.call_pure_packed(KV_CACHE_PLACEHOLDER, rx.ShapeExpr(sizes), ty_args=rx.AnyType()),
            _name="paged_kv_cache",
        )

    def export(self):
        """Export to a Relax IRModule; returns ``(mod, named_params)``."""
        return self.export_tvm(spec=export_spec(self.config, self.dtype))
