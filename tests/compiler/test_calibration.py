"""Calibration: the statistics of each weight's inputs that a compiled float32 model gathers
while it samples its calibration text, against transformers' inputs to the same layers on that
text; and a calibrated 4-bit compile end to end."""

import json
import types

import numpy as np
import pytest
import torch

from llama_specs import LLAMA_SPECS
from relaxlm.compiler import calibration, compile_model
from relaxlm.compiler import compile as compile_module
from relaxlm.passes import get_scheme
from relaxlm.runtime import load
from relaxlm.runtime.artifact import CONFIG_FILE
from support import relative_error

LENGTH = 20
# The module parameter each HF layer's input feeds, per decoder layer (q/k/v share the input of
# the fused qkv_proj, gate/up that of gate_up_proj).
HF_INPUT_OF = {"self_attn.q_proj": "self_attn.qkv_proj", "self_attn.o_proj": "self_attn.o_proj",
               "mlp.gate_proj": "mlp.gate_up_proj", "mlp.down_proj": "mlp.down_proj"}


def reference_inputs(hf_model: torch.nn.Module, sequences: list[list[int]], tied: bool) -> dict[str, torch.Tensor]:
    """Each layer's inputs (rows) in transformers, fed what the sampling fed the model (all
    tokens of each sequence but its last), by the compiled module's parameter name."""
    layers = {f"model.layers.{i}.{hf}": f"model.layers.{i}.{ours}.weight"
              for i in range(hf_model.config.num_hidden_layers) for hf, ours in HF_INPUT_OF.items()}
    layers["lm_head"] = "model.embed_tokens.weight" if tied else "lm_head.weight"
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in layers.values()}
    hooks = [module.register_forward_hook(lambda m, args, out, name=layers[path]: rows[name].append(args[0][0]))
             for path, module in hf_model.named_modules() if path in layers]
    try:
        with torch.no_grad():
            for sequence in sequences:
                hf_model(torch.tensor([sequence[:-1]]))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(xs).double() for name, xs in rows.items()}


@pytest.mark.parametrize("spec", ["gqa_tied_fp16", "mha_llama3_bias_bf16"])
def test_importance_equals_transformers_layer_inputs(tiny_models, spec):
    tiny = tiny_models(LLAMA_SPECS[spec])
    model = load(tiny.artifact, max_total_tokens=len(calibration.OPENINGS) * (LENGTH + 16))
    measured = calibration.calibrate(model, LENGTH)
    sequences = measured.sequences
    assert [len(s) for s in sequences] == [LENGTH] * len(calibration.OPENINGS)
    assert sequences == calibration.calibrate(model, LENGTH).sequences, "seeded sampling repeats itself"
    assert len({tuple(s) for s in sequences}) == len(sequences)
    tied = tiny.reference.config.tie_word_embeddings
    inputs = reference_inputs(tiny.reference, sequences, tied)
    # Every weight a matmul reads, and only those (the embedding lookup adds nothing).
    assert set(measured.importance) == set(inputs)
    for name, x in inputs.items():
        assert relative_error(measured.importance[name], x.pow(2).mean(0).numpy()) < 1e-4, name
    # The logits weight's full second moment, for GPTQ.
    logits_weight = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert list(measured.hessians) == [logits_weight]
    x = inputs[logits_weight]
    assert relative_error(measured.hessians[logits_weight], (x.T @ x / len(x)).numpy()) < 1e-4
    assert measured.tokens == len(sequences) * LENGTH
    # The model's perplexity on its own text, from the sampling logits, is transformers' on it.
    with torch.no_grad():
        nll = sum(torch.nn.functional.cross_entropy(tiny.reference(torch.tensor([s])).logits[0, :-1],
                                                    torch.tensor(s[1:]), reduction="sum").item() for s in sequences)
    expected = float(np.exp(nll / sum(len(s) - 1 for s in sequences)))
    assert abs(measured.perplexity - expected) / expected < 1e-4


def test_calibrated_q4_compile_records_it_and_stays_close_to_float32(tiny_models, tmp_path):
    tiny = tiny_models(LLAMA_SPECS["gqa_tied_fp16"])
    artifacts = {calibrate: compile_model(tiny.hf_dir, target="llvm", quantization="q4f32_1", calibrate=calibrate,
                                          output=tmp_path / f"q4-{calibrate}") for calibrate in (True, False)}
    manifest = json.loads((artifacts[True] / CONFIG_FILE).read_text())
    context = tiny.reference.config.max_position_embeddings  # under SEQUENCE_TOKENS: sequences fill it
    assert manifest["calibration"]["tokens"] == len(calibration.OPENINGS) * min(calibration.SEQUENCE_TOKENS, context)
    assert json.loads((artifacts[False] / CONFIG_FILE).read_text())["calibration"] is None
    assert not list(tmp_path.glob(".calibration.*")), "the float32 build is removed"
    ids = [1, 5, 9, 14, 3, 27, 8, 61, 40, 12]
    expected = tiny.reference_logits(ids)
    for artifact in artifacts.values():
        with load(artifact).new_sequence() as seq:
            actual = seq.verify(ids)
        # The bound of tests/passes/test_quantized_llama.py (random weights: see there).
        assert relative_error(actual, expected) < 0.25


@pytest.mark.parametrize("asked, scheme, float32_bytes, expected", [
    (None, "q4f32_1", 1 << 20, True),  # the default at 4 bits
    (None, "q4f16_1", 8 << 30, False),  # too big for a float32 build by default …
    (True, "q4f16_1", 8 << 30, True),  # … unless asked for
    (False, "q4f32_1", 1 << 20, False),
    (None, "q8f32_1", 1 << 20, False),  # 8 bits gain little
    (True, "q0f32", 1 << 20, False),  # nothing to quantize
])
def test_when_a_compile_calibrates(asked, scheme, float32_bytes, expected):
    build = types.SimpleNamespace(scheme=get_scheme(scheme), calibrate=asked)
    exported = types.SimpleNamespace(source_params=[("w", (float32_bytes // 4,), "float32")])
    assert compile_module._should_calibrate(build, exported, compile_module._Report(verbose=False)) == expected
