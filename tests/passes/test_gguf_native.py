"""The ``gguf`` scheme on a tiny random Llama GGUF holding every supported block type, q/k/v and
gate/up of mixed types and an untied logits weight (tests/gguf_support.py). Reference:
transformers loading the same file (it dequantizes every tensor to float32)."""

import numpy as np
import pytest
import torch

from family_checks import (BATCH_TOLERANCE, CONTINUATION, INT16_BOUND, PROMPT, TOLERANCE, batch_vs_single_errors,
                           prefill_and_decode_errors)
from gguf_support import TYPES, rounded_activations, write_tiny_gguf
from relaxlm import frontends, targets
from relaxlm.compiler import compile as compile_module
from relaxlm.compiler import compile_model
from relaxlm.passes.gguf_blocks import LAYOUTS
from relaxlm.runtime.artifact import Manifest
from support import TinyModel


# One weight requantized to 8-bit groups: the bound tests/passes/test_quantized_llama.py holds q8f32_1 to.
Q8_BOUND = 0.02
# One value rounded to the other side at 8 bits: measured 3.7e-3 (against 3e-2 for the rounding itself).
ROUNDING_STEP_BOUND = 0.01


@pytest.fixture(scope="module")
def gguf_reference(tiny_gguf_file):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_gguf_file.parent), gguf_file=tiny_gguf_file.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_gguf_at(tiny_gguf_file, gguf_reference, tmp_path_factory):
    """The tiny GGUF compiled for llvm at its own blocks, with ``activations`` (None: the default), once each."""
    compiled: dict[str | None, TinyModel] = {}

    def get(activations: str | None) -> TinyModel:
        if activations not in compiled:
            output = tmp_path_factory.mktemp("tiny_gguf") / "artifact"
            artifact = compile_model(tiny_gguf_file, target="llvm", activations=activations, output=output)
            compiled[activations] = TinyModel(f"tiny-gguf-{activations}", gguf_reference, tiny_gguf_file, artifact)
        return compiled[activations]

    return get


@pytest.fixture(scope="module")
def tiny_gguf(tiny_gguf_at) -> TinyModel:
    """Float32 activations: the exact path."""
    return tiny_gguf_at("float32")


def test_a_gguf_compiles_at_its_own_blocks_by_default(tiny_gguf_at):
    manifest = Manifest.read(tiny_gguf_at(None).artifact)
    assert manifest.quantization == "gguf" and manifest.calibration is None
    # This CPU has integer dot products (AVX2 at least; tests/targets/test_integer_kernels.py).
    assert manifest.activations == "int16"
    # One stored weight per run of parts of one type: blk.0's q and k (Q4_K) with v (Q6_K) → 2.
    assert {p.rsplit(".parts.", 1)[0] for p in manifest.params if ".parts.1." in p} == {
        "model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"}
    assert set(TYPES.values()) == set(LAYOUTS)


def test_prefill_and_decode_match_transformers(tiny_gguf):
    errors = prefill_and_decode_errors(tiny_gguf)
    assert max(errors) < TOLERANCE, errors


def test_int16_activations_the_default_stay_within_their_rounding(tiny_gguf_at):
    """The projections round their inputs to 16 bits per 32 values (~2.6e-5 of a kernel's largest
    output); through this random model's 2 layers the logits move by ~1.4e-4. (Against transformers
    rounding alike, int16 is no closer: a rounding step is then as small as float32's own error.)"""
    errors = prefill_and_decode_errors(tiny_gguf_at(None))
    assert max(errors) < INT16_BOUND, errors


def test_int8_activations_compute_what_transformers_computes_rounding_alike(tiny_gguf_at):
    """At 8 bits (llama.cpp's rounding) the logits of this random model move by up to ~3%; against
    transformers rounding the same inputs alike, most steps agree to float32's precision, and a step
    where some value lies on a rounding boundary (float32's order of summation decides) by one
    rounding step of it. tests/passes/test_real_gguf_native.py measures what rounding costs real weights."""
    tiny = tiny_gguf_at("int8")
    assert Manifest.read(tiny.artifact).activations == "int8"
    with torch.no_grad(), rounded_activations(tiny.reference, 8) as reference:
        expected = reference(torch.tensor([PROMPT + CONTINUATION])).logits[0].float().numpy()
    errors = prefill_and_decode_errors(tiny, expected=expected)
    assert np.median(errors) < TOLERANCE and max(errors) < ROUNDING_STEP_BOUND, errors


def test_batch_prefill_and_decode_agree_with_single_sequences(tiny_gguf):
    errors = batch_vs_single_errors(tiny_gguf.model, prefixes=[PROMPT[:9], PROMPT[:3], []],
                                    chunks=[[20, 21], [22, 23, 24], [25]],
                                    decode_rounds=[[t, (t + 1) % 96, (t + 2) % 96] for t in CONTINUATION])
    assert max(errors) < BATCH_TOLERANCE, errors


def test_a_block_type_not_run_natively_falls_back_to_8_bit_groups(tmp_path, capfd):
    """A weight of a type without a layout (Q5_1 here) is stored at q8f32_1, said once; the rest
    keeps its blocks. Such a file's default is the target's scheme, as for any requantized model."""
    from transformers import AutoModelForCausalLM

    path = write_tiny_gguf(tmp_path / "mixed.gguf", {"blk.1.attn_output": "Q5_1"})
    source = frontends.open_source(path)
    try:
        assert compile_module._default_scheme(source, targets.resolve("llvm")).name == "q4f32_1"  # pylint: disable=protected-access
    finally:
        source.close()
    artifact = compile_model(path, target="llvm", quantization="gguf", output=tmp_path / "artifact", verbose=True)
    notes = [line for line in capfd.readouterr().err.splitlines() if "natively" in line]
    assert notes == ["relaxlm: weights in block types relaxlm does not run natively yet (Q5_1: 1 of 10) "
                     "are stored as q8f32_1"]
    manifest = Manifest.read(artifact)
    assert "model.layers.1.self_attn.o_proj.q_weight" in manifest.params
    assert "model.layers.1.self_attn.qkv_proj.parts.0.qs" in manifest.params
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    errors = prefill_and_decode_errors(TinyModel("mixed-gguf", reference, path, artifact))
    assert max(errors) < Q8_BOUND, errors


def test_blocks_of_another_shape_than_the_config_are_a_clear_error():
    from relaxlm.frontends import BlockTensor, FrontendError
    from relaxlm.frontends.weights import convert_weights

    class Source:
        def block_tensor(self, hf_name):
            return BlockTensor("Q8_0", np.zeros((4, 34), np.uint8), 32)  # 4 rows of 32 weights

    with pytest.raises(FrontendError, match="has shape .4, 32. but the config implies .4, 64."):
        list(convert_weights(Source(), [("m.o_proj.weight", (4, 64), "float32")], lambda name, t: t,
                             lambda name, shape: True))
