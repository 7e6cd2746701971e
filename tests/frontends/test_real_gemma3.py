"""Real weights: Gemma 3 270M (base) from the bundled GGUF, compiled at q0f32, against
transformers loading the same GGUF (both dequantize it to float32).

The GGUF lacks what this checks beyond the tiny random configs of test_gemma3.py: the
sliding-window pattern and local RoPE base (transformers' Gemma 3 defaults fill them in), and the
norm weights that llama.cpp stores as ``1 + w``.
"""

import pytest
import torch

from family_checks import greedy_tokens, reference_greedy_tokens
from relaxlm.frontends.sources import resolve_bundled
from relaxlm.runtime import load

pytestmark = pytest.mark.real
# A base model without a chat template: a plain-text prompt.
PROMPT = "The capital of France is"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def gguf_path():
    return resolve_bundled("gemma3-270m")


@pytest.fixture(scope="module")
def reference(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def artifact(bundled_artifacts):
    return bundled_artifacts("gemma3-270m", "q0f32")


def test_first_32_greedy_tokens_match_transformers(reference, artifact):
    tokenizer, hf_model = reference
    prompt = tokenizer(PROMPT)["input_ids"]
    expected = reference_greedy_tokens(hf_model, prompt, NEW_TOKENS, tokenizer.pad_token_id)
    model = load(artifact)
    assert model.tokenizer(PROMPT)["input_ids"] == prompt, "the artifact's tokenizer differs from the reference's"
    ours = greedy_tokens(model, prompt, NEW_TOKENS)
    assert ours == expected, (tokenizer.decode(ours), tokenizer.decode(expected))
