"""Real weights: SmolLM2-135M-Instruct from the bundled GGUF, compiled at q0f32, against
transformers loading the same GGUF (both dequantize it to float32)."""

import os

import pytest
import torch

from relaxlm.compiler import compile_model
from relaxlm.frontends.sources import resolve_bundled
from relaxlm.runtime import load

pytestmark = pytest.mark.real
QUESTION = "What is the capital of France?"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def gguf_path():
    return resolve_bundled("smollm2-135m")


@pytest.fixture(scope="module")
def reference(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return compile_model("smollm2-135m", target="llvm", quantization="q0f32",
                         output=tmp_path_factory.mktemp("real") / "smollm2-135m-q0f32-llvm")


def _chat_ids(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_first_32_greedy_tokens_match_transformers(reference, artifact):
    tokenizer, hf_model = reference
    prompt = _chat_ids(tokenizer)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    expected = out[0, len(prompt):].tolist()
    model = load(artifact)
    assert _chat_ids(model.tokenizer) == prompt, "the artifact's tokenizer differs from the reference's"
    ours = []
    with model.new_sequence() as seq:
        logits = seq.prefill(prompt)
        for _ in range(NEW_TOKENS):
            ours.append(int(logits.argmax()))
            logits = seq.decode(ours[-1])
    assert ours == expected, (tokenizer.decode(ours), tokenizer.decode(expected))


def test_generate_answers_the_question(artifact):
    model = load(artifact)
    answer = model.generate(QUESTION, chat=True, max_tokens=24)
    assert "Paris" in answer
