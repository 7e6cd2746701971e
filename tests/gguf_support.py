"""A tiny random Llama written as a GGUF file with llama.cpp's metadata and tensor names, every
block type relaxlm runs natively among its weights, for the tests of the ``gguf`` scheme against
transformers, which reads the same file (both undo llama.cpp's q/k row order)."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import gguf
import numpy as np
import torch

from relaxlm import targets
from relaxlm.passes.gguf_blocks import LAYOUTS
from relaxlm.targets.cpu_integer import X_BLOCK, integer_kernel_for
from support import float16_views, random_blocks

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
# GPT-2's 256 byte tokens and an end-of-text token.
VOCAB = 257
# The block type of each weight: q/k/v and gate/up of mixed types (stored as several parts), an
# untied logits weight, every supported type at least once.
TYPES = {
    "token_embd": "Q8_0", "output": "Q5_K",
    "blk.0.attn_q": "Q4_K", "blk.0.attn_k": "Q4_K", "blk.0.attn_v": "Q6_K", "blk.0.attn_output": "Q5_K",
    "blk.0.ffn_gate": "Q4_0", "blk.0.ffn_up": "Q4_1", "blk.0.ffn_down": "Q5_0",
    "blk.1.attn_q": "Q8_0", "blk.1.attn_k": "Q8_0", "blk.1.attn_v": "Q8_0", "blk.1.attn_output": "Q4_1",
    "blk.1.ffn_gate": "Q6_K", "blk.1.ffn_up": "Q6_K", "blk.1.ffn_down": "Q4_K",
}
# The transformers module of each projection, by llama.cpp's name.
HF_PROJECTIONS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                  "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                  "ffn_down": "mlp.down_proj"}
# Weights of about this standard deviation keep the activations of random layers in range.
WEIGHT_STD = 0.05


def _shape(name: str) -> tuple[int, int]:
    kind = name.split(".")[-1]
    return {"token_embd": (VOCAB, HIDDEN), "output": (VOCAB, HIDDEN), "attn_q": (HIDDEN, HIDDEN),
            "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
            "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (INTERMEDIATE, HIDDEN), "ffn_up": (INTERMEDIATE, HIDDEN),
            "ffn_down": (HIDDEN, INTERMEDIATE)}[kind]


def _blocks(ggml_type: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random rows of blocks whose weights have about WEIGHT_STD (scales rescaled to it)."""
    if ggml_type not in LAYOUTS:  # a type relaxlm does not run natively: let gguf quantize it
        weights = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * WEIGHT_STD
        return gguf.quants.quantize(weights, gguf.GGMLQuantizationType[ggml_type])
    layout = LAYOUTS[ggml_type]
    raw = random_blocks(layout, rows, cols, seed)
    std = float(np.std(layout.reference(layout.split(raw))))
    parts = layout.split(raw)
    for name, halves in float16_views(layout, parts).items():
        parts[name] = (halves.astype(np.float32) * (WEIGHT_STD / std)).astype(np.float16).view(parts[name].dtype)
    return layout.join(parts)


def _gpt2_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [bytes_to_unicode()[b] for b in range(256)] + ["<|endoftext|>"]


def write_tiny_gguf(path: Path, types: dict[str, str] | None = None) -> Path:
    """The tiny Llama of TYPES (updated by ``types``), with norms of random scale, at ``path``."""
    rng = np.random.default_rng(7)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(_gpt2_tokens())
    writer.add_token_types([gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL])
    writer.add_token_merges([])
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(256)
    for seed, (name, ggml_type) in enumerate({**TYPES, **(types or {})}.items()):
        rows, cols = _shape(name)
        writer.add_tensor(f"{name}.weight", _blocks(ggml_type, rows, cols, seed),
                          raw_dtype=gguf.GGMLQuantizationType[ggml_type])
    norms = ["output_norm"] + [f"blk.{i}.{n}" for i in range(LAYERS) for n in ("attn_norm", "ffn_norm")]
    for name in norms:
        writer.add_tensor(f"{name}.weight", (1 + 0.3 * rng.standard_normal(HIDDEN)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def rounded(x: np.ndarray, bits: int) -> np.ndarray:
    """``x`` as ``cpu_integer`` rounds activations: integers of ``bits`` times a float32
    scale per :data:`X_BLOCK` values (in float64)."""
    top = np.float32(2 ** (bits - 1) - 1)
    blocks = x.reshape(-1, X_BLOCK)
    largest = np.abs(blocks).max(axis=1, keepdims=True)
    inverse = np.where(largest > 0, top / np.where(largest > 0, largest, 1), 0).astype(np.float32)
    codes = np.round(blocks * inverse)
    return (codes * (largest / top).astype(np.float32)).reshape(x.shape).astype(np.float64)


def _round_rows(_module, args, bits: int):
    return (torch.from_numpy(rounded(args[0].numpy(), bits)).float(),)


@contextlib.contextmanager
def rounded_activations(reference: torch.nn.Module, bits: int, types: dict[str, str] = TYPES):
    """transformers' tiny GGUF model made to round the inputs of the projections that relaxlm's
    kernels round on this CPU, to the width they round to (``integer_kernel_for``; the tiny
    model's shapes all fit the integer kernels)."""
    target = targets.resolve("llvm").target
    hooks = []
    for name, ggml_type in types.items():
        integer = integer_kernel_for(target, LAYOUTS[ggml_type], bits)
        if name == "token_embd" or integer is None:
            continue
        if name == "output":
            module = reference.lm_head
        else:
            _, layer, kind = name.split(".")
            module = reference.model.layers[int(layer)].get_submodule(HF_PROJECTIONS[kind])
        hooks.append(module.register_forward_pre_hook(functools.partial(_round_rows, bits=integer[1])))
    try:
        yield reference
    finally:
        for hook in hooks:
            hook.remove()
