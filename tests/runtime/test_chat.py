"""A conversation keeps its KV cache across turns: each answer is the one a fresh generation of
the whole conversation gives (the reference: ``model.generate(messages, chat=True)`` on a new
sequence), while each turn prefills only the tokens the cache does not hold yet."""

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from chat_specs import CHAT_SPEC
from llama_specs import LLAMA_SPECS
from relaxlm.runtime import GenerationError, load
from relaxlm.runtime.artifact import TokenizerInfo
from relaxlm.runtime.chat import Conversation, check_can_chat
from relaxlm.runtime.generation import prompt_tokens
from relaxlm.runtime.sampling import chat_sampling
from support import WORDS

# Greedy, with the chat's repetition penalty over the last 64 tokens.
SAMPLING = chat_sampling({}, temperature=0.0)
MAX_TOKENS = 8
SYSTEM = "w4 w5"


@pytest.fixture(scope="module")
def model(tiny_models):
    # Room for a conversation and a fresh generation of the same length side by side.
    return load(tiny_models(CHAT_SPEC).artifact, max_total_tokens=4 * 2048)


def _words(n: int, start: int = 0) -> str:
    """``n`` vocabulary words from w6 on (w0–w5 are the template's and the system message's)."""
    return " ".join(WORDS[6 + (start + 7 * i) % (len(WORDS) - 6)] for i in range(n))


def _fresh(model, messages):
    """The reference: the answer to ``messages`` from a new sequence, as (text, token ids)."""
    stream = model.stream(messages, max_tokens=MAX_TOKENS, chat=True, **dataclasses.asdict(SAMPLING))
    return "".join(stream), stream.token_ids


def _turn(model, conversation, text):
    """One turn, checked against a fresh generation; returns the cache before it and the prompt."""
    cached_before = conversation.cached_ids
    reply = conversation.say(text)
    answer = "".join(reply)
    prompt_messages = conversation.messages[:-1]
    assert (answer, reply.token_ids) == _fresh(model, prompt_messages)
    assert conversation.messages[-1] == {"role": "assistant", "content": answer}
    ids = prompt_tokens(model, prompt_messages, chat=True)
    assert conversation.turns[-1].reused + conversation.turns[-1].prefilled == len(ids)
    assert conversation.turns[-1].generated == len(reply.token_ids)
    return cached_before, ids, reply.token_ids


def _common_prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("messages, plain_answers", [
    (("w10 w11", "w20 w21 w22", "w30 w31"), True),
    # The first answer ends in <unk>, which decodes to nothing: the cache holds one token more
    # than the re-rendered conversation, and only the common prefix is reused.
    (("w10 w11 w12", "w20 w21", "w30 w31 w32 w33"), False),
])
def test_each_turn_answers_as_a_fresh_generation_and_prefills_only_new_tokens(model, messages, plain_answers):
    with Conversation(model, SAMPLING, system=SYSTEM, max_tokens=MAX_TOKENS) as chat:
        _, first_ids, _ = _turn(model, chat, messages[0])
        assert chat.turns[0].reused == 0
        previous_prompt = first_ids
        for text in messages[1:]:
            cached_before, ids, _ = _turn(model, chat, text)
            reused = chat.turns[-1].reused
            assert reused == _common_prefix(cached_before, ids) >= len(previous_prompt)
            assert chat.turns[-1].prefilled == len(ids) - reused
            # Answers of plain words re-render to the very tokens cached: all of them are reused.
            assert (reused == len(cached_before)) == plain_answers
            previous_prompt = ids
        # The third turn still holds the first turn, its answer (as re-rendered) included.
        answer_ids = model.tokenizer(chat.messages[2]["content"], add_special_tokens=False)["input_ids"]
        assert chat.cached_ids[: len(first_ids) + len(answer_ids)] == first_ids + answer_ids
        assert chat.turns[-1].prefilled < chat.turns[-1].reused


def test_an_answer_stopped_early_keeps_what_was_shown_and_the_cache_consistent(model):
    with Conversation(model, SAMPLING, system=SYSTEM, max_tokens=MAX_TOKENS) as chat:
        reply = chat.say("w10 w11 w12")
        shown = next(reply) + next(reply)
        reply.close()
        assert chat.messages[-1] == {"role": "assistant", "content": shown}
        # The last token sampled was shown but never decoded into the cache.
        assert chat._seq.length == len(chat.cached_ids) == chat.turns[0].prefilled + len(reply.token_ids) - 1
        _turn(model, chat, "w20 w21")


def test_after_clear_only_the_common_prefix_is_reused(model):
    with Conversation(model, SAMPLING, system=SYSTEM, max_tokens=MAX_TOKENS) as chat:
        _turn(model, chat, "w10 w11 w12")
        chat.clear()
        assert chat.messages == [{"role": "system", "content": SYSTEM}]
        cached_before, ids, _ = _turn(model, chat, "w40 w41")
        # The system message and the user marker after it: w0 w4 w5 w3 w1.
        assert chat.turns[-1].reused == _common_prefix(cached_before, ids) == 5


def test_the_oldest_turns_are_dropped_when_the_context_is_full(model):
    """Turns of 600 words: the fourth no longer fits the 2,048-token window with the first."""
    with Conversation(model, SAMPLING, system=SYSTEM, max_tokens=MAX_TOKENS) as chat:
        messages = [_words(600, start=i) for i in range(4)]
        for text in messages[:3]:
            _turn(model, chat, text)
        assert len(chat.messages) == 7
        _turn(model, chat, messages[3])
        # Only the system message and the next user marker (w0 w4 w5 w3 w1) still match the cache.
        assert chat.turns[-1].reused == 5
        assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant", "user",
                                                      "assistant"]
        assert chat.messages[0]["content"] == SYSTEM
        assert [m["content"] for m in chat.messages[1::2]] == messages[1:]


def test_a_message_too_long_for_the_context_is_an_error_and_the_chat_goes_on(model):
    with Conversation(model, SAMPLING, system=SYSTEM, max_tokens=MAX_TOKENS) as chat:
        _turn(model, chat, "w10 w11 w12")
        messages, cached = list(chat.messages), chat.cached_ids
        with pytest.raises(GenerationError, match="exceeds the context window of 2048 tokens: shorten it") as err:
            chat.say(_words(2100))
        assert "\n" not in str(err.value)
        assert (chat.messages, chat.cached_ids, len(chat.turns)) == (messages, cached, 1)
        _turn(model, chat, "w20 w21")


def test_a_base_model_cannot_chat(tiny_models):
    base = tiny_models(LLAMA_SPECS["gqa_tied_fp16"]).model
    message = "llama_gqa_tied_fp16-artifact has no chat template: it is a base model; use 'relaxlm generate'"
    with pytest.raises(GenerationError, match=message):
        check_can_chat(base)
    with pytest.raises(GenerationError, match="no chat template"):
        Conversation(base)


def test_a_model_without_a_tokenizer_cannot_chat():
    no_tokenizer = SimpleNamespace(path=Path("dist/m"), manifest=SimpleNamespace(tokenizer=TokenizerInfo()))
    with pytest.raises(GenerationError, match="^m was compiled without a tokenizer, so it cannot chat"):
        check_can_chat(no_tokenizer)
