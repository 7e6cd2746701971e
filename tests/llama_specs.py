"""Tiny random Llama configs, each exercising features of the Llama family."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from support import VOCAB, TinySpec

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128,
            bos_token_id=1, eos_token_id=2)


def llama(**overrides):
    """A maker of a random tiny Llama: :data:`BASE` with ``overrides``."""
    return lambda: LlamaForCausalLM(LlamaConfig(**{**BASE, **overrides}))


LLAMA_SPECS = {
    # GQA (4 query heads share 2 kv heads), tied embeddings, weights stored as fp16.
    "gqa_tied_fp16": TinySpec("llama_gqa_tied_fp16", llama(num_attention_heads=4, num_key_value_heads=2,
                                                            tie_word_embeddings=True), save_dtype=torch.float16),
    # MHA, untied, head_dim 32 != 64 / 4, llama3 RoPE scaling, q/k/v/o and MLP biases, bf16 weights in
    # several safetensors shards, prompts split across prefill chunks of 8 tokens.
    "mha_llama3_bias_bf16": TinySpec(
        "llama_mha_llama3_bias_bf16",
        llama(num_attention_heads=4, num_key_value_heads=4, head_dim=32, tie_word_embeddings=False,
               attention_bias=True, mlp_bias=True,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16}),
        save_dtype=torch.bfloat16,
        shard_size="40KB",
        compile_options={"prefill_chunk": 8},
    ),
}
