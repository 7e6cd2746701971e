"""Llama against transformers.LlamaForCausalLM: the same weights through the HF-directory path
(save_pretrained → compile → load), fp32 logits of prefill and 8 decode steps."""

import numpy as np
import pytest

from conftest import relative_error
from llama_specs import LLAMA_SPECS

TOLERANCE = 1e-4
PROMPT = [1, 17, 42, 5, 88, 23, 9, 61, 30, 12, 77, 3]
CONTINUATION = [40, 8, 93, 15, 66, 2, 51, 34]


@pytest.mark.parametrize("spec", LLAMA_SPECS.values(), ids=LLAMA_SPECS.keys())
def test_prefill_and_decode_match_transformers(tiny_models, spec):
    tiny = tiny_models(spec)
    expected = tiny.reference_logits(PROMPT + CONTINUATION)
    with tiny.model.new_sequence() as seq:
        errors = [relative_error(seq.prefill(PROMPT), expected[len(PROMPT) - 1])]
        for step, token in enumerate(CONTINUATION):
            errors.append(relative_error(seq.decode(token), expected[len(PROMPT) + step]))
    assert len(errors) == 1 + len(CONTINUATION)
    assert max(errors) < TOLERANCE, errors


def test_greedy_tokens_match_transformers(tiny_models):
    tiny = tiny_models(LLAMA_SPECS["gqa_tied_fp16"])
    import torch

    with torch.no_grad():
        reference = tiny.reference.generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False,
                                            eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    ours = []
    with tiny.model.new_sequence() as seq:
        logits = seq.prefill(PROMPT)
        for _ in range(10):
            ours.append(int(np.argmax(logits)))
            logits = seq.decode(ours[-1])
    assert ours == reference
