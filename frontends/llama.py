"""Llama 2 / 3 / 3.x (and Llama-shaped models such as SmolLM2).

Llama is the shape the shared blocks default to: pre-norm RMSNorm blocks, a SiLU gated MLP,
GQA, optional q/k/v/o and MLP biases, llama3 RoPE scaling. Nothing is special beyond the
config and the q/k row order that llama.cpp's GGUF converter permutes.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from .causal_lm import CausalLM
from .config import ModelConfig


class LlamaConfig(ModelConfig):
    """Llama's config: exactly the shared fields."""

    family: ClassVar[str] = "Llama"


class LlamaForCausalLM(CausalLM):
    """Llama: the shared decoder with its defaults."""

    config_class = LlamaConfig


def unpermute_gguf_qk(name: str, tensor: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation, which turns HF's rotate-half layout into
    interleaved pairs; the other tensors pass through unchanged."""
    if name.endswith("self_attn.q_proj.weight"):
        heads = config.num_attention_heads
    elif name.endswith("self_attn.k_proj.weight"):
        heads = config.num_key_value_heads
    else:
        return tensor
    rows, cols = tensor.shape
    return tensor.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
