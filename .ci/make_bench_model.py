#!/usr/bin/env python3
"""A Llama-3.2-1B-shaped model with seeded random weights, for benchmarks only: it is never
shipped and nothing is downloaded. It has the real model's shapes, RoPE and special token ids,
so compile and decode times are those of Llama 3.2 1B; its text is noise.

Writes into OUT_DIR:
  hf/                          config.json, generation_config.json, bfloat16 safetensors shards
  llama-1b-random.Q4_0.gguf    the same weights for llama.cpp: Q4_0 matrices, float32 norms

Both files are written tensor by tensor, never the whole model at once: the embedding, the largest
tensor, sets the peak of 1.6 GB of memory. About 35 s and 3 GB of disk on 2 cores.
``--tiny`` writes a 64-wide, 2-layer model of the same recipe in a second (for the tests).

The HF directory has no tokenizer: relaxlm compiles it without one, and the bench feeds token ids.
The GGUF has a SentencePiece-style vocabulary, which llama.cpp requires (see :func:`vocabulary`).

Usage: python .ci/make_bench_model.py [--tiny] OUT_DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import safetensors.numpy
from tqdm import tqdm


@dataclasses.dataclass(frozen=True)
class Shape:
    """The sizes of one model, and the ids of its begin/end-of-text tokens."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    bos: int
    eos: int
    # Llama 3.2 states 131072. A smaller window keeps the KV cache of the compiled artifacts (and
    # llama.cpp's) modest; the bench runs a few hundred tokens. (transformers warns that it is not
    # above the llama3 scaling's original 8192; the scaling is then just unused past 8192.)
    context: int

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden // self.heads


LLAMA_3_2_1B = Shape("llama-1b-random", hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192,
                     vocab=128256, bos=128000, eos=128001, context=8192)
TINY = Shape("llama-tiny-random", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
             vocab=512, bos=504, eos=505, context=256)

ROPE_THETA = 500000.0
ROPE_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
RMS_NORM_EPS = 1e-5
SEED = 0
EMBEDDING_STD = 0.02
# Norm weights are 1 plus this much noise: all-equal norms would hide a norm applied to the wrong
# tensor from the tests.
NORM_NOISE = 0.1
# Rows of a matrix quantized at once: the quantizer's float32 temporaries for the whole embedding
# would take several GB.
QUANT_ROWS = 4096
# Written first into OUT_DIR; only a directory holding it may be written into again.
MARKER = ".make_bench_model"
# llama.cpp's names for the HF tensors of one layer.
GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


@dataclasses.dataclass(frozen=True)
class Weight:
    """One tensor of the model: its names in both files, its shape and how it is drawn."""

    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    # Standard deviation of the normal draw; 0 for a norm (1 plus NORM_NOISE).
    std: float
    # Heads of llama.cpp's q/k row permutation; 0 for the other tensors.
    permute_heads: int = 0


def model_weights(s: Shape) -> list[Weight]:
    """Every tensor of the model, in the order both files store them.

    Matrices are drawn with std 1/sqrt(fan_in) (0.022 at width 2048), so that q and k have unit
    scale and attention is neither uniform nor one-hot. The projections back into the residual
    stream are scaled down by sqrt(2 * layers) as in GPT-2, so that its scale stays near 1 over the
    16 layers."""
    kv = s.kv_heads * s.head_dim
    residual = 1 / math.sqrt(2 * s.layers)
    weights = [Weight("model.embed_tokens.weight", "token_embd.weight", (s.vocab, s.hidden), EMBEDDING_STD)]
    for i in range(s.layers):
        shapes = {
            "self_attn.q_proj": ((s.hidden, s.hidden), 1.0, s.heads),
            "self_attn.k_proj": ((kv, s.hidden), 1.0, s.kv_heads),
            "self_attn.v_proj": ((kv, s.hidden), 1.0, 0),
            "self_attn.o_proj": ((s.hidden, s.hidden), residual, 0),
            "mlp.gate_proj": ((s.intermediate, s.hidden), 1.0, 0),
            "mlp.up_proj": ((s.intermediate, s.hidden), 1.0, 0),
            "mlp.down_proj": ((s.hidden, s.intermediate), residual, 0),
        }
        for part, (shape, scale, heads) in shapes.items():
            weights.append(Weight(f"model.layers.{i}.{part}.weight", f"blk.{i}.{GGUF_LAYER_NAMES[part]}.weight",
                                  shape, scale / math.sqrt(shape[1]), heads))
        for part in ("input_layernorm", "post_attention_layernorm"):
            weights.append(Weight(f"model.layers.{i}.{part}.weight", f"blk.{i}.{GGUF_LAYER_NAMES[part]}.weight",
                                  (s.hidden,), 0.0))
    weights.append(Weight("model.norm.weight", "output_norm.weight", (s.hidden,), 0.0))
    return weights


