"""The random Llama-3.2-1B-shaped bench model of ``.ci/make_bench_model.py``, made at its tiny size
(``--tiny``: the same recipe, 64 wide, 2 layers). References:

- the weights: the Q4_0 round trip (the ``gguf`` package's quantizer) of the HF directory's
  bfloat16 weights, which relaxlm's GGUF frontend must read back bit for bit;
- the model: transformers on the HF directory with those round-tripped weights, against
  transformers on the GGUF with llama.cpp's reading of ``rope_freqs`` (each pair's frequency
  divided by its entry), i.e. the function llama.cpp computes from the file;
- the compile: transformers on the GGUF as it loads it, against relaxlm's ``gguf`` compile.

transformers' GGUF loader, like relaxlm's GGUF frontend, ignores ``rope_freqs``: both run the GGUF
with plain RoPE where llama.cpp and the HF directory run llama3-scaled RoPE (only the pairs of
wavelength above 2048 positions differ; at these 20 positions the logits move by ~0.5%).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from family_checks import CONTINUATION, INT16_BOUND, PROMPT, TOLERANCE, prefill_and_decode_errors
from relaxlm import frontends
from relaxlm.compiler import compile_model
from relaxlm.frontends.rope import rope_from_dict
from relaxlm.runtime import load
from relaxlm.runtime.artifact import Manifest
from support import TinyModel, relative_error

SCRIPT = Path(__file__).parents[2] / ".ci" / "make_bench_model.py"
GGUF_FILE = "llama-tiny-random.Q4_0.gguf"
Q4_0 = gguf.GGMLQuantizationType.Q4_0


def make(out: Path) -> subprocess.CompletedProcess:
    """Run the script in tiny mode into ``out``."""
    return subprocess.run([sys.executable, str(SCRIPT), "--tiny", str(out)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "model"
    result = make(out)
    assert result.returncode == 0, result.stderr
    assert f"relaxlm compile {out / GGUF_FILE}" in result.stdout
    return out


@pytest.fixture(scope="module")
def hf_round_trip(bench_dir):
    """transformers on the HF directory, every matrix replaced by its Q4_0 round trip."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(bench_dir / "hf"), dtype=torch.float32).eval()
    state = {name: torch.from_numpy(round_trip(p.numpy())) if p.ndim == 2 else p
             for name, p in model.state_dict().items()}
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def gguf_reference(bench_dir):
    """transformers on the GGUF, as it loads it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(bench_dir), gguf_file=GGUF_FILE, dtype=torch.float32).eval()


def round_trip(w: np.ndarray) -> np.ndarray:
    """``w`` quantized to Q4_0 and back."""
    return gguf.quants.dequantize(gguf.quants.quantize(w, Q4_0), Q4_0)


def logits(model, tokens: list[int]) -> np.ndarray:
    """transformers' float32 logits at every position of ``tokens``."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def plain_inv_freq(bench_dir: Path) -> np.ndarray:
    """The inverse frequencies of RoPE without scaling at the HF config's base."""
    config = json.loads((bench_dir / "hf" / "config.json").read_text())
    return rope_from_dict({"rope_theta": config["rope_theta"]}, "Llama").inv_freq(config["head_dim"])


def rope_freqs(bench_dir: Path) -> np.ndarray:
    """The GGUF's ``rope_freqs`` tensor."""
    reader = gguf.GGUFReader(str(bench_dir / GGUF_FILE))
    return np.array(next(t.data for t in reader.tensors if t.name == "rope_freqs.weight"), dtype=np.float32)


