"""Text generation on a tiny model: the text is the decoded greedy tokens, stop strings cut it,
and streaming yields the same text in pieces."""

import numpy as np
import pytest

from cli_support import first_new_word
from llama_specs import LLAMA_SPECS

PROMPT = "w1 w5 w9 w33"


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models(LLAMA_SPECS["gqa_tied_fp16"]).model


def _greedy_ids(model, n):
    ids = model.tokenizer(PROMPT)["input_ids"]
    out = []
    with model.new_sequence() as seq:
        logits = seq.prefill(ids)
        for _ in range(n):
            token = int(np.argmax(logits))
            if token == model.tokenizer.eos_token_id:
                break
            out.append(token)
            logits = seq.decode(token)
    return out


def test_generate_returns_the_greedy_continuation(model):
    expected = model.tokenizer.decode(_greedy_ids(model, 6), skip_special_tokens=True)
    assert model.generate(PROMPT, max_tokens=6) == expected


def test_stream_yields_the_same_text_in_pieces(model):
    pieces = list(model.stream(PROMPT, max_tokens=6))
    assert len(pieces) > 1
    assert "".join(pieces) == model.generate(PROMPT, max_tokens=6)


def test_a_stop_string_ends_the_text_before_it(model):
    words = model.generate(PROMPT, max_tokens=6).split()
    stop = words[2]
    text = model.generate(PROMPT, max_tokens=6, stop=[stop])
    assert stop not in text
    assert text.split() == words[: words.index(stop)]


def test_sampling_with_a_seed_is_reproducible(model):
    options = dict(max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert model.generate(PROMPT, **options) == model.generate(PROMPT, **options)


def test_a_plain_string_is_one_stop_string(tiny_models):
    model = tiny_models(LLAMA_SPECS["mha_llama3_bias_bf16"]).model
    prompt = "w10 w11 w12 w13"  # its greedy text varies from word to word
    text = model.generate(prompt, max_tokens=6)
    cut = first_new_word(text)
    assert model.generate(prompt, max_tokens=6, stop=text.split()[cut]).split() == text.split()[:cut]


def test_a_stream_says_why_it_ended(model):
    text = model.stream(PROMPT, max_tokens=3)
    list(text)
    assert text.finish_reason == "length" and len(text.token_ids) == 3
