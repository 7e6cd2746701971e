"""Llama against transformers.LlamaForCausalLM: the same weights through the HF-directory path
(save_pretrained → compile → load), fp32 logits of prefill and 8 decode steps; batch entry points
against single sequences."""

from family_checks import family_tests, greedy_tokens_agree
from llama_specs import LLAMA_SPECS

test_prefill_and_decode_match_transformers, test_batch_prefill_and_decode_agree_with_single_sequences = (
    family_tests(LLAMA_SPECS)
)


def test_greedy_tokens_match_transformers(tiny_models):
    ours, reference = greedy_tokens_agree(tiny_models(LLAMA_SPECS["gqa_tied_fp16"]))
    assert ours == reference