def test_a_directory_it_did_not_write_is_refused_and_kept(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = make(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"make_bench_model: error: {tmp_path} is not empty and was not written by this script; "
        "choose a new or empty directory"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_the_gguf_holds_the_q4_0_round_trip_of_the_hf_weights(bench_dir):
    """Read through relaxlm's frontend (GGUF names mapped to HF ones, llama.cpp's q/k row order
    undone), every GGUF tensor is exactly the round trip of the HF one; norms are kept as floats."""
    hf, source = frontends.open_source(bench_dir / "hf"), frontends.open_source(bench_dir / GGUF_FILE)
    try:
        family = frontends.FAMILIES["LlamaForCausalLM"]
        fixup = frontends.tensor_fixup(family, source, family.config_class.from_hf(source.config))
        index = json.loads((bench_dir / "hf" / "model.safetensors.index.json").read_text())
        names = list(index["weight_map"])
        # One shard for the embedding, one per layer (the final norm with the last).
        assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        for shard in set(index["weight_map"].values()):
            with safe_open(str(bench_dir / "hf" / shard), framework="numpy") as f:
                assert {n for n, s in index["weight_map"].items() if s == shard} == set(f.keys())
        # The embedding, 9 tensors per layer, the final norm.
        assert len(names) == 1 + 2 * 9 + 1 and source.weight_types() == {"Q4_0"}
        for name in names:
            expected = hf.tensor(name)
            expected = round_trip(expected) if expected.ndim == 2 else expected
            assert source.tensor_info(name)[0] == ("Q4_0" if expected.ndim == 2 else "F32"), name
            assert np.array_equal(fixup(name, source.tensor(name)), expected), name
        # Tied embeddings: llama.cpp writes no output matrix.
        assert source.config["tie_word_embeddings"] and not source.has_tensor("lm_head.weight")
    finally:
        hf.close()
        source.close()


def test_rope_freqs_encode_the_llama3_scaling_of_the_hf_config(bench_dir):
    """llama.cpp divides each pair's base frequency by ``rope_freqs``; that gives the inverse
    frequencies relaxlm (as transformers) computes from the HF config's llama3 scaling."""
    config = json.loads((bench_dir / "hf" / "config.json").read_text())
    factors = rope_freqs(bench_dir)
    scaled = rope_from_dict({**config["rope_scaling"], "rope_theta": config["rope_theta"]}, "Llama")
    assert factors.min() == 1 and factors.max() == config["rope_scaling"]["factor"]
    np.testing.assert_allclose(plain_inv_freq(bench_dir) / factors, scaled.inv_freq(config["head_dim"]), rtol=1e-6)


def test_both_files_hold_the_same_model(bench_dir, hf_round_trip, gguf_reference):
    """transformers on the GGUF, with llama.cpp's ``rope_freqs`` applied, computes the HF model
    with Q4_0 weights: only float32 summation order differs. (Against the HF directory's own
    bfloat16 weights the logits differ by 25-50% here: Q4_0's error on Gaussian weights.)"""
    rotary = gguf_reference.model.rotary_emb
    saved = rotary.inv_freq.clone()
    rotary.inv_freq.copy_(torch.from_numpy(plain_inv_freq(bench_dir) / rope_freqs(bench_dir)))
    try:
        tokens = PROMPT + CONTINUATION
        expected, actual = logits(hf_round_trip, tokens), logits(gguf_reference, tokens)
    finally:
        rotary.inv_freq.copy_(saved)
    errors = [relative_error(a, e) for a, e in zip(actual, expected)]
    assert max(errors) < TOLERANCE, errors


def test_relaxlm_compiles_the_gguf_to_transformers_logits(bench_dir, gguf_reference, tmp_path):
    """The bench's first command: the GGUF at its own Q4_0 blocks (the default), with the tokenizer
    relaxlm builds from the file's vocabulary; its activations are rounded to int16 where the CPU
    has integer dot products (the default), else exact."""
    artifact = compile_model(bench_dir / GGUF_FILE, target="llvm", output=tmp_path / "artifact", context_window=256)
    manifest = Manifest.read(artifact)
    assert manifest.quantization == "gguf"
    tiny = TinyModel("bench-gguf", gguf_reference, bench_dir / GGUF_FILE, artifact)
    errors = prefill_and_decode_errors(tiny)
    assert max(errors) < (TOLERANCE if manifest.activations == "float32" else INT16_BOUND), errors
    tokenizer, text = tiny.model.tokenizer, "Hello, world! 3.14"
    assert len(tokenizer) == tiny.model.vocab_size
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


def test_the_hf_directory_compiles_without_a_tokenizer(bench_dir, tmp_path):
    """The bench's other command: the HF directory at q4f32_1, uncalibrated; it has no tokenizer
    (the bench feeds token ids)."""
    artifact = compile_model(bench_dir / "hf", target="llvm", quantization="q4f32_1", calibrate=False,
                             output=tmp_path / "artifact")
    manifest = Manifest.read(artifact)
    assert manifest.quantization == "q4f32_1" and not manifest.tokenizer.present
    with load(artifact).new_sequence() as seq:
        assert np.isfinite(seq.prefill(PROMPT)).all()
