"""OLMo 1, 2 and 3 against transformers' OlmoForCausalLM / Olmo2ForCausalLM / Olmo3ForCausalLM:
the same weights through the HF-directory path (save_pretrained → compile → load), fp32 logits of
prefill and 8 decode steps; batch entry points against single sequences."""

from family_checks import family_tests, greedy_tokens_agree
from olmo_specs import OLMO_SPECS

test_prefill_and_decode_match_transformers, test_batch_prefill_and_decode_agree_with_single_sequences = (
    family_tests(OLMO_SPECS)
)


def test_greedy_tokens_match_transformers_generate(tiny_models):
    """transformers' generate goes through its sliding-window KV cache, a second reference path."""
    ours, reference = greedy_tokens_agree(tiny_models(OLMO_SPECS["olmo3_sliding_yarn"]))
    assert ours == reference
