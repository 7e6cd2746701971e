"""Real weights: SmolLM2-135M-Instruct from the bundled GGUF, compiled at q0f32, against
transformers loading the same GGUF (both dequantize it to float32)."""

import pytest

from family_checks import greedy_tokens, reference_greedy_tokens
from relaxlm.runtime import load

pytestmark = pytest.mark.real
QUESTION = "What is the capital of France?"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def reference(smollm2_reference):
    return smollm2_reference


@pytest.fixture(scope="module")
def artifact(smollm2_artifacts):
    return smollm2_artifacts("q0f32")


def _chat_ids(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_first_32_greedy_tokens_match_transformers(reference, artifact):
    tokenizer, hf_model = reference
    prompt = _chat_ids(tokenizer)
    expected = reference_greedy_tokens(hf_model, prompt, NEW_TOKENS, tokenizer.pad_token_id)
    model = load(artifact)
    assert _chat_ids(model.tokenizer) == prompt, "the artifact's tokenizer differs from the reference's"
    ours = greedy_tokens(model, prompt, NEW_TOKENS)
    assert ours == expected, (tokenizer.decode(ours), tokenizer.decode(expected))


def test_generate_answers_the_question(artifact):
    model = load(artifact)
    answer = model.generate(QUESTION, chat=True, max_tokens=24)
    assert "Paris" in answer
