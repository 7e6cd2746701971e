"""Tiny random OLMo 1 / 2 / 3 configs, each exercising features of its generation."""

import torch
from transformers import (Olmo2Config, Olmo2ForCausalLM, Olmo3Config, Olmo3ForCausalLM, OlmoConfig,
                          OlmoForCausalLM)

from family_checks import randomize_norms
from support import VOCAB, TinySpec

# GQA (4 query heads, 2 kv heads: OLMo 2's k_norm is then half q_norm's size); weights large enough
# (initializer_range) that clip_qkv clamps and attention is far from uniform.
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)


def _model(model_class, config_class, **overrides):
    return lambda: randomize_norms(model_class(config_class(**{**BASE, **overrides})))


OLMO_SPECS = {
    # OLMo 1: parameter-free LayerNorms, q/k/v clamped to ±0.3, q/k/v/o biases, untied.
    "olmo1_clip_qkv_bias": TinySpec(
        "olmo1_clip_qkv_bias", _model(OlmoForCausalLM, OlmoConfig, clip_qkv=0.3, attention_bias=True)
    ),
    # OLMo 2: norms after attention and MLP, q/k norms over all heads, tied embeddings, bf16 weights.
    "olmo2_post_norm_tied_bf16": TinySpec(
        "olmo2_post_norm_tied_bf16", _model(Olmo2ForCausalLM, Olmo2Config, tie_word_embeddings=True),
        save_dtype=torch.bfloat16,
    ),
    # OLMo 3: a sliding layer (window 8, plain RoPE) then a full layer with yarn rope scaling.
    "olmo3_sliding_yarn": TinySpec(
        "olmo3_sliding_yarn",
        _model(Olmo3ForCausalLM, Olmo3Config, layer_types=["sliding_attention", "full_attention"], sliding_window=8,
               rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
                                "full_attention": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0,
                                                   "original_max_position_embeddings": 16}}),
    ),
}
