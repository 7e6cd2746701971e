"""Gemma 3 against transformers' Gemma3ForCausalLM / Gemma3ForConditionalGeneration: the same
weights through the HF-directory path (save_pretrained → compile → load), fp32 logits of prefill
and 8 decode steps past the sliding window; batch entry points against single sequences."""

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from family_checks import family_tests, greedy_tokens_agree
from gemma3_specs import GEMMA3_SPECS, TEXT
from relaxlm.compiler import compile_model
from relaxlm.frontends import FrontendError

test_prefill_and_decode_match_transformers, test_batch_prefill_and_decode_agree_with_single_sequences = (
    family_tests(GEMMA3_SPECS)
)


def test_greedy_tokens_match_transformers_generate(tiny_models):
    """transformers' generate goes through its sliding-window KV cache, a second reference path."""
    ours, reference = greedy_tokens_agree(tiny_models(GEMMA3_SPECS["sliding_global_softcap"]))
    assert ours == reference


@pytest.mark.parametrize("feature", [{"attn_logit_softcapping": 50.0}, {"use_bidirectional_attention": True}],
                         ids=["attn_logit_softcapping", "use_bidirectional_attention"])
def test_unsupported_features_are_frontend_errors(tmp_path, feature):
    torch.manual_seed(0)
    Gemma3ForCausalLM(Gemma3TextConfig(**{**TEXT, **feature})).save_pretrained(tmp_path / "model")
    with pytest.raises(FrontendError, match=next(iter(feature))):
        compile_model(tmp_path / "model", target="llvm", quantization="q0f32", output=tmp_path / "artifact")
    assert not (tmp_path / "artifact").exists()
