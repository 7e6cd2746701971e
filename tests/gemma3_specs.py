"""Tiny random Gemma 3 configs, each exercising features of the Gemma 3 family."""

import torch
from transformers import Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig

from family_checks import randomize_norms
from support import VOCAB, TinySpec

# Window 8 < the 20 positions of the tests; sliding layers and the global layer get very different
# RoPE bases; the softmax scale (query_pre_attn_scalar) differs from head_dim ** -0.5; weights large
# enough (initializer_range) that the logits reach the soft-capping range.
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=20, sliding_window=8,
            max_position_embeddings=128, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VISION = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)


def _causal_lm(**overrides):
    return lambda: randomize_norms(Gemma3ForCausalLM(Gemma3TextConfig(**{**TEXT, **overrides})))


def _multimodal(**overrides):
    config = Gemma3Config(text_config={**TEXT, **overrides}, vision_config=VISION, mm_tokens_per_image=4,
                          boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2, image_token_index=VOCAB - 1)
    return lambda: randomize_norms(Gemma3ForConditionalGeneration(config))


def _older_text_config(config: dict) -> dict:
    """The text config as Gemma 3 checkpoints from before transformers 5 write it: a sliding-window
    pattern instead of layer_types, rope_theta / rope_local_base_freq / rope_scaling instead of
    per-layer-type rope_parameters."""
    text = dict(config["text_config"])
    for key in ("layer_types", "rope_parameters", "_sliding_window_pattern"):
        text.pop(key, None)
    text.update(sliding_window_pattern=2, rope_theta=10000.0, rope_local_base_freq=100.0,
                rope_scaling={"rope_type": "linear", "factor": 4.0})
    return {**config, "text_config": text}


GEMMA3_SPECS = {
    # Sliding layer (base 50) then global layer (base 10000, linear rope scaling), GQA, tied
    # embeddings, final logit soft-capping, a whole prompt in one prefill chunk.
    "sliding_global_softcap": TinySpec(
        "gemma3_sliding_global_softcap",
        _causal_lm(layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=1.5,
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
                                    "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                       "rope_theta": 10000.0}}),
    ),
    # The language model of Gemma3ForConditionalGeneration (weights under language_model.*, config
    # under text_config) in the older config format, one kv head, bf16 weights.
    "multimodal_older_config_bf16": TinySpec(
        "gemma3_multimodal_older_config_bf16",
        _multimodal(num_key_value_heads=1),
        save_dtype=torch.bfloat16,
        edit_config=_older_text_config,
    ),
}