def draw(w: Weight, index: int) -> np.ndarray:
    """The bfloat16 values of weight number ``index``, seeded by its index alone."""
    rng = np.random.default_rng((SEED, index))
    values = rng.standard_normal(w.shape, dtype=np.float32)
    if w.std:
        values *= np.float32(w.std)
    else:
        values *= np.float32(NORM_NOISE)
        values += np.float32(1)
    return values.astype(ml_dtypes.bfloat16)


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows (HF's rotate-half pairs into interleaved ones), as its
    convert_hf_to_gguf applies it to Llama."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def q4_0(values: np.ndarray) -> np.ndarray:
    """Q4_0 blocks of a bfloat16 matrix, as uint8 rows, quantized QUANT_ROWS rows at a time."""
    return np.concatenate([
        gguf.quants.quantize(values[start:start + QUANT_ROWS].astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
        for start in range(0, len(values), QUANT_ROWS)
    ])


def gguf_tensor(w: Weight, values: np.ndarray) -> np.ndarray:
    """What the GGUF stores for ``w``: Q4_0 blocks of a matrix (q/k permuted), a norm as float32."""
    if len(w.shape) == 1:
        return values.astype(np.float32)
    return q4_0(permute_qk(values, w.permute_heads) if w.permute_heads else values)


def rope_factors(s: Shape) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for llama3 scaling, as convert_hf_to_gguf computes them: the
    divisor of each pair's base frequency (1 for short wavelengths, the factor for long ones)."""
    p = ROPE_SCALING
    old_context, low, high = p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"]
    factors = []
    for freq in 1.0 / ROPE_THETA ** (np.arange(0, s.head_dim, 2, dtype=np.float32) / s.head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(p["factor"])
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / p["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


# ---- the tokenizer (GGUF only) -----------------------------------------------------------------
def vocabulary(s: Shape) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary with Llama 3's special ids: ``<unk>``, the 256 byte
    tokens, then filler pieces (every string of 1, 2, 3 … symbols, "▁" and printable ASCII, so
    that any text tokenizes) up to ``bos``, then the special tokens. Returns tokens, scores and
    token types.

    BOS and EOS are named ``<s>`` and ``</s>``, SentencePiece's names: transformers' Llama
    tokenizer adds tokens of those names when the vocabulary lacks them, which would make it
    longer than the model's vocabulary."""
    T = gguf.TokenType
    special = ["<s>", "</s>"] + [f"<|reserved_special_token_{k}|>" for k in range(s.vocab - s.bos - 2)]
    symbols = ["\u2581"] + [chr(c) for c in range(33, 127)]
    pieces = ("".join(p) for n in itertools.count(1) for p in itertools.product(symbols, repeat=n))
    fillers = list(itertools.islice((p for p in pieces if p not in special), s.bos - 257))
    tokens = ["<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + fillers + special
    types = [T.UNKNOWN] + [T.BYTE] * 256 + [T.NORMAL] * len(fillers) + [T.CONTROL] * len(special)
    # SentencePiece merges the pair of highest score first: shorter pieces first.
    scores = [0.0] * 257 + [-float(i) for i in range(len(fillers))] + [0.0] * len(special)
    return tokens, scores, [int(t) for t in types]


# ---- the two files -----------------------------------------------------------------------------
def hf_config(s: Shape) -> dict:
    """The HF config.json of the model."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "hidden_size": s.hidden, "intermediate_size": s.intermediate, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim,
        "vocab_size": s.vocab, "max_position_embeddings": s.context, "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": ROPE_THETA, "rope_scaling": ROPE_SCALING, "tie_word_embeddings": True,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "bos_token_id": s.bos, "eos_token_id": s.eos,
    }


def gguf_writer(path: Path, s: Shape, weights: list[Weight]) -> gguf.GGUFWriter:
    """A GGUF writer for ``path`` with llama.cpp's metadata for the model and the table of its
    tensors (``rope_freqs`` first, then ``weights``) written; the tensors follow in that order."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(s.name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.layers)
    w.add_feed_forward_length(s.intermediate)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(RMS_NORM_EPS)
    w.add_vocab_size(s.vocab)
    tokens, scores, types = vocabulary(s)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(s.bos)
    w.add_eos_token_id(s.eos)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    factors = rope_factors(s)
    w.add_tensor_info("rope_freqs.weight", factors.shape, factors.dtype, factors.nbytes)
    for weight in weights:
        if len(weight.shape) == 1:
            w.add_tensor_info(weight.gguf_name, weight.shape, np.dtype(np.float32), 4 * weight.shape[0])
        else:
            rows, cols = weight.shape
            type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_0][1]
            byte_shape = (rows, cols // 32 * type_size)
            w.add_tensor_info(weight.gguf_name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape),
                              raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.write_tensor_data(factors)
    return w


def shards(weights: list[Weight]) -> list[list[int]]:
    """The indices of ``weights`` in HF shards: the embedding, then one shard per layer (the
    final norm with the last), so that one shard at a time is in memory."""
    groups: dict[str, list[int]] = {}
    for index, w in enumerate(weights):
        key = ".".join(w.hf_name.split(".")[:3]) if ".layers." in w.hf_name else w.hf_name
        groups.setdefault(key, []).append(index)
    ordered = list(groups.values())
    return [ordered[0], *ordered[1:-2], ordered[-2] + ordered[-1]]


def write_model(out: Path, s: Shape) -> list[Path]:
    """Both files of the model under ``out``: the HF shards (``safetensors``) and the GGUF, each
    under a ``.partial`` name until complete; returns the files written."""
    hf = out / "hf"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text(json.dumps(hf_config(s), indent=2) + "\n")
    generation = {"bos_token_id": s.bos, "eos_token_id": s.eos, "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (hf / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    weights, gguf_file = model_weights(s), out / f"{s.name}.Q4_0.gguf"
    groups = shards(weights)
    names = [hf / f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    partial = {final: final.with_name(final.name + ".partial") for final in (*names, gguf_file)}
    writer = gguf_writer(partial[gguf_file], s, weights)
    weight_map, total = {}, 0
    with tqdm(total=len(weights), desc="writing tensors", unit="tensor", file=sys.stderr) as bar:
        for shard, group in zip(names, groups):
            tensors = {}
            for index in group:
                tensors[weights[index].hf_name] = values = draw(weights[index], index)
                writer.write_tensor_data(gguf_tensor(weights[index], values))
                weight_map[weights[index].hf_name] = shard.name
                total += values.nbytes
                bar.update()
            safetensors.numpy.save_file(tensors, str(partial[shard]), metadata={"format": "pt"})
    writer.close()
    index_file = hf / "model.safetensors.index.json"
    index_file.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    for final, done in partial.items():
        os.replace(done, final)
    return [hf / "config.json", hf / "generation_config.json", index_file, *names, gguf_file]


def claim(out: Path) -> None:
    """Make ``out`` this script's directory, or exit with status 2 when it holds files the script
    did not write (they are never overwritten)."""
    if out.exists() and not out.is_dir():
        fail(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        fail(f"{out} is not empty and was not written by this script; choose a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("Written by .ci/make_bench_model.py: random weights for benchmarks only.\n")


def fail(message: str) -> None:
    """One line on stderr and exit status 2."""
    print(f"make_bench_model: error: {message}", file=sys.stderr)
    sys.exit(2)


def report(out: Path, files: list[Path], s: Shape) -> None:
    """The files written, their sizes, and how to compile and bench them."""
    for file in files:
        print(f"{size_text(file.stat().st_size):>10}  {file}")
    gguf_file, artifact = files[-1], f"dist/{s.name}-gguf"
    print(f"\nCompile and bench (random weights: the text is noise, the speed is {s.name}'s):\n"
          f"  relaxlm compile {gguf_file} --output {artifact}\n"
          f"  relaxlm bench {artifact} --compare llama.cpp --source {gguf_file}\n"
          f"  relaxlm compile {out / 'hf'} --quantization q4f32_1 --no-calibrate --output dist/{s.name}-q4f32_1")


def size_text(n: int) -> str:
    """``n`` bytes in the largest unit that keeps a number of at least 1."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def main() -> None:
    """Parse the command line and write the model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="a new or empty directory (or one this script wrote)")
    parser.add_argument("--tiny", action="store_true", help="a 64-wide, 2-layer model of the same recipe")
    args = parser.parse_args()
    shape = TINY if args.tiny else LLAMA_3_2_1B
    claim(args.out_dir)
    report(args.out_dir, write_model(args.out_dir, shape), shape)


if __name__ == "__main__":
    main()
